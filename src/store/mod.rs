//! Storage behind one trait: everything the server does with files goes through a [`Store`].
//!
//! The server's handlers speak the protocol and enforce policy (read-only,
//! size limits, one writer per resumable upload); a store answers what is
//! there and keeps what arrives: stat and list (one level or a whole tree),
//! read a file from an offset, create a directory, and an upload that is
//! appended to, proven (the BLAKE3 of the prefix it holds, for a resume),
//! and then committed atomically under its final name or abandoned.
//!
//! Two implementations:
//! - [`local`]: a directory on this machine, sandboxed with cap-std
//!   (today's behaviour: partial store, fsync, renameat2 no-replace, modes
//!   and mtimes);
//! - [`object`]: an S3-compatible object store through the `object_store`
//!   crate, which several servers can share (multipart uploads whose state
//!   lives in the bucket, ranged reads, metadata as object metadata).
//!
//! Names reach a store already validated ([`RemotePath`]); each store keeps
//! them beneath its root (cap-std for a directory, a key prefix for a
//! bucket) and hides its own bookkeeping under the reserved `.qxfer-` names.

use std::time::Duration;

use async_trait::async_trait;

use crate::files::{self, ByteSource, Description, Received, Sink, TransferError, Whole};
use crate::paths::RemotePath;
use crate::protocol::{Digest, DirMeta, Entry, ErrorCode, FileMeta, Prefix, RemoteError};

pub(crate) mod local;
pub(crate) mod object;
pub(crate) mod tree_hash;

/// Where an upload's data goes: the store's [`Sink`], the offset its
/// bytes start at, and the most bytes the file may reach there.
pub(crate) struct Sinking {
    pub(crate) sink: Box<dyn Sink>,
    pub(crate) from: u64,
    pub(crate) most: u64,
}

/// What patching a clone of the old version made (see
/// [`Upload::patched`]): the file's size and BLAKE3, and where they could
/// be told, its chunks and the average size they were cut at.
pub(crate) struct PatchedUpload {
    pub(crate) received: Received,
    pub(crate) described: Option<(u32, Description)>,
}

