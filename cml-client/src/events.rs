//! CML's event stream, `/ws/ui` (2.6+): opening it for a worker as CML's own web UI does (the
//! worker's token in the first message), with the REST client's TLS settings, never following a
//! redirect, and with bounds on what a server can make us hold; then reading its messages.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
    sync::Notify,
    time::Instant,
};
use tokio_tungstenite::{
    tungstenite::{self, protocol::WebSocketConfig, Message},
    WebSocketStream,
};
use url::Url;

use crate::{payload::clip, CmlTarget, Error, Result};

/// The close code CML ends a stream with when its token is missing, bad or expired.
pub const UNAUTHORIZED: u16 = 3000;

/// Bytes each stream reads at a time.
pub const STREAM_READ_BUFFER: usize = 8 * 1024;

/// Most bytes of our own frames (the authentication message, pongs, the close) a stream
/// queues for a server that does not read them; past it a newer pong replaces the queued one.
const MAX_WRITE_BUFFER: usize = 16 * 1024;

/// The kernel's send buffer asked for each stream's socket: we send a few hundred bytes per
/// stream, so a server that stops reading shows as stalled within seconds, not megabytes.
const SOCKET_SEND_BUFFER: u32 = 16 * 1024;

/// Bounds of one event stream.
#[derive(Debug, Clone)]
pub struct EventLimits {
    /// Largest message accepted, and the most a stream may hold of what it has read and not
    /// yet handed over (a message being assembled and the frame being read, together), plus
    /// one read ([`STREAM_READ_BUFFER`]); more ends the stream as [`StreamEnd::TooLarge`].
    pub max_message_bytes: usize,
    /// Frames a second a server may send, control frames (pings, pongs) included; more ends
    /// the stream as [`StreamEnd::Flooded`].
    pub max_frames_per_second: usize,
    /// What all the streams sharing it may hold together.
    pub budget: StreamBudget,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_frames_per_second: 500,
            budget: StreamBudget::new(64 << 20),
        }
    }
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Closed with 3000: the token was refused or has expired.
    Unauthorized,
    /// Closed by the server with another code.
    Closed { code: u16, reason: String },
    /// No text message came for longer than the silence allowed (a real server sends stats
    /// every few seconds: a socket that only pings is as dead as a silent one).
    Silent,
    /// A message, or what the stream held, past [`EventLimits::max_message_bytes`].
    TooLarge,
    /// The streams together held more than their [`StreamBudget`], and this one held the most.
    OverBudget,
    /// More frames a second than [`EventLimits::max_frames_per_second`].
    Flooded,
    /// The server took none of our frames (pongs) for longer than the silence allowed.
    Stalled,
    /// The connection broke (reset, ended without a close frame, a protocol error).
    Dropped(String),
}

impl StreamEnd {
    /// A fixed label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            StreamEnd::Unauthorized => "unauthorized",
            StreamEnd::Closed { .. } => "closed",
            StreamEnd::Silent => "silent",
            StreamEnd::TooLarge => "too_large",
            StreamEnd::OverBudget => "over_budget",
            StreamEnd::Flooded => "flooded",
            StreamEnd::Stalled => "stalled",
            StreamEnd::Dropped(_) => "dropped",
        }
    }
}

/// What many streams may hold together of what they have read and not handed over: past it,
/// the stream holding the most is ended ([`StreamEnd::OverBudget`]), then the next, until the
/// rest fit. Cheap to clone (shared).
#[derive(Clone)]
pub struct StreamBudget(Arc<Budget>);

struct Budget {
    limit: usize,
    total: AtomicUsize,
    next_id: AtomicU64,
    streams: Mutex<HashMap<u64, Arc<Held>>>,
}

impl std::fmt::Debug for StreamBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBudget")
            .field("limit", &self.0.limit)
            .field("held", &self.held())
            .finish()
    }
}

