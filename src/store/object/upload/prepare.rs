//! Preparing an object upload: the name's lease, a resume from the records in the bucket, or a fresh single PUT or multipart upload.

use std::sync::Arc;

use object_store::Attributes;

use crate::files;
use crate::paths::RemotePath;
use crate::protocol::{Digest, ErrorCode, RemoteError};
use crate::store::object::dir_leases::Known;
use crate::store::object::leases::Leases;
use crate::store::object::memory;
use crate::store::object::{exists, file_meta, store_error, stored_digest, Inner};
use crate::store::tree_hash;
use crate::store::{Held, Prepared, PutPlan};

use super::*;

/// Checks the destination of a put and prepares the upload.
pub(in crate::store::object) async fn prepare(
    inner: &Arc<Inner>,
    plan: PutPlan,
) -> Result<Prepared, RemoteError> {
    let path = &plan.path;
    // The declared size is bounded before it sizes anything (the part
    // size, and from it the memory reserved).
    if !plan.stream && plan.meta.size > MAX_OBJECT_SIZE {
        return Err(RemoteError::new(
            ErrorCode::TooLarge,
            format!(
                "'{path}' declares {} bytes, more than an object store takes in one object ({MAX_OBJECT_SIZE} bytes, 5 TiB)",
                plan.meta.size
            ),
        ));
    }
    // Data from a pipe, of unknown length, goes in parts of the smallest
    // size (the memory an upload holds is a few parts): at most
    // [`tree_hash::MAX_PARTS`] of them, so 78 GiB.
    let part_size = tree_hash::part_size(if plan.stream { 0 } else { plan.meta.size });
    let multipart = plan.stream || plan.meta.size > part_size;
    // What it will hold at most: the file, or the parts being stored with
    // the one filling (a part fills only when it can be stored, so that is
    // PARTS_IN_FLIGHT parts in all; see PartSink::fill). Reserved before
    // the lease: the budget bounds how many uploads run at once (see
    // memory.rs), and with them how many leases this server keeps fresh;
    // those waiting hold none.
    let holds = if multipart {
        part_size * PARTS_IN_FLIGHT as u64
    } else {
        plan.meta.size
    };
    let memory = inner.memory.reserve(holds, &plan.client, path).await?;
    // A small file under its directory's lease, shared with the others
    // going there (see dir_leases.rs): no lease of its own, and the name
    // looked up only where the directory's listing does not settle it.
    if !multipart && !plan.stream && plan.partial.is_none() {
        if let Some(ticket) = inner.dirs.join(inner, path).await? {
            let key = inner.key(path);
            let found = match ticket.known() {
                Known::Absent => Ok((None, false)),
                Known::File => inner.head(&key).await.map(|h| (h, false)),
                Known::Unsure => futures::try_join!(inner.head(&key), inner.has_children(&key)),
            };
            let (head, is_dir) = found.map_err(|e| store_error(e, path, "cannot check"))?;
            let mut hold = Hold::Dir(ticket);
            return prepare_leased(
                inner,
                &plan,
                &mut hold,
                memory,
                part_size,
                multipart,
                (head, is_dir, false),
            )
            .await;
        }
    }
    // The name is this upload's alone from before it is checked until it
    // is written (see leases.rs): no other server's upload can take it
    // between the two.
    let key = inner.key(path);
    let (lease, checked) =
        Leases::take_checking(inner, vec![path.components().to_vec()], path, || async {
            futures::try_join!(
                inner.head(&key),
                inner.has_children(&key),
                inner.file_on_the_way(path),
            )
        })
        .await?;
    let mut hold = Hold::Name(lease);
    let prepared = match checked {
        Ok(found) => {
            prepare_leased(inner, &plan, &mut hold, memory, part_size, multipart, found).await
        }
        Err(e) => Err(store_error(e, path, "cannot check")),
    };
    // Refused, or the file is already there: the name is given back.
    hold.give_back();
    prepared
}

/// [`prepare`] under the lease (the name's or its directory's), which the
/// upload takes if it is to receive. `found`: what the name is (its HEAD),
/// whether it is a directory and whether a file is in the way above it,
/// as seen under the lease.
pub(super) async fn prepare_leased(
    inner: &Arc<Inner>,
    plan: &PutPlan,
    hold: &mut Hold,
    memory: memory::Reserved,
    part_size: u64,
    multipart: bool,
    found: (Option<object_store::GetResult>, bool, bool),
) -> Result<Prepared, RemoteError> {
    let path = &plan.path;
    let key = inner.key(path);
    let (head, is_dir, file_above) = found;
    if is_dir {
        return Err(RemoteError::new(
            ErrorCode::IsDirectory,
            format!("'{path}' is a directory on the server; choose another name or --to"),
        ));
    }
    if file_above {
        return Err(crate::store::object::not_a_directory(path));
    }
    if let (Some(head), false) = (head, plan.force) {
        let meta = file_meta(&head.meta, &head.attributes);
        let same = meta.size == plan.meta.size
            && plan.meta.mtime.is_some()
            && meta.mtime == plan.meta.mtime;
        if same {
            let etag = head.meta.e_tag.clone();
            return Ok(Prepared::Present(
                present_digest(inner, path, &head.attributes, etag.as_deref()).await?,
            ));
        }
        return Err(exists(path));
    }
    if multipart && plan.partial.is_none() {
        return Err(RemoteError::new(
            ErrorCode::Internal,
            format!("'{path}': an upload of more than one part needs a partial name"),
        ));
    }
    let upload = ObjectUpload {
        inner: inner.clone(),
        path: plan.path.clone(),
        key,
        size: if plan.stream {
            u64::MAX
        } else {
            plan.meta.size
        },
        stream: plan.stream,
        part_size,
        multipart: None,
        sink: None,
        declared: plan.meta,
        received: None,
        hold: std::mem::replace(hold, Hold::Nothing),
        _memory: memory,
    };
    if plan.stream {
        // Its length is unknown, so it is a multipart upload from the
        // start, recorded under the name the server leased for it (so the
        // sweep aborts it only should this server die); if it ends within
        // one part, the commit makes it one PUT instead.
        let name = plan
            .partial
            .clone()
            .expect("the server names piped uploads");
        return upload.start_multipart(name, plan).await;
    }
    match plan.partial.clone() {
        Some(name) if multipart => upload.start_multipart(name, plan).await,
        _ => Ok(Prepared::Receive {
            upload: Box::new(upload),
            held: Held::none(),
            discarded_stale: false,
        }),
    }
}

/// The BLAKE3 of an object already there: stored with it, in its sums
/// (a file uploaded in parts, as long as they describe this very object),
/// or (written by another tool, or renamed) computed by reading it.
pub(super) async fn present_digest(
    inner: &Inner,
    path: &RemotePath,
    attributes: &Attributes,
    etag: Option<&str>,
) -> Result<Digest, RemoteError> {
    if let Some(d) = stored_digest(attributes) {
        return Ok(d);
    }
    if let Some(sums) = crate::store::object::read::sums_of(inner, path, etag).await {
        return Ok(sums.digest);
    }
    let opened = crate::store::object::read::open(inner, path, None).await?;
    files::hash_source(opened.bytes.as_ref(), opened.meta.size)
        .await
        .map_err(|e| {
            RemoteError::new(
                ErrorCode::Internal,
                format!("cannot read '{path}' on the server: {e}; try again"),
            )
        })
}
