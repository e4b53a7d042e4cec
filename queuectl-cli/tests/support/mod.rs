//! Drives the `queuectl` binary end to end: a [`Queue`] is a fresh temporary home, [`Cmd`]
//! runs one command in it and checks its exit code, and [`Worker`] runs a long-lived
//! `worker start` whose stderr lines tests wait on.
//!
//! Every wait is bounded, and every child process is killed and reaped when its guard drops,
//! also when a test panics.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::os::unix::fs::DirBuilderExt;
use tempfile::TempDir;

/// How long any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_queuectl");

/// The runtime directory of the commands on the queue at `home` (where workers serve this
/// machine's enqueues), beside it: never the user's own.
pub fn runtime_dir(home: &Path) -> PathBuf {
    home.parent().unwrap_or(home).join("run")
}

/// A queue in a fresh temporary directory (the store in `home/`, files jobs write in
/// `scratch/` beside it), removed when dropped.
pub struct Queue {
    root: TempDir,
    home: PathBuf,
}

impl Queue {
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("queuectl-test-")
            .tempdir()
            .expect("create a temporary directory");
        let home = root.path().join("home");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(runtime_dir(&home))
            .expect("create the runtime directory");
        Self { root, home }
    }

    /// The store directory, passed as `--home` (created by the first command that writes).
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// A scratch path beside the store, for files jobs write.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let dir = self.root.path().join("scratch");
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir.join(name)
    }

    /// `queuectl --home HOME ARGS...`, expected to exit 0 unless told otherwise.
    pub fn cmd<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Cmd::new(self.home()).args(args)
    }

    /// `queuectl ARGS` where the arguments name a PostgreSQL database: with `QUEUECTL_HOME`
    /// (not `--home`, which contradicts a database URL) at this queue's directory, so that a
    /// test can see the embedded store was left alone.
    pub fn on_database<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Cmd::without_home()
            .env("QUEUECTL_HOME", self.home())
            .env("XDG_RUNTIME_DIR", runtime_dir(self.home()))
            .args(args)
    }

    /// Runs `ARGS` successfully and returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        self.cmd(args).run().stdout
    }

    /// Runs `ARGS --json` successfully and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        self.cmd(args).run().json()
    }

    /// Sets a config key.
    pub fn config_set(&self, key: &str, value: &str) {
        self.cmd(["config", "set", key, value]).run();
    }

    /// Enqueues one job (JSON) and returns the printed id.
    pub fn enqueue(&self, job: &str) -> String {
        let out = self.cmd(["enqueue", job]).run();
        out.stdout.trim_end().to_owned()
    }

    /// `show ID --json`.
    pub fn job(&self, id: &str) -> Value {
        self.json(&["show", id])
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.json(&["status"])
    }

    /// Starts `worker start ARGS...` in the background.
    pub fn worker(&self, args: &[&str]) -> Worker {
        Worker::start(self.home(), args)
    }

    /// Starts `queuectl --home HOME ARGS...` in the background, its stdout read line by line.
    pub fn background(&self, args: &[&str]) -> Background {
        Background::start(self.home(), args)
    }
}

/// A command running in the background (`logs --follow`) whose stdout lines a test reads as
/// they come. Dropping it kills and reaps the process.
pub struct Background {
    child: Child,
    description: String,
    lines: Receiver<String>,
    /// Every line read so far.
    seen: Vec<String>,
    stderr: Option<thread::JoinHandle<String>>,
    exited: bool,
}

