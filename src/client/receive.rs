//! Receiving a download's bytes into its temporary: raw, compressed, or as a delta against the version already here; then checked against the server's BLAKE3 and committed.

use std::path::Path;
use std::sync::Arc;

use quinn::VarInt;

use crate::exchange::{
    self, blocking, Advance, CommitError, Cutter, DeltaSent, FileKey, IncomingFile, Pacer, Start,
    TransferError, DELTA_MIN,
};
use crate::exchange::{Descriptions, RecvHalf};
use crate::protocol::stream::RESET_SOURCE_FAILED;
use crate::protocol::{Digest, Encoding, GetOffer, Trailer};

use super::dest::Dest;
use super::{reply, FileError};

/// A download's data always has the size its offer announces: the
/// framing of data of unknown length is for uploads from a pipe only.
pub(super) fn check_framing(offer: &GetOffer) -> Result<(), FileError> {
    if offer.encoding.is_sized() {
        return Ok(());
    }
    Err(FileError::Protocol(
        "the server framed a download as data of unknown length, which only uploads use".into(),
    ))
}

/// The version of a file the client holds, for a delta get.
pub(super) struct OldVersion {
    pub(super) bytes: exchange::FileBytes,
    pub(super) size: u64,
}

/// Opens the regular file at `dest` (never through a link) as the old
/// version of a delta get, if it is one worth building on: at least
/// [`DELTA_MIN`] bytes and not too large to describe. Blocking.
pub(super) fn open_old_version(dest: &Dest, descriptions: Descriptions) -> Option<OldVersion> {
    let mut opts = cap_std::fs::OpenOptions::new();
    cap_std::fs::OpenOptionsExt::custom_flags(opts.read(true), libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let file = dest.dir.open_with(&dest.name, &opts).ok()?.into_std();
    let md = file.metadata().ok()?;
    let size = md.len();
    let usable = md.is_file() && size >= DELTA_MIN && Cutter::for_size(size).can_describe(size);
    usable.then(|| OldVersion {
        bytes: exchange::FileBytes::new(file, descriptions),
        size,
    })
}

/// Receives the rest of a download into `incoming` (as a delta against
/// `old` if the offer says so), checks it against the server's trailer
/// and commits it under `dest`: the file's BLAKE3, the bytes on the wire,
/// and for a delta what it copied and what crossed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn receive_get(
    recv: &mut Box<dyn RecvHalf>,
    dest: &Path,
    incoming: IncomingFile,
    start: Start,
    offer: &GetOffer,
    old: Option<&OldVersion>,
    describe: Option<Descriptions>,
    force: bool,
    pace: Option<Arc<Pacer>>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<(Digest, u64, Option<DeltaSent>), FileError> {
    let meta = &offer.meta;
    check_framing(offer)?;
    if offer.encoding != Encoding::Delta
        && start.offset == 0
        && meta.size <= exchange::SMALL_READ_MAX
    {
        return receive_small(recv, dest, incoming, offer, force, progress).await;
    }
    let file = incoming.file().map_err(FileError::local(dest))?;
    let mut wire = exchange::Counted::new(recv);
    let mut delta = None;
    // The new version's chunks, where the delta could tell them: kept for
    // the next delta of this file (see `files::described`).
    let mut described = None;
    // Or, for a whole download in sync mode, its chunks cut as it arrived.
    let mut described_whole = None;
    let received = if offer.encoding == Encoding::Delta {
        let Some(old) = old else {
            return Err(FileError::Protocol(format!(
                "the server sent {} as a delta, which this download did not ask for",
                dest.display()
            )));
        };
        let expect = meta.size - start.offset;
        let wire = &mut wire;
        // Where the filesystem shares data between files, the new version
        // starts as a clone of the old and only what differs is written.
        let cloned = if start.offset == 0 {
            let made = file.try_clone().map_err(FileError::local(dest))?;
            let pace = pace.as_deref();
            exchange::assemble_cloned(
                &mut *wire,
                &old.bytes,
                old.size,
                made,
                expect,
                Cutter::for_size(old.size),
                pace,
                progress,
                kept,
                std::future::pending(),
            )
            .await
        } else {
            None
        };
        if let Some(made) = cloned {
            made.map(|made| {
                delta = Some(made.sent);
                described = made.described;
                made.received
            })
        } else {
            // The assembled bytes go through the usual receiving path; the
            // rate limit applies where bytes cross (the new blocks), which a
            // copy does not.
            let made = exchange::through_pipe(
                // Bars and rates count what crossed: new bytes as they
                // arrive, copies as bytes kept.
                |mut w| async move {
                    let pace = pace.as_deref();
                    exchange::assemble(
                        wire, &old.bytes, old.size, expect, &mut w, pace, progress, kept,
                    )
                    .await
                },
                |mut r| async move {
                    exchange::receive_file(
                        &mut r,
                        meta.size,
                        file,
                        start,
                        Encoding::Raw,
                        None,
                        None,
                        None,
                        &|_| {},
                        std::future::pending(),
                    )
                    .await
                },
            )
            .await;
            match made {
                Ok((d, received)) => {
                    delta = Some(d);
                    Ok(received)
                }
                Err(exchange::PipeError::Made(e) | exchange::PipeError::Received(e)) => Err(e),
            }
        }
    } else {
        // In sync mode a large download is cut into chunks as it arrives
        // (and kept on disk with the file): its first delta then reads
        // nothing of it to describe it.
        let describer = describe
            .as_ref()
            .filter(|_| start.offset == 0 && meta.size >= exchange::DESCRIBE_AFTER_UPLOAD)
            .and_then(|_| exchange::Describer::new(meta.size))
            .map(|d| Arc::new(std::sync::Mutex::new(Some(d))));
        let observer = describer.clone().map(|d| {
            Box::new(move |bytes: &[u8]| {
                if let Some(d) = d.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    d.feed(bytes);
                }
            }) as exchange::Observer
        });
        let got = exchange::receive_file(
            &mut wire,
            meta.size,
            file,
            start,
            offer.encoding,
            pace,
            None,
            observer,
            progress,
            std::future::pending(),
        )
        .await;
        let taken = describer.and_then(|d| d.lock().unwrap_or_else(|e| e.into_inner()).take());
        if got.is_ok() {
            described_whole = taken.and_then(exchange::Describer::finish);
        }
        got
    };
    let wire_bytes = wire.count();
    let received = match received {
        // What a full disk cut short is not kept for a resume (as the
        // server does): its bytes are the space the rerun, or any other
        // download, needs.
        Err(TransferError::Write(io)) if exchange::is_disk_full(&io) => {
            incoming.discard();
            return Err(disk_full(dest, &io));
        }
        other => other,
    };
    let digest = received.map_err(|e| download_error(e, dest))?.digest;
    let trailer: Trailer = reply(recv, exchange::STALL_TIMEOUT).await?;
    if trailer.digest != digest {
        // Never resume from bytes known to be bad, nor build on what was
        // kept of the old version again.
        incoming.discard();
        if let Some(old) = old.filter(|_| delta.is_some()) {
            old.bytes.forget();
        }
        return Err(FileError::Corrupt(dest.to_owned()));
    }
    let meta = *meta;
    let d = dest.to_owned();
    let avg = old.map(|o| Cutter::for_size(o.size).avg());
    let kept = old.map(|o| o.bytes.descriptions.clone()).or(describe);
    let keep = described
        .zip(avg)
        .or_else(|| described_whole.map(|(avg, d)| (d, avg)));
    let kept_file = keep.as_ref().and_then(|_| incoming.file().ok());
    let committed = match blocking(move || incoming.commit_start(&meta, force)).await {
        Ok(committing) => committing.finished().await,
        Err(e) => Err(e),
    };
    committed.map_err(|e| commit_failed(e, &d))?;
    // Known as it is committed (its ctime included). Writes a small file
    // of its own: a disk call.
    if let (Some((d, avg)), Some(key), Some(kept)) =
        (keep, kept_file.as_ref().and_then(FileKey::of), kept)
    {
        blocking(move || kept.remember_on_disk(key, avg, &d)).await;
    }
    Ok((digest, wire_bytes, delta))
}

