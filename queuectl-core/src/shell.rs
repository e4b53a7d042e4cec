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
//! # The lifeline
//!
//! The worker itself may die, even by `SIGKILL`, and a job must then not run on unobserved
//! while the queue hands it to another worker. The executor creates a pipe per attempt and
//! keeps its write end (close-on-exec, so no other process inherits it). The leader receives
//! the read end as its standard input and runs this script before the command:
//!
//! ```sh
//! exec 3<&0 </dev/null
//! trap '' HUP INT TERM
//! ( ( read _ <&3; kill -KILL 0 ) >/dev/null 2>&1 & )
//! trap - HUP INT TERM
//! exec 3<&-
//! eval "$1"
//! ```
//!
//! The background *watcher* blocks reading the lifeline until the write end closes, which
//! happens when the executor drops it at the end of the attempt or when the worker process
//! dies; it then kills the job's whole process group. It is born ignoring `SIGTERM` (and
//! hang-ups and interrupts), so that it keeps guarding the group during the grace period of a
//! timeout; the leader restores the dispositions it started with before running the command.
//! Background lists get `/dev/null` as standard input, hence the copy of the lifeline on
//! descriptor 3, which the command does not inherit: it sees `/dev/null` as its standard
//! input. The watcher is started from a subshell that exits at once, so it is not a job of the
//! shell running the command: a bare `wait`, `jobs` or `$!` in the command never sees it. The
//! command is passed as `$1`, never spliced into the script.
//!
//! # Limits
//!
//! Processes that leave the process group (`setsid`, `set -m`) or change their user id
//! (setuid programs) cannot be signalled through the group and may outlive the attempt. If
//! such a process keeps the job's output open, output capture stops after a short drain
//! period and says so in the output instead of waiting for it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, PipeReader, PipeWriter, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, select};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::executor::{CancelSignal, Executor, ExecutorError, Outcome, Status};
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

/// The script the leader shell runs; see the module documentation.
const LIFELINE_SCRIPT: &str = "exec 3<&0 </dev/null; \
     trap '' HUP INT TERM; \
     ( ( read _ <&3; kill -KILL 0 ) >/dev/null 2>&1 & ) ; \
     trap - HUP INT TERM; \
     exec 3<&-; \
     eval \"$1\"";

/// `$0` of the leader shell: the name its error messages start with.
const SHELL_NAME: &str = "queuectl-job";

/// Runs each job's command with `sh -c`; exit code 0 is success.
///
/// The command runs in its own process group with `/dev/null` as standard input,
/// [`JOB_ID_VAR`] and [`ATTEMPT_VAR`] added to the worker's environment, and its standard
/// output and standard error captured together in the order they were written (the last
/// [`output_limit`](Self::output_limit) bytes are kept). If the job has a `timeout` and runs
/// longer, its process group gets `SIGTERM`, then `SIGKILL` after the
/// [`kill_grace`](Self::kill_grace) period, and the outcome is [`Status::TimedOut`]; a
/// [`CancelSignal`] stops it the same way with [`Status::Cancelled`]. See the
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

    /// Starts the leader shell for `job` with `output` as its standard output and error, and
    /// returns it with the write end of its lifeline.
    fn spawn(&self, job: &Job, output: PipeWriter) -> Result<(Child, PipeWriter), ExecutorError> {
        let failed = |what: String, source: io::Error| ExecutorError::Spawn {
            id: job.id.clone(),
            source: context(what, source),
        };
        // Both ends are close-on-exec: only the leader gets the read end (as its stdin), and
        // no process gets the write end.
        let (lifeline_read, lifeline_write) =
            io::pipe().map_err(|e| failed("create the lifeline pipe".into(), e))?;
        let stdout = output
            .try_clone()
            .map_err(|e| failed("duplicate the output pipe".into(), e))?;

        let mut command = Command::new(&self.shell);
        command
            .arg("-c")
            .arg(LIFELINE_SCRIPT)
            .arg(SHELL_NAME)
            .arg(&job.command)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .env(JOB_ID_VAR, job.id.as_str())
            .env(ATTEMPT_VAR, job.attempts.to_string())
            .stdin(Stdio::from(lifeline_read))
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
        Ok((child, lifeline_write))
    }
}

