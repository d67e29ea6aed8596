//! A multipart upload's parts: filled from the client's bytes, stored a few at a time, each with its chaining value.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::PutPayload;
use tokio::sync::{mpsc, oneshot};

use crate::files::{blocking, Sink, SinkWrite, TransferError};
use crate::protocol::Digest;
use crate::store::tree_hash::{self, Piece};
use crate::store::Held;

use super::super::Inner;

use super::*;

/// The pieces the stored parts are, in order (each a whole part).
pub(super) fn part_pieces(parts: &[PartRecord], part_size: u64) -> Vec<Piece> {
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| Piece {
            offset: i as u64 * part_size,
            len: part_size,
            cv: p.cv,
        })
        .collect()
}

/// What a resumed upload holds: its whole parts, and their BLAKE3.
pub(super) fn held(parts: &[PartRecord], part_size: u64, size: u64) -> Held {
    let offset = (parts.len() as u64 * part_size).min(size);
    if parts.is_empty() || offset != parts.len() as u64 * part_size {
        return Held::none();
    }
    let pieces = part_pieces(parts, part_size);
    match tree_hash::digest(&pieces, parts[0].root) {
        Some(prefix) => Held { offset, prefix },
        None => Held::none(),
    }
}

/// Hashes the bytes of `payload` as the piece at `offset`, in the disk
/// pool (it is CPU work).
pub(super) async fn hash_payload(offset: u64, payload: PutPayload) -> (Piece, Option<Digest>) {
    blocking(move || tree_hash::hash_piece_of(offset, payload.iter().map(|b| &b[..]))).await
}

/// Where a multipart upload's parts go.
#[derive(Clone)]
pub(super) struct PartTarget {
    pub(super) inner: Arc<Inner>,
    pub(super) key: Key,
    pub(super) upload_id: String,
    pub(super) record: Vec<String>,
    /// The part records known to be in the bucket (see [`RecordKeys`]).
    pub(super) keys: RecordKeys,
}

impl PartTarget {
    /// Hashes and stores part `index` (at `offset`). It is recorded later,
    /// with others ([`Recorder`]).
    pub(super) async fn store(
        &self,
        index: usize,
        offset: u64,
        part: PutPayload,
    ) -> object_store::Result<PartRecord> {
        let hashing = hash_payload(offset, part.clone());
        let storing = async {
            let _slot = self.inner.slot().await;
            self.inner
                .s3
                .put_part(&self.key, &self.upload_id, index, part)
                .await
        };
        let ((piece, root), id) = tokio::join!(hashing, storing);
        Ok(PartRecord {
            etag: id?.content_id,
            cv: piece.cv,
            root,
        })
    }

    /// Records the stored parts `parts` (consecutive, from `parts[0].0`)
    /// in one object: see [`RECORD_EVERY`].
    async fn record(&self, parts: Vec<(usize, PartRecord)>) -> object_store::Result<()> {
        let (Some((first, _)), Some((last, _))) = (parts.first(), parts.last()) else {
            return Ok(());
        };
        let name = record_name(*first, *last);
        let key = record_key(&self.inner, &self.record, &name);
        self.keys.lock().expect("never poisoned").push(key.clone());
        if parts.len() == 1 {
            return put_json(&self.inner, &key, &parts[0].1).await;
        }
        let records: Vec<PartRecord> = parts.into_iter().map(|(_, r)| r).collect();
        put_json(&self.inner, &key, &records).await
    }
}

/// Stored parts are recorded together, at most this often while an upload
/// runs, and all that are left when it ends or is interrupted. Each record
/// is a small object, and Garage spent about 18 ms of CPU on each (it
/// keeps small objects in its metadata database, three times over): one
/// record per 8 MiB part cost a 1 GiB put through one server 2.3 of
/// Garage's CPU seconds and 3.5 s of its 15.5 s. What a server that dies
/// mid-upload had stored in its last second is unrecorded, and is sent
/// again by the client's resume through another server (the client's
/// summary counts it among the bytes moved twice); what a live server
/// holds when its client goes away is all recorded.
pub(super) const RECORD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) type PartTask = tokio::task::JoinHandle<object_store::Result<PartRecord>>;

