//! The command line: parses arguments (args.rs), runs the command, and turns its outcome into an exit code; a thin layer over the library.

mod args;
mod get;
mod manage;
mod progress;
mod put;
mod report;
mod serve;
mod transfer;

use args::{Cli, ClientArgs, Command, TransferArgs};
use get::get;
use manage::{ls, mkdir, mv, rm};
use put::{put, reads_stdin};
use serve::{id, object_store_url, serve, servers};

use crate::client::{
    Client, ClientConfig, ClientFile, ConfigError, ConnectError, FileError, FilterError,
};
use crate::protocol::Compression;
use anyhow::{Context, Result};
use clap::Parser;
use progress::Progress;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Exit codes, as rsync documents its own: scripts tell a file that failed
/// from a server they could not reach or did not trust.
pub(crate) mod exit {
    /// Every file (or the command) succeeded.
    pub(crate) const OK: u8 = 0;
    /// Some files failed; the others finished.
    pub(crate) const SOME_FAILED: u8 = 1;
    /// The command line was wrong (clap's own code for usage errors).
    pub(crate) const USAGE: u8 = 2;
    /// The server could not be reached, was not a qxfer server, was busy,
    /// or the connection failed before anything moved.
    pub(crate) const CONNECTION: u8 = 3;
    /// Trust failed: the server's key changed or did not match --pin, or
    /// the server refused this client's identity.
    pub(crate) const TRUST: u8 = 4;
    /// Stopped by Ctrl-C or SIGTERM (128 + SIGINT); rerun to resume.
    pub(crate) const INTERRUPTED: u8 = 130;
}

/// Parses the command line, runs the command and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    // Before the runtime's threads exist: see tune_allocator.
    if matches!(&cli.command, Command::Serve(a) if object_store_url(a).is_some()) {
        crate::store::object::tune_allocator();
    }
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
        | ConnectError::NotTheSameServer { .. }
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
async fn run(cli: Cli) -> Result<ExitCode> {
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
    let json = matches!(&cli.command, Command::Serve(a) if a.log_format == args::LogFormat::Json);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress.log_writer())
        .with_target(false);
    let _ = if json {
        // For log shippers: one object a line, the span's fields (the
        // client's address, the stream) in it, no colours.
        logs.json().with_current_span(true).try_init()
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).try_init()
    };

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
        ExitCode::from(exit::OK)
    } else {
        ExitCode::from(exit::SOME_FAILED)
    }
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
fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("QXFER_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("qxfer"))
        .context("cannot find a config directory; set QXFER_CONFIG_DIR")
}

/// Where downloads go by default: the platform's download dir, else `~/Downloads`.
fn downloads_dir() -> Result<PathBuf> {
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
    Ok(connect_with(args, transfer, quiet, progress).await?.0)
}

/// Connects as [`connect`] does, and returns the configuration too (to
/// reconnect with after a lost connection).
async fn connect_with(
    args: &ClientArgs,
    transfer: Option<&TransferArgs>,
    quiet: bool,
    progress: &Progress,
) -> Result<(Client, ClientConfig)> {
    let dir = config_dir()?;
    let file = ClientFile::load(&dir)?;
    // Each --server value is a name of config.toml (its addresses) or an
    // address; all of them are one server's addresses (see
    // ClientConfig::failover). An explicit --pin wins over the file's.
    let mut addresses: Vec<String> = Vec::new();
    let mut pin = args.pin;
    for given in &args.server {
        match file.named(given) {
            Some(named) => {
                addresses.extend(named.addresses.iter().cloned());
                pin = pin.or(named.pin);
            }
            None => addresses.push(given.clone()),
        }
    }
    let server = addresses
        .first()
        .cloned()
        .context("--server needs an address or a name")?;
    let failover = addresses.split_off(1);
    let config = ClientConfig {
        server: server.clone(),
        pin,
        config_dir: dir,
        transport: args.transport.opts(),
        resume: !transfer.is_some_and(|t| t.no_resume),
        limit_rate: transfer.and_then(|t| t.limit_rate),
        compression: transfer.map_or(Compression::Auto, |t| t.compress.into()),
        delta: transfer.is_some_and(|t| t.sync),
        reply_timeout: args.timeout,
        connect_timeout: args.connect_timeout,
        failover,
    };
    let client = match Client::connect(&config).await {
        Ok(c) => c,
        // A word that is neither a name in the file nor a host: say both.
        Err(e @ ConnectError::Resolve { .. })
            if args.server.len() == 1 && !args.server[0].contains(['.', ':']) =>
        {
            let known: Vec<&str> = file.servers.keys().map(String::as_str).collect();
            let names = if known.is_empty() {
                "it names none".to_owned()
            } else {
                format!("names there: {}", known.join(", "))
            };
            return Err(anyhow::Error::new(e).context(format!(
                "unknown server name '{}': not defined in {} ({names}; see `qxfer servers`), and no host has that name",
                args.server[0],
                file.path.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    // Named by the address reached (the one known_hosts now holds), which
    // is not the first one given when that one did not answer.
    if let (Some((fp, known)), false) = (&client.first_contact, quiet) {
        progress.suspend(|| {
            eprintln!(
                "qxfer: first contact with {}: trusting its fingerprint {fp} from now on (saved in {})",
                client.server(),
                known.display()
            )
        });
    }
    Ok((client, config))
}