impl Executor for ShellExecutor {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        if cancel.is_cancelled() {
            return Ok(Outcome {
                status: Status::Cancelled,
                exit_code: None,
                duration: Duration::ZERO,
                output: String::new(),
            });
        }
        Attempt::start(self, job)?.run(cancel)
    }
}

/// One running attempt. Dropping it on an error path still cleans up: the lifeline closes (the
/// watcher kills the group) and the waiter thread reaps the leader once it has exited.
struct Attempt<'a> {
    exec: &'a ShellExecutor,
    job: &'a Job,
    /// The job's process group; its id is the leader's pid.
    group: Pid,
    started: Instant,
    lifeline: PipeWriter,
    /// Reports once that the leader has exited (it stays a zombie until `reap` drops).
    exited: Receiver<io::Result<()>>,
    /// Dropping it lets the waiter thread reap the leader.
    reap: Sender<()>,
    waiter: JoinHandle<io::Result<ExitStatus>>,
    output: OutputCapture,
}

impl<'a> Attempt<'a> {
    fn start(exec: &'a ShellExecutor, job: &'a Job) -> Result<Self, ExecutorError> {
        let failed = |what: &str, source: io::Error| ExecutorError::Spawn {
            id: job.id.clone(),
            source: context(what, source),
        };
        // Both helper threads start before the process does, so that nothing can fail between
        // starting it and watching it.
        let (output_read, output_write) =
            io::pipe().map_err(|e| failed("create the output pipe", e))?;
        let output = OutputCapture::start(output_read, exec.output_limit)
            .map_err(|e| failed("start the output reader thread", e))?;
        let (child_tx, child_rx) = crossbeam_channel::bounded::<Child>(1);
        let (exited_tx, exited) = crossbeam_channel::bounded(1);
        let (reap, reap_rx) = crossbeam_channel::bounded(0);
        let waiter = thread::Builder::new()
            .name("queuectl-job-wait".into())
            .spawn(move || wait_for_leader(child_rx, exited_tx, reap_rx))
            .map_err(|e| failed("start the waiter thread", e))?;

        let started = Instant::now();
        let (child, lifeline) = exec.spawn(job, output_write)?;
        // A pid is a positive `pid_t`; `Child::id` merely returns it as `u32`.
        let group = Pid::from_raw(child.id() as i32);
        if child_tx.send(child).is_err() {
            // The waiter thread ended without waiting: impossible short of a bug. Returning
            // drops the child and the lifeline, so the watcher kills the group.
            return Err(ExecutorError::Process {
                op: "wait for",
                id: job.id.clone(),
                source: io::Error::other("the waiter thread ended before the process started"),
            });
        }
        Ok(Self {
            exec,
            job,
            group,
            started,
            lifeline,
            exited,
            reap,
            waiter,
            output,
        })
    }

    fn run(self, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        let limit = self.job.timeout;
        let deadline = limit.map_or_else(crossbeam_channel::never, crossbeam_channel::after);
        let stopped = select! {
            recv(self.exited) -> notice => {
                self.leader_exited(notice)?;
                None
            }
            recv(cancel.receiver()) -> _ => Some(Status::Cancelled),
            recv(deadline) -> _ => Some(Status::TimedOut(limit.unwrap_or_default())),
        };
        let stopped = match stopped {
            // The job may have exited just as the stop came: then it simply finished.
            Some(status) => match self.exited.try_recv() {
                Ok(notice) => {
                    self.leader_exited(Ok(notice))?;
                    None
                }
                Err(TryRecvError::Empty) => {
                    self.terminate()?;
                    Some(status)
                }
                Err(TryRecvError::Disconnected) => return Err(self.waiter_lost()),
            },
            None => None,
        };
        let duration = self.started.elapsed();

        // The leader has exited but is not reaped yet, so the group id is still ours: kill
        // whatever the job left running (a no-op after `terminate`).
        self.signal(Signal::SIGKILL)?;
        let Attempt {
            exec,
            job,
            lifeline,
            reap,
            waiter,
            output,
            ..
        } = self;
        drop(lifeline);
        let output = output.finish(exec.output_drain);
        drop(reap);
        let exit = match waiter.join() {
            Ok(Ok(exit)) => exit,
            Ok(Err(source)) => {
                return Err(ExecutorError::Process {
                    op: "wait for",
                    id: job.id.clone(),
                    source,
                });
            }
            Err(_) => {
                return Err(ExecutorError::Process {
                    op: "wait for",
                    id: job.id.clone(),
                    source: io::Error::other("the waiter thread panicked"),
                });
            }
        };
        let (status, exit_code) = match stopped {
            Some(status) => (status, exit.code()),
            None => exit_status(exit),
        };
        Ok(Outcome {
            status,
            exit_code,
            duration,
            output,
        })
    }

