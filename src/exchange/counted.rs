//! A stream wrapper that counts the bytes going through it: what a transfer put on the wire, after compression.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stream::ChunkWrite;

/// `inner`, counting every byte written to it or read from it.
pub(crate) struct Counted<'a, T: ?Sized> {
    inner: &'a mut T,
    count: u64,
}

impl<'a, T: ?Sized> Counted<'a, T> {
    pub(crate) fn new(inner: &'a mut T) -> Self {
        Self { inner, count: 0 }
    }

    /// Bytes that went through so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count += n as u64;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: ChunkWrite + ?Sized> ChunkWrite for Counted<'_, T> {
    fn write_chunk(&mut self, bytes: Bytes) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move {
            let n = bytes.len() as u64;
            self.inner.write_chunk(bytes).await?;
            self.count += n;
            Ok(())
        })
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        this.count += (buf.filled().len() - before) as u64;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut w = Counted::new(&mut a);
        w.write_all(b"hello world").await.unwrap();
        assert_eq!(w.count(), 11);
        let mut r = Counted::new(&mut b);
        let mut buf = [0u8; 11];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(r.count(), 11);
    }

    /// A chunk handed over whole is counted as the bytes it holds, and
    /// reaches the writer beneath as it is.
    #[tokio::test]
    async fn counts_chunks_handed_over_whole() {
        let mut out = Vec::new();
        let mut w = Counted::new(&mut out);
        w.write_chunk(Bytes::from_static(b"hello ")).await.unwrap();
        w.write_all(b"wide ").await.unwrap();
        w.write_chunk(Bytes::from_static(b"world")).await.unwrap();
        assert_eq!(w.count(), 16);
        assert_eq!(out, b"hello wide world");
    }
}
