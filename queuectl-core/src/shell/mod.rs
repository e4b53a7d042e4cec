//! `ShellExecutor`: runs a job's command with `sh -c`.
//!
//! # Process model
//!
//! Each attempt starts one shell, the *leader*, in a new process group of its own (its pid is
//! the group id). Everything the command starts stays in that group unless it deliberately
//! leaves it (`setsid`, job control), so:
//!
//! - a Ctrl+C meant for the worker (sent to the terminal's foreground group) never reaches
//!   the job;
//! - a timeout or a cancellation signals the whole group: `SIGTERM`, then, after the grace
//!   period, `SIGKILL`;
//! - **an attempt ends when its leader exits, and whatever the command left running in its
//!   group is then killed with `SIGKILL`.** A job cannot leave processes behind (a job that
//!   starts a daemon must make it leave the group itself).
//!
//! The leader is reaped only after the last signal to its group has been sent: while it is an
//! unreaped zombie its pid cannot be reused, so the executor never signals a stranger's group.
//!
//! The thread calling [`execute`](Executor::execute) watches the attempt itself: it sleeps
//! in `poll` on the output pipe (reading the output as it comes) and on a notice of the
//! leader's exit, and wakes up at least every 50 ms to look at the cancel signal. The notice
//! comes from one of two [`ExitWatch`] strategies, side by side in `watch`: a pidfd of the
//! leader (Linux 5.3 and later; readable once the leader has exited, which leaves it
//! unreaped), or, where pidfds are not available, a helper thread per attempt that waits with
//! `waitid(WNOWAIT)` and closes a pipe.
//!
//! # When the worker dies
//!
//! The worker itself may die, even by `SIGKILL`, and a job must then not run on unobserved
//! while the queue hands it to another worker. One long-lived **supervisor** per worker
//! process (a shell started with the first job; see `supervisor`) holds the list of running
//! jobs' process groups and kills them all when the worker's end of its pipe closes, which
//! the kernel does when the worker process dies.
//!
//! A job's group exists only once its leader runs, so the leader starts behind a *gate*: its
//! standard input is a pipe, and it runs this prefix, on the command's first line:
//!
//! ```sh
//! read -r _ || exit 125; exec </dev/null; COMMAND
//! ```
//!
//! The executor writes the line that opens the gate only after the supervisor knows the
//! group. A worker that dies in between closes the gate without a line, and the leader exits
//! without running the command. The command itself sees `/dev/null` as its standard input.
//! It follows the prefix on the same line, so it runs as the shell's own script, exactly as
//! `sh -c COMMAND` would run it: `$0` is `sh`, there are no positional parameters, and its
//! line numbers and error messages are its own (`sh: 1: foo: not found`).
//!
//! # Limits
//!
//! Processes that leave the process group (`setsid`, `set -m`) or change their user id
//! (setuid programs) cannot be signalled through the group and may outlive the attempt. If
//! such a process keeps the job's output open, output capture stops after a short drain
//! period and says so in the output instead of waiting for it. If the supervisor itself is
//! killed, the groups it guarded are unguarded until the next job starts or ends, which
//! starts a new supervisor and hands it the list.

mod attempt;
mod output;
mod supervisor;
mod watch;

use attempt::Attempt;
pub(crate) use output::kept_from;
pub use watch::ExitWatch;

use std::ffi::OsString;
use std::io::{self, PipeWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::executor::{CancelSignal, Executor, ExecutorError, LiveOutput, Outcome};
use crate::job::Job;

/// Default cap on the captured output of an attempt, in bytes.
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 * 1024;

/// Default time between `SIGTERM` and `SIGKILL` when a job is stopped.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// Default shell.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// Environment variable holding the job's id.
pub const JOB_ID_VAR: &str = "QUEUECTL_JOB_ID";

/// Environment variable holding the attempt number (1 for the first attempt).
pub const ATTEMPT_VAR: &str = "QUEUECTL_ATTEMPT";

/// How long the output is still read after the job's process group has been killed. Only a
/// process that left the group can keep the pipe open that long.
const DEFAULT_OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Longest time an attempt goes without looking at its [`CancelSignal`].
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// What the leader shell runs before the command, on the command's first line: the gate;
/// see the module documentation.
const GATE_PREFIX: &str = "read -r _ || exit 125; exec </dev/null; ";

// The longest command a job may have still fits in one argument behind the gate (Linux allows
// 128 KiB with the terminating NUL).
const _: () = assert!(GATE_PREFIX.len() + crate::job::MAX_COMMAND_LEN < 128 * 1024);

/// `$0` of the leader shell: the name its error messages start with, as for `sh -c`.
const SHELL_NAME: &str = "sh";

/// Runs each job's command with `sh -c`; exit code 0 is success.
///
/// The command runs in its own process group with `/dev/null` as standard input,
/// [`JOB_ID_VAR`] and [`ATTEMPT_VAR`] added to the worker's environment, and its standard
/// output and standard error captured together in the order they were written (the last
/// [`output_limit`](Self::output_limit) bytes are kept). If the job has a `timeout` and runs
/// longer, its process group gets `SIGTERM`, then `SIGKILL` after the
/// [`kill_grace`](Self::kill_grace) period, and the outcome is [`Status::TimedOut`](crate::Status::TimedOut); a
/// [`CancelSignal`] stops it the same way with [`Status::Cancelled`](crate::Status::Cancelled). See the
/// [module documentation](self) for how processes are kept from outliving their attempt.
///
/// ```
/// use queuectl_core::{CancelSignal, Executor, MemoryStorage, NewJob, ShellExecutor, Status};
/// use queuectl_core::{StorageExt, now};
///
/// let job = MemoryStorage::new().enqueue(NewJob::new("echo hello; exit 3"), now())?;
/// let outcome = ShellExecutor::new().execute(&job, &CancelSignal::never())?;
/// assert_eq!(outcome.status, Status::Failed("exited with code 3".into()));
/// assert_eq!(outcome.exit_code, Some(3));
/// assert_eq!(outcome.output, "hello\n");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    shell: PathBuf,
    output_limit: usize,
    kill_grace: Duration,
    env: Vec<(OsString, OsString)>,
    working_dir: Option<PathBuf>,
    output_drain: Duration,
    exit_watch: ExitWatch,
}

