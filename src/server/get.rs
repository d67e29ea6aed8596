//! A get on the server: opens the file in the store, offers a resume, sends the data (or a delta against the client's version) and its digest, waits for the receipt.

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use crate::exchange::{
    cut_while_described, frame_small, send_cut, send_primed, send_source, Cutter, Framing,
    TransferError,
};
use crate::paths::RemotePath;
use crate::protocol::{
    read_frame, write_frame, Encoding, ErrorCode, GetDeltaRequest, GetOffer, GetRequest, Receipt,
    RemoteError, Response, Trailer,
};

use super::{protocol_error, Ctx, RECEIPT_TIMEOUT, RESET_SOURCE_FAILED, STOP_REFUSED};
use crate::exchange::{RecvHalf, SendHalf};

pub(super) async fn serve_get(
    req: GetRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
) -> Result<(), RemoteError> {
    let stats = &ctx.config.stats;
    let path = RemotePath::parse(&req.path, false)?;
    let framing = Framing::for_sending(req.compression, ctx.conn.as_ref());
    let (opened, small) = ctx.config.store.open_small(&path, req.resume).await?;
    let meta = opened.meta;
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
    let sent = match small {
        // Read whole when it was opened, from its start.
        Some(small) => match small {
            Ok(small) => {
                let primed = frame_small(small, framing);
                send_primed(primed, None, send, &counted).await.map(Some)
            }
            Err(e) => Err(e),
        },
        None => {
            send_source(
                opened.bytes.as_ref(),
                opened.offset,
                meta.size,
                opened.hasher,
                framing,
                send,
                &counted,
            )
            .await
        }
    };
    // The digest the store keeps wins: what was uploaded is what counts.
    let digest = sent.and_then(|hashed| {
        opened.digest.or(hashed).ok_or_else(|| {
            TransferError::Read(std::io::Error::other(
                "the store kept no digest and gave no hash to continue",
            ))
        })
    });
    let digest = match digest {
        Ok(d) => d,
        Err(e) => {
            // The client sees the reset and reports the transfer failed.
            warn!(path = %path, "get failed: {e}");
            send.reset(RESET_SOURCE_FAILED);
            return Ok(());
        }
    };
    finish_get(&path, meta.size, digest, send, recv).await;
    Ok(())
}

/// Delta gets served at once: each holds the client's description of its
/// version in memory (up to some 6 MiB, see `MAX_DELTA_CHUNKS`). Past
/// this, a delta get is answered with the whole file.
const DELTA_GETS: usize = 16;
static DELTA_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DELTA_GETS);

/// A get whose client holds an older version (`get --sync`): its
/// description is read first, then the file goes as copies of the
/// client's chunks and new blocks. Busy, or given a description that
/// does not hold, the server sends the whole file instead (or refuses).
pub(super) async fn serve_get_delta(
    req: GetDeltaRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
) -> Result<(), RemoteError> {
    let Ok(_slot) = DELTA_SLOTS.try_acquire() else {
        info!(path = %req.get.path, "busy with delta gets; sending the whole file");
        recv.stop(STOP_REFUSED);
        return serve_get(req.get, ctx, send, recv).await;
    };
    let path = RemotePath::parse(&req.get.path, false)?;
    let opened = ctx.config.store.open(&path, req.get.resume).await?;
    let meta = opened.meta;
    let cutter = Cutter::with_avg(req.base.avg_chunk).ok_or_else(|| {
        RemoteError::new(
            ErrorCode::Protocol,
            format!(
                "'{path}': an old version cut in chunks of {} bytes",
                req.base.avg_chunk
            ),
        )
    })?;
    // The file is cut while the client's description arrives.
    let src = opened.bytes;
    let (base, cut) = cut_while_described(recv, req.base, src.as_ref(), meta.size, cutter).await;
    let base = base.map_err(|e| RemoteError::new(ErrorCode::Protocol, format!("'{path}': {e}")))?;
    let cut = cut.map_err(|e| {
        RemoteError::new(
            ErrorCode::Internal,
            format!("cannot read '{path}' on the server: {e}; try again"),
        )
    })?;
    let mut framing = Framing::for_sending(req.get.compression, ctx.conn.as_ref());
    framing.encoding = Encoding::Delta;
    let offer = GetOffer {
        meta,
        offset: opened.offset,
        encoding: Encoding::Delta,
    };
    write_frame(send, &Response::GetAccepted(offer))
        .await
        .map_err(|e| protocol_error(&e))?;
    let stats = &ctx.config.stats;
    let counted = |n| {
        stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
    };
    let sent = send_cut(
        src.as_ref(),
        cut,
        opened.offset,
        &base,
        framing,
        None,
        send,
        &counted,
        &|_| {},
    )
    .await;
    let digest = match sent {
        Ok((digest, sent)) => {
            info!(path = %path, copied = sent.copied, new = sent.literal, "delta sent");
            digest
        }
        Err(e) => {
            warn!(path = %path, "delta get failed: {e}");
            send.reset(RESET_SOURCE_FAILED);
            return Ok(());
        }
    };
    finish_get(&path, meta.size, digest, send, recv).await;
    Ok(())
}

/// The end of a get: the trailer, then the client's receipt (for the log).
async fn finish_get(
    path: &RemotePath,
    size: u64,
    digest: crate::protocol::Digest,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
) {
    if write_frame(send, &Trailer { digest }).await.is_err() {
        info!(path = %path, "get aborted by the client");
        return;
    }
    send.finish();
    match tokio::time::timeout(RECEIPT_TIMEOUT, read_frame::<_, Receipt>(recv)).await {
        Ok(Ok(Receipt::Committed { .. })) => {
            info!(path = %path, bytes = size, "get completed")
        }
        Ok(Ok(Receipt::Failed(e))) => {
            info!(path = %path, "get failed on the client: {}", e.message)
        }
        Ok(Err(e)) => info!(path = %path, "get: no receipt from the client: {e}"),
        Err(_) => info!(path = %path, "get: no receipt from the client in time"),
    }
}
