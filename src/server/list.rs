//! Listings on the server: what the store lists, sent in batches that fit the frame limit; and the digests `--checksum` compares.

use super::Ctx;
use tracing::info;

use crate::paths::RemotePath;
use crate::protocol::{
    write_frame, DigestsRequest, Entry, ErrorCode, FrameError, ListBatch, ListRequest, RemoteError,
    Response, MAX_DIGEST_PATHS,
};

use crate::exchange::SendHalf;

/// Entries per listing frame: 128 names of at most 255 bytes, plus metadata,
/// stay well under the 64 KiB frame limit.
const LIST_BATCH: usize = 128;

pub(super) async fn serve_list(
    req: ListRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(), RemoteError> {
    let store = &*ctx.config.store;
    let path = RemotePath::parse(&req.path, true)?;
    let entries = store.list(&path, req.recursive).await?;
    let send_all = async {
        write_frame(send, &Response::ListAccepted).await?;
        let mut batches = batches(entries).into_iter().peekable();
        while let Some(entries) = batches.next() {
            let more = batches.peek().is_some();
            write_frame(send, &ListBatch { entries, more }).await?;
        }
        Ok::<_, FrameError>(())
    };
    match send_all.await {
        Ok(()) => {
            send.finish();
            info!(path = %path, "listed");
        }
        Err(e) => info!(path = %path, "listing aborted: {e}"),
    }
    Ok(())
}

/// Splits a listing into frames: at most [`LIST_BATCH`] entries and
/// [`LIST_BATCH_BYTES`] of names each (a recursive listing's names are whole
/// paths of up to 4 KiB), and always at least one frame.
fn batches(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0;
    for e in entries {
        let last = out.last_mut().expect("never empty");
        if last.len() == LIST_BATCH || bytes + e.name.len() > LIST_BATCH_BYTES {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += e.name.len();
        out.last_mut().expect("never empty").push(e);
    }
    out
}

/// Name bytes per listing frame, leaving room under the 64 KiB frame limit
/// for the other fields (at most ~40 bytes per entry, 128 entries).
const LIST_BATCH_BYTES: usize = 48 * 1024;

/// `--checksum`: the BLAKE3 of each named file, from the store (which may
/// keep it, or cache it) or by reading it. A file that is not there, or
/// not a regular file, or cannot be read, gets `None`: the client then
/// sends it, as it would any file whose digest differs.
pub(super) async fn serve_digests(
    req: DigestsRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(), RemoteError> {
    let store = &*ctx.config.store;
    if req.paths.len() > MAX_DIGEST_PATHS {
        return Err(RemoteError::new(
            ErrorCode::Protocol,
            format!(
                "{} files in one digest request; at most {MAX_DIGEST_PATHS}",
                req.paths.len()
            ),
        ));
    }
    let paths = req
        .paths
        .iter()
        .map(|p| RemotePath::parse(p, false))
        .collect::<Result<Vec<_>, _>>()?;
    let digests = store.digests(paths).await;
    let n = digests.len();
    if write_frame(send, &Response::Digests(digests)).await.is_ok() {
        send.finish();
        info!(files = n, "digests sent");
    }
    Ok(())
}
