//! The command line's arguments: every clap definition lives here, and nothing below the CLI sees clap.

use crate::endpoint::{self, Congestion, TransportOpts};
use crate::protocol::{Compression, MAX_FRAME};

use crate::server;
use crate::tls::Fingerprint;
use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub(super) const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    some files failed (the others finished; each failure is listed)
  2    usage error (a wrong option, argument or config.toml)
  3    connection failure: unreachable, not a qxfer server, busy, or lost before anything moved
  4    trust failure: server key changed or --pin mismatch, or this client refused by the server
  130  interrupted (Ctrl-C, SIGTERM): run the same command again to resume
       (a piped upload, put -, cannot resume: run the pipeline again)";

/// Secure, fast file transfer over QUIC.
#[derive(Debug, Parser)]
#[command(
    name = "qxfer",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_CODES_HELP
)]
pub(super) struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(super) verbose: u8,
    /// Only errors: no progress bars, no summary.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub(super) quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub(super) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Serve a directory to qxfer clients.
    Serve(ServeArgs),
    /// Upload files to a server.
    Put(PutArgs),
    /// Download files from a server.
    Get(GetArgs),
    /// List a directory on a server.
    Ls(LsArgs),
    /// Remove files (and with -r directories) on a server.
    Rm(RmArgs),
    /// Rename (move) a file or directory on a server.
    Mv(MvArgs),
    /// Create directories on a server.
    Mkdir(MkdirArgs),
    /// Print this client's identity fingerprint (generating the identity on first use).
    ///
    /// Give it to a server's operator, who admits you with
    /// `qxfer serve --allow SHA256:...`.
    Id,
    /// Print a shell completion script (see the README for where it goes).
    ///
    /// bash: `qxfer completions bash > ~/.local/share/bash-completion/completions/qxfer`;
    /// zsh: into a directory on $fpath as `_qxfer`; fish:
    /// `~/.config/fish/completions/qxfer.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// List the servers named in config.toml, with their pins and the fingerprints known for them.
    ///
    /// config.toml lives in the config directory (QXFER_CONFIG_DIR, else
    /// e.g. ~/.config/qxfer) and names servers for `--server NAME`:
    ///
    ///   [servers.home]
    ///   address = "nas.example.net:65432"
    ///   pin = "SHA256:..."   # optional: accept only this key
    Servers,
    /// Print the manual page (roff), generated from this command line's own definitions.
    ///
    /// `qxfer man > ~/.local/share/man/man1/qxfer.1`, then `man qxfer`.
    Man,
}

