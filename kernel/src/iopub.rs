//! Everything published on iopub goes through one queue and one task, so messages from the request
//! handlers and from the output thread keep the order they were sent in.

use jupyter_protocol::JupyterMessage;
use jupyter_zmq_client::KernelIoPubConnection;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A handle for publishing on iopub, usable from any thread.
#[derive(Clone)]
pub struct Publisher {
    tx: UnboundedSender<JupyterMessage>,
}

impl Publisher {
    /// Queues a message; iopub messages carry a topic (`kernel.<session>.<type>`) instead of the
    /// requester's socket identity.
    pub fn send(&self, message: JupyterMessage) {
        let _ = self.tx.send(message);
    }
}

/// Creates the queue; run [`run`] with the receiver.
pub fn channel() -> (Publisher, UnboundedReceiver<JupyterMessage>) {
    let (tx, rx) = unbounded_channel();
    (Publisher { tx }, rx)
}

/// Sends queued messages until every publisher is gone.
pub async fn run(
    mut socket: KernelIoPubConnection,
    mut rx: UnboundedReceiver<JupyterMessage>,
    session: String,
) {
    while let Some(message) = rx.recv().await {
        let topic = format!("kernel.{session}.{}", message.message_type());
        let message = message.with_zmq_identities(vec![topic.into_bytes().into()]);
        if let Err(e) = socket.send(message).await {
            eprintln!("hasten-kernel: publishing on iopub failed: {e}");
        }
    }
}
