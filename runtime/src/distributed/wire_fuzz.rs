//! A fuzz harness for everything a rank decodes from the network before it trusts the sender: frames
//! (`recv`, `recv_into`), greeting lines (`read_line`) and greeting proofs (`check_answer`). It runs for
//! a fixed time budget (`HASTEN_FUZZ_SECS`, 10 s by default; CI runs it as part of the unit tests) from
//! the seeds in `runtime/tests/corpus/wire/`, mutating them with a fixed-seed generator, so a run is
//! repeatable. A failing input is printed in hex: add it to the corpus with the fix.

use super::{MAX_FRAME, recv, recv_into};
use crate::distributed::admission::{MAX_LINE, check_answer, read_line};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Cursor;
use std::time::{Duration, Instant};

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/wire");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the fuzz corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    let seeds: Vec<Vec<u8>> = seeds.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(
        seeds.len() >= 10,
        "the corpus in {} is missing",
        dir.display()
    );
    seeds
}

/// Lengths that sit on the edges the decoder must get right.
const LENGTHS: [u64; 8] = [
    0,
    1,
    8,
    1 << 20,
    MAX_FRAME,
    MAX_FRAME + 1,
    1 << 62,
    u64::MAX,
];

fn mutate(rng: &mut ChaCha8Rng, input: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..6) {
            0 if !input.is_empty() => {
                let i = rng.random_range(0..input.len());
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let at = rng.random_range(0..=input.len());
                let n = rng.random_range(0..32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                input.splice(at..at, bytes);
            }
            2 if !input.is_empty() => input.truncate(rng.random_range(0..input.len())),
            3 if input.len() >= 9 => {
                let len = LENGTHS[rng.random_range(0..LENGTHS.len())];
                input[1..9].copy_from_slice(&len.to_le_bytes());
            }
            4 if !input.is_empty() => input[0] = rng.random_range(0..4),
            _ => {
                let at = rng.random_range(0..=input.len());
                input.insert(at, *b"\n\r \x00".get(rng.random_range(0..4)).unwrap());
            }
        }
    }
}

fn check_one(input: &[u8], rng: &mut ChaCha8Rng) {
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\ninput (hex, add it to runtime/tests/corpus/wire/): {}",
            input.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    // Frames: an accepted payload is never more than what arrived; every error says something.
    match recv(&mut Cursor::new(input), 1, "fuzz") {
        Ok(p) if p.len() + 9 > input.len() => fail("recv returned more bytes than arrived"),
        Ok(_) => {}
        Err(e) if e.to_string().trim().is_empty() => fail("recv gave an empty error"),
        Err(_) => {}
    }
    let mut out = vec![0u8; rng.random_range(0..64)];
    if let Err(e) = recv_into(&mut Cursor::new(input), &mut out, 1, "fuzz")
        && e.to_string().trim().is_empty()
    {
        fail("recv_into gave an empty error");
    }
    // Greeting lines are bounded.
    if let Some(line) = read_line(&mut Cursor::new(input))
        && line.len() >= MAX_LINE
    {
        fail("read_line returned an over-long line");
    }
    // A proof that verifies must be over exactly the greeting it came with.
    let text = String::from_utf8_lossy(input);
    for secret in [None, Some(&b"job"[..])] {
        match check_answer(&text, "nonce", secret) {
            Ok(words) if secret.is_some() => {
                fail(&format!("a random answer was admitted: {words:?}"))
            }
            Err(e) if e.is_empty() => fail("check_answer gave an empty error"),
            _ => {}
        }
    }
}

#[test]
fn wire_decoding_survives_random_and_mutated_input() {
    let budget = std::env::var("HASTEN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
        .unwrap_or(10.0);
    let seeds = corpus();
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let started = Instant::now();
    let mut runs = 0u64;
    for seed in &seeds {
        check_one(seed, &mut rng);
        runs += 1;
    }
    while started.elapsed() < Duration::from_secs_f64(budget) {
        for _ in 0..256 {
            let mut input = if rng.random_range(0..8) == 0 {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            } else {
                seeds[rng.random_range(0..seeds.len())].clone()
            };
            mutate(&mut rng, &mut input);
            check_one(&input, &mut rng);
            runs += 1;
        }
    }
    eprintln!(
        "wire fuzz: {runs} inputs from {} seeds in {:.1?}",
        seeds.len(),
        started.elapsed()
    );
}

#[test]
fn a_mutated_proof_is_refused_unless_it_proves_the_same_greeting() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let greeting = "HASTEN-RDZV-2 1 4";
    let proof = crate::distributed::admission::test_proof(b"job", "nonce", greeting);
    let line = format!("{greeting} {proof}");
    assert!(check_answer(&line, "nonce", Some(b"job")).is_ok());
    assert!(check_answer(&line, "other", Some(b"job")).is_err());
    for _ in 0..20_000 {
        let mut bytes = line.clone().into_bytes();
        mutate(&mut rng, &mut bytes);
        let text = String::from_utf8_lossy(&bytes);
        if check_answer(&text, "nonce", Some(b"job")).is_ok() {
            let (g, _) = text.rsplit_once(' ').unwrap();
            assert_eq!(g, greeting, "admitted a different greeting: {text:?}");
        }
    }
}
