//! What a client that connects but misbehaves can make lab-api hold, on real sockets: idle and
//! slow connections are closed, header bytes are capped, and connections past the cap wait to
//! be accepted. (The daemon's admin port serves through the same code.)

use std::time::Duration;

use lab_api::app::App;
use shared::{
    config::{AuthMode, Config},
    duration::HumanDuration,
    secret::Secret,
};
use testkit::TestDb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

/// How long the tests wait for something that must happen (far past every limit set below).
const WAIT: Duration = Duration::from_secs(15);

struct Served {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    _db: TestDb,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(test: &str, tune: impl FnOnce(&mut Config)) -> Served {
    let db = TestDb::new(test).await;
    let mut config = Config::default();
    config.mongodb.uri = Secret::new(db.uri.clone());
    config.mongodb.database = db.name().to_owned();
    config.api.listen = "127.0.0.1:0".into();
    config.api.auth.mode = AuthMode::None;
    tune(&mut config);
    let app = App::build(&config).await.expect("builds");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run(stop.clone()));
    Served {
        addr,
        stop,
        _db: db,
    }
}

/// Reads until the server closes the connection (or resets it); the bytes it sent.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {WAIT:?}"),
        }
    }
}

const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let s = serve("limits_idle", |c| {
        c.api.header_read_timeout = HumanDuration(Duration::from_millis(300));
    })
    .await;
    let mut silent = TcpStream::connect(s.addr).await.expect("connects");
    until_closed(&mut silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trickling_in_are_cut_off_at_the_header_timeout() {
    let s = serve("limits_trickle", |c| {
        c.api.header_read_timeout = HumanDuration(Duration::from_millis(300));
    })
    .await;
    let mut slow = TcpStream::connect(s.addr).await.expect("connects");
    slow.write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("writes");
    // One header byte every 50 ms, forever: the server must hang up, whatever arrives.
    let trickle = async {
        loop {
            if slow.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, trickle)
        .await
        .expect("the server closed the trickling connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_past_the_byte_cap_are_refused() {
    let s = serve("limits_headers", |c| c.api.max_header_bytes = 8192).await;
    let mut big = TcpStream::connect(s.addr).await.expect("connects");
    let filler = "a".repeat(20_000);
    let request = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
    let _ = big.write_all(request.as_bytes()).await;
    let answer = String::from_utf8_lossy(&until_closed(&mut big).await).into_owned();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    // A request within the cap is served.
    let mut fine = TcpStream::connect(s.addr).await.expect("connects");
    fine.write_all(GET).await.expect("writes");
    let mut buf = [0u8; 12];
    fine.read_exact(&mut buf).await.expect("an answer");
    assert_eq!(&buf, b"HTTP/1.1 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_left_idle_is_closed() {
    let s = serve("limits_keepalive", |c| {
        c.api.header_read_timeout = HumanDuration(Duration::from_secs(60));
        c.api.idle_timeout = HumanDuration(Duration::from_secs(1));
    })
    .await;
    let mut conn = TcpStream::connect(s.addr).await.expect("connects");
    conn.write_all(GET).await.expect("writes");
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).await.expect("an answer");
    // Served, then left idle: closed by the idle timeout, long before the header timeout.
    until_closed(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let s = serve("limits_connections", |c| {
        c.api.max_connections = 2;
        c.api.header_read_timeout = HumanDuration(Duration::from_secs(60));
        c.api.idle_timeout = HumanDuration(Duration::from_secs(60));
    })
    .await;
    // Two connections hold both slots (each served once, then kept alive).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(s.addr).await.expect("connects");
        c.write_all(GET).await.expect("writes");
        let mut buf = [0u8; 12];
        c.read_exact(&mut buf).await.expect("an answer");
        held.push(c);
    }
    // A third gets through the kernel's queue but is not served while both slots are taken.
    let mut third = TcpStream::connect(s.addr).await.expect("queued");
    third.write_all(GET).await.expect("writes");
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served past the cap of 2 connections");
    // One closes: the third is accepted and answered.
    drop(held.pop());
    tokio::time::timeout(WAIT, third.read_exact(&mut buf))
        .await
        .expect("served once a slot freed")
        .expect("reads");
    assert_eq!(&buf, b"HTTP/1.1 200");
}
