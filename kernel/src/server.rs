//! The server loop: one handler per request type on shell and control, heartbeat echo, and status
//! messages around every request. Messages whose signature does not verify are logged and dropped.

use crate::code::{Completeness, completeness};
use crate::connection::Sockets;
use crate::engine::{CellError, Engine};
use crate::history::History;
use crate::iopub::{self, Publisher};
use crate::output::CellContext;
use crate::router::{ReadError, Router};
use crate::session::SessionPaths;
use anyhow::Result;
use jupyter_protocol::{
    CodeMirrorMode, CommInfoReply, CompleteReply, ConnectionInfo, ErrorOutput, ExecuteInput,
    ExecuteReply, ExecuteResult, ExecutionCount, HistoryReply, InspectReply, InterruptReply,
    IsCompleteReply, JupyterMessage, JupyterMessageContent, KernelInfoReply, LanguageInfo, Media,
    ReplyError, ReplyStatus, ShutdownReply, Status,
};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

struct Kernel {
    engine: Engine,
    iopub: Publisher,
    history: Mutex<History>,
    execution_count: Mutex<usize>,
    shutdown: Notify,
    rust_version: String,
}

/// Serves until a shutdown request (or SIGTERM).
pub async fn serve(info: ConnectionInfo, paths: SessionPaths) -> Result<()> {
    let session = session_id();
    let sockets = Sockets::bind(&info, &session).await?;
    let Sockets {
        shell,
        control,
        stdin,
        iopub: iopub_socket,
        mut heartbeat,
    } = sockets;
    let (publisher, rx) = iopub::channel();
    tokio::spawn(iopub::run(iopub_socket, rx, session.clone()));
    tokio::spawn(async move { while heartbeat.single_heartbeat().await.is_ok() {} });
    let engine = Engine::start(paths, publisher.clone(), CellContext::default());
    let kernel = Arc::new(Kernel {
        engine,
        iopub: publisher,
        history: Mutex::new(History::default()),
        execution_count: Mutex::new(0),
        shutdown: Notify::new(),
        rust_version: rust_version(),
    });
    kernel.iopub.send(Status::starting().into());
    // The stdin socket stays bound for the session: cells that ask for input get an empty line.
    let _stdin = stdin;
    tokio::spawn(channel_loop(kernel.clone(), shell, "shell"));
    tokio::spawn(channel_loop(kernel.clone(), control, "control"));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = kernel.shutdown.notified() => {}
        _ = term.recv() => {}
    }
    // A launch in progress stops its ranks on SIGTERM; otherwise the runner just ends.
    kernel.engine.signal(rustix::process::Signal::TERM);
    Ok(())
}

fn session_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", std::process::id(), nanos)
}

fn rust_version() -> String {
    std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default()
}

