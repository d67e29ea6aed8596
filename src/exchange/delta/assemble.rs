//! The receiver's side: the ops checked and applied, into a stream or patched into a clone of the old version.

use super::*;

/// The receiver's side: reads a delta from `input` and writes the bytes
/// it makes, exactly `expect` of them, to `made`: copies read from `old`
/// (its version, of `old_size` bytes), new blocks decoded (read no faster
/// than `pace` allows). `progress` counts new bytes, `kept` copied ones. Every op is
/// checked before it is acted on: a copy within the old version, nothing
/// past `expect`, blocks as [`BlockHeader::decode`] allows.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn assemble<R, W>(
    input: &mut R,
    old: &dyn ByteSource,
    old_size: u64,
    expect: u64,
    made: &mut W,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<DeltaSent, TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut target = Target::Stream(made);
    apply(
        input,
        old,
        old_size,
        expect,
        &mut target,
        pace,
        progress,
        kept,
    )
    .await
}

/// Where [`apply`] puts the new version.
pub(super) enum Target<'a, W> {
    /// Written out in order, copies included.
    Stream(&'a mut W),
    /// Patched into a file that already holds the old version's data.
    Patch(&'a mut Patched),
}

/// The op loop of [`assemble`] and [`assemble_cloned`].
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply<R, W>(
    input: &mut R,
    old: &dyn ByteSource,
    old_size: u64,
    expect: u64,
    made: &mut Target<'_, W>,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<DeltaSent, TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut got = DeltaSent::default();
    let mut written = 0u64;
    let past = |n: u64, written: u64| {
        TransferError::Malformed(format!(
            "a delta that makes more than the {expect} bytes announced ({} or more)",
            written + n
        ))
    };
    loop {
        let op = read_stalled::<_, DeltaOp>(input)
            .await
            .map_err(|e| ended(e, written, expect))?;
        match op {
            DeltaOp::Copy { from, len } => {
                if len == 0 || from.checked_add(len).is_none_or(|end| end > old_size) {
                    return Err(TransferError::Malformed(format!(
                        "a copy of {len} bytes at {from} of an old version of {old_size} bytes"
                    )));
                }
                if written + len > expect {
                    return Err(past(len, written));
                }
                match made {
                    Target::Stream(w) => {
                        let mut pieces = Pieces::open(old, from, from + len)
                            .await
                            .map_err(TransferError::OldVersion)?;
                        while let Some(p) =
                            pieces.next().await.map_err(TransferError::OldVersion)?
                        {
                            w.write_all(&p).await.map_err(TransferError::Write)?;
                        }
                    }
                    Target::Patch(p) => p.copy(from, len).await?,
                }
                written += len;
                got.copied += len;
                kept(len);
            }
            DeltaOp::Block => {
                let mut head = [0u8; BlockHeader::LEN];
                read_exact_stalled(input, &mut head).await?;
                let header = BlockHeader::decode(&head)
                    .map_err(|e| TransferError::Malformed(e.to_string()))?;
                let raw_len = u64::from(header.raw_len);
                if written + raw_len > expect {
                    return Err(past(raw_len, written));
                }
                let mut payload = vec![0u8; header.wire_len as usize];
                // `--limit-rate` on a download: new bytes are read as
                // they are due, and flow control slows the sender.
                let step = pace.map_or(payload.len().max(1), Pacer::slice);
                for slice in payload.chunks_mut(step) {
                    if let Some(p) = pace {
                        p.take(slice.len()).await;
                    }
                    read_exact_stalled(input, slice).await?;
                }
                let bytes = if header.compressed {
                    let raw = header.raw_len as usize;
                    blocking(move || decompress_block(&payload, raw)).await?
                } else {
                    payload
                };
                match made {
                    Target::Stream(w) => w.write_all(&bytes).await.map_err(TransferError::Write)?,
                    Target::Patch(p) => p.write(bytes).await?,
                }
                written += raw_len;
                got.literal += raw_len;
                progress(raw_len);
            }
            DeltaOp::End => {
                if written != expect {
                    return Err(TransferError::Truncated {
                        got: written,
                        expected: expect,
                    });
                }
                if let Target::Stream(w) = made {
                    w.flush().await.map_err(TransferError::Write)?;
                }
                return Ok(got);
            }
        }
    }
}

/// Shares all of `old`'s data with `made` (FICLONE), if the filesystem
/// can share extents between files (XFS, btrfs, bcachefs) and both are on
/// it. Blocking.
pub(super) fn share_data(made: &File, old: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::ioctl_ficlone(made, old).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (made, old);
        false
    }
}

