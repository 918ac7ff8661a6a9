//! A hostile or broken `/ws/ui` (the `ws_hostile` fault): the upgrade is answered by hand and
//! the stream written frame by frame, as no well-behaved WebSocket library would (ping floods,
//! a message and a close, an unfinished message with an unfinished frame). It never reads what
//! the client sends (the unfinished message reads only to notice the client go).

use std::time::Duration;

use axum::{
    body::Body,
    extract::Request,
    http::{header, StatusCode},
    response::Response,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::{api, model::WsHostile};

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// A stats message as CML sends them.
const STATS: &str = r#"{"event_type":"system_stats","event":null,"lab_id":null,"data":{}}"#;

/// Answers the upgrade (101) and, once upgraded, behaves as `how` says.
pub fn upgrade(mut request: Request, how: WsHostile) -> Response {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return api::cml_error(StatusCode::BAD_REQUEST, "Expected a WebSocket upgrade");
    };
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrading.await {
            let _ = behave(TokioIo::new(upgraded), how).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Body::empty())
        .unwrap_or_default()
}

/// Serves one hostile stream over a raw connection `io` (no HTTP server in front): reads the
/// upgrade request (at most 8 KiB), answers 101 and behaves as `how` says, never reading
/// again. What a test needs to shut a server's window exactly where it wants (an in-memory
/// pipe), which a kernel's socket buffers do not allow.
pub async fn serve(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    how: WsHostile,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if request.len() > 8 * 1024 || io.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        request.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&request);
    let key = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    io.write_all(answer.as_bytes()).await?;
    behave(io, how).await
}

/// The header of an unmasked frame (the server's) with a payload `len` bytes long.
fn header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
    let mut h = vec![(u8::from(fin) << 7) | opcode];
    if len < 126 {
        h.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        h.push(126);
        h.extend_from_slice(&len.to_be_bytes());
    } else {
        h.push(127);
        h.extend_from_slice(&(len as u64).to_be_bytes());
    }
    h
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = header(true, opcode, payload.len());
    f.extend_from_slice(payload);
    f
}

async fn behave(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    how: WsHostile,
) -> std::io::Result<()> {
    match how {
        WsHostile::Pings {
            per_second,
            text_every_ms,
        } => {
            let ping = frame(PING, &[b'p'; 125]);
            let stats = frame(TEXT, STATS.as_bytes());
            let text_every = Duration::from_millis(text_every_ms);
            let mut last_text = tokio::time::Instant::now();
            loop {
                if text_every_ms > 0 && last_text.elapsed() >= text_every {
                    io.write_all(&stats).await?;
                    last_text = tokio::time::Instant::now();
                }
                io.write_all(&ping).await?;
                io.flush().await?;
                if per_second > 0 {
                    tokio::time::sleep(Duration::from_secs(1) / per_second).await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
        }
        WsHostile::CloseAfter { messages, code } => {
            for _ in 0..messages {
                io.write_all(&frame(TEXT, STATS.as_bytes())).await?;
            }
            if code > 0 {
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice(b"bye");
                io.write_all(&frame(CLOSE, &payload)).await?;
            }
            io.flush().await?;
            // Let the frames reach the client before the connection goes.
            tokio::time::sleep(Duration::from_millis(50)).await;
            io.shutdown().await
        }
        WsHostile::Unfinished { bytes } => {
            let mut first = header(false, TEXT, bytes);
            let mut payload = br#"{"event_type":"system_stats","data":""#.to_vec();
            payload.resize(bytes.max(payload.len()), b'x');
            payload.truncate(bytes);
            first.extend_from_slice(&payload);
            io.write_all(&first).await?;
            io.write_all(&header(false, CONTINUATION, bytes)).await?;
            io.write_all(&vec![b'x'; bytes.saturating_sub(1)]).await?;
            io.flush().await?;
            // Never finished: the connection stays open until the client goes (what it sends is
            // read only to notice that).
            let mut sink = [0u8; 1024];
            while io.read(&mut sink).await? > 0 {}
            Ok(())
        }
    }
}