/// Tells the sweep whether an upload is writing the partial of this name now.
pub(crate) type InUse = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Where files live. Every method takes names already validated; errors
/// come back as the client will see them, naming the file and what to do.
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The entries of the directory `path` (with `recursive`, everything
    /// beneath it, names relative to it), sorted by name, or the single
    /// entry if `path` is not a directory. Bookkeeping names are hidden.
    async fn list(&self, path: &RemotePath, recursive: bool) -> Result<Vec<Entry>, RemoteError>;

    /// Creates the directory `path` and its parents if missing, then applies `meta`.
    async fn mkdir(&self, path: &RemotePath, meta: Option<DirMeta>) -> Result<(), RemoteError>;

    /// Removes the file `path` (a link: the link itself), or the directory
    /// `path` if it is empty or `recursive` (then with everything in it,
    /// following no link). A directory with something in it, without
    /// `recursive`, is refused with [`ErrorCode::NotEmpty`].
    async fn remove(&self, path: &RemotePath, recursive: bool) -> Result<(), RemoteError>;

    /// Renames the file or directory `from` to `to`, which must not exist
    /// (whose directory must).
    async fn rename(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteError>;

    /// Opens the file `path` for sending. With `resume`, the client holds
    /// that prefix: the data starts after it if the file's own prefix has
    /// the same BLAKE3, else at 0.
    async fn open(&self, path: &RemotePath, resume: Option<Prefix>) -> Result<Opened, RemoteError>;

    /// [`Store::open`], and a file of at most `files::SMALL_READ_MAX`
    /// bytes to be sent from its start also read whole (and hashed) in the
    /// same call: the local root then makes one trip to its disk threads
    /// for a small file's get instead of two. Other stores read nothing
    /// here.
    async fn open_small(
        &self,
        path: &RemotePath,
        resume: Option<Prefix>,
    ) -> Result<(Opened, Option<Result<files::SmallRead, TransferError>>), RemoteError> {
        Ok((self.open(path, resume).await?, None))
    }

    /// The BLAKE3 of the regular file `path`, or None if no regular file
    /// is there (`--checksum`). This reads the file unless the store keeps
    /// its digest (an object's metadata) or a store overrides it with a
    /// cache (the local root's, keyed by inode, size, mtime and ctime).
    async fn digest(&self, path: &RemotePath) -> Result<Option<Digest>, RemoteError> {
        let opened = match self.open(path, None).await {
            Ok(o) => o,
            Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::IsDirectory) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if let Some(d) = opened.digest {
            return Ok(Some(d));
        }
        let size = opened.meta.size;
        files::hash_source(opened.bytes.as_ref(), size)
            .await
            .map(Some)
            .map_err(|e| {
                RemoteError::new(ErrorCode::Internal, format!("cannot read '{path}': {e}"))
            })
    }

    /// [`Store::digest`] of each of `paths`, in order; `None` also where
    /// one could not be had (the client then sends that file). A store
    /// answers a few at a time; the local root in groups, one trip to the
    /// disk pool each.
    async fn digests(&self, paths: Vec<RemotePath>) -> Vec<Option<Digest>> {
        use futures::StreamExt;
        futures::stream::iter(paths)
            .map(|p| async move { self.digest(&p).await.ok().flatten() })
            .buffered(8)
            .collect()
            .await
    }

    /// Whether its files are local files (whose chunks the server may
    /// describe in the background after an upload); a bucket's are not.
    fn holds_local_files(&self) -> bool {
        false
    }

    /// Checks the destination of a put and prepares what receives it.
    async fn prepare_put(&self, plan: PutPlan) -> Result<Prepared, RemoteError>;

    /// A small upload whose bytes (`data`, with the BLAKE3 `expected`) have
    /// all arrived: the destination checked, the bytes written and
    /// committed. The local root does it all in one disk call (a small
    /// file's trips to the disk threads cost more than its bytes); other
    /// stores as [`Store::prepare_put`] then [`Upload::commit_whole`].
    async fn put_whole(
        &self,
        plan: PutPlan,
        data: Box<dyn Whole>,
        expected: Digest,
    ) -> Result<WholePut, RemoteError> {
        let (meta, force) = (plan.meta, plan.force);
        match self.prepare_put(plan).await? {
            Prepared::Present(digest) => Ok(WholePut::Present(digest)),
            Prepared::Receive { upload, .. } => upload
                .commit_whole(data, expected, meta, force)
                .await
                .map(WholePut::Committed),
        }
    }

    /// Gives the regular file `path` the mtime and mode of `meta`, if it
    /// still is `meta.size` bytes with the BLAKE3 `digest` (without one,
    /// if its mtime already is `meta.mtime`: only the mode changes). Its
    /// contents stay as they are, and a link is refused.
    ///
    /// This default suits a store that cannot change a file's metadata in
    /// place (an object's is fixed when it is written, and the S3 copy
    /// `object_store` offers keeps it): the file is written again under
    /// its own name from its own bytes, through [`Store::prepare_put`] like
    /// any upload, and committed only if what was read hashes to the
    /// digest compared. It costs a read and a write inside the store and
    /// nothing on the wire. The local root overrides it with fchmod and
    /// futimens on the file itself.
    async fn set_meta(
        &self,
        path: &RemotePath,
        meta: FileMeta,
        digest: Option<Digest>,
        client: crate::tls::Fingerprint,
    ) -> Result<(), RemoteError> {
        let opened = self.open(path, None).await?;
        let now = opened.meta;
        check_set_meta(path, &now, &meta, digest)?;
        let expected = digest.or(opened.digest);
        let plan = PutPlan {
            path: path.clone(),
            meta,
            force: true,
            partial: None,
            resume: false,
            stream: false,
            client,
        };
        let Prepared::Receive { mut upload, .. } = self.prepare_put(plan).await? else {
            unreachable!("a forced put never finds its file already there")
        };
        let result = copy_into(opened.bytes.as_ref(), now.size, upload.as_mut()).await;
        match result {
            Ok(r) if expected.is_none_or(|d| d == r.digest) && r.size == now.size => {
                upload.commit(meta, true).await
            }
            Ok(_) => {
                upload.abandon().await;
                Err(RemoteError::new(
                    ErrorCode::Corrupt,
                    format!("'{path}' changed on the server while its mtime and mode were set; nothing was changed, run the command again"),
                ))
            }
            Err(e) => {
                upload.abandon().await;
                Err(e)
            }
        }
    }

    /// Deletes (or aborts) what interrupted uploads left behind once it is
    /// older than `ttl`, except what `in_use` says an upload is writing.
    /// Returns how many went.
    async fn sweep(&self, ttl: Duration, in_use: InUse) -> Result<usize, String>;

    /// How many interrupted uploads the store keeps for a resume now
    /// (with a shared bucket, every server's), for `serve --metrics`.
    async fn held_partials(&self) -> Result<usize, String>;

    /// Called once as a server starts serving, with a tag no other live
    /// server has (see [`crate::store::object`]'s leases): a store shared
    /// between servers takes back what a crashed predecessor of the same
    /// tag held. Returns how many such holds it let go.
    async fn adopt(&self, _holder: &str) -> Result<usize, String> {
        Ok(0)
    }

    /// Whether the store answers now (one cheap request: a directory's
    /// metadata, or a HEAD of a key no file has), for `serve --metrics`'s
    /// health answer. The error says what failed.
    async fn probe(&self) -> Result<(), String>;

    /// Waits for the work the store does after its answers: an object
    /// root writes a large upload's sums and removes its record once the
    /// client has been told it is saved (the upload keeps its name's
    /// lease until then), and deletes the leases given back. A server
    /// shutting down calls it within its grace period.
    async fn finish_background(&self) {}
}

/// The counter of requests the store failed (`serve --metrics`), counted
/// where an object store's error is turned into the client's; the server
/// counts a local root's (its disk's) by their codes.
pub(crate) const STORE_ERRORS_METRIC: &str = "qxfer_store_errors_total";

/// A file opened for reading: its bytes at any offset (pinned to the
/// version opened), and where a get starts.
pub(crate) struct Opened {
    /// Its size, mtime and mode.
    pub(crate) meta: FileMeta,
    /// Where the data starts (the client's prefix matched), or 0.
    pub(crate) offset: u64,
    /// The BLAKE3 of the bytes before `offset`, to go on hashing from;
    /// None where the store keeps the file's digest (`digest`).
    pub(crate) hasher: Option<blake3::Hasher>,
    /// The BLAKE3 the store keeps with the file, if it keeps one: the
    /// digest its bytes were stored with, so a client checks what it got
    /// against what was uploaded.
    pub(crate) digest: Option<Digest>,
    /// The bytes.
    pub(crate) bytes: Box<dyn ByteSource>,
}

/// Writes the `size` bytes of `from` into `upload` from its start, and
/// returns what it received. No framing: the store's bytes go straight
/// into its own writing end.
async fn copy_into(
    from: &dyn ByteSource,
    size: u64,
    upload: &mut dyn Upload,
) -> Result<Received, RemoteError> {
    use futures::StreamExt;
    let Sinking {
        mut sink, from: at, ..
    } = upload.sink(size).await?;
    let mut ended = match from.range(at, size).await {
        Ok(mut stream) => {
            let mut got = at;
            loop {
                match stream.next().await {
                    None => break Ok(got),
                    Some(Err(e)) => break Err(TransferError::Read(e)),
                    Some(Ok(bytes)) => {
                        got += bytes.len() as u64;
                        let (back, wrote) = sink.write(bytes.to_vec()).await;
                        sink = back;
                        if let Err(e) = wrote {
                            break Err(e);
                        }
                    }
                }
            }
        }
        Err(e) => Err(TransferError::Read(e)),
    };
    if matches!(ended, Ok(got) if got != size) {
        ended = Err(TransferError::SourceChanged {
            expected: size,
            found: *ended.as_ref().unwrap(),
        });
    }
    upload.received(sink, ended).await
}

/// What a put asks of a store.
#[derive(Debug, Clone)]
pub(crate) struct PutPlan {
    /// The destination.
    pub(crate) path: RemotePath,
    /// The source's size, mtime and mode.
    pub(crate) meta: FileMeta,
    /// Replace an existing file.
    pub(crate) force: bool,
    /// For a resumable upload, its key (client identity, path, size and
    /// mtime): what it writes is kept under this name if interrupted.
    pub(crate) partial: Option<String>,
    /// The client will answer an offer to resume.
    pub(crate) resume: bool,
    /// The data's length is not known until it ends (a pipe): `meta.size`
    /// is 0, space is checked as it arrives, and it is never resumed
    /// (`partial` then names it only for the server's bookkeeping).
    pub(crate) stream: bool,
    /// Who sends it: what one client identity may hold of a shared
    /// resource (an object root's upload memory) is bounded.
    pub(crate) client: crate::tls::Fingerprint,
}

/// What a put will do. `U` is the upload: a store's own type before it is
/// handed out as a `dyn Upload` (the local root's `put_whole` writes into
/// it in the same disk call).
pub(crate) enum Prepared<U = Box<dyn Upload>> {
    /// Receive into this upload, which already holds `held`; whether a
    /// partial of an older version of this upload was discarded.
    Receive {
        upload: U,
        held: Held,
        discarded_stale: bool,
    },
    /// The same file (same size and mtime) is already there; its BLAKE3.
    Present(Digest),
}

/// What [`Store::put_whole`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WholePut {
    /// Committed; the bytes' BLAKE3.
    Committed(Digest),
    /// The same file (same size and mtime) was already there, and nothing
    /// was written; its BLAKE3.
    Present(Digest),
}

