//! CML's event stream, `/ws/ui` (2.6+): opening it for a worker as CML's own web UI does (the
//! worker's token in the first message), with the REST client's TLS settings, never following a
//! redirect, and with bounds on what a server can make us hold; then reading its messages.

use std::{sync::Arc, time::Duration};

use futures::{SinkExt, StreamExt};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
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
const STREAM_READ_BUFFER: usize = 8 * 1024;

/// Bounds of one event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// Largest message (and frame) accepted; a larger one ends the stream.
    pub max_message_bytes: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
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
    /// Nothing came for longer than the silence allowed (a real server sends stats every few
    /// seconds: a silent socket is a dead one).
    Silent,
    /// A message or frame past [`EventLimits::max_message_bytes`].
    TooLarge,
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
            StreamEnd::Dropped(_) => "dropped",
        }
    }
}

/// What a stream's socket is: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open, authenticated event stream of one worker.
pub struct EventStream {
    ws: WebSocketStream<Box<dyn Io>>,
    /// The token it was opened with (to forget it when the server refuses it).
    token: String,
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

    /// The next text message, or why the stream ended when nothing comes within `silence`.
    pub async fn next(&mut self, silence: Duration) -> std::result::Result<String, StreamEnd> {
        loop {
            let frame = tokio::time::timeout(silence, self.ws.next())
                .await
                .map_err(|_| StreamEnd::Silent)?;
            match frame {
                Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
                Some(Ok(Message::Binary(bytes))) => {
                    return Ok(String::from_utf8_lossy(&bytes).into_owned())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
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
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect((host.as_str(), port)))
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
        // A daemon holds a stream per worker (a thousand or more): small buffers (messages are
        // a few hundred bytes; a larger one is read in more steps), writes flushed at once.
        let config = WebSocketConfig::default()
            .read_buffer_size(STREAM_READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(limits.max_message_bytes))
            .max_frame_size(Some(limits.max_message_bytes));
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), io, Some(config))
                .await
                .map_err(|e| upgrade_error(target, e))?;
        let hello = serde_json::json!({
            "token": token,
            "client_uuid": uuid_v4(),
        });
        ws.send(Message::text(hello.to_string()))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(ws)
    };
    let ws = tokio::time::timeout(timeout, opening)
        .await
        .map_err(|_| Error::Timeout {
            worker: target.worker_id.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })??;
    Ok(EventStream { ws, token })
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