    /// Stops a running job: `SIGTERM` to the group, then `SIGKILL` once the whole group has
    /// finished or the grace period is over. Returns once the leader has exited, which after
    /// `SIGKILL` only a process stuck in the kernel (uninterruptible sleep) can delay.
    fn terminate(&self) -> Result<(), ExecutorError> {
        self.signal(Signal::SIGTERM)?;
        let grace_over = Instant::now().checked_add(self.exec.kill_grace);
        let leader_exited = match grace_over {
            Some(deadline) => self.exited.recv_deadline(deadline),
            None => self
                .exited
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        match leader_exited {
            Ok(notice) => {
                self.leader_exited(Ok(notice))?;
                // The rest of the group may still be cleaning up: give it what remains of the
                // grace period. Its processes hold the output pipe, so its closing tells
                // that they are done (the watcher does not hold it).
                self.output.wait_closed(grace_over);
                self.signal(Signal::SIGKILL)
            }
            Err(RecvTimeoutError::Timeout) => {
                self.signal(Signal::SIGKILL)?;
                match self.exited.recv() {
                    Ok(notice) => self.leader_exited(Ok(notice)),
                    Err(_) => Err(self.waiter_lost()),
                }
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.waiter_lost()),
        }
    }

    /// Checks the waiter thread's report that the leader exited.
    fn leader_exited(
        &self,
        notice: Result<io::Result<()>, crossbeam_channel::RecvError>,
    ) -> Result<(), ExecutorError> {
        match notice {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ExecutorError::Process {
                op: "wait for",
                id: self.job.id.clone(),
                source,
            }),
            Err(_) => Err(self.waiter_lost()),
        }
    }

    fn waiter_lost(&self) -> ExecutorError {
        ExecutorError::Process {
            op: "wait for",
            id: self.job.id.clone(),
            source: io::Error::other("the waiter thread ended without reporting the exit"),
        }
    }

    /// Sends `signal` to the job's process group. A group that no longer exists (`ESRCH`) is
    /// not an error: there is nothing left to signal. Any other error (`EPERM`: no process of
    /// the group may be signalled by us) fails the attempt with [`ExecutorError::Process`]; the
    /// lifeline still closes when the attempt is dropped.
    fn signal(&self, signal: Signal) -> Result<(), ExecutorError> {
        match killpg(self.group, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(ExecutorError::Process {
                op: "signal",
                id: self.job.id.clone(),
                source: context(
                    format!("send {} to process group {}", signal.as_str(), self.group),
                    errno.into(),
                ),
            }),
        }
    }
}

/// The waiter thread: waits for the leader to exit, reports it, then reaps it once the
/// attempt no longer signals its group (when `reap` disconnects).
fn wait_for_leader(
    child: Receiver<Child>,
    exited: Sender<io::Result<()>>,
    reap: Receiver<()>,
) -> io::Result<ExitStatus> {
    let Ok(mut child) = child.recv() else {
        return Err(io::Error::other("no process was started"));
    };
    let reaped = match wait_without_reaping(&mut child) {
        Ok(reaped) => {
            // A send fails only when the attempt has already given up (an error path); the
            // child is still reaped below.
            let _ = exited.send(Ok(()));
            reaped
        }
        Err(error) => {
            let _ = exited.send(Err(error));
            None
        }
    };
    drop(exited);
    // Nothing is ever sent: the attempt drops its sender when the leader may be reaped.
    let _ = reap.recv();
    match reaped {
        Some(status) => Ok(status),
        None => child.wait(),
    }
}

/// Blocks until `child` has exited, leaving it unreaped so that its pid (the id of the job's
/// process group) cannot be reused while the group may still be signalled.
#[cfg(any(
    target_os = "android",
    target_os = "freebsd",
    all(target_os = "linux", not(target_env = "uclibc"))
))]
fn wait_without_reaping(child: &mut Child) -> io::Result<Option<ExitStatus>> {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(context("wait for the job's shell to exit", errno.into())),
        }
    }
}