/// [`receive_get`] of a small file from its start: its bytes are read
/// whole from the stream, then written, checked against the trailer and
/// their commit begun in one call to the disk threads (a small file's
/// trips there, and the thread switches around each, cost more than its
/// bytes).
async fn receive_small(
    recv: &mut Box<dyn RecvHalf>,
    dest: &Path,
    incoming: IncomingFile,
    offer: &GetOffer,
    force: bool,
    progress: &Advance<'_>,
) -> Result<(Digest, u64, Option<DeltaSent>), FileError> {
    let meta = offer.meta;
    let mut wire = exchange::Counted::new(recv);
    let data = tokio::time::timeout(
        exchange::STALL_TIMEOUT,
        exchange::Buffered::read(&mut wire, meta.size, offer.encoding),
    )
    .await
    .map_err(|_| FileError::Transfer {
        path: dest.to_owned(),
        source: TransferError::Stalled,
    })?
    .map_err(|e| download_error(e, dest))?;
    let wire_bytes = wire.count();
    progress(meta.size);
    let trailer: Trailer = reply(recv, exchange::STALL_TIMEOUT).await?;
    let d = dest.to_owned();
    let started = crate::files::quick(move || {
        let written = incoming
            .file()
            .map_err(TransferError::Write)
            .and_then(|mut file| exchange::Whole::write_to(Box::new(data), &mut file));
        let digest = match written {
            Ok(digest) => digest,
            // A full disk: nothing is kept (as for any download, whose
            // bytes are the space a rerun needs), and the message says so.
            Err(TransferError::Write(io)) if exchange::is_disk_full(&io) => {
                incoming.discard();
                return Err(disk_full(&d, &io));
            }
            Err(e) => return Err(download_error(e, &d)),
        };
        if digest != trailer.digest {
            // Never resume from bytes known to be bad.
            incoming.discard();
            return Err(FileError::Corrupt(d));
        }
        let committing = incoming
            .commit_start(&meta, force)
            .map_err(|e| commit_failed(e, &d))?;
        Ok((digest, committing))
    })
    .await;
    let (digest, committing) = started?;
    committing
        .finished()
        .await
        .map_err(|e| commit_failed(e, dest))?;
    Ok((digest, wire_bytes, None))
}

