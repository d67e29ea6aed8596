//! An upload into the local root: a temporary or a resumable partial beside its destination, with its space reserved, written through a FileSink and committed atomically.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use cap_std::fs::Dir;

use crate::files;
use crate::files::{
    blocking, to_timestamp, CommitError, Description, Descriptions, FileKey, FileSink,
    IncomingFile, Received, Sink, Start, TransferError, Whole,
};
use crate::paths::RemotePath;
use crate::protocol::{Digest, ErrorCode, FileMeta, RemoteError};
use crate::space::{Reservation, Space};

use super::*;
use super::{
    appeared, corrupt, receive_error, Held, PatchedUpload, Prepared, PutPlan, Sinking, Upload,
};

/// Checks the destination, the free space, and creates the temporary for a
/// put. The destination's directory is opened here, beneath the root, and
/// the commit renames into that handle: swapping a directory on the path for
/// a symlink while the upload runs cannot move where the file lands. Blocking.
pub(super) fn prepare_put(
    root: &Dir,
    plan: &PutPlan,
    space: &Arc<Space>,
    descriptions: Descriptions,
) -> Result<Prepared, RemoteError> {
    Ok(match prepare_local(root, plan, space, descriptions)? {
        Prepared::Present(digest) => Prepared::Present(digest),
        Prepared::Receive {
            upload,
            held,
            discarded_stale,
        } => Prepared::Receive {
            upload,
            held,
            discarded_stale,
        },
    })
}

/// What [`prepare_put`] prepares, before the upload is boxed: what
/// `put_whole` writes into in the same disk call.
pub(super) type LocalPrepared = Prepared<Box<LocalUpload>>;

/// [`prepare_put`], unboxed. Blocking.
pub(super) fn prepare_local(
    root: &Dir,
    plan: &PutPlan,
    space: &Arc<Space>,
    descriptions: Descriptions,
) -> Result<LocalPrepared, RemoteError> {
    let PutPlan {
        path, meta, force, ..
    } = plan;
    let (size, meta_mtime) = (meta.size, meta.mtime);
    let name = path
        .local_file_name()
        .expect("a put path is never the root");
    let name = name.as_os_str();
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
                    .and_then(|f| files::file_digest(&mut f.into_std()))
                    .map_err(|e| fs_error(&e, path, "cannot read"))?;
                return Ok(LocalPrepared::Present(digest));
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
    let label = PathBuf::from(path.wire());
    // Data from a pipe cannot be resumed: a temporary like a small file's,
    // whatever name the server leased for it.
    let Some(partial) = plan.partial.as_deref().filter(|_| !plan.stream) else {
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
                let store = partials::partial_store(root).map_err(creating)?;
                IncomingFile::create_in(store, dest_dir, name, label)
                    .map_err(|e| fs_error(&e, path, "cannot create"))?
            }
        };
        let room = plan.stream.then(|| space.clone());
        return Ok(receive(
            incoming,
            Start::default(),
            reserved,
            room,
            path,
            false,
            descriptions,
        ));
    };
    let store = partials::partial_store(root).map_err(creating)?;
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
    let start = if plan.resume && held > 0 && held <= size {
        incoming.prefix(held)
    } else {
        incoming.restart()
    }
    .map_err(creating)?;
    let reserved = reserve_space(space, &store_fs, size - start.offset, path)?;
    Ok(receive(
        incoming,
        start,
        reserved,
        None,
        path,
        discarded_stale,
        descriptions,
    ))
}

/// A put that will receive into `incoming` from `start`.
pub(super) fn receive(
    incoming: IncomingFile,
    start: Start,
    reserved: Reservation,
    room: Option<Arc<Space>>,
    path: &RemotePath,
    discarded_stale: bool,
    descriptions: Descriptions,
) -> LocalPrepared {
    let held = Held {
        offset: start.offset,
        prefix: start.prefix_digest(),
    };
    LocalPrepared::Receive {
        upload: Box::new(LocalUpload {
            incoming: Some(incoming),
            start: Some(start),
            reserved: Arc::new(reserved),
            room,
            path: path.clone(),
            described: None,
            descriptions,
        }),
        held,
        discarded_stale,
    }
}

/// An upload into a temporary or partial file beside its destination.
pub(super) struct LocalUpload {
    /// Taken by the call that consumes it.
    incoming: Option<IncomingFile>,
    /// Where the data starts; taken by `sink`.
    start: Option<Start>,
    /// The disk space held until the commit (and told of each write).
    reserved: Arc<Reservation>,
    /// For data of unknown length (which reserved nothing): the space to
    /// check before each write.
    room: Option<Arc<Space>>,
    path: RemotePath,
    /// The chunks of a file made by a delta, to remember once committed.
    described: Option<(u32, Description)>,
    /// Where they are remembered: the store's.
    descriptions: Descriptions,
}

