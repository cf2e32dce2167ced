//! A plain TCP client connection's socket: reads and writes as the stream's
//! own, except that a slice of a filed list (see [`kache_cache::filed`]) is
//! sent with `sendfile` from its memory file instead of copied from memory.
//!
//! hyper's HTTP/1 writer hands the socket its queued slices in one
//! vectored write: the response head and the body's chunks. The slices
//! before a filed one are written as they are; a filed slice at the front
//! is sent from its file; the writer comes back for the rest, as after any
//! partial write.
//!
//! While a file is being sent the socket is corked (`TCP_CORK`, as nginx's
//! `tcp_nopush`), and uncorked when the writer flushes, once everything it
//! queued is written: every segment goes out full. Without it each
//! `sendfile` call ended with a push of a part segment; with a 426 MB list
//! over loopback, corking took kache's CPU per answer from 163–190 ms to
//! 142–149 ms and the receiving client's from 128–143 ms to 104–108 ms.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use kache_cache::filed::FiledSlice;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A client's TCP stream that sends filed slices with `sendfile`.
#[derive(Debug)]
pub struct Socket {
    stream: TcpStream,
    /// `TCP_CORK` is set: a file is being sent.
    corked: bool,
}

impl Socket {
    pub fn new(stream: TcpStream) -> Socket {
        Socket {
            stream,
            corked: false,
        }
    }

    /// Sets or clears `TCP_CORK`. A failure costs only part segments.
    fn cork(&mut self, cork: bool) {
        if self.corked != cork {
            if let Err(error) = socket2::SockRef::from(&self.stream).set_tcp_cork(cork) {
                tracing::debug!(%error, cork, "TCP_CORK");
            }
            self.corked = cork;
        }
    }

    /// Sends `slice`, which lies in a filed list, once the socket can take
    /// some of it: how much it took.
    fn poll_send_filed(&mut self, cx: &mut Context<'_>, slice: &FiledSlice) -> Poll<io::Result<usize>> {
        self.cork(true);
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self
                .stream
                .try_io(Interest::WRITABLE, || slice.send(self.stream.as_fd()));
            match sent {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(filed) = FiledSlice::find(buf) {
            return this.poll_send_filed(cx, &filed);
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first_filed = bufs
            .iter()
            .enumerate()
            .find_map(|(at, buf)| FiledSlice::find(buf).map(|filed| (at, filed)));
        match first_filed {
            Some((0, filed)) => this.poll_send_filed(cx, &filed),
            Some((first, _)) => Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[..first]),
            None => Pin::new(&mut this.stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.cork(false);
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.cork(false);
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn filed_and_heap_slices_arrive_in_order() {
        let parts: Vec<Bytes> = (0..20_000)
            .map(|i| Bytes::from(format!("{{\"n\":{i}}},")))
            .collect();
        let len = parts.iter().map(Bytes::len).sum();
        let filed = kache_cache::filed::file(&parts, len).expect("memfd");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"));
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let mut socket = Socket::new(accepted.expect("accept").0);
        let mut client = client.expect("connect");
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.expect("read");
            out
        });
        let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n");
        let tail = Bytes::from_static(b"]}\n");
        let slices = [
            head.clone(),
            filed.slice(..1000),
            filed.slice(1000..),
            tail.clone(),
        ];
        let mut expected = Vec::new();
        for slice in &slices {
            expected.extend_from_slice(slice);
        }
        // A vectored write at a time, advanced like hyper's queue.
        let mut at = 0;
        let mut offset = 0;
        while at < slices.len() {
            let iov: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&slices[at][offset..]))
                .chain(slices[at + 1..].iter().map(|s| IoSlice::new(s)))
                .collect();
            let mut n = std::future::poll_fn(|cx| Pin::new(&mut socket).poll_write_vectored(cx, &iov))
                .await
                .expect("write");
            while n > 0 {
                let left = slices[at].len() - offset;
                if n >= left {
                    n -= left;
                    at += 1;
                    offset = 0;
                } else {
                    offset += n;
                    n = 0;
                }
            }
        }
        assert!(socket.corked, "corked while a file is sent");
        socket.flush().await.expect("flush");
        assert!(!socket.corked);
        let cork = socket2::SockRef::from(&socket.stream)
            .tcp_cork()
            .expect("TCP_CORK");
        assert!(!cork, "uncorked once flushed");
        socket.shutdown().await.expect("shutdown");
        assert_eq!(reader.await.expect("reader"), expected);
    }
}
