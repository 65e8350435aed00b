//! One JSON line per figure, prefixed `BENCH`, like the Python side's `ANCHOR` lines.
#![allow(dead_code)] // each benchmark binary uses part of these helpers

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as the shell's `date +%s.%N` gives them.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Prints one figure.
pub fn emit(value: serde_json::Value) {
    println!("BENCH {value}");
}
