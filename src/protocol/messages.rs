//! The messages: requests, responses, receipts, listings, and the metadata they carry.

use serde::{Deserialize, Serialize};

use super::*;

/// The first frame on every stream, sent by the client. New kinds of request
/// are added as new variants at the end, so existing ones keep their tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Upload a file; its bytes follow this frame on the same stream.
    Put(PutRequest),
    /// Download a file.
    Get(GetRequest),
    /// List a directory.
    List(ListRequest),
    /// Create a directory (and its parents) and optionally set its metadata.
    Mkdir(MkdirRequest),
    /// Remove a file or a directory (`qxfer rm`).
    Remove(RemoveRequest),
    /// Rename a file or a directory (`qxfer mv`).
    Rename(RenameRequest),
    /// Download a file the client holds an older version of, as a delta
    /// against it: the [`DeltaBase`] in the request, then that version's
    /// chunks as [`ChunkBatch`] frames, then the server answers (see
    /// [`Encoding::Delta`]). Appended in protocol 3 (`--sync`).
    GetDelta(GetDeltaRequest),
    /// The BLAKE3 of each of these files (`--checksum`), answered with
    /// [`Response::Digests`]. Appended in protocol 3.
    Digests(DigestsRequest),
    /// Give a file whose contents the client holds too the mtime and mode
    /// of the client's copy (`put --sync` of a file left alone), answered
    /// with [`Response::MetaSet`]. Appended in protocol 3.
    SetMeta(SetMetaRequest),
}

/// Set the mtime and mode of the regular file `path` to `meta`'s, if it
/// still is what the client compared: `meta.size` bytes and, with
/// `digest`, that BLAKE3; without one (the quick check matched), its mtime
/// must already be `meta.mtime`, so only the mode may change. Contents
/// are never touched; a link is refused, not followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetMetaRequest {
    /// The file, relative to the server root.
    pub path: String,
    /// Its size as compared, and the mtime and mode to give it.
    pub meta: FileMeta,
    /// The BLAKE3 both sides found (`--checksum`).
    pub digest: Option<Digest>,
}

/// Ask for the BLAKE3 of up to [`MAX_DIGEST_PATHS`] files at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestsRequest {
    /// The files, relative to the server root.
    pub paths: Vec<String>,
}

/// A get whose client holds an older version of the file (`get --sync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetDeltaRequest {
    /// The get itself.
    pub get: GetRequest,
    /// The client's version, whose chunks follow this frame.
    pub base: DeltaBase,
}

/// The version of a file a receiver holds, described for a delta: its
/// size and the average chunk size it was cut with (FastCDC 2020, minimum
/// a quarter and maximum four times the average). Its chunks follow as
/// [`ChunkBatch`] frames, in file order, and must add up to `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBase {
    /// Bytes of the old version (0: there is none to build on).
    pub size: u64,
    /// The average chunk size: a power of two from [`MIN_AVG_CHUNK`] to
    /// [`MAX_AVG_CHUNK`].
    pub avg_chunk: u32,
}

/// Up to [`CHUNKS_PER_BATCH`] chunks of a [`DeltaBase`], in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkBatch {
    /// The chunks.
    pub chunks: Vec<ChunkSum>,
    /// Whether more batches follow.
    pub more: bool,
}

/// One chunk of a receiver's version: its length and BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSum {
    /// Bytes in the chunk (1 to four times the average).
    pub len: u32,
    /// Its BLAKE3.
    pub digest: Digest,
}

/// One instruction of [`Encoding::Delta`] data: how the receiver makes the
/// next bytes of the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaOp {
    /// Copy `len` bytes of the receiver's old version from offset `from`.
    Copy {
        /// Where in the old version.
        from: u64,
        /// How many bytes (at least 1).
        len: u64,
    },
    /// New bytes: one block of [`Encoding::Blocks`] (header and payload)
    /// follows this frame.
    Block,
    /// The data is complete; the trailer follows.
    End,
}

/// Remove the file `path`, or the directory `path`: an empty one always,
/// one with anything in it only if `recursive` (and then everything in
/// it; links inside are removed as links, never followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// The file or directory, relative to the server root.
    pub path: String,
    /// Remove a directory with everything in it.
    pub recursive: bool,
}

