//! `GET /v1/sandboxes/{id}/exec` with a WebSocket upgrade: an exec whose input and output
//! stream both ways while it runs.
//!
//! The caller is authenticated and the sandbox checked before the upgrade (another owner's
//! sandbox is a 404, as everywhere). The client's first message is a text frame
//! `{"command": [...], "env": {}, "tty": false, "cols": 80, "rows": 24, "timeout_secs": N}`;
//! then binary frames whose first byte is a channel, as in Kubernetes' `v4.channel.k8s.io`:
//! 0 stdin (client → sandbox; an empty payload closes stdin), 1 stdout, 2 stderr, 4 resize.
//! The last server message is a text frame `{"exit_code", "signal", "timed_out"}`, then a
//! close. Whatever a client sends wrong ends the session with a close frame that says why.
//!
//! Output is sent as it is read, and each frame's send is awaited before the next read: a
//! client that stops reading stops the command (its pipe fills), and a session holds at most a
//! few chunks in memory. The client's input is read only as fast as the command takes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::{owned_sandbox, AppState, Caller};
use crate::credential::Scope;
use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::sandbox::process::{ExecExit, ExecRequest, OutputStream};
use crate::store::SandboxRecord;

/// The channels (first byte of a binary frame).
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const RESIZE: u8 = 4;

/// Largest frame (and message) a client may send.
const MAX_FRAME: usize = 1024 * 1024;

/// How long the client has to send its start message after the upgrade.
const START_WAIT: Duration = Duration::from_secs(30);

/// How long the gateway waits for the client's answer to its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Chunks in flight between the command and the socket, each way.
const IN_FLIGHT: usize = 4;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;
type WsSink = futures_util::stream::SplitSink<Ws, Message>;
type WsStream = futures_util::stream::SplitStream<Ws>;

/// The client's first message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Start {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    tty: bool,
    // The terminal's size: only meaningful with `tty`.
    #[serde(rename = "cols")]
    _cols: Option<u16>,
    #[serde(rename = "rows")]
    _rows: Option<u16>,
    timeout_secs: Option<u64>,
}

/// Why a session ends early: the client went away, or sent something it may not.
enum Refusal {
    Gone,
    Close(CloseCode, String),
}

impl Refusal {
    fn policy(reason: impl Into<String>) -> Refusal {
        Refusal::Close(CloseCode::Policy, reason.into())
    }
}

pub(super) async fn exec_stream(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    mut req: Request,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let record = owned_sandbox(&gw, &caller, &id).await?;
    if gw.driver.is_none() || record.command.is_none() {
        return Err(HttpError::invalid_argument(
            "exec works on `command` sandboxes run by this node",
        ));
    }
    if !record.status.is_live() {
        return Err(HttpError::conflict("the sandbox has ended"));
    }
    let accept = websocket_accept(req.headers())?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_frame_size(Some(MAX_FRAME))
                    .max_message_size(Some(MAX_FRAME));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                session(gw, caller, record, ws).await;
            }
            Err(err) => tracing::debug!(error = %err, "the exec upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .map_err(|_| HttpError::internal())
}

/// The `Sec-WebSocket-Accept` answer to a well-formed WebSocket upgrade request.
fn websocket_accept(headers: &HeaderMap) -> Result<String, HttpError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let refused = || {
        HttpError::bad_request(
            "this endpoint needs a WebSocket upgrade over HTTP/1.1 (Connection: Upgrade, \
             Upgrade: websocket, Sec-WebSocket-Version: 13); POST runs a one-shot exec",
        )
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(refused());
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        return Err(refused());
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
        .ok_or_else(refused)?;
    Ok(derive_accept_key(key.as_bytes()))
}

/// One streamed exec, from the start message to the close.
async fn session(gw: Arc<Gateway>, caller: Caller, record: SandboxRecord, ws: Ws) {
    let (mut sink, mut stream) = ws.split();
    let start = match start_message(&mut stream).await.and_then(|s| check(&gw, s)) {
        Ok(s) => s,
        Err(refusal) => return refuse(sink, stream, refusal).await,
    };
    let Some(driver) = gw.driver.as_ref() else {
        return;
    };
    gw.audit(
        &caller.credential.id,
        "sandbox.exec",
        &record.id,
        caller.client_addr.clone(),
    )
    .await;
    let (stdin_tx, stdin_rx) = mpsc::channel(IN_FLIGHT);
    let (out_tx, mut out_rx) = mpsc::channel(IN_FLIGHT);
    let ended = {
        let run = driver.exec_stream(&record, start.0, stdin_rx, out_tx);
        let sink = &mut sink;
        let output = async move {
            while let Some((which, data)) = out_rx.recv().await {
                let channel = match which {
                    OutputStream::Stdout => STDOUT,
                    OutputStream::Stderr => STDERR,
                };
                let mut frame = Vec::with_capacity(1 + data.len());
                frame.push(channel);
                frame.extend_from_slice(&data);
                // Dropping the receiver (on return) tells the command nobody reads it.
                if sink.send(Message::Binary(frame.into())).await.is_err() {
                    return false;
                }
            }
            true
        };
        let input = read_input(&mut stream, stdin_tx, start.1);
        tokio::select! {
            (exit, delivered) = async { tokio::join!(run, output) } => Ok((exit, delivered)),
            refusal = input => Err(refusal),
        }
    };
    match ended {
        Ok((Ok(exit), true)) => {
            let _ = sink.send(Message::text(exit_message(&exit))).await;
            let close = Refusal::Close(CloseCode::Normal, String::new());
            refuse(sink, stream, close).await;
        }
        // The socket failed under the output: nobody is there to tell.
        Ok((Ok(_), false)) => {}
        Ok((Err(err), _)) => {
            let err = super::driver_error(err);
            let close = Refusal::Close(CloseCode::Error, err.message.to_string());
            refuse(sink, stream, close).await;
        }
        Err(refusal) => refuse(sink, stream, refusal).await,
    }
}

