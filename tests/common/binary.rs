//! The real binary: qxfer commands with a home of their own, and qxfer serve as a child process whose address is read from its log.
#![allow(dead_code, unreachable_pub)]

use super::*;

/// The `qxfer` binary, with HOME and the config dir pointed at `home` so a
/// test never touches the real ones.
pub fn qxfer(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qxfer"));
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("QXFER_CONFIG_DIR", home.join("qxfer-config"))
        .env_remove("XDG_DOWNLOAD_DIR")
        .env_remove("QXFER_SERVER")
        .env_remove("RUST_LOG");
    cmd
}

/// Starts `cmd` in the background, its output dropped and its messages
/// written to `messages` (read once it ends).
pub fn spawn_into(cmd: &mut Command, messages: &Path) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(messages).unwrap())
        .spawn()
        .unwrap()
}

/// Whether the file `log` (a server's log, say) holds `text` yet.
pub fn log_has(log: &Path, text: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(text))
}

/// The `qxfer` binary as in [`qxfer`], talking to the server at `server`.
pub fn qxfer_at(home: &Path, server: SocketAddr) -> Command {
    let mut cmd = qxfer(home);
    cmd.env("QXFER_SERVER", server.to_string());
    cmd
}

/// A temp home for [`qxfer`] whose client identity `server` admits.
pub fn home_for(server: &TestServer) -> TempDir {
    let home = tempfile::tempdir().unwrap();
    server.authorize(&home.path().join("qxfer-config"));
    home
}

/// The real `qxfer serve` binary on an ephemeral port; killed on drop.
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub banner: Vec<String>,
    /// What it printed on stdout after the banner, as it arrives.
    pub after_banner: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts `cmd` (a `qxfer serve` command line) and waits for its banner.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_logging(cmd, Stdio::null())
    }

    /// Like `spawn`, sending the server's log (stderr) to `log`.
    pub fn spawn_logging(mut cmd: Command, log: impl Into<Stdio>) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        for _ in 0..3 {
            banner.push(lines.next().expect("serve printed its banner").unwrap());
        }
        let addr = banner[1]
            .strip_prefix("listening on udp ")
            .expect("listen line")
            .parse()
            .unwrap();
        let fingerprint = banner[2]
            .strip_prefix("fingerprint ")
            .expect("fingerprint line")
            .to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        let after_banner = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = after_banner.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            addr,
            fingerprint,
            banner,
            after_banner,
        }
    }

    /// Waits (up to 5 s) for a line after the banner containing `text`.
    pub fn wait_for_line(&self, text: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(l) = self
                .after_banner
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(text))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "serve never printed {text:?}: {:?}",
                self.after_banner.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test server keeps its files: the tests that concern the server
/// run against both (see `both_backends!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temporary directory.
    Local,
    /// A prefix of its own in the test Garage cluster's bucket.
    Object,
}

impl Backend {
    /// A fresh root of this kind for `qxfer serve` run as a process: the
    /// directory `dir`, or a new prefix in the test bucket.
    pub fn root_for_process(self, dir: PathBuf, label: &str) -> PathBuf {
        match self {
            Self::Local => dir,
            Self::Object => garage::garage().fresh_root(label).into(),
        }
    }
}

/// Adds `--root root` to a `qxfer serve` command line, and for an s3://
/// root the test cluster's endpoint and credentials.
pub fn serve_root(cmd: &mut Command, root: &Path) {
    cmd.arg("--root").arg(root);
    if object_prefix(root).is_some() {
        let g = garage::garage();
        g.env(cmd);
        cmd.args(["--s3-endpoint", &g.endpoint]);
    }
}