/// Where `waitid(WNOWAIT)` is not available, the leader is reaped as soon as it exits; the
/// group id then stays reserved only while another process of the group (such as the
/// watcher) is alive.
#[cfg(not(any(
    target_os = "android",
    target_os = "freebsd",
    all(target_os = "linux", not(target_env = "uclibc"))
)))]
fn wait_without_reaping(child: &mut Child) -> io::Result<Option<ExitStatus>> {
    child.wait().map(Some)
}

/// The status and exit code of a job whose leader ended on its own.
fn exit_status(exit: ExitStatus) -> (Status, Option<i32>) {
    match (exit.code(), exit.signal()) {
        (Some(0), _) => (Status::Succeeded, Some(0)),
        (Some(code), _) => {
            // The shell's conventions for commands it could not run.
            let hint = match code {
                126 => " (command not executable)",
                127 => " (command not found)",
                _ => "",
            };
            (
                Status::Failed(format!("exited with code {code}{hint}")),
                Some(code),
            )
        }
        (None, Some(signal)) => {
            let mut message = match Signal::try_from(signal) {
                Ok(name) => format!("killed by signal {} ({signal})", name.as_str()),
                Err(_) => format!("killed by signal {signal}"),
            };
            if exit.core_dumped() {
                message.push_str(", core dumped");
            }
            (Status::Failed(message), None)
        }
        (None, None) => (Status::Failed(format!("ended with {exit}")), None),
    }
}

/// Collects a job's output on a helper thread, so that a chatty job never blocks on a full
/// pipe.
struct OutputCapture {
    tail: Arc<Mutex<Tail>>,
    /// Disconnects when the reader thread has seen end-of-file.
    closed: Receiver<()>,
}

impl OutputCapture {
    fn start(mut pipe: PipeReader, limit: usize) -> io::Result<Self> {
        let tail = Arc::new(Mutex::new(Tail::new(limit)));
        let shared = Arc::clone(&tail);
        let (closed_tx, closed) = crossbeam_channel::bounded::<()>(0);
        thread::Builder::new()
            .name("queuectl-job-output".into())
            .spawn(move || {
                let _closed = closed_tx;
                let mut buf = vec![0; 64 * 1024];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => shared.lock().push(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            shared
                                .lock()
                                .note(format!("reading the output failed: {e}"));
                            break;
                        }
                    }
                }
            })?;
        Ok(Self { tail, closed })
    }

    /// Waits until every writer has closed the output pipe or `deadline` (`None`: forever)
    /// has passed; returns whether the pipe closed.
    fn wait_closed(&self, deadline: Option<Instant>) -> bool {
        // Nothing is ever sent: the reader thread drops its sender at end-of-file.
        match deadline {
            Some(deadline) => !matches!(
                self.closed.recv_deadline(deadline),
                Err(RecvTimeoutError::Timeout)
            ),
            None => {
                let _ = self.closed.recv();
                true
            }
        }
    }

    /// The captured output, after waiting up to `drain` for the pipe to close.
    fn finish(self, drain: Duration) -> String {
        let closed = self.wait_closed(Instant::now().checked_add(drain));
        let mut tail = self.tail.lock();
        if !closed {
            // The reader thread stays blocked until that process closes the pipe; it only
            // appends to a buffer nobody reads any more.
            tail.note(format!(
                "output capture stopped: a process outside the job's process group still held \
                 its output open {drain:?} after the job ended"
            ));
        }
        tail.render()
    }
}