/// The start message and whether it asked for a terminal.
struct Checked(ExecRequest, bool);

fn check(gw: &Gateway, start: Start) -> Result<Checked, Refusal> {
    if start.command.is_empty() || start.command[0].is_empty() {
        return Err(Refusal::policy("command must be a non-empty array"));
    }
    if start.tty {
        return Err(Refusal::Close(
            CloseCode::Unsupported,
            "tty: true is not supported yet".into(),
        ));
    }
    let cfg = &gw.config.orchestrator;
    // An interactive session runs up to the ceiling unless it asks for less.
    let timeout = match start.timeout_secs {
        Some(0) => return Err(Refusal::policy("timeout_secs must be positive")),
        Some(t) => Duration::from_secs(t).min(cfg.exec_max_timeout),
        None => cfg.exec_max_timeout,
    };
    Ok(Checked(
        ExecRequest {
            command: start.command,
            env: start.env,
            timeout,
        },
        start.tty,
    ))
}

fn exit_message(exit: &ExecExit) -> String {
    serde_json::to_string(exit).unwrap_or_else(|_| "{}".into())
}

/// Reads the client's start message.
async fn start_message(stream: &mut WsStream) -> Result<Start, Refusal> {
    let deadline = tokio::time::Instant::now() + START_WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let msg = match next {
            Err(_) => {
                return Err(Refusal::policy(format!(
                    "no start message within {} s",
                    START_WAIT.as_secs()
                )))
            }
            Ok(msg) => received(msg)?,
        };
        match msg {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str())
                    .map_err(|e| Refusal::policy(format!("the start message: {e}")))
            }
            Message::Binary(_) => {
                return Err(Refusal::Close(
                    CloseCode::Unsupported,
                    "the first message must be a JSON text frame".into(),
                ))
            }
            Message::Close(_) => return Err(Refusal::Gone),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// A message off the socket, or why there is none.
fn received(next: Option<Result<Message, WsError>>) -> Result<Message, Refusal> {
    match next {
        Some(Ok(msg)) => Ok(msg),
        Some(Err(WsError::Capacity(_))) => Err(Refusal::Close(
            CloseCode::Size,
            format!("frames are limited to {MAX_FRAME} bytes"),
        )),
        Some(Err(_)) | None => Err(Refusal::Gone),
    }
}

/// Carries the client's frames to the command until the client goes away or errs.
async fn read_input(stream: &mut WsStream, stdin: mpsc::Sender<Bytes>, tty: bool) -> Refusal {
    loop {
        let msg = match received(stream.next().await) {
            Ok(msg) => msg,
            Err(refusal) => return refusal,
        };
        match msg {
            Message::Binary(data) => match data.first().copied() {
                None => return Refusal::policy("a binary frame starts with its channel byte"),
                Some(STDIN) => {
                    // Once the command has ended nobody receives; the session is ending too.
                    let _ = stdin.send(data.slice(1..)).await;
                }
                Some(RESIZE) if !tty => {
                    return Refusal::policy("resize needs a terminal (tty: true)");
                }
                Some(channel) => {
                    return Refusal::policy(format!("unknown channel {channel}"));
                }
            },
            Message::Text(_) => {
                return Refusal::Close(
                    CloseCode::Unsupported,
                    "after the start message, only binary frames".into(),
                )
            }
            Message::Close(_) => return Refusal::Gone,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// Ends the session: a close frame saying why (unless the client is gone), then its answer.
async fn refuse(mut sink: WsSink, mut stream: WsStream, refusal: Refusal) {
    let Refusal::Close(code, reason) = refusal else {
        return;
    };
    let frame = CloseFrame {
        code,
        reason: close_reason(&reason).into(),
    };
    if sink.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    // Read on until the client answers (or a while passes), so the connection ends cleanly
    // rather than with a reset that could discard what the client has not read yet.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = stream.next().await {
            if msg.is_close() {
                break;
            }
        }
    })
    .await;
}

/// A close frame's reason holds at most 123 bytes: cut at a character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
    }

    #[test]
    fn only_websocket_upgrades_are_accepted() {
        let mut h = HeaderMap::new();
        assert!(websocket_accept(&h).is_err());
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert!(websocket_accept(&h).is_err(), "no key");
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        // RFC 6455's example.
        assert_eq!(
            websocket_accept(&h).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert!(websocket_accept(&h).is_err());
    }
}
