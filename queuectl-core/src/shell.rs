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
//! The thread calling [`execute`](Executor::execute) watches the attempt itself, starting no
//! thread of its own: on Linux it sleeps in `poll` on a pidfd of the leader (readable once the
//! leader has exited, which leaves it unreaped) and on the output pipe, reading the output as
//! it comes, and wakes up at least every 50 ms to look at the cancel signal. Where pidfds are
//! not available (other systems, Linux before 5.3, sandboxes forbidding `pidfd_open`), a helper
//! thread per attempt waits for the leader with `waitid(WNOWAIT)` and closes a pipe the
//! attempt polls instead.
//!
//! # The lifeline
//!
//! The worker itself may die, even by `SIGKILL`, and a job must then not run on unobserved
//! while the queue hands it to another worker. The executor creates a pipe per attempt and
//! keeps its write end (close-on-exec, so no other process inherits it). The leader receives
//! the read end as its standard input and runs this prefix, on the first line, before the
//! command:
//!
//! ```sh
//! exec 3<&0 </dev/null; trap '' HUP INT TERM; ( ( read _ <&3; kill -KILL 0 ) >/dev/null 2>&1 & ); trap - HUP INT TERM; exec 3<&-; COMMAND
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
//! shell running the command: a bare `wait`, `jobs` or `$!` in the command never sees it.
//!
//! The command follows the prefix on the same line, so it runs as the shell's own script,
//! exactly as `sh -c COMMAND` would run it: `$0` is `sh`, there are no positional
//! parameters, and its line numbers and error messages are its own (`sh: 1: foo: not found`,
//! not an `eval` of a wrapper).
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
use std::mem;
#[cfg(target_os = "linux")]
use std::os::fd::OwnedFd;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::SendError;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
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

/// Longest time an attempt goes without looking at its [`CancelSignal`].
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// What the leader shell runs before the command, on the command's first line; see the
/// module documentation.
const LIFELINE_PREFIX: &str = "exec 3<&0 </dev/null; trap '' HUP INT TERM; \
     ( ( read _ <&3; kill -KILL 0 ) >/dev/null 2>&1 & ); trap - HUP INT TERM; exec 3<&-; ";

/// `$0` of the leader shell: the name its error messages start with, as for `sh -c`.
const SHELL_NAME: &str = "sh";

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
    /// Whether the leader is watched through a pidfd when possible; tests turn it off to
    /// exercise the fallback.
    #[cfg(target_os = "linux")]
    use_pidfd: bool,
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
            #[cfg(target_os = "linux")]
            use_pidfd: true,
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
            .arg(script(&job.command))
            .arg(SHELL_NAME)
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

/// The leader's script: the lifeline prefix, then the command on the same first line.
fn script(command: &str) -> String {
    let mut script = String::with_capacity(LIFELINE_PREFIX.len() + command.len());
    script.push_str(LIFELINE_PREFIX);
    script.push_str(command);
    script
}

impl Executor for ShellExecutor {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        if cancel.is_cancelled() {
            return Ok(Outcome::cancelled());
        }
        Attempt::start(self, job)?.run(cancel)
    }
}

/// What [`Attempt::wait`] waits for, besides its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The leader's exit.
    Exited,
    /// The end of the output: every writer has closed the pipe.
    Closed,
}

/// What ended [`Attempt::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The leader exited.
    Exited,
    /// Every writer closed the output pipe.
    Closed,
    /// The deadline passed.
    Deadline,
    /// The cancel signal fired.
    Cancelled,
}

/// One running attempt, watched from the thread that runs it. Dropping it on an error path
/// still cleans up: the lifeline closes first (the watcher kills the group), then the leader
/// is reaped in the background once it has exited.
struct Attempt<'a> {
    exec: &'a ShellExecutor,
    job: &'a Job,
    started: Instant,
    /// The write end of the lifeline, `None` once closed. Declared before `leader` so that it
    /// is dropped first.
    lifeline: Option<PipeWriter>,
    leader: Leader,
    output: Output,
}

