//! The receiver's description of its version (its chunks, sent in batches, a large version in two halves at once) and the sender's reading of it, bounded.

use super::*;

/// Versions at least this large are described in two halves at once,
/// each on its own thread: the description is what the other side waits
/// for. The second half's chunks start at its first byte instead of where
/// a cut of the whole would put them, which costs a chunk or two of
/// matching around the middle (a sender that follows the description,
/// see [`cut_along`], loses nothing).
pub(super) const DESCRIBE_IN_HALVES: u64 = 64 << 20;

/// The receiver's side, first: describes its version `old` (`size` bytes,
/// cut by `cutter`) as [`ChunkBatch`] frames to `out`. The caller has sent
/// the [`DeltaBase`] naming `size` and `cutter`.
pub(crate) async fn send_chunks<W>(
    old: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
    out: &mut W,
) -> Result<(), TransferError>
where
    W: AsyncWrite + Unpin,
{
    send_chunks_halving(old, size, cutter, out, DESCRIBE_IN_HALVES).await
}

/// [`send_chunks`], in halves from `halves` bytes on.
pub(crate) async fn send_chunks_halving<W>(
    old: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
    out: &mut W,
    halves: u64,
) -> Result<(), TransferError>
where
    W: AsyncWrite + Unpin,
{
    // Cut before, and unchanged since: nothing to read. Else the chunks
    // go out in batches as they are cut (a peer waits at most a minute
    // for the next), the second half's once the first half's are out.
    let recalled = old.as_file().and_then(|f| f.recall(size, cutter.avg()));
    let fresh = recalled.is_none();
    let (chunks, sent): (Arc<[ChunkSum]>, usize) = match recalled {
        Some(d) => (d.chunks, 0),
        None if size >= halves => {
            let mid = size / 2;
            let (first, second) = tokio::join!(
                describe_range(old, 0, mid, cutter, Some(&mut *out)),
                describe_range::<W>(old, mid, size, cutter, None)
            );
            let (mut all, sent) = first?;
            all.extend(second?.0);
            (all.into(), sent)
        }
        None => {
            let (all, sent) = describe_range(old, 0, size, cutter, Some(&mut *out)).await?;
            (all.into(), sent)
        }
    };
    let mut batches = chunks[sent..].chunks(CHUNKS_PER_BATCH).peekable();
    while let Some(b) = batches.next() {
        let batch = ChunkBatch {
            chunks: b.to_vec(),
            more: batches.peek().is_some(),
        };
        write_stalled(out, &batch).await?;
    }
    if chunks.len() == sent {
        let end = ChunkBatch {
            chunks: Vec::new(),
            more: false,
        };
        write_stalled(out, &end).await?;
    }
    if let Some(f) = old
        .as_file()
        .filter(|f| fresh && f.descriptions.receivers_keep())
    {
        f.remember(cutter.avg(), chunks, None).await;
    }
    Ok(())
}

/// Cuts `from..to` of `old` into chunks (the last ending at `to`), reading
/// the next piece while the current one is cut and hashed; with `out`,
/// writes each full batch of them as it fills. All the chunks, and how
/// many of them were written.
pub(super) async fn describe_range<W>(
    old: &dyn ByteSource,
    from: u64,
    to: u64,
    cutter: Cutter,
    mut out: Option<&mut W>,
) -> Result<(Vec<ChunkSum>, usize), TransferError>
where
    W: AsyncWrite + Unpin,
{
    let mut reader = Stretches::open(old, from, to)
        .await
        .map_err(TransferError::OldVersion)?;
    let mut chunks = Chunks::new(cutter);
    let (mut all, mut sent) = (Vec::new(), 0);
    let mut fresh = reader
        .next(STRETCH)
        .await
        .map_err(TransferError::OldVersion)?;
    loop {
        let last = fresh.is_empty();
        // Cutting and hashing are CPU work, off the async threads, while
        // the next stretch is read.
        let (next, (c, sums, back)) = tokio::join!(
            async {
                match last {
                    true => Ok(Vec::new()),
                    false => reader.next(STRETCH).await,
                }
            },
            blocking(move || {
                let mut sums = Vec::new();
                for p in &fresh {
                    chunks.push(p);
                    sums.extend(chunks.sums(false));
                }
                if last {
                    sums.extend(chunks.sums(true));
                }
                (chunks, sums, fresh)
            })
        );
        reader.give_back(back);
        chunks = c;
        all.extend(sums);
        if let Some(out) = out.as_mut() {
            while all.len() - sent > CHUNKS_PER_BATCH {
                let batch = ChunkBatch {
                    chunks: all[sent..sent + CHUNKS_PER_BATCH].to_vec(),
                    more: true,
                };
                write_stalled(&mut **out, &batch).await?;
                sent += CHUNKS_PER_BATCH;
            }
        }
        fresh = next.map_err(TransferError::OldVersion)?;
        if last {
            return Ok((all, sent));
        }
    }
}

/// The receiver's version as the sender knows it: where each chunk is.
pub(crate) struct BaseIndex {
    pub(super) cutter: Cutter,
    /// The chunks, shared with the threads that match against them.
    pub(super) view: Arc<BaseView>,
}

/// The sender's side, first: reads the receiver's description of its
/// version (`base`, whose chunks follow on `input`), checking it as it
/// comes: a valid average, chunks no longer than the cutter makes, no
/// more than [`MAX_DELTA_CHUNKS`] of them, adding up to `base.size`.
pub(crate) async fn read_chunks<R>(
    input: &mut R,
    base: DeltaBase,
) -> Result<BaseIndex, TransferError>
where
    R: AsyncRead + Unpin,
{
    let bad = |why: String| {
        TransferError::Malformed(format!("the description of the old version: {why}"))
    };
    let cutter = Cutter::with_avg(base.avg_chunk)
        .ok_or_else(|| bad(format!("average chunk of {} bytes", base.avg_chunk)))?;
    let mut chunks = HashMap::new();
    let mut list = Vec::new();
    let (mut offset, mut count) = (0u64, 0u64);
    loop {
        let batch: ChunkBatch = read_stalled(input)
            .await
            .map_err(|e| ended(e, offset, base.size))?;
        count += batch.chunks.len() as u64;
        if count > MAX_DELTA_CHUNKS {
            return Err(bad(format!("more than {MAX_DELTA_CHUNKS} chunks")));
        }
        for c in batch.chunks {
            if c.len == 0 || c.len as usize > cutter.max {
                return Err(bad(format!("a chunk of {} bytes", c.len)));
            }
            if offset + u64::from(c.len) > base.size {
                return Err(bad(format!("chunks past its {} bytes", base.size)));
            }
            chunks.entry(c.digest).or_insert((offset, c.len));
            list.push((offset, c.len, c.digest));
            offset += u64::from(c.len);
        }
        if !batch.more {
            break;
        }
    }
    if offset != base.size {
        return Err(bad(format!(
            "chunks of {offset} bytes for a version of {}",
            base.size
        )));
    }
    Ok(BaseIndex {
        cutter,
        view: Arc::new(BaseView {
            list,
            by_digest: chunks,
        }),
    })
}
