//! Progress display: one bar per file in flight plus a total bar, and a log
//! writer that prints through the bars so log lines never tear them.

use std::io::Write;
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

const FILE_TEMPLATE: &str =
    "{wide_msg} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {eta:>4} [{bar:25.cyan/blue}]";
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
        bar.enable_steady_tick(Duration::from_millis(200));
        FileBar {
            bar,
            total: self.total.clone(),
        }
    }

    /// A file that gets no bar of its own (a small file, over in a blink):
    /// its progress only advances the total.
    pub(crate) fn total_only(&self) -> FileBar {
        FileBar {
            bar: ProgressBar::hidden(),
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
    bar: ProgressBar,
    total: ProgressBar,
}

impl FileBar {
    /// Records `n` more bytes moved.
    pub(crate) fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.total.inc(n);
    }

    /// Sets the file's size once it is known (a get learns it from the server).
    pub(crate) fn set_length(&self, size: u64) {
        self.bar.set_length(size);
    }

    /// Removes the bar from the display.
    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
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

/// The closing summary: "3 files, 12.0 MiB in 1.52 s (8.27 MB/s)".
pub(crate) fn summary(verb: &str, files: usize, bytes: u64, secs: f64) -> String {
    let rate = if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    };
    format!(
        "{verb} {files} file{}, {} in {secs:.2} s ({rate:.2} MB/s)",
        if files == 1 { "" } else { "s" },
        indicatif::BinaryBytes(bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_well() {
        assert_eq!(
            summary("put", 1, 2_000_000, 2.0),
            "put 1 file, 1.91 MiB in 2.00 s (1.00 MB/s)"
        );
        assert!(summary("got", 0, 0, 0.0).starts_with("got 0 files, 0 B"));
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
}
