//! A put on the server: policy, the one writer of a resumable upload, the offer, receiving, verifying and committing through the store.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::info;

use crate::exchange::{
    assemble, assemble_cloned, describe_in_background, receive_into, send_chunks, through_pipe,
    Advance, Buffered, ByteSource, Cutter, NoVersion, PipeError, Received, TransferError,
};
use crate::paths::RemotePath;
use crate::protocol::{
    read_frame, write_frame, Continue, DeltaBase, Encoding, ErrorCode, FrameError, PutOffer,
    PutRequest, Receipt, RemoteError, Response, Trailer, RESUME_MIN,
};
use crate::store::{corrupt, Held, PatchedUpload, Prepared, PutPlan, Sinking, Upload, WholePut};

use super::partials::{partial_name, pipe_name};
use super::{protocol_error, Ctx, RECEIPT_TIMEOUT, STOP_REFUSED};
use crate::exchange::{RecvHalf, SendHalf};

pub(super) async fn serve_put(
    req: PutRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
) -> Result<(), RemoteError> {
    let path = RemotePath::parse(&req.path, false)?;
    let stream = !req.encoding.is_sized();
    if stream && (req.resume || req.meta.size != 0) {
        return Err(RemoteError::new(
            ErrorCode::Protocol,
            format!("'{path}': data of unknown length comes with size 0 and no resume"),
        ));
    }
    let delta = req.encoding == Encoding::Delta;
    if !stream && !delta && !req.resume && req.meta.size < WHOLE_PUT_MAX {
        let units = req.meta.size.div_ceil(WHOLE_UNIT).max(1) as u32;
        if let Ok(budget) = WHOLE_PUT_BUDGET.try_acquire_many(units) {
            let result = serve_whole_put(&req, &path, ctx, send, recv).await;
            drop(budget);
            return result;
        }
    }
    // Large files go to a partial keyed by who sends which version of what,
    // kept if the upload is interrupted; only one upload may write it at a
    // time, and a newer one (the client retrying) takes over from an older.
    // Data from a pipe gets a name of its own, leased for as long as it
    // runs, so that the sweep never takes a store's record of it (an
    // object store's multipart upload) for one its server left behind.
    let keyed = !stream && req.meta.size >= RESUME_MIN;
    let mut lease = None;
    let partial = if keyed || stream {
        let name = if stream {
            pipe_name()
        } else {
            partial_name(&ctx.client, &path, &req.meta)
        };
        lease = Some(ctx.partials.acquire(&name).await.ok_or_else(|| {
            RemoteError::new(
                ErrorCode::Protocol,
                format!("'{path}' is already being uploaded by this client and that upload did not stop; try again shortly"),
            )
        })?);
        Some(name)
    } else {
        None
    };
    let plan = PutPlan {
        path: path.clone(),
        meta: req.meta,
        force: req.force,
        partial,
        resume: req.resume,
        stream,
        client: ctx.client,
    };
    let prepared = ctx.config.store.prepare_put(plan).await?;
    let Some((upload, held)) = answer_put(prepared, &path, !keyed, send, recv).await? else {
        return Ok(());
    };
    if held.offset > 0 {
        info!(path = %path, offset = held.offset, "offering to resume");
        super::metrics::resumed();
    }

    let stop = async {
        match lease.as_mut() {
            Some(l) => l.superseded().await,
            None => std::future::pending().await,
        }
    };
    let (receipt, abandoned) = receive_put(&req, &path, upload, held, send, recv, ctx, stop).await;
    let receipt = match receipt {
        Ok(receipt) => {
            if let Receipt::Committed { size, .. } = receipt {
                info!(path = %path, bytes = size, "put committed");
                let store = &ctx.config.store;
                if size >= ctx.config.describe_uploads_from && store.holds_local_files() {
                    describe_later(store.clone(), path.clone(), ctx.requests.clone());
                }
            }
            receipt
        }
        Err(err) => {
            info!(path = %path, "put failed: {}", err.message);
            recv.stop(STOP_REFUSED);
            Receipt::Failed(err)
        }
    };
    // The client hears why first; deleting what a failed upload from a
    // pipe left (thousands of parts, in an object store) may take a while.
    if let Some(upload) = abandoned {
        let path = path.clone();
        tokio::spawn(async move {
            upload.abandon().await;
            drop(lease);
            info!(path = %path, "discarded what the failed piped upload had sent");
        });
    } else {
        drop(lease);
    }
    let _ = write_frame(send, &receipt).await;
    send.finish();
    Ok(())
}

