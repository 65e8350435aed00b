//! Accelerate's BatchSamplerShard tables (shared/oracle/accelerate_cases.md, P = 2), checked batch for
//! batch, with `len()` equal to the number of batches listed.

use super::*;
use crate::data::sampler::{BatchSampler, FixedBatches, Sampler};

fn b(v: &[&[usize]]) -> Vec<Vec<usize>> {
    v.iter().map(|x| x.to_vec()).collect()
}

fn check(
    n: usize,
    bs: usize,
    drop_last: bool,
    split: bool,
    even: bool,
    p0: Vec<Vec<usize>>,
    p1: Vec<Vec<usize>>,
) {
    for (rank, want) in [(0, p0), (1, p1)] {
        let sampler = BatchSampler::new(Sampler::Sequential { len: n }, bs, drop_last);
        let shard = BatchSamplerShard::new(sampler, 2, rank, split, even).unwrap();
        let got = shard.batches();
        assert_eq!(
            got, want,
            "range({n}) bs={bs} drop_last={drop_last} split={split} even={even} rank {rank}"
        );
        // As in Accelerate: without split_batches len() counts this rank's batches; with it, len() is the
        // wrapped sampler's length (even when uneven batches leave a rank one short).
        let want_len = if split {
            shard.total_length()
        } else {
            want.len()
        };
        assert_eq!(
            shard.len(),
            want_len,
            "len of range({n}) bs={bs} drop_last={drop_last} rank {rank}"
        );
    }
}

const T24_P0: &[&[usize]] = &[&[0, 1, 2], &[6, 7, 8], &[12, 13, 14], &[18, 19, 20]];
const T24_P1: &[&[usize]] = &[&[3, 4, 5], &[9, 10, 11], &[15, 16, 17], &[21, 22, 23]];

#[test]
fn no_split_even_batches() {
    for drop_last in [false, true] {
        check(24, 3, drop_last, false, true, b(T24_P0), b(T24_P1));
    }
    check(
        21,
        3,
        false,
        false,
        true,
        b(T24_P0),
        b(&[&[3, 4, 5], &[9, 10, 11], &[15, 16, 17], &[0, 1, 2]]),
    );
    check(
        22,
        3,
        false,
        false,
        true,
        b(T24_P0),
        b(&[&[3, 4, 5], &[9, 10, 11], &[15, 16, 17], &[21, 0, 1]]),
    );
    check(
        20,
        3,
        false,
        false,
        true,
        b(&[&[0, 1, 2], &[6, 7, 8], &[12, 13, 14], &[18, 19, 0]]),
        b(&[&[3, 4, 5], &[9, 10, 11], &[15, 16, 17], &[1, 2, 3]]),
    );
    for n in [21, 22, 20] {
        check(n, 3, true, false, true, b(&T24_P0[..3]), b(&T24_P1[..3]));
    }
    check(2, 3, false, false, true, b(&[&[0, 1, 0]]), b(&[&[1, 0, 1]]));
    check(2, 3, true, false, true, vec![], vec![]);
}

#[test]
fn no_split_uneven_batches() {
    for drop_last in [false, true] {
        check(24, 3, drop_last, false, false, b(T24_P0), b(T24_P1));
    }
    check(21, 3, false, false, false, b(T24_P0), b(&T24_P1[..3]));
    check(
        22,
        3,
        false,
        false,
        false,
        b(T24_P0),
        b(&[&[3, 4, 5], &[9, 10, 11], &[15, 16, 17], &[21]]),
    );
    check(
        20,
        3,
        false,
        false,
        false,
        b(&[&[0, 1, 2], &[6, 7, 8], &[12, 13, 14], &[18, 19]]),
        b(&T24_P1[..3]),
    );
    for n in [21, 22, 20] {
        check(n, 3, true, false, false, b(&T24_P0[..3]), b(&T24_P1[..3]));
    }
    check(2, 3, false, false, false, b(&[&[0, 1]]), vec![]);
    check(2, 3, true, false, false, vec![], vec![]);
}

const S24_P0: &[&[usize]] = &[&[0, 1], &[4, 5], &[8, 9], &[12, 13], &[16, 17], &[20, 21]];
const S24_P1: &[&[usize]] = &[&[2, 3], &[6, 7], &[10, 11], &[14, 15], &[18, 19], &[22, 23]];