/// Shell and control are both ROUTER sockets.
async fn channel_loop(kernel: Arc<Kernel>, mut socket: Router, name: &'static str) {
    loop {
        let message = match socket.read().await {
            Ok(m) => m,
            Err(ReadError::BadSignature) => {
                eprintln!(
                    "hasten-kernel: rejected a message on {name}: its signature does not verify"
                );
                continue;
            }
            Err(ReadError::Replayed) => {
                eprintln!(
                    "hasten-kernel: rejected a message on {name}: its signature was already used \
                     (a replayed message)"
                );
                continue;
            }
            Err(ReadError::Malformed(e)) => {
                eprintln!("hasten-kernel: dropped an unreadable message on {name}: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        kernel.iopub.send(Status::busy().as_child_of(&message));
        let replies = handle(&kernel, &message).await;
        for reply in replies {
            if let Err(e) = socket.send(reply).await {
                eprintln!("hasten-kernel: sending a reply on {name} failed: {e}");
            }
        }
        kernel.iopub.send(Status::idle().as_child_of(&message));
        if matches!(message.content, JupyterMessageContent::ShutdownRequest(_)) {
            kernel.shutdown.notify_one();
        }
    }
}

fn kernel_info(kernel: &Kernel) -> KernelInfoReply {
    KernelInfoReply {
        status: ReplyStatus::Ok,
        protocol_version: "5.3".into(),
        implementation: "hasten-kernel".into(),
        implementation_version: env!("CARGO_PKG_VERSION").into(),
        language_info: LanguageInfo {
            name: "rust".into(),
            version: kernel.rust_version.clone(),
            mimetype: Some("text/rust".into()),
            file_extension: Some(".rs".into()),
            pygments_lexer: Some("rust".into()),
            codemirror_mode: Some(CodeMirrorMode::Simple("rust".into())),
            nbconvert_exporter: Some("script".into()),
        },
        banner: format!(
            "hasten-kernel {}: Rust through evcxr, with hasten (use hasten::prelude::*) and \
             notebook_launcher in scope. Magics: %launch, %debug.",
            env!("CARGO_PKG_VERSION")
        ),
        help_links: vec![],
        debugger: false,
        error: None,
    }
}

async fn handle(kernel: &Kernel, message: &JupyterMessage) -> Vec<JupyterMessage> {
    match &message.content {
        JupyterMessageContent::KernelInfoRequest(_) => {
            vec![kernel_info(kernel).as_child_of(message)]
        }
        JupyterMessageContent::ExecuteRequest(request) => {
            vec![execute(kernel, message, request).await.as_child_of(message)]
        }
        JupyterMessageContent::CompleteRequest(request) => {
            let found = kernel
                .engine
                .complete(request.code.clone(), request.cursor_pos)
                .await;
            let (start, end) = if found.matches.is_empty() {
                (request.cursor_pos, request.cursor_pos)
            } else {
                (found.cursor_start, found.cursor_end)
            };
            vec![
                CompleteReply {
                    matches: found.matches,
                    cursor_start: start,
                    cursor_end: end,
                    ..Default::default()
                }
                .as_child_of(message),
            ]
        }
        JupyterMessageContent::InspectRequest(request) => {
            let found = kernel
                .engine
                .inspect(request.code.clone(), request.cursor_pos)
                .await;
            let reply = match found {
                Some((plain, html)) => InspectReply {
                    found: true,
                    data: serde_json::from_value::<Media>(
                        serde_json::json!({ "text/plain": plain, "text/html": html }),
                    )
                    .unwrap_or_default(),
                    ..Default::default()
                },
                None => InspectReply::default(),
            };
            vec![reply.as_child_of(message)]
        }
        JupyterMessageContent::IsCompleteRequest(request) => {
            let reply = match completeness(&request.code) {
                Completeness::Complete => IsCompleteReply::complete(),
                Completeness::Incomplete(indent) => IsCompleteReply::incomplete(indent),
                Completeness::Invalid => IsCompleteReply::invalid(),
            };
            vec![reply.as_child_of(message)]
        }
        JupyterMessageContent::HistoryRequest(request) => {
            let history = kernel
                .history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .query(request);
            vec![HistoryReply::new(history).as_child_of(message)]
        }
        JupyterMessageContent::CommInfoRequest(_) => {
            vec![CommInfoReply::default().as_child_of(message)]
        }
        JupyterMessageContent::InterruptRequest(_) => {
            kernel.engine.interrupt();
            vec![InterruptReply::new().as_child_of(message)]
        }
        JupyterMessageContent::ShutdownRequest(request) => {
            let reply = ShutdownReply {
                restart: request.restart,
                status: ReplyStatus::Ok,
                error: None,
            };
            // Jupyter also publishes the reply on iopub, so other clients learn of the shutdown.
            kernel.iopub.send(reply.as_child_of(message));
            vec![reply.as_child_of(message)]
        }
        other => {
            eprintln!("hasten-kernel: ignoring a {} message", other.message_type());
            vec![]
        }
    }
}

async fn execute(
    kernel: &Kernel,
    message: &JupyterMessage,
    request: &jupyter_protocol::ExecuteRequest,
) -> ExecuteReply {
    let store = request.store_history && !request.silent;
    let count = {
        let mut count = kernel
            .execution_count
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if store {
            *count += 1;
        }
        ExecutionCount::new(*count)
    };
    if !request.silent {
        kernel.iopub.send(
            ExecuteInput {
                code: request.code.clone(),
                execution_count: count,
            }
            .as_child_of(message),
        );
    }
    let outcome = kernel.engine.execute(request.code.clone(), message).await;
    let text_result = outcome
        .result
        .get("text/plain")
        .cloned()
        .unwrap_or_default();
    if store {
        kernel
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(count.value(), &request.code, &text_result);
    }
    match outcome.error {
        Some(CellError {
            ename,
            evalue,
            traceback,
        }) => {
            kernel.iopub.send(
                ErrorOutput {
                    ename: ename.clone(),
                    evalue: evalue.clone(),
                    traceback: traceback.clone(),
                }
                .as_child_of(message),
            );
            ExecuteReply {
                status: ReplyStatus::Error,
                execution_count: count,
                error: Some(Box::new(ReplyError {
                    ename,
                    evalue,
                    traceback,
                })),
                ..Default::default()
            }
        }
        None => {
            if !outcome.result.is_empty() && !request.silent {
                let media: Media = serde_json::from_value(
                    serde_json::to_value(&outcome.result).unwrap_or_default(),
                )
                .unwrap_or_default();
                let result = ExecuteResult {
                    // The schema wants an object here, never null.
                    transient: Some(Default::default()),
                    ..ExecuteResult::new(count, media)
                };
                kernel.iopub.send(result.as_child_of(message));
            }
            ExecuteReply {
                status: ReplyStatus::Ok,
                execution_count: count,
                user_expressions: Some(Default::default()),
                ..Default::default()
            }
        }
    }
}