/// Options of `qxfer serve`.
#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// UDP address to listen on, e.g. 0.0.0.0:65432 or [::]:65432.
    #[arg(long, default_value = "127.0.0.1:65432")]
    pub(super) listen: SocketAddr,
    /// Directory to serve (created if missing), or a bucket of an
    /// S3-compatible object store: s3://BUCKET or s3://BUCKET/PREFIX, with
    /// credentials and region from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    /// and AWS_REGION. Several servers may share one bucket.
    #[arg(long, default_value = "qxfer-files")]
    pub(super) root: PathBuf,
    /// The object store's address for an s3:// root, e.g.
    /// http://127.0.0.1:3900 for Garage (default: AWS S3).
    #[arg(long, value_name = "URL")]
    pub(super) s3_endpoint: Option<String>,
    /// Where the server's certificate and key live; generated on first start.
    #[arg(long, default_value = "certs")]
    pub(super) certs: PathBuf,
    /// Serve downloads and listings only; refuse every upload.
    #[arg(long)]
    pub(super) read_only: bool,
    /// Refuse uploads larger than this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub(super) max_file_size: Option<u64>,
    /// With an s3:// root: the most memory all uploads together may hold
    /// in buffers (each reserves what it will hold before it is accepted:
    /// a small file whole, a large one three parts of 8 MiB or more);
    /// past it, uploads wait and are then refused as busy (clients retry).
    #[arg(long, value_name = "BYTES", default_value_t = server::DEFAULT_UPLOAD_MEMORY, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub(super) upload_memory: u64,
    /// Most clients connected at once; more are refused.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) max_connections: u32,
    /// Most connections one client identity may hold at once.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS_PER_CLIENT as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) max_connections_per_client: u32,
    /// Most streams (files in flight) per connection.
    #[arg(long, default_value_t = endpoint::DEFAULT_MAX_STREAMS, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(super) max_streams: u32,
    /// Close connections silent for this long (keep-alives count as traffic).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(super) idle_timeout: Duration,
    /// Time a client has to send its request after opening a stream.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) header_timeout: Duration,
    /// On Ctrl-C or SIGTERM, stop taking new requests and give those in
    /// flight this long to finish before closing; a second signal stops at
    /// once. Interrupted uploads are kept for a resume either way.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(super) grace: Duration,
    /// Delete interrupted uploads (kept for resuming) untouched for this
    /// long; at least 1m (the sweep runs that often at most).
    #[arg(long, default_value = "24h", value_parser = parse_partial_ttl)]
    pub(super) partial_ttl: Duration,
    /// Serve metrics (Prometheus text at /metrics) and a health check
    /// (/health: 200 while the store answers, else 503) over plain HTTP on
    /// this TCP address, e.g. 127.0.0.1:9465. No authentication: bind it
    /// to localhost or to a network only your monitoring reaches.
    #[arg(long, value_name = "ADDR")]
    pub(super) metrics: Option<SocketAddr>,
    /// How the server logs to stderr: text for people, json (one object
    /// per line) for log shippers.
    #[arg(long, value_enum, default_value = "text")]
    pub(super) log_format: LogFormat,
    /// Largest request header accepted, in bytes.
    #[arg(long, default_value_t = MAX_FRAME as u32, value_parser = clap::value_parser!(u32).range(1024..=MAX_FRAME as i64))]
    pub(super) max_header_size: u32,
    /// Admit this client fingerprint: append it to <CERTS>/authorized_clients
    /// (repeatable) and start serving.
    #[arg(long, value_name = "SHA256:...")]
    pub(super) allow: Vec<Fingerprint>,
    /// Admit ANY client, authorized or not. Anyone who can reach the port can
    /// then read and write the root. Only for trusted networks.
    #[arg(long)]
    pub(super) open: bool,
    #[command(flatten)]
    pub(super) transport: TransportArgs,
}

/// Parses `30s`, `2m`, `500ms`... into a duration.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 2m, 500ms)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Parses `--partial-ttl`: a duration of at least a minute. Shorter ones
/// would sweep the partial store many times a second and delete what a
/// client is about to resume after a brief outage.
pub(super) fn parse_partial_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(60) {
        return Err("must be at least 1m".into());
    }
    Ok(d)
}

/// Options every client command takes.
#[derive(Debug, Args)]
pub(super) struct ClientArgs {
    /// Server: a name from config.toml in the config directory (see
    /// `qxfer servers`), or an address, HOST:PORT. Repeat it (or separate
    /// with commas) for several addresses of one server, servers that
    /// share one identity and one store: the client connects to one at
    /// random and, if it is lost mid-command, resumes through another.
    #[arg(
        long,
        env = "QXFER_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:65432"
    )]
    pub(super) server: Vec<String>,
    /// Accept only a server with this fingerprint (SHA256:..., as `qxfer serve` prints).
    #[arg(long, value_name = "SHA256:...")]
    pub(super) pin: Option<Fingerprint>,
    /// Give up on a request the server has not answered in this long (more
    /// for files it must hash first), like rsync's --timeout: a server that
    /// is stuck keeps its connection alive, so only this ends the wait.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub(super) timeout: Duration,
    /// Give up on a server that has not answered a connection attempt in
    /// this long (like ssh's ConnectTimeout). Once it answers, a slow or
    /// lossy handshake gets 30 s more.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub(super) connect_timeout: Duration,
    #[command(flatten)]
    pub(super) transport: TransportArgs,
}