/// Rename `from` to `to` (both relative to the server root). Refused if
/// `to` exists; `to`'s directory must exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    /// What to rename.
    pub from: String,
    /// Its new name.
    pub to: String,
}

/// Create the directory `path` if missing; then apply `meta` if given.
/// Tree uploads send this for every directory, deepest first, once the
/// files are in, so empty directories exist and mtimes stick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    /// The directory, relative to the server root.
    pub path: String,
    /// Permission bits and mtime to apply.
    pub meta: Option<DirMeta>,
}

/// Metadata a directory carries in a tree transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirMeta {
    /// Unix permission bits, if known.
    pub mode: Option<u32>,
    /// Last modification time.
    pub mtime: Option<Timestamp>,
}

/// Upload one file to `path` (relative to the server root, `/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// Destination, relative to the server root.
    pub path: String,
    /// Source metadata; `meta.size` is the exact number of data bytes that
    /// follow the header (0 with [`Encoding::Stream`], whose end is marked).
    pub meta: FileMeta,
    /// Replace an existing file instead of refusing.
    pub force: bool,
    /// Resume mode: the client waits for the server's [`PutOffer`], answers
    /// with [`Continue`], and only then sends the data (from the agreed
    /// offset). Without it the data follows the header at once, from 0.
    pub resume: bool,
    /// How the data is framed.
    pub encoding: Encoding,
}

/// How a file's bytes travel on a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// The bytes as they are: exactly `size - offset` of them.
    #[default]
    Raw,
    /// Blocks of at most [`MAX_BLOCK`] bytes each, every one sent as it is
    /// or zstd-compressed, as the sender chose for it (see [`BlockHeader`]).
    Blocks,
    /// Data of a length not known in advance (`qxfer put - NAME`, standard
    /// input): blocks as in [`Encoding::Blocks`], as many as come, then
    /// [`BlockHeader::END`]. While its input is silent the sender sends
    /// [`BlockHeader::PAUSE`] now and then, so the receiver can tell a
    /// slow producer from a dead peer. Only a put uses it, and then with
    /// `meta.size` 0 and no resume: such an upload cannot be resumed (the
    /// bytes are gone from the pipe), and the receipt gives its size.
    Stream,
    /// The file as a delta against the version the receiver holds: a
    /// sequence of [`DeltaOp`] frames (copies of the old version's bytes,
    /// and new bytes as blocks) making exactly `size - offset` bytes, then
    /// [`DeltaOp::End`]. In a put (`put --sync`), the server follows its
    /// [`PutOffer`] with a [`DeltaBase`] and its chunks, and the client
    /// sends the data once it has them (after its [`Continue`], in resume
    /// mode); in a get, the client's [`Request::GetDelta`] carries them and
    /// the server's [`GetOffer`] says `Delta` when it sends one. Appended
    /// in protocol 3.
    Delta,
}

impl Encoding {
    /// Whether the data's length is announced before it (`meta.size`),
    /// rather than marked by its end.
    pub(crate) fn is_sized(self) -> bool {
        self != Self::Stream
    }
}

/// Whether the sender may compress (the `--compress` option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Compress blocks that shrink, when the link is slower than the
    /// compressor; data that does not compress is soon sent as it is.
    #[default]
    Auto,
    /// Compress every block that shrinks, however fast the link.
    Always,
    /// Never compress (the bytes travel raw).
    Never,
}

/// Files at least this large are uploaded in resume mode and kept as
/// resumable partials when interrupted; smaller ones are cheaper to send
/// again than to wait a round trip for an offer.
pub const RESUME_MIN: u64 = 4 * 1024 * 1024;

/// What the server already holds of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOffer {
    /// Bytes of this file (same client, path, size and mtime) the server
    /// holds from an interrupted upload; 0 if none.
    pub offset: u64,
    /// BLAKE3 of those bytes, for the client to compare with its own.
    pub prefix: Digest,
    /// A partial of a different version of the file (another size or
    /// mtime) was found and thrown away.
    pub discarded_stale: bool,
}

/// The client's answer to a [`PutOffer`] in resume mode: where its data
/// starts. Either the offered offset (the prefixes matched) or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continue {
    /// First byte that follows.
    pub offset: u64,
}