impl StreamBudget {
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Budget {
            limit,
            total: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            streams: Mutex::new(HashMap::new()),
        }))
    }

    /// Bytes the streams hold now.
    pub fn held(&self) -> usize {
        self.0.total.load(Ordering::Relaxed)
    }

    fn register(&self, per_stream: usize) -> Holding {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let held = Arc::new(Held::default());
        self.streams().insert(id, held.clone());
        Holding {
            budget: self.clone(),
            id,
            per_stream,
            held,
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Held>>> {
        self.0.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Over the limit: ends the streams holding the most (not ended yet) until the rest fit.
    fn evict(&self) {
        let streams = self.streams();
        let mut held: Vec<&Arc<Held>> = streams
            .values()
            .filter(|h| !h.over.load(Ordering::Relaxed))
            .collect();
        let mut total: usize = held.iter().map(|h| h.bytes.load(Ordering::Relaxed)).sum();
        held.sort_by_key(|h| std::cmp::Reverse(h.bytes.load(Ordering::Relaxed)));
        for h in held {
            if total <= self.0.limit {
                break;
            }
            total -= h.bytes.load(Ordering::Relaxed);
            h.over_budget.store(true, Ordering::Relaxed);
            h.over.store(true, Ordering::Relaxed);
            h.ended.notify_one();
        }
    }
}

/// What one stream holds, and whether it must end for it.
#[derive(Debug, Default)]
struct Held {
    bytes: AtomicUsize,
    /// Past a bound: the stream ends.
    over: AtomicBool,
    /// Ended by the budget rather than by its own bound.
    over_budget: AtomicBool,
    ended: Notify,
}

/// One stream's part of a [`StreamBudget`], given back when it is dropped.
struct Holding {
    budget: StreamBudget,
    id: u64,
    per_stream: usize,
    held: Arc<Held>,
}

impl Holding {
    /// `n` more bytes read. False when the stream must end for it.
    fn add(&self, n: usize) -> bool {
        let mine = self.held.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let total = self.budget.0.total.fetch_add(n, Ordering::Relaxed) + n;
        if mine > self.per_stream {
            self.held.over.store(true, Ordering::Relaxed);
        } else if total > self.budget.0.limit {
            self.budget.evict();
        }
        !self.held.over.load(Ordering::Relaxed)
    }

    /// A message was handed over: what led to it is no longer held.
    fn release(&self) {
        let n = self.held.bytes.swap(0, Ordering::Relaxed);
        self.budget.0.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// A control frame of `payload` bytes was read (perhaps in the middle of a message): its
    /// own bytes are no longer held.
    fn release_control(&self, payload: usize) {
        // A server's control frame: a 2-byte header (payloads are at most 125 bytes).
        let n = payload + 2;
        let took = self
            .held
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            })
            .map_or(0, |b| b.min(n));
        self.budget.0.total.fetch_sub(took, Ordering::Relaxed);
    }

    /// Why the stream must end, if it must.
    fn end(&self) -> Option<StreamEnd> {
        if !self.held.over.load(Ordering::Relaxed) {
            None
        } else if self.held.over_budget.load(Ordering::Relaxed) {
            Some(StreamEnd::OverBudget)
        } else {
            Some(StreamEnd::TooLarge)
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.release();
        self.budget.streams().remove(&self.id);
    }
}

/// What a stream's socket is: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A stream's socket, counting what the server makes us hold and noticing when it stops
/// taking our bytes.
struct Counted {
    io: Box<dyn Io>,
    holding: Holding,
    /// Since when our writes have been refused (the server's receive window is shut).
    blocked_since: Option<Instant>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            if !self.holding.add(n) {
                return Poll::Ready(Err(io::Error::other("the stream holds too much")));
            }
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        match polled {
            Poll::Pending => self.note_refused(),
            Poll::Ready(Ok(n)) if n > 0 => self.blocked_since = None,
            Poll::Ready(_) => {}
        }
        polled
    }

    /// A flush that cannot finish is a refusal; one that does proves nothing (a TCP flush
    /// always does), so only a write taken clears the refusal.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        if polled.is_pending() {
            self.note_refused();
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Counted {
    fn note_refused(&mut self) {
        self.blocked_since.get_or_insert_with(Instant::now);
    }
}

/// An open, authenticated event stream of one worker.
pub struct EventStream {
    ws: WebSocketStream<Counted>,
    /// The token it was opened with (to forget it when the server refuses it).
    token: String,
    max_frames_per_second: usize,
    /// Frames since the start of the current one-second window.
    window: (Instant, usize),
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// The token the stream was opened with.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The next text message, or why the stream ended. Silence is measured on text messages
    /// only: pings and pongs neither count as life nor restart the wait of `silence`, which
    /// also bounds how long the server may refuse our frames.
    pub async fn next(&mut self, silence: Duration) -> std::result::Result<String, StreamEnd> {
        let deadline = Instant::now() + silence;
        loop {
            let held = self.ws.get_ref().holding.held.clone();
            let frame = tokio::select! {
                () = held.ended.notified() => None,
                frame = tokio::time::timeout_at(deadline, self.ws.next()) => Some(frame),
            };
            let counted = self.ws.get_ref();
            if let Some(end) = counted.holding.end() {
                return Err(end);
            }
            let Some(frame) = frame else { continue };
            // Refused for as long as silence is allowed: stalled, whether or not it still
            // sends (a server that cannot take our frames often cannot send either).
            if counted
                .blocked_since
                .is_some_and(|since| since.elapsed() >= silence)
            {
                return Err(StreamEnd::Stalled);
            }
            let frame = frame.map_err(|_| StreamEnd::Silent)?;
            if matches!(&frame, Some(Ok(m)) if !m.is_close()) {
                let now = Instant::now();
                if now.duration_since(self.window.0) >= Duration::from_secs(1) {
                    self.window = (now, 0);
                }
                self.window.1 += 1;
                if self.window.1 > self.max_frames_per_second {
                    return Err(StreamEnd::Flooded);
                }
            }
            match frame {
                Some(Ok(Message::Text(text))) => {
                    self.ws.get_ref().holding.release();
                    return Ok(text.to_string());
                }
                Some(Ok(Message::Binary(bytes))) => {
                    self.ws.get_ref().holding.release();
                    return Ok(String::from_utf8_lossy(&bytes).into_owned());
                }
                Some(Ok(Message::Ping(p) | Message::Pong(p))) => {
                    self.ws.get_ref().holding.release_control(p.len());
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    return Err(match frame {
                        Some(f) if u16::from(f.code) == UNAUTHORIZED => StreamEnd::Unauthorized,
                        Some(f) => StreamEnd::Closed {
                            code: u16::from(f.code),
                            reason: clip(&f.reason),
                        },
                        None => StreamEnd::Closed {
                            code: 1005,
                            reason: String::new(),
                        },
                    })
                }
                Some(Err(tungstenite::Error::Capacity(_))) => return Err(StreamEnd::TooLarge),
                Some(Err(e)) => return Err(StreamEnd::Dropped(clip(&e.to_string()))),
                None => return Err(StreamEnd::Dropped("the connection ended".into())),
            }
        }
    }

    /// Closes the stream politely (bounded by `within`).
    pub async fn close(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, self.ws.close(None)).await;
    }
}

/// `ws(s)://<host>/<path prefix>/ws/ui` of a worker endpoint (the prefix is kept as CML's root).
pub fn events_url(endpoint: &str) -> std::result::Result<Url, String> {
    let mut url = Url::parse(endpoint.trim()).map_err(|e| e.to_string())?;
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => return Err(format!("scheme `{other}` is not http or https")),
    };
    url.set_scheme(scheme)
        .map_err(|()| "cannot use a WebSocket scheme".to_owned())?;
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    url.set_query(None);
    url.join("ws/ui").map_err(|e| e.to_string())
}

