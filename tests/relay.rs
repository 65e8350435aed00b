//! Issue 15, item 6: the launcher's relay keeps its memory bounded whatever a rank prints, and shows
//! carriage-return progress bars as they are drawn. Driven through the real `hasten launch`.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The resident memory of `pid` in MiB, if it is still running.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Runs one CPU rank printing `what` with the launcher's output thrown away; the launcher's peak
/// resident memory (sampled every 10 ms) in MiB.
fn launcher_peak_rss(what: &str) -> f64 {
    let mut child = Command::new(hasten())
        .args(["launch", "--num_processes", "1", "--cpu"])
        .arg(worker())
        .args(["--print", what])
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hasten launch");
    let started = Instant::now();
    let mut peak = 0.0f64;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "hasten launch --print {what}: {status}");
            break;
        }
        if let Some(rss) = rss_mib(child.id()) {
            peak = peak.max(rss);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "--print {what} hung"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "--print {what}: launcher peak RSS {peak:.1} MiB in {:.1?}",
        started.elapsed()
    );
    peak
}

#[test]
fn four_million_lines_keep_the_launcher_small() {
    // Before: 880 MB (every line queued without limit while the terminal lagged).
    let peak = launcher_peak_rss("lines:4000000");
    assert!(peak < 100.0, "launcher peak RSS {peak:.1} MiB");
}

#[test]
fn a_200_mb_line_without_newline_keeps_the_launcher_small() {
    // Before: 590 MB (the whole line was gathered before it was relayed).
    let peak = launcher_peak_rss("longline:200000000");
    assert!(peak < 100.0, "launcher peak RSS {peak:.1} MiB");
}

#[test]
fn a_long_line_arrives_whole_in_bounded_pieces() {
    let mut cmd = Command::new(hasten());
    cmd.args(["launch", "--num_processes", "1", "--cpu"])
        .arg(worker())
        .args(["--print", "longline:200000"]);
    let ran = run(cmd, &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    let pieces: Vec<&str> = ran
        .stdout
        .lines()
        .filter(|l| l.starts_with("[rank0]: x"))
        .map(|l| l.rsplit("]: ").next().unwrap())
        .collect();
    // 200 000 bytes in pieces of at most 64 KiB, each prefixed; nothing lost. (The rank's next line,
    // its all-reduce result, continues the unterminated one.)
    let xs = |p: &&str| p.bytes().filter(|b| *b == b'x').count();
    assert_eq!(pieces.iter().map(xs).sum::<usize>(), 200_000);
    let lengths: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
    assert!(
        lengths.iter().all(|&n| n <= 64 * 1024),
        "piece lengths {lengths:?}"
    );
    assert!(pieces.len() >= 4, "piece lengths {lengths:?}");
}

#[test]
fn progress_bars_show_while_they_are_drawn() {
    let mut child = Command::new(hasten())
        .args(["launch", "--num_processes", "1", "--cpu"])
        .arg(worker())
        .args(["--print", "progress"])
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hasten launch");
    let mut stdout = child.stdout.take().unwrap();
    let started = Instant::now();
    let mut text = String::new();
    let mut seen_half_at = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if seen_half_at.is_none() && text.contains("[rank0]:  50%|") {
            seen_half_at = Some(started.elapsed());
        }
    }
    let ended = started.elapsed();
    assert!(child.wait().unwrap().success(), "{text}");
    // Each update ends in a carriage return, so a terminal redraws the bar in place.
    assert!(
        text.contains("[rank0]:  10%|\r[rank0]:  20%|\r[rank0]:  30%|\r"),
        "{text:?}"
    );
    assert!(text.contains("[rank0]: 100%|\n"), "{text:?}");
    // The rank paused 2 s in the middle of "50%": that update was on screen long before the bar ended.
    let half = seen_half_at.expect("the 50% update was relayed");
    assert!(
        ended - half > Duration::from_millis(1500),
        "50% shown at {half:?}, the job ended at {ended:?}: {text:?}"
    );
}
