//! Sending data of unknown length from a pipe (put -): blocks gathered from the input, pauses told, the end marked.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{BlockHeader, Digest, Encoding};

use super::*;

/// Asks for a 1 MiB buffer for the pipe `fd` (if it is one), instead of
/// Linux's 64 KiB: each read then takes up to 1 MiB, and the writer and
/// the reader switch far less often (1 GiB through a 64 KiB pipe cost
/// 1.3 s of system time on its own here). A hint: where the system
/// refuses (another size limit, not a pipe), nothing changes.
pub(crate) fn widen_pipe(fd: impl AsFd) {
    #[cfg(target_os = "linux")]
    {
        let _ = rustix::pipe::fcntl_setpipe_size(fd, 1 << 20);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

/// Blocks of input the reader may have ready ahead of the network.
pub(super) const PIPE_AHEAD: usize = 4;

/// While its input gives nothing for this long, a sender of
/// [`Encoding::Stream`] tells the receiver it is still there (well within
/// the receiver's [`STALL_TIMEOUT`]).
pub(super) const PAUSE_EVERY: Duration = Duration::from_secs(15);

/// How long a block of [`Encoding::Stream`] waits for more of its input
/// before it goes out part-filled. A fast producer fills whole blocks
/// (small blocks cost both sides a trip to their thread pools each: 64 KiB
/// blocks halved the rate on loopback); a slow one's bytes go out within
/// this time instead of waiting for a block to fill.
pub(super) const GATHER: Duration = Duration::from_millis(5);

/// The longest a block gathers at all: a producer that trickles (a byte
/// every few milliseconds, a serial console) still has its bytes sent
/// this often, not once a whole block is full.
pub(super) const GATHER_MAX: Duration = Duration::from_millis(200);

/// What the pipe's reader hands over.
pub(super) enum FromPipe {
    /// A block of input behind room for its header.
    Block(Vec<u8>),
    /// The input ended after this many bytes, hashing to this.
    End(u64, Digest),
    Failed(std::io::Error),
}

/// Sends everything `input` gives until it ends (standard input: of a
/// length nobody knows in advance) to `out` as [`Encoding::Stream`]:
/// blocks (compressed as `framing` says), a pause mark whenever the
/// input stays silent for [`PAUSE_EVERY`], and the end mark. Returns the
/// number of bytes and their BLAKE3.
///
/// The input is read (and hashed) on a thread of its own, not in the disk
/// pool: a pipe may block for as long as its writer likes, and a process
/// that gives up must not wait for that read to return before it can exit.
pub(crate) async fn send_pipe<R, W>(
    input: R,
    framing: Framing,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
) -> Result<(u64, Digest), TransferError>
where
    R: Read + AsFd + Send + 'static,
    W: ChunkWrite + ?Sized,
{
    debug_assert_eq!(framing.encoding, Encoding::Stream);
    let mut framer = Framer::new(framing);
    let room = framer.room();
    let (tx, mut rx) = tokio::sync::mpsc::channel(PIPE_AHEAD);
    std::thread::Builder::new()
        .name("qxfer-stdin".into())
        .spawn(move || read_pipe(input, room, tx))
        .map_err(TransferError::Read)?;
    loop {
        let buf = match tokio::time::timeout(PAUSE_EVERY, rx.recv()).await {
            Err(_) => {
                write_paced(out, bytes::Bytes::from_static(&BlockHeader::PAUSE), None).await?;
                continue;
            }
            Ok(Some(FromPipe::Block(buf))) => buf,
            Ok(Some(FromPipe::End(size, digest))) => {
                write_paced(out, bytes::Bytes::from_static(&BlockHeader::END), None).await?;
                return Ok((size, digest));
            }
            Ok(Some(FromPipe::Failed(e))) => return Err(TransferError::Read(e)),
            Ok(None) => {
                return Err(TransferError::Read(std::io::Error::other(
                    "the reader of the input stopped",
                )))
            }
        };
        // Compressing is CPU work for the pool; framing as it is, a
        // header written in place.
        let chunk = if framer.framing.compress.now() {
            let (f, chunk) = blocking(move || {
                let chunk = framer.frame(buf);
                (framer, chunk)
            })
            .await;
            framer = f;
            chunk
        } else {
            framer.frame(buf)
        };
        write_paced(out, chunk.bytes.into(), pace.as_deref()).await?;
        progress(chunk.raw as u64);
    }
}

/// Reads `input` to its end in blocks of up to [`CHUNK`] bytes behind
/// `room` spare bytes, hashing as it goes, and hands them over to `tx`; a
/// block goes part-filled once the input has nothing more for [`GATHER`],
/// or [`GATHER_MAX`] after its first byte. Stops early if nobody listens
/// any more. Blocking.
pub(super) fn read_pipe<R: Read + AsFd>(
    mut input: R,
    room: usize,
    tx: tokio::sync::mpsc::Sender<FromPipe>,
) {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let mut buf = vec![0u8; room + CHUNK];
        let mut filled = room;
        let mut ended = false;
        let mut first_byte = None;
        while filled < buf.len() {
            if let Some(at) = first_byte {
                let waited = std::time::Instant::now().duration_since(at);
                if waited >= GATHER_MAX || !readable_within(&input, Some(GATHER)) {
                    break;
                }
            }
            match input.read(&mut buf[filled..]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    hasher.update(&buf[filled..filled + n]);
                    filled += n;
                    total += n as u64;
                    first_byte.get_or_insert_with(std::time::Instant::now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Standard input left non-blocking by whoever set it up:
                // wait for it as for a blocking one.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    readable_within(&input, first_byte.map(|_| GATHER));
                }
                Err(e) => {
                    let _ = tx.blocking_send(FromPipe::Failed(e));
                    return;
                }
            }
        }
        if filled > room {
            buf.truncate(filled);
            if tx.blocking_send(FromPipe::Block(buf)).is_err() {
                return;
            }
        }
        if ended {
            let _ = tx.blocking_send(FromPipe::End(total, *hasher.finalize().as_bytes()));
            return;
        }
    }
}

/// Whether `fd` has something to read (or its end, or an error, which the
/// read then reports) within `wait` (under a second), or at all (`None`).
pub(super) fn readable_within(fd: &impl AsFd, wait: Option<Duration>) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let timeout = wait.map(|w| Timespec {
        tv_sec: 0,
        tv_nsec: w.subsec_nanos().into(),
    });
    !matches!(poll(&mut fds, timeout.as_ref()), Ok(0))
}
