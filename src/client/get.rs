//! A get from the client: the destination checked, a resume offered from a partial, the data received, verified and committed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::exchange::{
    self, blocking, Advance, Cutter, IncomingFile, Start, TransferError, DELTA_MIN,
};
use crate::exchange::{RecvHalf, SendHalf};
use crate::protocol::stream::{RESET_SOURCE_FAILED, STOP_REFUSED};
use crate::protocol::{
    write_frame, Compression, DeltaBase, Digest, ErrorCode, GetDeltaRequest, GetRequest, Prefix,
    Receipt, RemoteError, Request, Response, Trailer, RESUME_MIN,
};

use super::batch::WatchFile;
use super::dest::Dest;
use super::receive::*;
use super::{reply, unexpected, Client, FileError, TransferReport};

impl Client {
    /// Downloads the remote file `remote` to the local path `dest`. Returns
    /// once the file is complete, synced and under its final name.
    ///
    /// The data goes to `DEST.qxfer-part` first. If an earlier download was
    /// interrupted, that file holds its bytes: the client sends their length
    /// and BLAKE3, and the server sends only the rest if its own file has
    /// the same prefix (else everything, and the part is rewritten).
    pub async fn get(
        &self,
        remote: &str,
        dest: &Path,
        force: bool,
        on_start: &Advance<'_>,
        progress: &dyn WatchFile,
    ) -> Result<TransferReport, FileError> {
        self.get_sized(remote, dest, None, None, force, on_start, progress)
            .await
    }

