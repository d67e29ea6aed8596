//! Disk space for uploads in flight: a put is admitted only if the free space,
//! less what uploads already running will still write, holds it.
//!
//! Checking `statvfs` alone admits two uploads that each fit but not both:
//! both then fail with ENOSPC halfway, and until their partials go, every
//! later put is refused. So each admitted upload reserves the bytes it still
//! has to write on its filesystem; the reservation shrinks as the data lands
//! (the free space shrinks by as much) and is released when the upload ends,
//! however it ends. Check and reservation happen under one lock, so two
//! uploads cannot both pass against the same free bytes.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The bytes reserved by uploads in flight, per filesystem.
#[derive(Debug, Default)]
pub(crate) struct Space {
    /// Filesystem id (statvfs f_fsid) to bytes still to be written there.
    reserved: Mutex<HashMap<u64, u64>>,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoRoom {
    /// Bytes asked for.
    pub(crate) needed: u64,
    /// Bytes free on the filesystem, less what uploads in flight reserved.
    pub(crate) free: u64,
}

/// Space held for one upload: what it has still to write. Released on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    space: Arc<Space>,
    fs: u64,
    left: AtomicU64,
}

impl Space {
    /// Reserves `bytes` on the filesystem holding `dir`, if its free space
    /// (statvfs f_bavail: what the server's user may use) less every other
    /// reservation there holds them. Where the free space cannot be read,
    /// the reservation is granted and the write itself reports a full disk.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        dir: impl AsFd,
        bytes: u64,
    ) -> Result<Reservation, NoRoom> {
        let granted = |fs| Reservation {
            space: self.clone(),
            fs,
            left: AtomicU64::new(bytes),
        };
        let Ok(st) = rustix::fs::fstatvfs(dir) else {
            return Ok(granted(u64::MAX));
        };
        let fs = st.f_fsid;
        let mut reserved = self.lock();
        fits(&st, &reserved, bytes)?;
        *reserved.entry(fs).or_default() += bytes;
        Ok(granted(fs))
    }

    /// Whether `bytes` more can be written on the filesystem holding `fd`
    /// without touching what uploads in flight reserved: for data of
    /// unknown length, which reserves nothing up front and is checked
    /// before each write instead. Where the free space cannot be read, yes.
    pub(crate) fn check(&self, fd: impl AsFd, bytes: u64) -> Result<(), NoRoom> {
        let Ok(st) = rustix::fs::fstatvfs(fd) else {
            return Ok(());
        };
        fits(&st, &self.lock(), bytes)
    }

    /// Bytes reserved on all filesystems together.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, fs: u64, bytes: u64) {
        if bytes == 0 || fs == u64::MAX {
            return;
        }
        let mut reserved = self.lock();
        if let Some(held) = reserved.get_mut(&fs) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                reserved.remove(&fs);
            }
        }
    }
}

/// Whether `bytes` fit in the free space `st` reports less what is
/// `reserved` on that filesystem.
fn fits(st: &rustix::fs::StatVfs, reserved: &HashMap<u64, u64>, bytes: u64) -> Result<(), NoRoom> {
    let held = reserved.get(&st.f_fsid).copied().unwrap_or(0);
    let free = st.f_bavail.saturating_mul(st.f_frsize).saturating_sub(held);
    if bytes > free {
        return Err(NoRoom {
            needed: bytes,
            free,
        });
    }
    Ok(())
}

impl Reservation {
    /// `n` bytes were written: the filesystem's free space already shows them.
    pub(crate) fn wrote(&self, n: u64) {
        let mut taken = 0;
        let _ = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                taken = left.min(n);
                Some(left - taken)
            });
        self.space.release(self.fs, taken);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let left = *self.left.get_mut();
        self.space.release(self.fs, left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_here(dir: &std::fs::File) -> u64 {
        let st = rustix::fs::fstatvfs(dir).unwrap();
        st.f_bavail * st.f_frsize
    }

    #[test]
    fn reservations_count_against_the_free_space_until_written_or_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        let space = Arc::new(Space::default());
        let free = free_here(&dir);
        // Leave a margin for other writers on this filesystem during the test.
        let big = free - free / 8;
        let first = space.reserve(&dir, big).unwrap();
        assert_eq!(space.total(), big);
        let refused = space.reserve(&dir, big).unwrap_err();
        assert_eq!(refused.needed, big);
        assert!(refused.free < big, "{refused:?}");
        first.wrote(big / 2);
        assert_eq!(space.total(), big - big / 2);
        // Writing more than was reserved releases no more than it held.
        first.wrote(big);
        assert_eq!(space.total(), 0);
        drop(first);
        assert_eq!(space.total(), 0);
        let second = space.reserve(&dir, big).unwrap();
        // Data of unknown length may write what nobody reserved, no more.
        assert!(space.check(&dir, free / 16).is_ok());
        assert!(space.check(&dir, free - big / 2).is_err());
        drop(second);
        assert_eq!(space.total(), 0, "a dropped reservation frees its bytes");
        assert!(space.check(&dir, free - big / 2).is_ok());
    }
}