/// Download the file at `path` (relative to the server root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    /// Source, relative to the server root.
    pub path: String,
    /// What the client already holds from an interrupted download.
    pub resume: Option<Prefix>,
    /// Whether the server may compress what it sends.
    pub compression: Compression,
}

/// The first `offset` bytes of a file and their BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefix {
    /// Length of the prefix.
    pub offset: u64,
    /// BLAKE3 of it.
    pub digest: Digest,
}

/// The server's answer to a get: the file's metadata and where its data starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetOffer {
    /// The file's metadata.
    pub meta: FileMeta,
    /// First byte that follows: the client's prefix length if the server's
    /// own prefix hashes the same, else 0 (start over).
    pub offset: u64,
    /// How the data is framed.
    pub encoding: Encoding,
}

/// List the directory at `path` (relative to the server root; empty means the root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Directory (or single file) to list.
    pub path: String,
    /// List the whole tree beneath it: entry names are then relative paths.
    /// Symlinks are listed, never followed.
    pub recursive: bool,
}

/// Modification time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z (negative before).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl Timestamp {
    /// The time this is, if the system's clock type can hold it (a
    /// hostile peer's nanoseconds past a second cannot).
    pub(crate) fn to_system_time(self) -> Option<std::time::SystemTime> {
        use std::time::{Duration, UNIX_EPOCH};
        if self.nanos >= 1_000_000_000 {
            return None;
        }
        if self.secs >= 0 {
            UNIX_EPOCH.checked_add(Duration::new(self.secs as u64, self.nanos))
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(self.secs.unsigned_abs()))?
                .checked_add(Duration::from_nanos(u64::from(self.nanos)))
        }
    }
}

/// Metadata that travels with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Size in bytes.
    pub size: u64,
    /// Last modification time, if the platform reports one.
    pub mtime: Option<Timestamp>,
    /// Unix permission bits (`st_mode & 0o7777`), if known.
    pub mode: Option<u32>,
}

/// The server's first frame on a stream: the request is accepted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The upload is accepted; the server is reading the data.
    PutAccepted(PutOffer),
    /// The file exists; its bytes from `offset` follow this frame.
    GetAccepted(GetOffer),
    /// The listing follows as [`ListBatch`] frames.
    ListAccepted,
    /// The request was refused; nothing follows.
    Refused(RemoteError),
    /// The directory exists and has the requested metadata.
    MkdirDone,
    /// A put without `force` names a file that exists with the same size
    /// and mtime: here is the BLAKE3 of what the server holds, for the
    /// client to compare with its own. Nothing is written (the rerun of a
    /// finished transfer skips what is already there).
    AlreadyThere(Digest),
    /// The file or directory is gone (a [`RemoveRequest`]).
    Removed,
    /// The file or directory has its new name (a [`RenameRequest`]).
    Renamed,
    /// The BLAKE3 of each file a [`DigestsRequest`] named, in its order;
    /// `None` where no regular file is (or it cannot be read). Appended in
    /// protocol 3.
    Digests(Vec<Option<Digest>>),
    /// The file has the mtime and mode a [`SetMetaRequest`] asked for.
    /// Appended in protocol 3.
    MetaSet,
}

/// Sent by the sender after the data: what the receiver must have. A
/// mismatch means the data was corrupted and is not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// BLAKE3 of the whole file (including any resumed prefix).
    pub digest: Digest,
}

/// The receiver's final word on a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Receipt {
    /// The file is complete, synced and under its final name.
    Committed {
        /// Bytes written.
        size: u64,
        /// BLAKE3 of what was written.
        digest: Digest,
    },
    /// The transfer failed and nothing was committed.
    Failed(RemoteError),
}

/// One frame of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListBatch {
    /// Entries in this batch, sorted by name across the whole listing.
    pub entries: Vec<Entry>,
    /// Whether more batches follow.
    pub more: bool,
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: socket, device, FIFO.
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File name (one path component), or the path relative to the listed
    /// directory in a recursive listing.
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Size in bytes (as `lstat` reports it).
    pub size: u64,
    /// Last modification time.
    pub mtime: Option<Timestamp>,
    /// Unix permission bits, if known.
    pub mode: Option<u32>,
}
