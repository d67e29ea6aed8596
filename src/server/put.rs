//! A put on the server: checks, free space, the partial or temporary it writes, receiving, verifying and committing.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cap_std::fs::Dir;
use quinn::{RecvStream, SendStream, VarInt};
use tracing::info;

use crate::paths::RemotePath;
use crate::protocol::{
    read_frame, write_frame, Continue, Digest, ErrorCode, FileMeta, FrameError, PutOffer,
    PutRequest, Receipt, RemoteError, Response, Trailer, RESUME_MIN,
};
use crate::space::{Reservation, Space};
use crate::transfer::{self, blocking, to_timestamp, Buffered, IncomingFile, Start, TransferError};

use super::partials::{partial_name, partial_store};
use super::{fs_error, is_escape, protocol_error, Ctx, RECEIPT_TIMEOUT, STOP_REFUSED};

pub(super) async fn serve_put(
    req: PutRequest,
    ctx: &Ctx,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), RemoteError> {
    let path = RemotePath::parse(&req.path, false)?;
    if !req.resume && req.meta.size < WHOLE_PUT_MAX {
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
    let keyed = req.meta.size >= RESUME_MIN;
    let mut lease = None;
    let partial = if keyed {
        let name = partial_name(&ctx.client, &path, &req.meta);
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
    let root = ctx.config.root_dir.clone();
    let (p, force, meta, resume) = (path.clone(), req.force, req.meta, req.resume);
    let space = ctx.config.space.clone();
    let prepared =
        blocking(move || prepare_put(&root, &p, force, &meta, partial.as_deref(), resume, &space))
            .await?;
    let Some((incoming, start, reserved)) = answer_put(prepared, &path, send, recv).await? else {
        return Ok(());
    };
    if start.offset > 0 {
        info!(path = %path, offset = start.offset, "offering to resume");
    }

    let stop = async {
        match lease.as_mut() {
            Some(l) => l.superseded().await,
            None => std::future::pending().await,
        }
    };
    let upload = Upload {
        incoming,
        start,
        reserved,
    };
    let receipt = match receive_put(&req, &path, upload, recv, ctx, stop).await {
        Ok(receipt) => {
            info!(path = %path, bytes = req.meta.size, "put committed");
            receipt
        }
        Err(err) => {
            info!(path = %path, "put failed: {}", err.message);
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            Receipt::Failed(err)
        }
    };
    drop(lease);
    let _ = write_frame(send, &receipt).await;
    let _ = send.finish();
    Ok(())
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

/// A small pipelined upload, read whole before its one trip to the disk:
/// the checks and the creation of its temporary file come first (and the
/// answer goes back at once, as for any put), then the data and trailer are
/// read into memory, and writing, comparing the digest and committing
/// happen together in one blocking call instead of two, with no task in
/// between.
async fn serve_whole_put(
    req: &PutRequest,
    path: &RemotePath,
    ctx: &Ctx,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), RemoteError> {
    let size = req.meta.size;
    let root = ctx.config.root_dir.clone();
    let (p, force, meta) = (path.clone(), req.force, req.meta);
    let space = ctx.config.space.clone();
    let prepared =
        blocking(move || prepare_put(&root, &p, force, &meta, None, false, &space)).await?;
    // The reservation is held until the commit, however this ends.
    let Some((incoming, _, _reserved)) = answer_put(prepared, path, send, recv).await? else {
        return Ok(());
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
            .map_err(|e| receive_error(e, path))?;
        let trailer = read_trailer(recv, path).await?;
        ctx.config
            .stats
            .bytes_received
            .fetch_add(size, Ordering::Relaxed);
        let (p, meta) = (path.clone(), req.meta);
        blocking(move || -> Result<Digest, RemoteError> {
            let mut file = incoming
                .file()
                .map_err(|e| fs_error(&e, &p, "cannot write"))?;
            let digest = data.write_to(&mut file).map_err(|e| receive_error(e, &p))?;
            if digest != trailer.digest {
                return Err(corrupt(&p));
            }
            incoming
                .commit(&meta, force)
                .map_err(|e| commit_error(e, &p))?;
            Ok(digest)
        })
        .await
    };
    let receipt = match received.await {
        Ok(digest) => {
            info!(path = %path, bytes = size, "put committed");
            Receipt::Committed { size, digest }
        }
        Err(err) => {
            info!(path = %path, "put failed: {}", err.message);
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            Receipt::Failed(err)
        }
    };
    let _ = write_frame(send, &receipt).await;
    let _ = send.finish();
    Ok(())
}

/// Answers a prepared put: `PutAccepted` with what the server holds of it
/// (and the upload's file and start to receive into), or, if the same file
/// is already there, `AlreadyThere` and no more (None).
async fn answer_put(
    prepared: Prepared,
    path: &RemotePath,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<Option<(IncomingFile, Start, Reservation)>, RemoteError> {
    let (incoming, start, discarded_stale, reserved) = match prepared {
        Prepared::Receive(incoming, start, discarded, reserved) => {
            (incoming, *start, discarded, reserved)
        }
        Prepared::Present(digest) => {
            info!(path = %path, "already there (same size and mtime); nothing to receive");
            let _ = write_frame(send, &Response::AlreadyThere(digest)).await;
            let _ = send.finish();
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            return Ok(None);
        }
    };
    let offer = PutOffer {
        offset: start.offset,
        prefix: start.prefix_digest(),
        discarded_stale,
    };
    write_frame(send, &Response::PutAccepted(offer))
        .await
        .map_err(|e| protocol_error(&e))?;
    Ok(Some((incoming, start, reserved)))
}

/// The error for data that did not arrive as it should.
fn receive_error(e: TransferError, path: &RemotePath) -> RemoteError {
    match e {
        TransferError::Write(ref io) => fs_error(io, path, "cannot write"),
        other => RemoteError::new(ErrorCode::Protocol, format!("receiving '{path}': {other}")),
    }
}

/// The error for data whose BLAKE3 is not the sender's.
fn corrupt(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::Corrupt,
        format!("'{path}' arrived corrupted (BLAKE3 mismatch) and was discarded; send it again"),
    )
}

/// The error for a commit that failed.
fn commit_error(e: transfer::CommitError, path: &RemotePath) -> RemoteError {
    match e {
        transfer::CommitError::Exists(_) => RemoteError::new(
            ErrorCode::AlreadyExists,
            format!(
                "'{path}' was created on the server during the upload; use --force to overwrite it"
            ),
        ),
        transfer::CommitError::Io { source, .. } => fs_error(&source, path, "cannot commit"),
    }
}

/// How long the client may take to answer a resume offer: it hashes the
/// offered prefix of its file first, so allow for a slow disk (50 MiB/s)
/// on top of the usual two minutes.
fn continue_timeout(offset: u64) -> Duration {
    RECEIPT_TIMEOUT + Duration::from_secs(offset / (50 << 20))
}

/// What a put will do.
enum Prepared {
    /// Receive into this file from this start; whether a stale partial
    /// went; the disk space held for it.
    Receive(IncomingFile, Box<Start>, bool, Reservation),
    /// The file is already there (same size and mtime); its BLAKE3.
    Present(Digest),
}

/// Checks the destination, the free space, and creates the temporary for a
/// put. The destination's directory is opened here, beneath the root, and
/// the commit renames into that handle: swapping a directory on the path for
/// a symlink while the upload runs cannot move where the file lands.
fn prepare_put(
    root: &Dir,
    path: &RemotePath,
    force: bool,
    meta: &FileMeta,
    partial: Option<&str>,
    resume: bool,
    space: &Arc<Space>,
) -> Result<Prepared, RemoteError> {
    let (size, meta_mtime) = (meta.size, meta.mtime);
    let name = path.file_name().expect("a put path is never the root");
    let dest_dir = match path.parent() {
        Some(parent) => open_or_create_dir(root, &parent, path)?,
        None => root
            .try_clone()
            .map_err(|e| fs_error(&e, path, "cannot open the directory for"))?,
    };
    match dest_dir.symlink_metadata(name) {
        Ok(md) if md.is_dir() => {
            return Err(RemoteError::new(
                ErrorCode::IsDirectory,
                format!("'{path}' is a directory on the server; choose another name or --to"),
            ))
        }
        Ok(md) if md.file_type().is_symlink() => {
            return Err(RemoteError::new(
                ErrorCode::Symlink,
                format!("'{path}' is a symbolic link on the server; uploads never replace or write through links, so choose another name"),
            ))
        }
        Ok(md) if !force => {
            // The same size and mtime: most likely this very file, from an
            // earlier run of the same command. Let the client check the
            // contents instead of failing.
            let same = md.is_file()
                && md.len() == size
                && meta_mtime.is_some()
                && md.modified().ok().and_then(|t| to_timestamp(t.into_std())) == meta_mtime;
            if same {
                let digest = dest_dir
                    .open(name)
                    .and_then(|f| transfer::file_digest(&mut f.into_std()))
                    .map_err(|e| fs_error(&e, path, "cannot read"))?;
                return Ok(Prepared::Present(digest));
            }
            return Err(RemoteError::new(
                ErrorCode::AlreadyExists,
                format!("'{path}' already exists on the server; use --force to overwrite it"),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_error(&e, path, "cannot check")),
    }
    let creating = |e: io::Error| fs_error(&e, path, "cannot create the upload of");
    let label = PathBuf::from(path.to_string());
    let Some(partial) = partial else {
        // Not resumable: an anonymous temporary in the destination directory
        // where the system allows, else a named one in the partial store.
        let reserved = reserve_space(space, &dest_dir, size, path)?;
        let anonymous = IncomingFile::create_anonymous(
            dest_dir.try_clone().map_err(creating)?,
            name,
            label.clone(),
        )
        .map_err(|e| fs_error(&e, path, "cannot create"))?;
        let incoming = match anonymous {
            Some(incoming) => incoming,
            None => {
                let store = partial_store(root).map_err(creating)?;
                IncomingFile::create_in(store, dest_dir, name, label)
                    .map_err(|e| fs_error(&e, path, "cannot create"))?
            }
        };
        return Ok(Prepared::Receive(incoming, Box::default(), false, reserved));
    };
    let store = partial_store(root).map_err(creating)?;
    // Partials of other versions of this upload (the source changed) go.
    let (same_upload, _) = partial
        .rsplit_once('-')
        .expect("partial names have a version");
    let mut discarded_stale = false;
    for entry in store.entries().map_err(creating)?.flatten() {
        let other = entry.file_name();
        let other = other.to_string_lossy();
        if other.starts_with(same_upload) && other != partial {
            discarded_stale |= store.remove_file(&*other).is_ok();
        }
    }
    let store_fs = store.try_clone().map_err(creating)?;
    let incoming = IncomingFile::open_partial(store, partial, dest_dir, name, label)
        .map_err(|e| fs_error(&e, path, "cannot open the partial upload of"))?;
    let held = incoming.held().map_err(creating)?;
    let start = if resume && held > 0 && held <= size {
        incoming.prefix(held)
    } else {
        incoming.restart()
    }
    .map_err(creating)?;
    let reserved = reserve_space(space, &store_fs, size - start.offset, path)?;
    Ok(Prepared::Receive(
        incoming,
        Box::new(start),
        discarded_stale,
        reserved,
    ))
}

/// Opens the directory `dir` beneath the root, creating it and its parents
/// if missing. Errors name the real reason: a link out of the root, or a
/// file where a directory should be.
pub(super) fn open_or_create_dir(
    root: &Dir,
    dir: &Path,
    path: &RemotePath,
) -> Result<Dir, RemoteError> {
    let open_error = |e: io::Error| fs_error(&e, path, "cannot open the directory for");
    match root.open_dir(dir) {
        Ok(d) => return Ok(d),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(open_error(e)),
        Err(_) => {}
    }
    if let Err(e) = root.create_dir_all(dir) {
        // Creating failed: opening again says why (an escape, a file in the way).
        return Err(match root.open_dir(dir) {
            Err(open) if is_escape(&open) => open_error(open),
            _ if e.kind() == io::ErrorKind::AlreadyExists => RemoteError::new(
                ErrorCode::NotDirectory,
                format!("cannot create the directory for '{path}' on the server: a parent of this path is a file or a link, not a directory"),
            ),
            _ => fs_error(&e, path, "cannot create the directory for"),
        });
    }
    root.open_dir(dir).map_err(open_error)
}

/// Refuses a put that cannot fit, before any byte is written: the space
/// available to the server's user (statvfs f_bavail), less what uploads in
/// flight will still write, must hold what this one will write.
fn reserve_space(
    space: &Arc<Space>,
    dir: &Dir,
    size: u64,
    path: &RemotePath,
) -> Result<Reservation, RemoteError> {
    space.reserve(dir, size).map_err(|no| {
        RemoteError::new(
            ErrorCode::NoSpace,
            format!(
                "'{path}' needs {} bytes but the server has only {} bytes free (uploads in flight included); free space there and retry",
                no.needed, no.free
            ),
        )
    })
}

/// An accepted upload: where it goes, where its data starts, the disk space held for it.
struct Upload {
    incoming: IncomingFile,
    start: Start,
    reserved: Reservation,
}

async fn receive_put(
    req: &PutRequest,
    path: &RemotePath,
    upload: Upload,
    recv: &mut RecvStream,
    ctx: &Ctx,
    stop: impl Future<Output = ()>,
) -> Result<Receipt, RemoteError> {
    let writing = |e: io::Error| fs_error(&e, path, "cannot write");
    let Upload {
        incoming,
        mut start,
        reserved,
    } = upload;
    if req.resume {
        // The client has compared prefixes and says where its data starts.
        let answer = tokio::time::timeout(
            continue_timeout(start.offset),
            read_frame::<_, Continue>(recv),
        )
        .await
        .map_err(|_| RemoteError::new(ErrorCode::Protocol, "no answer to the resume offer"))?
        .map_err(|e| protocol_error(&e))?;
        if answer.offset != start.offset {
            if answer.offset != 0 {
                return Err(RemoteError::new(
                    ErrorCode::Protocol,
                    format!(
                        "'{path}': the client continued at {} instead of {} or 0",
                        answer.offset, start.offset
                    ),
                ));
            }
            info!(path = %path, "the client's data differs from the partial upload; starting over");
            start = incoming.restart().map_err(writing)?;
        }
    }
    let file = incoming.file().map_err(writing)?;
    let stats = &ctx.config.stats;
    let received = transfer::receive_file(
        recv,
        req.meta.size,
        file,
        start,
        req.encoding,
        None,
        &|n| {
            stats.bytes_received.fetch_add(n, Ordering::Relaxed);
            reserved.wrote(n);
        },
        stop,
    )
    .await;
    let digest = match received {
        Ok(digest) => digest,
        Err(e) => {
            // What a full disk cut short is not kept for a resume: its bytes
            // are the space the next upload (or this one's retry) needs.
            if matches!(&e, TransferError::Write(io) if transfer::is_disk_full(io)) {
                incoming.discard();
            }
            return Err(receive_error(e, path));
        }
    };
    let trailer: Trailer = read_trailer(recv, path).await?;
    if trailer.digest != digest {
        // Never resume from bytes known to be bad.
        incoming.discard();
        return Err(corrupt(path));
    }
    let meta = req.meta;
    let force = req.force;
    let p = path.clone();
    blocking(move || incoming.commit(&meta, force))
        .await
        .map_err(|e| commit_error(e, &p))?;
    Ok(Receipt::Committed {
        size: req.meta.size,
        digest,
    })
}

/// Reads the trailer and checks the stream ends right after it: bytes beyond
/// the declared size are an error, not silently dropped.
async fn read_trailer(recv: &mut RecvStream, path: &RemotePath) -> Result<Trailer, RemoteError> {
    let mismatch = |e: FrameError| {
        RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}': the data did not match its declared size ({e}); nothing was saved"),
        )
    };
    let trailer = tokio::time::timeout(RECEIPT_TIMEOUT, read_frame::<_, Trailer>(recv))
        .await
        .map_err(|_| RemoteError::new(ErrorCode::Protocol, "no trailer after the data"))?
        .map_err(mismatch)?;
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(None) | Ok(Some(0)) => Ok(trailer),
        Ok(Some(_)) => Err(RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}': more data arrived than declared; nothing was saved"),
        )),
        Err(e) => Err(RemoteError::new(ErrorCode::Protocol, e.to_string())),
    }
}
