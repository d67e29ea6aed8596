//! Progress display: one bar per file in flight plus a total bar, and a log
//! writer that prints through the bars so log lines never tear them.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;

/// The client's progress display. Hidden when stderr is not a terminal
/// (indicatif checks) or when asked to be quiet.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
}

/// How often a file's bar redraws (and its rate is sampled).
const TICK: Duration = Duration::from_millis(200);

const FILE_TEMPLATE: &str =
    "{wide_msg} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {eta:>4} [{bar:25.cyan/blue}]";
/// Data of unknown length (`put -`): what moved and how fast, no end in sight.
const PIPE_TEMPLATE: &str =
    "{wide_msg} {bytes:>10} {binary_bytes_per_sec:>12} {elapsed:>4} {spinner:.cyan}";
const TOTAL_TEMPLATE: &str =
    "{prefix:.bold} {wide_msg} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {eta:>4} [{bar:25.green/white}]";

impl Progress {
    /// A display drawing to stderr, or nowhere if `hidden`.
    pub(crate) fn new(hidden: bool) -> Self {
        let target = if hidden {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let multi = MultiProgress::with_draw_target(target);
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(TOTAL_TEMPLATE)
                .expect("valid template")
                .progress_chars("=> "),
        );
        total.set_prefix("total");
        Self { multi, total }
    }

    /// A display that draws nothing (for library callers and tests).
    pub(crate) fn hidden() -> Self {
        Self::new(true)
    }

    /// Adds `bytes` to the total to be moved (sizes become known as files start).
    pub(crate) fn add_total(&self, bytes: u64) {
        self.total.inc_length(bytes);
    }

    /// Sets the total bar's message (e.g. files done of files queued).
    pub(crate) fn set_status(&self, msg: String) {
        self.total.set_message(msg);
    }

    /// A new bar for one file, shown above the total bar. Its progress also
    /// advances the total.
    pub(crate) fn file_bar(&self, name: &str, size: u64) -> FileBar {
        let bar = self
            .multi
            .insert_before(&self.total, ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(FILE_TEMPLATE)
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(name.to_owned());
        // The ticker is a thread: none where nothing is drawn (`-q`).
        if !bar.is_hidden() {
            bar.enable_steady_tick(TICK);
        }
        FileBar {
            bar: Some(bar),
            own: AtomicU64::new(0),
            total: self.total.clone(),
        }
    }

    /// The one bar of an upload from a pipe, whose length nobody knows
    /// until it ends: bytes so far and the rate, and no total bar (it would
    /// only repeat them).
    pub(crate) fn pipe_bar(&self, name: &str) -> FileBar {
        self.total.finish_and_clear();
        let bar = self.multi.add(ProgressBar::no_length());
        bar.set_style(ProgressStyle::with_template(PIPE_TEMPLATE).expect("valid template"));
        bar.set_message(name.to_owned());
        bar.enable_steady_tick(TICK);
        FileBar {
            bar: Some(bar),
            own: AtomicU64::new(0),
            total: ProgressBar::hidden(),
        }
    }

    /// A file that gets no bar of its own (a small file, over in a blink):
    /// its progress only advances the total. No indicatif bar is made for
    /// it, not even a hidden one: making one builds a default style (a
    /// template parsed) and dropping it frees that again, which was 9% of
    /// the client's CPU on a put -r of 50,000 x 1 KiB.
    pub(crate) fn total_only(&self) -> FileBar {
        FileBar {
            bar: None,
            own: AtomicU64::new(0),
            total: self.total.clone(),
        }
    }

    /// Removes the display from the screen.
    pub(crate) fn finish(&self) {
        self.total.finish_and_clear();
        let _ = self.multi.clear();
    }

    /// Runs `f` with the bars hidden, so it can print to the terminal.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.multi.suspend(f)
    }

    /// A tracing writer that prints through this display.
    pub(crate) fn log_writer(&self) -> LogWriter {
        LogWriter {
            multi: self.multi.clone(),
        }
    }
}

/// One file's bar; advancing it advances the total too.
#[derive(Debug)]
pub(crate) struct FileBar {
    /// None for a file counted in the total only.
    bar: Option<ProgressBar>,
    /// The position of a file without a bar of its own.
    own: AtomicU64,
    total: ProgressBar,
}

