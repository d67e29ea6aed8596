//! The sender's ops: copies of the receiver's chunks and new blocks, in order.

use super::*;

/// What the receiver is told to do with a stretch of the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Copy `len` bytes of its version from `from`.
    Copy { from: u64, len: u64 },
    /// Take `len` new bytes: the sender's from `at`.
    New { at: u64, len: u64 },
}

/// The steps that make the new version from `start` on, in order, with
/// neighbouring copies and neighbouring new stretches merged.
pub(super) fn steps(cut: &Cut, base: &BaseIndex, start: u64) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    for &(pos, len, digest) in &cut.chunks {
        let (pos, len) = (pos, u64::from(len));
        if pos + len <= start {
            continue;
        }
        let skip = start.saturating_sub(pos);
        let found = base
            .view
            .by_digest
            .get(&digest)
            .filter(|(_, l)| u64::from(*l) == len)
            .map(|(from, _)| *from);
        let step = match found {
            Some(from) => Step::Copy {
                from: from + skip,
                len: len - skip,
            },
            None => Step::New {
                at: pos + skip,
                len: len - skip,
            },
        };
        match (out.last_mut(), step) {
            (Some(Step::Copy { from, len }), Step::Copy { from: f, len: l })
                if *from + *len == f =>
            {
                *len += l
            }
            (Some(Step::New { at, len }), Step::New { at: a, len: l }) if *at + *len == a => {
                *len += l
            }
            _ => out.push(step),
        }
    }
    out
}

/// The sender's side, then: sends the new version `src` (`size` bytes, cut
/// as `cut`, the receiver holding the first `start` already) to `out` as
/// copies of the receiver's chunks in `base` and new blocks framed by
/// `framing`, ending with [`DeltaOp::End`]. New bytes are read again from
/// `src` as they go (a source that changed since it was cut fails).
/// Returns the BLAKE3 of the whole new version and what crossed;
/// `progress` counts new bytes as they go, `kept` the bytes the receiver
/// copies.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_cut<W>(
    src: &dyn ByteSource,
    cut: Cut,
    start: u64,
    base: &BaseIndex,
    framing: Framing,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<(Digest, DeltaSent), TransferError>
where
    W: ChunkWrite,
{
    if cut.cutter != base.cutter {
        return Err(TransferError::Malformed(
            "the old version was cut with other chunk sizes than the new".to_owned(),
        ));
    }
    let mut framer = Some(Framer::new(framing));
    let mut sent = DeltaSent::default();
    for step in steps(&cut, base, start) {
        match step {
            Step::Copy { from, len } => {
                write_stalled(out, &DeltaOp::Copy { from, len }).await?;
                sent.copied += len;
                kept(len);
            }
            Step::New { at, len } => {
                let mut pieces = Pieces::open(src, at, at + len).await.map_err(read_error)?;
                while let Some(piece) = pieces.next().await.map_err(read_error)? {
                    let mut f = framer.take().expect("kept");
                    let (f, block) = blocking(move || {
                        let mut buf = vec![0u8; f.room()];
                        buf.extend_from_slice(&piece);
                        let block = f.frame(buf);
                        (f, block)
                    })
                    .await;
                    framer = Some(f);
                    write_stalled(out, &DeltaOp::Block).await?;
                    write_paced(out, block.bytes.into(), pace.as_deref()).await?;
                    sent.literal += block.raw as u64;
                    progress(block.raw as u64);
                }
            }
        }
    }
    src.check_unchanged().await?;
    write_stalled(out, &DeltaOp::End).await?;
    Ok((cut.digest, sent))
}

/// Both of the sender's steps, one after the other: cuts `src` (`size`
/// bytes) as `base` was cut, then sends it (see [`send_cut`]). The peers
/// overlap the two with the receiver's description; tests need not.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_delta<W>(
    src: &dyn ByteSource,
    size: u64,
    start: u64,
    base: Arc<BaseIndex>,
    framing: Framing,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<(Digest, DeltaSent), TransferError>
where
    W: ChunkWrite,
{
    let cut = cut_source(src, size, base.cutter).await?;
    send_cut(src, cut, start, &base, framing, pace, out, progress, kept).await
}
