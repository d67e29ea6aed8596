//! What an upload in progress records in the bucket (`.qxfer-partial/NAME/`), so that any server can continue or abort it, and the sweep of abandoned ones.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::protocol::Digest;
use crate::store::{tree_hash, InUse};

use super::super::read::hex32;
use super::super::{is_not_found, Inner, PARTIAL_DIR};

/// What `.qxfer-partial/NAME/upload` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Header {
    /// The destination key, beneath the prefix.
    pub(super) key: String,
    pub(super) upload_id: String,
    pub(super) size: u64,
    pub(super) part_size: u64,
}

/// One part stored, as recorded: `.qxfer-partial/NAME/part-NNNNN` holds
/// one, `part-FIRST-LAST` an array of those parts in order (see
/// `parts::RECORD_EVERY`; servers before that wrote only the first kind,
/// and ignore the second, which costs them only a resume from further
/// back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PartRecord {
    pub(super) etag: String,
    #[serde(with = "hex32")]
    pub(super) cv: Digest,
    /// The part's own BLAKE3, for the first part only.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex32")]
    pub(super) root: Option<Digest>,
}

/// The name of the record of parts `first..=last`.
pub(super) fn record_name(first: usize, last: usize) -> String {
    if first == last {
        format!("part-{first:05}")
    } else {
        format!("part-{first:05}-{last:05}")
    }
}

/// The parts a record's name says it holds: `part-N` or `part-A-B` (B >= A).
pub(super) fn recorded_range(name: &str) -> Option<(usize, usize)> {
    let numbers = name.strip_prefix("part-")?;
    let parse = |n: &str| {
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| n.parse::<usize>().ok())
            .flatten()
    };
    match numbers.split_once('-') {
        None => parse(numbers).map(|n| (n, n)),
        Some((a, b)) => {
            let (a, b) = (parse(a)?, parse(b)?);
            (b >= a).then_some((a, b))
        }
    }
}

/// The key of `name` in an upload's record.
pub(super) fn record_key(inner: &Inner, record: &[String], name: &str) -> Key {
    let mut parts: Vec<&str> = record.iter().map(String::as_str).collect();
    parts.push(name);
    inner.key_of(&parts)
}

/// Reads an upload's record: its header, its parts in order (as many as
/// are recorded without a gap), and the keys of every part record listed
/// (chained or not), for [`remove_record`].
pub(super) async fn read_record(
    inner: &Inner,
    record: &[String],
) -> object_store::Result<Option<(Header, Vec<PartRecord>, Vec<Key>)>> {
    let header: Header = match get_json(inner, &record_key(inner, record, "upload")).await? {
        Some(h) => h,
        None => return Ok(None),
    };
    let dir = inner.key_of(&record.iter().map(String::as_str).collect::<Vec<_>>());
    // Each record by its first part; of two that start alike, the longer.
    let mut by_first: BTreeMap<usize, (usize, Key)> = BTreeMap::new();
    let mut listed = Vec::new();
    let slot = inner.slot().await;
    let mut listing = inner.s3.list(Some(&dir));
    while let Some(o) = listing.try_next().await? {
        let Some((first, last)) = o.location.filename().and_then(recorded_range) else {
            continue;
        };
        listed.push(o.location.clone());
        if (last - first) as u64 >= tree_hash::MAX_PARTS {
            continue;
        }
        let longest = by_first.entry(first).or_insert((last, o.location.clone()));
        if last > longest.0 {
            *longest = (last, o.location);
        }
    }
    drop((listing, slot));
    // The records that chain from part 0 without a gap, read a few at once.
    let mut chain = Vec::new();
    let mut next = 0;
    while let Some((last, key)) = by_first.remove(&next) {
        chain.push((next, last, key));
        next = last + 1;
    }
    let reads = chain.into_iter().map(|(first, last, key)| async move {
        let parts: Option<Vec<PartRecord>> = if first == last {
            get_json::<PartRecord>(inner, &key).await?.map(|p| vec![p])
        } else {
            get_json::<Vec<PartRecord>>(inner, &key).await?
        };
        Ok::<_, object_store::Error>(parts.filter(|p| p.len() == last - first + 1))
    });
    let mut read = futures::stream::iter(reads).buffered(RECORD_READS);
    let mut parts = Vec::new();
    while let Some(got) = read.try_next().await? {
        // A record missing or damaged ends the chain there.
        let Some(got) = got else { break };
        parts.extend(got);
    }
    Ok(Some((header, parts, listed)))
}

