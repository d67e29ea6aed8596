//! The sender's cut of its new version: its own FastCDC cut, or, when the receiver's description arrives first, a follow of the receiver's chunks.

use super::*;

/// The sender's own version cut into chunks: each chunk's offset, length
/// and BLAKE3, and the whole file's BLAKE3. The sender cuts while the
/// receiver describes its version (the two take about as long), so the
/// match that follows costs nothing but lookups.
pub(crate) struct Cut {
    pub(super) cutter: Cutter,
    pub(super) chunks: Vec<(u64, u32, Digest)>,
    pub(super) digest: Digest,
}

/// The sender's side, first: cuts `src` (`size` bytes) as `cutter` does.
#[cfg(test)]
pub(crate) async fn cut_source(
    src: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
) -> Result<Cut, TransferError> {
    cut_counted(src, size, cutter, &AtomicU64::new(0)).await
}

/// [`cut_source`], counting in `done` the bytes cut so far.
pub(super) async fn cut_counted(
    src: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
    done: &AtomicU64,
) -> Result<Cut, TransferError> {
    // Cut before, and unchanged since: at most a hash to take.
    if let Some(d) = src.as_file().and_then(|f| f.recall(size, cutter.avg())) {
        let digest = match d.digest {
            Some(digest) => digest,
            None => hash_source(src, size).await.map_err(read_error)?,
        };
        let mut pos = 0;
        let chunks = d
            .chunks
            .iter()
            .map(|c| {
                pos += u64::from(c.len);
                (pos - u64::from(c.len), c.len, c.digest)
            })
            .collect();
        return Ok(Cut {
            cutter,
            chunks,
            digest,
        });
    }
    let mut reader = Stretches::open(src, 0, size).await.map_err(read_error)?;
    let (mut chunks, mut hasher, mut list, mut pos) =
        (Chunks::new(cutter), blake3::Hasher::new(), Vec::new(), 0u64);
    let mut fresh = reader.next(STRETCH).await.map_err(read_error)?;
    loop {
        let last = fresh.is_empty();
        // Cutting and hashing are CPU work, off the async threads; the
        // whole file's hash, the chunks and the next read go side by
        // side (a sender's file is cut while the receiver describes its
        // own, so this is the time the delta waits for).
        let (p1, p2) = (fresh.clone(), fresh);
        let (next, (h, back), c) = tokio::join!(
            async {
                match last {
                    true => Ok(Vec::new()),
                    false => reader.next(STRETCH).await,
                }
            },
            blocking(move || {
                for p in &p1 {
                    hasher.update(p);
                }
                (hasher, p1)
            }),
            blocking(move || {
                for p in p2 {
                    chunks.push(&p);
                    for c in chunks.sums(false) {
                        list.push((pos, c.len, c.digest));
                        pos += u64::from(c.len);
                    }
                }
                if last {
                    for c in chunks.sums(true) {
                        list.push((pos, c.len, c.digest));
                        pos += u64::from(c.len);
                    }
                }
                (chunks, list, pos)
            })
        );
        hasher = h;
        (chunks, list, pos) = c;
        reader.give_back(back);
        done.store(pos, Ordering::Relaxed);
        fresh = next.map_err(read_error)?;
        if last {
            let chunks = list;
            let digest = *hasher.finalize().as_bytes();
            if let Some(f) = src.as_file().filter(|f| f.descriptions.keeping()) {
                let sums = chunks
                    .iter()
                    .map(|&(_, len, digest)| ChunkSum { len, digest })
                    .collect();
                f.remember(cutter.avg(), sums, Some(digest)).await;
            }
            return Ok(Cut {
                cutter,
                chunks,
                digest,
            });
        }
    }
}

