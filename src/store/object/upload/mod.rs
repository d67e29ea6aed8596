//! Uploads into the object store: one PUT for a file smaller than a part, else a multipart upload recorded in the bucket so that any server can resume it; and the sweep of abandoned ones.

use std::sync::Arc;

use async_trait::async_trait;
use object_store::multipart::PartId;
use object_store::path::Path as Key;
use object_store::{
    Attribute, AttributeValue, Attributes, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
};
use tracing::warn;

use crate::files::{blocking, Received, Sink, TransferError, Whole};
use crate::paths::RemotePath;
use crate::protocol::{Digest, ErrorCode, FileMeta, RemoteError};
use crate::store::tree_hash::{self, Piece};
use crate::store::{appeared, corrupt, receive_error, Prepared, PutPlan, Sinking, Upload};

use super::dir_leases::Ticket;
use super::leases::Leases;
use super::memory;
use super::read::{sums_key, Sums};
use super::{
    as_stored, put_mode, put_times_and_mode, store_error, Inner, META_BLAKE3, PARTIAL_DIR,
};

mod parts;
mod prepare;
mod records;
pub(super) use prepare::prepare;

use parts::*;
use records::*;
pub(super) use records::{recorded_uploads, sweep};

/// A multipart upload's identity and the parts it holds.
#[derive(Debug)]
struct Multipart {
    /// `.qxfer-partial/NAME`.
    record: Vec<String>,
    header: Header,
    parts: Vec<PartRecord>,
    /// Its part records in the bucket, for [`remove_record`].
    keys: RecordKeys,
}

/// What keeps an upload's name its own.
#[derive(Debug)]
pub(super) enum Hold {
    /// A lease on the name.
    Name(Leases),
    /// A place under the lease on its directory (small files).
    Dir(Ticket),
    /// Given back.
    Nothing,
}

impl Hold {
    /// Gives the name back: a name's lease is deleted (in the background),
    /// a place under a directory's lease goes as it is dropped.
    fn give_back(self) {
        if let Self::Name(lease) = self {
            lease.release();
        }
    }

    /// Whether the hold is still sure to be this server's alone: an error
    /// for `path` if not, to refuse the write.
    fn check(&self, path: &RemotePath) -> Result<(), RemoteError> {
        match self {
            Self::Name(lease) => lease.check(path),
            Self::Dir(ticket) => ticket.check(path),
            Self::Nothing => Err(RemoteError::new(
                ErrorCode::Internal,
                format!("'{path}': the upload no longer holds its name"),
            )),
        }
    }
}

/// An upload into the object store.
struct ObjectUpload {
    inner: Arc<Inner>,
    path: RemotePath,
    key: Key,
    /// The file's size; for data from a pipe, `u64::MAX` until it ended.
    size: u64,
    /// Data from a pipe, of a length known once it ends.
    stream: bool,
    part_size: u64,
    /// For a file of more than one part (and for data from a pipe).
    multipart: Option<Multipart>,
    /// What has arrived and is not yet a stored part; taken while receiving.
    sink: Option<PartSink>,
    /// The put's mtime and mode (a multipart upload is created with them).
    declared: FileMeta,
    /// The BLAKE3 of what was received.
    received: Option<Digest>,
    /// The name's lease (or its place under its directory's), held until
    /// the upload is committed or given up.
    hold: Hold,
    /// The memory its buffers may take, reserved until it ends.
    _memory: memory::Reserved,
}

