//! Noticing that a job's leader has exited, without reaping it: the two strategies side by
//! side. [`ExitWatch::Pidfd`] polls a pidfd (Linux 5.3 and later), which becomes readable
//! when the process exits; [`ExitWatch::Thread`] has a helper thread wait with
//! `waitid(WNOWAIT)` and close a pipe the attempt polls. Either way the leader stays an
//! unreaped zombie until [`Leader::reap`], so its pid, the id of the job's process group,
//! cannot be reused while the group may still be signalled.

use std::io::{self, PipeReader};
use std::mem;
#[cfg(target_os = "linux")]
use std::os::fd::OwnedFd;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::SendError;
use nix::errno::Errno;
use nix::unistd::Pid;
use parking_lot::Mutex;

use super::context;

/// How an attempt notices that its leader has exited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExitWatch {
    /// Poll a pidfd of the leader; where pidfds are not available (other systems, old
    /// kernels, sandboxes forbidding `pidfd_open`), fall back to [`ExitWatch::Thread`].
    #[default]
    Pidfd,
    /// A helper thread per attempt waits for the leader and closes a pipe.
    Thread,
}

/// The attempt's shell, leader of the job's process group, and how its exit is observed.
pub(super) struct Leader {
    /// Its pid, which is also the id of the job's process group.
    pub(super) pid: Pid,
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
    pub(super) fn new(child: Child) -> Self {
        Self {
            // A pid is a positive `pid_t`; `Child::id` merely returns it as `u32`.
            pid: Pid::from_raw(child.id() as i32),
            state: LeaderState::Started(child),
        }
    }

    /// Starts watching for the leader's exit with `how`; a pidfd that cannot be had falls
    /// back to a helper thread.
    pub(super) fn watch(&mut self, how: ExitWatch) -> io::Result<()> {
        let child = match mem::replace(&mut self.state, LeaderState::Reaped) {
            LeaderState::Started(child) => child,
            watched => {
                self.state = watched;
                return Ok(());
            }
        };
        #[cfg(target_os = "linux")]
        if how == ExitWatch::Pidfd {
            use rustix::process::{Pid as RawPid, PidfdFlags, pidfd_open};
            // Race-free: the child is ours and not reaped, so its pid cannot have been reused.
            // The pidfd is close-on-exec. Fails before Linux 5.3, or where a sandbox forbids
            // the call: then a thread watches instead.
            if let Ok(pidfd) = pidfd_open(RawPid::from_child(&child), PidfdFlags::empty()) {
                self.state = LeaderState::Pidfd(child, pidfd);
                return Ok(());
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = how;
        let (state, watched) = watch_with_thread(child);
        self.state = state;
        watched
    }

    /// The descriptor that polls readable once the leader has exited; `None` once it is known
    /// to have exited.
    pub(super) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            #[cfg(target_os = "linux")]
            LeaderState::Pidfd(_, pidfd) => Some(pidfd.as_fd()),
            LeaderState::Thread { notice, .. } => Some(notice.as_fd()),
            LeaderState::Started(_) | LeaderState::Exited(..) | LeaderState::Reaped => None,
        }
    }

    /// Whether the leader has exited, without waiting and without reaping it. `notified`: its
    /// [`exit_fd`](Self::exit_fd) polled readable.
    pub(super) fn has_exited(&mut self, notified: bool) -> io::Result<bool> {
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
    pub(super) fn reap(&mut self) -> io::Result<ExitStatus> {
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
/// it has exited; it is up to the attempt to have killed its group first, so that it does.
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
/// group id then stays reserved only while another process of the group is alive.
#[cfg(not(any(
    target_os = "android",
    target_os = "freebsd",
    all(target_os = "linux", not(target_env = "uclibc"))
)))]
fn wait_without_reaping(child: &mut Child) -> io::Result<Option<ExitStatus>> {
    child.wait().map(Some)
}