/// The sender's side, first, as the peers run it: cuts `src` (`size`
/// bytes) while the receiver's description (`base`, its chunks following
/// on `input`) arrives. A description that arrives before a quarter of
/// the file is cut (the receiver remembered it, or its version is small)
/// is followed instead ([`cut_along`]): where the versions agree that
/// hashes the sender's bytes at the receiver's chunks, without cutting
/// them, in about half the time of a cut. One that arrives later (the
/// receiver read and cut its version meanwhile) finds the cut far enough
/// along that finishing it is cheaper than starting again.
pub(crate) async fn cut_while_described<R>(
    input: &mut R,
    base: DeltaBase,
    src: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
) -> (Result<BaseIndex, TransferError>, Result<Cut, TransferError>)
where
    R: AsyncRead + Unpin,
{
    let (began, done) = (std::time::Instant::now(), AtomicU64::new(0));
    let reading = read_chunks(input, base);
    let cutting = cut_counted(src, size, cutter, &done);
    tokio::pin!(reading, cutting);
    // What a slow delta waited for, at debug level (`-vv`).
    let ms = |t: std::time::Instant| t.elapsed().as_millis() as u64;
    tokio::select! {
        index = &mut reading => {
            let (described_ms, cut) = (ms(began), done.load(Ordering::Relaxed));
            match index {
                Ok(index) if cut < size / 4 && index.cutter == cutter => {
                    let cut = cut_along(src, size, &index).await;
                    tracing::debug!(described_ms, cut_ms = ms(began), bytes = size, "followed the receiver's chunks");
                    (Ok(index), cut)
                }
                index => {
                    let cut = cutting.await;
                    tracing::debug!(described_ms, cut_ms = ms(began), bytes = size, "cut the new version");
                    (index, cut)
                }
            }
        }
        cut = &mut cutting => {
            let cut_ms = ms(began);
            let index = reading.await;
            tracing::debug!(described_ms = ms(began), cut_ms, bytes = size, "cut the new version");
            (index, cut)
        }
    }
}

/// How far ahead of the current position [`cut_along`] holds the file.
pub(super) const LOOKAHEAD: u64 = 8 << 20;

/// The sender's version cut along the receiver's chunks: at each position
/// the receiver's next chunk is tried first (the sender's bytes of its
/// length hashed and compared); where they differ, the sender's own bytes
/// are cut as [`cut_source`] cuts them until a chunk found again among
/// the receiver's puts it back in step. An edit in place costs a hash of
/// each chunk and the cut of the chunks around the edit; an insertion or
/// a deletion, the cut up to where the data agrees again. The whole file
/// is hashed at the same time, on another thread.
pub(crate) async fn cut_along(
    src: &dyn ByteSource,
    size: u64,
    base: &BaseIndex,
) -> Result<Cut, TransferError> {
    let mut reader = Stretches::open(src, 0, size).await.map_err(read_error)?;
    let mut window = Window::default();
    let mut state = Along::default();
    let mut hasher = blake3::Hasher::new();
    let (cutter, index) = (base.cutter, base.view.clone());
    // The first stretch, then each next one read while the one before is
    // hashed and followed: reads, the whole file's hash and the chunks'
    // hashes go side by side.
    let ahead = LOOKAHEAD + cutter.max as u64;
    let mut fresh = reader.next(ahead).await.map_err(read_error)?;
    while state.pos < size {
        for p in &fresh {
            window.push(p.clone());
        }
        let (w, idx) = (window.clone(), index.clone());
        let (next, h, st) = tokio::join!(
            reader.next(ahead),
            blocking(move || {
                for p in fresh {
                    hasher.update(&p);
                }
                hasher
            }),
            blocking(move || {
                state.advance(&w, size, cutter, &idx);
                state
            })
        );
        (hasher, state) = (h, st);
        fresh = next.map_err(read_error)?;
        reader.give_back(window.forget_before(state.pos));
    }
    debug_assert!(fresh.is_empty());
    Ok(Cut {
        cutter,
        chunks: state.chunks,
        digest: *hasher.finalize().as_bytes(),
    })
}

/// The receiver's chunks as the sender holds them.
pub(super) struct BaseView {
    /// In order: offset, length, BLAKE3.
    pub(super) list: Vec<(u64, u32, Digest)>,
    /// Each chunk's offset and length, by BLAKE3 (the first of equal ones).
    pub(super) by_digest: HashMap<Digest, (u64, u32)>,
}

