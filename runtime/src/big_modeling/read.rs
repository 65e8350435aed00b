//! Reading checkpoint bytes into tensors quickly: every shard read in parallel with positioned reads
//! (`pread`) straight into the destination (host tensors) or into a page-locked staging buffer per thread
//! that is copied to the GPU (device tensors), and kernel-side file-to-file copies for the disk offload.
//!
//! The plain route (tch's `read_safetensors`) maps a shard, copies every tensor into a fresh host tensor
//! and then copies that to the device through pageable memory, one shard after the other: two host copies
//! and the slow kind of device copy. Here each byte is read once, by several threads, and reaches the GPU
//! from pinned memory.

use crate::{Error, Result};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Bytes a thread moves at a time to a GPU (the size of its pinned staging buffer).
const CHUNK: u64 = 16 << 20;

/// A one-dimensional byte tensor of `len` bytes in host memory, page-locked when `pinned` and libtorch
/// can pin (it needs CUDA); plain otherwise.
pub(super) fn host_bytes(len: u64, pinned: bool) -> Tensor {
    if pinned && crate::is_cuda_available() {
        if let Some(pinned) = crate::shim::empty_pinned_bytes(len as i64) {
            return pinned;
        }
    }
    Tensor::empty([len as i64], (Kind::Uint8, Device::Cpu))
}

/// A host tensor of `shape` and `kind`, page-locked when `pinned` (see [`host_bytes`]).
pub(super) fn host_tensor(shape: &[i64], kind: Kind, pinned: bool) -> Tensor {
    let numel: i64 = shape.iter().product();
    let bytes = host_bytes(
        (numel.max(0) as u64) * kind.elt_size_in_bytes() as u64,
        pinned,
    );
    if kind == Kind::Uint8 {
        bytes.view(shape)
    } else {
        bytes.view_dtype(kind).view(shape)
    }
}

/// Where one tensor's bytes go.
pub(super) enum Target {
    /// A contiguous tensor of exactly the byte length, on the host or a GPU.
    Tensor(Tensor),
    /// A new file (an offloaded `.dat`).
    File(PathBuf),
}

/// One tensor to read: `len` bytes at `start` of shard `shard`.
pub(super) struct ReadJob {
    pub shard: usize,
    pub name: String,
    pub start: u64,
    pub len: u64,
    pub target: Target,
}

/// A piece of a job one thread does in one go.
enum Work {
    Host { addr: usize, len: usize },
    Device { dst: Tensor },
    File { out: PathBuf },
}

struct Item {
    shard: usize,
    name: String,
    at: u64,
    len: u64,
    work: Work,
}

// SAFETY: `Host` holds the address of host memory owned by a tensor the caller keeps alive until
// `read_all` returns; each item writes a disjoint range of it.
unsafe impl Send for Item {}

fn split(jobs: &[ReadJob]) -> Vec<Item> {
    let mut items = Vec::new();
    for job in jobs.iter().filter(|j| j.len > 0) {
        let item = |at: u64, len: u64, work: Work| Item {
            shard: job.shard,
            name: job.name.clone(),
            at: job.start + at,
            len,
            work,
        };
        match &job.target {
            Target::File(out) => items.push(item(0, job.len, Work::File { out: out.clone() })),
            Target::Tensor(t) if t.device() == Device::Cpu => {
                let base = t.data_ptr() as usize;
                for at in (0..job.len).step_by(CHUNK as usize) {
                    let len = CHUNK.min(job.len - at);
                    let addr = base + at as usize;
                    items.push(item(
                        at,
                        len,
                        Work::Host {
                            addr,
                            len: len as usize,
                        },
                    ));
                }
            }
            Target::Tensor(t) => {
                let bytes = t.view([-1]).view_dtype(Kind::Uint8);
                for at in (0..job.len).step_by(CHUNK as usize) {
                    let len = CHUNK.min(job.len - at);
                    let dst = bytes.narrow(0, at as i64, len as i64);
                    items.push(item(at, len, Work::Device { dst }));
                }
            }
        }
    }
    // Pieces in file order, taken from the end of the list.
    items.reverse();
    items
}

/// A live progress line on stderr (when it is a terminal): bytes read, of the total, and the rate.
struct Progress {
    total: u64,
    done: AtomicU64,
    start: Instant,
    last: Mutex<Instant>,
    enabled: bool,
}