/// After an upload of a large file into a store of local files: the file
/// described in the background for its first delta (see exchange's
/// `describe_in_background`), only while the server has no request in
/// flight; a file made by a delta that was told its chunks is known
/// already and skipped there.
fn describe_later(
    store: std::sync::Arc<dyn crate::store::Store>,
    path: RemotePath,
    requests: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
) {
    tokio::spawn(async move {
        if let Ok(opened) = store.open(&path, None).await {
            if let Some(file) = opened.bytes.as_file() {
                let quiet = std::sync::Arc::new(move || *requests.borrow() == 0);
                describe_in_background(file.clone(), opened.meta.size, quiet);
            }
        }
    });
}

/// Uploads smaller than this are read whole into memory before any disk
/// work, then created, written and committed in one call to the disk pool:
/// a small file's three trips there (and the task switches around each)
/// cost more than its bytes. Larger ones stream to disk as they arrive.
const WHOLE_PUT_MAX: u64 = 256 * 1024;

/// Memory all connections together may hold in whole uploads (in units of
/// [`WHOLE_UNIT`]); past it, uploads stream instead. A client that sends
/// slowly holds its share for at most [`RECEIPT_TIMEOUT`].
static WHOLE_PUT_BUDGET: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new((64 << 20) / WHOLE_UNIT as usize);
const WHOLE_UNIT: u64 = 4096;