/// What a recorder hears.
enum Note {
    /// Part `.0` is stored (parts are stored a few at a time, so they may
    /// be heard out of order).
    Stored(usize, PartRecord),
    /// Record every part stored without a gap so far, now, and answer
    /// whether every record was written.
    Flush(oneshot::Sender<object_store::Result<()>>),
    /// Record nothing more; answered once no record is being written.
    Stop(oneshot::Sender<()>),
}

/// Records an upload's parts in the bucket as they are stored, in a task
/// of its own: the first part, and each part stored a second or more
/// after the last record, the moment it is stored; the others together,
/// a second after the last record ([`RECORD_EVERY`]). Only parts that
/// follow the recorded ones without a gap are recorded (a resume continues
/// after the last of them), so a part that failed ends the records there.
pub(super) struct Recorder {
    notes: mpsc::UnboundedSender<Note>,
}

impl Recorder {
    /// A recorder for `target`'s parts from `first` on (those before are
    /// recorded already). It stops when the recorder and every part task
    /// holding its sender are gone, recording nothing more: an upload
    /// dropped unsettled is being given up.
    pub(super) fn start(target: PartTarget, first: usize) -> Self {
        let (notes, heard) = mpsc::unbounded_channel();
        tokio::spawn(record_parts(target, first, heard));
        Self { notes }
    }

    /// Records every part stored so far; whether every record was written.
    async fn flush(&self) -> object_store::Result<()> {
        let (answer, answered) = oneshot::channel();
        if self.notes.send(Note::Flush(answer)).is_err() {
            return Ok(());
        }
        answered.await.unwrap_or(Ok(()))
    }

    /// Stops recording; returns once no record is being written, so none
    /// lands after the record is removed.
    async fn stop(&self) {
        let (answer, answered) = oneshot::channel();
        if self.notes.send(Note::Stop(answer)).is_ok() {
            let _ = answered.await;
        }
    }
}

/// The recorder's task (see [`Recorder`]).
async fn record_parts(
    target: PartTarget,
    mut next: usize,
    mut heard: mpsc::UnboundedReceiver<Note>,
) {
    let mut stored: std::collections::BTreeMap<usize, PartRecord> = Default::default();
    // The first part is recorded as soon as it is stored: an upload cut
    // short early still resumes from it.
    let mut last = tokio::time::Instant::now() - RECORD_EVERY;
    // The first record that failed: none are written after it.
    let mut failed: Option<object_store::Error> = None;
    loop {
        let ready = failed.is_none() && stored.contains_key(&next);
        let note = tokio::select! {
            note = heard.recv() => note,
            _ = tokio::time::sleep_until(last + RECORD_EVERY), if ready => {
                write_records(&target, &mut stored, &mut next, &mut failed).await;
                last = tokio::time::Instant::now();
                continue;
            }
        };
        match note {
            None => return,
            Some(Note::Stored(index, record)) => {
                stored.insert(index, record);
            }
            Some(Note::Stop(answer)) => {
                let _ = answer.send(());
                return;
            }
            Some(Note::Flush(answer)) => {
                if stored.contains_key(&next) {
                    write_records(&target, &mut stored, &mut next, &mut failed).await;
                    last = tokio::time::Instant::now();
                }
                let _ = answer.send(match &failed {
                    None => Ok(()),
                    Some(e) => Err(object_store::Error::Generic {
                        store: "qxfer",
                        source: format!("cannot record the parts stored: {e}").into(),
                    }),
                });
            }
        }
    }
}

