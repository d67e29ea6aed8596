//! A multipart upload's parts: filled from the client's bytes, stored a few at a time, each with its chaining value.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::PutPayload;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Where a multipart upload's parts go.
#[derive(Clone)]
pub(super) struct PartTarget {
    pub(super) inner: Arc<Inner>,
    pub(super) key: Key,
    pub(super) upload_id: String,
    pub(super) record: Vec<String>,
}

impl PartTarget {
    /// Hashes and stores part `index` (at `offset`), then records it.
    /// `holding` is what lets the part's bytes be held: it is given up as
    /// soon as they are stored, before the record is written, so the next
    /// part can go out while this one's record does (a record is a small
    /// PUT, but under load Garage took about as long to answer it as a
    /// part, and an upload had one part in flight where it was allowed two).
    pub(super) async fn store(
        &self,
        index: usize,
        offset: u64,
        part: Bytes,
        holding: Option<OwnedSemaphorePermit>,
    ) -> object_store::Result<PartRecord> {
        let for_hash = part.clone();
        let hashing = blocking(move || tree_hash::hash_piece(offset, &for_hash));
        let storing = async {
            let _slot = self.inner.slot().await;
            self.inner
                .s3
                .put_part(&self.key, &self.upload_id, index, PutPayload::from(part))
                .await
        };
        let ((piece, root), id) = tokio::join!(hashing, storing);
        drop(holding);
        let record = PartRecord {
            etag: id?.content_id,
            cv: piece.cv,
            root,
        };
        let name = format!("part-{index:05}");
        put_json(
            &self.inner,
            &record_key(&self.inner, &self.record, &name),
            &record,
        )
        .await?;
        Ok(record)
    }
}

pub(super) type PartTask = tokio::task::JoinHandle<object_store::Result<PartRecord>>;

/// Parts of one upload whose bytes are held while they are stored. A
/// store answers each part request at its own pace (Garage on loopback
/// took 21 s for 1 GiB one part at a time, 11 s four at a time); two in
/// flight and one filling keep an upload at 24 MiB of buffers with 8 MiB
/// parts, so that with the stream's receive buffer (which fills while the
/// store is the slower side) a server stays within 64 MiB per 1 GiB upload
/// (three in flight peaked at 65 MiB).
pub(super) const PARTS_IN_FLIGHT: usize = 2;

/// Parts of one upload stored and still being recorded, besides those
/// [`PARTS_IN_FLIGHT`]: they hold no bytes, only a task each.
const RECORDS_IN_FLIGHT: usize = 4;

/// Receives a file's bytes into parts: each full part is stored (and
/// hashed) in a task of its own while the next ones fill, at most
/// [`PARTS_IN_FLIGHT`] at a time. Without a multipart target everything
/// stays in the buffer for one PUT.
pub(super) struct PartSink {
    /// The part filling: allocated at its final size, handed to the store
    /// without a copy.
    pub(super) buf: Vec<u8>,
    /// Where `buf` starts in the file.
    pub(super) buf_offset: u64,
    /// The file's size.
    pub(super) size: u64,
    pub(super) part_size: u64,
    pub(super) upload: Option<PartTarget>,
    /// Parts stored since the sink was made, in order.
    pub(super) stored: Vec<PartRecord>,
    /// The parts being stored or recorded, oldest first.
    pub(super) in_flight: std::collections::VecDeque<PartTask>,
    /// Leave to hold a part's bytes while it is stored: [`PARTS_IN_FLIGHT`].
    pub(super) holding: Arc<Semaphore>,
    /// The index the next full part gets.
    pub(super) next_index: usize,
    /// The first part's own BLAKE3, once known.
    pub(super) first_root: Option<Digest>,
}

impl PartSink {
    /// Waits for the oldest part being stored; its record joins `stored`.
    pub(super) async fn settle_one(&mut self) -> Result<(), TransferError> {
        if let Some(task) = self.in_flight.pop_front() {
            let record = task
                .await
                .expect("part upload panicked")
                .map_err(|e| TransferError::Write(std::io::Error::other(e)))?;
            self.first_root = self.first_root.or(record.root);
            self.stored.push(record);
        }
        Ok(())
    }

    /// Waits for every part being stored. After a failure the later parts
    /// are still waited for but not counted: a resume continues after the
    /// last part stored without a gap.
    pub(super) async fn settle(&mut self) -> Result<(), TransferError> {
        let mut result = Ok(());
        while !self.in_flight.is_empty() {
            if result.is_ok() {
                result = self.settle_one().await;
            } else if let Some(task) = self.in_flight.pop_front() {
                let _ = task.await;
            }
        }
        result
    }

    /// Hands every full part in the buffer to the store.
    pub(super) async fn store_full_parts(&mut self) -> Result<(), TransferError> {
        let Some(target) = self.upload.clone() else {
            return Ok(());
        };
        while self.buf.len() as u64 >= self.part_size {
            // Parts stored and recorded are taken in order (a failure
            // shows here, not only at the end); then the oldest is waited
            // for if too many are still being recorded, and leave to hold
            // one more part's bytes.
            while self.in_flight.front().is_some_and(|t| t.is_finished()) {
                self.settle_one().await?;
            }
            if self.in_flight.len() >= PARTS_IN_FLIGHT + RECORDS_IN_FLIGHT {
                self.settle_one().await?;
            }
            let holding = self
                .holding
                .clone()
                .acquire_owned()
                .await
                .expect("the sink's semaphore is never closed");
            let offset = self.buf_offset;
            self.buf_offset += self.part_size;
            let next = (self.size.saturating_sub(self.buf_offset)).min(self.part_size) as usize;
            let part = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(next)));
            let index = self.next_index;
            self.next_index += 1;
            let target = target.clone();
            self.in_flight.push_back(tokio::spawn(async move {
                target.store(index, offset, part, Some(holding)).await
            }));
        }
        Ok(())
    }
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
        // Fill the part, hand it over once full, go on with the rest.
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let room = match self.upload {
                Some(_) => self.part_size as usize - self.buf.len(),
                None => rest.len(),
            };
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(now);
            rest = later;
            if let Err(e) = self.store_full_parts().await {
                return (self, Err(e));
            }
        }
        (self, Ok(()))
    }
}
