//! Rendezvous over TCP at MASTER_ADDR:MASTER_PORT: rank 0 listens, every other rank connects and says
//! who it is; rank 0 checks the group (world size, ranks) and either admits everyone or tells everyone
//! why not. Whatever starts the workers (hasten launch, notebook_launcher, torchrun, srun) only has to
//! set the environment contract.

use super::wire;
use crate::{EnvContract, Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &str = "HASTEN-RDZV-1";
const OK: &[u8] = b"ok";

/// Default time to wait for the whole group to gather; `HASTEN_RDZV_TIMEOUT` (seconds) overrides it.
pub const DEFAULT_RDZV_TIMEOUT: Duration = Duration::from_secs(120);

/// The rendezvous timeout from `HASTEN_RDZV_TIMEOUT`, else [`DEFAULT_RDZV_TIMEOUT`].
pub fn rdzv_timeout_from_env() -> Result<Duration> {
    match std::env::var("HASTEN_RDZV_TIMEOUT") {
        Err(_) => Ok(DEFAULT_RDZV_TIMEOUT),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or(Error::EnvParse {
                var: "HASTEN_RDZV_TIMEOUT".into(),
                value: v,
                expected: "a positive number of seconds",
            }),
    }
}

/// The connections a rank holds after rendezvous: rank 0 has one to every other rank; the others have
/// one to rank 0 (index 0).
pub(crate) struct Links {
    pub rank: usize,
    pub world_size: usize,
    pub peers: Vec<Option<TcpStream>>,
}

fn rdzv_err(detail: String) -> Error {
    Error::Rendezvous { detail }
}

fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| rdzv_err(format!("cannot resolve MASTER_ADDR={addr}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(rdzv_err(format!(
            "MASTER_ADDR={addr} resolves to no address"
        )));
    }
    Ok(addrs)
}

/// Joins the group described by `contract`, waiting at most `timeout` for it to form.
pub(crate) fn rendezvous(contract: &EnvContract, timeout: Duration) -> Result<Links> {
    let mut peers: Vec<Option<TcpStream>> = (0..contract.world_size).map(|_| None).collect();
    if contract.world_size == 1 {
        return Ok(Links {
            rank: 0,
            world_size: 1,
            peers,
        });
    }
    if contract.rank == 0 {
        serve(contract, timeout, &mut peers)?;
    } else {
        peers[0] = Some(join(contract, timeout)?);
    }
    for stream in peers.iter().flatten() {
        stream
            .set_nodelay(true)
            .and_then(|_| stream.set_read_timeout(None))
            .map_err(|e| rdzv_err(format!("configuring a connection: {e}")))?;
    }
    Ok(Links {
        rank: contract.rank,
        world_size: contract.world_size,
        peers,
    })
}

/// The listening socket a hasten launcher reserved for this rank 0 (see `RDZV_LISTEN_FD_VAR`), taken at
/// most once per process: after the first group it is closed, and the number may name something else.
fn inherited_listener(port: u16) -> Option<TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let fd: RawFd = std::env::var(hasten_core::RDZV_LISTEN_FD_VAR)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if fd < 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    // SAFETY: the launcher passed this descriptor to rank 0 alone. It is checked below to be a socket
    // bound to our port before we keep it; otherwise ownership is given back untouched.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    match listener.local_addr() {
        Ok(addr) if addr.port() == port => Some(listener),
        _ => {
            let _ = listener.into_raw_fd();
            None
        }
    }
}