/// Records the parts in `stored` that follow `next` without a gap, in one
/// object, unless an earlier record failed.
async fn write_records(
    target: &PartTarget,
    stored: &mut std::collections::BTreeMap<usize, PartRecord>,
    next: &mut usize,
    failed: &mut Option<object_store::Error>,
) {
    let mut run = Vec::new();
    while let Some(record) = stored.remove(next) {
        run.push((*next, record));
        *next += 1;
    }
    if failed.is_some() || run.is_empty() {
        return;
    }
    if let Err(e) = target.record(run).await {
        *failed = Some(e);
    }
}

/// Parts of one upload whose bytes are held while they are stored. A
/// store answers each part request at its own pace (Garage on loopback
/// took 21 s for 1 GiB one part at a time, 11 s four at a time). Three in
/// flight, as the store's own client measured alone in docs/bench runs
/// them; a part starts filling only when it can be stored, so an upload
/// holds at most three parts, 24 MiB with 8 MiB parts. A fourth part
/// filling beside three in flight, as before 2026-12-06, came on top of
/// the stream's receive window (which fills while the store is the slower
/// side): a server peaked at 64-69 MiB for a 1 GiB put, against 56-60 MiB
/// since (medians 67.4 and 58.2 MiB, 6 puts each, the put 10.98 and
/// 10.82 s), within issue 10's 64 MiB a side. One allocator arena (see
/// [`tune_allocator`](crate::store::object::tune_allocator)) keeps it so.
/// Two in flight were 6% slower (1 GiB put over Garage on loopback, 4
/// alternating runs: 14.28 against 13.47 s).
pub(super) const PARTS_IN_FLIGHT: usize = 3;

/// Pieces smaller than this are gathered into one chunk of at least this
/// size before they join a part: a part is then at most a few hundred
/// chunks (each a write of the request's body), whatever a pipe's sender
/// made of its blocks.
const GATHER_BELOW: usize = 64 * 1024;

/// The bytes of the part filling, as the network delivered them: pieces
/// of up to a block (1 MiB), kept as they are and handed to the store as
/// the chunks of one request. Copying them into one 8 MiB buffer first
/// was 6% of a server's CPU taking 1 GiB into Garage; the pieces are no
/// more memory than that buffer was, and each is freed once its part is
/// stored.
#[derive(Default)]
pub(super) struct Filling {
    pieces: Vec<Bytes>,
    /// Small pieces, gathered (see [`GATHER_BELOW`]).
    small: Vec<u8>,
    len: usize,
}

impl Filling {
    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `bytes` after those held.
    fn push(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        if bytes.len() < GATHER_BELOW {
            self.small.extend_from_slice(&bytes);
            if self.small.len() >= GATHER_BELOW {
                self.seal();
            }
        } else {
            self.seal();
            self.pieces.push(bytes);
        }
    }

    /// Makes the small pieces gathered a chunk of their own.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.pieces
                .push(Bytes::from(std::mem::take(&mut self.small)));
        }
    }

    /// The bytes held, as the chunks of one request, leaving them held
    /// (the chunks are shared, not copied).
    pub(super) fn payload(&mut self) -> PutPayload {
        self.seal();
        self.pieces.iter().cloned().collect()
    }

    /// The bytes held, as the chunks of one request, leaving none.
    pub(super) fn take(&mut self) -> PutPayload {
        self.seal();
        self.len = 0;
        std::mem::take(&mut self.pieces).into_iter().collect()
    }
}

/// Receives a file's bytes into parts: each full part is stored (and
/// hashed) in a task of its own while the next ones fill, at most
/// [`PARTS_IN_FLIGHT`] at a time. Without a multipart target everything
/// stays in the buffer for one PUT.
pub(super) struct PartSink {
    /// The part filling, handed to the store without a copy.
    pub(super) buf: Filling,
    /// Where `buf` starts in the file.
    pub(super) buf_offset: u64,
    pub(super) part_size: u64,
    pub(super) upload: Option<PartTarget>,
    /// Parts stored since the sink was made, in order.
    pub(super) stored: Vec<PartRecord>,
    /// The parts being stored, oldest first: at most [`PARTS_IN_FLIGHT`],
    /// each holding its bytes.
    pub(super) in_flight: std::collections::VecDeque<PartTask>,
    /// The index the next full part gets.
    pub(super) next_index: usize,
    /// The first part's own BLAKE3, once known.
    pub(super) first_root: Option<Digest>,
    /// Records the parts as they are stored (with a multipart target).
    pub(super) recorder: Option<Recorder>,
}

