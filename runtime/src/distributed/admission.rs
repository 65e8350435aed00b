//! Who may join a job. Rank 0 greets every connection with a hello line carrying a fresh nonce; a rank
//! answers with its greeting and an HMAC-SHA256 of nonce and greeting under the job's secret
//! (`HASTEN_RDZV_SECRET`, which hasten's launchers make for every job), so a stranger that reaches the
//! port cannot join, replay another rank's answer, or learn anything but the nonce. Each connection is
//! read on a thread of its own with its own deadline, so idle or slow connections cannot hold the
//! others up; what a peer sends is bounded (one line of at most 512 bytes).

use crate::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hasten_core::RDZV_SECRET_VAR as SECRET_VAR;

/// How long one connection may take to say who it is.
const GREETING_TIME: Duration = Duration::from_secs(10);
/// Connections being read at once; more are dropped until some finish (a flood cannot exhaust threads).
const MAX_PENDING: usize = 64;
/// The longest line a peer may send before its newline.
pub(crate) const MAX_LINE: usize = 512;

/// The job's secret from [`SECRET_VAR`], if set.
pub(crate) fn job_secret() -> Option<Vec<u8>> {
    std::env::var(SECRET_VAR)
        .ok()
        .map(|s| s.trim().as_bytes().to_vec())
        .filter(|s| !s.is_empty())
}

/// A fresh nonce (or secret): 32 random bytes as hex.
fn new_secret() -> std::io::Result<String> {
    hasten_core::new_rdzv_secret()
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()
}

fn signer(secret: &[u8], nonce: &str, greeting: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(greeting.as_bytes());
    mac
}

/// The proof a rank sends for `greeting` (for tests that build answers by hand).
#[cfg(test)]
pub(crate) fn test_proof(secret: &[u8], nonce: &str, greeting: &str) -> String {
    hex(&signer(secret, nonce, greeting).finalize().into_bytes())
}

/// One line of at most [`MAX_LINE`] bytes, without its newline; `None` for anything else.
pub(crate) fn read_line(stream: &mut impl Read) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_LINE {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    None
}

/// A rank's side: reads rank 0's hello and answers with `greeting`, proven with the job's secret.
pub(crate) fn greet(
    stream: &mut TcpStream,
    greeting: &str,
    secret: Option<&[u8]>,
    deadline: Instant,
) -> Result<()> {
    let bad = |detail: String| Error::Rendezvous { detail };
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| bad(format!("connection to rank 0: {e}")))?;
    let hello = read_line(stream).ok_or_else(|| {
        bad("rank 0 did not say hello (timed out, or the port is not a hasten rendezvous)".into())
    })?;
    let nonce = match hello.split_whitespace().collect::<Vec<_>>()[..] {
        ["HASTEN-HELLO", nonce] => nonce.to_owned(),
        _ => {
            return Err(bad(format!(
                "the rendezvous port answered {hello:?}, not a hasten rank 0"
            )));
        }
    };
    let proof = match (secret, nonce.as_str()) {
        (Some(secret), nonce) if nonce != "-" => {
            hex(&signer(secret, nonce, greeting).finalize().into_bytes())
        }
        (Some(_), _) => {
            return Err(bad(format!(
                "rank 0 does not authenticate its rendezvous but this rank has {SECRET_VAR}: \
                 are they the same job?"
            )));
        }
        (None, "-") => "-".to_owned(),
        (None, _) => {
            return Err(bad(format!(
                "rank 0 requires the job's secret and this rank has none: set {SECRET_VAR} to \
                 the same value on every rank (hasten's launchers do)"
            )));
        }
    };
    stream
        .write_all(format!("{greeting} {proof}\n").as_bytes())
        .map_err(|e| bad(format!("greeting rank 0: {e}")))
}

/// A greeting that passed the job's secret: the connection, where it came from, and its words.
pub(crate) struct Greeting {
    pub stream: TcpStream,
    pub from: SocketAddr,
    pub words: Vec<String>,
}

enum Outcome {
    Admitted(Greeting),
    Refused(SocketAddr, String),
}

/// Rank 0's side: the listener, and the connections being read.
pub(crate) struct Gate<'a> {
    listener: &'a TcpListener,
    secret: Option<Arc<Vec<u8>>>,
    pending: Arc<AtomicUsize>,
    sender: mpsc::Sender<Outcome>,
    outcomes: mpsc::Receiver<Outcome>,
}

impl<'a> Gate<'a> {
    /// Reads greetings from `listener` (non-blocking), checked against `secret` when there is one.
    pub(crate) fn new(listener: &'a TcpListener, secret: Option<Vec<u8>>) -> Self {
        let (sender, outcomes) = mpsc::channel();
        Gate {
            listener,
            secret: secret.map(Arc::new),
            pending: Arc::new(AtomicUsize::new(0)),
            sender,
            outcomes,
        }
    }