/// What an upload already holds: how many bytes, and their BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) offset: u64,
    pub(crate) prefix: Digest,
}

impl Held {
    /// Nothing held.
    pub(crate) fn none() -> Self {
        Self {
            offset: 0,
            prefix: *blake3::hash(b"").as_bytes(),
        }
    }
}

/// A file being received. Until [`Upload::commit`] nothing appears under
/// the destination name; dropped or [`Upload::abandon`]ed, a non-resumable
/// upload leaves nothing behind, and a resumable one keeps what it holds
/// for a later resume (until the sweep).
#[async_trait]
pub(crate) trait Upload: Send {
    /// Starts again from byte 0 (the client's data differs from what is held).
    async fn restart(&mut self) -> Result<(), RemoteError>;

    /// The writing end for the bytes from where the upload's data starts
    /// (after what it holds), for a file of `size` bytes (for data of
    /// unknown length, `size` is the most the server takes).
    async fn sink(&mut self, size: u64) -> Result<Sinking, RemoteError>;

    /// Writing into `sink` ended with `ended` (where the data ended, or why
    /// it stopped): keeps what arrived consistent for a resume, and
    /// returns the whole file's size and BLAKE3, or the error to answer with.
    async fn received(
        &mut self,
        sink: Box<dyn Sink>,
        ended: Result<u64, TransferError>,
    ) -> Result<Received, RemoteError>;

