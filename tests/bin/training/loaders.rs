//! The `loaders` check of `hasten-test-training`: prepared loaders give each rank exactly what Accelerate
//! 1.15 gives it. Expected values were produced by running Accelerate (`debug_launcher`, CPU, gloo) on
//! the same inputs: 21 samples `0..21`, batch 4, on 2 and 3 processes (script and output:
//! tests/python/oracle/oracle_loaders.py).

use super::{Check, err};
use hasten::data::{DataLoader, TensorDataset};
use hasten::tch::{Device, Kind, Tensor};
use hasten::{Accelerator, DataLoaderConfiguration};

type Batches = Vec<Vec<i64>>;

/// Accelerate's batches and `len` for one rank: a map dataset dispatched from process 0 (as prepared,
/// then after `skip_first_batches(1)` and `(2)`), and a sized iterable dataset read without dispatching
/// and with it (as prepared, then after skipping 1).
struct Want {
    map_dispatch: (usize, Batches),
    map_dispatch_skip: [(usize, Batches); 2],
    iter_shard: (usize, Batches),
    iter_shard_skip1: Batches,
    iter_dispatch: (usize, Batches),
    iter_dispatch_skip1: Batches,
}

fn want(p: usize, rank: usize) -> Option<Want> {
    let v = |rows: &[&[i64]]| rows.iter().map(|r| r.to_vec()).collect::<Batches>();
    Some(match (p, rank) {
        (2, 0) => Want {
            map_dispatch: (3, v(&[&[0, 1, 2, 3], &[8, 9, 10, 11], &[16, 17, 18]])),
            map_dispatch_skip: [
                (3, v(&[&[4, 5, 6, 7], &[12, 13, 14, 15], &[20]])),
                (2, v(&[&[8, 9, 10, 11], &[16, 17, 18]])),
            ],
            iter_shard: (3, v(&[&[0, 1, 2, 3], &[8, 9, 10, 11], &[16, 17, 18, 19]])),
            iter_shard_skip1: v(&[&[8, 9, 10, 11], &[16, 17, 18, 19]]),
            iter_dispatch: (3, v(&[&[0, 1, 2, 3], &[8, 9, 10, 11], &[16, 17, 18]])),
            iter_dispatch_skip1: v(&[&[8, 9, 10, 11], &[16, 17, 18]]),
        },
        (2, 1) => Want {
            map_dispatch: (3, v(&[&[4, 5, 6, 7], &[12, 13, 14, 15], &[19, 20, 0]])),
            map_dispatch_skip: [
                (3, v(&[&[8, 9, 10, 11], &[16, 17, 18, 19], &[4]])),
                (2, v(&[&[12, 13, 14, 15], &[19, 20, 8]])),
            ],
            iter_shard: (3, v(&[&[4, 5, 6, 7], &[12, 13, 14, 15], &[20, 0, 1, 2]])),
            iter_shard_skip1: v(&[&[12, 13, 14, 15], &[20, 0, 1, 2]]),
            iter_dispatch: (3, v(&[&[4, 5, 6, 7], &[12, 13, 14, 15], &[19, 20, 0]])),
            iter_dispatch_skip1: v(&[&[12, 13, 14, 15], &[19, 20, 0]]),
        },
        (3, 0) => Want {
            map_dispatch: (2, v(&[&[0, 1, 2, 3], &[12, 13, 14]])),
            map_dispatch_skip: [
                (2, v(&[&[4, 5, 6, 7], &[16, 17]])),
                (2, v(&[&[8, 9, 10, 11], &[20]])),
            ],
            iter_shard: (2, v(&[&[0, 1, 2, 3], &[12, 13, 14, 15]])),
            iter_shard_skip1: v(&[&[12, 13, 14, 15]]),
            iter_dispatch: (2, v(&[&[0, 1, 2, 3], &[12, 13, 14]])),
            iter_dispatch_skip1: v(&[&[12, 13, 14]]),
        },
        (3, 1) => Want {
            map_dispatch: (2, v(&[&[4, 5, 6, 7], &[15, 16, 17]])),
            map_dispatch_skip: [
                (2, v(&[&[8, 9, 10, 11], &[18, 19]])),
                (2, v(&[&[12, 13, 14, 15], &[8]])),
            ],
            iter_shard: (2, v(&[&[4, 5, 6, 7], &[16, 17, 18, 19]])),
            iter_shard_skip1: v(&[&[16, 17, 18, 19]]),
            iter_dispatch: (2, v(&[&[4, 5, 6, 7], &[15, 16, 17]])),
            iter_dispatch_skip1: v(&[&[15, 16, 17]]),
        },
        (3, 2) => Want {
            map_dispatch: (2, v(&[&[8, 9, 10, 11], &[18, 19, 20]])),
            map_dispatch_skip: [
                (2, v(&[&[12, 13, 14, 15], &[20, 4]])),
                (2, v(&[&[16, 17, 18, 19], &[9]])),
            ],
            iter_shard: (2, v(&[&[8, 9, 10, 11], &[20, 0, 1, 2]])),
            iter_shard_skip1: v(&[&[20, 0, 1, 2]]),
            iter_dispatch: (2, v(&[&[8, 9, 10, 11], &[18, 19, 20]])),
            iter_dispatch_skip1: v(&[&[18, 19, 20]]),
        },
        _ => return None,
    })
}

