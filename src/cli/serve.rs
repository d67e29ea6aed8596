//! `qxfer serve`, and the commands about identities and named servers (`id`, `servers`).

use super::args::ServeArgs;
use super::{config_dir, shutdown_signals};
use crate::client::{ClientFile, CLIENT_IDENTITY};
use crate::endpoint::{self, ServerLimits};
use crate::server::{self, ServeConfig};
use crate::tls::{AuthorizedClients, ClientVerifier, Identity, AUTHORIZED_CLIENTS};
use anyhow::{Context, Result};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

/// `qxfer servers`: the names of config.toml, each with its address, its
/// pin and what known_hosts holds for it.
pub(super) fn servers() -> Result<ExitCode> {
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
        let recorded = crate::client::split_server(&s.addresses[0])
            .ok()
            .and_then(|(host, port)| known.lookup(&crate::client::known_hosts_key(&host, port)));
        let pin = s
            .pin
            .map_or_else(|| "no pin".to_owned(), |p| format!("pin {p}"));
        let seen = recorded.map_or_else(
            || "not contacted yet".to_owned(),
            |(fp, _)| format!("known {fp}"),
        );
        println!(
            "{:width$}  {}  {pin}  {seen}",
            s.name,
            s.addresses.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn id() -> Result<ExitCode> {
    let dir = config_dir()?;
    let identity = Identity::load_or_generate(&dir, CLIENT_IDENTITY)
        .with_context(|| format!("client identity in {}", dir.display()))?;
    println!("{}", identity.fingerprint());
    Ok(ExitCode::SUCCESS)
}

/// The object store `serve` serves, if its root is one (`s3://...`).
pub(super) fn object_store_url(args: &ServeArgs) -> Option<&str> {
    args.root.to_str().filter(|r| r.starts_with("s3://"))
}

pub(super) async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut config = match object_store_url(&args) {
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
    let endpoint = endpoint::server_endpoint(
        args.listen,
        &identity,
        verifier,
        &args.transport.opts(),
        &limits,
    )?;
    let addr = endpoint.local_addr().context("reading the bound address")?;
    let exporter = match args.metrics {
        Some(at) => Some(server::Exporter::bind(at).await?),
        None => None,
    };
    let metrics_at = exporter
        .as_ref()
        .map(server::Exporter::local_addr)
        .transpose()?;
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
    if let Some(at) = metrics_at {
        writeln!(
            out,
            "metrics on http://{at}/metrics, health on http://{at}/health"
        )?;
    }
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
        exporter,
    )
    .await;
    Ok(ExitCode::SUCCESS)
}

/// Builds the server's allowlist: `<certs>/authorized_clients` (after adding
/// any `--allow`), plus this user's own client identity so that `qxfer serve`
/// and `qxfer put` work together on one machine with no setup; or everyone
/// with `--open`. What it did goes into `notes`, printed after the banner.
pub(super) fn authorized_clients(
    args: &ServeArgs,
    notes: &mut Vec<String>,
) -> Result<Arc<AuthorizedClients>> {
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
