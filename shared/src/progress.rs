//! A connection's write progress: an I/O adapter that notes when the socket last refused bytes
//! it was given and has not taken any since, so a server can tell a client that stopped
//! reading (its socket full) from one that is merely quiet, whatever the protocol above does.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
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
}

impl WriteProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            refused_since: AtomicU64::new(0),
        })
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
}
