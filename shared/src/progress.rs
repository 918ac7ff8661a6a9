//! A connection's write progress, so a server can tell a client that stopped reading from one
//! that is merely quiet, whatever the protocol above does: an I/O adapter notes when the socket
//! last refused bytes it was given (its send buffer full), and the kernel tells how long the
//! peer has acknowledged none of the bytes sent to it (a client that stopped reading closes
//! its window: what was sent waits in the send buffer, unacknowledged, however little it is).
// One getsockopt(TCP_INFO) on a socket this process owns, read into a zeroed struct.
#![allow(unsafe_code)]

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicI32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether writes to one socket are held up, and since when.
#[derive(Debug)]
pub struct WriteProgress {
    base: Instant,
    /// Milliseconds after `base`, plus one, since which writes have been refused; 0 while the
    /// socket takes what it is given.
    refused_since: AtomicU64,
    /// The socket, while the connection lives (-1: none, or gone).
    fd: AtomicI32,
    /// The peer's acknowledgements as last seen.
    peer: Mutex<Peer>,
}

/// What the peer had acknowledged when last looked at, and since when nothing more (while
/// bytes wait for it).
#[derive(Debug, Default)]
struct Peer {
    acked: u64,
    silent_since: Option<Instant>,
}

impl WriteProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            refused_since: AtomicU64::new(0),
            fd: AtomicI32::new(-1),
            peer: Mutex::default(),
        })
    }

    /// Watches the TCP socket `fd` for acknowledgements too (see [`Self::stalled_for`]).
    pub fn watch_socket(&self, fd: std::os::fd::RawFd) {
        self.fd.store(fd, Ordering::SeqCst);
    }

    /// How long the client has taken nothing: the socket refused bytes for that long, or (on
    /// Linux, for a watched socket) bytes have waited for the peer that long without it
    /// acknowledging any. Zero while it takes what it is sent, or nothing waits for it.
    /// Meant to be asked now and then (each time reads the socket's state).
    pub fn stalled_for(&self) -> Duration {
        self.refused_for().max(self.peer_silent_for())
    }

    fn peer_silent_for(&self) -> Duration {
        let Some((acked, waiting)) = tcp_progress(self.fd.load(Ordering::SeqCst)) else {
            return Duration::ZERO;
        };
        let mut peer = self.peer.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if !waiting {
            peer.silent_since = None;
        } else if acked != peer.acked || peer.silent_since.is_none() {
            peer.silent_since = Some(now);
        }
        peer.acked = acked;
        peer.silent_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    /// How long the socket has refused bytes without taking any since: zero while it takes
    /// them, or has nothing to take.
    pub fn refused_for(&self) -> Duration {
        match self.refused_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .base
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        }
    }

    fn note(&self, took: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &took {
            Poll::Ready(Ok(n)) if *n > 0 => self.refused_since.store(0, Ordering::Relaxed),
            Poll::Pending => {
                let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
                // Only the first refusal counts: later ones do not move it forward.
                let _ = self.refused_since.compare_exchange(
                    0,
                    now + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            _ => {}
        }
        took
    }
}

/// `io`, its writes noted in a [`WriteProgress`].
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    progress: Arc<WriteProgress>,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO, progress: Arc<WriteProgress>) -> Self {
        Self { io, progress }
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        // The socket closes with `io`: its number may be another's from now on.
        self.progress.fd.store(-1, Ordering::SeqCst);
    }
}

/// The bytes the peer of TCP socket `fd` has acknowledged so far, and whether bytes wait for
/// it (sent and unacknowledged, or not sent yet).
#[cfg(target_os = "linux")]
fn tcp_progress(fd: std::os::fd::RawFd) -> Option<(u64, bool)> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `tcp_info` is plain data; the kernel writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: a valid pointer to `info` and its length; a closed or foreign fd only fails.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    // Kernels before 4.6 fill less of it (no byte counts): nothing to judge by.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
    if rc != 0 || (len as usize) < needed {
        return None;
    }
    Some((
        info.tcpi_bytes_acked,
        info.tcpi_unacked > 0 || info.tcpi_notsent_bytes > 0,
    ))
}

#[cfg(not(target_os = "linux"))]
fn tcp_progress(_fd: i32) -> Option<(u64, bool)> {
    None
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let took = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress.note(took)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let took = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress.note(took)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_socket_that_stops_taking_bytes_is_noted_until_it_takes_some() {
        // A pipe of 64 bytes whose reader does not read: the writer fills it, then waits.
        let (client, mut server) = tokio::io::duplex(64);
        let progress = WriteProgress::new();
        let mut tracked = Tracked::new(client, progress.clone());
        tracked.write_all(&[1; 64]).await.expect("fits");
        assert_eq!(progress.refused_for(), Duration::ZERO, "it took everything");
        let blocked = tokio::time::timeout(Duration::from_millis(50), tracked.write_all(&[2; 8]));
        assert!(blocked.await.is_err(), "full: the write waits");
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(progress.refused_for() >= Duration::from_millis(60));
        let mut buf = [0; 64];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut buf)
            .await
            .expect("read");
        tracked.write_all(&[3; 8]).await.expect("room again");
        assert_eq!(progress.refused_for(), Duration::ZERO);
    }

    /// A TCP client that stops reading: once its receive window closes, what is sent waits
    /// unacknowledged, and the silence is seen though few bytes wait; reading ends it.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_peer_that_acknowledges_nothing_is_seen_through_the_socket() {
        use std::os::fd::AsRawFd;
        use tokio::io::AsyncReadExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("small window");
        let connect = socket.connect(listener.local_addr().expect("addr"));
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (mut client, (server, _)) = (client.expect("connect"), accepted.expect("accept"));
        let progress = WriteProgress::new();
        progress.watch_socket(server.as_raw_fd());
        let mut tracked = Tracked::new(server, progress.clone());
        tracked.write_all(b"hello").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(progress.stalled_for(), Duration::ZERO, "acknowledged");
        // Far more than the client's window: the rest waits in our send buffer.
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            tracked.write_all(&vec![0; 4 << 20]),
        )
        .await;
        progress.stalled_for();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            progress.stalled_for() >= Duration::from_millis(250),
            "{:?}",
            progress.stalled_for()
        );
        let mut buf = vec![0; 1 << 16];
        let read = client.read(&mut buf).await.expect("read");
        assert!(read > 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The peer acknowledges again (the writer's next write would clear the refusal).
        let after = progress.peer_silent_for();
        assert!(after < Duration::from_millis(250), "{after:?}");
    }
}