/// A download's commit to `dest` that failed, for the user.
fn commit_failed(e: CommitError, dest: &Path) -> FileError {
    match e {
        CommitError::Exists(p) => FileError::LocalExists(p),
        CommitError::Io { source, .. } => FileError::local(dest)(source),
    }
}

/// A download to `dest` cut short by a full disk, its bytes deleted.
fn disk_full(dest: &Path, io: &std::io::Error) -> FileError {
    FileError::Local {
        path: dest.to_owned(),
        source: std::io::Error::new(
            io.kind(),
            format!("{io}; the local disk is full: the unfinished download was deleted to give its space back; free space there and run the same command again"),
        ),
    }
}

/// A download to `dest` that failed while its bytes arrived, for the user.
pub(super) fn download_error(e: TransferError, dest: &Path) -> FileError {
    match e {
        TransferError::Write(io) => FileError::local(dest)(io),
        TransferError::Network(ref io) if is_source_reset(io) => FileError::Protocol(
            "the server could not read the file to the end (it may have changed); try again".into(),
        ),
        other => FileError::Transfer {
            path: dest.to_owned(),
            source: other,
        },
    }
}

pub(super) fn is_source_reset(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<quinn::ReadError>()),
        Some(quinn::ReadError::Reset(code)) if *code == VarInt::from_u32(RESET_SOURCE_FAILED)
    )
}