/// The last `limit` bytes of a stream, and how many bytes before them were dropped.
#[derive(Debug)]
struct Tail {
    limit: usize,
    bytes: VecDeque<u8>,
    dropped: u64,
    notes: Vec<String>,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            bytes: VecDeque::new(),
            dropped: 0,
            notes: Vec::new(),
        }
    }

    fn push(&mut self, data: &[u8]) {
        let skip = data.len().saturating_sub(self.limit);
        let data = &data[skip..];
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.limit);
        self.bytes.drain(..overflow);
        self.bytes.extend(data);
        self.dropped += (skip + overflow) as u64;
    }

    /// Adds a line about the capture itself, shown after the output.
    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The kept bytes as lossy UTF-8, after a `[... N bytes truncated]` line if bytes were
    /// dropped, followed by the notes.
    fn render(&self) -> String {
        let mut kept: Vec<u8> = self.bytes.iter().copied().collect();
        let mut dropped = self.dropped;
        if dropped > 0 {
            // The cut may have split a character: drop its orphaned continuation bytes rather
            // than render them as replacement characters.
            let orphans = kept
                .iter()
                .take(3)
                .take_while(|&&b| b & 0xc0 == 0x80)
                .count();
            kept.drain(..orphans);
            dropped += orphans as u64;
        }
        let mut out = String::new();
        if dropped > 0 {
            let _ = writeln!(out, "[... {dropped} bytes truncated]");
        }
        out.push_str(&String::from_utf8_lossy(&kept));
        for note in &self.notes {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            let _ = writeln!(out, "[{note}]");
        }
        out
    }
}

/// An error saying what was being done when `source` happened.
#[derive(Debug, thiserror::Error)]
#[error("could not {what}")]
struct Context {
    what: String,
    source: io::Error,
}