fn serve(c: &EnvContract, timeout: Duration, peers: &mut [Option<TcpStream>]) -> Result<()> {
    // Listen on every interface unless the master address is loopback, so remote ranks can reach us.
    let loopback = resolve(&c.master_addr, c.rdzv_port)?
        .iter()
        .all(|a| a.ip().is_loopback());
    let bind = if loopback { "127.0.0.1" } else { "0.0.0.0" };
    let listener = match inherited_listener(c.rdzv_port) {
        Some(listener) => listener,
        None => TcpListener::bind((bind, c.rdzv_port)).map_err(|e| {
            rdzv_err(format!(
                "rank 0 cannot listen on {bind}:{} (the rendezvous port): {e}; is another job using this port?",
                c.rdzv_port
            ))
        })?,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| rdzv_err(format!("listener: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut joined = 1;
    let result = (|| {
        while joined < c.world_size {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| rdzv_err(format!("connection from {from}: {e}")))?;
                    if admit(c, stream, from, peers)?.is_some() {
                        joined += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..c.world_size)
                            .filter(|r| peers[*r].is_none())
                            .map(|r| r.to_string())
                            .collect();
                        return Err(rdzv_err(format!(
                            "timed out after {:.0} s waiting for rank(s) {} to join at {}:{} \
                             (WORLD_SIZE={}); did they start, and can they reach this host?",
                            timeout.as_secs_f64(),
                            missing.join(", "),
                            c.master_addr,
                            c.rdzv_port,
                            c.world_size
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(rdzv_err(format!("accepting a connection: {e}"))),
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            for (rank, stream) in peers.iter_mut().enumerate() {
                if let Some(s) = stream {
                    wire::send(s, OK, rank, "rendezvous")?;
                }
            }
            Ok(())
        }
        Err(e) => {
            let message = e.to_string();
            for stream in peers.iter_mut().flatten() {
                wire::send_abort(stream, &message);
            }
            Err(e)
        }
    }
}

/// Reads a newcomer's greeting and files it under its rank. Returns `Ok(None)` for a connection that is
/// not a hasten rank (a port scanner, a health check), which is dropped.
fn admit(
    c: &EnvContract,
    mut stream: TcpStream,
    from: SocketAddr,
    peers: &mut [Option<TcpStream>],
) -> Result<Option<usize>> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| rdzv_err(format!("connection from {from}: {e}")))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return Ok(None),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let mut parts = text.split_whitespace();
    if parts.next() != Some(MAGIC) {
        return Ok(None);
    }
    let (Some(rank), Some(world)) = (
        parts.next().and_then(|r| r.parse::<usize>().ok()),
        parts.next().and_then(|w| w.parse::<usize>().ok()),
    ) else {
        return Ok(None);
    };
    let refuse = |stream: &mut TcpStream, detail: String| {
        let e = rdzv_err(detail);
        wire::send_abort(stream, &e.to_string());
        Err(e)
    };
    if world != c.world_size {
        return refuse(
            &mut stream,
            format!(
                "wrong world size: rank {rank} (from {from}) has WORLD_SIZE={world} but rank 0 has WORLD_SIZE={}",
                c.world_size
            ),
        );
    }
    if rank == 0 || rank >= c.world_size {
        return refuse(
            &mut stream,
            format!(
                "duplicate or invalid rank: a process at {from} claims rank {rank} in a group of {world}"
            ),
        );
    }
    if peers[rank].is_some() {
        return refuse(
            &mut stream,
            format!("duplicate rank: two processes claim rank {rank} (the second from {from})"),
        );
    }
    peers[rank] = Some(stream);
    Ok(Some(rank))
}

fn join(c: &EnvContract, timeout: Duration) -> Result<TcpStream> {
    let addrs = resolve(&c.master_addr, c.rdzv_port)?;
    let deadline = Instant::now() + timeout;
    let mut stream = connect_until(c, &addrs, deadline, timeout)?;
    let greeting = format!("{MAGIC} {} {}\n", c.rank, c.world_size);
    stream
        .write_all(greeting.as_bytes())
        .map_err(|e| rdzv_err(format!("rank {} greeting the master: {e}", c.rank)))?;
    // Rank 0 answers once the whole group is in, or tells us why it is not; if it dies we read EOF.
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| rdzv_err(format!("connection to the master: {e}")))?;
    let reply = wire::recv(&mut stream, 0, "rendezvous").map_err(|e| match e {
        Error::Collective { detail, .. } => rdzv_err(detail),
        other => other,
    })?;
    if reply != OK {
        return Err(rdzv_err(format!(
            "unexpected answer from rank 0: {reply:?}"
        )));
    }
    Ok(stream)
}

fn connect_until(
    c: &EnvContract,
    addrs: &[SocketAddr],
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    loop {
        let mut last_err = None;
        for addr in addrs {
            match TcpStream::connect_timeout(addr, Duration::from_secs(2)) {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        if Instant::now() >= deadline {
            return Err(rdzv_err(format!(
                "rank {} could not reach the master at {}:{} within {:.0} s: {}",
                c.rank,
                c.master_addr,
                c.rdzv_port,
                timeout.as_secs_f64(),
                last_err.map_or_else(|| "no answer".to_owned(), |e| e.to_string())
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