    /// The next greeting that proved the job's secret, or `None` once `deadline` passes. Connections
    /// that fail (a stranger, a health check, garbage, silence) are dropped with a line on stderr.
    pub(crate) fn next(&mut self, deadline: Instant) -> Result<Option<Greeting>> {
        loop {
            loop {
                match self.listener.accept() {
                    Ok((stream, from)) => self.start(stream, from, deadline),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        return Err(Error::Rendezvous {
                            detail: format!("accepting a connection: {e}"),
                        });
                    }
                }
            }
            match self.outcomes.try_recv() {
                Ok(Outcome::Admitted(greeting)) => return Ok(Some(greeting)),
                Ok(Outcome::Refused(from, why)) => {
                    crate::log::event!(
                        warn,
                        target: "hasten::distributed",
                        "hasten: rank 0 refused a connection from {from}: {why}"
                    );
                    continue;
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn start(&self, mut stream: TcpStream, from: SocketAddr, deadline: Instant) {
        if self.pending.load(Ordering::SeqCst) >= MAX_PENDING {
            return; // dropped: the flood's connections close
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let (pending, sender, secret) = (
            self.pending.clone(),
            self.sender.clone(),
            self.secret.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("hasten-rdzv-greeting".into())
            .spawn(move || {
                let outcome =
                    handshake(&mut stream, secret.as_deref().map(Vec::as_slice), deadline)
                        .map_or_else(
                            |why| Outcome::Refused(from, why),
                            |words| {
                                Outcome::Admitted(Greeting {
                                    stream,
                                    from,
                                    words,
                                })
                            },
                        );
                pending.fetch_sub(1, Ordering::SeqCst);
                let _ = sender.send(outcome);
            });
        if spawned.is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Says hello with a fresh nonce and reads the answer: its words, once the proof checks out.
fn handshake(
    stream: &mut TcpStream,
    secret: Option<&[u8]>,
    deadline: Instant,
) -> std::result::Result<Vec<String>, String> {
    let wait = GREETING_TIME
        .min(deadline.saturating_duration_since(Instant::now()))
        .max(Duration::from_millis(100));
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(wait)))
        .and_then(|()| stream.set_write_timeout(Some(wait)))
        .map_err(|e| e.to_string())?;
    let nonce = match secret {
        Some(_) => new_secret().map_err(|e| format!("no randomness for a nonce: {e}"))?,
        None => "-".to_owned(),
    };
    stream
        .write_all(format!("HASTEN-HELLO {nonce}\n").as_bytes())
        .map_err(|e| format!("saying hello: {e}"))?;
    let line = read_line(stream).ok_or_else(|| {
        format!(
            "no greeting line within {:.0} s (timed out, or not a hasten rank)",
            wait.as_secs_f64()
        )
    })?;
    check_answer(&line, &nonce, secret)
}

/// The words of a newcomer's answer `line` to the hello with `nonce`, once its proof of `secret`
/// checks out (any line at all is only ever split and compared, never trusted for a size).
pub(crate) fn check_answer(
    line: &str,
    nonce: &str,
    secret: Option<&[u8]>,
) -> std::result::Result<Vec<String>, String> {
    let Some((greeting, proof)) = line.rsplit_once(' ') else {
        return Err("not a hasten greeting".into());
    };
    if let Some(secret) = secret {
        let ok =
            unhex(proof).is_some_and(|p| signer(secret, nonce, greeting).verify_slice(&p).is_ok());
        if !ok {
            return Err("it did not prove the job's secret (HASTEN_RDZV_SECRET)".into());
        }
    }
    Ok(greeting.split_whitespace().map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_nonce_the_greeting_and_the_secret() {
        let sign = |secret: &[u8], nonce, greeting| {
            hex(&signer(secret, nonce, greeting).finalize().into_bytes())
        };
        let p = sign(b"s3cret", "abcd", "HASTEN-RDZV-2 1 2");
        assert_eq!(p.len(), 64);
        assert_ne!(p, sign(b"other", "abcd", "HASTEN-RDZV-2 1 2"));
        assert_ne!(p, sign(b"s3cret", "abce", "HASTEN-RDZV-2 1 2"));
        assert_ne!(p, sign(b"s3cret", "abcd", "HASTEN-RDZV-2 0 2"));
        assert_eq!(unhex(&p).map(|b| hex(&b)), Some(p));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
        let s = new_secret().unwrap();
        assert_eq!(s.len(), 64);
        assert_ne!(s, new_secret().unwrap());
    }

    /// Rank 0's gate and a rank's greeting over loopback: the right secret is admitted; a wrong one, no
    /// proof, garbage and silence are refused, and a silent connection does not hold the others up.
    #[test]
    fn only_a_proven_greeting_passes_the_gate() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut gate = Gate::new(&listener, Some(b"job".to_vec()));
        let _silent = TcpStream::connect(addr).unwrap();
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let join = |secret: Option<&'static [u8]>, greeting: &'static str| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let r = greet(&mut s, greeting, secret, deadline);
                (r.map_err(|e| e.to_string()), s)
            })
        };
        let wrong = join(Some(b"not the job"), "HASTEN-RDZV-2 2 3");
        let right = join(Some(b"job"), "HASTEN-RDZV-2 1 3");
        let started = Instant::now();
        let mut admitted = Vec::new();
        while admitted.is_empty() {
            let g = gate
                .next(deadline)
                .unwrap()
                .expect("the right rank is admitted in time");
            admitted.push(g.words);
        }
        assert_eq!(admitted[0], ["HASTEN-RDZV-2", "1", "3"]);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the silent connection held it up"
        );
        assert!(right.join().unwrap().0.is_ok());
        // The gate greets only while it is read: keep reading (the wrong rank is refused meanwhile)
        // before waiting for that rank, which under load may not have been greeted yet.
        let until = Instant::now() + Duration::from_secs(10);
        while !wrong.is_finished() && Instant::now() < until {
            assert!(
                gate.next(Instant::now() + Duration::from_millis(200))
                    .unwrap()
                    .is_none()
            );
        }
        assert!(
            wrong.join().unwrap().0.is_ok(),
            "sending is fine; the gate refuses it"
        );
        // A rank without the secret learns why (the gate has to be reading for it to be greeted).
        let late = Instant::now() + Duration::from_secs(5);
        let without = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            greet(&mut s, "HASTEN-RDZV-2 1 3", None, late).map_err(|e| e.to_string())
        });
        assert!(
            gate.next(Instant::now() + Duration::from_secs(1))
                .unwrap()
                .is_none()
        );
        let e = without.join().unwrap().unwrap_err();
        assert!(e.contains(SECRET_VAR), "{e}");
    }
}
