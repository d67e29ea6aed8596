//! The transport alone, for docs/bench/run: N bytes over one QUIC stream through qxfer's own endpoints (its TLS identities, transport settings, socket buffers and congestion controller) and nothing else: no files, no hashing, no framing, no disk.
//!
//!     cargo build --release --example quicfloor
//!     quicfloor serve ADDR DIR            # prints "listening" when ready; serves until killed
//!     quicfloor put|get ADDR DIR BYTES    # prints the seconds the bytes took
//!
//! `put` sends BYTES to the server, `get` has the server send them; either
//! way the receiver counts them and answers with the count, so the time
//! ends when every byte arrived. DIR holds both identities (made on first
//! use); the server admits any client, as a bench on loopback may. The
//! sender writes one shared 1 MiB buffer again and again (`write_chunk`
//! takes it without a copy) and the receiver drops what `read_chunk` hands
//! it: the cheapest a quinn application can move bytes, which is what
//! qxfer's time and CPU are held against. What qxfer adds above this floor
//! is its own work: files, hashing, framing, the exchange.
//!
//! One thing of qxfer's is left out: the server's connection receive window
//! starts at 8 MiB and is not grown with the path (qxfer's tuner is not
//! public); on loopback, where the floor is measured, 8 MiB is many round
//! trips' worth.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use qxfer::endpoint::{client_endpoint, server_endpoint, ServerLimits, TransportOpts};
use qxfer::tls::{AuthorizedClients, ClientVerifier, Identity, PinnedServerVerifier};

/// The size of each write.
const CHUNK: usize = 1 << 20;

/// Most a request may ask the server to send (1 TiB): the count is read
/// from the peer, and even a bench bounds what a peer sizes.
const MOST: u64 = 1 << 40;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: quicfloor serve ADDR DIR | quicfloor put|get ADDR DIR BYTES");
        std::process::exit(2)
    };
    let (mode, addr, dir) = match &args[..] {
        [_, mode, addr, dir, ..] => (mode.as_str(), addr, Path::new(dir)),
        _ => usage(),
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
    let result = match (mode, &args[4..]) {
        ("serve", []) => serve(addr, dir).await,
        ("put" | "get", [bytes]) => {
            let bytes: u64 = bytes.parse().unwrap_or_else(|_| usage());
            send(addr, dir, mode == "put", bytes).await
        }
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("quicfloor: {e}");
        std::process::exit(1);
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn serve(addr: SocketAddr, dir: &Path) -> Result<(), Failure> {
    let identity = Identity::load_or_generate(dir, "server")?;
    let clients = Arc::new(AuthorizedClients::new(
        &dir.join("authorized_clients"),
        Vec::new(),
        true,
    ));
    let endpoint = server_endpoint(
        addr,
        &identity,
        ClientVerifier::new(clients),
        &TransportOpts::default(),
        &ServerLimits::default(),
    )?;
    println!("listening on {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if let Err(e) = answer(send, recv).await {
                        eprintln!("quicfloor: a stream failed: {e}");
                    }
                });
            }
        });
    }
    Ok(())
}

/// One request: `P` (the client sends, the server counts) or `G` and a
/// count (the server sends that many bytes).
async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), Failure> {
    let mut head = [0u8; 9];
    recv.read_exact(&mut head).await?;
    let n = u64::from_be_bytes(head[1..].try_into().expect("8 bytes"));
    match head[0] {
        b'P' => {
            let got = drain(&mut recv).await?;
            send.write_all(&got.to_be_bytes()).await?;
        }
        b'G' if n <= MOST => fill(&mut send, n).await?,
        _ => return Err("a bad request".into()),
    }
    send.finish()?;
    // Until the peer has it all: finish only queues the end.
    let _ = send.stopped().await;
    Ok(())
}

async fn send(addr: SocketAddr, dir: &Path, put: bool, bytes: u64) -> Result<(), Failure> {
    let identity = Identity::load_or_generate(dir, "client")?;
    let endpoint = client_endpoint(
        addr,
        PinnedServerVerifier::new(None),
        Some(&identity),
        &TransportOpts::default(),
    )?;
    let conn = endpoint.connect(addr, "qxfer")?.await?;
    let started = Instant::now();
    let (mut tx, mut rx) = conn.open_bi().await?;
    let mut head = [0u8; 9];
    head[0] = if put { b'P' } else { b'G' };
    head[1..].copy_from_slice(&bytes.to_be_bytes());
    tx.write_all(&head).await?;
    let got = if put {
        fill(&mut tx, bytes).await?;
        tx.finish()?;
        let mut count = [0u8; 8];
        rx.read_exact(&mut count).await?;
        u64::from_be_bytes(count)
    } else {
        tx.finish()?;
        drain(&mut rx).await?
    };
    let secs = started.elapsed().as_secs_f64();
    if got != bytes {
        return Err(format!("{got} bytes arrived of {bytes}").into());
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    println!("{secs:.3}");
    Ok(())
}

/// Writes `n` bytes from one shared buffer.
async fn fill(send: &mut quinn::SendStream, mut n: u64) -> Result<(), Failure> {
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    while n > 0 {
        let take = n.min(CHUNK as u64) as usize;
        send.write_chunk(chunk.slice(..take)).await?;
        n -= take as u64;
    }
    Ok(())
}

/// Reads to the end of the stream, counting.
async fn drain(recv: &mut quinn::RecvStream) -> Result<u64, Failure> {
    let mut total = 0u64;
    while let Some(chunk) = recv.read_chunk(CHUNK, true).await? {
        total += chunk.bytes.len() as u64;
    }
    Ok(total)
}