impl Default for ShellExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl ShellExecutor {
    /// An executor using [`DEFAULT_SHELL`], [`DEFAULT_OUTPUT_LIMIT`] and
    /// [`DEFAULT_KILL_GRACE`], running commands in the worker's working directory.
    pub fn new() -> Self {
        Self {
            shell: PathBuf::from(DEFAULT_SHELL),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            kill_grace: DEFAULT_KILL_GRACE,
            env: Vec::new(),
            working_dir: None,
            output_drain: DEFAULT_OUTPUT_DRAIN,
            exit_watch: ExitWatch::default(),
        }
    }

    /// Keeps at most the last `bytes` bytes of an attempt's output. When output is dropped,
    /// the captured output starts with a line `[... N bytes truncated]`.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// Time a stopped job gets between `SIGTERM` and `SIGKILL`.
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// Runs commands with this shell instead of [`DEFAULT_SHELL`]. It must accept POSIX
    /// `sh` syntax and the `-c` option.
    pub fn shell(mut self, path: impl Into<PathBuf>) -> Self {
        self.shell = path.into();
        self
    }

    /// Adds `key=value` to every job's environment. [`JOB_ID_VAR`] and [`ATTEMPT_VAR`]
    /// cannot be overridden this way.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs commands in `dir` instead of the worker's working directory. A directory that
    /// does not exist makes every attempt fail with [`ExecutorError::Spawn`].
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// How the leader's exit is noticed (default [`ExitWatch::Pidfd`], which falls back to
    /// [`ExitWatch::Thread`] where pidfds are not available). Choosing `Thread` is for tests
    /// of that fallback.
    pub fn exit_watch(mut self, watch: ExitWatch) -> Self {
        self.exit_watch = watch;
        self
    }

    /// Starts the leader shell for `job` with `output` as its standard output and error, and
    /// returns it with the write end of its gate (still closed: see the module docs).
    fn spawn(&self, job: &Job, output: PipeWriter) -> Result<(Child, PipeWriter), ExecutorError> {
        let failed = |what: String, source: io::Error| ExecutorError::Spawn {
            id: job.id.clone(),
            source: context(what, source),
        };
        // Both ends are close-on-exec: only the leader gets the read end (as its stdin), and
        // no process gets the write end.
        let (gate_read, gate_write) =
            io::pipe().map_err(|e| failed("create the gate pipe".into(), e))?;
        let stdout = output
            .try_clone()
            .map_err(|e| failed("duplicate the output pipe".into(), e))?;

        let mut command = Command::new(&self.shell);
        command
            .arg("-c")
            .arg(script(&job.command))
            .arg(SHELL_NAME)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .env(JOB_ID_VAR, job.id.as_str())
            .env(ATTEMPT_VAR, job.attempts.to_string())
            .stdin(Stdio::from(gate_read))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(output))
            .process_group(0);
        if let Some(dir) = &self.working_dir {
            command.current_dir(dir);
        }
        let child = command.spawn().map_err(|e| {
            let what = match &self.working_dir {
                Some(dir) => format!("run {:?} in {:?}", self.shell, dir),
                None => format!("run {:?}", self.shell),
            };
            failed(what, e)
        })?;
        // `command` still holds our copies of the child's ends of the pipes; they close when it
        // drops here, so that the output reader sees end-of-file once the job's processes are
        // gone.
        drop(command);
        Ok((child, gate_write))
    }
}

/// Opens a leader's gate: the command runs.
fn open_gate(mut gate: PipeWriter) -> io::Result<()> {
    gate.write_all(b"\n")
        .map_err(|e| context("start the command (write to its gate)", e))
}

/// The leader's script: the gate, then the command on the same first line.
fn script(command: &str) -> String {
    let mut script = String::with_capacity(GATE_PREFIX.len() + command.len());
    script.push_str(GATE_PREFIX);
    script.push_str(command);
    script
}

impl Executor for ShellExecutor {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        self.attempt(job, cancel, None)
    }

    /// Runs the job as `execute` does; its output goes to `live` too, as it is read.
    fn execute_live(
        &self,
        job: &Job,
        cancel: &CancelSignal,
        live: &LiveOutput,
    ) -> Result<Outcome, ExecutorError> {
        self.attempt(job, cancel, Some(live))
    }
}

impl ShellExecutor {
    fn attempt(
        &self,
        job: &Job,
        cancel: &CancelSignal,
        live: Option<&LiveOutput>,
    ) -> Result<Outcome, ExecutorError> {
        if cancel.is_cancelled() {
            return Ok(Outcome::cancelled());
        }
        Attempt::start(self, job, live)?.run(cancel)
    }
}

/// An error saying what was being done when `source` happened.
#[derive(Debug, thiserror::Error)]
#[error("could not {what}")]
pub(crate) struct Context {
    what: String,
    source: io::Error,
}

/// Wraps `source` with what was being done, keeping its kind.
pub(crate) fn context(what: impl Into<String>, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        Context {
            what: what.into(),
            source,
        },
    )
}

#[cfg(test)]
mod tests;
