//! A `queuectl worker start` for benchmarks: its stderr lines arrive on a channel.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A worker process whose stderr lines a benchmark waits on; killed when dropped.
pub struct Worker {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    /// Spawns `command` (a `queuectl … worker start …`) and waits for it to start.
    pub fn spawn(mut command: Command) -> Worker {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let worker = Worker { child, lines };
        worker.wait_for("[started]");
        worker
    }

    /// The next line containing `needle` (waiting at most two minutes).
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("worker never printed {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
