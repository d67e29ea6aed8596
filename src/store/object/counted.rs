//! object_store's in-memory store, counting some of the requests asked of it: for tests of how many requests an operation costs.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// object_store's in-memory store, counting the HEADs and LISTs asked of it.
#[derive(Debug, Default)]
pub(super) struct Counted {
    pub(super) store: InMemory,
    pub(super) heads: AtomicU64,
    pub(super) lists: AtomicU64,
    /// Lease objects written.
    pub(super) lease_puts: AtomicU64,
    /// GETs of files' data (not of the server's own records).
    pub(super) file_reads: AtomicU64,
    /// GETs of listing indexes.
    pub(super) index_reads: AtomicU64,
    /// While true, writes of an upload's sums wait (to look at what is
    /// there between a client's answer and the bookkeeping after it).
    pub(super) sums_held: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counted({})", self.store)
    }
}

#[async_trait]
impl ObjectStore for Counted {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if location.as_ref().contains(super::leases::LEASE_DIR) {
            self.lease_puts.fetch_add(1, Ordering::Relaxed);
        }
        if location.as_ref().contains(super::SUMS_DIR) {
            let _ = self.sums_held.subscribe().wait_for(|held| !held).await;
        }
        self.store.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.store.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Key,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            self.heads.fetch_add(1, Ordering::Relaxed);
        } else if !location.as_ref().contains(crate::paths::RESERVED_PREFIX) {
            self.file_reads.fetch_add(1, Ordering::Relaxed);
        } else if location.as_ref().contains(super::index::INDEX_DIR) {
            self.index_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.store.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Key>>,
    ) -> BoxStream<'static, object_store::Result<Key>> {
        self.store.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Key>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.store.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Key>) -> object_store::Result<ListResult> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.store.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Key,
        to: &Key,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.store.copy_opts(from, to, options).await
    }
}

#[async_trait]
impl MultipartStore for Counted {
    async fn create_multipart(&self, path: &Key) -> object_store::Result<MultipartId> {
        self.store.create_multipart(path).await
    }

    async fn create_multipart_opts(
        &self,
        path: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<MultipartId> {
        self.store.create_multipart_opts(path, opts).await
    }

    async fn put_part(
        &self,
        path: &Key,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        // A copy, as a store over the network keeps one: the caller's
        // buffers are its own again once the part is stored.
        let copied = PutPayload::from(Bytes::copy_from_slice(&Bytes::from(data)));
        self.store.put_part(path, id, part_idx, copied).await
    }

    async fn complete_multipart(
        &self,
        path: &Key,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        self.store.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Key, id: &MultipartId) -> object_store::Result<()> {
        self.store.abort_multipart(path, id).await
    }
}