impl<'a> Attempt<'a> {
    fn start(exec: &'a ShellExecutor, job: &'a Job) -> Result<Self, ExecutorError> {
        let (output_read, output_write) = io::pipe().map_err(|e| ExecutorError::Spawn {
            id: job.id.clone(),
            source: context("create the output pipe", e),
        })?;
        let started = Instant::now();
        let (child, lifeline) = exec.spawn(job, output_write)?;
        let mut leader = Leader::new(child);
        #[cfg(target_os = "linux")]
        let watched = leader.watch(exec.use_pidfd);
        #[cfg(not(target_os = "linux"))]
        let watched = leader.watch();
        if let Err(source) = watched {
            // The watcher kills the group once the lifeline has closed; dropping the leader then
            // reaps it in the background.
            drop(lifeline);
            drop(leader);
            return Err(ExecutorError::Process {
                op: "wait for",
                id: job.id.clone(),
                source,
            });
        }
        Ok(Self {
            exec,
            job,
            started,
            lifeline: Some(lifeline),
            leader,
            output: Output::new(output_read, exec.output_limit),
        })
    }

    fn run(mut self, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        let limit = self.job.timeout;
        // A limit too large to be added to an instant is no limit.
        let deadline = limit.and_then(|limit| self.started.checked_add(limit));
        let stopped = match self.wait(Until::Exited, deadline, Some(cancel))? {
            Wake::Exited | Wake::Closed => None,
            // The job may have exited just as the stop came: then it simply finished.
            _ if self.has_exited()? => None,
            wake => {
                self.terminate()?;
                Some(match wake {
                    Wake::Cancelled => Status::Cancelled,
                    _ => Status::TimedOut(limit.unwrap_or_default()),
                })
            }
        };
        let duration = self.started.elapsed();

        // The leader has exited but is not reaped yet, so the group id is still ours: kill
        // whatever the job left running (a no-op after `terminate`).
        self.signal(Signal::SIGKILL)?;
        drop(self.lifeline.take());
        let drain = self.exec.output_drain;
        if self.wait(Until::Closed, Instant::now().checked_add(drain), None)? != Wake::Closed {
            self.output.tail.note(format!(
                "output capture stopped: a process outside the job's process group still held \
                 its output open {drain:?} after the job ended"
            ));
            self.output.abandon();
        }
        let exit = self
            .leader
            .reap()
            .map_err(|source| self.process_error("wait for", source))?;
        let (status, exit_code) = match stopped {
            Some(status) => (status, exit.code()),
            None => exit_status(exit),
        };
        Ok(Outcome {
            status,
            exit_code,
            duration,
            output: self.output.tail.render(),
        })
    }

    /// Stops a running job: `SIGTERM` to the group, then `SIGKILL` once the whole group has
    /// finished or the grace period is over. Returns once the leader has exited, which after
    /// `SIGKILL` only a process stuck in the kernel (uninterruptible sleep) can delay.
    fn terminate(&mut self) -> Result<(), ExecutorError> {
        self.signal(Signal::SIGTERM)?;
        let grace_over = Instant::now().checked_add(self.exec.kill_grace);
        if self.wait(Until::Exited, grace_over, None)? == Wake::Exited {
            // The rest of the group may still be cleaning up: give it what remains of the grace
            // period. Its processes hold the output pipe, so its closing tells that they are
            // done (the watcher does not hold it).
            self.wait(Until::Closed, grace_over, None)?;
            self.signal(Signal::SIGKILL)
        } else {
            self.signal(Signal::SIGKILL)?;
            self.wait(Until::Exited, None, None)?;
            Ok(())
        }
    }

