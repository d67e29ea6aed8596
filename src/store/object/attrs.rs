//! The metadata qxfer keeps in an object's attributes: mtime, mode and BLAKE3.

use std::time::SystemTime;

use object_store::{Attribute, AttributeValue, Attributes, ObjectMeta};

use crate::files::{to_timestamp, KEPT_MODE_BITS};
use crate::protocol::{Digest, FileMeta, Timestamp};

use super::*;

/// A file's metadata from its object's: size, and mtime and mode as stored
/// (else the time the object was written, and no mode).
pub(super) fn file_meta(object: &ObjectMeta, attributes: &Attributes) -> FileMeta {
    let (mtime, mode) = times_and_mode(attributes);
    FileMeta {
        size: object.size,
        mtime: mtime.or_else(|| to_timestamp(SystemTime::from(object.last_modified))),
        mode,
    }
}

/// Reads the mtime and mode qxfer stored with an object.
pub(super) fn times_and_mode(attributes: &Attributes) -> (Option<Timestamp>, Option<u32>) {
    let get = |name: &'static str| {
        attributes
            .get(&Attribute::Metadata(name.into()))
            .map(|v| v.as_ref().to_owned())
    };
    let mtime = get(META_MTIME).and_then(|v| {
        let (secs, nanos) = v.split_once('.')?;
        Some(Timestamp {
            secs: secs.parse().ok()?,
            nanos: nanos.parse().ok().filter(|n| *n < 1_000_000_000)?,
        })
    });
    let mode = get(META_MODE)
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .map(|m| m & 0o7777);
    (mtime, mode)
}

/// Stores an mtime and mode with an object.
pub(super) fn put_times_and_mode(
    attributes: &mut Attributes,
    mtime: Option<Timestamp>,
    mode: Option<u32>,
) {
    if let Some(t) = mtime {
        attributes.insert(
            Attribute::Metadata(META_MTIME.into()),
            AttributeValue::from(format!("{}.{:09}", t.secs, t.nanos)),
        );
    }
    if let Some(m) = mode {
        attributes.insert(
            Attribute::Metadata(META_MODE.into()),
            AttributeValue::from(format!("{:o}", m & KEPT_MODE_BITS)),
        );
    }
}

/// An mtime and mode as they read back once stored with an object.
pub(super) fn as_stored(
    mtime: Option<Timestamp>,
    mode: Option<u32>,
) -> (Option<Timestamp>, Option<u32>) {
    let mut attributes = Attributes::new();
    put_times_and_mode(&mut attributes, mtime, mode);
    times_and_mode(&attributes)
}

/// The BLAKE3 qxfer stored with an object written in one piece.
pub(super) fn stored_digest(attributes: &Attributes) -> Option<Digest> {
    let hex = attributes.get(&Attribute::Metadata(META_BLAKE3.into()))?;
    blake3::Hash::from_hex(hex.as_ref())
        .ok()
        .map(|h| *h.as_bytes())
}