/// Options put and get share (also those of every client command, in
/// [`ClientArgs`]).
#[derive(Debug, Args)]
pub(super) struct TransferArgs {
    /// Sync rather than copy: send new files, replace files that differ,
    /// and leave alone files whose size and mtime match the other side's
    /// without reading them (rsync's quick check). Without it an existing
    /// file is never replaced (unless --force, which re-sends every file).
    /// With --delete it mirrors. Not with --force, which re-sends every file.
    #[arg(long, conflicts_with = "force")]
    pub(super) sync: bool,
    /// Sync, comparing files of the same size by BLAKE3 instead of size
    /// and mtime (rsync's --checksum): both sides read them (the server
    /// remembers its digests until a file changes). Implies --sync.
    #[arg(long, conflicts_with = "force")]
    pub(super) checksum: bool,
    /// Start interrupted transfers over instead of continuing them.
    #[arg(long)]
    pub(super) no_resume: bool,
    /// Cap the total rate, in bytes per second (K, M, G suffixes: powers of 1024).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(super) limit_rate: Option<u64>,
    /// Compress with zstd: `auto` compresses data that shrinks when the link
    /// is slower than the compressor (not on loopback or a fast LAN), and
    /// soon stops trying on data that does not shrink. BLAKE3 checks the
    /// uncompressed bytes either way.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = CompressArg::Auto)]
    pub(super) compress: CompressArg,
    /// When the connection is lost (an outage, a server restart or
    /// shutdown, a stalled peer), reconnect and resume the unfinished files
    /// up to this many times, waiting 0.5 s, 1 s, 2 s... between attempts.
    /// 0 gives up at once.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(super) retries: u32,
    /// In directory trees (-r), leave out what matches PATTERN: gitignore
    /// syntax, matched against paths that start with the tree's own name
    /// (`*.tmp` and `node_modules/` at any depth, `photos/raw` anchored at
    /// the top, a trailing `/` for directories only, `!keep.tmp` to take an
    /// exclusion back). Repeatable. What is excluded is neither sent nor
    /// created; -v lists it.
    #[arg(long, value_name = "PATTERN")]
    pub(super) exclude: Vec<String>,
    /// Read --exclude patterns from FILE, one per line (blank lines and
    /// `#` comments skipped, as in .gitignore). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub(super) exclude_from: Vec<PathBuf>,
    /// Move nothing: list what would be sent, skipped (already there,
    /// judged by size and mtime) or refused (exists; use --force), and
    /// what --exclude leaves out, and exit as the real run would (1 if it
    /// would refuse a file).
    #[arg(short = 'n', long)]
    pub(super) dry_run: bool,
    /// After a successful transfer of directory trees (-r), remove at the
    /// destination what the source no longer has, only inside the
    /// transferred directories, and never when any file failed. Excluded
    /// names are kept. A dry run lists what would go. A --read-only server
    /// refuses it.
    #[arg(long)]
    pub(super) delete: bool,
    /// Files of 1 MiB or more in flight at once, each on its own stream
    /// (smaller files go up to 512 at once, without bars of their own).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(super) parallel: u16,
    /// Overwrite existing files at the destination (and re-send every
    /// file; see --sync for replacing only what differs).
    #[arg(long)]
    pub(super) force: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub(super) json: bool,
    /// Say why the transfer went as fast as it did: the path's round trip,
    /// loss and rate, and what limited it (the link, congestion control,
    /// flow control, the receiver, the disk, the CPU, or round trips). With
    /// --json, the same is always in the report's `path`.
    #[arg(long)]
    pub(super) stats: bool,
}

/// Parses `800K`, `50M`, `1.5G` or a plain number of bytes per second.
pub(super) fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown suffix {c:?}: use K, M or G")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate such as 50M"))?;
    let rate = (n * mult as f64) as u64;
    if !n.is_finite() || rate == 0 {
        return Err("the rate must be more than zero".into());
    }
    Ok(rate)
}

