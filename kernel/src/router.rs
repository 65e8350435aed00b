//! Shell and control: ROUTER sockets read frame by frame. Signatures are checked here (HMAC-SHA256 over
//! header, parent header, metadata and content, as the messaging spec says). Reading the frames
//! ourselves lets a request that jupyter-protocol's types reject only for leaving out an optional field
//! (a history search without `unique` or `n`) be read with the spec's defaults instead of being lost.

use bytes::Bytes;
use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};
use jupyter_protocol::{Header, JupyterMessage, JupyterMessageContent};
use ring::hmac;
use serde_json::{Value, json};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Why an incoming message was not accepted.
#[derive(Debug)]
pub enum ReadError {
    /// The signature is missing or does not verify: the message is dropped unread.
    BadSignature,
    /// The signature verifies but was seen before: a replayed message, dropped unread.
    Replayed,
    /// Not a Jupyter message (frames, JSON or content).
    Malformed(String),
}

/// A kernel-side ROUTER socket.
pub struct Router {
    socket: zeromq::RouterSocket,
    key: Option<hmac::Key>,
    session: String,
    seen: Digests,
}

/// Signatures already accepted, shared by shell and control so that a message captured on one cannot be
/// replayed on either. ipykernel keeps the same history (and refuses a repeat as "Duplicate Signature");
/// its size is bounded so a long session does not grow without end: the oldest signatures go first.
#[derive(Clone, Default)]
pub struct Digests(Arc<Mutex<DigestHistory>>);

#[derive(Default)]
struct DigestHistory {
    set: HashSet<Vec<u8>>,
    order: VecDeque<Vec<u8>>,
}

/// How many signatures are remembered (ipykernel's `digest_history_size`).
const DIGEST_HISTORY: usize = 1 << 16;

impl Digests {
    /// Records `signature`; false when it was already there.
    fn first_sighting(&self, signature: &[u8]) -> bool {
        let mut history = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !history.set.insert(signature.to_vec()) {
            return false;
        }
        history.order.push_back(signature.to_vec());
        if history.order.len() > DIGEST_HISTORY
            && let Some(oldest) = history.order.pop_front()
        {
            history.set.remove(&oldest);
        }
        true
    }
}

/// The spec's defaults for a history request's optional fields.
fn with_history_defaults(mut content: Value) -> Value {
    if let Value::Object(map) = &mut content {
        let defaults = [
            ("output", json!(false)),
            ("raw", json!(true)),
            ("unique", json!(false)),
            ("n", json!(0)),
            ("start", json!(0)),
            ("stop", json!(0)),
            ("session", Value::Null),
        ];
        for (key, value) in defaults {
            map.entry(key).or_insert(value);
        }
    }
    content
}

impl Router {
    /// Binds at `endpoint`; `key` signs and verifies (empty: no signatures, as Jupyter allows); `seen`
    /// is the signature history shared with the kernel's other ROUTER socket.
    pub async fn bind(
        endpoint: &str,
        key: &str,
        session: &str,
        seen: Digests,
    ) -> anyhow::Result<Router> {
        let mut socket = zeromq::RouterSocket::new();
        socket.bind(endpoint).await?;
        Ok(Router {
            socket,
            key: (!key.is_empty()).then(|| hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes())),
            session: session.to_owned(),
            seen,
        })
    }

    /// The next message whose signature verifies.
    pub async fn read(&mut self) -> Result<JupyterMessage, ReadError> {
        let message = self
            .socket
            .recv()
            .await
            .map_err(|e| ReadError::Malformed(e.to_string()))?;
        let frames: Vec<Bytes> = message.into_vec();
        let delimiter = frames
            .iter()
            .position(|f| &f[..] == DELIMITER)
            .ok_or_else(|| ReadError::Malformed("no <IDS|MSG> delimiter".into()))?;
        let rest = &frames[delimiter + 1..];
        if rest.len() < 5 {
            return Err(ReadError::Malformed(format!(
                "{} frames after the delimiter",
                rest.len()
            )));
        }
        let (signature, parts) = (&rest[0], &rest[1..]);
        if let Some(key) = &self.key {
            let signature = std::str::from_utf8(signature)
                .ok()
                .and_then(|hex| HEXLOWER_PERMISSIVE.decode(hex.as_bytes()).ok())
                .ok_or(ReadError::BadSignature)?;
            let signed: Vec<u8> = parts[..4].iter().flat_map(|p| p.iter().copied()).collect();
            hmac::verify(key, &signed, &signature).map_err(|_| ReadError::BadSignature)?;
            if !self.seen.first_sighting(&signature) {
                return Err(ReadError::Replayed);
            }
        }
        let json = |i: usize| {
            serde_json::from_slice::<Value>(&parts[i])
                .map_err(|e| ReadError::Malformed(format!("frame {i}: {e}")))
        };
        let header: Header = serde_json::from_value(json(0)?)
            .map_err(|e| ReadError::Malformed(format!("header: {e}")))?;
        let parent_header = serde_json::from_value::<Header>(json(1)?).ok();
        let mut content = json(3)?;
        if header.msg_type == "history_request" {
            content = with_history_defaults(content);
        }
        let content = JupyterMessageContent::from_type_and_content(&header.msg_type, content)
            .map_err(|e| ReadError::Malformed(format!("{} content: {e}", header.msg_type)))?;
        Ok(JupyterMessage {
            zmq_identities: frames[..delimiter].to_vec(),
            header,
            parent_header,
            metadata: json(2)?,
            content,
            buffers: parts[4..].to_vec(),
            channel: None,
        })
    }

    /// Signs and sends a reply (to the identities it carries).
    pub async fn send(&mut self, message: JupyterMessage) -> anyhow::Result<()> {
        let message = message.with_session(&self.session);
        let parent = match &message.parent_header {
            Some(parent) => serde_json::to_vec(parent)?,
            None => b"{}".to_vec(),
        };
        let parts = [
            serde_json::to_vec(&message.header)?,
            parent,
            serde_json::to_vec(&message.metadata)?,
            serde_json::to_vec(&message.content)?,
        ];
        let signature = match &self.key {
            Some(key) => {
                let mut ctx = hmac::Context::with_key(key);
                for part in &parts {
                    ctx.update(part);
                }
                HEXLOWER.encode(ctx.sign().as_ref())
            }
            None => String::new(),
        };
        let mut frames: Vec<Bytes> = message.zmq_identities.clone();
        frames.push(Bytes::from_static(DELIMITER));
        frames.push(signature.into_bytes().into());
        frames.extend(parts.into_iter().map(Bytes::from));
        frames.extend(message.buffers.iter().cloned());
        let frames = ZmqMessage::try_from(frames).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.socket.send(frames).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_accepted_once_and_the_history_stays_bounded() {
        let seen = Digests::default();
        assert!(seen.first_sighting(b"abc"));
        assert!(!seen.first_sighting(b"abc"));
        for i in 0..DIGEST_HISTORY as u32 {
            assert!(seen.first_sighting(&i.to_le_bytes()));
        }
        let history = seen.0.lock().unwrap();
        assert_eq!(history.set.len(), DIGEST_HISTORY);
        assert_eq!(history.order.len(), DIGEST_HISTORY);
        // The oldest ("abc") was forgotten to make room.
        assert!(!history.set.contains(&b"abc"[..]));
    }

    #[test]
    fn a_search_without_optional_fields_parses_with_defaults() {
        let content = with_history_defaults(json!({"hist_access_type": "search", "pattern": "a*"}));
        let parsed = JupyterMessageContent::from_type_and_content("history_request", content);
        assert!(parsed.is_ok(), "{parsed:?}");
    }
}