/// The keys of an upload's part records that its server knows of: those
/// listed when it was resumed and those written since (added before each
/// write is sent, so a write that failed after all is still here). Only
/// the server holding the name's lease writes them, so with the header
/// these are all of its record, but for what a stalled predecessor might
/// still land: that is left, without a header, for the next upload of the
/// name (which clears its record first) or the sweep.
pub(super) type RecordKeys = std::sync::Arc<std::sync::Mutex<Vec<Key>>>;

/// Removes a completed upload's record without listing it: the header
/// first (a record without its header is never resumed, see
/// [`read_record`]), then the part records in `keys` in one request. A
/// LIST of the record and its deletes took about 200 ms of the 450 ms
/// between a 64 MiB upload's last part and its client's answer.
pub(super) async fn remove_record(
    inner: &Inner,
    record: &[String],
    keys: Vec<Key>,
) -> object_store::Result<()> {
    inner
        .delete_if_there(&record_key(inner, record, "upload"))
        .await?;
    inner.delete_all(keys).await
}

/// Records read at once when an upload is resumed.
const RECORD_READS: usize = 8;

/// Deletes everything in an upload's record.
pub(super) async fn clear_record(inner: &Inner, record: &[String]) -> object_store::Result<()> {
    let dir = inner.key_of(&record.iter().map(String::as_str).collect::<Vec<_>>());
    inner.delete_under(&dir).await?;
    Ok(())
}

