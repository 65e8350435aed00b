//! Facts about this host that a launcher needs without initialising CUDA: forked workers of a process
//! that initialised CUDA cannot use it, so the launcher never asks libtorch or the CUDA driver.

use std::net::TcpListener;

/// Number of NVIDIA GPUs this process may use, read from the driver's `/proc` entries and narrowed by
/// `CUDA_VISIBLE_DEVICES`; 0 without an NVIDIA driver. Does not initialise CUDA.
pub fn visible_gpu_count() -> usize {
    visible_gpus().len()
}

/// The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` entries (indices or UUIDs) in CUDA's order:
/// what a launcher hands out to its ranks. Does not initialise CUDA.
pub fn visible_gpus() -> Vec<String> {
    let installed = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count())
        .unwrap_or(0);
    visible_of(
        installed,
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
    )
}

/// Applies a `CUDA_VISIBLE_DEVICES` value to an installed GPU count, as the CUDA runtime does: the list
/// stops at the first entry that is not a valid index; an empty value hides every GPU.
pub(crate) fn visible_of(installed: usize, cuda_visible: Option<&str>) -> Vec<String> {
    let Some(list) = cuda_visible else {
        return (0..installed).map(|i| i.to_string()).collect();
    };
    let mut seen: Vec<String> = Vec::new();
    for entry in list.split(',').map(str::trim) {
        // UUIDs (GPU-…, MIG-…) name a device without an index; each counts as one.
        if entry.starts_with("GPU-") || entry.starts_with("MIG-") {
            seen.push(entry.to_owned());
            continue;
        }
        match entry.parse::<usize>() {
            Ok(i) if i < installed && !seen.contains(&i.to_string()) => seen.push(i.to_string()),
            _ => break,
        }
    }
    seen
}

/// Logical CPUs available to this process.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A rendezvous port the launcher chose and holds open until rank 0 inherits the listening socket, so no
/// other program can take the port between the choice and rank 0's bind (a real race on a busy host: test
/// suites, several notebooks). Dropping it closes the launcher's copy.
#[derive(Debug)]
pub struct PortReservation {
    listener: TcpListener,
}

impl PortReservation {
    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    /// The listening descriptor that rank 0 inherits.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }
}

/// Binds a free port on `addr` (or loopback, when `addr` is not local) and keeps it.
pub fn reserve_port(addr: &str) -> std::io::Result<PortReservation> {
    let listener = TcpListener::bind((addr, 0)).or_else(|_| TcpListener::bind(("127.0.0.1", 0)))?;
    Ok(PortReservation { listener })
}

/// True when nothing listens on `port` yet (a bind succeeds).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("0.0.0.0", port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_rules() {
        let count = |n, v| visible_of(n, v).len();
        assert_eq!(count(4, None), 4);
        assert_eq!(count(4, Some("")), 0);
        assert_eq!(count(4, Some("1,3")), 2);
        assert_eq!(count(4, Some("0,7,1")), 1);
        assert_eq!(count(4, Some("-1")), 0);
        assert_eq!(count(2, Some("1,1")), 1);
        assert_eq!(count(2, Some("GPU-abc,GPU-def")), 2);
        assert_eq!(count(0, None), 0);
        assert_eq!(visible_of(3, None), ["0", "1", "2"]);
        assert_eq!(visible_of(4, Some(" 3, 1 ,7")), ["3", "1"]);
        assert_eq!(visible_of(2, Some("GPU-abc,0")), ["GPU-abc", "0"]);
    }

    #[test]
    fn a_reserved_port_stays_taken_until_dropped() {
        let reserved = reserve_port("127.0.0.1").unwrap();
        let port = reserved.port();
        assert_ne!(port, 0);
        assert!(!port_is_free(port));
        drop(reserved);
        assert!(port_is_free(port));
    }
}