    /// Reads the job's output until the first of: `until`, `deadline`, and `cancel` firing,
    /// which is checked at least every [`CANCEL_CHECK`]. In between, the thread sleeps in
    /// `poll` on the output pipe and (for [`Until::Exited`]) the leader's exit notice.
    fn wait(
        &mut self,
        until: Until,
        deadline: Option<Instant>,
        cancel: Option<&CancelSignal>,
    ) -> Result<Wake, ExecutorError> {
        loop {
            if until == Until::Closed && self.output.pipe.is_none() {
                return Ok(Wake::Closed);
            }
            if cancel.is_some_and(CancelSignal::is_cancelled) {
                return Ok(Wake::Cancelled);
            }
            let mut timeout = None;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Wake::Deadline);
                }
                timeout = Some(left);
            }
            if cancel.is_some() {
                timeout = Some(timeout.map_or(CANCEL_CHECK, |left| left.min(CANCEL_CHECK)));
            }
            let exit_fd = match until {
                Until::Exited => match self.leader.exit_fd() {
                    Some(fd) => Some(fd),
                    None => return Ok(Wake::Exited),
                },
                Until::Closed => None,
            };
            let output_fd = self.output.pipe.as_ref().map(AsFd::as_fd);
            let mut fds: Vec<PollFd<'_>> = exit_fd
                .into_iter()
                .chain(output_fd)
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            debug_assert!(!fds.is_empty() || timeout.is_some(), "a wait without end");
            let timeout = timeout.map_or(PollTimeout::NONE, |left| {
                // Rounded up, so that the deadline has passed when `poll` times out.
                PollTimeout::try_from(left.as_nanos().div_ceil(1_000_000))
                    .unwrap_or(PollTimeout::MAX)
            });
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => {
                    let source = context("poll the job's shell and output", errno.into());
                    return Err(self.process_error("wait for", source));
                }
            }
            // Unknown flags count as an event: the check below finds out what happened.
            let mut ready = fds.iter().map(|fd| fd.any().unwrap_or(true));
            let exit_ready = exit_fd.is_some() && ready.next().unwrap_or(false);
            let output_ready = output_fd.is_some() && ready.next().unwrap_or(false);
            drop(fds);
            if exit_ready
                && self
                    .leader
                    .has_exited(true)
                    .map_err(|source| self.process_error("wait for", source))?
            {
                return Ok(Wake::Exited);
            }
            if output_ready {
                self.output.read();
            }
        }
    }

    /// Whether the leader has exited, without waiting.
    fn has_exited(&mut self) -> Result<bool, ExecutorError> {
        self.leader
            .has_exited(false)
            .map_err(|source| self.process_error("wait for", source))
    }

    /// Sends `signal` to the job's process group. A group that no longer exists (`ESRCH`) is
    /// not an error: there is nothing left to signal. Any other error (`EPERM`: no process of
    /// the group may be signalled by us) fails the attempt with [`ExecutorError::Process`]; the
    /// lifeline still closes when the attempt is dropped.
    fn signal(&self, signal: Signal) -> Result<(), ExecutorError> {
        let group = self.leader.pid;
        match killpg(group, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(self.process_error(
                "signal",
                context(
                    format!("send {} to process group {group}", signal.as_str()),
                    errno.into(),
                ),
            )),
        }
    }

    fn process_error(&self, op: &'static str, source: io::Error) -> ExecutorError {
        ExecutorError::Process {
            op,
            id: self.job.id.clone(),
            source,
        }
    }
}

/// The attempt's shell, leader of the job's process group, and how its exit is observed.
struct Leader {
    /// Its pid, which is also the id of the job's process group.
    pid: Pid,
    state: LeaderState,
}

/// What a waiter thread returns: the leader, and how waiting for it went (with its status if
/// it had to be reaped for that).
type Waited = (Child, io::Result<Option<ExitStatus>>);

enum LeaderState {
    /// Started, not watched yet.
    Started(Child),
    /// Watched through a pidfd, which becomes readable when the leader exits (Linux 5.3 and
    /// later).
    #[cfg(target_os = "linux")]
    Pidfd(Child, OwnedFd),
    /// Watched by a helper thread, which closes the other end of `notice` once the leader has
    /// exited.
    Thread {
        notice: PipeReader,
        waiter: JoinHandle<Option<Waited>>,
    },
    /// Exited and, unless `status` is known, a zombie until [`Leader::reap`].
    Exited(Child, Option<ExitStatus>),
    /// Reaped.
    Reaped,
}

impl Leader {
    fn new(child: Child) -> Self {
        Self {
            // A pid is a positive `pid_t`; `Child::id` merely returns it as `u32`.
            pid: Pid::from_raw(child.id() as i32),
            state: LeaderState::Started(child),
        }
    }

    /// Starts watching for the leader's exit: through a pidfd where possible (and `use_pidfd`),
    /// else with a helper thread.
    fn watch(&mut self, #[cfg(target_os = "linux")] use_pidfd: bool) -> io::Result<()> {
        let child = match mem::replace(&mut self.state, LeaderState::Reaped) {
            LeaderState::Started(child) => child,
            watched => {
                self.state = watched;
                return Ok(());
            }
        };
        #[cfg(target_os = "linux")]
        if use_pidfd {
            use rustix::process::{Pid as RawPid, PidfdFlags, pidfd_open};
            // Race-free: the child is ours and not reaped, so its pid cannot have been reused.
            // The pidfd is close-on-exec. Fails before Linux 5.3, or where a sandbox forbids
            // the call: then a thread watches instead.
            if let Ok(pidfd) = pidfd_open(RawPid::from_child(&child), PidfdFlags::empty()) {
                self.state = LeaderState::Pidfd(child, pidfd);
                return Ok(());
            }
        }
        let (state, watched) = watch_with_thread(child);
        self.state = state;
        watched
    }