impl ObjectUpload {
    /// Starts (or, with the client's agreement, continues) the multipart
    /// upload recorded under `name`.
    async fn start_multipart(
        mut self,
        name: String,
        plan: &PutPlan,
    ) -> Result<Prepared, RemoteError> {
        let failed = |e| store_error(e, &self.path, "cannot create the upload of");
        let record = vec![PARTIAL_DIR.to_owned(), name.clone()];
        // Uploads of other versions of this file (the source changed) go,
        // while this version's record is read: two LISTs at once, not one
        // after the other, before the client may send.
        let discard_stale = async {
            let mut discarded = false;
            if !self.stream {
                let (same_upload, _) = name.rsplit_once('-').expect("partial names have a version");
                for (other, _) in recorded_uploads(&self.inner).await? {
                    if other.starts_with(same_upload) && other != name {
                        discarded |= abort_recorded(&self.inner, &other).await.is_ok();
                    }
                }
            }
            Ok::<_, object_store::Error>(discarded)
        };
        let (discarded_stale, existing) =
            tokio::join!(discard_stale, read_record(&self.inner, &record));
        let discarded_stale = discarded_stale.map_err(failed)?;
        let existing = existing.map_err(failed)?;
        let key_text = self.key.to_string();
        let usable = existing.filter(|(h, _, _)| {
            h.key == key_text && h.size == self.size && h.part_size == self.part_size
        });
        // A record may list the file's short last part too (stored by a
        // commit that then failed): a resume continues after the whole
        // parts only (receiving would otherwise start past the end, and the
        // upload could not go on until the sweep took it).
        let whole_parts = (self.size / self.part_size) as usize;
        let usable = usable.map(|(h, mut parts, keys)| {
            parts.truncate(whole_parts);
            (h, parts, keys)
        });
        let (header, parts, keys) = match usable {
            Some((header, parts, keys)) if plan.resume => (header, parts, keys),
            other => {
                if let Some((old, _, _)) = other {
                    self.abort(&old).await;
                }
                (
                    self.create(&record, &plan.meta).await?,
                    Vec::new(),
                    Vec::new(),
                )
            }
        };
        let held = held(&parts, self.part_size, self.size);
        self.multipart = Some(Multipart {
            record,
            header,
            parts,
            keys: Arc::new(std::sync::Mutex::new(keys)),
        });
        Ok(Prepared::Receive {
            upload: Box::new(self),
            held,
            discarded_stale,
        })
    }

    /// Creates a multipart upload with the file's mtime and mode, and records it.
    async fn create(&self, record: &[String], meta: &FileMeta) -> Result<Header, RemoteError> {
        let failed = |e| store_error(e, &self.path, "cannot create the upload of");
        let mut attributes = Attributes::new();
        put_times_and_mode(&mut attributes, meta.mtime, meta.mode);
        let opts = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let creating = async {
            let _slot = self.inner.slot().await;
            self.inner.s3.create_multipart_opts(&self.key, opts).await
        };
        // A fresh record: no part records of an older upload under this
        // name. Cleared while the upload is created (about 45 ms each on
        // Garage here), before the header makes the record one to resume.
        let (upload_id, cleared) = tokio::join!(creating, clear_record(&self.inner, record));
        let header = Header {
            key: self.key.to_string(),
            upload_id: upload_id.map_err(failed)?,
            size: self.size,
            part_size: self.part_size,
        };
        if let Err(e) = cleared {
            self.abort(&header).await;
            return Err(failed(e));
        }
        put_json(
            &self.inner,
            &record_key(&self.inner, record, "upload"),
            &header,
        )
        .await
        .map_err(failed)?;
        Ok(header)
    }

    /// Aborts a multipart upload (it may already be gone).
    async fn abort(&self, header: &Header) {
        if let Err(e) = abort_upload(&self.inner, header).await {
            warn!(path = %self.path, "cannot abort an old multipart upload: {e}");
        }
    }

    /// The sink receiving continues with: after the parts held.
    fn sink(&mut self) -> PartSink {
        if let Some(sink) = self.sink.take() {
            return sink;
        }
        let (offset, first_root) = match &self.multipart {
            Some(m) => (
                m.parts.len() as u64 * self.part_size,
                m.parts.first().and_then(|p| p.root),
            ),
            None => (0, None),
        };
        let mut sink = PartSink {
            buf: Filling::default(),
            buf_offset: offset,
            part_size: self.part_size,
            upload: self.multipart.as_ref().map(|m| PartTarget {
                inner: self.inner.clone(),
                key: self.key.clone(),
                upload_id: m.header.upload_id.clone(),
                record: m.record.clone(),
                keys: m.keys.clone(),
            }),
            stored: Vec::new(),
            in_flight: std::collections::VecDeque::new(),
            next_index: self.multipart.as_ref().map_or(0, |m| m.parts.len()),
            first_root,
            recorder: None,
        };
        sink.recorder = sink
            .upload
            .clone()
            .map(|target| Recorder::start(target, sink.next_index));
        sink
    }

