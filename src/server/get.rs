//! A get on the server: opens the file in the store, offers a resume, sends the data and its digest, waits for the receipt.

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use crate::exchange::Framing;
use crate::paths::RemotePath;
use crate::protocol::{
    read_frame, write_frame, GetOffer, GetRequest, Receipt, RemoteError, Response, Trailer,
};

use super::stream::{ReplyStream, RequestStream};
use super::{protocol_error, Ctx, RECEIPT_TIMEOUT, RESET_SOURCE_FAILED};

pub(super) async fn serve_get(
    req: GetRequest,
    ctx: &Ctx,
    send: &mut impl ReplyStream,
    recv: &mut impl RequestStream,
) -> Result<(), RemoteError> {
    let stats = &ctx.config.stats;
    let path = RemotePath::parse(&req.path, false)?;
    let opened = ctx.config.store.open(&path, req.resume).await?;
    let meta = opened.meta;
    let framing = Framing::for_sending(req.compression, ctx.conn.as_ref());
    let offer = GetOffer {
        meta,
        offset: opened.offset,
        encoding: framing.encoding,
    };
    write_frame(send, &Response::GetAccepted(offer))
        .await
        .map_err(|e| protocol_error(&e))?;
    let counted = |n| {
        stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
    };
    let digest = match opened.reader.send(framing, send, &counted).await {
        Ok(d) => d,
        Err(e) => {
            // The client sees the reset and reports the transfer failed.
            warn!(path = %path, "get failed: {e}");
            send.reset(RESET_SOURCE_FAILED);
            return Ok(());
        }
    };
    if write_frame(send, &Trailer { digest }).await.is_err() {
        info!(path = %path, "get aborted by the client");
        return Ok(());
    }
    send.finish();
    match tokio::time::timeout(RECEIPT_TIMEOUT, read_frame::<_, Receipt>(recv)).await {
        Ok(Ok(Receipt::Committed { .. })) => {
            info!(path = %path, bytes = meta.size, "get completed")
        }
        Ok(Ok(Receipt::Failed(e))) => {
            info!(path = %path, "get failed on the client: {}", e.message)
        }
        Ok(Err(e)) => info!(path = %path, "get: no receipt from the client: {e}"),
        Err(_) => info!(path = %path, "get: no receipt from the client in time"),
    }
    Ok(())
}
