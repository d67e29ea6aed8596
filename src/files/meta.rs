//! File and directory metadata as qxfer carries it: sizes, mtimes, the mode bits kept.

use std::fs::{File, Metadata};
use std::time::{SystemTime, UNIX_EPOCH};

use cap_std::fs::Dir;

use crate::protocol::{FileMeta, Timestamp};

use crate::files::*;

/// Applies a tree transfer's directory metadata to `dir`.
pub(crate) fn apply_dir_meta(dir: &Dir, meta: &crate::protocol::DirMeta) -> std::io::Result<()> {
    set_dir_meta(&open_dir_handle(dir)?, meta)
}

/// The permission bits a received file or directory keeps: group and other
/// write, set-id and sticky bits are dropped, whoever sent them.
pub(crate) const KEPT_MODE_BITS: u32 = 0o755;

/// Sets permission bits (without group/other write and set-id bits, as for
/// files) and mtime on an open directory.
pub(crate) fn set_dir_meta(dir: &File, meta: &crate::protocol::DirMeta) -> std::io::Result<()> {
    set_mode_and_mtime(dir, meta.mode, meta.mtime)
}

/// Sets `mode` (the kept bits only) and `mtime`, those given, on an open
/// file or directory, through its descriptor.
pub(crate) fn set_mode_and_mtime(
    file: &File,
    mode: Option<u32>,
    mtime: Option<Timestamp>,
) -> std::io::Result<()> {
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode & KEPT_MODE_BITS))?;
    }
    if let Some(t) = mtime.and_then(Timestamp::to_system_time) {
        file.set_modified(t)?;
    }
    Ok(())
}

/// The metadata qxfer carries for a local file.
pub(crate) fn file_meta(md: &Metadata) -> FileMeta {
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        Some(md.permissions().mode() & 0o7777)
    };
    #[cfg(not(unix))]
    let mode = None;
    FileMeta {
        size: md.len(),
        mtime: md.modified().ok().and_then(to_timestamp),
        mode,
    }
}

/// Converts a `SystemTime` to the wire timestamp.
pub(crate) fn to_timestamp(t: SystemTime) -> Option<Timestamp> {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Some(Timestamp {
            secs: i64::try_from(d.as_secs()).ok()?,
            nanos: d.subsec_nanos(),
        }),
        Err(e) => {
            let d = e.duration();
            let mut secs = -i64::try_from(d.as_secs()).ok()?;
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Some(Timestamp { secs, nanos })
        }
    }
}