/// The TLS settings of the REST client, for the stream: the platform's roots and
/// `cml.ca_bundle`, or no verification at all with `cml.verify_tls = false`.
pub(crate) fn tls_config(verify: bool, ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::HttpClient(format!("TLS: {e}")))?;
    let config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| Error::HttpClient(format!("cml.ca_bundle: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::HttpClient(format!("cml.ca_bundle: {e}")))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Accepts any certificate (`cml.verify_tls = false`); signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How an upgrade was answered, as the client's error.
fn upgrade_error(target: &CmlTarget, e: tungstenite::Error) -> Error {
    let worker = target.worker_id.clone();
    match e {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get("location")
                    .map(|l| clip(&String::from_utf8_lossy(l.as_bytes())))
                    .unwrap_or_default();
                return Error::Redirect {
                    worker,
                    path: "ws/ui".into(),
                    status: status.as_u16(),
                    location,
                };
            }
            let body = response.body().as_deref().unwrap_or_default();
            Error::Status {
                worker,
                path: "ws/ui".into(),
                status: status.as_u16(),
                description: clip(&String::from_utf8_lossy(body)),
            }
        }
        other => Error::Unreachable {
            worker,
            detail: clip(&other.to_string()),
        },
    }
}

/// Opens `url` over TCP (and TLS for `wss`), upgrades it and sends the authentication
/// message; every step within `timeout`.
pub(crate) async fn open(
    target: &CmlTarget,
    tls: &Arc<rustls::ClientConfig>,
    limits: EventLimits,
    connect_timeout: Duration,
    timeout: Duration,
    token: String,
) -> Result<EventStream> {
    let url = events_url(&target.endpoint).map_err(|detail| Error::Endpoint {
        worker: target.worker_id.clone(),
        endpoint: target.endpoint.clone(),
        detail,
    })?;
    let unreachable = |detail: String| Error::Unreachable {
        worker: target.worker_id.clone(),
        detail: clip(&detail),
    };
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let tcp = tokio::time::timeout(connect_timeout, connect(&host, port))
        .await
        .map_err(|_| unreachable(format!("no connection within {connect_timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let opening = async {
        let io: Box<dyn Io> = if url.scheme() == "wss" {
            let name =
                ServerName::try_from(host.clone()).map_err(|e| unreachable(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        upgrade(io, &url, &limits, &token)
            .await
            .map_err(|e| upgrade_error(target, e))
    };
    let ws = tokio::time::timeout(timeout, opening)
        .await
        .map_err(|_| Error::Timeout {
            worker: target.worker_id.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })??;
    Ok(EventStream {
        ws,
        token,
        max_frames_per_second: limits.max_frames_per_second,
        window: (Instant::now(), 0),
    })
}

/// Upgrades a connected `io` to the stream at `url` and authenticates it with `token`,
/// counting from the first byte what the server makes it hold.
async fn upgrade(
    io: Box<dyn Io>,
    url: &Url,
    limits: &EventLimits,
    token: &str,
) -> std::result::Result<WebSocketStream<Counted>, tungstenite::Error> {
    let io = Counted {
        io,
        holding: limits
            .budget
            .register(limits.max_message_bytes + STREAM_READ_BUFFER),
        blocked_since: None,
    };
    // A daemon holds a stream per worker (a thousand or more): small buffers (messages are a
    // few hundred bytes; a larger one is read in more steps), writes flushed at once and
    // bounded (a server that never reads cannot make our pongs pile up).
    let config = WebSocketConfig::default()
        .read_buffer_size(STREAM_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes));
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url.as_str(), io, Some(config)).await?;
    let hello = serde_json::json!({
        "token": token,
        "client_uuid": uuid_v4(),
    });
    ws.send(Message::text(hello.to_string())).await?;
    Ok(ws)
}

/// A TCP connection to the first of `host`'s addresses that answers, with a small send buffer.
async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let _ = socket.set_send_buffer_size(SOCKET_SEND_BUFFER);
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A random version-4 UUID, as CML's clients name themselves.
fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    // Randomness from the TLS provider's secure RNG; a fixed id would still work.
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use cml_sim::{hostile, WsHostile};

    /// A stream over an in-memory pipe of `window` bytes each way to a hostile server.
    async fn over_pipe(window: usize, how: WsHostile, limits: &EventLimits) -> EventStream {
        let (ours, theirs) = tokio::io::duplex(window);
        tokio::spawn(hostile::serve(theirs, how));
        let url = Url::parse("ws://cml.test/ws/ui").expect("url");
        let ws = upgrade(Box::new(ours), &url, limits, "token")
            .await
            .expect("upgraded");
        EventStream {
            ws,
            token: "token".into(),
            max_frames_per_second: limits.max_frames_per_second,
            window: (Instant::now(), 0),
        }
    }

    /// A server that pings and sends text but never takes our pongs: once its window (4 KiB)
    /// and our write buffer are full, the stream holds no more and ends as stalled, though
    /// its text still comes.
    #[tokio::test]
    async fn a_server_that_takes_none_of_our_frames_stalls_the_stream_and_holds_little() {
        let limits = EventLimits::default();
        let how = WsHostile::Pings {
            per_second: 200,
            text_every_ms: 20,
        };
        let mut s = over_pipe(4096, how, &limits).await;
        let mut texts = 0;
        let end = loop {
            match s.next(Duration::from_secs(2)).await {
                Ok(_) => texts += 1,
                Err(end) => break end,
            }
        };
        assert_eq!(end, StreamEnd::Stalled, "after {texts} messages");
        assert!(texts > 0);
        assert!(
            limits.budget.held() <= STREAM_READ_BUFFER,
            "{:?}",
            limits.budget
        );

        // The same server with a window it never fills goes on.
        let mut s = over_pipe(1 << 20, how, &limits).await;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            s.next(Duration::from_secs(2)).await.expect("not stalled");
        }
    }

    #[test]
    fn stream_urls_keep_the_endpoint_s_path_as_cml_s_root() {
        let u = |e: &str| events_url(e).expect("valid").to_string();
        assert_eq!(u("https://10.0.0.5"), "wss://10.0.0.5/ws/ui");
        assert_eq!(u("http://127.0.0.1:8000/"), "ws://127.0.0.1:8000/ws/ui");
        assert_eq!(
            u("https://proxy.example/cml-7"),
            "wss://proxy.example/cml-7/ws/ui"
        );
        assert_eq!(
            u("https://proxy.example/w/abc/?x=1"),
            "wss://proxy.example/w/abc/ws/ui"
        );
        assert!(events_url("ftp://h").is_err());
        assert!(events_url("not a url").is_err());
    }

    /// The stream checks the server's certificate as the REST client does: unknown issuer
    /// refused, the CA bundle trusted, nothing checked with `verify_tls = false`.
    #[tokio::test]
    async fn the_stream_s_tls_is_the_rest_client_s() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = cml_sim::ServeOptions {
            tls: true,
            state_dir: Some(dir.path().to_owned()),
            ..cml_sim::ServeOptions::default()
        };
        let cfg = cml_sim::FleetConfig {
            workers: 1,
            labs_per_worker: 1,
            personalities: vec![cml_sim::Personality::V2_9],
            ..cml_sim::FleetConfig::default()
        };
        let f = cml_sim::start(&cfg, &opts).await.expect("simulator");
        let id = f.fleet.workers[0].id.clone();
        let target = CmlTarget {
            endpoint: f.endpoint(&id).to_owned(),
            worker_id: id,
        };
        let ca = f.ca_pem.clone().expect("CA");
        let second = Duration::from_secs(2);
        let open_with = |tls: Arc<rustls::ClientConfig>| {
            let target = target.clone();
            async move {
                open(
                    &target,
                    &tls,
                    EventLimits::default(),
                    second,
                    second,
                    "t".into(),
                )
                .await
            }
        };
        let strict = open_with(tls_config(true, b"").expect("config")).await;
        assert!(
            matches!(&strict, Err(Error::Unreachable { detail, .. }) if detail.contains("TLS")),
            "{strict:?}"
        );
        for tls in [
            tls_config(true, ca.as_bytes()).expect("config"),
            tls_config(false, b"").expect("config"),
        ] {
            let mut s = open_with(tls).await.expect("TLS accepted");
            // The made-up token is refused: the stream got that far.
            assert_eq!(s.next(second * 5).await, Err(StreamEnd::Unauthorized));
        }
        assert!(tls_config(
            true,
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
        )
        .is_err());
    }

    #[test]
    fn client_ids_are_version_4_uuids() {
        let (a, b) = (uuid_v4(), uuid_v4());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
