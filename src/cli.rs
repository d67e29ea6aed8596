//! Command-line interface: clap arguments, validated into configs, and the four commands.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::collections::HashMap;

use crate::client::tree::{self, Tree};
use crate::client::{
    dry_run, fix_meta, plan_with_listing, run_batch, Action, BatchReport, Client, ClientConfig,
    ClientFile, ConfigError, ConnectError, Direction, FileError, Filter, FilterError, Job, Planned,
    Watch, CLIENT_IDENTITY,
};
use crate::endpoint::{self, ServerLimits, TransportOpts};
use crate::exchange::to_system_time;
use crate::paths::join_remote;
use crate::progress::{summary, Progress};
use crate::protocol::{Compression, DirMeta, Entry, EntryKind, MAX_FRAME};
use crate::server::{self, ServeConfig};
use crate::tls::{AuthorizedClients, ClientVerifier, Fingerprint, Identity, AUTHORIZED_CLIENTS};

/// Exit codes, as rsync documents its own: scripts tell a file that failed
/// from a server they could not reach or did not trust.
pub mod exit {
    /// Every file (or the command) succeeded.
    pub const OK: u8 = 0;
    /// Some files failed; the others finished.
    pub const SOME_FAILED: u8 = 1;
    /// The command line was wrong (clap's own code for usage errors).
    pub const USAGE: u8 = 2;
    /// The server could not be reached, was not a qxfer server, was busy,
    /// or the connection failed before anything moved.
    pub const CONNECTION: u8 = 3;
    /// Trust failed: the server's key changed or did not match --pin, or
    /// the server refused this client's identity.
    pub const TRUST: u8 = 4;
    /// Stopped by Ctrl-C or SIGTERM (128 + SIGINT); rerun to resume.
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES_HELP: &str = "\
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
pub struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors: no progress bars, no summary.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
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
pub struct ServeArgs {
    /// UDP address to listen on, e.g. 0.0.0.0:65432 or [::]:65432.
    #[arg(long, default_value = "127.0.0.1:65432")]
    pub listen: SocketAddr,
    /// Directory to serve (created if missing), or a bucket of an
    /// S3-compatible object store: s3://BUCKET or s3://BUCKET/PREFIX, with
    /// credentials and region from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    /// and AWS_REGION. Several servers may share one bucket.
    #[arg(long, default_value = "qxfer-files")]
    pub root: PathBuf,
    /// The object store's address for an s3:// root, e.g.
    /// http://127.0.0.1:3900 for Garage (default: AWS S3).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Where the server's certificate and key live; generated on first start.
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// Serve downloads and listings only; refuse every upload.
    #[arg(long)]
    pub read_only: bool,
    /// Refuse uploads larger than this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_file_size: Option<u64>,
    /// With an s3:// root: the most memory all uploads together may hold
    /// in buffers (each reserves what it will hold before it is accepted:
    /// a small file whole, a large one three parts of 8 MiB or more);
    /// past it, uploads wait and are then refused as busy (clients retry).
    #[arg(long, value_name = "BYTES", default_value_t = server::DEFAULT_UPLOAD_MEMORY, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub upload_memory: u64,
    /// Most clients connected at once; more are refused.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most connections one client identity may hold at once.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS_PER_CLIENT as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: u32,
    /// Most streams (files in flight) per connection.
    #[arg(long, default_value_t = endpoint::DEFAULT_MAX_STREAMS, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_streams: u32,
    /// Close connections silent for this long (keep-alives count as traffic).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Time a client has to send its request after opening a stream.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// On Ctrl-C or SIGTERM, stop taking new requests and give those in
    /// flight this long to finish before closing; a second signal stops at
    /// once. Interrupted uploads are kept for a resume either way.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Delete interrupted uploads (kept for resuming) untouched for this
    /// long; at least 1m (the sweep runs that often at most).
    #[arg(long, default_value = "24h", value_parser = parse_partial_ttl)]
    pub partial_ttl: Duration,
    /// Largest request header accepted, in bytes.
    #[arg(long, default_value_t = MAX_FRAME as u32, value_parser = clap::value_parser!(u32).range(1024..=MAX_FRAME as i64))]
    pub max_header_size: u32,
    /// Admit this client fingerprint: append it to <CERTS>/authorized_clients
    /// (repeatable) and start serving.
    #[arg(long, value_name = "SHA256:...")]
    pub allow: Vec<Fingerprint>,
    /// Admit ANY client, authorized or not. Anyone who can reach the port can
    /// then read and write the root. Only for trusted networks.
    #[arg(long)]
    pub open: bool,
    #[command(flatten)]
    pub transport: TransportOpts,
}

/// Parses `30s`, `2m`, `500ms`... into a duration.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 2m, 500ms)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Parses `--partial-ttl`: a duration of at least a minute. Shorter ones
/// would sweep the partial store many times a second and delete what a
/// client is about to resume after a brief outage.
fn parse_partial_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(60) {
        return Err("must be at least 1m".into());
    }
    Ok(d)
}

/// Options every client command takes.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Server: a name from config.toml in the config directory (see
    /// `qxfer servers`), or an address, HOST:PORT.
    #[arg(long, env = "QXFER_SERVER", default_value = "127.0.0.1:65432")]
    pub server: String,
    /// Accept only a server with this fingerprint (SHA256:..., as `qxfer serve` prints).
    #[arg(long, value_name = "SHA256:...")]
    pub pin: Option<Fingerprint>,
    /// Give up on a request the server has not answered in this long (more
    /// for files it must hash first), like rsync's --timeout: a server that
    /// is stuck keeps its connection alive, so only this ends the wait.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Give up on a server that has not answered a connection attempt in
    /// this long (like ssh's ConnectTimeout). Once it answers, a slow or
    /// lossy handshake gets 30 s more.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub transport: TransportOpts,
}

/// Options put and get share.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Sync rather than copy: send new files, replace files that differ,
    /// and leave alone files whose size and mtime match the other side's
    /// without reading them (rsync's quick check). Without it an existing
    /// file is never replaced (unless --force, which re-sends every file).
    /// With --delete it mirrors. Not with --force, which re-sends every file.
    #[arg(long, conflicts_with = "force")]
    pub sync: bool,
    /// Sync, comparing files of the same size by BLAKE3 instead of size
    /// and mtime (rsync's --checksum): both sides read them (the server
    /// remembers its digests until a file changes). Implies --sync.
    #[arg(long, conflicts_with = "force")]
    pub checksum: bool,
    /// Start interrupted transfers over instead of continuing them.
    #[arg(long)]
    pub no_resume: bool,
    /// Cap the total rate, in bytes per second (K, M, G suffixes: powers of 1024).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub limit_rate: Option<u64>,
    /// Compress with zstd: `auto` compresses data that shrinks when the link
    /// is slower than the compressor (not on loopback or a fast LAN), and
    /// soon stops trying on data that does not shrink. BLAKE3 checks the
    /// uncompressed bytes either way.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = Compression::Auto)]
    pub compress: Compression,
    /// When the connection is lost (an outage, a server restart or
    /// shutdown, a stalled peer), reconnect and resume the unfinished files
    /// up to this many times, waiting 0.5 s, 1 s, 2 s... between attempts.
    /// 0 gives up at once.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    /// In directory trees (-r), leave out what matches PATTERN: gitignore
    /// syntax, matched against paths that start with the tree's own name
    /// (`*.tmp` and `node_modules/` at any depth, `photos/raw` anchored at
    /// the top, a trailing `/` for directories only, `!keep.tmp` to take an
    /// exclusion back). Repeatable. What is excluded is neither sent nor
    /// created; -v lists it.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Read --exclude patterns from FILE, one per line (blank lines and
    /// `#` comments skipped, as in .gitignore). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Move nothing: list what would be sent, skipped (already there,
    /// judged by size and mtime) or refused (exists; use --force), and
    /// what --exclude leaves out, and exit as the real run would (1 if it
    /// would refuse a file).
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// After a successful transfer of directory trees (-r), remove at the
    /// destination what the source no longer has, only inside the
    /// transferred directories, and never when any file failed. Excluded
    /// names are kept. A dry run lists what would go. A --read-only server
    /// refuses it.
    #[arg(long)]
    pub delete: bool,
}