impl PartSink {
    /// Waits for the oldest part being stored; its record joins `stored`.
    pub(super) async fn settle_one(&mut self) -> Result<(), TransferError> {
        if let Some(task) = self.in_flight.pop_front() {
            let record = task
                .await
                .expect("part upload panicked")
                .map_err(store_failed)?;
            self.first_root = self.first_root.or(record.root);
            self.stored.push(record);
        }
        Ok(())
    }

    /// Waits for every part being stored, and records them all. After a
    /// failure the later parts are still waited for but not counted: a
    /// resume continues after the last part recorded without a gap.
    ///
    /// With `complete` (every byte arrived) the parts are not recorded
    /// unless one failed, and the recorder stops: the upload is about to
    /// be committed, and a commit that fails aborts it, so a record then
    /// would only delay the client's answer (by a small PUT, about 45 ms
    /// on Garage here). If the client goes away before it commits, a
    /// resume elsewhere sends the unrecorded parts again (the last second's
    /// at most), as after a server killed mid-upload.
    pub(super) async fn settle(&mut self, complete: bool) -> Result<(), TransferError> {
        let mut result = Ok(());
        while !self.in_flight.is_empty() {
            if result.is_ok() {
                result = self.settle_one().await;
            } else if let Some(task) = self.in_flight.pop_front() {
                let _ = task.await;
            }
        }
        // What was stored before a failure is recorded all the same; a
        // record the store did not take fails the upload, as a part would.
        let recorded = match &self.recorder {
            Some(r) if complete && result.is_ok() => {
                r.stop().await;
                Ok(())
            }
            Some(r) => r.flush().await.map_err(store_failed),
            None => Ok(()),
        };
        result.and(recorded)
    }

