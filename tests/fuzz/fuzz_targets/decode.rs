//! Fuzz target: arbitrary bytes through every decoder a peer's data reaches.
//!
//! The first byte picks the message type (Request, Response, Receipt,
//! Trailer, ListBatch, Continue, a framed Request stream, or a data block's
//! header), the rest is a
//! frame payload (or, for the framed reader, a whole stream). Decoding must
//! never panic, never allocate beyond the frame limit, and whatever decodes
//! must re-encode and decode to the same message. Paths in requests go through the same
//! validation the server applies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qxfer::paths::RemotePath;
use qxfer::protocol::{
    decode, encode, read_frame, BlockHeader, Continue, ListBatch, Receipt, Request, Response,
    StreamMark, Trailer, MAX_BLOCK,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T>(payload: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let msg: T = decode(payload).ok()?;
    let frame = encode(&msg).expect("a decoded message re-encodes");
    let again: T = decode(&frame[4..]).expect("a re-encoded message decodes");
    assert_eq!(msg, again);
    Some(msg)
}

fn framed<T: DeserializeOwned>(stream: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut r = stream;
    let _ = rt.block_on(read_frame::<_, T>(&mut r));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Some(req) = round_trip::<Request>(rest) {
                let paths = match &req {
                    Request::Put(p) => vec![(&p.path, false)],
                    Request::Get(g) => vec![(&g.path, false)],
                    Request::List(l) => vec![(&l.path, true)],
                    Request::Mkdir(m) => vec![(&m.path, false)],
                    Request::Remove(r) => vec![(&r.path, false)],
                    Request::Rename(r) => vec![(&r.from, false), (&r.to, false)],
                };
                for (path, root_ok) in paths {
                    if let Ok(p) = RemotePath::parse(path, root_ok) {
                        let rel = p.relative();
                        assert!(rel.is_relative());
                        assert!(!rel
                            .components()
                            .any(|c| matches!(c, std::path::Component::ParentDir)));
                    }
                }
            }
        }
        1 => {
            round_trip::<Response>(rest);
        }
        2 => {
            round_trip::<Receipt>(rest);
        }
        3 => {
            round_trip::<Trailer>(rest);
        }
        4 => {
            round_trip::<ListBatch>(rest);
        }
        5 => {
            round_trip::<Continue>(rest);
        }
        6 => framed::<Request>(rest),
        _ => {
            // A block header: it decodes only within its limits, exactly.
            if let Ok(bytes) = <[u8; BlockHeader::LEN]>::try_from(rest) {
                if let Ok(h) = BlockHeader::decode(&bytes) {
                    assert!(h.raw_len >= 1 && h.raw_len <= MAX_BLOCK);
                    assert_eq!(h.encode(), bytes);
                }
                // In a stream: a block as above, or exactly one of the marks.
                match BlockHeader::decode_stream(&bytes) {
                    Ok(StreamMark::Block(h)) => assert_eq!(h.encode(), bytes),
                    Ok(StreamMark::End) => assert_eq!(bytes, BlockHeader::END),
                    Ok(StreamMark::Pause) => assert_eq!(bytes, BlockHeader::PAUSE),
                    Err(_) => {}
                }
            }
        }
    }
});
