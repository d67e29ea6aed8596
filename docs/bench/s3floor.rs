//! The object store alone, for docs/bench/run: a file put in 8 MiB parts three at a time and read back, through object_store as qxfer's back end uses it, with nothing else in the way.
//!
//!     cargo run --release --example s3floor -- put|get ENDPOINT BUCKET KEY [FILE]
//!
//! Credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
//! `put` uploads FILE as KEY; `get` reads KEY and counts its bytes. Prints
//! the seconds it took.

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::AsyncReadExt;

const PART: usize = 8 << 20;
const AT_ONCE: usize = 3;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, endpoint, bucket, key, rest @ ..] = &args[..] else {
        eprintln!("usage: s3floor put|get ENDPOINT BUCKET KEY [FILE]");
        std::process::exit(2);
    };
    // As qxfer does: reqwest's rustls takes the process's provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s3 = AmazonS3Builder::from_env()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_bucket_name(bucket)
        .with_unsigned_payload(true)
        .build()
        .expect("an S3 client");
    let key = Path::from(key.as_str());
    let started = Instant::now();
    match mode.as_str() {
        "put" => {
            let file = tokio::fs::File::open(&rest[0]).await.expect("the file");
            let id = s3.create_multipart(&key).await.expect("create");
            // Parts are read as they are needed: at most AT_ONCE + 1 in memory.
            let parts = futures::stream::unfold((file, 0usize), |(mut file, i)| async move {
                let mut buf = Vec::with_capacity(PART);
                (&mut file)
                    .take(PART as u64)
                    .read_to_end(&mut buf)
                    .await
                    .expect("read");
                (!buf.is_empty()).then_some(((i, buf), (file, i + 1)))
            });
            let ids: Vec<_> = parts
                .map(|(i, p)| {
                    let (s3, key, id) = (&s3, &key, &id);
                    async move { s3.put_part(key, id, i, PutPayload::from(p)).await }
                })
                .buffered(AT_ONCE)
                .try_collect()
                .await
                .expect("parts");
            s3.complete_multipart(&key, &id, ids)
                .await
                .expect("complete");
        }
        "get" => {
            let mut stream = s3.get(&key).await.expect("get").into_stream();
            let mut n = 0;
            while let Some(b) = stream.next().await {
                n += b.expect("read").len();
            }
            assert!(n > 0);
        }
        other => panic!("unknown mode {other}"),
    }
    println!("{:.3}", started.elapsed().as_secs_f64());
}
