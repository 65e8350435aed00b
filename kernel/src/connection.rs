//! The connection file Jupyter hands the kernel, and the five sockets it names.

use crate::router::{Digests, Router};
use anyhow::{Context, Result, bail};
use jupyter_protocol::ConnectionInfo;
use jupyter_zmq_client::{KernelHeartbeatConnection, KernelIoPubConnection, KernelStdinConnection};
use std::path::Path;

/// Reads and checks a connection file; errors name the file and the field.
pub fn read_connection_file(path: &Path) -> Result<ConnectionInfo> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the connection file {}", path.display()))?;
    let info: ConnectionInfo = serde_json::from_str(&text)
        .with_context(|| format!("parsing the connection file {}", path.display()))?;
    if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
        bail!(
            "{}: signature_scheme {:?} is not supported (hmac-sha256 is)",
            path.display(),
            info.signature_scheme
        );
    }
    Ok(info)
}

/// The kernel's end of every channel, bound exactly where the connection file says.
pub struct Sockets {
    pub shell: Router,
    pub control: Router,
    pub stdin: KernelStdinConnection,
    pub iopub: KernelIoPubConnection,
    pub heartbeat: KernelHeartbeatConnection,
}

impl Sockets {
    /// Binds the five sockets; `session` is the kernel's session id, put in every message it sends.
    pub async fn bind(info: &ConnectionInfo, session: &str) -> Result<Sockets> {
        let endpoint = |port: u16| format!("{}://{}:{port}", info.transport, info.ip);
        if info.key.is_empty() {
            // Jupyter allows an empty key, but then anyone who can reach these ports runs code as this
            // user; say so where the operator will look (the server's log), every start.
            eprintln!(
                "hasten-kernel: WARNING: the connection file has an empty key, so messages are not \
                 signed: any process that can reach its ports on {} can execute code in this \
                 kernel. Start the kernel from Jupyter (which writes a random key) or set \"key\" in \
                 the file.",
                info.ip
            );
        }
        let seen = Digests::default();
        Ok(Sockets {
            shell: Router::bind(&info.shell_url(), &info.key, session, seen.clone())
                .await
                .with_context(|| {
                    format!("binding the shell socket at {}", endpoint(info.shell_port))
                })?,
            control: Router::bind(&info.control_url(), &info.key, session, seen)
                .await
                .with_context(|| {
                    format!(
                        "binding the control socket at {}",
                        endpoint(info.control_port)
                    )
                })?,
            stdin: jupyter_zmq_client::create_kernel_stdin_connection(info, session)
                .await
                .with_context(|| {
                    format!("binding the stdin socket at {}", endpoint(info.stdin_port))
                })?,
            iopub: jupyter_zmq_client::create_kernel_iopub_connection(info, session)
                .await
                .with_context(|| {
                    format!("binding the iopub socket at {}", endpoint(info.iopub_port))
                })?,
            heartbeat: jupyter_zmq_client::create_kernel_heartbeat_connection(info)
                .await
                .with_context(|| {
                    format!("binding the heartbeat socket at {}", endpoint(info.hb_port))
                })?,
        })
    }
}