/// Deletes an abandoned upload's record, its header first: a record
/// without its header is never resumed ([`read_record`]), so once the
/// header is gone no rerun can continue from parts known to be bad, and
/// what else is left the sweep takes. A store that fails a request (as
/// Garage under load now and then does) gets two more tries, a moment
/// apart, before the error is given back.
pub(super) async fn forget_record(inner: &Inner, record: &[String]) -> object_store::Result<()> {
    let header = record_key(inner, record, "upload");
    let mut tries = 0;
    loop {
        let result = async {
            inner.delete_if_there(&header).await?;
            clear_record(inner, record).await
        }
        .await;
        tries += 1;
        match result {
            Err(e) if tries < 3 => {
                warn!("cannot remove the record of an abandoned upload yet ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(250 * tries)).await;
            }
            other => return other,
        }
    }
}

/// The uploads recorded in the bucket: name, and when the record last changed.
pub(in super::super) async fn recorded_uploads(
    inner: &Inner,
) -> object_store::Result<HashMap<String, SystemTime>> {
    let dir = inner.key_of(&[PARTIAL_DIR]);
    let depth = inner.prefix.len() + 1;
    let mut out: HashMap<String, SystemTime> = HashMap::new();
    let _slot = inner.slot().await;
    let mut listing = inner.s3.list(Some(&dir));
    while let Some(o) = listing.try_next().await? {
        let Some(name) = o.location.parts().nth(depth) else {
            continue;
        };
        let when = SystemTime::from(o.last_modified);
        let newest = out.entry(name.as_ref().to_owned()).or_insert(when);
        *newest = (*newest).max(when);
    }
    Ok(out)
}

/// Aborts the upload recorded under `name` and deletes its record.
pub(super) async fn abort_recorded(inner: &Inner, name: &str) -> object_store::Result<()> {
    let record = vec![PARTIAL_DIR.to_owned(), name.to_owned()];
    if let Ok(Some(header)) = get_json::<Header>(inner, &record_key(inner, &record, "upload")).await
    {
        abort_upload(inner, &header).await?;
    }
    clear_record(inner, &record).await
}

/// Aborts the multipart upload a record's header names; one already gone
/// is no error. The header keeps the key as the store spells it (already
/// percent-encoded where a name is not plain ASCII), so it is parsed as it
/// is: `Key::from` would encode it again (`%C3%BC` becoming `%25C3%25BC`),
/// the store would answer 404 for that other key, and the parts of the
/// real upload would stay in the bucket for good.
pub(super) async fn abort_upload(inner: &Inner, header: &Header) -> object_store::Result<()> {
    let key = Key::parse(&header.key).map_err(|e| object_store::Error::Generic {
        store: "qxfer",
        source: format!(
            "an upload record names the key {:?}, which is not one: {e}",
            header.key
        )
        .into(),
    })?;
    let _slot = inner.slot().await;
    match inner.s3.abort_multipart(&key, &header.upload_id).await {
        Err(e) if !is_not_found(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Aborts the multipart uploads whose record has not changed for `ttl`
/// (their server died, or their client never came back), except those an
/// upload of this server is writing. A live upload adds to its record at
/// least every [`super::parts::RECORD_EVERY`] while it stores parts,
/// so only an upload that stored nothing for `ttl` can be swept.
pub(in super::super) async fn sweep(
    inner: &Inner,
    ttl: Duration,
    in_use: InUse,
) -> object_store::Result<usize> {
    let now = SystemTime::now();
    let mut removed = 0;
    for (name, newest) in recorded_uploads(inner).await? {
        let age = now.duration_since(newest).unwrap_or_default();
        if age <= ttl || in_use(&name) {
            continue;
        }
        // A live upload on any server holds a lease on its destination,
        // kept fresh while it runs, however long its next part takes.
        if destination_leased(inner, &name).await? {
            continue;
        }
        match abort_recorded(inner, &name).await {
            Ok(()) => {
                info!(upload = %name, "aborted a stale multipart upload");
                removed += 1;
            }
            Err(e) => warn!(upload = %name, "cannot abort a stale multipart upload: {e}"),
        }
    }
    match super::super::leases::sweep(inner).await {
        Ok(0) => {}
        Ok(n) => info!("deleted {n} leases left by servers that stopped"),
        Err(e) => warn!("cannot delete stale leases: {e}"),
    }
    Ok(removed)
}

/// Whether the destination of the upload recorded under `name` is leased
/// (someone is writing it now).
pub(super) async fn destination_leased(inner: &Inner, name: &str) -> object_store::Result<bool> {
    let record = vec![PARTIAL_DIR.to_owned(), name.to_owned()];
    let Ok(Some(header)) = get_json::<Header>(inner, &record_key(inner, &record, "upload")).await
    else {
        return Ok(false);
    };
    let Ok(key) = Key::parse(&header.key) else {
        return Ok(false);
    };
    super::super::leases::is_leased(inner, &inner.names_of(&key)).await
}

pub(super) async fn put_json<T: Serialize>(
    inner: &Inner,
    key: &Key,
    value: &T,
) -> object_store::Result<()> {
    let body = serde_json::to_vec(value).expect("records serialize");
    let _slot = inner.slot().await;
    inner.s3.put(key, PutPayload::from(body)).await.map(|_| ())
}

pub(super) async fn get_json<T: serde::de::DeserializeOwned>(
    inner: &Inner,
    key: &Key,
) -> object_store::Result<Option<T>> {
    let slot = inner.slot().await;
    let body = match inner.s3.get(key).await {
        Ok(r) => r.bytes().await?,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    drop(slot);
    // A record that does not parse is treated as absent (and overwritten).
    Ok(serde_json::from_slice(&body).ok())
}

/// Serde for an optional digest as hex.
pub(super) mod opt_hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&blake3::Hash::from_bytes(*d).to_hex().to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => blake3::Hash::from_hex(s)
                .map(|h| Some(*h.as_bytes()))
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}
