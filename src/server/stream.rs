//! The two halves of a request's stream as the handlers see them: implemented for quinn's streams, and for in-memory pipes in the unit tests.

use std::future::Future;
use std::time::Duration;

use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where a handler writes its answer.
pub(crate) trait ReplyStream: AsyncWrite + Unpin + Send {
    /// Ends the answer: the client reads to its end.
    fn finish(&mut self);
    /// Abandons the answer with `code`: the client sees the stream reset.
    fn reset(&mut self, code: u32);
    /// Completes once the client has acknowledged everything sent (or gave
    /// up on it), or after `limit`.
    fn acknowledged(&mut self, limit: Duration) -> impl Future<Output = ()> + Send;
}

/// Where a handler reads the client's request and data from.
pub(crate) trait RequestStream: AsyncRead + Unpin + Send {
    /// Tells the client to send no more; `code` says why.
    fn stop(&mut self, code: u32);
}

// `Self::finish` and the like below name quinn's own methods: a type's
// inherent methods come before its trait methods.
impl ReplyStream for quinn::SendStream {
    fn finish(&mut self) {
        let _ = Self::finish(self);
    }

    fn reset(&mut self, code: u32) {
        let _ = Self::reset(self, VarInt::from_u32(code));
    }

    async fn acknowledged(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.stopped()).await;
    }
}

impl RequestStream for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = Self::stop(self, VarInt::from_u32(code));
    }
}