#[test]
fn split_batches() {
    for drop_last in [false, true] {
        check(24, 4, drop_last, true, true, b(S24_P0), b(S24_P1));
    }
    let mut p1 = b(&S24_P1[..5]);
    p1.push(vec![0, 1]);
    check(22, 4, false, true, true, b(S24_P0), p1);
    check(22, 4, true, true, true, b(&S24_P0[..5]), b(&S24_P1[..5]));
    let (mut p0, mut p1) = (b(&S24_P0[..5]), b(&S24_P1[..5]));
    p0.push(vec![20, 0]);
    p1.push(vec![1, 2]);
    check(21, 4, false, true, true, p0, p1);
    check(2, 4, false, true, true, b(&[&[0, 1]]), b(&[&[0, 1]]));
    check(2, 4, true, true, true, vec![], vec![]);
    // Without even_batches the tail is not completed.
    check(22, 4, false, true, false, b(S24_P0), b(&S24_P1[..5]));
    let mut p0 = b(&S24_P0[..5]);
    p0.push(vec![20]);
    check(21, 4, false, true, false, p0, b(&S24_P1[..5]));
    check(2, 4, false, true, false, b(&[&[0, 1]]), vec![]);
}

#[test]
fn split_needs_a_round_multiple() {
    let sampler = BatchSampler::new(Sampler::Sequential { len: 10 }, 3, false);
    let err = BatchSamplerShard::new(sampler, 2, 0, true, true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("round multiple"), "{err}");
    let sampler = BatchSampler::new(Sampler::Sequential { len: 10 }, 2, false);
    assert!(BatchSamplerShard::new(sampler, 2, 2, false, true).is_err());
}

#[test]
fn uneven_lengths_follow_the_process_index() {
    // 7 batches over 3 ranks without even_batches: ranks 0 gets 3, the others 2.
    let lens: Vec<usize> = (0..3)
        .map(|r| {
            let s = BatchSampler::new(Sampler::Sequential { len: 21 }, 3, false);
            BatchSamplerShard::new(s, 3, r, false, false).unwrap().len()
        })
        .collect();
    assert_eq!(lens, vec![3, 2, 2]);
    // With even_batches every rank gets 3.
    let s = BatchSampler::new(Sampler::Sequential { len: 21 }, 3, false);
    let shard = BatchSamplerShard::new(s, 3, 2, false, true).unwrap();
    assert_eq!((shard.len(), shard.batches().len()), (3, 3));
}

#[test]
fn dynamic_batch_sizes_cycle_whole_batches() {
    // Five batches of varying sizes over two ranks: the missing sixth comes from the first round.
    let batches = FixedBatches(b(&[&[0, 1], &[2, 3, 4], &[5], &[6, 7, 8, 9], &[10, 11]]));
    let p0 = BatchSamplerShard::new(batches.clone(), 2, 0, false, true)
        .unwrap()
        .batches();
    let p1 = BatchSamplerShard::new(batches, 2, 1, false, true)
        .unwrap()
        .batches();
    assert_eq!(p0, b(&[&[0, 1], &[5], &[10, 11]]));
    assert_eq!(p1, b(&[&[2, 3, 4], &[6, 7, 8, 9], &[0, 1]]));
}

#[test]
fn iterable_shards_take_contiguous_slices_and_pad_from_the_start() {
    // 2 ranks, batch 3: windows of 6; 14 items leave a tail of 2, completed from the first window.
    let shard = |rank| {
        IterableDatasetShard::new(0..14usize, 3, false, 2, rank, false)
            .unwrap()
            .collect::<Vec<_>>()
    };
    assert_eq!(shard(0), vec![0, 1, 2, 6, 7, 8, 12, 13, 0]);
    assert_eq!(shard(1), vec![3, 4, 5, 9, 10, 11, 1, 2, 3]);
    assert_eq!(
        IterableDatasetShard::<std::ops::Range<usize>>::len_for(14, 3, false, 2),
        9
    );
    // drop_last keeps only full windows.
    let dropped: Vec<usize> = IterableDatasetShard::new(0..14usize, 3, true, 2, 1, false)
        .unwrap()
        .collect();
    assert_eq!(dropped, vec![3, 4, 5, 9, 10, 11]);
    assert_eq!(
        IterableDatasetShard::<std::ops::Range<usize>>::len_for(14, 3, true, 2),
        6
    );
    // split_batches: windows of batch_size, each rank takes batch_size / P.
    let split: Vec<usize> = IterableDatasetShard::new(0..10usize, 4, false, 2, 1, true)
        .unwrap()
        .collect();
    assert_eq!(split, vec![2, 3, 6, 7, 0, 1]);
    // Fewer items than one window: padded from themselves.
    let tiny: Vec<usize> = IterableDatasetShard::new(0..2usize, 3, false, 2, 1, false)
        .unwrap()
        .collect();
    assert_eq!(tiny, vec![1, 0, 1]);
}