impl Progress {
    /// A bar only when `wanted` and the environment allows it (a terminal, or HASTEN_PROGRESS=1).
    fn new(total: u64, wanted: bool) -> Self {
        let enabled = wanted
            && match std::env::var("HASTEN_PROGRESS").as_deref() {
                Ok("0") => false,
                Ok("1") => true,
                _ => std::io::stderr().is_terminal(),
            };
        let start = Instant::now();
        Progress {
            total,
            done: AtomicU64::new(0),
            start,
            last: Mutex::new(start),
            enabled,
        }
    }

    fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if !self.enabled {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if done < self.total && last.elapsed().as_millis() < 100 {
            return;
        }
        *last = Instant::now();
        self.draw(done);
    }

    fn draw(&self, done: u64) {
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let gb = |b: u64| b as f64 / 1e9;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\rLoading checkpoint [{}{}] {:.2}/{:.2} GB {:.2} GB/s",
            "#".repeat(filled as usize),
            " ".repeat((WIDTH - filled) as usize),
            gb(done),
            gb(self.total),
            gb(done) / secs
        );
        if done >= self.total {
            let _ = writeln!(err);
        }
    }
}

/// Reads every job, with up to `threads` threads, drawing a progress bar when `progress` (and stderr is
/// a terminal). Errors name the shard and the tensor; after the first one the other threads stop taking
/// work.
pub(super) fn read_all(
    shards: &[PathBuf],
    jobs: &[ReadJob],
    threads: usize,
    progress_wanted: bool,
) -> Result<()> {
    let files: Vec<std::fs::File> = shards
        .iter()
        .map(|p| std::fs::File::open(p).map_err(|e| Error::io("opening", p, e)))
        .collect::<Result<_>>()?;
    READS_STARTED.fetch_add(1, Ordering::Relaxed);
    let items = split(jobs);
    let progress = Progress::new(items.iter().map(|i| i.len).sum(), progress_wanted);
    let workers = threads.clamp(1, items.len().max(1));
    let queue = Mutex::new(items);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut staging: Option<Tensor> = None;
                while !failed.load(Ordering::Relaxed) {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some(item) = next else { break };
                    let path = &shards[item.shard];
                    let result = run(&files[item.shard], path, &item, &mut staging);
                    match result {
                        Ok(()) => progress.add(item.len),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn run(file: &std::fs::File, path: &Path, item: &Item, staging: &mut Option<Tensor>) -> Result<()> {
    let failed = |what: &str, e: String| Error::Checkpoint {
        path: path.to_owned(),
        detail: format!("{what} tensor {}: {e}", item.name),
    };
    match &item.work {
        Work::Host { addr, len } => {
            // SAFETY: `addr..addr+len` lies inside a live host tensor and no other item writes it.
            let buf = unsafe { std::slice::from_raw_parts_mut(*addr as *mut u8, *len) };
            file.read_exact_at(buf, item.at)
                .map_err(|e| failed("reading", e.to_string()))
        }
        Work::Device { dst } => {
            let stage = staging.get_or_insert_with(|| host_bytes(CHUNK, true));
            let len = item.len as usize;
            // SAFETY: the staging tensor is this thread's, contiguous, at least CHUNK ≥ len bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(stage.data_ptr() as *mut u8, len) };
            file.read_exact_at(buf, item.at)
                .map_err(|e| failed("reading", e.to_string()))?;
            // A blocking copy: the staging buffer is free again when it returns, and the other threads
            // keep reading meanwhile.
            let mut dst = dst.shallow_clone();
            dst.f_copy_(&stage.narrow(0, 0, len as i64))
                .map_err(|e| failed("copying to the device", e.to_string()))
        }
        Work::File { out } => {
            let mut src = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
            src.seek(SeekFrom::Start(item.at))
                .map_err(|e| failed("seeking to", e.to_string()))?;
            let mut dst = std::fs::File::create(out).map_err(|e| Error::io("creating", out, e))?;
            // std turns this into copy_file_range: the bytes never enter this process.
            let copied = std::io::copy(&mut std::io::Read::take(src, item.len), &mut dst)
                .map_err(|e| Error::io("writing", out, e))?;
            if copied != item.len {
                return Err(failed(
                    "reading",
                    format!("the shard ended after {copied} bytes"),
                ));
            }
            Ok(())
        }
    }
}

/// Reads `len` bytes at `at` of `path` into a new host tensor of `shape` and `kind` (page-locked when
/// `pinned`), with a single positioned read.
pub(super) fn read_tensor(
    path: &Path,
    at: u64,
    shape: &[i64],
    kind: Kind,
    pinned: bool,
) -> Result<Tensor> {
    let tensor = host_tensor(shape, kind, pinned);
    let len = tensor.numel() * kind.elt_size_in_bytes();
    if len == 0 {
        return Ok(tensor);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    // SAFETY: the tensor is fresh, contiguous and `len` bytes long.
    let buf = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, len) };
    file.read_exact_at(buf, at)
        .map_err(|e| Error::io("reading", path, e))?;
    Ok(tensor)
}

/// How many threads read a checkpoint: `HASTEN_READ_THREADS` if set, else the cores, at most 8 (more do
/// not read faster).
pub(super) fn reader_threads() -> usize {
    if let Some(n) = std::env::var("HASTEN_READ_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=256).contains(n))
    {
        return n;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .min(8)
}

/// Counts the calls of [`read_all`], so a read-ahead started before one knows when it began.
static READS_STARTED: AtomicU64 = AtomicU64::new(0);

/// How much the read-ahead asks the kernel for at a time. The kernel caps one advice at its read-ahead
/// window (`read_ahead_kb`, often 128 KiB to 8 MiB), so the whole file is asked for piece by piece.
const READAHEAD_STEP: u64 = 8 << 20;

/// Asks the kernel to start reading `files` into the page cache now, on a background thread, so a cold
/// disk is already busy while the caller plans the device map and brings up CUDA on each GPU (which
/// `get_max_memory` does: 0.3–0.7 s on an H200 host, during which the disk would otherwise sit idle).
/// The advice goes through the files in order, at most a quarter of the memory the kernel reports
/// available (so what it brings in is not evicted before it is used), and stops once [`read_all`]
/// starts (its readers then drive the disk). Costs next to nothing when the files are cached; a failure
/// only loses the head start. `HASTEN_READAHEAD=0` turns it off.
pub(super) fn start_readahead(files: Vec<std::path::PathBuf>) {
    if std::env::var("HASTEN_READAHEAD").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    let started = READS_STARTED.load(Ordering::Relaxed);
    let _ = std::thread::Builder::new()
        .name("hasten-readahead".into())
        .spawn(move || {
            let mut budget = memory_available().map_or(u64::MAX, |b| b / 4);
            for path in files {
                let Ok(file) = std::fs::File::open(&path) else {
                    continue;
                };
                let len = file.metadata().map_or(0, |m| m.len());
                let mut at = 0;
                while at < len && budget > 0 {
                    if READS_STARTED.load(Ordering::Relaxed) != started {
                        return;
                    }
                    let step = READAHEAD_STEP.min(budget);
                    // Advice only: a failure loses the head start, nothing else.
                    let _ = rustix::fs::fadvise(
                        &file,
                        at,
                        std::num::NonZeroU64::new(step),
                        rustix::fs::Advice::WillNeed,
                    );
                    at += step;
                    budget -= step;
                }
            }
        });
}

/// `MemAvailable` of /proc/meminfo in bytes, where the kernel reports it.
fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The fraction of `file`'s pages in the page cache (mincore over a read-only mapping).
    fn resident(file: &std::fs::File, len: usize) -> f64 {
        // SAFETY: a fresh shared read-only mapping of an open file, unmapped below; mincore only
        // reads the mapping's page-cache state into a vector of one byte per page.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED, "mmap");
            let mut pages = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(map, len, pages.as_mut_ptr()), 0, "mincore");
            libc::munmap(map, len);
            pages.iter().filter(|p| **p & 1 == 1).count() as f64 / pages.len() as f64
        }
    }

    /// The read-ahead brings in the whole file, not just the kernel's read-ahead window (which one
    /// advice for the whole file got: 8 MiB of a 1.6 GB shard on the GPU host, so the disk sat idle
    /// while CUDA came up).
    #[test]
    fn readahead_brings_in_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let len = 96usize << 20;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: advisory, on an open descriptor: drop the (clean) pages from the cache.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let before = resident(&file, len);
        if before > 0.5 {
            eprintln!(
                "this file system keeps the pages ({before:.2} resident): nothing to measure"
            );
            return;
        }
        start_readahead(vec![path.clone()]);
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        let mut now = before;
        while now < 0.99 && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            now = resident(&file, len);
        }
        assert!(
            now >= 0.99,
            "read-ahead brought in {:.0}% of the file (before: {:.0}%)",
            now * 100.0,
            before * 100.0
        );
    }
}