impl FileBar {
    /// Records `n` more bytes moved.
    pub(crate) fn inc(&self, n: u64) {
        match &self.bar {
            Some(bar) => bar.inc(n),
            None => {
                self.own.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.total.inc(n);
    }

    /// Records `n` bytes the other side already had: the bar moves on, but
    /// its rate (and the total's) counts only what moves from here, and
    /// the total no longer waits for them.
    pub(crate) fn kept(&self, n: u64) {
        // Every download and upload calls this with what the other side
        // held, mostly nothing; the ticker's restart below spawns a thread
        // (even for a hidden bar), which cost 4% of `get -r`'s CPU on small
        // files.
        if n == 0 {
            return;
        }
        match &self.bar {
            // The estimator records positions only on ticks, and a bar
            // with a steady tick ignores manual ones: stop it, record the
            // jump, then forget it, so the rate starts from here.
            Some(bar) => {
                let ticking = !bar.is_hidden();
                bar.disable_steady_tick();
                bar.set_position(bar.position() + n);
                bar.tick();
                bar.reset_eta();
                if ticking {
                    bar.enable_steady_tick(TICK);
                }
            }
            None => {
                self.own.fetch_add(n, Ordering::Relaxed);
            }
        }
        let left = self.total.length().unwrap_or(0).saturating_sub(n);
        self.total.set_length(left);
    }

    /// Bytes moved so far (and kept, for a resumed file).
    pub(crate) fn position(&self) -> u64 {
        match &self.bar {
            Some(bar) => bar.position(),
            None => self.own.load(Ordering::Relaxed),
        }
    }

    /// Sets the file's size once it is known (a get learns it from the server).
    pub(crate) fn set_length(&self, size: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(size);
        }
    }

    /// Removes the bar from the display.
    pub(crate) fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl crate::client::Watch for Progress {
    fn add_total(&self, bytes: u64) {
        Self::add_total(self, bytes);
    }

    fn set_status(&self, msg: String) {
        Self::set_status(self, msg);
    }

    fn file(&self, name: &str, size: u64, small: bool) -> Box<dyn crate::client::WatchFile> {
        Box::new(if small {
            self.total_only()
        } else {
            self.file_bar(name, size)
        })
    }
}

impl crate::client::WatchFile for FileBar {
    fn inc(&self, n: u64) {
        Self::inc(self, n);
    }

    fn kept(&self, n: u64) {
        Self::kept(self, n);
    }

    fn set_length(&self, size: u64) {
        Self::set_length(self, size);
    }

    fn finish(self: Box<Self>) {
        Self::finish(*self);
    }
}

/// `MakeWriter` for tracing-subscriber: each log line is written with the
/// bars suspended, so it lands above them instead of through them.
#[derive(Debug, Clone)]
pub(crate) struct LogWriter {
    multi: MultiProgress,
}

/// One log event's bytes, flushed to stderr as a unit when dropped.
#[derive(Debug)]
pub(crate) struct LogLine {
    multi: MultiProgress,
    buf: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            self.multi.suspend(|| {
                let _ = std::io::stderr().write_all(&buf);
            });
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine {
            multi: self.multi.clone(),
            buf: Vec::new(),
        }
    }
}

/// The closing summary, counting only what moved in this run:
/// "put 4 files: 140.2 MiB sent in 3.67 s (40.0 MB/s); 432.0 MiB were
/// already there". `bytes` is the files' whole size, `sent` what crossed
/// the network this time (a resumed file's rest, nothing for a file that
/// was already there).
pub(crate) fn summary(verb: &str, files: usize, bytes: u64, sent: u64, secs: f64) -> String {
    let files = format!("{verb} {files} file{}", if files == 1 { "" } else { "s" });
    let kept = bytes.saturating_sub(sent);
    let kept = if kept > 0 {
        format!("; {} were already there", Size(kept))
    } else {
        String::new()
    };
    if sent == 0 {
        return format!("{files}: nothing sent{kept}");
    }
    format!(
        "{files}: {} sent in {} ({}){kept}",
        Size(sent),
        Seconds(secs),
        Rate(sent, secs)
    )
}

/// What connections lost mid-batch cost, said plainly (the summary
/// counts each file's last attempt only); `None` if none was lost.
pub(crate) fn lost_line(lost: &crate::client::Lost) -> Option<String> {
    if lost.connections == 0 {
        return None;
    }
    let resumed = if lost.kept > 0 {
        format!(
            "; {} that had arrived was resumed from, not moved again",
            Size(lost.kept)
        )
    } else {
        String::new()
    };
    Some(format!(
        "qxfer: files were tried again over {} new connection{}: about {} moved twice (over a connection that ended before they finished, then again){resumed}",
        lost.connections,
        if lost.connections == 1 { "" } else { "s" },
        Size(lost.twice()),
    ))
}

/// A size in binary units with one decimal: "140.2 MiB", "512 B".
struct Size(u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit < UNITS.len() - 1 {
            v /= 1024.0;
            unit += 1;
        }
        write!(f, "{v:.1} {}", UNITS[unit])
    }
}

/// A duration that reads well at any length: "1 h 02 min", "3 min 05 s",
/// "3.67 s", "0.42 s", "3.1 ms".
struct Seconds(f64);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.max(0.0);
        if s >= 3600.0 {
            let m = (s / 60.0).round() as u64;
            write!(f, "{} h {:02} min", m / 60, m % 60)
        } else if s >= 60.0 {
            let r = s.round() as u64;
            write!(f, "{} min {:02} s", r / 60, r % 60)
        } else if s >= 0.01 {
            write!(f, "{s:.2} s")
        } else {
            write!(f, "{:.1} ms", s * 1e3)
        }
    }
}

