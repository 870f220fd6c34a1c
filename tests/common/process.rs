//! The real `switchyard serve` binary as a child process, for tests of what only a process
//! shows: signals, `kill -9`, exit codes.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::HANG_GUARD;

/// A relay process and the lines it logs.
pub struct Proc {
    pub child: tokio::process::Child,
    pub addr: String,
    log: mpsc::UnboundedReceiver<String>,
    /// Every line the process wrote so far, read by [`Proc::wait_log`] or not.
    all: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `switchyard serve --config` on a config in `dir`, waiting until it listens.
    pub async fn start(config: &Path) -> Proc {
        Proc::start_with(config, &[("RUST_LOG", "info")]).await
    }

    /// The same with `env` set for the process; its stdout and stderr lines both reach the log.
    pub async fn start_with(config: &Path, env: &[(&str, &str)]) -> Proc {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn switchyard serve");
        let (tx, mut log) = mpsc::unbounded_channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        forward_lines(
            child.stderr.take().expect("stderr"),
            tx.clone(),
            all.clone(),
        );
        forward_lines(child.stdout.take().expect("stdout"), tx, all.clone());
        let line = wait_line(&mut log, "switchyard listening").await;
        let at = line.find("127.0.0.1:").expect("listen address in the log");
        let addr: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        Proc {
            child,
            addr,
            log,
            all,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/responses", self.addr)
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("pid").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    pub async fn wait_log(&mut self, needle: &str) -> String {
        wait_line(&mut self.log, needle).await
    }

    /// Sends SIGTERM, waits for the exit and the end of its output, and returns the exit code
    /// and every line the process wrote.
    pub async fn finish(mut self) -> (Option<i32>, Vec<String>) {
        self.signal("TERM");
        let status = tokio::time::timeout(HANG_GUARD, self.child.wait())
            .await
            .expect("hang guard: exit after SIGTERM")
            .expect("wait");
        // The channel closes when both readers have reached the end of the output.
        while tokio::time::timeout(HANG_GUARD, self.log.recv())
            .await
            .expect("hang guard: the output ends")
            .is_some()
        {}
        let lines = std::mem::take(&mut *self.all.lock());
        (status.code(), lines)
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let status = tokio::time::timeout(HANG_GUARD, self.child.wait())
            .await
            .expect("hang guard: exit after SIGTERM")
            .expect("wait");
        status.code()
    }
}

fn forward_lines(
    out: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    tx: mpsc::UnboundedSender<String>,
    all: Arc<Mutex<Vec<String>>>,
) {
    let mut lines = BufReader::new(out).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            all.lock().push(line.clone());
            let _ = tx.send(line);
        }
    });
}

pub async fn wait_line(log: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> String {
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let line = log.recv().await.expect("the relay's log ended");
            if line.contains(needle) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("hang guard: no log line with {needle:?}"))
}