    /// For a delta from byte 0: the upload's temporary, to be made a clone
    /// of the old version and patched in place where the filesystem shares
    /// data between files (see exchange's `assemble_cloned`); None where
    /// this store cannot (an object store, a resumed partial, data of
    /// unknown length). Changes nothing.
    fn patch_target(&mut self) -> Option<Result<std::fs::File, RemoteError>> {
        None
    }

    /// Patching [`Upload::patch_target`]'s file ended with `made`: the
    /// whole file's size and BLAKE3 (its chunks remembered once it is
    /// committed), or the error to answer with.
    async fn patched(
        &mut self,
        made: Result<PatchedUpload, TransferError>,
    ) -> Result<Received, RemoteError> {
        made.map(|m| m.received)
            .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))
    }

    /// Writes a small file's data, read whole, checks it against `expected`
    /// and commits it: one trip to the storage for the lot.
    async fn commit_whole(
        self: Box<Self>,
        data: Box<dyn Whole>,
        expected: Digest,
        meta: FileMeta,
        force: bool,
    ) -> Result<Digest, RemoteError>;

    /// Makes the received file appear under its final name, with `meta`'s
    /// mode and mtime; without `force`, fails if the name appeared meanwhile.
    async fn commit(self: Box<Self>, meta: FileMeta, force: bool) -> Result<(), RemoteError>;

    /// Gives the upload up and deletes what it holds, resumable or not
    /// (its bytes are known to be bad, or the space is needed).
    async fn abandon(self: Box<Self>);
}