/// A rate in decimal units per second (as `cp`, `scp` and network links
/// count), with three significant digits: "40.0 MB/s", "412 MB/s",
/// "1.50 MB/s", "850 kB/s", "7 B/s", or "in an instant" for a time too
/// short to measure.
struct Rate(u64, f64);

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self(bytes, secs) = *self;
        // Below a millisecond the clock's resolution and the process's own
        // start-up dominate: a rate from it would be noise.
        if secs < 0.001 {
            return write!(f, "in an instant");
        }
        let per_sec = bytes as f64 / secs;
        let (v, unit) = if per_sec >= 1e6 {
            (per_sec / 1e6, "MB/s")
        } else if per_sec >= 1e3 {
            (per_sec / 1e3, "kB/s")
        } else {
            return write!(f, "{per_sec:.0} B/s");
        };
        if v >= 100.0 {
            write!(f, "{v:.0} {unit}")
        } else if v >= 10.0 {
            write!(f, "{v:.1} {unit}")
        } else {
            write!(f, "{v:.2} {unit}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_owned_up_to() {
        use crate::client::Lost;
        assert_eq!(lost_line(&Lost::default()), None);
        let lost = Lost {
            connections: 1,
            unfinished: 40 << 20,
            kept: 32 << 20,
        };
        assert_eq!(
            lost_line(&lost).unwrap(),
            "qxfer: files were tried again over 1 new connection: about 8.0 MiB moved twice (over a connection that ended before they finished, then again); 32.0 MiB that had arrived was resumed from, not moved again"
        );
    }

    #[test]
    fn summary_counts_only_what_was_sent() {
        assert_eq!(
            summary("put", 1, 2_000_000, 2_000_000, 2.0),
            "put 1 file: 1.9 MiB sent in 2.00 s (1.00 MB/s)"
        );
        // The example of issue 11: 140.2 MiB sent of 572.2 MiB.
        let sent = (140.2 * 1048576.0) as u64;
        let all = sent + 432 * 1048576;
        assert_eq!(
            summary("put", 4, all, sent, 3.67),
            "put 4 files: 140.2 MiB sent in 3.67 s (40.1 MB/s); 432.0 MiB were already there"
        );
        assert_eq!(
            summary("got", 2, 4096, 0, 0.2),
            "got 2 files: nothing sent; 4.0 KiB were already there"
        );
        assert_eq!(summary("got", 0, 0, 0, 0.0), "got 0 files: nothing sent");
    }

    #[test]
    fn short_and_long_times_and_rates_read_well() {
        // Sub-second runs: no "0.00 s", and a rate only where measurable.
        assert_eq!(
            summary("put", 1, 32768, 32768, 0.004),
            "put 1 file: 32.0 KiB sent in 4.0 ms (8.19 MB/s)"
        );
        assert_eq!(
            summary("put", 1, 10, 10, 0.0002),
            "put 1 file: 10 B sent in 0.2 ms (in an instant)"
        );
        assert_eq!(Seconds(0.42).to_string(), "0.42 s");
        assert_eq!(Seconds(185.0).to_string(), "3 min 05 s");
        assert_eq!(Seconds(3725.0).to_string(), "1 h 02 min");
        assert_eq!(Rate(412_300_000, 1.0).to_string(), "412 MB/s");
        // Slow or tiny: smaller units, never "0.00 MB/s".
        assert_eq!(Rate(850_000, 1.0).to_string(), "850 kB/s");
        assert_eq!(Rate(3, 0.43).to_string(), "7 B/s");
        assert_eq!(Size(5 << 30).to_string(), "5.0 GiB");
    }

    #[test]
    fn a_resumed_file_moves_its_bar_but_not_its_rate() {
        let p = Progress::hidden();
        p.add_total(200 << 20);
        let f = p.file_bar("a", 200 << 20);
        f.kept(100 << 20);
        assert_eq!(f.position(), 100 << 20, "the bar starts where it resumes");
        assert_eq!(
            p.total.length(),
            Some(100 << 20),
            "the total: what is left to send"
        );
        std::thread::sleep(Duration::from_millis(100));
        f.inc(1 << 20);
        // Let the bar's own tick sample it.
        std::thread::sleep(TICK + Duration::from_millis(150));
        // 1 MiB in under half a second: a few MB/s, not the 100 MiB
        // already there.
        let rate = f.bar.as_ref().expect("a bar of its own").per_sec();
        assert!(rate > 0.0 && rate < 50e6, "{rate} B/s");
    }

    #[test]
    fn total_follows_file_bars() {
        let p = Progress::hidden();
        p.add_total(10);
        let f = p.file_bar("a", 10);
        f.inc(10);
        f.finish();
        assert_eq!(p.total.position(), 10);
    }

    #[test]
    fn a_file_in_the_total_only_still_counts_its_bytes() {
        let p = Progress::hidden();
        p.add_total(30);
        let f = p.total_only();
        f.inc(10);
        f.kept(5);
        assert_eq!(f.position(), 15, "moved and kept");
        assert_eq!(p.total.position(), 10, "the total counts what moved");
        assert_eq!(
            p.total.length(),
            Some(25),
            "and no longer waits for what was kept"
        );
        f.finish();
    }
}