    /// [`Client::get`] of a file whose size is known from a listing, into
    /// the download tree whose top is `within` (if any): below that top no
    /// link is ever followed (see the `dest` module). A file under
    /// [`RESUME_MIN`] bytes is received into an anonymous temporary beside
    /// `dest` instead of `DEST.qxfer-part`: it is not worth resuming, and a
    /// thousand small downloads then leave no names to create, lock and
    /// rename, nor anything behind if interrupted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn get_sized(
        &self,
        remote: &str,
        dest: &Path,
        within: Option<&Path>,
        size_hint: Option<u64>,
        force: bool,
        on_start: &Advance<'_>,
        progress: &dyn WatchFile,
    ) -> Result<TransferReport, FileError> {
        let (d, w) = (dest.to_owned(), within.map(Path::to_owned));
        let small = size_hint.is_some_and(|s| s < RESUME_MIN);
        // The destination's directory, what is there now and a small
        // file's temporary, in one trip to the disk threads: on a tree of
        // small files each trip (two thread switches) costs more than the
        // file's bytes.
        let (target, here, anonymous) = crate::files::quick(move || -> Result<_, FileError> {
            let target = Dest::open(&d, w.as_deref())?;
            if check_local_dest(&target, force)? {
                return Ok((target, true, None));
            }
            let anonymous = if small {
                anonymous_download(&target)?
            } else {
                None
            };
            Ok((target, false, anonymous))
        })
        .await?;
        let target = Arc::new(target);
        if here {
            return self.already_here(remote, target).await;
        }
        let (incoming, start) = match anonymous {
            Some(incoming) => (incoming, Start::default()),
            None => open_download(target.clone(), self.resume).await?,
        };
        // Replacing a file in sync mode: the server sends a delta against
        // the version here, which the request describes.
        let old = if self.delta && force && size_hint.is_none_or(|s| s >= DELTA_MIN) {
            let (t, kept) = (target.clone(), self.descriptions.clone());
            blocking(move || open_old_version(&t, kept)).await
        } else {
            None
        };
        let (mut send, mut recv) = self.open().await?;
        let get = GetRequest {
            path: remote.to_owned(),
            resume: (start.offset > 0).then(|| Prefix {
                offset: start.offset,
                digest: start.prefix_digest(),
            }),
            compression: self.compression,
        };
        let request = match &old {
            Some(old) => Request::GetDelta(GetDeltaRequest {
                get,
                base: DeltaBase {
                    size: old.size,
                    avg_chunk: Cutter::for_size(old.size).avg(),
                },
            }),
            None => Request::Get(get),
        };
        write_frame(&mut send, &request).await?;
        let describing = async {
            let Some(old) = &old else {
                return Ok(());
            };
            let described =
                exchange::send_chunks(&old.bytes, old.size, Cutter::for_size(old.size), &mut send)
                    .await;
            if let Err(TransferError::OldVersion(_)) = &described {
                // The server waits for the rest of the description.
                send.reset(RESET_SOURCE_FAILED);
            }
            described
        };
        let waiting = start.offset.max(old.as_ref().map_or(0, |o| o.size));
        let (described, offer) = tokio::join!(
            describing,
            reply::<Response>(&mut recv, self.within(waiting))
        );
        if let Err(TransferError::OldVersion(e)) = described {
            return Err(FileError::Local {
                path: dest.to_owned(),
                source: e,
            });
        }
        let offer = match offer? {
            Response::GetAccepted(offer) => offer,
            Response::Refused(e) => return Err(e.into()),
            other => return Err(unexpected(&other)),
        };
        if offer.offset > offer.meta.size {
            return Err(FileError::Protocol(format!(
                "the server offered to continue {remote} at byte {} of a {}-byte file",
                offer.offset, offer.meta.size
            )));
        }
        let mut notes = Vec::new();
        let start = if offer.offset == start.offset {
            start
        } else if offer.offset == 0 {
            notes.push(format!(
                "{remote}: changed on the server since the interrupted download (or the partial file {} was damaged); starting over",
                part_path(dest).display()
            ));
            incoming.restart().map_err(FileError::local(dest))?
        } else {
            return Err(FileError::Protocol(format!(
                "the server offered to continue {remote} at byte {} but we hold {}",
                offer.offset, start.offset
            )));
        };
        on_start(offer.meta.size);
        progress.kept(start.offset);
        let resumed_from = start.offset;
        let mut wire_bytes = 0;
        let mut delta = None;
        let result = receive_get(
            &mut recv,
            dest,
            incoming,
            start,
            &offer,
            old.as_ref(),
            self.delta.then(|| self.descriptions.clone()),
            force,
            self.pace.clone(),
            &|n| progress.inc(n),
            &|n| progress.kept(n),
        )
        .await;
        let result = result.map(|(digest, wire, d)| {
            wire_bytes = wire;
            delta = d;
            digest
        });
        send_receipt(&mut send, &mut recv, offer.meta.size, &result).await;
        result.map(|digest| TransferReport {
            name: remote.to_owned(),
            dest: dest.display().to_string(),
            bytes: offer.meta.size,
            blake3: digest,
            resumed_from,
            bytes_sent: delta.map_or(offer.meta.size - resumed_from, |d| d.literal),
            wire_bytes,
            notes,
            already_there: false,
            delta: delta.is_some(),
            seconds: 0.0,
        })
    }

    /// Downloads the remote file `remote` to standard output, as it
    /// arrives: nothing else is written there, nothing is resumed or kept,
    /// and the BLAKE3 is checked at the end (a mismatch is an error, after
    /// the fact: the reader must discard what it got).
    pub(crate) async fn get_to_stdout(
        &self,
        remote: &str,
        progress: &dyn WatchFile,
    ) -> Result<TransferReport, FileError> {
        const STDOUT: &str = "standard output";
        let (mut send, mut recv) = self.open().await?;
        let request = Request::Get(GetRequest {
            path: remote.to_owned(),
            resume: None,
            compression: self.compression,
        });
        write_frame(&mut send, &request).await?;
        let offer = match reply::<Response>(&mut recv, self.reply_timeout).await? {
            Response::GetAccepted(offer) => offer,
            Response::Refused(e) => return Err(e.into()),
            other => return Err(unexpected(&other)),
        };
        if offer.offset != 0 {
            return Err(FileError::Protocol(format!(
                "the server offered to continue {remote} at byte {} of a download that asked for all of it",
                offer.offset
            )));
        }
        check_framing(&offer)?;
        progress.set_length(offer.meta.size);
        let mut wire = exchange::Counted::new(&mut recv);
        let received = exchange::receive_to_writer(
            &mut wire,
            offer.meta.size,
            std::io::stdout(),
            offer.encoding,
            self.pace.clone(),
            &|n| progress.inc(n),
        )
        .await
        .map_err(|e| download_error(e, Path::new(STDOUT)));
        let wire_bytes = wire.count();
        let checked = match received {
            Ok(digest) => match reply::<Trailer>(&mut recv, exchange::STALL_TIMEOUT).await {
                Ok(trailer) if trailer.digest == digest => Ok(digest),
                Ok(_) => Err(FileError::CorruptOutput(remote.to_owned())),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        send_receipt(&mut send, &mut recv, offer.meta.size, &checked).await;
        checked.map(|digest| TransferReport {
            name: remote.to_owned(),
            dest: "-".to_owned(),
            bytes: offer.meta.size,
            blake3: digest,
            resumed_from: 0,
            bytes_sent: offer.meta.size,
            wire_bytes,
            notes: Vec::new(),
            already_there: false,
            delta: false,
            seconds: 0.0,
        })
    }

    /// `dest` exists: done if it is the remote file already (the server
    /// finds its whole BLAKE3 equal to the prefix we send, which is all of
    /// our file), else the usual "exists, use --force" error.
    pub(super) async fn already_here(
        &self,
        remote: &str,
        target: Arc<Dest>,
    ) -> Result<TransferReport, FileError> {
        let dest = &target.path.clone();
        let t = target.clone();
        let (size, ours) = blocking(move || {
            // The name, not what a link there points at (a link is no
            // file, and check_local_dest refused it already).
            let mut opts = cap_std::fs::OpenOptions::new();
            cap_std::fs::OpenOptionsExt::custom_flags(opts.read(true), libc::O_NOFOLLOW);
            let mut file = t.dir.open_with(&t.name, &opts)?.into_std();
            let size = file.metadata()?.len();
            Ok((size, exchange::file_digest(&mut file)?))
        })
        .await
        .map_err(FileError::local(dest))?;
        let (mut send, mut recv) = self.open().await?;
        let request = Request::Get(GetRequest {
            path: remote.to_owned(),
            resume: Some(Prefix {
                offset: size,
                digest: ours,
            }),
            compression: Compression::Never,
        });
        write_frame(&mut send, &request).await?;
        let offer = match reply::<Response>(&mut recv, self.within(size)).await? {
            Response::GetAccepted(offer) => offer,
            Response::Refused(e) => return Err(e.into()),
            other => return Err(unexpected(&other)),
        };
        let same = offer.offset == size && offer.meta.size == size;
        let theirs = if same {
            Some(reply::<Trailer>(&mut recv, self.within(size)).await?.digest)
        } else {
            None
        };
        if theirs != Some(ours) {
            recv.stop(STOP_REFUSED);
            send.finish();
            return Err(FileError::LocalExists(dest.to_owned()));
        }
        let receipt = Receipt::Committed { size, digest: ours };
        if write_frame(&mut send, &receipt).await.is_ok() {
            send.finish();
            send.acknowledged(Duration::from_secs(1)).await;
        }
        Ok(TransferReport::already_there(
            remote.to_owned(),
            dest.display().to_string(),
            size,
            ours,
        ))
    }
}

/// Checks the local destination: `Ok(true)` if a regular file is there and
/// `force` is off (it may be this very file, from an earlier run), an error
/// for a directory or something else in the way.
pub(super) fn check_local_dest(dest: &Dest, force: bool) -> Result<bool, FileError> {
    match dest.dir.symlink_metadata(&dest.name) {
        Ok(md) if md.is_dir() => Err(FileError::Local {
            path: dest.path.clone(),
            source: std::io::Error::other("is a directory; choose another -o or name"),
        }),
        Ok(md) if !force && md.is_file() => Ok(true),
        Ok(_) if !force => Err(FileError::LocalExists(dest.path.clone())),
        _ => Ok(false),
    }
}

/// The BLAKE3 of the whole local file at `path`.
pub(super) async fn hash_file(path: &Path) -> Result<Digest, FileError> {
    let p = path.to_owned();
    blocking(move || File::open(&p).and_then(|mut f| exchange::file_digest(&mut f)))
        .await
        .map_err(FileError::local(path))
}

/// Where a download to `dest` keeps its bytes until it is complete:
/// `NAME.qxfer-part` beside it. A name too long for that (the suffix would
/// pass the 255 bytes a file name may have) keeps as much of its start as
/// fits, then `~` and 16 hex digits of its BLAKE3: still one name per
/// destination, so an interrupted download of it resumes too.
pub fn part_path(dest: &Path) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    const NAME_MAX: usize = 255;
    let full = dest.file_name().unwrap_or_default().as_bytes();
    let mut name = full.to_vec();
    if full.len() + PART_SUFFIX.len() > NAME_MAX {
        let tag = &blake3::hash(full).to_hex()[..16];
        let keep = NAME_MAX - PART_SUFFIX.len() - 1 - tag.len();
        // Cut where a UTF-8 character starts, so the name stays readable.
        let mut cut = keep;
        while cut > 0 && (full[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
        name.truncate(cut);
        name.push(b'~');
        name.extend_from_slice(tag.as_bytes());
    }
    name.extend_from_slice(PART_SUFFIX.as_bytes());
    dest.with_file_name(std::ffi::OsString::from_vec(name))
}

/// Suffix of partial downloads beside their destination.
pub const PART_SUFFIX: &str = ".qxfer-part";

/// An anonymous temporary beside the destination, if the system allows
/// one. Blocking.
pub(super) fn anonymous_download(target: &Dest) -> Result<Option<IncomingFile>, FileError> {
    let dir = target
        .dir
        .try_clone()
        .map_err(FileError::local(&target.path))?;
    IncomingFile::create_anonymous(dir, &target.name, target.path.clone())
        .map_err(FileError::local(&target.path))
}

/// Opens `DEST.qxfer-part` beside the destination and, if `resume` and it
/// holds bytes, hashes them.
pub(super) async fn open_download(
    target: Arc<Dest>,
    resume: bool,
) -> Result<(IncomingFile, Start), FileError> {
    blocking(move || {
        let part = part_path(&target.path);
        let part_name = part.file_name().expect("a part has a name").to_owned();
        let open = || -> std::io::Result<(IncomingFile, Start)> {
            let dir = target.dir.try_clone()?;
            let incoming = IncomingFile::open_partial(
                dir.try_clone()?,
                &part_name,
                dir,
                &target.name,
                target.path.clone(),
            )?;
            let held = incoming.held()?;
            let start = if resume && held > 0 {
                incoming.prefix(held)?
            } else {
                incoming.restart()?
            };
            Ok((incoming, start))
        };
        open().map_err(|e| {
            if e.kind() == std::io::ErrorKind::ResourceBusy {
                FileError::Local {
                    path: part.clone(),
                    source: std::io::Error::new(
                        e.kind(),
                        "another qxfer is downloading to this file right now",
                    ),
                }
            } else {
                FileError::local(&target.path)(e)
            }
        })
    })
    .await
}

/// Tells the server how a download of `size` bytes ended: committed with
/// its digest, or failed (and stops the stream). The receipt only informs
/// the server's log; the file is already safe. It waits briefly for the
/// receipt to be acknowledged, so closing the connection right after does
/// not discard it.
async fn send_receipt(
    send: &mut Box<dyn SendHalf>,
    recv: &mut Box<dyn RecvHalf>,
    size: u64,
    result: &Result<Digest, FileError>,
) {
    let receipt = match result {
        Ok(digest) => Receipt::Committed {
            size,
            digest: *digest,
        },
        Err(e) => {
            recv.stop(STOP_REFUSED);
            Receipt::Failed(RemoteError::new(ErrorCode::Internal, e.to_string()))
        }
    };
    if write_frame(send, &receipt).await.is_ok() {
        send.finish();
        send.acknowledged(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_always_fit_and_stay_one_per_destination() {
        assert_eq!(
            part_path(Path::new("/d/notes.txt")),
            Path::new("/d/notes.txt.qxfer-part")
        );
        for len in [240, 244, 245, 250, 255] {
            let long = "é".repeat(len / 2) + &"x".repeat(len % 2);
            assert_eq!(long.len(), len);
            let part = part_path(&Path::new("/d").join(&long));
            let name = part.file_name().unwrap().to_str().expect("still UTF-8");
            assert!(name.len() <= 255, "{len}: {}", name.len());
            assert!(name.ends_with(PART_SUFFIX));
            assert_eq!(part, part_path(&Path::new("/d").join(&long)), "stable");
        }
        let a = part_path(Path::new(&format!("{}a", "x".repeat(254))));
        let b = part_path(Path::new(&format!("{}b", "x".repeat(254))));
        assert_ne!(a, b, "names that share their start get different parts");
    }
}
