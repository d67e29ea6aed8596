//! A put from the client: the source opened safely, the request, the data (pipelined or after a resume offer), the receipt.

use std::fs::File;
use std::path::Path;

use super::batch::WatchFile;
use crate::exchange::{self, blocking, file_meta, Framing, Start, TransferError, DELTA_MIN};
use crate::protocol::stream::{RESET_SOURCE_FAILED, STOP_REFUSED};
use crate::protocol::{
    write_frame, Continue, DeltaBase, Digest, Encoding, ErrorCode, FileMeta, FrameError,
    PutRequest, Receipt, RemoteError, Request, Response, Trailer, RESUME_MIN,
};

use super::get::hash_file;
use super::{reply, unexpected, Client, FileError, RecvHalf, TransferReport};

impl Client {
    /// Uploads `local` to the remote path `remote`. Returns once the server
    /// has committed the file under its final name.
    ///
    /// The data follows the header at once (pipelined), which saves a round
    /// trip per file. A file of [`RESUME_MIN`] bytes or more whose earlier
    /// upload was interrupted goes in resume mode instead: the server offers
    /// what it holds of it, the client checks that prefix against its own
    /// and sends only the rest.
    pub async fn put(
        &self,
        local: &Path,
        remote: &str,
        force: bool,
        progress: &dyn WatchFile,
    ) -> Result<TransferReport, FileError> {
        let path = local.to_owned();
        // A small file is read (hashed, framed) whole in the call that opens
        // it: one trip to the disk threads instead of two. Only a pipelined
        // upload uses it: a small file never resumes, and deltas start at
        // DELTA_MIN, far above PRIME_MAX.
        let framing = Framing::for_sending(self.compression, self.link.quic());
        let (file, meta, primed) = crate::files::quick(move || -> Result<_, FileError> {
            let (file, meta) = open_source(&path)?;
            let primed = (meta.size <= exchange::PRIME_MAX).then(|| {
                file.try_clone()
                    .map_err(TransferError::Read)
                    .and_then(|f| exchange::prime(f, meta.size, framing))
            });
            Ok((file, meta, primed))
        })
        .await?;
        // A large file goes in resume mode (offer first) only if an earlier
        // run left it unfinished; see [`UploadJournal`].
        let entry = (self.resume && meta.size >= RESUME_MIN)
            .then(|| self.journal.as_ref().map(|j| j.entry(remote, &meta)));
        let resume = match &entry {
            None => false,
            Some(None) => true,
            Some(Some(path)) => {
                let path = path.clone();
                blocking(move || path.exists() || std::fs::write(path, b"").is_err()).await
            }
        };
        let finished = || async {
            if let Some(Some(path)) = &entry {
                let path = path.clone();
                blocking(move || std::fs::remove_file(path)).await.ok();
            }
        };
        let result = self
            .put_with(local, remote, force, progress, file, meta, resume, primed)
            .await;
        if result.is_ok() {
            finished().await;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn put_with(
        &self,
        local: &Path,
        remote: &str,
        force: bool,
        progress: &dyn WatchFile,
        file: File,
        meta: FileMeta,
        resume: bool,
        primed: Option<Result<exchange::Primed, TransferError>>,
    ) -> Result<TransferReport, FileError> {
        let (mut send, mut recv) = self.open().await?;
        let mut framing = Framing::for_sending(self.compression, self.link.quic());
        // Replacing a file in sync mode: as a delta against the version the
        // server holds, which it describes after its answer.
        let delta = self.delta && force && meta.size >= DELTA_MIN;
        if delta {
            framing.encoding = Encoding::Delta;
        }
        let request = Request::Put(PutRequest {
            path: remote.to_owned(),
            meta,
            force,
            resume,
            encoding: framing.encoding,
        });
        write_frame(&mut send, &request).await?;
        let mut notes = Vec::new();
        // In resume mode, and for a delta, the data waits for the answer.
        let waits = resume || delta;
        let mut base = None;
        let (file, start) = if waits {
            let offer = match reply::<Response>(&mut recv, self.within(meta.size)).await? {
                Response::PutAccepted(offer) => offer,
                Response::AlreadyThere(digest) => {
                    return already_on_server(local, remote, meta.size, digest).await
                }
                Response::Refused(e) => return Err(e.into()),
                other => return Err(unexpected(&other)),
            };
            if offer.discarded_stale {
                notes.push(format!(
                    "{}: the file changed since an earlier interrupted upload; starting over",
                    local.display()
                ));
            }
            if delta {
                // Our file is cut while the server describes its own.
                let described = reply::<DeltaBase>(&mut recv, self.within(meta.size)).await?;
                let cutter = exchange::Cutter::with_avg(described.avg_chunk).ok_or_else(|| {
                    FileError::Protocol(format!(
                        "{remote}: the server cut its version in chunks of {} bytes",
                        described.avg_chunk
                    ))
                })?;
                let src = exchange::FileBytes::new(
                    file.try_clone().map_err(FileError::local(local))?,
                    self.descriptions.clone(),
                );
                let (index, cut) =
                    exchange::cut_while_described(&mut recv, described, &src, meta.size, cutter)
                        .await;
                let index = index.map_err(|e| FileError::Protocol(format!("{remote}: {e}")))?;
                let cut = cut.map_err(|source| FileError::Transfer {
                    path: local.to_owned(),
                    source,
                })?;
                base = Some((index, cut, src));
            }
            if !resume {
                (file, Start::default())
            } else {
                let (file, start) = check_offer(file, meta.size, offer.offset, offer.prefix)
                    .await
                    .map_err(FileError::local(local))?;
                if offer.offset > 0 && start.offset == 0 {
                    notes.push(format!(
                    "{}: what the server kept of an earlier upload does not match this file; starting over",
                    local.display()
                ));
                }
                write_frame(
                    &mut send,
                    &Continue {
                        offset: start.offset,
                    },
                )
                .await?;
                progress.kept(start.offset);
                (file, start)
            }
        } else {
            (file, Start::default())
        };
        let resumed_from = start.offset;
        let pace = self.pace.clone();
        let source_failed = tokio::sync::Notify::new();
        let mut bytes_sent = meta.size - resumed_from;
        let sending = async {
            let mut wire = exchange::Counted::new(&mut send);
            let sent = match base {
                Some((index, cut, src)) => {
                    drop(file);
                    exchange::send_cut(
                        &src,
                        cut,
                        start.offset,
                        &index,
                        framing,
                        pace,
                        &mut wire,
                        &|n| progress.inc(n),
                        &|n| progress.kept(n),
                    )
                    .await
                    .map(|(digest, delta)| {
                        bytes_sent = delta.literal;
                        digest
                    })
                }
                // Read when it was opened (framed as then): a pipelined
                // upload from its start, as here.
                None if !waits && primed.is_some() => match primed.expect("checked") {
                    Ok(primed) => {
                        drop(file);
                        exchange::send_primed(primed, pace, &mut wire, &|n| progress.inc(n)).await
                    }
                    Err(e) => Err(e),
                },
                None => {
                    exchange::send_file(file, meta.size, start, framing, pace, &mut wire, &|n| {
                        progress.inc(n)
                    })
                    .await
                }
            };
            let wire_bytes = wire.count();
            let digest = match sent {
                Ok(digest) => digest,
                Err(e) => {
                    // Our own file failed us (unreadable, shrank, changed):
                    // tell the server to drop what it has, so it does not
                    // wait for the rest, and let the other files go on.
                    if e.is_source_failure() {
                        send.reset(RESET_SOURCE_FAILED);
                        source_failed.notify_one();
                    }
                    return Err(e);
                }
            };
            write_frame(&mut send, &Trailer { digest })
                .await
                .map_err(|e| match e {
                    FrameError::Io(io) => TransferError::Network(io),
                    other => TransferError::Network(std::io::Error::other(other)),
                })?;
            send.finish();
            Ok::<_, TransferError>((digest, wire_bytes))
        };
        // Pipelined, the response arrives while the data goes out (unless
        // our own file fails first: then the answer no longer matters).
        let (sent, response) = if waits {
            (sending.await, None)
        } else {
            tokio::join!(sending, async {
                tokio::select! {
                    r = reply::<Response>(&mut recv, self.within(meta.size)) => Some(r),
                    _ = source_failed.notified() => None,
                }
            })
        };
        let sent = match sent {
            Err(e) if e.is_source_failure() => {
                recv.stop(STOP_REFUSED);
                return Err(FileError::Transfer {
                    path: local.to_owned(),
                    source: e,
                });
            }
            other => other,
        };
        match response.transpose() {
            Ok(None) => {}
            Ok(Some(Response::PutAccepted(offer))) => {
                if offer.discarded_stale {
                    notes.push(format!(
                        "{}: the file changed since an earlier interrupted upload; the server dropped what it kept and took it whole",
                        local.display()
                    ));
                }
            }
            Ok(Some(Response::AlreadyThere(digest))) => {
                return already_on_server(local, remote, meta.size, digest).await;
            }
            Ok(Some(Response::Refused(e))) => return Err(e.into()),
            Ok(Some(other)) => return Err(unexpected(&other)),
            Err(e) => {
                return Err(match sent {
                    Err(source) => FileError::Transfer {
                        path: local.to_owned(),
                        source,
                    },
                    Ok(_) => e.into(),
                })
            }
        }
        // Even when sending failed, the receipt usually says why (full disk...).
        let receipt = reply::<Receipt>(&mut recv, self.receipt_within(meta.size)).await;
        match (receipt, sent) {
            (Ok(Receipt::Failed(e)), _) => Err(e.into()),
            (_, Err(source)) => Err(FileError::Transfer {
                path: local.to_owned(),
                source,
            }),
            (Ok(Receipt::Committed { size, digest }), Ok((ours, wire_bytes))) => {
                if digest != ours || size != meta.size {
                    return Err(FileError::Corrupt(local.to_owned()));
                }
                Ok(TransferReport {
                    name: local.display().to_string(),
                    dest: remote.to_owned(),
                    bytes: size,
                    blake3: digest,
                    resumed_from,
                    bytes_sent,
                    wire_bytes,
                    notes,
                    already_there: false,
                    delta,
                    seconds: 0.0,
                })
            }
            (Err(e), Ok(_)) => Err(e.into()),
        }
    }
}

impl Client {
    /// Why the server stopped taking an upload's data, if it says within
    /// the reply timeout (too large, a full disk, space promised to others).
    async fn stop_reason(&self, recv: &mut Box<dyn RecvHalf>) -> Option<FileError> {
        match reply::<Receipt>(recv, self.reply_timeout).await {
            Ok(Receipt::Failed(refused)) => Some(refused.into()),
            _ => None,
        }
    }

    /// Uploads everything `input` gives until it ends (standard input, for
    /// `qxfer put - NAME`) to the remote path `remote`. Its length is known
    /// only at its end, so nothing can be resumed: an upload that fails
    /// leaves nothing on the server, and the data that was read is gone
    /// from the pipe. Nothing is read before the server accepts the name,
    /// so a refusal (the name exists, the server is read-only) consumes
    /// none of the input. The file gets the server's default mode and the
    /// time of the upload as its mtime.
    ///
    /// `input` is read on a thread of its own until it ends, even if the
    /// upload fails first: pass something that is fine to leave so (the
    /// command line passes its standard input and then exits).
    pub async fn put_stream<R>(
        &self,
        input: R,
        remote: &str,
        force: bool,
        progress: &dyn WatchFile,
    ) -> Result<TransferReport, FileError>
    where
        R: std::io::Read + std::os::fd::AsFd + Send + 'static,
    {
        let label = Path::new(STDIN);
        // A pipe's 64 KiB default makes its writer wait on every block.
        exchange::widen_pipe(&input);
        let (mut send, mut recv) = self.open().await?;
        let mut framing = Framing::for_sending(self.compression, self.link.quic());
        framing.encoding = Encoding::Stream;
        let request = Request::Put(PutRequest {
            path: remote.to_owned(),
            meta: FileMeta {
                size: 0,
                mtime: None,
                mode: None,
            },
            force,
            resume: false,
            encoding: Encoding::Stream,
        });
        write_frame(&mut send, &request).await?;
        match reply::<Response>(&mut recv, self.reply_timeout).await? {
            Response::PutAccepted(_) => {}
            Response::Refused(mut e) => {
                if e.code == ErrorCode::Protocol {
                    // Data of unknown length came with this client's
                    // version of the protocol; an older server refuses it
                    // as a malformed request.
                    e.message
                        .push_str(" (a server older than this client cannot take `put -`)");
                }
                return Err(e.into());
            }
            other => return Err(unexpected(&other)),
        }
        let mut wire = exchange::Counted::new(&mut send);
        let sent = exchange::send_pipe(input, framing, self.pace.clone(), &mut wire, &|n| {
            progress.inc(n)
        })
        .await;
        let wire_bytes = wire.count();
        let (size, ours) = match sent {
            Ok(done) => done,
            Err(TransferError::Read(e)) => {
                // Tell the server to drop what it has.
                send.reset(RESET_SOURCE_FAILED);
                recv.stop(STOP_REFUSED);
                return Err(FileError::Local {
                    path: label.to_owned(),
                    source: e,
                });
            }
            Err(source) => {
                // The server usually says why it stopped taking the data
                // (too large, a full disk).
                return Err(match self.stop_reason(&mut recv).await {
                    Some(refused) => refused,
                    // ("Rerun to resume" is no advice for a pipe.)
                    None if matches!(source, TransferError::Stalled) => {
                        FileError::Protocol(format!(
                            "the server took none of the data for {} s",
                            exchange::STALL_TIMEOUT.as_secs()
                        ))
                    }
                    None => FileError::Transfer {
                        path: label.to_owned(),
                        source,
                    },
                });
            }
        };
        let unconfirmed = |why: String| FileError::Unconfirmed {
            name: remote.to_owned(),
            why,
        };
        if let Err(e) = write_frame(&mut send, &Trailer { digest: ours }).await {
            // All the data went out before the server stopped taking it
            // (a full disk, space promised to others): its answer says
            // why, and nothing was saved. Without that answer the outcome
            // is unknown.
            let refused = self.stop_reason(&mut recv).await;
            return Err(refused.unwrap_or_else(|| unconfirmed(e.to_string())));
        }
        send.finish();
        let receipt = reply::<Receipt>(&mut recv, self.receipt_within(size))
            .await
            .map_err(|e| unconfirmed(e.to_string()))?;
        match receipt {
            Receipt::Failed(e) => Err(e.into()),
            Receipt::Committed {
                size: theirs,
                digest,
            } => {
                if digest != ours || theirs != size {
                    return Err(FileError::Corrupt(label.to_owned()));
                }
                Ok(TransferReport {
                    name: "-".to_owned(),
                    dest: remote.to_owned(),
                    bytes: size,
                    blake3: digest,
                    resumed_from: 0,
                    bytes_sent: size,
                    wire_bytes,
                    notes: Vec::new(),
                    already_there: false,
                    delta: false,
                    seconds: 0.0,
                })
            }
        }
    }
}

/// How errors name the input of `put -`.
const STDIN: &str = "standard input";

/// Opens a local file to send and reads its metadata.
///
/// Opened without blocking (O_NONBLOCK): opening a FIFO for reading would
/// otherwise wait for a writer forever; it is refused below as not a
/// regular file, as the server refuses it.
pub(super) fn open_source(local: &Path) -> Result<(File, FileMeta), FileError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = opts.open(local).map_err(FileError::local(local))?;
    let md = file.metadata().map_err(FileError::local(local))?;
    if !md.is_file() {
        let why = if md.is_dir() {
            "is a directory"
        } else {
            "is not a regular file"
        };
        return Err(FileError::Local {
            path: local.to_owned(),
            source: std::io::Error::other(format!("{why}; only regular files can be sent")),
        });
    }
    Ok((file, file_meta(&md)))
}

/// The server holds a file of the same size and mtime at `remote`, with
/// BLAKE3 `theirs`: done if ours is the same, else the usual "exists" error.
pub(super) async fn already_on_server(
    local: &Path,
    remote: &str,
    size: u64,
    theirs: Digest,
) -> Result<TransferReport, FileError> {
    let ours = hash_file(local).await?;
    if ours != theirs {
        return Err(FileError::Remote(RemoteError::new(
            ErrorCode::AlreadyExists,
            format!("'{remote}' already exists on the server with other contents; use --force to overwrite it"),
        )));
    }
    Ok(TransferReport::already_there(
        local.display().to_string(),
        remote.to_owned(),
        size,
        ours,
    ))
}

/// Compares the server's offer (`offset` bytes hashing to `prefix`) with
/// the local file: the start to send from, and the file positioned there.
pub(super) async fn check_offer(
    file: File,
    size: u64,
    offset: u64,
    prefix: Digest,
) -> std::io::Result<(File, Start)> {
    blocking(move || {
        let mut file = file;
        let start = exchange::matching_start(&mut file, size, offset, &prefix)?;
        Ok((file, start))
    })
    .await
}
