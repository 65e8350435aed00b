//! Framing on the TCP connections between ranks: a kind byte, a little-endian u64 length, the payload.
//! An `Abort` frame carries an error message, so a failure found on one rank reaches every rank as an
//! error instead of leaving them waiting.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::TcpStream;

const DATA: u8 = 0;
const ABORT: u8 = 1;

/// Writes one data frame.
pub(crate) fn send(
    stream: &mut TcpStream,
    payload: &[u8],
    peer: usize,
    op: &'static str,
) -> Result<()> {
    write_frame(stream, DATA, payload).map_err(|e| lost(peer, op, e))
}

/// Tells a peer that the operation failed elsewhere; best effort, since the peer may be gone too.
pub(crate) fn send_abort(stream: &mut TcpStream, message: &str) {
    let _ = write_frame(stream, ABORT, message.as_bytes());
}

fn write_frame(stream: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = kind;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()
}

/// The largest frame a peer may announce (1 TiB): far beyond any collective, small enough that a
/// length read from a stranger or from garbage is refused before anything is allocated.
pub(crate) const MAX_FRAME: u64 = 1 << 40;

/// Reads one frame; an abort frame becomes an error carrying the peer's message. Memory grows with the
/// bytes that actually arrive, never with the length a peer merely announces.
pub(crate) fn recv(stream: &mut impl Read, peer: usize, op: &'static str) -> Result<Vec<u8>> {
    let mut header = [0u8; 9];
    stream
        .read_exact(&mut header)
        .map_err(|e| lost(peer, op, e))?;
    let len = u64::from_le_bytes(header[1..].try_into().unwrap_or_default());
    if len > MAX_FRAME {
        return Err(Error::Collective {
            op,
            detail: format!(
                "rank {peer} announced a frame of {len} bytes (the limit is {MAX_FRAME})"
            ),
        });
    }
    let mut payload = Vec::with_capacity(len.min(1 << 20) as usize);
    let got = stream
        .by_ref()
        .take(len)
        .read_to_end(&mut payload)
        .map_err(|e| lost(peer, op, e))?;
    if (got as u64) < len {
        return Err(lost(
            peer,
            op,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the frame ended after {got} of {len} bytes"),
            ),
        ));
    }
    match header[0] {
        DATA => Ok(payload),
        ABORT => Err(Error::Collective {
            op,
            detail: String::from_utf8_lossy(&payload).into_owned(),
        }),
        other => Err(Error::Collective {
            op,
            detail: format!("rank {peer} sent an unknown frame kind {other}"),
        }),
    }
}

/// Reads one frame into `out`, which must have exactly the announced length.
pub(crate) fn recv_into(
    stream: &mut impl Read,
    out: &mut [u8],
    peer: usize,
    op: &'static str,
) -> Result<()> {
    let mut header = [0u8; 9];
    stream
        .read_exact(&mut header)
        .map_err(|e| lost(peer, op, e))?;
    let len = u64::from_le_bytes(header[1..].try_into().unwrap_or_default());
    if header[0] == ABORT || len != out.len() as u64 {
        let mut payload = vec![0u8; len.min(1 << 20) as usize];
        stream
            .read_exact(&mut payload)
            .map_err(|e| lost(peer, op, e))?;
        let detail = if header[0] == ABORT {
            String::from_utf8_lossy(&payload).into_owned()
        } else {
            format!(
                "rank {peer} sent {len} bytes where {} were expected",
                out.len()
            )
        };
        return Err(Error::Collective { op, detail });
    }
    stream.read_exact(out).map_err(|e| lost(peer, op, e))
}

/// An I/O failure on the link to `peer`: a timeout (the socket's timeout is the group's collective
/// timeout) becomes [`Error::CollectiveTimeout`], whose missing ranks the caller works out; anything
/// else means the connection broke.
fn lost(peer: usize, op: &'static str, e: std::io::Error) -> Error {
    if is_timeout(&e) {
        return Error::CollectiveTimeout {
            op,
            seq: 0,
            waited_s: 0.0,
            missing: Vec::new(),
        };
    }
    Error::PeerLost {
        rank: peer,
        op,
        source: e,
    }
}

/// True for the errors a socket read or write gives when its timeout passes.
pub(crate) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
#[path = "wire_fuzz.rs"]
mod fuzz;