    /// Takes the parts the sink stored into the upload's record.
    fn keep_stored(&mut self, sink: &mut PartSink) {
        if let Some(m) = &mut self.multipart {
            m.parts.append(&mut sink.stored);
        }
    }

    /// The pieces of everything received, and the first part's own BLAKE3.
    fn pieces(
        &self,
        sink: &PartSink,
        tail: Option<(Piece, Option<Digest>)>,
    ) -> (Vec<Piece>, Option<Digest>) {
        let mut first_root = sink.first_root;
        let parts = self.multipart.as_ref().map_or(&[][..], |m| &m.parts[..]);
        let mut pieces = part_pieces(parts, self.part_size);
        if let Some((piece, root)) = tail {
            pieces.push(piece);
            first_root = first_root.or(root);
        }
        (pieces, first_root)
    }

    /// The BLAKE3 of everything received: the stored parts' chaining
    /// values and the tail's.
    async fn digest_of(&self, sink: &mut PartSink) -> Result<Digest, RemoteError> {
        let tail_offset = sink.buf_offset;
        let tail_hash = if sink.buf.is_empty() {
            None
        } else {
            Some(hash_payload(tail_offset, sink.buf.payload()).await)
        };
        let (pieces, first_root) = self.pieces(sink, tail_hash);
        tree_hash::digest(&pieces, first_root).ok_or_else(|| corrupt(&self.path))
    }

    /// Stores the last part (if any bytes remain) and completes the upload,
    /// then records the sums and forgets the upload's record.
    async fn complete(
        &mut self,
        mut sink: PartSink,
        digest: Digest,
        force: bool,
    ) -> Result<(), RemoteError> {
        let path = self.path.clone();
        let failed = |e| store_error(e, &path, "cannot commit");
        let _ = force;
        let settled = sink.settle(true).await;
        self.keep_stored(&mut sink);
        settled.map_err(|e| receive_error(e, &path))?;
        self.hold.check(&path)?;
        let m = self
            .multipart
            .as_mut()
            .expect("only multipart uploads complete");
        if !sink.buf.is_empty() {
            let part = sink.buf.take();
            let target = sink
                .upload
                .clone()
                .expect("a multipart upload has a target");
            // Not recorded: the upload completes now, or is abandoned.
            let record = target
                .store(m.parts.len(), sink.buf_offset, part)
                .await
                .map_err(failed)?;
            m.parts.push(record);
        }
        let ids: Vec<PartId> = m
            .parts
            .iter()
            .map(|p| PartId {
                content_id: p.etag.clone(),
            })
            .collect();
        let slot = self.inner.slot().await;
        let done = self
            .inner
            .s3
            .complete_multipart(&self.key, &m.header.upload_id, ids)
            .await
            .map_err(failed)?;
        drop(slot);
        let sums = Sums {
            etag: done.e_tag.unwrap_or_default(),
            size: self.size,
            digest,
            part_size: self.part_size,
            parts: m.parts.iter().map(|p| p.cv).collect(),
            first_root: m.parts.first().and_then(|p| p.root).unwrap_or(digest),
        };
        // The file is saved: the client is told so now, and the sums and
        // the removal of the record follow, at once, under the name's lease
        // (moved here, given back after them). On Garage here they took
        // 0.4-0.6 s after a 1 GiB upload (a bulk delete right after a
        // completion is slow), 4-5% of the put, when the answer waited for
        // them. Nothing is lost if they fail or the server stops first:
        // sums are of an ETag, so stale or missing ones are never taken
        // for the file's (gets then hash it as they send); a record whose
        // upload is completed is never resumed (its name is taken, and
        // already there), and the next upload of the name or the sweep
        // removes it. The next upload of the name waits for the lease, so
        // it finds the sums; a server shutting down waits for them
        // (`Store::finish_background`).
        let keys = std::mem::take(&mut *m.keys.lock().expect("never poisoned"));
        let inner = self.inner.clone();
        let path = self.path.clone();
        let record = m.record.clone();
        let hold = std::mem::replace(&mut self.hold, Hold::Nothing);
        self.inner.background.spawn(async move {
            let sums_at = sums_key(&inner, &path);
            let (summed, removed) = tokio::join!(
                put_json(&inner, &sums_at, &sums),
                remove_record(&inner, &record, keys),
            );
            // Without its sums the file is still whole and right: gets then hash it as they send.
            if let Err(e) = summed {
                warn!(path = %path, "cannot store the sums of the upload: {e}");
            }
            // What is left without its header is never resumed; the next
            // upload of the name, or the sweep, removes it.
            if let Err(e) = removed {
                warn!(path = %path, "cannot remove the record of a completed upload: {e}");
            }
            hold.give_back();
        });
        Ok(())
    }
}