/// Wraps `source` with what was being done, keeping its kind.
fn context(what: impl Into<String>, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        Context {
            what: what.into(),
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;
    use crate::job::{NewJob, now};
    use crate::storage::StorageExt;
    use std::io::{BufRead, BufReader};

    const LONG: Duration = Duration::from_secs(10);

    fn job(command: &str) -> Job {
        let mut job = MemoryStorage::new()
            .enqueue(NewJob::new(command), now())
            .unwrap();
        job.attempts = 1;
        job.timeout = None;
        job
    }

    /// Runs `f` on a thread and returns its result, failing the test if it takes longer than
    /// `LONG`.
    fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(LONG)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// Whether `pid` is a live process (a zombie counts as dead).
    fn is_running(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next());
                !matches!(state, Some('Z' | 'X'))
            }
            Err(_) if std::path::Path::new("/proc/self/stat").exists() => false,
            Err(_) => nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok(),
        }
    }

    fn assert_gone(pid: i32) {
        let deadline = Instant::now() + LONG;
        while is_running(pid) {
            if Instant::now() > deadline {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                panic!("process {pid} is still running");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn tail_keeps_everything_under_the_limit() {
        let mut tail = Tail::new(10);
        tail.push(b"hello ");
        tail.push(b"you");
        assert_eq!(tail.render(), "hello you");
        tail.push(b"!");
        assert_eq!(tail.render(), "hello you!");
    }

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut tail = Tail::new(4);
        tail.push(b"abc");
        tail.push(b"defgh");
        assert_eq!(tail.render(), "[... 4 bytes truncated]\nefgh");
        tail.push(b"0123456789");
        assert_eq!(tail.render(), "[... 14 bytes truncated]\n6789");
        for byte in b"xyz" {
            tail.push(&[*byte]);
        }
        assert_eq!(tail.render(), "[... 17 bytes truncated]\n9xyz");

        let mut nothing = Tail::new(0);
        nothing.push(b"abc");
        assert_eq!(nothing.render(), "[... 3 bytes truncated]\n");
        assert_eq!(Tail::new(0).render(), "");
    }

    #[test]
    fn tail_is_lossy_utf8_and_does_not_start_inside_a_character() {
        let mut invalid = Tail::new(100);
        invalid.push(b"ok \xff\n");
        assert_eq!(invalid.render(), "ok \u{fffd}\n");

        // "é" is two bytes: a cut after its first byte drops the orphaned second one.
        let mut cut = Tail::new(3);
        cut.push("aébc".as_bytes());
        assert_eq!(cut.render(), "[... 3 bytes truncated]\nbc");
        let mut whole = Tail::new(4);
        whole.push("aébc".as_bytes());
        assert_eq!(whole.render(), "[... 1 bytes truncated]\nébc");
    }

    #[test]
    fn notes_follow_the_output_on_their_own_line() {
        let mut tail = Tail::new(100);
        tail.push(b"partial");
        tail.note("something happened".into());
        assert_eq!(tail.render(), "partial\n[something happened]\n");
    }

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(
            exit_status(ExitStatus::from_raw(0)),
            (Status::Succeeded, Some(0))
        );
        assert_eq!(
            exit_status(ExitStatus::from_raw(3 << 8)),
            (Status::Failed("exited with code 3".into()), Some(3))
        );
        assert_eq!(
            exit_status(ExitStatus::from_raw(9)),
            (Status::Failed("killed by signal SIGKILL (9)".into()), None)
        );
        assert_eq!(
            exit_status(ExitStatus::from_raw(0x80 | 11)),
            (
                Status::Failed("killed by signal SIGSEGV (11), core dumped".into()),
                None
            )
        );
    }

    #[test]
    fn errors_carry_their_context_in_the_chain() {
        let err = ShellExecutor::new()
            .shell("/nonexistent/queuectl-sh")
            .execute(&job("true"), &CancelSignal::never())
            .unwrap_err();
        let ExecutorError::Spawn { ref source, .. } = err else {
            panic!("expected a spawn error, got {err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            source.to_string(),
            "could not run \"/nonexistent/queuectl-sh\""
        );
        let cause = std::error::Error::source(source).expect("the os error");
        assert!(cause.to_string().contains("No such file"), "{cause}");
    }

    /// The mechanism behind worker-death protection: closing the lifeline alone, with the
    /// executor doing nothing else, kills the leader and its grandchildren.
    #[test]
    fn closing_the_lifeline_kills_the_whole_group() {
        let exec = ShellExecutor::new();
        let (output_read, output_write) = io::pipe().unwrap();
        let (mut child, lifeline) = exec
            .spawn(&job("sleep 30 & echo $!; wait"), output_write)
            .unwrap();
        let mut lines = BufReader::new(output_read);
        let grandchild: i32 = within("the grandchild's pid", move || {
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            line.trim().parse().unwrap()
        });
        assert!(is_running(grandchild));
        assert!(is_running(child.id() as i32));

        drop(lifeline);
        let exit = within("the leader's exit", move || child.wait().unwrap());
        assert_eq!(exit.signal(), Some(Signal::SIGKILL as i32));
        assert_gone(grandchild);
    }

    /// The watcher keeps guarding the group after a `SIGTERM` to it: that is when the worker
    /// waits out the grace period, and it may die then too.
    #[test]
    fn the_watcher_outlives_sigterm() {
        let exec = ShellExecutor::new();
        let (output_read, output_write) = io::pipe().unwrap();
        let (mut child, lifeline) = exec
            .spawn(&job("trap '' TERM; sleep 30 & echo $!; wait"), output_write)
            .unwrap();
        let mut lines = BufReader::new(output_read);
        let grandchild: i32 = within("the grandchild's pid", move || {
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            line.trim().parse().unwrap()
        });
        killpg(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();

        drop(lifeline);
        let exit = within("the leader's exit", move || child.wait().unwrap());
        assert_eq!(exit.signal(), Some(Signal::SIGKILL as i32));
        assert_gone(grandchild);
    }

    /// A process that leaves the group and keeps the output open cannot hold the attempt.
    #[test]
    fn output_held_open_outside_the_group_stops_capture_after_the_drain() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("escaped.pid");
        // The command substitution returns once the escaped process has left the group and
        // closed the substitution's pipe; its standard error is still the job's output.
        let command = format!(
            "echo before; pid=$(setsid sh -c 'echo $$; exec sleep 30 >/dev/null' &); \
             echo \"$pid\" > {}; echo after",
            pid_file.display()
        );
        let exec = ShellExecutor {
            output_drain: Duration::from_millis(200),
            ..ShellExecutor::new()
        };
        let started = Instant::now();
        let outcome = within("the attempt", move || {
            exec.execute(&job(&command), &CancelSignal::never())
        })
        .unwrap();
        let elapsed = started.elapsed();
        let escaped: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(is_running(escaped), "the process should have escaped");
        // Clean up what the executor cannot reach.
        nix::sys::signal::kill(Pid::from_raw(escaped), Signal::SIGKILL).unwrap();

        assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
        assert_eq!(outcome.status, Status::Succeeded);
        assert!(
            outcome.output.starts_with("before\nafter\n"),
            "{:?}",
            outcome.output
        );
        assert!(
            outcome
                .output
                .ends_with("still held its output open 200ms after the job ended]\n"),
            "{:?}",
            outcome.output
        );
    }
}
