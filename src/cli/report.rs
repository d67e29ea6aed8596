//! What the transfer commands print at the end: summaries, dry-run plans, JSON reports and `ls` lines.

use super::args::TransferArgs;
use super::exit;
use super::progress::{lost_line, summary, Progress};
use super::transfer::Unchanged;
use crate::client::{Action, BatchReport, FileError, PathReport, Planned};
use crate::protocol::Timestamp;
use crate::protocol::{Entry, EntryKind};
use anyhow::Result;
use std::io::Write;
use std::process::ExitCode;

/// Prints a dry run's plan: one line per file on stdout (`send`, `skip`,
/// `refuse`, `exclude`), or JSON with --json, and a summary on stderr.
/// Exits as the real run would: 1 if it would refuse a file or fail an
/// argument.
pub(super) fn finish_dry_run(
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

pub(super) fn report_not_deleted(quiet: bool, progress: &Progress) {
    if !quiet {
        progress.suspend(|| {
            eprintln!("qxfer: --delete: nothing removed, since not every file arrived")
        });
    }
}

/// Says what --delete removed (unless -q).
pub(super) fn report_deleted(path: &str, is_dir: bool, quiet: bool, progress: &Progress) {
    if !quiet {
        let slash = if is_dir { "/" } else { "" };
        progress.suspend(|| eprintln!("qxfer: deleted {path}{slash}"));
    }
}

/// With -v, lists what --exclude left out.
pub(super) fn report_excluded(excluded: &[String], verbose: bool, progress: &Progress) {
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
pub(super) fn report_skipped(skipped: &[String], quiet: bool, progress: &Progress) {
    if quiet || skipped.is_empty() {
        return;
    }
    progress.suspend(|| {
        for s in skipped {
            eprintln!("qxfer: {s}");
        }
    });
}

pub(super) fn finish_batch(
    verb: &str,
    report: BatchReport,
    unchanged: &Unchanged,
    mut errors: Vec<String>,
    out: &TransferArgs,
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
    if out.json {
        // Written as it is serialised: a `json!` value of 100,000 files'
        // reports, then its text, held some 6 KiB a file at once (the
        // client's peak memory grew with the tree for that alone).
        // Top-level keys in the order `json!` gave them.
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            bytes: u64,
            bytes_sent: u64,
            errors: &'a [String],
            files: &'a [crate::client::TransferReport],
            lost_connections: u32,
            meta_set: &'a [String],
            moved_twice: u64,
            path: &'a Option<PathReport>,
            seconds: f64,
            unchanged: &'a [String],
            wire_bytes: u64,
        }
        let doc = Doc {
            bytes,
            bytes_sent: sent,
            errors: &errors,
            files: &report.done,
            lost_connections: report.lost.connections,
            meta_set: &unchanged.meta_set,
            moved_twice: report.lost.twice(),
            path: &report.path,
            seconds: report.elapsed.as_secs_f64(),
            unchanged: &unchanged.labels,
            wire_bytes: wire,
        };
        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer_pretty(&mut stdout, &doc)?;
        writeln!(stdout)?;
        stdout.flush()?;
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
        if let Some(line) = lost_line(&report.lost) {
            eprintln!("{line}");
        }
    }
    if out.stats {
        match &report.path {
            Some(path) => print_path(path),
            None => eprintln!("qxfer: stats: no connection to report on"),
        }
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

/// `--stats`: the path, this side's load, and what limited the transfer.
fn print_path(p: &PathReport) {
    let loss = p.loss.map_or_else(String::new, |l| {
        format!(", {:.2}% of packets lost", l * 100.0)
    });
    let bottleneck = p.bottleneck_mbit.map_or_else(String::new, |b| {
        format!(" (the path's bottleneck ~{b:.0} Mbit/s)")
    });
    eprintln!(
        "qxfer: path: round trip {:.1} ms{loss}, {:.0} Mbit/s on the wire{bottleneck}",
        p.rtt_ms, p.rate_mbit
    );
    let machine = p.machine_busy.map_or_else(String::new, |m| {
        format!(", the machine {:.0}% busy", m * 100.0)
    });
    eprintln!(
        "qxfer: this side: {:.2} cores of CPU{machine}, disk threads busy {:.0}% of the time, {:.1} / {:.1} datagrams per send / receive call",
        p.cpu_cores,
        p.disk_busy * 100.0,
        p.datagrams_per_send,
        p.datagrams_per_receive
    );
    eprintln!("qxfer: limited by {}", p.why);
}

/// One `ls` line: kind, size, modification time (UTC), name (`/` after directories).
pub(super) fn format_entry(e: &Entry) -> String {
    let kind = match e.kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Other => '?',
    };
    let mtime = e
        .mtime
        .and_then(Timestamp::to_system_time)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".repeat(20));
    let slash = if e.kind == EntryKind::Dir { "/" } else { "" };
    // Shown, not raw: a name's control characters or bytes that are not
    // UTF-8 are escaped and the name quoted (paths.rs); --json gives the
    // wire form.
    let name = crate::paths::shown(&e.name);
    format!("{kind} {:>14} {mtime} {name}{slash}", e.size)
}

/// One failed file, for the user: named once (most errors already name
/// it), and for a failure of the connection, what to do about it.
pub(super) fn file_error(label: &str, e: &FileError) -> String {
    let mut line = named(label, e);
    if e.is_transient() {
        line.push_str(
            " (the server may be down or unreachable; run the same command again to resume)",
        );
    }
    line
}

/// An error's message, with `label` in front unless it names it already.
pub(super) fn named(label: &str, e: &FileError) -> String {
    let msg = e.to_string();
    if msg.contains(label) {
        msg
    } else {
        format!("{label}: {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_format_like_ls() {
        let e = Entry {
            name: "x".into(),
            kind: EntryKind::Dir,
            mode: Some(0o755),
            size: 4096,
            mtime: Some(Timestamp { secs: 0, nanos: 0 }),
        };
        assert_eq!(format_entry(&e), "d           4096 1970-01-01T00:00:00Z x/");
    }
}