impl LocalUpload {
    /// Writes a small upload's bytes, checks them against `expected` and
    /// starts its commit; the upload comes back, to hold its reservation
    /// until the commit is done. Blocking.
    pub(super) fn write_whole(
        mut self: Box<Self>,
        data: Box<dyn Whole>,
        expected: Digest,
        meta: FileMeta,
        force: bool,
    ) -> Result<(Digest, files::Committing, Box<Self>), RemoteError> {
        let incoming = self.incoming.take().expect("the upload is still open");
        let path = &self.path;
        let mut file = incoming
            .file()
            .map_err(|e| fs_error(&e, path, "cannot write"))?;
        let digest = data.write_to(&mut file).map_err(|e| match e {
            TransferError::Write(ref io) => fs_error(io, path, "cannot write"),
            other => receive_error(other, path),
        })?;
        if digest != expected {
            return Err(corrupt(path));
        }
        let committing = incoming
            .commit_start(&meta, force)
            .map_err(|e| commit_error(e, path))?;
        Ok((digest, committing, self))
    }

    fn incoming(&self) -> &IncomingFile {
        self.incoming.as_ref().expect("the upload is still open")
    }

    fn writing(&self) -> impl Fn(io::Error) -> RemoteError + '_ {
        |e| fs_error(&e, &self.path, "cannot write")
    }

    /// Receiving failed with `e`: what a full disk cut short is not kept
    /// for a resume (its bytes are the space the next upload, or this
    /// one's retry, needs). The error to answer with.
    fn failed(&mut self, e: TransferError) -> RemoteError {
        if matches!(&e, TransferError::Write(io) if files::is_disk_full(io)) {
            if let Some(incoming) = self.incoming.take() {
                incoming.discard();
            }
        }
        self.receive_error(e)
    }

    /// The error for data that did not arrive as it should.
    fn receive_error(&self, e: TransferError) -> RemoteError {
        match e {
            TransferError::Write(ref io) => fs_error(io, &self.path, "cannot write"),
            other => receive_error(other, &self.path),
        }
    }
}

#[async_trait]
impl Upload for LocalUpload {
    async fn restart(&mut self) -> Result<(), RemoteError> {
        let start = self.incoming().restart().map_err(self.writing())?;
        self.start = Some(start);
        Ok(())
    }

    async fn sink(&mut self, size: u64) -> Result<Sinking, RemoteError> {
        let file = self.incoming().file().map_err(self.writing())?;
        let start = self.start.take().unwrap_or_default();
        let from = start.offset;
        let sink = FileSink::new(
            file,
            start,
            size,
            self.room.clone(),
            Some(self.reserved.clone()),
        );
        Ok(Sinking {
            sink: Box::new(sink),
            from,
            most: size,
        })
    }

    async fn received(
        &mut self,
        sink: Box<dyn Sink>,
        ended: Result<u64, TransferError>,
    ) -> Result<Received, RemoteError> {
        let sink = sink
            .into_any()
            .downcast::<FileSink>()
            .expect("a local upload is written through its own sink");
        sink.finish(ended).await.map_err(|e| self.failed(e))
    }

    fn patch_target(&mut self) -> Option<Result<std::fs::File, RemoteError>> {
        // Only a fresh temporary (not a resumed partial, not data of
        // unknown length) can start as a clone.
        if self.start.as_ref().is_some_and(|s| s.offset > 0) || self.room.is_some() {
            return None;
        }
        Some(self.incoming().file().map_err(self.writing()))
    }

    async fn patched(
        &mut self,
        made: Result<PatchedUpload, TransferError>,
    ) -> Result<Received, RemoteError> {
        made.map(|made| {
            self.described = made.described;
            made.received
        })
        .map_err(|e| self.failed(e))
    }

    async fn commit_whole(
        mut self: Box<Self>,
        data: Box<dyn Whole>,
        expected: Digest,
        meta: FileMeta,
        force: bool,
    ) -> Result<Digest, RemoteError> {
        let path = self.path.clone();
        // The reservation is held until the commit, however this ends.
        let (digest, committing, _reserved) =
            blocking(move || self.write_whole(data, expected, meta, force)).await?;
        committing
            .finished()
            .await
            .map_err(|e| commit_error(e, &path))?;
        Ok(digest)
    }

    async fn commit(mut self: Box<Self>, meta: FileMeta, force: bool) -> Result<(), RemoteError> {
        let incoming = self.incoming.take().expect("the upload is still open");
        let path = self.path.clone();
        let described = self.described.take();
        let kept = self.descriptions.clone();
        let file = described.as_ref().and_then(|_| incoming.file().ok());
        blocking(move || incoming.commit_start(&meta, force))
            .await
            .map_err(|e| commit_error(e, &path))?
            .finished()
            .await
            .map_err(|e| commit_error(e, &path))?;
        // Known as it is committed: its next delta, either way, need not
        // read it again (see `files::described`).
        if let (Some((avg, d)), Some(key)) = (described, file.as_ref().and_then(FileKey::of)) {
            kept.remember(key, avg, d);
        }
        Ok(())
    }

    async fn abandon(mut self: Box<Self>) {
        if let Some(incoming) = self.incoming.take() {
            incoming.discard();
        }
    }
}

/// The error for a commit that failed.
pub(super) fn commit_error(e: CommitError, path: &RemotePath) -> RemoteError {
    match e {
        CommitError::Exists(_) => appeared(path),
        CommitError::Io { source, .. } => fs_error(&source, path, "cannot commit"),
    }
}

/// Refuses a put that cannot fit, before any byte is written: the space
/// available to the server's user (statvfs f_bavail), less what uploads in
/// flight will still write, must hold what this one will write.
pub(super) fn reserve_space(
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