/// The largest object an object root takes: S3's limit (10,000 parts of
/// at most 5 GiB). Past it the part size, and the memory an upload
/// reserves, would grow without bound.
pub(super) const MAX_OBJECT_SIZE: u64 = 5 << 40;

#[async_trait]
impl Upload for ObjectUpload {
    async fn restart(&mut self) -> Result<(), RemoteError> {
        self.sink = None;
        self.received = None;
        if let Some(m) = self.multipart.take() {
            self.abort(&m.header).await;
            let header = self.create(&m.record, &self.declared).await?;
            self.multipart = Some(Multipart {
                record: m.record,
                header,
                parts: Vec::new(),
                keys: RecordKeys::default(),
            });
        }
        Ok(())
    }

    async fn sink(&mut self, size: u64) -> Result<Sinking, RemoteError> {
        let sink = self.sink();
        let from = sink.buf_offset;
        // Nor past the parts a multipart upload may have (a sized file's
        // part size is chosen so that it never does; a pipe's might).
        let most = size.min(tree_hash::MAX_PARTS * self.part_size);
        Ok(Sinking {
            sink: Box::new(sink),
            from,
            most,
        })
    }

    async fn received(
        &mut self,
        sink: Box<dyn Sink>,
        ended: Result<u64, TransferError>,
    ) -> Result<Received, RemoteError> {
        let mut sink = *sink
            .into_any()
            .downcast::<PartSink>()
            .expect("an object upload is written through its own sink");
        // Parts already on their way are kept for a resume, whatever
        // happened; recorded only if not every byte arrived (see settle).
        let settled = sink.settle(ended.is_ok()).await;
        self.keep_stored(&mut sink);
        let path = self.path.clone();
        let most = tree_hash::MAX_PARTS * self.part_size;
        let result = ended.and_then(|size| settled.map(|()| size)).map_err(|e| match e {
            TransferError::TooLong { limit } if limit == most => RemoteError::new(
                ErrorCode::TooLarge,
                format!("'{path}' was not saved: the piped data went past {limit} bytes, the most an object-store root takes from a pipe ({} parts of {} MiB); save the data to a file and put that", tree_hash::MAX_PARTS, self.part_size >> 20),
            ),
            // A part the store did not take: Busy, which clients retry
            // (through another server where they have one) and resume,
            // as for store_error's.
            TransferError::Write(io) => {
                metrics::counter!(crate::store::STORE_ERRORS_METRIC).increment(1);
                RemoteError::new(
                    ErrorCode::Busy,
                    format!("cannot store '{path}' on the server: {io}; try again shortly (the server's log has details)"),
                )
            }
            other => receive_error(other, &path),
        });
        let size = result?;
        if self.stream {
            self.size = size;
        }
        // The tail (what is not a stored part yet) is stored at the commit,
        // once the digest matched.
        let digest = self.digest_of(&mut sink).await?;
        self.sink = Some(sink);
        self.received = Some(digest);
        Ok(Received { size, digest })
    }

