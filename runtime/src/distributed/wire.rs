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

/// Reads one frame; an abort frame becomes an error carrying the peer's message.
pub(crate) fn recv(stream: &mut TcpStream, peer: usize, op: &'static str) -> Result<Vec<u8>> {
    let mut header = [0u8; 9];
    stream
        .read_exact(&mut header)
        .map_err(|e| lost(peer, op, e))?;
    let len = u64::from_le_bytes(header[1..].try_into().unwrap_or_default());
    let len = usize::try_from(len).map_err(|_| Error::Collective {
        op,
        detail: format!("rank {peer} announced a frame of {len} bytes"),
    })?;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .map_err(|e| lost(peer, op, e))?;
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
    stream: &mut TcpStream,
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
        let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0).min(1 << 20)];
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

fn lost(peer: usize, op: &'static str, e: std::io::Error) -> Error {
    Error::PeerLost {
        rank: peer,
        op,
        source: e,
    }
}