/// A small pipelined upload, read whole before its one trip to the store.
/// The client sends its bytes and trailer right behind the request
/// without waiting for an answer, so the server reads them all first, then
/// checks the destination, writes and commits in one call (one disk call
/// for the local root: two trips to the disk threads per small file, and
/// the task switches around each, cost more than its bytes). The answer
/// then goes back as for any put: `PutAccepted` and the receipt,
/// `AlreadyThere`, or `Refused`: the same messages in the same order, only
/// later, when a client no longer waits for them to send.
async fn serve_whole_put(
    req: &PutRequest,
    path: &RemotePath,
    ctx: &Ctx,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
) -> Result<(), RemoteError> {
    let size = req.meta.size;
    let plan = PutPlan {
        path: path.clone(),
        meta: req.meta,
        force: req.force,
        partial: None,
        resume: false,
        stream: false,
        client: ctx.client,
    };
    let received = async {
        let data = tokio::time::timeout(RECEIPT_TIMEOUT, Buffered::read(recv, size, req.encoding))
            .await
            .map_err(|_| {
                RemoteError::new(
                    ErrorCode::Protocol,
                    format!("'{path}': the data did not arrive within {RECEIPT_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| crate::store::receive_error(e, path))?;
        let trailer = read_trailer(recv, path).await?;
        ctx.config
            .stats
            .bytes_received
            .fetch_add(size, Ordering::Relaxed);
        // Checked, written and committed in one call: its time is the
        // commit's.
        let started = std::time::Instant::now();
        let put = ctx
            .config
            .store
            .put_whole(plan, Box::new(data), trailer.digest)
            .await;
        super::metrics::committed(started.elapsed());
        match put {
            Err(e) if taken_by_this_file(&e, req, path, trailer.digest, ctx).await => {
                Ok(WholePut::Committed(trailer.digest))
            }
            other => other,
        }
    };
    let answer = match received.await {
        Ok(WholePut::Committed(digest)) => {
            info!(path = %path, bytes = size, "put committed");
            let accepted = Response::PutAccepted(PutOffer {
                offset: 0,
                prefix: Held::none().prefix,
                discarded_stale: false,
            });
            let _ = write_frame(send, &accepted).await;
            Receipt::Committed { size, digest }
        }
        Ok(WholePut::Present(digest)) => {
            info!(path = %path, "already there (same size and mtime); nothing written");
            let _ = write_frame(send, &Response::AlreadyThere(digest)).await;
            send.finish();
            return Ok(());
        }
        Err(err) => {
            info!(path = %path, "put failed: {}", err.message);
            recv.stop(STOP_REFUSED);
            let _ = write_frame(send, &Response::Refused(err)).await;
            send.finish();
            return Ok(());
        }
    };
    let _ = write_frame(send, &answer).await;
    send.finish();
    Ok(())
}

/// Answers a prepared put: `PutAccepted` with what the server holds of it
/// (and the upload to receive into), or, if the same file is already
/// there, `AlreadyThere` and no more (None). If the client is gone before
/// it hears the answer and `give_up_if_gone`, the upload is abandoned (one
/// that cannot be resumed keeps nothing worth keeping).
async fn answer_put(
    prepared: Prepared,
    path: &RemotePath,
    give_up_if_gone: bool,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
) -> Result<Option<(Box<dyn Upload>, Held)>, RemoteError> {
    let (upload, held, discarded_stale) = match prepared {
        Prepared::Receive {
            upload,
            held,
            discarded_stale,
        } => (upload, held, discarded_stale),
        Prepared::Present(digest) => {
            info!(path = %path, "already there (same size and mtime); nothing to receive");
            let _ = write_frame(send, &Response::AlreadyThere(digest)).await;
            send.finish();
            recv.stop(STOP_REFUSED);
            return Ok(None);
        }
    };
    let offer = PutOffer {
        offset: held.offset,
        prefix: held.prefix,
        discarded_stale,
    };
    if let Err(e) = write_frame(send, &Response::PutAccepted(offer)).await {
        if give_up_if_gone {
            upload.abandon().await;
        }
        return Err(protocol_error(&e));
    }
    Ok(Some((upload, held)))
}

/// How long the client may take to answer a resume offer: it hashes the
/// offered prefix of its file first, so allow for a slow disk (50 MiB/s)
/// on top of the usual two minutes.
fn continue_timeout(offset: u64) -> Duration {
    RECEIPT_TIMEOUT + Duration::from_secs(offset / (50 << 20))
}

/// Receives, checks and commits an accepted put: the receipt, and (when
/// it failed) an upload for the caller to abandon once the client has
/// heard why: a failed one from a pipe, which can never be resumed.
#[allow(clippy::too_many_arguments)]
async fn receive_put(
    req: &PutRequest,
    path: &RemotePath,
    mut upload: Box<dyn Upload>,
    held: Held,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
    ctx: &Ctx,
    stop: impl std::future::Future<Output = ()> + Send,
) -> (Result<Receipt, RemoteError>, Option<Box<dyn Upload>>) {
    let stream = !req.encoding.is_sized();
    let received = match receive_data(req, path, &mut upload, held, send, recv, ctx, stop).await {
        Ok(received) => received,
        Err(e) => return (Err(e), stream.then_some(upload)),
    };
    let trailer = match read_trailer(recv, path).await {
        Ok(trailer) => trailer,
        Err(e) => return (Err(e), stream.then_some(upload)),
    };
    let digest = received.digest;
    if trailer.digest != digest {
        // Never resume from bytes known to be bad: gone before the client
        // hears of it (and can rerun), unless it is a pipe's, which no
        // rerun resumes.
        if stream {
            return (Err(corrupt(path)), Some(upload));
        }
        upload.abandon().await;
        return (Err(corrupt(path)), None);
    }
    let started = std::time::Instant::now();
    let committed = upload.commit(req.meta, req.force).await;
    super::metrics::committed(started.elapsed());
    match committed {
        Err(e) if taken_by_this_file(&e, req, path, digest, ctx).await => {}
        Err(e) => return (Err(e), None),
        Ok(()) => {}
    }
    let receipt = Receipt::Committed {
        size: received.size,
        digest,
    };
    (Ok(receipt), None)
}

/// The data phase of an accepted put: for a delta, the description of the
/// version here; the client's answer to a resume offer; then the bytes.
#[allow(clippy::too_many_arguments)]
async fn receive_data(
    req: &PutRequest,
    path: &RemotePath,
    upload: &mut Box<dyn Upload>,
    held: Held,
    send: &mut impl SendHalf,
    recv: &mut impl RecvHalf,
    ctx: &Ctx,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<Received, RemoteError> {
    let old = if req.encoding == Encoding::Delta {
        Some(describe_old(path, ctx, send).await?)
    } else {
        None
    };
    let mut start = held.offset;
    if req.resume {
        // The client has compared prefixes and says where its data starts.
        let answer = tokio::time::timeout(
            continue_timeout(held.offset),
            read_frame::<_, Continue>(recv),
        )
        .await
        .map_err(|_| RemoteError::new(ErrorCode::Protocol, "no answer to the resume offer"))?
        .map_err(|e| protocol_error(&e))?;
        if answer.offset != held.offset {
            if answer.offset != 0 {
                return Err(RemoteError::new(
                    ErrorCode::Protocol,
                    format!(
                        "'{path}': the client continued at {} instead of {} or 0",
                        answer.offset, held.offset
                    ),
                ));
            }
            info!(path = %path, "the client's data differs from the partial upload; starting over");
            upload.restart().await?;
            start = 0;
        }
    }
    let stats = &ctx.config.stats;
    // Data of unknown length is bounded by the largest file this server takes.
    let size = if req.encoding.is_sized() {
        req.meta.size
    } else {
        ctx.config.max_file_size.unwrap_or(u64::MAX)
    };
    tokio::pin!(stop);
    let counted = |n| {
        stats.bytes_received.fetch_add(n, Ordering::Relaxed);
    };
    let Some((old, old_size)) = old else {
        return receive_bytes(upload.as_mut(), recv, size, req.encoding, &counted, stop).await;
    };
    // A delta: assembled from the version here and the client's new
    // blocks, and received from that as plain bytes, through the store's
    // usual path (temporary, hash, commit).
    let old: &dyn ByteSource = old.as_deref().unwrap_or(&NoVersion);
    if let Some(file) = old.as_file().filter(|_| start == 0) {
        // Where the filesystem shares data between files, the new version
        // starts as a clone of the old and only what differs is written.
        if let Some(target) = upload.patch_target() {
            let cutter = Cutter::for_size(old_size);
            let mut input = &mut *recv;
            let made = assemble_cloned(
                &mut input,
                file,
                old_size,
                target?,
                size,
                cutter,
                None,
                &|_| {},
                &|_| {},
                stop.as_mut(),
            )
            .await;
            if let Some(made) = made {
                let made = made.map(|m| PatchedUpload {
                    received: m.received,
                    described: m.described.map(|d| (cutter.avg(), d)),
                });
                return upload.patched(made).await;
            }
        }
    }
    let made = through_pipe(
        |mut w| async move {
            assemble(
                recv,
                old,
                old_size,
                size - start,
                &mut w,
                None,
                &|_| {},
                &|_| {},
            )
            .await
        },
        |mut r| async move {
            receive_bytes(upload.as_mut(), &mut r, size, Encoding::Raw, &counted, stop).await
        },
    )
    .await;
    match made {
        Ok((_, received)) => Ok(received),
        Err(PipeError::Received(e)) => Err(e),
        Err(PipeError::Made(e)) => Err(crate::store::receive_error(e, path)),
    }
}

/// Receives a file's data (from where `upload` starts, `size` bytes or
/// with [`Encoding::Stream`] at most) from `input` into the store's
/// writing end: exchange reads the framing, the store writes the bytes.
async fn receive_bytes<R>(
    upload: &mut dyn Upload,
    input: &mut R,
    size: u64,
    encoding: Encoding,
    progress: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Received, RemoteError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let Sinking { sink, from, most } = upload.sink(size).await?;
    let (sink, ended) = receive_into(input, sink, from, most, encoding, progress, stop).await;
    upload.received(sink, ended).await
}

/// For a delta put: tells the client what the server holds under `path`
/// (a [`DeltaBase`] and its chunks; nothing if no file is there, or one too
/// large to describe), and returns it to be copied from, with its size.
async fn describe_old(
    path: &RemotePath,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(Option<Box<dyn ByteSource>>, u64), RemoteError> {
    let opened = match ctx.config.store.open(path, None).await {
        Ok(opened) => Some(opened),
        Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::IsDirectory) => None,
        Err(e) => return Err(e),
    };
    let (old, size) = match opened {
        Some(o) if Cutter::for_size(o.meta.size).can_describe(o.meta.size) => {
            (Some(o.bytes), o.meta.size)
        }
        _ => (None, 0),
    };
    let cutter = Cutter::for_size(size);
    let base = DeltaBase {
        size,
        avg_chunk: cutter.avg(),
    };
    let sent = async {
        write_frame(send, &base).await.map_err(|e| match e {
            FrameError::Io(io) => TransferError::Network(io),
            other => TransferError::Malformed(other.to_string()),
        })?;
        match &old {
            Some(old) => send_chunks(old.as_ref(), size, cutter, send).await,
            None => send_chunks(&NoVersion, 0, cutter, send).await,
        }
    };
    sent.await.map_err(|e| match e {
        TransferError::OldVersion(io) => RemoteError::new(
            ErrorCode::Internal,
            format!("'{path}': cannot read the version on the server to compare: {io}; send it with --force instead"),
        ),
        e => RemoteError::new(ErrorCode::Protocol, format!("'{path}': {e}")),
    })?;
    Ok((old, size))
}

/// Whether a commit refused because the name was taken meanwhile (`err`)
/// found this very file there: the same size and mtime and the same BLAKE3
/// `digest`. Typically a client killed with its last files in flight,
/// whose server commits them while the rerun of the same command is
/// already sending them again. That is no conflict: the name holds exactly
/// what this upload would have put there, so the put succeeds.
async fn taken_by_this_file(
    err: &RemoteError,
    req: &PutRequest,
    path: &RemotePath,
    digest: crate::protocol::Digest,
    ctx: &Ctx,
) -> bool {
    // (Data from a pipe has no size or mtime to tell the same file by.)
    if err.code != ErrorCode::AlreadyExists || req.force || !req.encoding.is_sized() {
        return false;
    }
    let plan = PutPlan {
        path: path.clone(),
        meta: req.meta,
        force: false,
        partial: None,
        resume: false,
        stream: false,
        client: ctx.client,
    };
    match ctx.config.store.prepare_put(plan).await {
        Ok(Prepared::Present(there)) if there == digest => {
            info!(path = %path, "the same file was committed meanwhile by another upload");
            true
        }
        Ok(Prepared::Receive { upload, .. }) => {
            upload.abandon().await;
            false
        }
        _ => false,
    }
}

/// Reads the trailer and checks the stream ends right after it: bytes beyond
/// the declared size (or the end mark) are an error, not silently dropped.
async fn read_trailer(recv: &mut impl RecvHalf, path: &RemotePath) -> Result<Trailer, RemoteError> {
    let mismatch = |e: FrameError| {
        RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}': the data did not end where it should (at its declared size or end mark: {e}); nothing was saved"),
        )
    };
    let trailer = tokio::time::timeout(RECEIPT_TIMEOUT, read_frame::<_, Trailer>(recv))
        .await
        .map_err(|_| RemoteError::new(ErrorCode::Protocol, "no trailer after the data"))?
        .map_err(mismatch)?;
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(0) => Ok(trailer),
        Ok(_) => Err(RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}': more data arrived than declared; nothing was saved"),
        )),
        Err(e) => Err(RemoteError::new(ErrorCode::Protocol, e.to_string())),
    }
}
