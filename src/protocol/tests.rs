//! Round trips and refusals of the frame codec.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::*;

fn put() -> Request {
    Request::Put(PutRequest {
        path: "dir/ä file.txt".into(),
        meta: FileMeta {
            size: 42,
            mtime: Some(Timestamp {
                secs: 1_700_000_000,
                nanos: 5,
            }),
            mode: Some(0o644),
        },
        force: false,
        resume: true,
        encoding: Encoding::Raw,
    })
}

#[tokio::test]
async fn round_trip_over_pipe() {
    let (mut a, mut b) = tokio::io::duplex(1024);
    write_frame(&mut a, &put()).await.unwrap();
    write_frame(
        &mut a,
        &Response::GetAccepted(GetOffer {
            meta: FileMeta {
                size: 1,
                mtime: None,
                mode: None,
            },
            offset: 0,
            encoding: Encoding::Raw,
        }),
    )
    .await
    .unwrap();
    let got: Request = read_frame(&mut b).await.unwrap();
    assert_eq!(got, put());
    let got: Response = read_frame(&mut b).await.unwrap();
    assert_eq!(
        got,
        Response::GetAccepted(GetOffer {
            meta: FileMeta {
                size: 1,
                mtime: None,
                mode: None
            },
            offset: 0,
            encoding: Encoding::Raw,
        })
    );
}

#[tokio::test]
async fn truncated_frames_are_reported() {
    let frame = encode(&put()).unwrap();
    for cut in [0, 2, 4, frame.len() - 1] {
        let mut r = &frame[..cut];
        let err = read_frame::<_, Request>(&mut r).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err:?}");
    }
}

#[tokio::test]
async fn oversized_length_is_refused_before_allocating() {
    let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&[0; 16]);
    let err = read_frame::<_, Request>(&mut &frame[..]).await.unwrap_err();
    assert!(matches!(err, FrameError::TooLarge(n, MAX_FRAME) if n == MAX_FRAME + 1));
}

#[tokio::test]
async fn garbage_and_trailing_bytes_are_refused() {
    let mut garbage = 3u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
    let err = read_frame::<_, Request>(&mut &garbage[..])
        .await
        .unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");

    let mut payload = encode(&put()).unwrap()[4..].to_vec();
    payload.push(0);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let err = read_frame::<_, Request>(&mut &frame[..]).await.unwrap_err();
    assert!(matches!(err, FrameError::Trailing(1)), "{err:?}");
}

#[test]
fn oversized_message_is_not_encoded() {
    let req = Request::Get(GetRequest {
        resume: None,
        path: "x".repeat(MAX_FRAME + 1),
        compression: Compression::Never,
    });
    assert!(matches!(encode(&req), Err(FrameError::TooLarge(..))));
}

#[test]
fn unknown_variant_is_malformed() {
    // Tag 9 names no Request variant.
    let err = decode::<Request>(&[9]).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)));
}

/// Decodes `payload` as `T`; whatever decodes must re-encode to a frame
/// that decodes to the same message.
fn decodes_consistently<T>(payload: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + fmt::Debug,
{
    if let Ok(msg) = decode::<T>(payload) {
        let frame = encode(&msg).unwrap();
        assert_eq!(decode::<T>(&frame[4..]).unwrap(), msg);
    }
}

// The long run is the cargo-fuzz target in tests/fuzz; this keeps the
// same properties checked on every `cargo test`.
proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(
        bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
    ) {
        decodes_consistently::<Request>(&bytes);
        decodes_consistently::<Response>(&bytes);
        decodes_consistently::<Receipt>(&bytes);
        decodes_consistently::<Trailer>(&bytes);
        decodes_consistently::<ListBatch>(&bytes);
        decodes_consistently::<Continue>(&bytes);
    }

    #[test]
    fn block_headers_decode_only_within_their_limits(
        bytes in proptest::array::uniform9(proptest::num::u8::ANY)
    ) {
        if let Ok(h) = BlockHeader::decode(&bytes) {
            assert!(h.raw_len >= 1 && h.raw_len <= MAX_BLOCK);
            assert!(if h.compressed { h.wire_len < h.raw_len } else { h.wire_len == h.raw_len });
            assert_eq!(h.encode(), bytes);
        }
        match BlockHeader::decode_stream(&bytes) {
            Ok(StreamMark::Block(h)) => assert_eq!(h.encode(), bytes),
            Ok(StreamMark::End) => assert_eq!(bytes, BlockHeader::END),
            Ok(StreamMark::Pause) => assert_eq!(bytes, BlockHeader::PAUSE),
            Err(_) => {}
        }
    }

    #[test]
    fn corrupted_valid_frames_never_panic_the_decoders(
        at in 0usize..64, value in proptest::num::u8::ANY, cut in 0usize..64
    ) {
        let mut frame = encode(&put()).unwrap()[4..].to_vec();
        let i = at % frame.len();
        frame[i] = value;
        frame.truncate(frame.len() - cut % frame.len());
        decodes_consistently::<Request>(&frame);
    }
}

#[test]
fn stream_marks_are_told_from_blocks() {
    assert_eq!(
        BlockHeader::decode_stream(&BlockHeader::END).unwrap(),
        StreamMark::End
    );
    assert_eq!(
        BlockHeader::decode_stream(&BlockHeader::PAUSE).unwrap(),
        StreamMark::Pause
    );
    let block = BlockHeader {
        compressed: false,
        raw_len: 5,
        wire_len: 5,
    };
    assert_eq!(
        BlockHeader::decode_stream(&block.encode()).unwrap(),
        StreamMark::Block(block)
    );
    // Outside a stream the marks are no blocks; a pause with bytes is no mark.
    assert!(BlockHeader::decode(&BlockHeader::END).is_err());
    assert!(BlockHeader::decode(&BlockHeader::PAUSE).is_err());
    assert!(BlockHeader::decode_stream(&[2, 0, 0, 0, 1, 0, 0, 0, 1]).is_err());
    assert!(Encoding::Blocks.is_sized() && !Encoding::Stream.is_sized());
}