    /// The descriptor that polls readable once the leader has exited; `None` once it is known
    /// to have exited.
    fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            #[cfg(target_os = "linux")]
            LeaderState::Pidfd(_, pidfd) => Some(pidfd.as_fd()),
            LeaderState::Thread { notice, .. } => Some(notice.as_fd()),
            LeaderState::Started(_) | LeaderState::Exited(..) | LeaderState::Reaped => None,
        }
    }

    /// Whether the leader has exited, without waiting and without reaping it. `notified`: its
    /// [`exit_fd`](Self::exit_fd) polled readable.
    fn has_exited(&mut self, notified: bool) -> io::Result<bool> {
        let (state, exited) = match mem::replace(&mut self.state, LeaderState::Reaped) {
            // A pidfd polls readable only once the process has exited.
            #[cfg(target_os = "linux")]
            LeaderState::Pidfd(child, _) if notified => {
                (LeaderState::Exited(child, None), Ok(true))
            }
            #[cfg(target_os = "linux")]
            LeaderState::Pidfd(child, pidfd) => {
                use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
                let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
                match waitid(Id::Pid(self.pid), flags) {
                    Ok(WaitStatus::StillAlive) => (LeaderState::Pidfd(child, pidfd), Ok(false)),
                    Ok(_) => (LeaderState::Exited(child, None), Ok(true)),
                    Err(errno) => (
                        LeaderState::Pidfd(child, pidfd),
                        Err(context("wait for the job's shell to exit", errno.into())),
                    ),
                }
            }
            LeaderState::Thread { notice, waiter } if notified || waiter.is_finished() => {
                drop(notice);
                // The thread closes the notice just before it returns.
                match waiter.join() {
                    Ok(Some((child, Ok(status)))) => (LeaderState::Exited(child, status), Ok(true)),
                    Ok(Some((child, Err(error)))) => (LeaderState::Started(child), Err(error)),
                    Ok(None) => (
                        LeaderState::Reaped,
                        Err(io::Error::other("the waiter thread never got the process")),
                    ),
                    Err(_) => (
                        LeaderState::Reaped,
                        Err(io::Error::other("the waiter thread panicked")),
                    ),
                }
            }
            state @ LeaderState::Exited(..) => (state, Ok(true)),
            state => (state, Ok(false)),
        };
        self.state = state;
        exited
    }

    /// Reaps the leader, which has exited, and returns how it ended. Until then its pid, the
    /// id of the job's process group, cannot be reused.
    fn reap(&mut self) -> io::Result<ExitStatus> {
        match mem::replace(&mut self.state, LeaderState::Reaped) {
            LeaderState::Exited(_, Some(status)) => Ok(status),
            LeaderState::Exited(mut child, None) => child.wait(),
            state => {
                self.state = state;
                Err(io::Error::other("the job's shell has not exited"))
            }
        }
    }
}

/// Dropping a leader that has not been reaped (an error path) reaps it in the background once
/// it has exited; it is up to the attempt to have closed the lifeline first, so that it does.
impl Drop for Leader {
    fn drop(&mut self) {
        let state = mem::replace(&mut self.state, LeaderState::Reaped);
        if matches!(state, LeaderState::Reaped | LeaderState::Exited(_, Some(_))) {
            return;
        }
        let ours = Arc::new(Mutex::new(Some(state)));
        let theirs = Arc::clone(&ours);
        let reaper = thread::Builder::new()
            .name("queuectl-job-reap".into())
            .spawn(move || reap_in_any_state(theirs.lock().take()));
        if reaper.is_err() {
            reap_in_any_state(ours.lock().take());
        }
    }
}

/// Blocks until the leader in `state` has exited, and reaps it.
fn reap_in_any_state(state: Option<LeaderState>) {
    let mut child = match state {
        Some(LeaderState::Started(child) | LeaderState::Exited(child, None)) => child,
        #[cfg(target_os = "linux")]
        Some(LeaderState::Pidfd(child, _)) => child,
        Some(LeaderState::Thread { waiter, .. }) => match waiter.join() {
            Ok(Some((child, Ok(None) | Err(_)))) => child,
            _ => return,
        },
        Some(LeaderState::Exited(_, Some(_)) | LeaderState::Reaped) | None => return,
    };
    let _ = child.wait();
}

