//! One attempt: start the leader behind its gate, wait for it (and for the deadline and the
//! cancel signal) while reading its output, stop it, and collect how it ended.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};

use crate::executor::{CancelSignal, ExecutorError, LiveOutput, Outcome, Status};
use crate::job::Job;
use crate::pool::error_chain;

use super::output::Output;
use super::watch::Leader;
use super::{CANCEL_CHECK, ShellExecutor, context, open_gate, supervisor};

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
/// still cleans up: the group is killed and unregistered, then the leader is reaped in the
/// background once it has exited.
pub(super) struct Attempt<'a> {
    exec: &'a ShellExecutor,
    job: &'a Job,
    started: Instant,
    /// Whether the supervisor knows the group (and must be told when it ends).
    registered: bool,
    leader: Leader,
    pub(super) output: Output,
}

impl<'a> Attempt<'a> {
    /// Starts the leader behind its gate, watches it, registers its group with the
    /// supervisor, then opens the gate. The output goes to `live` too as it comes, if given.
    pub(super) fn start(
        exec: &'a ShellExecutor,
        job: &'a Job,
        live: Option<&LiveOutput>,
    ) -> Result<Self, ExecutorError> {
        let (output_read, output_write) = io::pipe().map_err(|e| ExecutorError::Spawn {
            id: job.id.clone(),
            source: context("create the output pipe", e),
        })?;
        let started = Instant::now();
        // Until the gate opens, the leader waits; if `gate` is dropped unopened (any error
        // below), it exits without running the command.
        let (child, gate) = exec.spawn(job, output_write)?;
        let mut attempt = Self {
            exec,
            job,
            started,
            registered: false,
            leader: Leader::new(child),
            output: Output::new(output_read, exec.output_limit, live),
        };
        if let Err(source) = attempt.leader.watch(exec.exit_watch) {
            return Err(attempt.process_error("wait for", source));
        }
        let spawn_error = |source| ExecutorError::Spawn {
            id: job.id.clone(),
            source,
        };
        supervisor::register(&exec.shell, attempt.leader.pid.as_raw()).map_err(spawn_error)?;
        attempt.registered = true;
        open_gate(gate).map_err(spawn_error)?;
        Ok(attempt)
    }

    /// Tells the supervisor the group has ended. Before the leader is reaped.
    fn unregister(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.registered) {
            return Ok(());
        }
        supervisor::unregister(&self.exec.shell, self.leader.pid.as_raw())
    }

    pub(super) fn run(mut self, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
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
        if let Err(error) = self.unregister() {
            self.output.tail.note(error_chain(&error));
        }
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
            signal: std::os::unix::process::ExitStatusExt::signal(&exit),
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
    /// the group may be signalled by us) fails the attempt with [`ExecutorError::Process`].
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

/// An attempt dropped before it ended (an error path): its group is killed while the
/// leader is unreaped (so the id is still ours), unregistered, and the leader is reaped in the
/// background once it has exited.
impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        let _ = killpg(self.leader.pid, Signal::SIGKILL);
        // The supervisor restarts without this group if the write fails: nothing is left
        // to undo, and there is no caller to tell.
        let _ = self.unregister();
    }
}

/// The status and exit code of a job whose leader ended on its own.
pub(super) fn exit_status(exit: ExitStatus) -> (Status, Option<i32>) {
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
