//! The `/ws/ui` event stream of one simulated server, as CML 2.6+ serves it to its web UI (the
//! 2.9 and 2.10 personalities; 2.4 has none): the upgrade always succeeds, the first message
//! authenticates (close 3000 `Unauthorized` otherwise), then every change of the server's labs
//! and the periodic stats, with the stream's faults applied.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
        FromRequestParts, Request,
    },
    http::StatusCode,
    response::Response,
};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::{
    api::{self, Call},
    fleet::Fleet,
    hostile,
    model::SimWorker,
    token::Claims,
};

/// How long a server waits for the authentication message.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message a client may send (the authentication message is a few hundred bytes).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// The close code and reason of a refused or expired token.
const UNAUTHORIZED: u16 = 3000;

/// `GET /ws/ui`.
pub async fn ws_ui(call: Call, request: Request) -> Response {
    let Call { fleet, worker, ctl } = call;
    if !worker.has_event_stream() {
        // Counted all the same: a client retrying the upgrade in a loop shows.
        worker.count_call("ws_ui");
        return api::not_found().await;
    }
    if let Some(r) = api::before(&worker, &ctl, "ws_ui").await {
        return r;
    }
    let faults = worker.faults();
    if let Some(to) = faults.redirect_ws_to {
        return api::redirect(StatusCode::FOUND, &to);
    }
    if let Some(how) = faults.ws_hostile {
        return hostile::upgrade(request, how);
    }
    let (mut parts, _) = request.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade
            .max_message_size(MAX_CLIENT_MESSAGE)
            .on_upgrade(move |socket| stream(socket, fleet, worker)),
        Err(_) => api::cml_error(StatusCode::BAD_REQUEST, "Expected a WebSocket upgrade"),
    }
}

/// The first message of a client: `{"token": ..., "client_uuid": ...}` (the simulator has no
/// use for the client's uuid).
#[derive(Debug, Deserialize)]
struct Hello {
    token: String,
}

/// The caller's claims if `text` is the authentication message of a valid token.
fn authenticate(fleet: &Fleet, worker: &SimWorker, text: &str) -> Option<Claims> {
    let hello: Hello = serde_json::from_str(text).ok()?;
    if worker.take_token_refusal() {
        return None;
    }
    api::verify_token(fleet, worker, &hello.token).ok()
}

async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// The next text message, or `None` when the client closed or sent something else first.
async fn first_text(socket: &mut WebSocket) -> Option<String> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

async fn stream(mut socket: WebSocket, fleet: Arc<Fleet>, worker: Arc<SimWorker>) {
    let _open = worker.stream_opened();
    let mut dropped = worker.streams_epoch();
    let hello = tokio::time::timeout(AUTH_TIMEOUT, first_text(&mut socket)).await;
    let claims = match hello {
        Ok(Some(text)) => authenticate(&fleet, &worker, &text),
        _ => None,
    };
    let Some(claims) = claims else {
        return close(socket, UNAUTHORIZED, "Unauthorized").await;
    };
    let mut changes = worker.subscribe_events();
    let faults = worker.faults();
    if faults.ws_garbage && socket.send(Message::text("<<not json")).await.is_err() {
        return;
    }
    if faults.ws_oversized_bytes > 0 {
        let big = format!(
            r#"{{"event_type":"system_stats","data":"{}"}}"#,
            "x".repeat(faults.ws_oversized_bytes)
        );
        if socket.send(Message::text(big)).await.is_err() {
            return;
        }
    }
    let mut stats = tokio::time::interval(fleet.stats_interval);
    stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stats.tick().await;
    loop {
        tokio::select! {
            // Dropped without a close frame, as a broken connection would be.
            _ = dropped.changed() => return,
            change = changes.recv() => match change {
                Ok(text) => {
                    if socket.send(Message::text(text.as_ref())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => return close(socket, 1008, "Too slow").await,
                Err(RecvError::Closed) => return,
            },
            _ = stats.tick() => {
                // A token that expired (or was revoked) meanwhile ends the stream.
                if api::check_claims(&fleet, &worker, &claims).is_err() {
                    return close(socket, UNAUTHORIZED, "Unauthorized").await;
                }
                for message in worker.stats_messages() {
                    if socket.send(Message::text(message)).await.is_err() {
                        return;
                    }
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
