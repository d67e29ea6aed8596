//! The object store alone, for docs/bench/run: a file put in 8 MiB parts three at a time and read back, through object_store as qxfer's back end uses it, with nothing else in the way.
//!
//!     cargo run --release --example s3floor -- put|get|puts|gets ENDPOINT BUCKET KEY [FILE|DIR]
//!
//! Credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
//! `put` uploads FILE as KEY; `get` reads KEY and counts its bytes; `puts`
//! uploads every file beneath DIR under KEY/ (one PUT each, as many at once
//! as a qxfer server sends its store: 64); `gets` lists KEY/ and reads
//! every object, as many at once. Prints the seconds it took.

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncReadExt;

const PART: usize = 8 << 20;
const AT_ONCE: usize = 3;
/// Small objects in flight at once: a qxfer server's store requests (its
/// MAX_REQUESTS).
const SMALL_AT_ONCE: usize = 64;

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
        "puts" => {
            let top = std::path::PathBuf::from(&rest[0]);
            let mut files = Vec::new();
            let mut dirs = vec![top.clone()];
            while let Some(d) = dirs.pop() {
                for e in std::fs::read_dir(&d).expect("the directory") {
                    let p = e.expect("an entry").path();
                    if p.is_dir() {
                        dirs.push(p);
                    } else {
                        files.push(p);
                    }
                }
            }
            let started = Instant::now();
            futures::stream::iter(files)
                .map(|p| {
                    let (s3, top, key) = (&s3, &top, &key);
                    async move {
                        let rel = p.strip_prefix(top).expect("beneath the top");
                        let mut k = key.as_ref().to_owned();
                        for part in rel.components() {
                            k.push('/');
                            k.push_str(&part.as_os_str().to_string_lossy());
                        }
                        let data = tokio::fs::read(&p).await.expect("read");
                        s3.put(&Path::from(k), PutPayload::from(data))
                            .await
                            .map(|_| ())
                    }
                })
                .buffer_unordered(SMALL_AT_ONCE)
                .try_collect::<Vec<()>>()
                .await
                .expect("puts");
            println!("{:.3}", started.elapsed().as_secs_f64());
            return;
        }
        "gets" => {
            let listed: Vec<_> = s3.list(Some(&key)).try_collect().await.expect("list");
            let n: usize = futures::stream::iter(listed)
                .map(|o| {
                    let s3 = &s3;
                    async move { s3.get(&o.location).await?.bytes().await.map(|b| b.len()) }
                })
                .buffer_unordered(SMALL_AT_ONCE)
                .try_fold(0, |n, len| async move { Ok(n + len) })
                .await
                .expect("gets");
            assert!(n > 0);
        }
        other => panic!("unknown mode {other}"),
    }
    println!("{:.3}", started.elapsed().as_secs_f64());
}