struct Labels;

impl hasten::data::IterableDataset for Labels {
    type Item = i64;
    fn iter(&self, _epoch: u64) -> Box<dyn Iterator<Item = i64> + Send + '_> {
        Box::new(0..21)
    }
    fn known_len(&self) -> Option<usize> {
        Some(21)
    }
}

fn with_dispatch(acc: &mut Accelerator, on: bool) {
    acc.set_dataloader_config(DataLoaderConfiguration {
        dispatch_batches: Some(on),
        ..Default::default()
    });
}

fn compare(what: &str, got: (usize, Batches), want: &(usize, Batches)) -> Check {
    if &got == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: len {} batches {:?}, want len {} batches {:?}",
            got.0, got.1, want.0, want.1
        ))
    }
}

fn labels(b: hasten::Result<Vec<Tensor>>) -> Result<Vec<i64>, String> {
    b.map_err(err)
        .and_then(|b| Vec::<i64>::try_from(&b[0]).map_err(err))
}

pub fn loaders(acc: &mut Accelerator) -> Check {
    let (p, rank) = (acc.num_processes(), acc.process_index());
    let w = want(p, rank).ok_or_else(|| format!("no expectation for {p} processes"))?;
    let map = || -> Result<DataLoader<TensorDataset, Vec<Tensor>>, String> {
        let ds = TensorDataset::new(vec![Tensor::arange(21, (Kind::Int64, Device::Cpu))])
            .map_err(err)?;
        Ok(DataLoader::new(ds, 4))
    };
    with_dispatch(acc, true);
    for (skip, want) in [(0, &w.map_dispatch)]
        .into_iter()
        .chain([(1, &w.map_dispatch_skip[0]), (2, &w.map_dispatch_skip[1])])
    {
        let dl = acc.prepare_data_loader(map()?).map_err(err)?;
        let dl = dl.skip_first_batches(skip);
        let got = dl
            .iter()
            .map_err(err)?
            .map(labels)
            .collect::<Result<_, _>>()?;
        compare(
            &format!("map, dispatched, skip {skip}"),
            (dl.len(), got),
            want,
        )?;
    }
    for (dispatch, full, skipped) in [
        (false, &w.iter_shard, &w.iter_shard_skip1),
        (true, &w.iter_dispatch, &w.iter_dispatch_skip1),
    ] {
        with_dispatch(acc, dispatch);
        let loader = || hasten::data::IterableDataLoader::new(Labels, 4);
        let dl = acc.prepare_iterable_data_loader(loader()).map_err(err)?;
        let len = dl.len().ok_or("a sized iterable loader has a length")?;
        let got = dl
            .iter()
            .map_err(err)?
            .map(|b| {
                b.map_err(err)
                    .and_then(|t| Vec::<i64>::try_from(&t).map_err(err))
            })
            .collect::<Result<_, _>>()?;
        compare(&format!("iterable, dispatch {dispatch}"), (len, got), full)?;
        // skip_first_batches leaves an iterable loader's len as it was, as in Accelerate.
        let dl = acc
            .prepare_iterable_data_loader(loader())
            .map_err(err)?
            .skip_first_batches(1);
        let got = dl
            .iter()
            .map_err(err)?
            .map(|b| {
                b.map_err(err)
                    .and_then(|t| Vec::<i64>::try_from(&t).map_err(err))
            })
            .collect::<Result<_, _>>()?;
        let len = dl.len().unwrap_or_default();
        compare(
            &format!("iterable, dispatch {dispatch}, skip 1"),
            (len, got),
            &(full.0, skipped.clone()),
        )?;
    }
    // split_batches with a batch size that is not a multiple of the processes: Accelerate's error, at
    // prepare time.
    acc.set_dataloader_config(DataLoaderConfiguration {
        split_batches: true,
        dispatch_batches: Some(true),
        ..Default::default()
    });
    let ds =
        TensorDataset::new(vec![Tensor::arange(21, (Kind::Int64, Device::Cpu))]).map_err(err)?;
    let size = 2 * p + 1;
    match acc.prepare_data_loader(DataLoader::new(ds, size)) {
        Err(e) if e.to_string().contains(&format!(
            "the batch size ({size}) needs to be a round multiple of the number of processes ({p})"
        )) => Ok(()),
        Err(e) => Err(format!("split_batches with batch {size}: {e}")),
        Ok(_) => Err(format!("split_batches with batch {size} on {p} processes was accepted")),
    }
}