/// A new version being made in a file that starts as a clone of the old
/// one: a copy from where it already sits costs a read for the hash and
/// no write; everything else is written at its place. Every byte up to
/// `pos` is the new version's. On the way it tells the new version's
/// chunks (copies are whole chunks of the old version as described here,
/// new bytes are cut here), for the descriptions cache.
pub(crate) struct Patched {
    pub(super) made: Arc<File>,
    pub(super) old: Arc<File>,
    pub(super) pos: u64,
    /// The new version hashed so far.
    pub(super) blocks: Option<Blocks>,
    /// The chaining values of the old version's whole blocks, where this
    /// process remembers them: a block an in-place copy covers whole is
    /// taken by its value, not read.
    pub(super) old_values: Option<Arc<[blake3::hazmat::ChainingValue]>>,
    pub(super) cutter: Cutter,
    /// The new version's chunks so far; None once they cannot be told (a
    /// copy that is not of whole chunks, or too many of them).
    pub(super) chunks: Option<Vec<ChunkSum>>,
    /// The old version's chunks as described here, and where each starts.
    pub(super) old_chunks: Option<(Arc<[ChunkSum]>, Vec<u64>)>,
    /// New bytes not yet cut into whole chunks.
    pub(super) cutting: Option<Chunks>,
}

impl Patched {
    /// Copies `len` bytes of the old version at `from` to `pos`, hashing them.
    pub(super) async fn copy(&mut self, from: u64, len: u64) -> Result<(), TransferError> {
        self.end_new().await;
        self.take_old(from, len);
        // Where the bytes already are (the clone put them there), nothing
        // is written: that is what sharing saves; and a whole block whose
        // value is known is not even read.
        let in_place = from == self.pos;
        let end = from + len;
        let mut at = from;
        while at < end {
            match self.next_known(at, end).filter(|_| in_place) {
                Some(k) if k == at => {
                    let values = self.old_values.as_ref().expect("known");
                    let value = values[(k / BLOCK) as usize];
                    self.blocks.as_mut().expect("kept").push_value(value);
                    self.pos += BLOCK;
                    at += BLOCK;
                }
                Some(k) => {
                    self.copy_bytes(at, k, in_place).await?;
                    at = k;
                }
                None => {
                    self.copy_bytes(at, end, in_place).await?;
                    at = end;
                }
            }
        }
        Ok(())
    }

    /// The first block boundary from `at` on whose whole block ends by
    /// `end` and has a known value, if any.
    pub(super) fn next_known(&self, at: u64, end: u64) -> Option<u64> {
        let values = self.old_values.as_ref()?;
        if !self.blocks.as_ref()?.takes_values() {
            return None;
        }
        let k = at.div_ceil(BLOCK) * BLOCK;
        (k + BLOCK <= end && ((k / BLOCK) as usize) < values.len()).then_some(k)
    }

    /// Copies the old version's bytes `from..end` to `pos` (unless they are
    /// already there), hashing them; the next piece is read while this one
    /// is hashed.
    pub(super) async fn copy_bytes(
        &mut self,
        from: u64,
        end: u64,
        in_place: bool,
    ) -> Result<(), TransferError> {
        let read = |at: u64| {
            let old = self.old.clone();
            async move {
                if at >= end {
                    return Ok(None);
                }
                let want = (end - at).min(CHUNK as u64) as usize;
                blocking(move || read_exact_at(&old, at, want).map(Some))
                    .await
                    .map_err(TransferError::OldVersion)
            }
        };
        let mut at = from;
        let mut piece = read(at).await?;
        while let Some(buf) = piece.take() {
            let n = buf.len() as u64;
            let (made, to) = (self.made.clone(), self.pos);
            let mut blocks = self.blocks.take().expect("kept");
            let (next, done) = tokio::join!(
                read(at + n),
                blocking(move || {
                    use std::os::unix::fs::FileExt;
                    if !in_place {
                        made.write_all_at(&buf, to).map_err(TransferError::Write)?;
                    }
                    blocks.update(&buf);
                    Ok::<_, TransferError>(blocks)
                })
            );
            self.blocks = Some(done?);
            self.pos += n;
            at += n;
            piece = next?;
        }
        Ok(())
    }