/// Hands `child` to a new thread that waits for it to exit and then closes the write end of
/// the pipe whose read end the returned [`LeaderState::Thread`] holds. On error the child is
/// returned unwatched.
fn watch_with_thread(child: Child) -> (LeaderState, io::Result<()>) {
    let (notice, notify) = match io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            return (
                LeaderState::Started(child),
                Err(context("create a pipe", e)),
            );
        }
    };
    // The thread starts before it gets the child, so that a failure to start it leaves the
    // child with us.
    let (send_child, child_rx) = crossbeam_channel::bounded::<Child>(1);
    let waiter = thread::Builder::new()
        .name("queuectl-job-wait".into())
        .spawn(move || {
            let mut child = child_rx.recv().ok()?;
            let waited = wait_without_reaping(&mut child);
            drop(notify);
            Some((child, waited))
        });
    let waiter = match waiter {
        Ok(waiter) => waiter,
        Err(e) => {
            let error = context("start the waiter thread", e);
            return (LeaderState::Started(child), Err(error));
        }
    };
    match send_child.send(child) {
        Ok(()) => (LeaderState::Thread { notice, waiter }, Ok(())),
        // Only a thread that already ended could refuse it.
        Err(SendError(child)) => (
            LeaderState::Started(child),
            Err(io::Error::other(
                "the waiter thread ended before the process started",
            )),
        ),
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

/// The read end of the job's output pipe and what has been read from it. It is read by the
/// attempt's own thread whenever it polls readable, so that a chatty job never blocks on a
/// full pipe.
struct Output {
    /// `None` once every writer has closed the pipe (or reading it failed).
    pipe: Option<PipeReader>,
    tail: Tail,
}

/// Size of the buffer the output is read into.
const READ_BUFFER: usize = 16 * 1024;

impl Output {
    fn new(pipe: PipeReader, limit: usize) -> Self {
        Self {
            pipe: Some(pipe),
            tail: Tail::new(limit),
        }
    }

    /// Reads once from the pipe, which must have polled readable (or closed), so that the
    /// read does not block.
    fn read(&mut self) {
        let Some(pipe) = &mut self.pipe else {
            return;
        };
        let mut buf = [0; READ_BUFFER];
        match pipe.read(&mut buf) {
            Ok(0) => self.pipe = None,
            Ok(n) => self.tail.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                self.tail.note(format!("reading the output failed: {e}"));
                self.pipe = None;
            }
        }
    }

    /// Stops capturing. A process that escaped the group still holds the pipe: a thread
    /// reads and discards what it writes until it closes it, so that it does not get `EPIPE`
    /// or `SIGPIPE` for the attempt having ended.
    fn abandon(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            // Should the thread not start, the pipe merely closes.
            let _ = thread::Builder::new()
                .name("queuectl-job-output".into())
                .spawn(move || io::copy(&mut pipe, &mut io::sink()));
        }
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

    /// Starts `command` (which must print the pid of a background grandchild on its first
    /// line) as an attempt's leader; returns the leader, the lifeline and the grandchild's pid.
    fn spawn_with_grandchild(command: &str) -> (std::process::Child, PipeWriter, i32) {
        let (output_read, output_write) = io::pipe().unwrap();
        let (child, lifeline) = ShellExecutor::new()
            .spawn(&job(command), output_write)
            .unwrap();
        let mut lines = BufReader::new(output_read);
        let grandchild = within("the grandchild's pid", move || {
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            line.trim().parse().unwrap()
        });
        (child, lifeline, grandchild)
    }

    /// The mechanism behind worker-death protection: closing the lifeline alone, with the
    /// executor doing nothing else, kills the leader and its grandchildren.
    #[test]
    fn closing_the_lifeline_kills_the_whole_group() {
        let (mut child, lifeline, grandchild) = spawn_with_grandchild("sleep 30 & echo $!; wait");
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
        let (mut child, lifeline, grandchild) =
            spawn_with_grandchild("trap '' TERM; sleep 30 & echo $!; wait");
        killpg(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();

        drop(lifeline);
        let exit = within("the leader's exit", move || child.wait().unwrap());
        assert_eq!(exit.signal(), Some(Signal::SIGKILL as i32));
        assert_gone(grandchild);
    }

    /// An executor that watches its leaders with a helper thread, as where pidfds are not
    /// available.
    fn threaded() -> ShellExecutor {
        ShellExecutor {
            #[cfg(target_os = "linux")]
            use_pidfd: false,
            ..ShellExecutor::new()
        }
    }

    #[test]
    fn without_pidfds_a_thread_watches_the_leader() {
        let outcome = within("the attempt", || {
            threaded().execute(
                &job("echo out; echo err >&2; exit 4"),
                &CancelSignal::never(),
            )
        })
        .unwrap();
        assert_eq!(outcome.status, Status::Failed("exited with code 4".into()));
        assert_eq!(outcome.exit_code, Some(4));
        assert_eq!(outcome.output, "out\nerr\n");

        let outcome = within("the attempt", || {
            threaded().execute(&job("kill -9 $$"), &CancelSignal::never())
        })
        .unwrap();
        assert_eq!(
            outcome.status,
            Status::Failed("killed by signal SIGKILL (9)".into())
        );
    }

    #[test]
    fn without_pidfds_timeouts_and_leftovers_still_kill_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let command = format!("sleep 30 & echo $! > {}; exit 5", pid_file.display());
        let outcome = within("the attempt", move || {
            threaded().execute(&job(&command), &CancelSignal::never())
        })
        .unwrap();
        assert_eq!(outcome.exit_code, Some(5));
        assert_gone(
            std::fs::read_to_string(&pid_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        );

        let limit = Duration::from_millis(300);
        let mut slow = job(&format!(
            "sleep 30 & echo $! > {}; wait",
            pid_file.display()
        ));
        slow.timeout = Some(limit);
        let outcome = within("the attempt", move || {
            threaded().execute(&slow, &CancelSignal::never())
        })
        .unwrap();
        assert_eq!(outcome.status, Status::TimedOut(limit));
        assert!(outcome.duration >= limit, "{outcome:?}");
        assert_gone(
            std::fs::read_to_string(&pid_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        );
    }

    #[test]
    fn without_pidfds_cancel_stops_the_job() {
        let (mut canceller, signal) = crate::executor::cancel_pair();
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let _ = tx.send(threaded().execute(&job("echo started; sleep 30"), &signal));
        });
        canceller.cancel();
        let outcome = rx.recv_timeout(LONG).unwrap().unwrap();
        assert_eq!(outcome.status, Status::Cancelled);
    }

    /// The cleanup on error paths: an attempt dropped while its job runs closes the lifeline,
    /// so that the whole group dies, and the leader is reaped, not left a zombie.
    #[test]
    fn a_dropped_attempt_kills_the_group_and_reaps_the_leader() {
        for exec in [ShellExecutor::new(), threaded()] {
            let job = job("sleep 30 & echo $$ $!; wait");
            let mut attempt = Attempt::start(&exec, &job).unwrap();
            let mut pids = String::new();
            while !pids.ends_with('\n') {
                let pipe = attempt.output.pipe.as_mut().unwrap();
                let mut buf = [0; 64];
                let n = pipe.read(&mut buf).unwrap();
                assert!(n > 0, "the job ended early: {pids:?}");
                pids.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
            let pids: Vec<i32> = pids
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
            let [leader, grandchild] = pids[..] else {
                panic!("expected two pids, got {pids:?}");
            };
            drop(attempt);
            assert_gone(grandchild);
            let deadline = Instant::now() + LONG;
            while std::path::Path::new(&format!("/proc/{leader}")).exists() {
                assert!(Instant::now() < deadline, "{leader} was not reaped");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// A process that escaped the group may keep writing to the job's output after the
    /// attempt has given up on it, without getting `SIGPIPE`.
    #[test]
    fn an_escaped_process_can_still_write_after_capture_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let done = dir.path().join("done");
        for fifo in [&go, &done] {
            nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        // The escaped shell waits for the test to let it write to its standard error (the
        // job's output), then reports whether that worked. As in the test above, the command
        // substitution returns once it has left the group.
        let command = format!(
            "pid=$(setsid sh -c 'echo $$; exec >/dev/null; read _ < {go}; echo late >&2; \
             echo written > {done}' &); echo started",
            go = go.display(),
            done = done.display(),
        );
        let exec = ShellExecutor {
            output_drain: Duration::from_millis(100),
            ..ShellExecutor::new()
        };
        let outcome = within("the attempt", move || {
            exec.execute(&job(&command), &CancelSignal::never())
        })
        .unwrap();
        assert!(
            outcome.output.starts_with("started\n"),
            "{:?}",
            outcome.output
        );
        assert!(
            outcome.output.contains("output capture stopped"),
            "{:?}",
            outcome.output
        );
        let report = within("the late write", move || {
            std::fs::write(&go, "go\n").unwrap();
            std::fs::read_to_string(&done).unwrap()
        });
        assert_eq!(report, "written\n");
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