    /// Takes the parts stored, in order (a failure shows here, not only at
    /// the end); then, with [`PARTS_IN_FLIGHT`] out, waits for the oldest.
    async fn make_room(&mut self) -> Result<(), TransferError> {
        while self.in_flight.front().is_some_and(|t| t.is_finished()) {
            self.settle_one().await?;
        }
        if self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Hands the part filling to the store once it is full (room for it
    /// was made before it began to fill, see [`PartSink::fill`]).
    fn store_if_full(&mut self) {
        let full = self.buf.len() as u64 >= self.part_size;
        let Some(target) = self.upload.as_ref().filter(|_| full).cloned() else {
            return;
        };
        debug_assert_eq!(
            self.buf.len() as u64,
            self.part_size,
            "fill stops at a part"
        );
        debug_assert!(self.in_flight.len() < PARTS_IN_FLIGHT);
        let offset = self.buf_offset;
        self.buf_offset += self.part_size;
        let part = self.buf.take();
        let index = self.next_index;
        self.next_index += 1;
        let notes = self.recorder.as_ref().map(|r| r.notes.clone());
        self.in_flight.push_back(tokio::spawn(async move {
            let stored = target.store(index, offset, part).await;
            if let (Ok(record), Some(notes)) = (&stored, notes) {
                let _ = notes.send(Note::Stored(index, record.clone()));
            }
            stored
        }));
    }
}

/// A part or record the store did not take, as a receiving error.
fn store_failed(e: object_store::Error) -> TransferError {
    TransferError::Write(std::io::Error::other(e))
}

impl Sink for PartSink {
    fn write(self: Box<Self>, bytes: Vec<u8>) -> SinkWrite {
        Box::pin(async move {
            let (sink, result) = self.fill(bytes).await;
            (Box::new(sink) as Box<dyn Sink>, result)
        })
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

impl PartSink {
    /// Adds `bytes` to the part being filled, handing each full part over.
    pub(super) async fn fill(mut self, bytes: Vec<u8>) -> (Self, Result<(), TransferError>) {
        // Fill the part, hand it over once full, go on with the rest: the
        // bytes are split where a part ends, not copied.
        let mut rest = Bytes::from(bytes);
        while !rest.is_empty() {
            // A part starts filling only once it can be stored: while the
            // store holds every part in flight, the bytes wait in the
            // stream's receive window (which is flow control's to bound)
            // instead of in a fourth part as well.
            if self.upload.is_some() && self.buf.is_empty() {
                if let Err(e) = self.make_room().await {
                    return (self, Err(e));
                }
            }
            let room = match self.upload {
                Some(_) => self.part_size as usize - self.buf.len(),
                None => rest.len(),
            };
            let now = rest.split_to(room.min(rest.len()));
            self.buf.push(now);
            self.store_if_full();
        }
        (self, Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{ObjectRoot, PARTIAL_DIR};
    use super::*;
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};

    const PART: u64 = 1 << 20;

    /// An upload of `size` bytes begun over an in-memory store, with its
    /// header recorded, and a sink for it.
    async fn begun(size: u64) -> (Arc<Inner>, Vec<String>, PartSink) {
        let counted = Arc::new(super::super::super::counted::Counted::default());
        let root = ObjectRoot::over(counted, vec!["r".to_owned()], 1 << 30);
        let inner = root.inner.clone();
        let key = inner.key_of(&["f"]);
        let upload_id = inner.s3.create_multipart(&key).await.unwrap();
        let record = vec![PARTIAL_DIR.to_owned(), "f".to_owned()];
        let header = Header {
            key: key.to_string(),
            upload_id: upload_id.clone(),
            size,
            part_size: PART,
        };
        put_json(&inner, &record_key(&inner, &record, "upload"), &header)
            .await
            .unwrap();
        let mut sink = PartSink {
            buf: Filling::default(),
            buf_offset: 0,
            part_size: PART,
            upload: Some(PartTarget {
                inner: inner.clone(),
                key,
                upload_id,
                record: record.clone(),
                keys: RecordKeys::default(),
            }),
            stored: Vec::new(),
            in_flight: std::collections::VecDeque::new(),
            next_index: 0,
            first_root: None,
            recorder: None,
        };
        sink.recorder = sink.upload.clone().map(|t| Recorder::start(t, 0));
        (inner, record, sink)
    }

    async fn record_names(inner: &Inner, record: &[String]) -> Vec<String> {
        let dir = inner.key_of(&record.iter().map(String::as_str).collect::<Vec<_>>());
        let mut names: Vec<String> = inner
            .s3
            .list(Some(&dir))
            .map_ok(|o| o.location.filename().unwrap().to_owned())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        names
    }

    fn data(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Parts stored within a second go into one record object (each of its
    /// own cost Garage a small write), and a resume reads them all back,
    /// in order, with the chaining values the bytes hash to.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parts_stored_within_a_second_share_one_record_that_reads_back_in_order() {
        let size = 6 * PART + 1000;
        let bytes = data(size);
        let (inner, record, sink) = begun(size).await;
        let (mut sink, filled) = sink.fill(bytes.clone()).await;
        filled.unwrap();
        sink.settle(false).await.unwrap();
        assert_eq!(
            sink.stored.len(),
            6,
            "six whole parts; the tail waits for the commit"
        );
        // The first part at once (with any stored before the recorder
        // got to it); the rest, stored within the second after it, together.
        let names = record_names(&inner, &record).await;
        let ranges: Vec<(usize, usize)> = names.iter().filter_map(|n| recorded_range(n)).collect();
        assert_eq!(ranges.len(), 2, "{names:?}");
        assert_eq!(
            (ranges[0].0, ranges[1].0, ranges[1].1),
            (0, ranges[0].1 + 1, 5),
            "{names:?}"
        );
        let (header, parts, _) = read_record(&inner, &record).await.unwrap().unwrap();
        assert_eq!(header.size, size);
        assert_eq!(parts.len(), 6);
        for (i, p) in parts.iter().enumerate() {
            let at = i as u64 * PART;
            let (piece, _) = tree_hash::hash_piece(at, &bytes[at as usize..(at + PART) as usize]);
            assert_eq!(p.cv, piece.cv, "part {i}");
            assert_eq!(p.etag, sink.stored[i].etag, "part {i}");
        }
        assert!(parts[0].root.is_some() && parts[1..].iter().all(|p| p.root.is_none()));
        let target = sink.upload.clone().unwrap();
        let stored = complete_and_read(&inner, &target, &parts).await;
        assert!(stored[..] == bytes[..6 * PART as usize]);
    }

    /// Completes `target`'s upload of `parts` and reads back the object.
    async fn complete_and_read(inner: &Inner, target: &PartTarget, parts: &[PartRecord]) -> Bytes {
        let ids = parts
            .iter()
            .map(|p| PartId {
                content_id: p.etag.clone(),
            })
            .collect();
        inner
            .s3
            .complete_multipart(&target.key, &target.upload_id, ids)
            .await
            .unwrap();
        let got = inner.s3.get(&target.key).await.unwrap();
        got.bytes().await.unwrap()
    }

    /// A part is the pieces as they came: a large piece is handed to the
    /// store as it is (the same memory, not a copy), small ones are
    /// gathered into chunks of at least [`GATHER_BELOW`], in order.
    #[test]
    fn filling_keeps_large_pieces_whole_and_gathers_small_ones() {
        let mut f = Filling::default();
        let big = Bytes::from(vec![7u8; 200_000]);
        for b in [1u8, 2, 3] {
            f.push(Bytes::from(vec![b; 10]));
        }
        f.push(big.clone());
        f.push(Bytes::from_static(b"tail!"));
        assert_eq!(f.len(), 30 + 200_000 + 5);
        let shared = f.payload();
        assert_eq!(f.len(), 200_035, "payload() leaves the bytes held");
        let taken = f.take();
        assert!(f.is_empty());
        for payload in [shared, taken] {
            let chunks: Vec<&Bytes> = payload.iter().collect();
            assert_eq!(chunks.len(), 3);
            assert_eq!(&chunks[0][..], &[[1u8; 10], [2; 10], [3; 10]].concat()[..]);
            assert_eq!(chunks[1].as_ptr(), big.as_ptr(), "not copied");
            assert_eq!(&chunks[2][..], b"tail!");
        }
        // Ten thousand tiny pieces make a few chunks, not ten thousand.
        for i in 0..10_000u32 {
            f.push(Bytes::from(vec![(i % 251) as u8]));
        }
        let payload = f.take();
        assert_eq!(payload.content_length(), 10_000);
        assert!(payload.iter().count() <= 10_000 / GATHER_BELOW + 1);
        let joined: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(joined
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8));
    }

    /// Pieces of any size, crossing part boundaries anywhere, are stored as
    /// the parts they make, each with the chaining value of its bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pieces_of_any_size_make_the_parts_they_cross() {
        let size = 3 * PART + 12_345;
        let bytes = data(size);
        let (inner, _, mut sink) = begun(size).await;
        let sizes = [700_000usize, 10, 20, 1_500_000, 333, 65_536, 1];
        let mut at = 0usize;
        for n in sizes.iter().cycle() {
            if at == size as usize {
                break;
            }
            let end = (at + n).min(size as usize);
            let (s, filled) = sink.fill(bytes[at..end].to_vec()).await;
            filled.unwrap();
            sink = s;
            at = end;
        }
        sink.settle(false).await.unwrap();
        assert_eq!(sink.stored.len(), 3, "three whole parts");
        assert_eq!(sink.buf.len(), 12_345, "the tail waits for the commit");
        for (i, p) in sink.stored.iter().enumerate() {
            let at = i as u64 * PART;
            let (piece, _) = tree_hash::hash_piece(at, &bytes[at as usize..(at + PART) as usize]);
            assert_eq!(p.cv, piece.cv, "part {i}");
        }
        let target = sink.upload.clone().unwrap();
        let tail = sink.buf.take();
        let last = target.store(3, 3 * PART, tail).await.unwrap();
        sink.stored.push(last);
        let stored = complete_and_read(&inner, &target, &sink.stored).await;
        assert!(stored[..] == bytes[..]);
    }

    /// While the store holds every part in flight, the next part does not
    /// start filling: its bytes wait upstream (in the stream's receive
    /// window), so an upload holds at most [`PARTS_IN_FLIGHT`] parts, as
    /// it reserves (prepare.rs). A fourth part's bytes beside three in
    /// flight were 8 MiB more at a 1 GiB put's peak.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_part_fills_while_every_part_in_flight_waits_for_the_store() {
        let parts = PARTS_IN_FLIGHT as u64 + 2;
        let bytes = data(parts * PART);
        let (inner, _, sink) = begun(parts * PART).await;
        // The store answers nothing while the test holds every request slot.
        let all = u32::try_from(inner.slots.available_permits()).unwrap();
        let held = inner.slots.acquire_many(all).await.unwrap();
        let mut at = PARTS_IN_FLIGHT * PART as usize;
        let (sink, filled) = sink.fill(bytes[..at].to_vec()).await;
        filled.unwrap();
        assert_eq!(sink.in_flight.len(), PARTS_IN_FLIGHT);
        assert!(sink.buf.is_empty());
        // Half a part more: not taken while no part can be stored.
        let half = PART as usize / 2;
        let mut next = Box::pin(sink.fill(bytes[at..at + half].to_vec()));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut next).await;
        assert!(waited.is_err(), "a part filled beside every part in flight");
        drop(held);
        let (mut sink, filled) = next.await;
        filled.unwrap();
        assert!(sink.in_flight.len() < PARTS_IN_FLIGHT, "room was made");
        assert_eq!(sink.buf.len(), half);
        at += half;
        let (s, filled) = sink.fill(bytes[at..].to_vec()).await;
        filled.unwrap();
        sink = s;
        sink.settle(false).await.unwrap();
        assert_eq!(sink.stored.len() as u64, parts);
        let target = sink.upload.clone().unwrap();
        let stored = complete_and_read(&inner, &target, &sink.stored).await;
        assert!(stored[..] == bytes[..]);
    }

    /// A slow upload records each part once it is stored, a second or
    /// more after the last record, without waiting for more bytes or its
    /// end: a server that dies loses at most the last second's parts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_upload_records_its_parts_as_they_go() {
        let size = 3 * PART;
        let bytes = data(size);
        let (inner, record, mut sink) = begun(size).await;
        let mut expected = vec!["upload".to_owned()];
        for (i, part) in bytes.chunks(PART as usize).enumerate() {
            let (s, filled) = sink.fill(part.to_vec()).await;
            filled.unwrap();
            sink = s;
            tokio::time::sleep(RECORD_EVERY + std::time::Duration::from_millis(600)).await;
            expected.insert(i, record_name(i, i));
            assert_eq!(record_names(&inner, &record).await, expected);
        }
        sink.settle(false).await.unwrap();
        assert_eq!(record_names(&inner, &record).await, expected);
        let (_, parts, _) = read_record(&inner, &record).await.unwrap().unwrap();
        assert_eq!(parts.len(), 3);
    }

    /// Once every byte has arrived (`settle(true)`), the parts stored
    /// since the last record are not recorded, now or later: the commit
    /// follows, and the record is about to go. Every record that was
    /// written is known by its key, for removing the record without a LIST.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_complete_upload_records_nothing_more_and_knows_its_records() {
        let size = 4 * PART;
        let bytes = data(size);
        let (inner, record, sink) = begun(size).await;
        // The first part, recorded the moment it is stored.
        let (sink, filled) = sink.fill(bytes[..PART as usize].to_vec()).await;
        filled.unwrap();
        let first = vec![record_name(0, 0), "upload".to_owned()];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while record_names(&inner, &record).await != first {
            assert!(
                std::time::Instant::now() < deadline,
                "part 0 never recorded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The other three within the same second, then the end of the data.
        let (mut sink, filled) = sink.fill(bytes[PART as usize..].to_vec()).await;
        filled.unwrap();
        sink.settle(true).await.unwrap();
        assert_eq!(sink.stored.len(), 4);
        tokio::time::sleep(RECORD_EVERY + std::time::Duration::from_millis(500)).await;
        let names = record_names(&inner, &record).await;
        assert_eq!(names, first, "nothing recorded after part 0");
        let keys = sink.upload.as_ref().unwrap().keys.lock().unwrap().clone();
        let mut known: Vec<String> = keys
            .iter()
            .map(|k| k.filename().unwrap().to_owned())
            .collect();
        known.sort();
        let mut written = names.clone();
        written.retain(|n| n != "upload");
        assert_eq!(known, written);
        // Removing the record by those keys leaves nothing of it.
        remove_record(&inner, &record, keys).await.unwrap();
        assert!(record_names(&inner, &record).await.is_empty());
    }

    /// Records of one part (as servers before the ranges wrote) and of
    /// several chain from part 0; a gap, or a record that does not hold
    /// the parts its name says, ends the chain there.
    #[tokio::test]
    async fn records_chain_from_the_first_part_until_a_gap() {
        let (inner, record, _) = begun(20 * PART).await;
        let part = |n: u8| PartRecord {
            etag: format!("e{n}"),
            cv: [n; 32],
            root: None,
        };
        let write = |name: String, body: serde_json::Value| {
            let inner = inner.clone();
            let record = record.clone();
            async move {
                put_json(&inner, &record_key(&inner, &record, &name), &body)
                    .await
                    .unwrap()
            }
        };
        let json = |v: &[u8]| {
            serde_json::to_value(v.iter().map(|n| part(*n)).collect::<Vec<_>>()).unwrap()
        };
        write(record_name(0, 0), serde_json::to_value(part(0)).unwrap()).await;
        write(record_name(1, 3), json(&[1, 2, 3])).await;
        write(record_name(4, 4), serde_json::to_value(part(4)).unwrap()).await;
        // Past a gap (no part 5): not taken.
        write(record_name(6, 7), json(&[6, 7])).await;
        let (_, parts, _) = read_record(&inner, &record).await.unwrap().unwrap();
        let etags: Vec<&str> = parts.iter().map(|p| p.etag.as_str()).collect();
        assert_eq!(etags, ["e0", "e1", "e2", "e3", "e4"]);
        // A record of 5-5 that holds two parts is not believed.
        write(record_name(5, 5), json(&[5, 5])).await;
        let (_, parts, _) = read_record(&inner, &record).await.unwrap().unwrap();
        assert_eq!(parts.len(), 5);
        // Written right, the chain goes on through 6-7.
        write(record_name(5, 5), serde_json::to_value(part(5)).unwrap()).await;
        let (_, parts, _) = read_record(&inner, &record).await.unwrap().unwrap();
        assert_eq!(parts.len(), 8);
    }

    #[test]
    fn record_names_say_their_parts() {
        assert_eq!(record_name(3, 3), "part-00003");
        assert_eq!(record_name(0, 12), "part-00000-00012");
        for (name, range) in [
            ("part-00003", Some((3, 3))),
            ("part-00000-00012", Some((0, 12))),
            ("part-00005-00004", None),
            ("part-", None),
            ("part-1-", None),
            ("part--1", None),
            ("part-+1", None),
            ("part-x", None),
            ("upload", None),
        ] {
            assert_eq!(recorded_range(name), range, "{name}");
        }
    }
}