    /// Writes new bytes at `pos`, hashing them and cutting them into chunks.
    pub(super) async fn write(&mut self, bytes: Vec<u8>) -> Result<(), TransferError> {
        let (made, to) = (self.made.clone(), self.pos);
        let mut blocks = self.blocks.take().expect("kept");
        let tell = self.chunks.is_some();
        let mut cutting = self
            .cutting
            .take()
            .unwrap_or_else(|| Chunks::new(self.cutter));
        let n = bytes.len() as u64;
        let (blocks, cutting, sums) = blocking(move || {
            use std::os::unix::fs::FileExt;
            made.write_all_at(&bytes, to)
                .map_err(TransferError::Write)?;
            blocks.update(&bytes);
            let mut sums = Vec::new();
            if tell {
                cutting.push(&bytes);
                sums = cutting.sums(false);
            }
            Ok::<_, TransferError>((blocks, cutting, sums))
        })
        .await?;
        self.blocks = Some(blocks);
        self.cutting = Some(cutting);
        self.add(sums);
        self.pos += n;
        Ok(())
    }

    /// Cuts the rest of a stretch of new bytes (a copy or the end follows).
    pub(super) async fn end_new(&mut self) {
        let Some(mut cutting) = self.cutting.take() else {
            return;
        };
        if self.chunks.is_none() {
            return;
        }
        let sums = blocking(move || cutting.sums(true)).await;
        self.add(sums);
    }

    /// Tells the chunks of a copy: whole chunks of the old version, or
    /// (a copy that starts or ends inside one) no longer anything.
    pub(super) fn take_old(&mut self, from: u64, len: u64) {
        let Some((sums, starts)) = &self.old_chunks else {
            self.chunks = None;
            return;
        };
        let Ok(first) = starts.binary_search(&from) else {
            self.chunks = None;
            return;
        };
        let end = from + len;
        let count = starts[first..].partition_point(|&s| s < end);
        let last = first + count - 1;
        if starts[last] + u64::from(sums[last].len) != end {
            self.chunks = None;
            return;
        }
        let taken = sums[first..first + count].to_vec();
        self.add(taken);
    }

    pub(super) fn add(&mut self, sums: Vec<ChunkSum>) {
        if let Some(list) = &mut self.chunks {
            if list.len() + sums.len() > MAX_DELTA_CHUNKS as usize {
                self.chunks = None;
            } else {
                list.extend(sums);
            }
        }
    }
}

/// The receiver's side on a filesystem that shares data between files:
/// like [`assemble`] into the empty file `made`, but `made` first becomes
/// a clone of `old` (no data copied), so copies from where they already
/// sit are only read for the hash, and only the new bytes and moved ones
/// are written: the commit then syncs those alone, not the whole file.
/// Returns None, having read nothing, where the filesystem cannot share
/// (ext4, tmpfs, another filesystem than `old`'s); else what [`assemble`]
/// returns and the new version's size and BLAKE3. The old version is
/// read for the hash (its data is in memory from the description), so it
/// must not have changed since it was opened: that is checked at the end.
/// However this ends, `made` then holds a prefix of the new version (the
/// rest of the clone cut off), which a resume can build on.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn assemble_cloned<R>(
    input: &mut R,
    old: &FileBytes,
    old_size: u64,
    made: File,
    expect: u64,
    cutter: Cutter,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Result<Cloned, TransferError>>
where
    R: AsyncRead + Unpin,
{
    let made = Arc::new(made);
    let (m, o) = (made.clone(), old.file.clone());
    if !blocking(move || share_data(&m, &o)).await {
        return None;
    }
    Some(
        assemble_patched(
            input, old, old_size, made, expect, cutter, pace, progress, kept, stop,
        )
        .await,
    )
}

/// [`assemble_cloned`] once `made` holds the old version's data.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn assemble_patched<R>(
    input: &mut R,
    old: &FileBytes,
    old_size: u64,
    made: Arc<File>,
    expect: u64,
    cutter: Cutter,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Cloned, TransferError>