    async fn commit_whole(
        mut self: Box<Self>,
        data: Box<dyn Whole>,
        expected: Digest,
        meta: FileMeta,
        force: bool,
    ) -> Result<Digest, RemoteError> {
        let path = self.path.clone();
        let (bytes, digest) = blocking(move || {
            let mut out = Vec::new();
            let digest = data.write_to(&mut out);
            (out, digest)
        })
        .await;
        let result = match digest.map_err(|e| receive_error(e, &path)) {
            Ok(d) if d != expected => Err(corrupt(&path)),
            Ok(d) => self
                .put_single(PutPayload::from(bytes), d, meta, force)
                .await
                .map(|()| d),
            Err(e) => Err(e),
        };
        // Given back before the client hears the outcome: its next request
        // for the name must not find this upload still holding it.
        self.release().await;
        result
    }

    async fn commit(mut self: Box<Self>, meta: FileMeta, force: bool) -> Result<(), RemoteError> {
        let result = self.commit_held(meta, force).await;
        self.release().await;
        result
    }

    async fn abandon(mut self: Box<Self>) {
        if let Some(m) = self.multipart.take() {
            self.abort(&m.header).await;
            if let Err(e) = forget_record(&self.inner, &m.record).await {
                warn!(path = %self.path, "cannot remove the record of an abandoned upload: {e}");
            }
        }
        self.release().await;
    }
}

impl ObjectUpload {
    /// Commits under the name's lease (see [`Upload::commit`]).
    async fn commit_held(&mut self, meta: FileMeta, force: bool) -> Result<(), RemoteError> {
        let mut sink = match self.sink.take() {
            Some(sink) => sink,
            None => self.sink(),
        };
        let digest = match self.received {
            Some(d) => d,
            None => self.digest_of(&mut sink).await?,
        };
        let within_one_part = self.stream
            && self
                .multipart
                .as_ref()
                .is_some_and(|m| m.parts.is_empty() && sink.in_flight.is_empty());
        if within_one_part {
            // Data from a pipe that ended within its first part: one PUT,
            // as for any small file, and the multipart upload goes.
            let m = self.multipart.take().expect("checked above");
            self.abort(&m.header).await;
            if let Err(e) = clear_record(&self.inner, &m.record).await {
                warn!(path = %self.path, "cannot remove the record of a piped upload: {e}");
            }
        }
        if self.multipart.is_none() {
            let bytes = sink.buf.take();
            return self.put_single(bytes, digest, meta, force).await;
        }
        let result = self.complete(sink, digest, force).await;
        if result.is_err() {
            if let Some(m) = self.multipart.take() {
                self.abort(&m.header).await;
                let _ = clear_record(&self.inner, &m.record).await;
            }
        }
        result
    }
}

impl ObjectUpload {
    /// The name's lease, which an upload holds until it ends.
    /// Gives the name back (after the write, or when the upload ends).
    async fn release(&mut self) {
        std::mem::replace(&mut self.hold, Hold::Nothing).give_back();
    }