/// Parses `800K`, `50M`, `1.5G` or a plain number of bytes per second.
fn parse_rate(s: &str) -> Result<u64, String> {
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
pub struct PutArgs {
    /// Files to upload; each lands under its base name. `- NAME` uploads
    /// standard input under NAME until it ends (`tar c dir | qxfer put -
    /// dir.tar`): its length is unknown, so it cannot resume, and a failed
    /// or interrupted run saves nothing. A local file named `-` is `./-`.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Upload directories and everything in them (symlinks and special
    /// files are skipped, never followed).
    #[arg(short, long)]
    pub recursive: bool,
    /// Remote directory to place the files in (created as needed).
    #[arg(long, value_name = "DIR")]
    pub to: Option<String>,
    /// Files of 1 MiB or more in flight at once, each on its own stream
    /// (smaller files go up to 512 at once, without bars of their own).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// Overwrite existing remote files.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `qxfer get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Remote files (paths relative to the server root).
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// Download directories and everything in them (symlinks and special
    /// files are skipped).
    #[arg(short, long)]
    pub recursive: bool,
    /// Local directory to save into [default: your Downloads folder]. `-`
    /// writes the one file named to standard output instead (nothing else
    /// goes there; its BLAKE3 is checked at the end, and a mismatch is an
    /// error exit), so `qxfer get big.log -o - | grep x` works.
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Files of 1 MiB or more in flight at once, each on its own stream
    /// (smaller files go up to 512 at once, without bars of their own).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// Overwrite existing local files.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `qxfer rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Remote files or directories (paths relative to the server root).
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// Remove directories and everything in them (an empty directory goes
    /// without -r; links are removed as links, never followed).
    #[arg(short, long)]
    pub recursive: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `qxfer mv`.
#[derive(Debug, Args)]
pub struct MvArgs {
    /// The remote file or directory to rename.
    #[arg(value_name = "FROM")]
    pub from: String,
    /// Its new name (the full new path; it must not exist, its directory must).
    #[arg(value_name = "TO")]
    pub to: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `qxfer mkdir`.
#[derive(Debug, Args)]
pub struct MkdirArgs {
    /// Remote directories to create.
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<String>,
    /// Create missing parent directories too, and accept directories that
    /// already exist (as mkdir -p).
    #[arg(short, long)]
    pub parents: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `qxfer ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Remote directory [default: the root].
    #[arg(default_value = "")]
    pub dir: String,
    /// List the whole tree, with paths relative to DIR.
    #[arg(short, long)]
    pub recursive: bool,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// When the connection is lost before the listing arrives, reconnect
    /// and ask again up to this many times (0.5 s, 1 s, 2 s... apart). A
    /// server that does not answer at all fails at once.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Parses the command line, runs the command and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qxfer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qxfer: error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// The exit code for a command that failed as a whole (see [`exit`]).
fn exit_code_of(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| {
        c.downcast_ref::<ConfigError>().is_some() || c.downcast_ref::<FilterError>().is_some()
    }) {
        return exit::USAGE;
    }
    let Some(connect) = e.chain().find_map(|c| c.downcast_ref::<ConnectError>()) else {
        // A listing that failed because the connection did.
        let lost = e
            .chain()
            .find_map(|c| c.downcast_ref::<FileError>())
            .is_some_and(FileError::is_transient);
        return if lost {
            exit::CONNECTION
        } else {
            exit::SOME_FAILED
        };
    };
    match connect {
        ConnectError::BadAddress(_) => exit::USAGE,
        ConnectError::Refused { .. }
        | ConnectError::HostKeyChanged { .. }
        | ConnectError::PinMismatch { .. }
        | ConnectError::Trust(_) => exit::TRUST,
        _ => exit::CONNECTION,
    }
}

/// Raises the soft limit on open files to the hard one (at most 65,536):
/// hundreds of files in flight each hold a descriptor on both sides, and
/// many systems still set the soft limit to 1,024 (Go's runtime raises it
/// the same way). Best effort: with the old limit, a transfer that runs out
/// of descriptors fails with a clear error, file by file.
#[cfg(unix)]
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(65_536, |max| max.min(65_536));
    if limit.current.is_some_and(|current| current < want) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: limit.maximum,
            },
        );
    }
}

#[cfg(not(unix))]
fn raise_open_file_limit() {}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    // Only put and get draw bars; the server and ls log or print plainly.
    let bars = matches!(cli.command, Command::Put(_) | Command::Get(_));
    let progress = Progress::new(cli.quiet || !bars);
    let default_level = match (cli.quiet, cli.verbose, &cli.command) {
        (true, _, _) => "error",
        (_, 0, Command::Serve(_)) => "info",
        (_, 0, _) => "warn",
        (_, 1, _) => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("qxfer={default_level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress.log_writer())
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();

    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Put(mut args) => {
            args.transfer.sync |= args.transfer.checksum;
            let hint = if reads_stdin(&args) {
                "interrupted; a piped upload cannot resume: unless all of it had been sent (check with `qxfer ls`), nothing was saved on the server, so run the pipeline again"
            } else {
                RESUME_HINT
            };
            let command = put(args, cli.quiet, cli.verbose > 0, &progress);
            interruptible(command, &progress, hint).await
        }
        Command::Get(mut args) => {
            args.transfer.sync |= args.transfer.checksum;
            let hint = if args.output.as_deref() == Some(Path::new("-")) {
                "interrupted; what went to standard output is incomplete: discard it (a download to standard output starts over when run again)"
            } else {
                RESUME_HINT
            };
            let command = get(args, cli.quiet, cli.verbose > 0, &progress);
            interruptible(command, &progress, hint).await
        }
        Command::Ls(args) => ls(args).await,
        Command::Rm(args) => rm(args, cli.verbose > 0).await,
        Command::Mv(args) => mv(args).await,
        Command::Mkdir(args) => mkdir(args).await,
        Command::Id => id(),
        Command::Servers => servers(),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "qxfer", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What an interrupted transfer says: the server keeps what an upload
/// sent, and a download's bytes stay in its `.qxfer-part` file.
const RESUME_HINT: &str = "interrupted; run the same command again to resume where it stopped (large files continue from what was already sent)";

/// Runs a transfer command until it ends or Ctrl-C (or SIGTERM) arrives.
/// Interrupted, it exits 130 (128 + SIGINT, as shells report it) and says
/// `hint`.
async fn interruptible(
    command: impl std::future::Future<Output = Result<ExitCode>>,
    progress: &Progress,
    hint: &str,
) -> Result<ExitCode> {
    let signals = shutdown_signals()?;
    tokio::select! {
        result = command => result,
        _ = async move { signals.clone().wait_for(|n| *n >= 1).await.is_ok() } => {
            progress.finish();
            crate::client::close_all("interrupted").await;
            eprintln!("qxfer: {hint}");
            Ok(ExitCode::from(exit::INTERRUPTED))
        }
    }
}

/// `qxfer rm`: each name removed in turn; a failure is reported and the
/// others still go. Exit code 1 if any failed.
async fn rm(args: RmArgs, verbose: bool) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let client = connect(&args.client, None, true, &progress).await?;
    let (mut failed, mut lost) = (0, 0);
    for name in &args.names {
        match client.remove(name, args.recursive).await {
            Ok(()) if verbose => eprintln!("qxfer: removed {name}"),
            Ok(()) => {}
            Err(e) => {
                failed += 1;
                lost += usize::from(e.is_transient());
                eprintln!("qxfer: error: {}", file_error(name, &e));
            }
        }
    }
    close_checked(client).await?;
    if failed > 0 {
        eprintln!("qxfer: {failed} of {} not removed", args.names.len());
    }
    // Every failure the connection's: a connection failure (exit code 3).
    if failed > 0 && lost == failed {
        return Ok(ExitCode::from(exit::CONNECTION));
    }
    Ok(outcome(failed))
}

/// Closes a connection after requests that carry no files; a refusal of
/// this client by the server is the command's error (exit code 4).
async fn close_checked(client: Client) -> Result<()> {
    if let Some(refused) = client.refusal() {
        return Err(refused.into());
    }
    client.close().await;
    Ok(())
}

/// The exit code of a command that went through `failed` failures.
fn outcome(failed: usize) -> ExitCode {
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::SOME_FAILED)
    }
}

/// `qxfer mv FROM TO`.
async fn mv(args: MvArgs) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let client = connect(&args.client, None, true, &progress).await?;
    let result = client.rename(&args.from, &args.to).await;
    close_checked(client).await?;
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("qxfer: error: {}", file_error(&args.from, &e));
            Ok(ExitCode::from(if e.is_transient() {
                exit::CONNECTION
            } else {
                exit::SOME_FAILED
            }))
        }
    }
}

/// `qxfer mkdir [-p] DIR...`. Without -p, as mkdir: the parent must exist
/// and the directory must not (checked with a listing first; the server's
/// mkdir itself always creates parents and accepts what exists).
async fn mkdir(args: MkdirArgs) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let client = connect(&args.client, None, true, &progress).await?;
    let mut failed = 0;
    for dir in &args.dirs {
        let checked = if args.parents {
            Ok(())
        } else {
            mkdir_preconditions(&client, dir).await
        };
        let result = match checked {
            Ok(()) => client
                .mkdir(dir, None)
                .await
                .map_err(|e| file_error(dir, &e)),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            failed += 1;
            eprintln!("qxfer: error: {e}");
        }
    }
    close_checked(client).await?;
    Ok(outcome(failed))
}

/// Why `mkdir DIR` without -p must not go ahead: DIR exists, or its parent
/// does not.
async fn mkdir_preconditions(client: &Client, dir: &str) -> Result<(), String> {
    let trimmed = dir.trim_end_matches('/');
    let (parent, base) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    let parent_name = parent.rsplit('/').next().unwrap_or(parent);
    match client.list(parent).await {
        // Listing a file lists the file itself.
        Ok(entries)
            if !parent.is_empty()
                && matches!(entries.as_slice(), [only] if only.kind != EntryKind::Dir && only.name == parent_name) =>
        {
            Err(format!(
                "cannot create '{dir}': '{parent}' on the server is a file, not a directory"
            ))
        }
        Ok(entries) => match entries.iter().find(|e| e.name == base) {
            Some(_) => Err(format!(
                "'{dir}' already exists on the server (mkdir -p accepts that)"
            )),
            None => Ok(()),
        },
        Err(FileError::Remote(e)) if e.code == crate::protocol::ErrorCode::NotFound => Err(
            format!("cannot create '{dir}': its parent '{parent}' does not exist on the server; use mkdir -p"),
        ),
        Err(e) => Err(file_error(dir, &e)),
    }
}

/// `qxfer servers`: the names of config.toml, each with its address, its
/// pin and what known_hosts holds for it.
fn servers() -> Result<ExitCode> {
    let dir = config_dir()?;
    let file = ClientFile::load(&dir)?;
    if file.servers.is_empty() {
        println!(
            "no servers named in {} (add [servers.NAME] with address = \"HOST:PORT\"; see `qxfer servers --help`)",
            file.path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let known = crate::tls::KnownHosts::load(&dir.join("known_hosts"))?;
    let width = file.servers.keys().map(String::len).max().unwrap_or(0);
    for s in file.servers.values() {
        let recorded = crate::client::split_server(&s.address)
            .ok()
            .and_then(|(host, port)| known.lookup(&crate::client::known_hosts_key(&host, port)));
        let pin = s
            .pin
            .map_or_else(|| "no pin".to_owned(), |p| format!("pin {p}"));
        let seen = recorded.map_or_else(
            || "not contacted yet".to_owned(),
            |(fp, _)| format!("known {fp}"),
        );
        println!("{:width$}  {}  {pin}  {seen}", s.name, s.address);
    }
    Ok(ExitCode::SUCCESS)
}

fn id() -> Result<ExitCode> {
    let dir = config_dir()?;
    let identity = Identity::load_or_generate(&dir, CLIENT_IDENTITY)
        .with_context(|| format!("client identity in {}", dir.display()))?;
    println!("{}", identity.fingerprint());
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut config = match args.root.to_str().filter(|r| r.starts_with("s3://")) {
        Some(url) => {
            let options = server::S3Options {
                endpoint: args.s3_endpoint.clone(),
                upload_memory: Some(args.upload_memory),
                ..server::S3Options::default()
            };
            ServeConfig::object_store(url, &options, args.read_only)
                .await
                .map_err(anyhow::Error::msg)?
        }
        None => {
            if args.s3_endpoint.is_some() {
                anyhow::bail!(
                    "--s3-endpoint needs an object store root (--root s3://BUCKET[/PREFIX]); {} is a directory",
                    args.root.display()
                );
            }
            ServeConfig::prepare(&args.root)?
        }
    };
    config.read_only = args.read_only;
    config.max_file_size = args.max_file_size;
    config.max_connections = args.max_connections as usize;
    config.max_connections_per_client = args.max_connections_per_client as usize;
    config.header_timeout = args.header_timeout;
    config.max_header_size = args.max_header_size as usize;
    config.partial_ttl = args.partial_ttl;
    config.grace = args.grace;
    let limits = ServerLimits {
        max_streams: args.max_streams,
        idle_timeout: args.idle_timeout,
    };
    let identity = Identity::load_or_generate(&args.certs, "server")
        .with_context(|| format!("server identity in {}", args.certs.display()))?;
    // What start-up has to say waits for the banner, so that the banner
    // comes first and everything reads alike (plain lines on stdout);
    // requests are logged on stderr from then on.
    let mut notes = Vec::new();
    let clients = authorized_clients(&args, &mut notes)?;
    let verifier = ClientVerifier::new(clients.clone());
    let endpoint =
        endpoint::server_endpoint(args.listen, &identity, verifier, &args.transport, &limits)?;
    let addr = endpoint.local_addr().context("reading the bound address")?;
    let signals = shutdown_signals()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "qxfer {} serving {}",
        env!("CARGO_PKG_VERSION"),
        config.root.display()
    )?;
    writeln!(out, "listening on udp {addr}")?;
    writeln!(out, "fingerprint {}", identity.fingerprint())?;
    for note in notes {
        writeln!(out, "{note}")?;
    }
    out.flush()?;
    drop(out);
    let (first, second) = (signals.clone(), signals);
    server::run_until(
        endpoint,
        config,
        async move {
            let _ = first.clone().wait_for(|n| *n >= 1).await;
        },
        async move {
            let _ = second.clone().wait_for(|n| *n >= 2).await;
        },
    )
    .await;
    Ok(ExitCode::SUCCESS)
}

/// Builds the server's allowlist: `<certs>/authorized_clients` (after adding
/// any `--allow`), plus this user's own client identity so that `qxfer serve`
/// and `qxfer put` work together on one machine with no setup; or everyone
/// with `--open`. What it did goes into `notes`, printed after the banner.
fn authorized_clients(args: &ServeArgs, notes: &mut Vec<String>) -> Result<Arc<AuthorizedClients>> {
    let file = args.certs.join(AUTHORIZED_CLIENTS);
    for fp in &args.allow {
        let added = AuthorizedClients::append(&file, *fp, "added by qxfer serve --allow")?;
        notes.push(if added {
            format!("authorized client {fp} (added to {})", file.display())
        } else {
            format!("client {fp} was already authorized in {}", file.display())
        });
    }
    if args.open {
        notes.push("*** --open: ANY client that can reach this port may read, write and overwrite files in the root. Use only on a network you trust. ***".to_owned());
        return Ok(Arc::new(AuthorizedClients::new(&file, Vec::new(), true)));
    }
    // The server user's own client identity, created now if needed, so the
    // quick start works whichever command runs first.
    let own = match config_dir().and_then(|dir| {
        Identity::load_or_generate(&dir, CLIENT_IDENTITY)
            .with_context(|| format!("client identity in {}", dir.display()))
    }) {
        Ok(id) => vec![id.fingerprint()],
        Err(e) => {
            notes.push(format!(
                "not admitting this user's own client identity: {e:#}"
            ));
            Vec::new()
        }
    };
    let list = AuthorizedClients::new(&file, own.clone(), false);
    notes.push(format!(
        "admitting {} client(s) listed in {} (re-read when it changes){}",
        list.len(),
        file.display(),
        own.first()
            .map(|fp| format!(" and this user's own client identity {fp}"))
            .unwrap_or_default()
    ));
    Ok(Arc::new(list))
}

/// Installs the Ctrl-C and SIGTERM handlers now (so a signal that arrives
/// right after the banner is not lost to the default action) and returns
/// the count of signals received so far: the first asks for a graceful
/// stop, the second for an immediate one.
fn shutdown_signals() -> Result<tokio::sync::watch::Receiver<u32>> {
    let (count, received) = tokio::sync::watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                count.send_modify(|n| *n += 1);
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            count.send_modify(|n| *n += 1);
        }
    });
    Ok(received)
}

/// The client's config directory: `QXFER_CONFIG_DIR`, else the platform's config dir plus `qxfer`.
pub fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("QXFER_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("qxfer"))
        .context("cannot find a config directory; set QXFER_CONFIG_DIR")
}

/// Where downloads go by default: the platform's download dir, else `~/Downloads`.
pub fn downloads_dir() -> Result<PathBuf> {
    dirs::download_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join("Downloads")))
        .context("cannot find a Downloads folder; pass -o DIR")
}

async fn connect(
    args: &ClientArgs,
    transfer: Option<&TransferArgs>,
    quiet: bool,
    progress: &Progress,
) -> Result<Client> {
    let dir = config_dir()?;
    let file = ClientFile::load(&dir)?;
    let (server, pin) = match file.named(&args.server) {
        // An explicit --pin wins over the file's.
        Some(named) => (named.address.clone(), args.pin.or(named.pin)),
        None => (args.server.clone(), args.pin),
    };
    let config = ClientConfig {
        server: server.clone(),
        pin,
        config_dir: dir,
        transport: args.transport.clone(),
        resume: !transfer.is_some_and(|t| t.no_resume),
        limit_rate: transfer.and_then(|t| t.limit_rate),
        compression: transfer.map_or(Compression::Auto, |t| t.compress),
        delta: transfer.is_some_and(|t| t.sync),
        reply_timeout: args.timeout,
        connect_timeout: args.connect_timeout,
    };
    let client = match Client::connect(&config).await {
        Ok(c) => c,
        // A word that is neither a name in the file nor a host: say both.
        Err(e @ ConnectError::Resolve { .. }) if !args.server.contains(['.', ':']) => {
            let known: Vec<&str> = file.servers.keys().map(String::as_str).collect();
            let names = if known.is_empty() {
                "it names none".to_owned()
            } else {
                format!("names there: {}", known.join(", "))
            };
            return Err(anyhow::Error::new(e).context(format!(
                "unknown server name '{}': not defined in {} ({names}; see `qxfer servers`), and no host has that name",
                args.server,
                file.path.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some((fp, known)), false) = (&client.first_contact, quiet) {
        progress.suspend(|| {
            eprintln!(
                "qxfer: first contact with {server}: trusting its fingerprint {fp} from now on (saved in {})",
                known.display()
            )
        });
    }
    Ok(client)
}

async fn put(args: PutArgs, quiet: bool, verbose: bool, progress: &Progress) -> Result<ExitCode> {
    if reads_stdin(&args) {
        return put_from_stdin(args, quiet, progress).await;
    }
    if args.files.iter().any(|f| f.as_os_str() == "-") {
        eprintln!("qxfer: error: - (standard input) comes first and alone: qxfer put - NAME; a local file named '-' is ./-");
        return Ok(ExitCode::from(exit::USAGE));
    }
    let filter = Filter::new(&args.transfer.exclude, &args.transfer.exclude_from)?;
    let mut tree = Tree::default();
    let mut bad = Vec::new();
    for file in &args.files {
        let Some(name) = file_name(file) else {
            bad.push(format!("{}: has no usable file name", file.display()));
            continue;
        };
        let remote = join_remote(args.to.as_deref(), &name);
        let is_dir = std::fs::symlink_metadata(file).is_ok_and(|m| m.is_dir());
        if is_dir && !args.recursive {
            bad.push(format!(
                "{}: is a directory; use -r to upload it and everything in it",
                file.display()
            ));
        } else if is_dir {
            match tree::walk_local(file, &remote, &name, &filter) {
                Ok(t) => tree.extend(t),
                Err(e) => bad.push(e.to_string()),
            }
        } else {
            tree.jobs.push(Job {
                label: file.display().to_string(),
                local: file.clone(),
                remote,
                size_hint: None,
                within: None,
            });
        }
    }
    report_skipped(&tree.skipped, quiet, progress);
    report_excluded(&tree.excluded, verbose, progress);
    bad.extend(tree.failed.iter().cloned());
    let client = connect(&args.client, Some(&args.transfer), quiet, progress).await?;
    if args.transfer.dry_run {
        let plan = dry_run(
            &client,
            Direction::Put,
            &tree.jobs,
            args.force,
            args.transfer.sync,
            args.transfer.checksum,
        )
        .await;
        let deletes = if args.transfer.delete {
            tree::remote_extras(&client, &tree, &filter)
                .await
                .map(|e| e.paths)
        } else {
            Ok(Vec::new())
        };
        client.close().await;
        return finish_dry_run(
            "put",
            plan?,
            &deletes?,
            &tree.excluded,
            bad,
            args.json,
            quiet,
        );
    }
    let planned = tree.clone();
    let (jobs, unchanged, listed) =
        quick_check(&client, Direction::Put, &args.transfer, tree.jobs, &mut bad).await?;
    // A re-sync leaves directories that match on the server alone (unless
    // --delete may remove something in them).
    let (dirs, all_exist) = match &listed {
        Some(remote) if !args.transfer.delete => tree::dirs_to_finish(&tree.dirs, remote, &jobs),
        _ => (tree.dirs.clone(), false),
    };
    let replace = args.force || args.transfer.sync;
    let (client, mut report) = Batch::new(Direction::Put, args.parallel, replace, quiet)
        .run_resilient(client, jobs, &args.client, &args.transfer, progress)
        .await?;
    // Deletions first, so that the directory times applied next stick.
    if args.transfer.delete && client.refusal().is_none() {
        let all_arrived = report.failed.is_empty() && bad.is_empty();
        let failed = delete_remote(&client, &planned, &filter, all_arrived, quiet, progress).await;
        report.failed.extend(failed);
    }
    if !dirs.is_empty() {
        report
            .failed
            .extend(tree::finish_remote_dirs(&client, &dirs, all_exist).await);
    }
    if let Some(refused) = client.refusal() {
        progress.finish();
        return Err(refused.into());
    }
    client.close().await;
    finish_batch("put", report, &unchanged, bad, args.json, quiet, progress)
}

/// Whether a put uploads standard input (`qxfer put - NAME`).
fn reads_stdin(args: &PutArgs) -> bool {
    args.files.first().is_some_and(|f| f.as_os_str() == "-")
}

/// `qxfer put - NAME`: standard input, until it ends, under NAME (placed
/// in --to DIR if given). Its length is unknown until the end, so there
/// is no resume: an interrupted or failed run leaves nothing on the
/// server, and the pipeline must run again.
async fn put_from_stdin(args: PutArgs, quiet: bool, progress: &Progress) -> Result<ExitCode> {
    let usage = |why: &str| -> Result<ExitCode> {
        eprintln!("qxfer: error: put - {why}");
        Ok(ExitCode::from(exit::USAGE))
    };
    let name = match args.files.as_slice() {
        [_, name] => name,
        [_] => return usage("needs the name to store standard input under: qxfer put - NAME"),
        _ => return usage("uploads standard input under one name: qxfer put - NAME (a local file named '-' is ./-)"),
    };
    let Some(name) = name.to_str() else {
        return usage("NAME must be UTF-8");
    };
    if name.is_empty() {
        return usage("needs a NAME that is not empty");
    }
    let t = &args.transfer;
    if args.recursive || t.delete || !t.exclude.is_empty() || !t.exclude_from.is_empty() {
        return usage("uploads one stream: -r, --delete and --exclude apply to directories");
    }
    let remote = join_remote(args.to.as_deref(), name);
    let label = format!("- (standard input) as {remote}");
    let client = connect(&args.client, Some(&args.transfer), quiet, progress).await?;
    if t.dry_run {
        // As a put of a file of unknown size and mtime: nothing reads
        // standard input, so "skip" never applies.
        let job = Job {
            label,
            local: PathBuf::new(),
            remote,
            size_hint: None,
            within: None,
        };
        let plan = dry_run(&client, Direction::Put, &[job], args.force, false, false).await;
        client.close().await;
        return finish_dry_run("put", plan?, &[], &[], Vec::new(), args.json, quiet);
    }
    let stdin = std::io::stdin();
    crate::exchange::widen_pipe(&stdin);
    if stdin.is_terminal() && !quiet {
        progress.suspend(|| eprintln!("qxfer: reading standard input (a terminal) until Ctrl-D"));
    }
    let bar = progress.pipe_bar(&label);
    let started = std::time::Instant::now();
    let result = client.put_stream(stdin, &remote, args.force, &bar).await;
    let before_any = bar.position() == 0;
    bar.finish();
    if let Some(refused) = client.refusal() {
        progress.finish();
        return Err(refused.into());
    }
    client.close().await;
    let mut report = BatchReport {
        done: Vec::new(),
        failed: Vec::new(),
        retry: Vec::new(),
        elapsed: started.elapsed(),
    };
    let (errors, lost) = match result {
        Ok(mut r) => {
            r.seconds = report.elapsed.as_secs_f64();
            report.done.push(r);
            (Vec::new(), false)
        }
        Err(e) => {
            let msg = e.to_string();
            let mut error = if msg.contains(&remote) || msg.contains("standard input") {
                msg
            } else {
                format!("{label}: {msg}")
            };
            // What the server refused or failed, it says itself (and it
            // kept nothing); an upload cut short must start over; one whose
            // answer went missing may have been saved (the error says so).
            if e.is_transient() {
                error.push_str("; nothing was saved on the server (a piped upload cannot resume: run the pipeline again)");
            } else if !matches!(e, FileError::Unconfirmed { .. }) && !error.contains("saved") {
                error.push_str("; nothing was saved on the server");
            }
            (vec![error], e.is_transient() && before_any)
        }
    };
    let code = finish_batch(
        "put",
        report,
        &Unchanged::default(),
        errors,
        args.json,
        quiet,
        progress,
    )?;
    // As for any transfer: a connection lost before anything moved is
    // exit code 3; a failure once data moved is 1.
    Ok(if lost {
        ExitCode::from(exit::CONNECTION)
    } else {
        code
    })
}

/// The last component of a local path in its wire form (bytes that are
/// not UTF-8 escaped: see paths.rs; `.` and `..` resolved, so `put -r .`
/// uploads the current directory under its own name).
fn file_name(path: &Path) -> Option<String> {
    if let Some(n) = path.file_name() {
        return Some(crate::paths::name_to_wire(n));
    }
    let abs = std::fs::canonicalize(path).ok()?;
    Some(crate::paths::name_to_wire(abs.file_name()?))
}

/// Prints a dry run's plan: one line per file on stdout (`send`, `skip`,
/// `refuse`, `exclude`), or JSON with --json, and a summary on stderr.
/// Exits as the real run would: 1 if it would refuse a file or fail an
/// argument.
fn finish_dry_run(
    verb: &str,
    plan: Vec<Planned>,
    deletes: &[(String, bool)],
    excluded: &[String],
    bad: Vec<String>,
    json: bool,
    quiet: bool,
) -> Result<ExitCode> {
    let count = |a: Action| plan.iter().filter(|p| p.action == a).count();
    let (send, skip, refuse) = (
        count(Action::Send),
        count(Action::Skip),
        count(Action::Refuse),
    );
    // The real run deletes only when every file arrives.
    let would_delete = refuse == 0 && bad.is_empty();
    let held_back = !would_delete && !deletes.is_empty();
    let deletes = if would_delete { deletes } else { &[] };
    let bytes: u64 = plan
        .iter()
        .filter(|p| p.action == Action::Send)
        .filter_map(|p| p.size)
        .sum();
    // Deltas send only what changed: their bytes are an upper bound.
    let (deltas, delta_bytes) = plan
        .iter()
        .filter(|p| p.action == Action::Send && p.delta)
        .fold((0usize, 0u64), |(n, b), p| (n + 1, b + p.size.unwrap_or(0)));
    if json {
        let deleted: Vec<String> = deletes
            .iter()
            .map(|(p, d)| if *d { format!("{p}/") } else { p.clone() })
            .collect();
        let doc = serde_json::json!({
            "dry_run": true,
            "files": plan,
            "delete": deleted,
            "excluded": excluded,
            "errors": bad,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        // What --delete would remove comes first, to be checked first.
        for (path, is_dir) in deletes {
            println!("delete  {path}{}", if *is_dir { "/" } else { "" });
        }
        if held_back && !quiet {
            eprintln!("qxfer: --delete would remove nothing: the run would refuse files, and deletes only when every file arrives");
        }
        for p in &plan {
            let action = match p.action {
                Action::Send => "send",
                Action::Skip => "skip",
                Action::Refuse => "refuse",
            };
            let delta = if p.delta {
                "; as a delta: only changed chunks cross"
            } else {
                ""
            };
            match &p.reason {
                Some(why) => println!("{action:<7} {}  ({why}{delta})", p.name),
                None => println!("{action:<7} {}", p.name),
            }
        }
        for e in excluded {
            println!("exclude {e}");
        }
    }
    for e in &bad {
        eprintln!("qxfer: error: {e}");
    }
    if !quiet {
        let deltas = if deltas > 0 {
            format!(
                "; {deltas} of them ({}) as deltas, of which only the changed chunks cross",
                indicatif::BinaryBytes(delta_bytes)
            )
        } else {
            String::new()
        };
        eprintln!(
            "qxfer: dry run, nothing moved: {verb} would send {send} file{} ({}{deltas}), skip {skip}, refuse {refuse}, delete {}; {} excluded",
            if send == 1 { "" } else { "s" },
            indicatif::BinaryBytes(bytes),
            deletes.len(),
            excluded.len()
        );
    }
    Ok(if refuse + bad.len() > 0 {
        ExitCode::from(exit::SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// `--delete` after a put: removes on the server what the uploaded trees
/// no longer have, if every file arrived (else says nothing was removed).
/// Returns the failures.
async fn delete_remote(
    client: &Client,
    planned: &Tree,
    filter: &Filter,
    all_arrived: bool,
    quiet: bool,
    progress: &Progress,
) -> Vec<(String, FileError)> {
    if !all_arrived {
        report_not_deleted(quiet, progress);
        return Vec::new();
    }
    let extras = match tree::remote_extras(client, planned, filter).await {
        Ok(extras) => extras,
        Err(e) => return vec![("--delete".to_owned(), e)],
    };
    let mut failed = Vec::new();
    for (path, is_dir) in extras.paths {
        match client.remove(&path, is_dir).await {
            Ok(()) => report_deleted(&path, is_dir, quiet, progress),
            Err(e) => failed.push((path, e)),
        }
    }
    failed
}

/// `--delete` after a get: removes locally what the server's trees no
/// longer have, if every file arrived. Returns the failures.
fn delete_local(
    planned: &Tree,
    filter: &Filter,
    all_arrived: bool,
    quiet: bool,
    progress: &Progress,
) -> Vec<(String, FileError)> {
    if !all_arrived {
        report_not_deleted(quiet, progress);
        return Vec::new();
    }
    let extras = match tree::local_extras(planned, filter) {
        Ok(extras) => extras,
        Err(e) => return vec![("--delete".to_owned(), e)],
    };
    let mut failed = Vec::new();
    for extra in extras {
        // Through a handle on its directory, reached from the top without
        // following a link (one swapped in since the walk is refused), and
        // following none inside: remove_dir_all removes links as links.
        let shown = extra.path.display().to_string();
        match crate::client::remove_below(&extra.top, &extra.path, extra.is_dir) {
            Ok(()) => report_deleted(&shown, extra.is_dir, quiet, progress),
            Err(e) => failed.push((shown, e)),
        }
    }
    failed
}

fn report_not_deleted(quiet: bool, progress: &Progress) {
    if !quiet {
        progress.suspend(|| {
            eprintln!("qxfer: --delete: nothing removed, since not every file arrived")
        });
    }
}

/// Says what --delete removed (unless -q).
fn report_deleted(path: &str, is_dir: bool, quiet: bool, progress: &Progress) {
    if !quiet {
        let slash = if is_dir { "/" } else { "" };
        progress.suspend(|| eprintln!("qxfer: deleted {path}{slash}"));
    }
}

/// With -v, lists what --exclude left out.
fn report_excluded(excluded: &[String], verbose: bool, progress: &Progress) {
    if !verbose || excluded.is_empty() {
        return;
    }
    progress.suspend(|| {
        for e in excluded {
            eprintln!("qxfer: excluded {e}");
        }
    });
}

/// Tells the user what a tree walk left out (symlinks, special files).
fn report_skipped(skipped: &[String], quiet: bool, progress: &Progress) {
    if quiet || skipped.is_empty() {
        return;
    }
    progress.suspend(|| {
        for s in skipped {
            eprintln!("qxfer: {s}");
        }
    });
}

async fn get(args: GetArgs, quiet: bool, verbose: bool, progress: &Progress) -> Result<ExitCode> {
    if args.output.as_deref() == Some(Path::new("-")) {
        return get_to_stdout(args, quiet, progress).await;
    }
    let filter = Filter::new(&args.transfer.exclude, &args.transfer.exclude_from)?;
    let out_dir = match args.output {
        Some(dir) => dir,
        None => downloads_dir()?,
    };
    if !args.transfer.dry_run {
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("cannot create the download folder {}", out_dir.display()))?;
    }
    let client = connect(&args.client, Some(&args.transfer), quiet, progress).await?;
    let mut tree = Tree::default();
    let mut bad = Vec::new();
    for name in &args.names {
        let Some(base) = local_name(name) else {
            bad.push(format!("{name}: does not name a file"));
            continue;
        };
        let local = out_dir.join(base);
        if args.recursive {
            match remote_dir_meta(&client, name).await {
                Ok(Some(meta)) => match client.list_tree(name).await {
                    Ok(entries) => {
                        tree.extend(tree::from_listing(&entries, name, &local, meta, &filter));
                        continue;
                    }
                    Err(e) => {
                        bad.push(format!("{name}: {e}"));
                        continue;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    bad.push(format!("{name}: {e}"));
                    continue;
                }
            }
        }
        tree.jobs.push(Job {
            label: name.clone(),
            local,
            remote: name.clone(),
            size_hint: None,
            within: None,
        });
    }
    report_skipped(&tree.skipped, quiet, progress);
    report_excluded(&tree.excluded, verbose, progress);
    bad.extend(tree.failed.iter().cloned());
    if args.transfer.dry_run {
        let plan = dry_run(
            &client,
            Direction::Get,
            &tree.jobs,
            args.force,
            args.transfer.sync,
            args.transfer.checksum,
        )
        .await;
        client.close().await;
        let deletes = if args.transfer.delete {
            tree::local_extras(&tree, &filter)?
                .into_iter()
                .map(|e| (e.path.display().to_string(), e.is_dir))
                .collect()
        } else {
            Vec::new()
        };
        return finish_dry_run(
            "get",
            plan?,
            &deletes,
            &tree.excluded,
            bad,
            args.json,
            quiet,
        );
    }
    let planned = tree.clone();
    let mut failed_dirs = tree::create_local_dirs(&tree.dirs);
    let (jobs, unchanged, _) =
        quick_check(&client, Direction::Get, &args.transfer, tree.jobs, &mut bad).await?;
    let replace = args.force || args.transfer.sync;
    let (client, mut report) = Batch::new(Direction::Get, args.parallel, replace, quiet)
        .run_resilient(client, jobs, &args.client, &args.transfer, progress)
        .await?;
    // Deletions first, so that the directory times applied next stick.
    if args.transfer.delete && client.refusal().is_none() {
        let all_arrived = report.failed.is_empty() && failed_dirs.is_empty() && bad.is_empty();
        report.failed.extend(delete_local(
            &planned,
            &filter,
            all_arrived,
            quiet,
            progress,
        ));
    }
    failed_dirs.extend(tree::finish_local_dirs(&tree.dirs));
    report.failed.extend(failed_dirs);
    if let Some(refused) = client.refusal() {
        progress.finish();
        return Err(refused.into());
    }
    client.close().await;
    finish_batch("got", report, &unchanged, bad, args.json, quiet, progress)
}

/// `qxfer get NAME -o -`: the file to standard output, verified; bars and
/// messages on stderr only.
async fn get_to_stdout(args: GetArgs, quiet: bool, progress: &Progress) -> Result<ExitCode> {
    let usage = |why: &str| -> Result<ExitCode> {
        eprintln!("qxfer: error: -o - {why}");
        Ok(ExitCode::from(exit::USAGE))
    };
    if args.names.len() != 1 {
        return usage("writes one file to standard output; name exactly one");
    }
    if args.recursive || args.transfer.delete {
        return usage("writes one file; -r and --delete need a directory (-o DIR)");
    }
    if args.json || args.transfer.dry_run {
        return usage(
            "keeps standard output for the file's bytes: --json and --dry-run do not apply",
        );
    }
    let name = &args.names[0];
    let client = connect(&args.client, Some(&args.transfer), quiet, progress).await?;
    let watch: Arc<dyn Watch> = Arc::new(progress.clone());
    let bar = watch.file(name, 0, false);
    let started = std::time::Instant::now();
    let result = client.get_to_stdout(name, &*bar).await;
    bar.finish();
    progress.finish();
    if let Some(refused) = client.refusal() {
        return Err(refused.into());
    }
    client.close().await;
    match result {
        Ok(r) => {
            if !quiet {
                eprintln!(
                    "{}",
                    summary(
                        "got",
                        1,
                        r.bytes,
                        r.bytes_sent,
                        started.elapsed().as_secs_f64()
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Nothing of a download to standard output can be resumed: what
            // went out is already in the reader's hands.
            let mut line = named(name, &e);
            if e.is_transient() {
                line.push_str(" (the server may be down or unreachable); what was written to standard output is incomplete: discard it and run the command again");
            }
            eprintln!("qxfer: error: {line}");
            Ok(ExitCode::from(exit::SOME_FAILED))
        }
    }
}

/// One failed file, for the user: named once (most errors already name
/// it), and for a failure of the connection, what to do about it.
fn file_error(label: &str, e: &FileError) -> String {
    let mut line = named(label, e);
    if e.is_transient() {
        line.push_str(
            " (the server may be down or unreachable; run the same command again to resume)",
        );
    }
    line
}

/// An error's message, with `label` in front unless it names it already.
fn named(label: &str, e: &FileError) -> String {
    let msg = e.to_string();
    if msg.contains(label) {
        msg
    } else {
        format!("{label}: {msg}")
    }
}

/// How a put or get batch runs.
struct Batch {
    direction: Direction,
    parallel: usize,
    force: bool,
    quiet: bool,
}

impl Batch {
    fn new(direction: Direction, parallel: impl Into<usize>, force: bool, quiet: bool) -> Self {
        Self {
            direction,
            parallel: parallel.into(),
            force,
            quiet,
        }
    }

    /// Runs `jobs`; while some fail for the connection's sake (see
    /// [`crate::client::FileError::is_transient`]), reconnects with backoff
    /// and runs those again, up to `--retries` times. Each file resumes
    /// where it stopped (the server keeps the partial of an upload, the
    /// client that of a download), so a retry sends only the rest. Returns
    /// the last connection and the merged report.
    async fn run_resilient(
        &self,
        mut client: Client,
        jobs: Vec<Job>,
        args: &ClientArgs,
        transfer: &TransferArgs,
        progress: &Progress,
    ) -> Result<(Client, BatchReport)> {
        let watch: Arc<dyn Watch> = Arc::new(progress.clone());
        let mut report = run_batch(
            &client,
            self.direction,
            jobs,
            self.parallel,
            self.force,
            &watch,
        )
        .await;
        let mut backoff = Backoff::default();
        for attempt in 1..=transfer.retries {
            if report.retry.is_empty() || client.refusal().is_some() {
                break;
            }
            let retry = std::mem::take(&mut report.retry);
            let why = client.lost().unwrap_or_else(|| {
                let first = report.failed.iter().find(|(l, _)| *l == retry[0].label);
                first.map_or_else(String::new, |(_, e)| e.to_string())
            });
            if !self.quiet {
                progress.suspend(|| {
                    eprintln!(
                        "qxfer: {why}; reconnecting in {:.1} s to resume {} file(s) (attempt {attempt} of {})",
                        backoff.next.as_secs_f64(),
                        retry.len(),
                        transfer.retries
                    )
                });
            }
            progress.set_status(format!("reconnecting (attempt {attempt})"));
            backoff.wait().await;
            let fresh = match connect(args, Some(transfer), self.quiet, progress).await {
                Ok(fresh) => fresh,
                Err(e) if is_transient_connect(&e) => {
                    if !self.quiet {
                        progress.suspend(|| eprintln!("qxfer: {e:#}"));
                    }
                    report.retry = retry;
                    continue;
                }
                Err(e) => return Err(e),
            };
            client.close().await;
            client = fresh;
            // The files to run again leave the failures; what fails again returns.
            report
                .failed
                .retain(|(label, _)| !retry.iter().any(|j| j.label == *label));
            let again = run_batch(
                &client,
                self.direction,
                retry,
                self.parallel,
                self.force,
                &watch,
            )
            .await;
            report.done.extend(again.done);
            report.failed.extend(again.failed);
            report.retry = again.retry;
            report.elapsed += again.elapsed;
        }
        // Retries spent: what still failed for the connection's sake says
        // why the connection ended, if it did ("the server is shutting
        // down"), rather than only "connection lost".
        if let Some(why) = client.lost() {
            for (label, e) in &mut report.failed {
                if report.retry.iter().any(|j| j.label == *label) {
                    let detail = match &*e {
                        FileError::Transfer { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    *e = FileError::Protocol(format!("{why}; {detail}"));
                }
            }
        }
        Ok((client, report))
    }
}

/// The wait before each reconnection: 0.5 s, doubling, at most 10 s.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// Waits the current delay and doubles the next one.
    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Duration::from_secs(10));
    }
}

/// Whether a failed reconnection is worth another try: the server is
/// down, restarting, draining or busy, not refusing this client for good.
fn is_transient_connect(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ConnectError>(),
        Some(
            ConnectError::Unreachable { .. }
                | ConnectError::Busy { .. }
                | ConnectError::TooManyFromClient { .. }
                | ConnectError::Connection { .. }
        )
    )
}

/// If the remote `name` is a directory, its metadata (from a listing of
/// its parent); `None` if it is anything else.
async fn remote_dir_meta(client: &Client, name: &str) -> Result<Option<DirMeta>> {
    let trimmed = name.trim_end_matches('/');
    let (parent, base) = match trimmed.rsplit_once('/') {
        Some((p, b)) => (p, b),
        None => ("", trimmed),
    };
    let entries = client.list(parent).await?;
    Ok(entries
        .iter()
        .find(|e| e.name == base && e.kind == EntryKind::Dir)
        .map(|e| DirMeta {
            mode: e.mode,
            mtime: e.mtime,
        }))
}

/// The local file name for a remote path: its last component as bytes
/// (escapes undone, paths.rs), if that is a plain name (never `..`, so a
/// download stays in the output folder).
fn local_name(remote: &str) -> Option<std::ffi::OsString> {
    let base = remote.trim_end_matches('/').rsplit('/').next()?;
    match base {
        "" | "." | ".." => None,
        b => crate::paths::name_from_wire(b),
    }
}

/// `--sync`'s quick check (rsync's): of `jobs`, those whose size and
/// mtime (with `--checksum`, BLAKE3) match the other side's are left
/// alone; the rest run, replacing what differs. One listing of each tree
/// decides. Files the run would refuse (a directory or link in the way)
/// are reported in `bad` and not run. Those left alone whose mtime or
/// mode differ from their source's take the source's. Returns the jobs to
/// run, those left alone and the listing: without --sync, every job, none
/// and none.
async fn quick_check(
    client: &Client,
    direction: Direction,
    transfer: &TransferArgs,
    jobs: Vec<Job>,
    bad: &mut Vec<String>,
) -> Result<(Vec<Job>, Unchanged, Option<HashMap<String, Entry>>)> {
    if !transfer.sync {
        return Ok((jobs, Unchanged::default(), None));
    }
    let (plan, listed) =
        plan_with_listing(client, direction, &jobs, false, true, transfer.checksum).await?;
    let mut run = Vec::with_capacity(jobs.len());
    let mut unchanged = Vec::new();
    let mut fixes = Vec::new();
    for (job, planned) in jobs.into_iter().zip(plan) {
        match planned.action {
            Action::Send => run.push(job),
            Action::Skip => {
                unchanged.push(job.label.clone());
                if let Some(fix) = planned.fix {
                    fixes.push((job, fix));
                }
            }
            Action::Refuse => bad.push(format!(
                "{}: {}",
                job.label,
                planned.reason.as_deref().unwrap_or("refused")
            )),
        }
    }
    // Left alone, but with the source's mtime and mode (rsync -a does the
    // same): without it a --checksum run would leave the times apart, and
    // every later quick check would see the file as changed.
    let (meta_set, failed) = fix_meta(client, direction, fixes).await;
    bad.extend(failed);
    Ok((
        run,
        Unchanged {
            labels: unchanged,
            meta_set,
        },
        Some(listed),
    ))
}

/// The files `--sync` left alone, and those of them that took their
/// source's mtime or mode.
#[derive(Default)]
struct Unchanged {
    labels: Vec<String>,
    meta_set: Vec<String>,
}

fn finish_batch(
    verb: &str,
    report: BatchReport,
    unchanged: &Unchanged,
    mut errors: Vec<String>,
    json: bool,
    quiet: bool,
    progress: &Progress,
) -> Result<ExitCode> {
    progress.finish();
    errors.extend(report.failed.iter().map(|(label, e)| file_error(label, e)));
    if !quiet {
        for note in report.done.iter().flat_map(|r| &r.notes) {
            eprintln!("qxfer: note: {note}");
        }
        if !unchanged.labels.is_empty() {
            let fixed = match unchanged.meta_set.len() {
                0 => String::new(),
                n => format!(" ({n} of them given the source's mtime or mode)"),
            };
            eprintln!(
                "qxfer: {} file(s) unchanged (same size and mtime, or BLAKE3 with --checksum); left alone{fixed}",
                unchanged.labels.len()
            );
        }
        let present = report.done.iter().filter(|r| r.already_there).count();
        if present > 0 {
            eprintln!(
                "qxfer: {present} file(s) were already there with the same contents (BLAKE3 on both sides); nothing was sent for them"
            );
        }
        for r in report
            .done
            .iter()
            .filter(|r| r.resumed_from > 0 && !r.already_there)
        {
            eprintln!(
                "qxfer: {}: resumed, {} of {} bytes were already there",
                r.name, r.resumed_from, r.bytes
            );
        }
    }
    let bytes: u64 = report.done.iter().map(|r| r.bytes).sum();
    let sent: u64 = report.done.iter().map(|r| r.bytes_sent).sum();
    let wire: u64 = report.done.iter().map(|r| r.wire_bytes).sum();
    if json {
        let doc = serde_json::json!({
            "files": report.done,
            "unchanged": unchanged.labels,
            "meta_set": unchanged.meta_set,
            "errors": errors,
            "bytes": bytes,
            "bytes_sent": sent,
            "wire_bytes": wire,
            "seconds": report.elapsed.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    if !quiet {
        eprintln!(
            "{}",
            summary(
                verb,
                report.done.len(),
                bytes,
                sent,
                report.elapsed.as_secs_f64()
            )
        );
    }
    if errors.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for e in &errors {
        eprintln!("qxfer: error: {e}");
    }
    eprintln!(
        "qxfer: {} of {} files failed",
        errors.len(),
        errors.len() + report.done.len()
    );
    Ok(ExitCode::from(exit::SOME_FAILED))
}

async fn ls(args: LsArgs) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let mut backoff = Backoff::default();
    let mut attempt = 0;
    let listed = loop {
        // An unreachable server fails at once, as for every command; only
        // a connection lost before the listing arrived is tried again.
        let client = connect(&args.client, None, false, &progress).await?;
        let listed = if args.recursive {
            client.list_tree(&args.dir).await
        } else {
            client.list(&args.dir).await
        };
        if let Some(refused) = client.refusal() {
            return Err(refused.into());
        }
        match listed {
            Err(e) if attempt < args.retries && e.is_transient() => {
                attempt += 1;
                let why = client.lost().unwrap_or_else(|| e.to_string());
                eprintln!(
                    "qxfer: {why}; reconnecting in {:.1} s (attempt {attempt} of {})",
                    backoff.next.as_secs_f64(),
                    args.retries
                );
                client.close().await;
                backoff.wait().await;
            }
            done => {
                client.close().await;
                break done;
            }
        }
    };
    let entries = match listed {
        Ok(e) => e,
        Err(e) => bail!("{}: {e}", if args.dir.is_empty() { "/" } else { &args.dir }),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
    } else {
        for e in &entries {
            writeln!(out, "{}", format_entry(e))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One `ls` line: kind, size, modification time (UTC), name (`/` after directories).
pub fn format_entry(e: &Entry) -> String {
    let kind = match e.kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Other => '?',
    };
    let mtime = e
        .mtime
        .and_then(to_system_time)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".repeat(20));
    let slash = if e.kind == EntryKind::Dir { "/" } else { "" };
    // Shown, not raw: a name's control characters or bytes that are not
    // UTF-8 are escaped and the name quoted (paths.rs); --json gives the
    // wire form.
    let name = crate::paths::shown(&e.name);
    format!("{kind} {:>14} {mtime} {name}{slash}", e.size)
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

    #[test]
    fn local_names_stay_in_the_output_folder() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(local_name("a/b.txt"), some("b.txt"));
        assert_eq!(local_name("b.txt"), some("b.txt"));
        assert_eq!(local_name("a/.."), None);
        assert_eq!(local_name(""), None);
        assert_eq!(local_name("dir/"), some("dir"));
        assert_eq!(
            local_name("a\\b"),
            some("a\\b"),
            "a backslash is a plain byte"
        );
        assert_eq!(
            local_name("caf\u{FDDE}\u{FDE9}"),
            Some(std::os::unix::ffi::OsStringExt::from_vec(
                b"caf\xe9".to_vec()
            ))
        );
        assert_eq!(
            local_name("x\u{FDD2}"),
            None,
            "not the one form of any name"
        );
    }

    #[test]
    fn entries_format_like_ls() {
        let e = Entry {
            name: "x".into(),
            kind: EntryKind::Dir,
            mode: Some(0o755),
            size: 4096,
            mtime: Some(crate::protocol::Timestamp { secs: 0, nanos: 0 }),
        };
        assert_eq!(format_entry(&e), "d           4096 1970-01-01T00:00:00Z x/");
    }
}