/// The sender's bytes [`cut_along`] holds: pieces in order, `end` the
/// offset just past the last.
#[derive(Clone, Default)]
pub(super) struct Window {
    pub(super) pieces: VecDeque<(u64, Arc<Vec<u8>>)>,
    pub(super) end: u64,
}

impl Window {
    pub(super) fn push(&mut self, p: Arc<Vec<u8>>) {
        let n = p.len() as u64;
        self.pieces.push_back((self.end, p));
        self.end += n;
    }

    /// Drops the pieces wholly before `pos`.
    pub(super) fn forget_before(&mut self, pos: u64) -> Vec<Arc<Vec<u8>>> {
        let mut gone = Vec::new();
        while let Some((at, p)) = self.pieces.front() {
            if at + p.len() as u64 > pos {
                break;
            }
            gone.extend(self.pieces.pop_front().map(|(_, p)| p));
        }
        gone
    }

    /// The bytes `from..to` (held), as slices in order.
    pub(super) fn slices(&self, from: u64, to: u64) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().filter_map(move |(at, p)| {
            let end = at + p.len() as u64;
            if end <= from || *at >= to {
                return None;
            }
            let a = from.max(*at) - at;
            let b = to.min(end) - at;
            Some(&p[a as usize..b as usize])
        })
    }

    pub(super) fn hash(&self, from: u64, to: u64) -> Digest {
        let mut h = blake3::Hasher::new();
        for s in self.slices(from, to) {
            h.update(s);
        }
        *h.finalize().as_bytes()
    }
}

/// Where [`cut_along`] is: the sender's position, the receiver's chunk
/// tried next (while in step), and the chunks so far.
#[derive(Default)]
pub(super) struct Along {
    pub(super) pos: u64,
    pub(super) next: usize,
    pub(super) cutting: bool,
    pub(super) chunks: Vec<(u64, u32, Digest)>,
}

impl Along {
    /// Goes as far as the bytes held allow. Blocking (CPU).
    pub(super) fn advance(&mut self, w: &Window, size: u64, cutter: Cutter, base: &BaseView) {
        while self.pos < size {
            if !self.cutting {
                match base.list.get(self.next) {
                    Some(&(_, len, digest)) if self.pos + u64::from(len) <= size => {
                        let end = self.pos + u64::from(len);
                        if end > w.end {
                            return;
                        }
                        if w.hash(self.pos, end) == digest {
                            self.chunks.push((self.pos, len, digest));
                            self.pos = end;
                            self.next += 1;
                            continue;
                        }
                        self.cutting = true;
                    }
                    _ => self.cutting = true,
                }
            }
            // Out of step: cut the sender's bytes until a chunk is found
            // again (or more bytes are needed), taking a few chunks' worth
            // of them at a time.
            let (mut held, mut held_to, mut at) = (Vec::new(), self.pos, 0);
            while self.cutting {
                let rest = &held[at..];
                let Some(n) = cutter.next(rest, held_to == size) else {
                    if held_to == w.end {
                        return;
                    }
                    let to = (held_to + 4 * cutter.max as u64).min(w.end);
                    held.drain(..at);
                    at = 0;
                    for piece in w.slices(held_to, to) {
                        held.extend_from_slice(piece);
                    }
                    held_to = to;
                    continue;
                };
                let digest = *blake3::hash(&rest[..n]).as_bytes();
                self.chunks.push((self.pos, n as u32, digest));
                self.pos += n as u64;
                at += n;
                if let Some(&(from, len)) = base.by_digest.get(&digest) {
                    if len as usize == n {
                        // Back in step after that chunk of the receiver's.
                        if let Ok(i) = base.list.binary_search_by_key(&from, |c| c.0) {
                            self.next = i + 1;
                            self.cutting = false;
                        }
                    }
                }
            }
        }
    }
}
