//! Rendezvous over TCP at MASTER_ADDR:MASTER_PORT: rank 0 listens, every other rank connects and says
//! who it is; rank 0 checks the group (world size, ranks) and either admits everyone or tells everyone
//! why not. Whatever starts the workers (hasten launch, notebook_launcher, torchrun, srun) only has to
//! set the environment contract.

use super::admission::{self, Gate};
use super::census::{self, Census};
use super::wire;
use crate::{EnvContract, Error, Result};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The greeting of a rank (version 2: after rank 0's hello, with the job's proof).
const MAGIC: &str = "HASTEN-RDZV-2";
const OK: &[u8] = b"ok";

/// Default time to wait for the whole group to gather; `HASTEN_RDZV_TIMEOUT` (seconds) overrides it.
pub const DEFAULT_RDZV_TIMEOUT: Duration = Duration::from_secs(120);

/// The rendezvous timeout from `HASTEN_RDZV_TIMEOUT`, else [`DEFAULT_RDZV_TIMEOUT`].
pub fn rdzv_timeout_from_env() -> Result<Duration> {
    seconds_from_env("HASTEN_RDZV_TIMEOUT", DEFAULT_RDZV_TIMEOUT)
}

/// A timeout in seconds from `var`, else `default`. Bounded so that no later `Instant + timeout`
/// can overflow (`1e19` panicked there before).
pub(super) fn seconds_from_env(var: &str, default: Duration) -> Result<Duration> {
    match std::env::var(var) {
        Err(_) => Ok(default),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                hasten_core::Error::EnvParse {
                    var: var.into(),
                    value: v,
                    expected: "a positive number of seconds (at most 1e9)",
                }
                .into()
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

/// Joins the group described by `contract`, waiting at most `timeout` for it to form. Every link then
/// waits at most `collective_timeout` for a peer (a read or write that takes longer fails as a timed-out
/// collective), and each rank gets its end of the census that names the ranks a timed-out collective
/// waited for.
pub(crate) fn rendezvous(
    contract: &EnvContract,
    timeout: Duration,
    collective_timeout: Duration,
) -> Result<(Links, Census)> {
    let mut peers: Vec<Option<TcpStream>> = (0..contract.world_size).map(|_| None).collect();
    if contract.world_size == 1 {
        let links = Links {
            rank: 0,
            world_size: 1,
            peers,
        };
        return Ok((links, Census::Alone));
    }
    let census = if contract.rank == 0 {
        serve(contract, timeout, collective_timeout, &mut peers)?
    } else {
        let (stream, census) = join(contract, timeout, collective_timeout)?;
        peers[0] = Some(stream);
        census
    };
    for stream in peers.iter().flatten() {
        stream
            .set_nodelay(true)
            .and_then(|_| stream.set_read_timeout(Some(collective_timeout)))
            .and_then(|_| stream.set_write_timeout(Some(collective_timeout)))
            .map_err(|e| rdzv_err(format!("configuring a connection: {e}")))?;
    }
    let links = Links {
        rank: contract.rank,
        world_size: contract.world_size,
        peers,
    };
    Ok((links, census))
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

/// Where rank 0 listens: `HASTEN_RDZV_BIND` if set (`0.0.0.0` for every interface), else only the address
/// MASTER_ADDR names (the loopback interface when that is loopback), not every interface.
fn bind_address(c: &EnvContract) -> Result<std::net::IpAddr> {
    if let Ok(v) = std::env::var("HASTEN_RDZV_BIND") {
        return v.trim().parse().map_err(|_| {
            hasten_core::Error::EnvParse {
                var: "HASTEN_RDZV_BIND".into(),
                value: v,
                expected: "an IP address of this machine (0.0.0.0 for every interface)",
            }
            .into()
        });
    }
    let addrs = resolve(&c.master_addr, c.rdzv_port)?;
    Ok(addrs.iter().find(|a| a.is_ipv4()).unwrap_or(&addrs[0]).ip())
}

fn serve(
    c: &EnvContract,
    timeout: Duration,
    collective_timeout: Duration,
    peers: &mut [Option<TcpStream>],
) -> Result<Census> {
    let listener = match inherited_listener(c.rdzv_port) {
        Some(listener) => listener,
        None => {
            let ip = bind_address(c)?;
            TcpListener::bind((ip, c.rdzv_port)).map_err(|e| {
                rdzv_err(format!(
                    "rank 0 cannot listen on {ip}:{} (MASTER_ADDR={} and the rendezvous port): {e}; is \
                     another job using this port, and is that address one of this machine's? \
                     (HASTEN_RDZV_BIND=0.0.0.0 listens on every interface)",
                    c.rdzv_port, c.master_addr
                ))
            })?
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| rdzv_err(format!("listener: {e}")))?;
    let secret = admission::job_secret();
    let mut gate = Gate::new(&listener, secret);
    let deadline = Instant::now() + timeout;
    let mut joined = 1;
    let result = (|| {
        while joined < c.world_size {
            let Some(greeting) = gate.next(deadline)? else {
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
            };
            if admit(c, greeting, peers)?.is_some() {
                joined += 1;
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
            let streams = accept_census(c, &mut gate, deadline + Duration::from_secs(10))?;
            Ok(Census::root(c.world_size, collective_timeout, streams))
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

/// After admitting everyone: each other rank's second connection, for the census.
fn accept_census(
    c: &EnvContract,
    gate: &mut Gate<'_>,
    deadline: Instant,
) -> Result<Vec<(usize, TcpStream)>> {
    let mut streams: Vec<(usize, TcpStream)> = Vec::new();
    while streams.len() + 1 < c.world_size {
        let Some(g) = gate.next(deadline)? else {
            return Err(rdzv_err(
                "timed out waiting for the ranks' second (census) connections".into(),
            ));
        };
        let rank = match &g.words[..] {
            [magic, r] if magic == census::GREETING => r.parse::<usize>().ok(),
            _ => None,
        };
        let Some(rank) = rank.filter(|r| *r > 0 && *r < c.world_size) else {
            continue;
        };
        if streams.iter().any(|(r, _)| *r == rank) {
            return Err(rdzv_err(format!(
                "duplicate rank: two census connections claim rank {rank} (the second from {})",
                g.from
            )));
        }
        streams.push((rank, g.stream));
    }
    Ok(streams)
}

/// Files an authenticated newcomer under its rank. Returns `Ok(None)` for a greeting that is not a
/// rank's (dropped); a rank whose settings contradict the group is told why and fails the rendezvous.
fn admit(
    c: &EnvContract,
    greeting: admission::Greeting,
    peers: &mut [Option<TcpStream>],
) -> Result<Option<usize>> {
    let admission::Greeting {
        mut stream,
        from,
        words,
    } = greeting;
    let (rank, world) = match &words[..] {
        [magic, rank, world] if magic == MAGIC => {
            match (rank.parse::<usize>(), world.parse::<usize>()) {
                (Ok(r), Ok(w)) => (r, w),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
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

fn join(
    c: &EnvContract,
    timeout: Duration,
    collective_timeout: Duration,
) -> Result<(TcpStream, Census)> {
    let addrs = resolve(&c.master_addr, c.rdzv_port)?;
    let deadline = Instant::now() + timeout;
    let secret = admission::job_secret();
    let mut stream = connect_until(c, &addrs, deadline, timeout)?;
    admission::greet(
        &mut stream,
        &format!("{MAGIC} {} {}", c.rank, c.world_size),
        secret.as_deref(),
        deadline,
    )
    .map_err(|e| rdzv_err(format!("rank {}: {e}", c.rank)))?;
    // Rank 0 answers once the whole group is in, or tells us why it is not; if it dies we read EOF.
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| rdzv_err(format!("connection to the master: {e}")))?;
    let reply = wire::recv(&mut stream, 0, "rendezvous").map_err(|e| match e {
        Error::Collective { detail, .. } => rdzv_err(detail),
        Error::CollectiveTimeout { .. } => rdzv_err(format!(
            "timed out after {:.0} s waiting for rank 0 to admit the group",
            timeout.as_secs_f64()
        )),
        other => other,
    })?;
    if reply != OK {
        return Err(rdzv_err(format!(
            "unexpected answer from rank 0: {reply:?}"
        )));
    }
    let census_deadline = deadline + Duration::from_secs(10);
    let mut census = connect_until(c, &addrs, census_deadline, timeout)?;
    admission::greet(
        &mut census,
        &format!("{} {}", census::GREETING, c.rank),
        secret.as_deref(),
        census_deadline,
    )
    .and_then(|()| {
        census
            .set_nodelay(true)
            .map_err(|e| rdzv_err(format!("census connection: {e}")))
    })
    .map_err(|e| {
        rdzv_err(format!(
            "rank {} opening its census connection: {e}",
            c.rank
        ))
    })?;
    Ok((stream, Census::member(c.rank, collective_timeout, census)))
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