/// Options of `qxfer put`.
#[derive(Debug, Args)]
pub(super) struct PutArgs {
    /// Files to upload; each lands under its base name. `- NAME` uploads
    /// standard input under NAME until it ends (`tar c dir | qxfer put -
    /// dir.tar`): its length is unknown, so it cannot resume, and a failed
    /// or interrupted run saves nothing. A local file named `-` is `./-`.
    #[arg(required = true, value_name = "FILE")]
    pub(super) files: Vec<PathBuf>,
    /// Upload directories and everything in them (symlinks and special
    /// files are skipped, never followed).
    #[arg(short, long)]
    pub(super) recursive: bool,
    /// Remote directory to place the files in (created as needed).
    #[arg(long, value_name = "DIR")]
    pub(super) to: Option<String>,
    #[command(flatten)]
    pub(super) transfer: TransferArgs,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// Options of `qxfer get`.
#[derive(Debug, Args)]
pub(super) struct GetArgs {
    /// Remote files (paths relative to the server root).
    #[arg(required = true, value_name = "NAME")]
    pub(super) names: Vec<String>,
    /// Download directories and everything in them (symlinks and special
    /// files are skipped).
    #[arg(short, long)]
    pub(super) recursive: bool,
    /// Local directory to save into [default: your Downloads folder]. `-`
    /// writes the one file named to standard output instead (nothing else
    /// goes there; its BLAKE3 is checked at the end, and a mismatch is an
    /// error exit), so `qxfer get big.log -o - | grep x` works.
    #[arg(short, long, value_name = "DIR")]
    pub(super) output: Option<PathBuf>,
    #[command(flatten)]
    pub(super) transfer: TransferArgs,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// Options of `qxfer rm`.
#[derive(Debug, Args)]
pub(super) struct RmArgs {
    /// Remote files or directories (paths relative to the server root).
    #[arg(required = true, value_name = "NAME")]
    pub(super) names: Vec<String>,
    /// Remove directories and everything in them (an empty directory goes
    /// without -r; links are removed as links, never followed).
    #[arg(short, long)]
    pub(super) recursive: bool,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// Options of `qxfer mv`.
#[derive(Debug, Args)]
pub(super) struct MvArgs {
    /// The remote file or directory to rename.
    #[arg(value_name = "FROM")]
    pub(super) from: String,
    /// Its new name (the full new path; it must not exist, its directory must).
    #[arg(value_name = "TO")]
    pub(super) to: String,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// Options of `qxfer mkdir`.
#[derive(Debug, Args)]
pub(super) struct MkdirArgs {
    /// Remote directories to create.
    #[arg(required = true, value_name = "DIR")]
    pub(super) dirs: Vec<String>,
    /// Create missing parent directories too, and accept directories that
    /// already exist (as mkdir -p).
    #[arg(short, long)]
    pub(super) parents: bool,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// Options of `qxfer ls`.
#[derive(Debug, Args)]
pub(super) struct LsArgs {
    /// Remote directory [default: the root].
    #[arg(default_value = "")]
    pub(super) dir: String,
    /// List the whole tree, with paths relative to DIR.
    #[arg(short, long)]
    pub(super) recursive: bool,
    /// Print JSON on stdout.
    #[arg(long)]
    pub(super) json: bool,
    /// When the connection is lost before the listing arrives, reconnect
    /// and ask again up to this many times (0.5 s, 1 s, 2 s... apart). A
    /// server that does not answer at all fails at once.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(super) retries: u32,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// Transport options shared by `serve` and the client commands (the
/// library's [`TransportOpts`]).
#[derive(Debug, Clone, Args)]
pub(super) struct TransportArgs {
    /// Congestion controller. `model` is the default: loss-based
    /// controllers slow to a crawl on lossy long-distance paths, and quinn's
    /// BBR overflows the bottleneck's queue (docs/BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = CongestionArg::Model, global = true)]
    pub(super) congestion: CongestionArg,
}

impl TransportArgs {
    pub(super) fn opts(&self) -> TransportOpts {
        TransportOpts {
            congestion: match self.congestion {
                CongestionArg::Model => Congestion::Model,
                CongestionArg::Bbr => Congestion::Bbr,
                CongestionArg::Cubic => Congestion::Cubic,
                CongestionArg::NewReno => Congestion::NewReno,
            },
        }
    }
}

/// `--congestion` (the library's [`Congestion`]).
/// `serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum CongestionArg {
    /// qxfer's own model-based controller (src/congestion/): keeps its
    /// rate under random loss and the bottleneck queue short.
    Model,
    /// quinn's BBR (an early BBRv1): ignores random loss but overfills queues.
    Bbr,
    /// Cubic: quinn's default; backs off on every loss.
    Cubic,
    /// NewReno: the classic loss-based controller.
    NewReno,
}

/// `--compress` (the library's [`Compression`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum CompressArg {
    /// Compress blocks that shrink, when the link is slower than the
    /// compressor; data that does not compress is soon sent as it is.
    Auto,
    /// Compress every block that shrinks, however fast the link.
    Always,
    /// Never compress (the bytes travel raw).
    Never,
}

impl From<CompressArg> for Compression {
    fn from(c: CompressArg) -> Self {
        match c {
            CompressArg::Auto => Self::Auto,
            CompressArg::Always => Self::Always,
            CompressArg::Never => Self::Never,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rates_parse_with_suffixes() {
        assert_eq!(parse_rate("800K"), Ok(800 << 10));
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1.5G"), Ok(3 << 29));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5X").is_err());
    }
}