/// Whether a file of metadata `now` may take `wanted`'s mtime and mode
/// (see [`Store::set_meta`]): the size the client compared, and with no
/// digest to vouch for the contents, the mtime the quick check matched.
pub(crate) fn check_set_meta(
    path: &RemotePath,
    now: &FileMeta,
    wanted: &FileMeta,
    digest: Option<Digest>,
) -> Result<(), RemoteError> {
    if now.size != wanted.size || (digest.is_none() && now.mtime != wanted.mtime) {
        return Err(RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}' changed on the server since it was compared; its mtime and mode were left alone, run the command again"),
        ));
    }
    Ok(())
}

/// The error for data whose BLAKE3 is not the sender's.
pub(crate) fn corrupt(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::Corrupt,
        format!("'{path}' arrived corrupted (BLAKE3 mismatch) and was discarded; send it again"),
    )
}

/// The error for data that did not arrive as it should, other than a
/// storage failure (which each store words itself).
pub(crate) fn receive_error(e: TransferError, path: &RemotePath) -> RemoteError {
    match e {
        TransferError::TooLong { limit } => RemoteError::new(
            ErrorCode::TooLarge,
            format!("'{path}' was not saved: the piped data went past {limit} bytes, the largest file this server takes (its --max-file-size)"),
        ),
        TransferError::StreamCut { .. } => RemoteError::new(
            ErrorCode::Protocol,
            format!("'{path}' was not saved: {e}; run the pipeline again"),
        ),
        TransferError::OldVersion(_) => RemoteError::new(
            ErrorCode::Internal,
            format!("'{path}' was not saved: {e}"),
        ),
        e => RemoteError::new(ErrorCode::Protocol, format!("receiving '{path}': {e}")),
    }
}

/// The error for a destination name that appeared during an upload.
pub(crate) fn appeared(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::AlreadyExists,
        format!(
            "'{path}' was created on the server during the upload; use --force to overwrite it"
        ),
    )
}

/// Most entries a recursive listing returns, and most bytes of names: a
/// bigger tree is an error rather than an unbounded amount of server memory.
pub(crate) const MAX_TREE_ENTRIES: usize = 1_000_000;
pub(crate) const MAX_TREE_NAME_BYTES: usize = 64 << 20;

/// The error for a tree past those bounds.
pub(crate) fn tree_too_large(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::TooLarge,
        format!(
            "'{path}' holds more than {MAX_TREE_ENTRIES} entries or {} MiB of names; list or fetch a smaller part of it",
            MAX_TREE_NAME_BYTES >> 20
        ),
    )
}

/// The refusal of a remove of a directory with something in it.
pub(crate) fn not_empty(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::NotEmpty,
        format!("'{path}' is a directory with files in it; use `qxfer rm -r` to remove it and everything in it"),
    )
}

/// The refusal of a rename onto a name that exists.
pub(crate) fn rename_target_exists(from: &RemotePath, to: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::AlreadyExists,
        format!("cannot rename '{from}' to '{to}': '{to}' already exists on the server; choose another name (after an interrupted rename, `qxfer ls -r` shows what is under each name)"),
    )
}
