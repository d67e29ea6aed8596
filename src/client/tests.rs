//! The client's own unit tests: known_hosts keys, the journal and path memory ages, and listing bounds.

use std::fs::File;

use crate::endpoint::PathMemory;
use crate::protocol::FileMeta;

use super::connect::known_hosts_key;
use super::state::{unix_now, JOURNAL_MAX_AGE, PATH_MEMORY_MAX_AGE};
use super::*;

#[test]
fn server_addresses_parse() {
    assert_eq!(split_server("h:1").unwrap(), ("h".into(), 1));
    assert_eq!(split_server("h").unwrap(), ("h".into(), DEFAULT_PORT));
    assert_eq!(split_server("[::1]:9").unwrap(), ("::1".into(), 9));
    assert_eq!(split_server("[::1]").unwrap(), ("::1".into(), DEFAULT_PORT));
    assert_eq!(split_server("::1").unwrap(), ("::1".into(), DEFAULT_PORT));
    assert_eq!(split_server("10.0.0.1:5").unwrap(), ("10.0.0.1".into(), 5));
    assert!(split_server("h:notaport").is_err());
    assert!(split_server(":5").is_err());
    assert_eq!(known_hosts_key("::1", 9), "[::1]:9");
    assert_eq!(known_hosts_key("Host", 9), "host:9");
}

#[test]
fn path_memories_round_trip_expire_and_skip_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let paths = PathMemories::new(dir.path());
    assert_eq!(paths.recall("h:1"), None, "nothing remembered yet");
    let m = PathMemory {
        bw: 62_500_000.0,
        min_rtt: Duration::from_micros(100_250),
    };
    paths.remember("h:1", m);
    paths.remember("h:2", PathMemory { bw: 1.0, ..m });
    assert_eq!(paths.recall("h:1"), Some(m));
    // A newer measurement replaces the old one; others stay.
    let newer = PathMemory { bw: 1e6, ..m };
    paths.remember("h:1", newer);
    assert_eq!(paths.recall("h:1"), Some(newer));
    assert!(paths.recall("h:2").is_some());
    // Lines that do not parse are ignored; old ones are not trusted.
    let old = unix_now() - PATH_MEMORY_MAX_AGE.as_secs() - 1;
    let mut text = std::fs::read_to_string(dir.path().join("paths")).unwrap();
    text.push_str("garbage\nh:3 nan\n");
    text.push_str(&format!("h:4 1000 1000 {old}\n"));
    std::fs::write(dir.path().join("paths"), text).unwrap();
    assert_eq!(paths.recall("h:1"), Some(newer));
    assert_eq!(paths.recall("h:4"), None);
}

#[test]
fn upload_journal_entries_name_one_version_of_one_upload() {
    let dir = tempfile::tempdir().unwrap();
    let journal = UploadJournal::open(dir.path(), "h:1".into()).unwrap();
    let meta = FileMeta {
        size: 10,
        mtime: Some(crate::protocol::Timestamp { secs: 5, nanos: 0 }),
        mode: None,
    };
    let a = journal.entry("a", &meta);
    assert_eq!(a, journal.entry("a", &meta), "stable");
    assert_ne!(a, journal.entry("b", &meta), "per remote path");
    assert_ne!(
        a,
        journal.entry("a", &FileMeta { size: 11, ..meta }),
        "per size"
    );
    let other = UploadJournal::open(dir.path(), "h:2".into()).unwrap();
    assert_ne!(a, other.entry("a", &meta), "per server");
    // Entries nobody came back for are swept when the journal opens.
    std::fs::write(&a, b"").unwrap();
    let f = File::options().write(true).open(&a).unwrap();
    f.set_modified(std::time::SystemTime::now() - JOURNAL_MAX_AGE - Duration::from_secs(60))
        .unwrap();
    UploadJournal::open(dir.path(), "h:1".into()).unwrap();
    assert!(!a.exists());
}

#[test]
fn digests_print_as_hex() {
    assert_eq!(hex(&[0xab; 32]), "ab".repeat(32));
}