where
    R: AsyncRead + Unpin,
{
    let began = std::time::Instant::now();
    let recalled = old.recall(old_size, cutter.avg());
    let old_values = recalled.as_ref().and_then(|d| d.values.clone());
    let old_values_known = old_values.is_some();
    let old_chunks = recalled.map(|d| {
        let mut at = 0;
        let starts = d
            .chunks
            .iter()
            .map(|c| {
                at += u64::from(c.len);
                at - u64::from(c.len)
            })
            .collect();
        (d.chunks, starts)
    });
    let mut patched = Patched {
        made: made.clone(),
        old: old.file.clone(),
        pos: 0,
        blocks: Some(Blocks::new(expect)),
        old_values,
        cutter,
        chunks: Some(Vec::new()),
        old_chunks,
        cutting: None,
    };
    let result = {
        let mut target = Target::<tokio::io::Sink>::Patch(&mut patched);
        let applying = apply(
            input,
            old,
            old_size,
            expect,
            &mut target,
            pace,
            progress,
            kept,
        );
        tokio::select! {
            r = applying => r,
            () = stop => Err(TransferError::Stopped),
        }
    };
    if result.is_ok() {
        patched.end_new().await;
    }
    let result = match result {
        Ok(d) => old.check_unchanged().await.map(|()| d).map_err(|_| {
            TransferError::OldVersion(std::io::Error::other(
                "the old version changed while the new one was made from it",
            ))
        }),
        Err(e) => Err(e),
    };
    // What lies past `pos` is the old version's, not the new one's.
    let (pos, m) = (patched.pos, made.clone());
    let cut = blocking(move || m.set_len(pos)).await;
    let sent = result.and_then(|d| cut.map(|()| d).map_err(TransferError::Write));
    let sent = sent?;
    let blocks = patched.blocks.take().expect("kept");
    let values: Arc<[_]> = blocks.values().into();
    let digest = blocks.finish();
    tracing::debug!(
        ms = began.elapsed().as_millis() as u64,
        new_bytes = sent.literal,
        remembered = old_values_known,
        "patched the clone of the old version"
    );
    Ok(Cloned {
        sent,
        received: Received { size: pos, digest },
        described: patched.chunks.map(|c| Description {
            chunks: c.into(),
            digest: Some(digest),
            values: Some(values),
        }),
    })
}

/// What [`assemble_cloned`] made.
pub(crate) struct Cloned {
    pub(crate) sent: DeltaSent,
    pub(crate) received: Received,
    /// The new version's chunks, where they could be told: to remember
    /// once it is committed (see `described`).
    pub(crate) described: Option<Description>,
}

/// Runs a delta's receiving end: `assemble` writes into one end of an
/// in-memory pipe while `receive` reads the other as plain bytes (the
/// store's or the local file's usual receiving path: its temporary, hash,
/// sync and commit). Each takes its end and drops it when done, so the
/// assembler failing ends the receiver (its data ends early); the
/// receiver failing (a full disk, a newer upload taking over) ends the
/// assembler at once, even one waiting for the peer's next op. The error
/// returned is the one that ended the transfer.
pub(crate) async fn through_pipe<A, B, T, E>(
    assemble: impl FnOnce(tokio::io::DuplexStream) -> A,
    receive: impl FnOnce(tokio::io::DuplexStream) -> B,
) -> Result<(DeltaSent, T), PipeError<E>>
where
    A: std::future::Future<Output = Result<DeltaSent, TransferError>>,
    B: std::future::Future<Output = Result<T, E>>,
{
    let (w, r) = tokio::io::duplex(2 * CHUNK);
    let assembling = assemble(w);
    let receiving = receive(r);
    tokio::pin!(assembling, receiving);
    tokio::select! {
        made = &mut assembling => match (made, receiving.await) {
            (Ok(d), Ok(t)) => Ok((d, t)),
            // The receiving end stopped taking bytes first: its reason.
            (Err(TransferError::Write(_)) | Ok(_), Err(e)) => Err(PipeError::Received(e)),
            (Err(e), _) => Err(PipeError::Made(e)),
        },
        received = &mut receiving => match received {
            // All bytes are in; the assembler still reads the end mark.
            Ok(t) => assembling.await.map(|d| (d, t)).map_err(PipeError::Made),
            Err(e) => Err(PipeError::Received(e)),
        },
    }
}

/// Why a delta's receiving end failed: the delta itself, or the receiver.
#[derive(Debug)]
pub(crate) enum PipeError<E> {
    Made(TransferError),
    Received(E),
}
