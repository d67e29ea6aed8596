//! A get on the server: opens the file beneath the root, offers a resume, sends the data and its digest.

use std::sync::atomic::Ordering;

use cap_std::fs::{OpenOptions, OpenOptionsExt};
use quinn::{RecvStream, SendStream, VarInt};
use tracing::{info, warn};

use crate::paths::RemotePath;
use crate::protocol::{
    read_frame, write_frame, ErrorCode, GetOffer, GetRequest, Receipt, RemoteError, Response,
    Trailer,
};
use crate::transfer::{self, blocking, file_meta, Framing, Start};

use super::{fs_error, protocol_error, Ctx, RECEIPT_TIMEOUT, RESET_SOURCE_FAILED};

pub(super) async fn serve_get(
    req: GetRequest,
    ctx: &Ctx,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), RemoteError> {
    let root = ctx.config.root_dir.clone();
    let stats = &ctx.config.stats;
    let path = RemotePath::parse(&req.path, false)?;
    let p = path.clone();
    let (file, meta, start) = blocking(move || -> Result<_, RemoteError> {
        // O_NONBLOCK: opening a FIFO someone left in the root must not hang
        // this task; it is refused below as not a regular file.
        let mut opts = OpenOptions::new();
        opts.read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = root
            .open_with(p.relative(), &opts)
            .map_err(|e| fs_error(&e, &p, "cannot open"))?
            .into_std();
        let md = file
            .metadata()
            .map_err(|e| fs_error(&e, &p, "cannot read"))?;
        if md.is_dir() {
            return Err(RemoteError::new(
                ErrorCode::IsDirectory,
                format!("'{p}' is a directory on the server; use `qxfer get -r {p}` to download it and its contents"),
            ));
        }
        if !md.is_file() {
            return Err(RemoteError::new(
                ErrorCode::NotFound,
                format!("'{p}' is not a regular file on the server"),
            ));
        }
        let meta = file_meta(&md);
        // The client holds a prefix: continue after it if ours hashes the
        // same (the file is unchanged there), else start over.
        let mut file = file;
        let start = match req.resume {
            Some(prefix) => {
                transfer::matching_start(&mut file, meta.size, prefix.offset, &prefix.digest)
                    .map_err(|e| fs_error(&e, &p, "cannot read"))?
            }
            None => Start::default(),
        };
        Ok((file, meta, start))
    })
    .await?;
    let framing = Framing::for_sending(req.compression, &ctx.conn);
    let offer = GetOffer {
        meta,
        offset: start.offset,
        encoding: framing.encoding,
    };
    write_frame(send, &Response::GetAccepted(offer))
        .await
        .map_err(|e| protocol_error(&e))?;
    let counted = |n| {
        stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
    };
    let digest =
        match transfer::send_file(file, meta.size, start, framing, None, send, &counted).await {
            Ok(d) => d,
            Err(e) => {
                // The client sees the reset and reports the transfer failed.
                warn!(path = %path, "get failed: {e}");
                let _ = send.reset(VarInt::from_u32(RESET_SOURCE_FAILED));
                return Ok(());
            }
        };
    if write_frame(send, &Trailer { digest }).await.is_err() || send.finish().is_err() {
        info!(path = %path, "get aborted by the client");
        return Ok(());
    }
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
