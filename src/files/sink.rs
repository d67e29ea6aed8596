//! A store's writing end of an upload, and the one every local file is written through: bytes in order, hashed as they pass.
//!
//! What feeds a sink (exchange's `receive_into`) owns the framing, the
//! decompression and the limits; a sink only writes, hashes and keeps
//! account of the space it takes.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use crate::protocol::Digest;

use super::{blocking, Start, TransferError};

/// A store's writing end of an upload: the file's bytes, in order, after
/// what the upload already holds. The store writes them (and hashes them:
/// it knows what it holds for a resume); what feeds it ([`receive_into`])
/// owns the framing, the decompression and the limits. Each write runs as
/// a task of its own while the next piece arrives, and hands the sink back
/// with its result.
pub(crate) trait Sink: Send + 'static {
    /// Writes `bytes` after those written before.
    fn write(self: Box<Self>, bytes: Vec<u8>) -> SinkWrite;

    /// Itself, for the store that made it to take back its own type.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

/// What [`Sink::write`] gives: the sink back, and how the write went.
pub(crate) type SinkWrite =
    futures::future::BoxFuture<'static, (Box<dyn Sink>, Result<(), TransferError>)>;

/// A small file's data, whole in memory (possibly still compressed), that
/// a store writes and commits in one trip to the disk pool (see the
/// server's small uploads; exchange's `Buffered` is one).
pub(crate) trait Whole: Send + 'static {
    /// Writes the data to `out`, returning its BLAKE3. Blocking.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<Digest, TransferError>;
}

/// What arrived of a file: its size and BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    /// Bytes of the whole file (including any resumed prefix).
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub digest: Digest,
}

/// The writing end of a transfer into a file: the file and the hash so far.
pub(crate) struct FileSink {
    file: File,
    hasher: blake3::Hasher,
    written: u64,
    /// The file's full size: the last chunk needs no early writeback, as the
    /// commit's fsync follows at once.
    size: u64,
    /// For data of unknown length, which reserved no space: checked before
    /// each write, so it never takes what uploads in flight reserved.
    room: Option<Arc<crate::space::Space>>,
    /// The space held for the upload, told of each write.
    reserved: Option<Arc<crate::space::Reservation>>,
    /// Given each write's bytes in order, after they are written.
    observer: Option<Observer>,
}

/// What a [`FileSink`] shows the bytes it writes, in order (exchange's
/// `Describer`, which cuts a download into chunks as it arrives).
pub(crate) type Observer = Box<dyn FnMut(&[u8]) + Send>;

impl FileSink {
    /// Writes into `file` (positioned at `start.offset`, whose bytes before
    /// it hashed to `start.hasher`) up to `size` bytes; with `room`, each
    /// write first checks the free space beside what uploads in flight
    /// reserved (for data of unknown length), and each write is taken off
    /// `reserved`.
    pub(crate) fn new(
        file: File,
        start: Start,
        size: u64,
        room: Option<Arc<crate::space::Space>>,
        reserved: Option<Arc<crate::space::Reservation>>,
    ) -> Self {
        Self {
            file,
            hasher: start.hasher,
            written: start.offset,
            size,
            room,
            reserved,
            observer: None,
        }
    }

    /// The same, showing `observer` every write's bytes in order.
    pub(crate) fn observed(mut self, observer: Option<Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// After a transfer into it ended with `ended`: the whole file's size
    /// and BLAKE3, or (having synced what arrived, so a resume continues
    /// after it) the error. The data of a finished transfer is not synced:
    /// [`super::IncomingFile::commit`] syncs it with its metadata in one go.
    pub(crate) async fn finish(
        self,
        ended: Result<u64, TransferError>,
    ) -> Result<Received, TransferError> {
        match ended {
            Ok(size) => Ok(Received {
                size,
                digest: *self.hasher.finalize().as_bytes(),
            }),
            Err(e) => {
                let file = self.file;
                let _ = blocking(move || file.sync_data()).await;
                Err(e)
            }
        }
    }
}

impl Sink for FileSink {
    fn write(self: Box<Self>, bytes: Vec<u8>) -> SinkWrite {
        Box::pin(async move {
            let (sink, result) = blocking(move || self.write_bytes(&bytes)).await;
            (Box::new(sink) as Box<dyn Sink>, result)
        })
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

impl FileSink {
    /// Writes and hashes `buf`, and starts its writeback. Blocking.
    pub(crate) fn write_bytes(mut self, buf: &[u8]) -> (Self, Result<(), TransferError>) {
        if let Some(space) = &self.room {
            if let Err(no) = space.check(&self.file, buf.len() as u64) {
                let full = std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "{} bytes free, the rest promised to uploads in flight",
                        no.free
                    ),
                );
                return (self, Err(TransferError::Write(full)));
            }
        }
        if let Err(e) = self.file.write_all(buf) {
            return (self, Err(TransferError::Write(e)));
        }
        if self.written + (buf.len() as u64) < self.size {
            start_writeback(&self.file, self.written, buf.len() as u64);
        }
        self.written += buf.len() as u64;
        self.hasher.update(buf);
        if let Some(observe) = &mut self.observer {
            observe(buf);
        }
        if let Some(r) = &self.reserved {
            r.wrote(buf.len() as u64);
        }
        (self, Ok(()))
    }
}

/// Asks the kernel to start writing a just-written range to disk now, while
/// the network keeps delivering, so the final fsync has little left to wait
/// for. Without it all the dirty pages are flushed at the end, in series
/// with the transfer. A hint only: errors surface at the fsync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // valid for the duration of the call because `file` is borrowed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}