    /// Writes a file of one piece with one PUT: its mtime, mode and BLAKE3
    /// as metadata; refused if the name is taken (where the store can tell).
    async fn put_single(
        &self,
        bytes: PutPayload,
        digest: Digest,
        meta: FileMeta,
        force: bool,
    ) -> Result<(), RemoteError> {
        let failed = |e| store_error(e, &self.path, "cannot commit");
        let size = bytes.content_length() as u64;
        // The name was found free under the lease, which no other upload
        // could take since: no second look.
        self.hold.check(&self.path)?;
        let mut attributes = Attributes::new();
        put_times_and_mode(&mut attributes, meta.mtime, meta.mode);
        attributes.insert(
            Attribute::Metadata(META_BLAKE3.into()),
            AttributeValue::from(blake3::Hash::from_bytes(digest).to_hex().to_string()),
        );
        let opts = PutOptions {
            mode: put_mode(force),
            attributes,
            ..PutOptions::default()
        };
        let slot = self.inner.slot().await;
        let put = self.inner.s3.put_opts(&self.key, bytes, opts).await;
        drop(slot);
        match put {
            Ok(put) => {
                if let Hold::Dir(ticket) = &self.hold {
                    let (mtime, mode) = as_stored(meta.mtime, meta.mode);
                    ticket.wrote(put.e_tag, size, mtime, mode);
                }
                Ok(())
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Err(appeared(&self.path)),
            Err(e) => Err(failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::counted::Counted;
    use super::super::ObjectRoot;
    use super::*;
    use crate::store::{Prepared, PutPlan, Sinking, Store};
    use futures::TryStreamExt;
    use std::time::Duration;

    fn plan(size: u64) -> PutPlan {
        PutPlan {
            path: RemotePath::parse("d/big", false).unwrap(),
            meta: meta(size),
            force: false,
            // As the server names it: client, path and version.
            partial: Some("tester-big-1".to_owned()),
            resume: false,
            stream: false,
            client: crate::tls::Fingerprint::of(&rustls::pki_types::CertificateDer::from(vec![1])),
        }
    }

    fn meta(size: u64) -> FileMeta {
        FileMeta {
            size,
            // "Already there" needs the same size and mtime.
            mtime: Some(crate::protocol::Timestamp {
                secs: 1_700_000_000,
                nanos: 0,
            }),
            mode: None,
        }
    }

    /// An upload of `data` prepared and received whole, not committed yet.
    async fn received(root: &ObjectRoot, data: &[u8]) -> Box<dyn Upload> {
        let Prepared::Receive { mut upload, .. } =
            root.prepare_put(plan(data.len() as u64)).await.unwrap()
        else {
            panic!("a fresh name is received")
        };
        let Sinking { sink, from, .. } = upload.sink(data.len() as u64).await.unwrap();
        assert_eq!(from, 0);
        let (sink, wrote) = sink.write(data.to_vec()).await;
        wrote.unwrap();
        upload.received(sink, Ok(data.len() as u64)).await.unwrap();
        upload
    }

    /// The stored bytes of `d/big` and the digest a get would send with them.
    async fn read_back(root: &ObjectRoot) -> (Vec<u8>, Option<Digest>) {
        let opened = root
            .open(&RemotePath::parse("d/big", false).unwrap(), None)
            .await
            .unwrap();
        let chunks: Vec<bytes::Bytes> = opened
            .bytes
            .range(0, opened.meta.size)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        (chunks.concat(), opened.digest)
    }

    /// A large upload's client hears "saved" once the store completed the
    /// object, not after the sums and the removal of its record (0.4-0.6 s
    /// on Garage after 1 GiB); the name stays leased until they are done,
    /// so the next upload of it waits and then finds the file there by
    /// its sums, and a server shutting down waits for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_upload_is_answered_before_its_bookkeeping_and_holds_its_name_through_it() {
        let store = Arc::new(Counted::default());
        let root = Arc::new(ObjectRoot::over(
            store.clone(),
            vec!["r".to_owned()],
            1 << 30,
        ));
        let data: Vec<u8> = (0..(17u64 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let digest = *blake3::hash(&data).as_bytes();
        store.sums_held.send_replace(true);
        let upload = received(&root, &data).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            upload.commit(meta(data.len() as u64), false),
        )
        .await
        .expect("the answer does not wait for the sums")
        .unwrap();

        // Saved whole; without its sums yet, a get hashes it as it sends.
        assert_eq!(read_back(&root).await, (data.clone(), None));
        let reads = store.file_reads.load(std::sync::atomic::Ordering::Relaxed);
        let again = tokio::spawn({
            let (root, size) = (root.clone(), data.len() as u64);
            async move { root.prepare_put(plan(size)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!again.is_finished(), "the name is still leased");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), root.finish_background())
                .await
                .is_err(),
            "the bookkeeping still runs"
        );

        store.sums_held.send_replace(false);
        tokio::time::timeout(Duration::from_secs(10), root.finish_background())
            .await
            .expect("the bookkeeping ends");
        match again.await.unwrap() {
            Ok(Prepared::Present(found)) => assert_eq!(found, digest),
            Ok(_) => panic!("the second upload should find the file there"),
            Err(e) => panic!("the second upload should find the file there: {e}"),
        }
        assert_eq!(
            store.file_reads.load(std::sync::atomic::Ordering::Relaxed),
            reads,
            "found by its sums, not by reading it back"
        );
        assert_eq!(read_back(&root).await, (data, Some(digest)), "sums kept");
        assert_eq!(root.held_partials().await.unwrap(), 0, "the record is gone");
    }
}
