//! Hashing cost next to transfer cost: reads a file once plainly and once through BLAKE3, as qxfer's disk threads do.
//!
//! `cargo run --release --example hashbench -- FILE [RUNS]` prints the
//! median seconds and GB/s of each pass, to set beside the transfer times
//! of docs/bench/run.

use std::io::Read;
use std::time::Instant;

/// qxfer's chunk size (src/transfer.rs).
const CHUNK: usize = 1024 * 1024;

fn pass(path: &str, hash: bool) -> f64 {
    let mut f = std::fs::File::open(path).expect("open the file");
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = blake3::Hasher::new();
    let start = Instant::now();
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        if hash {
            hasher.update(&buf[..n]);
        }
    }
    std::hint::black_box(hasher.finalize());
    start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: hashbench FILE [RUNS]");
    let runs: usize = args.next().map_or(5, |r| r.parse().expect("RUNS"));
    let size = std::fs::metadata(&path).expect("stat").len() as f64;
    pass(&path, false); // warm the page cache
    let read = median((0..runs).map(|_| pass(&path, false)).collect());
    let hashed = median((0..runs).map(|_| pass(&path, true)).collect());
    println!("| pass (page cache, 1 thread) | seconds | GB/s |");
    println!("|---|---|---|");
    println!("| read only | {read:.3} | {:.2} |", size / read / 1e9);
    println!(
        "| read + BLAKE3 | {hashed:.3} | {:.2} |",
        size / hashed / 1e9
    );
    println!(
        "BLAKE3 alone: {:.3} s for {:.0} MiB",
        hashed - read,
        size / (1 << 20) as f64
    );
}