impl Background {
    fn start(home: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("--home")
            .arg(home)
            .args(args)
            .env_remove("QUEUECTL_HOME")
            .env_remove("QUEUECTL_DATABASE_URL")
            .env_remove("QUEUECTL_DATABASE_SCHEMA")
            .env("XDG_RUNTIME_DIR", runtime_dir(home))
            .current_dir(home.parent().unwrap_or(home))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn queuectl");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = read_all(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            description: format!("queuectl {}", args.join(" ")),
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
            exited: false,
        }
    }

    /// The next line it prints (waiting at most [`TIMEOUT`]).
    pub fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(error) => panic!(
                "`{}` printed no line ({error:?}); it printed before:\n{}",
                self.description,
                self.seen.join("\n")
            ),
        }
    }

    /// Waits (bounded) for it to exit; returns its status, the lines it printed that were not
    /// read yet, and its stderr.
    pub fn wait_exit(&mut self) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + TIMEOUT;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`{}` did not exit within {TIMEOUT:?}; it printed:\n{}",
                    self.description,
                    self.seen.join("\n")
                ),
            }
        }
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "`{}` closed stdout but did not exit",
                self.description
            );
            thread::sleep(Duration::from_millis(10));
        };
        self.exited = true;
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        (status, rest, stderr.unwrap_or_default())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Opens a gate a job waits on (`read _ < GATE`, a FIFO): writes a line to it, failing the
/// test if nobody reads it within [`TIMEOUT`].
pub fn open_gate(gate: &Path) {
    let (tx, rx) = mpsc::channel();
    let gate = gate.to_owned();
    thread::spawn(move || {
        let _ = tx.send(std::fs::write(&gate, "go\n"));
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(written) => written.expect("write to the gate"),
        Err(_) => panic!("nobody opened the gate within {TIMEOUT:?}"),
    }
}

/// A FIFO at `path`, for a job to wait on.
pub fn make_gate(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
}

/// One invocation of the binary: args, env, stdin; `run` checks the exit code.
pub struct Cmd {
    command: Command,
    stdin: Option<Vec<u8>>,
    expected: Option<i32>,
    description: String,
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Stdout parsed as exactly one JSON value (nothing else but whitespace).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON value ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl Cmd {
    fn new(home: &Path) -> Self {
        let mut cmd = Self::without_home();
        let cwd = home.parent().unwrap_or(home);
        cmd.command
            .arg("--home")
            .arg(home)
            .env("XDG_RUNTIME_DIR", runtime_dir(home))
            .current_dir(cwd);
        cmd.description = format!("queuectl --home {}", home.display());
        cmd
    }

    /// `queuectl` without `--home` (and without an inherited `QUEUECTL_HOME` or database).
    pub fn without_home() -> Self {
        let mut command = Command::new(BIN);
        command
            .env_remove("QUEUECTL_HOME")
            .env_remove("QUEUECTL_DATABASE_URL")
            .env_remove("QUEUECTL_DATABASE_SCHEMA")
            .env_remove("RUST_BACKTRACE");
        Self {
            command,
            stdin: None,
            expected: Some(0),
            description: "queuectl".to_owned(),
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        for arg in args {
            let arg = arg.into();
            self.description.push(' ');
            self.description.push_str(&arg.to_string_lossy());
            self.command.arg(arg);
        }
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.command.env(key, value.into());
        self
    }

    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// The exit code `run` asserts (default 0).
    pub fn status(mut self, code: i32) -> Self {
        self.expected = Some(code);
        self
    }

    /// Runs to completion within [`TIMEOUT`] and asserts the exit code.
    pub fn run(mut self) -> Output {
        let output = run_bounded(&mut self.command, self.stdin.take(), &self.description);
        if let Some(expected) = self.expected {
            assert_eq!(
                output.status.code(),
                Some(expected),
                "`{}` exited with {}\nstdout:\n{}\nstderr:\n{}",
                self.description,
                output.status,
                output.stdout,
                output.stderr
            );
        }
        output
    }
}

/// Spawns `command`, feeds `stdin`, collects its output, and kills it if it takes longer than
/// [`TIMEOUT`].
fn run_bounded(command: &mut Command, stdin: Option<Vec<u8>>, what: &str) -> Output {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{what}`: {e}"));
    let pid = child.id();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        // On its own thread: the child may not read all of it before writing output.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(TIMEOUT) {
        Ok(output) => {
            let output = output.unwrap_or_else(|e| panic!("wait for `{what}`: {e}"));
            Output {
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        }
        Err(_) => {
            // Not reaped yet (the waiting thread still holds it), so the pid is still ours.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = done_rx.recv_timeout(Duration::from_secs(5));
            panic!("`{what}` did not finish within {TIMEOUT:?}");
        }
    }
}

/// Runs `sh -c SCRIPT ARGS...` (bounded by [`TIMEOUT`]); `$0`, `$1`, … are `args`.
pub fn run_sh(script: &str, args: &[&std::ffi::OsStr]) -> Output {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .args(args)
        .env_remove("QUEUECTL_HOME");
    run_bounded(&mut command, None, &format!("sh -c {script:?}"))
}

/// One line a worker wrote to stderr, with the moment the test read it.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A `queuectl worker start` process. Dropping it kills and reaps the process.
pub struct Worker {
    child: Child,
    lines: Receiver<Line>,
    /// Every line received so far, in order.
    seen: Vec<Line>,
    stdout: Option<thread::JoinHandle<String>>,
    exited: Option<ExitStatus>,
    eof: bool,
}

impl Worker {
    fn start(home: &Path, args: &[&str]) -> Self {
        let mut command = Command::new(BIN);
        if args.contains(&"--database-url") {
            // `--home` would contradict the URL: the home is only there to be left alone.
            command.env("QUEUECTL_HOME", home);
        } else {
            command.arg("--home").arg(home).env_remove("QUEUECTL_HOME");
        }
        let mut child = command
            .args(["worker", "start"])
            .args(args)
            .env_remove("QUEUECTL_DATABASE_URL")
            .env_remove("QUEUECTL_DATABASE_SCHEMA")
            .env("XDG_RUNTIME_DIR", runtime_dir(home))
            .current_dir(home.parent().unwrap_or(home))
            // Its own process group, like a foreground job in a terminal: a test can send it
            // a terminal's Ctrl+C with `killpg`.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn queuectl worker start");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(text) = line else { break };
                if tx
                    .send(Line {
                        at: Instant::now(),
                        text,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
            stdout: Some(stdout),
            exited: None,
            eof: false,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the next line containing `needle` (lines before it are kept in `seen`).
    pub fn wait_for(&mut self, needle: &str) -> Line {
        self.wait_until(needle, |line| line.contains(needle))
    }

    /// Waits for the next line for which `pred` holds.
    pub fn wait_until(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> Line {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line.text) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "worker {} wrote no line matching {what:?} within {TIMEOUT:?}; it wrote:\n{}",
                        self.child.id(),
                        self.transcript()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.eof = true;
                    panic!(
                        "worker {} closed stderr before a line matching {what:?}; it wrote:\n{}",
                        self.child.id(),
                        self.transcript()
                    )
                }
            }
        }
    }

    /// Every line seen so far.
    pub fn transcript(&self) -> String {
        self.seen
            .iter()
            .map(|l| format!("  {}\n", l.text))
            .collect()
    }

    /// Lines seen so far that contain `needle`.
    pub fn seen_containing(&self, needle: &str) -> Vec<&Line> {
        self.seen
            .iter()
            .filter(|l| l.text.contains(needle))
            .collect()
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the worker");
    }

    /// Signals the worker's whole process group, as a terminal does on Ctrl+C.
    pub fn signal_group(&self, signal: Signal) {
        nix::sys::signal::killpg(self.pid(), signal).expect("signal the worker's group");
    }

    /// Waits (bounded) for the process to exit, reading the rest of its stderr, and returns its
    /// status. Asserts it printed nothing on stdout.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        // Stderr closes when the process exits (jobs do not inherit it).
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "worker {} did not exit within {TIMEOUT:?}; it wrote:\n{}",
                    self.child.id(),
                    self.transcript()
                ),
            }
        }
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} closed stderr but did not exit",
                self.child.id()
            );
            thread::sleep(Duration::from_millis(10));
        };
        self.exited = Some(status);
        let stdout = self.stdout.take().map(|h| h.join().unwrap_or_default());
        assert_eq!(
            stdout.as_deref().unwrap_or(""),
            "",
            "a worker prints nothing on stdout"
        );
        status
    }

    /// SIGKILLs the process and reaps it, so its pid is gone (not a zombie).
    pub fn kill_and_reap(&mut self) {
        self.signal(Signal::SIGKILL);
        let status = self.wait_exit();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc_sigkill())
        );
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.exited.is_none() && self.child.try_wait().expect("try_wait").is_none()
    }
}

fn libc_sigkill() -> i32 {
    Signal::SIGKILL as i32
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            // Show what the worker said, to explain the failure.
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            eprintln!(
                "--- worker {} stderr ---\n{}",
                self.child.id(),
                self.transcript()
            );
        }
    }
}

/// Polls `cond` (external state: files, `status`) until it holds, for at most [`TIMEOUT`].
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` has ended: it no longer exists, or is a zombie nobody reaped yet.
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Reads a pid a job wrote to `path`, waiting (bounded) for the file to be complete.
pub fn read_pid(path: &Path) -> i32 {
    let mut pid = None;
    eventually(&format!("a pid in {}", path.display()), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.strip_suffix('\n')?.parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

/// The ids and states of a `list --json` array, in order.
pub fn states(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|job| {
            (
                job["id"].as_str().expect("id").to_owned(),
                job["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

/// Waits (bounded) for a spawned child with piped output to exit, and returns its output.
pub fn wait_output(child: Child, timeout: Duration) -> std::process::Output {
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("collect a child's output"),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("a child process did not exit within {timeout:?}");
        }
    }
}
