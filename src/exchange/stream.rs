//! The two halves of a bidirectional stream as both sides see them: implemented for quinn's streams, and for in-memory pipes in tests.
//!
//! The server's handlers and the client's transfers are written against
//! these traits, never against quinn's types, so either side runs over
//! [`pipes`] in a unit test exactly as it runs over QUIC.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncWrite};

/// A writer that may keep a chunk handed to it whole instead of copying
/// it: a QUIC stream's own write copies every byte into its send buffer
/// (7% of a server's CPU sending 1 GiB from an object store, 5% of a
/// client's putting one). Any other writer writes the bytes as usual.
pub(crate) trait ChunkWrite: AsyncWrite + Unpin + Send {
    /// Writes all of `bytes`, which the writer may keep as they are.
    fn write_chunk(&mut self, bytes: Bytes) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move { tokio::io::AsyncWriteExt::write_all(self, &bytes).await })
    }
}

/// The half a side writes to (its request, or its answer).
pub(crate) trait SendHalf: ChunkWrite {
    /// Ends what this side sends: the peer reads to its end.
    fn finish(&mut self);
    /// Abandons what this side sends with `code`: the peer sees the
    /// stream reset.
    fn reset(&mut self, code: u32);
    /// Completes once the peer has acknowledged everything sent (or gave
    /// up on it), or after `limit`.
    fn acknowledged(&mut self, limit: Duration) -> BoxFuture<'_, ()>;
}

/// The half a side reads from.
pub(crate) trait RecvHalf: AsyncRead + Unpin + Send {
    /// Tells the peer to send no more; `code` says why.
    fn stop(&mut self, code: u32);
}

// `Self::finish` and the like below name quinn's own methods: a type's
// inherent methods come before its trait methods.
impl SendHalf for quinn::SendStream {
    fn finish(&mut self) {
        let _ = Self::finish(self);
    }

    fn reset(&mut self, code: u32) {
        let _ = Self::reset(self, VarInt::from_u32(code));
    }

    fn acknowledged(&mut self, limit: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(limit, self.stopped()).await;
        })
    }
}

impl ChunkWrite for quinn::SendStream {
    fn write_chunk(&mut self, bytes: Bytes) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move { Self::write_chunk(self, bytes).await.map_err(Into::into) })
    }
}

impl RecvHalf for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = Self::stop(self, VarInt::from_u32(code));
    }
}

impl<T: SendHalf + ?Sized> SendHalf for Box<T> {
    fn finish(&mut self) {
        (**self).finish()
    }

    fn reset(&mut self, code: u32) {
        (**self).reset(code)
    }

    fn acknowledged(&mut self, limit: Duration) -> BoxFuture<'_, ()> {
        (**self).acknowledged(limit)
    }
}

impl<T: ChunkWrite + ?Sized> ChunkWrite for Box<T> {
    fn write_chunk(&mut self, bytes: Bytes) -> BoxFuture<'_, std::io::Result<()>> {
        (**self).write_chunk(bytes)
    }
}

impl<T: RecvHalf + ?Sized> RecvHalf for Box<T> {
    fn stop(&mut self, code: u32) {
        (**self).stop(code)
    }
}

/// Streams over in-memory pipes, for tests of either side or of both.
#[cfg(test)]
pub(crate) mod pipes {
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tokio::io::{DuplexStream, ReadBuf};

    use super::*;

    /// A code a half was closed with, seen from elsewhere.
    pub(crate) type Code = Arc<Mutex<Option<u32>>>;

    /// A writing end: `finish` closes it, `reset` records its code (for
    /// the reading end, and for a test to see) and closes it.
    pub(crate) struct PipeSend {
        pub(crate) inner: Option<DuplexStream>,
        pub(crate) reset: Code,
    }

    /// A reading end: `stop` records its code and closes it. An end whose
    /// writer was reset reads an error after the bytes sent before, as a
    /// QUIC stream does, rather than a clean end.
    pub(crate) struct PipeRecv {
        pub(crate) inner: Option<DuplexStream>,
        pub(crate) stopped: Code,
        pub(crate) peer_reset: Code,
    }

    /// One direction of a stream: its writing and reading ends.
    pub(crate) fn pipe(buffer: usize) -> (PipeSend, PipeRecv) {
        let (w, r) = tokio::io::duplex(buffer);
        let reset = Code::default();
        (
            PipeSend {
                inner: Some(w),
                reset: reset.clone(),
            },
            PipeRecv {
                inner: Some(r),
                stopped: Code::default(),
                peer_reset: reset,
            },
        )
    }

    impl AsyncWrite for PipeSend {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.inner.as_mut() {
                Some(s) => Pin::new(s).poll_write(cx, buf),
                None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.inner.as_mut() {
                Some(s) => Pin::new(s).poll_flush(cx),
                None => Poll::Ready(Ok(())),
            }
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.inner.as_mut() {
                Some(s) => Pin::new(s).poll_shutdown(cx),
                None => Poll::Ready(Ok(())),
            }
        }
    }

    impl ChunkWrite for PipeSend {}

    // The writers tests send into: they take the bytes as any write.
    impl ChunkWrite for Vec<u8> {}
    impl ChunkWrite for DuplexStream {}
    impl ChunkWrite for tokio::io::Sink {}

    impl SendHalf for PipeSend {
        fn finish(&mut self) {
            self.inner = None;
        }

        fn reset(&mut self, code: u32) {
            *self.reset.lock().unwrap() = Some(code);
            self.inner = None;
        }

        fn acknowledged(&mut self, _: Duration) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    impl AsyncRead for PipeRecv {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let polled = match self.inner.as_mut() {
                Some(s) => Pin::new(s).poll_read(cx, buf),
                None => Poll::Ready(Ok(())),
            };
            match polled {
                // The end: clean, unless the writer reset the stream.
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    match *self.peer_reset.lock().unwrap() {
                        Some(code) => Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            format!("stream reset by peer: error {code}"),
                        ))),
                        None => Poll::Ready(Ok(())),
                    }
                }
                other => other,
            }
        }
    }

    impl RecvHalf for PipeRecv {
        fn stop(&mut self, code: u32) {
            *self.stopped.lock().unwrap() = Some(code);
            self.inner = None;
        }
    }
}
