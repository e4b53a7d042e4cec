//! The supervisor: one long-lived shell per worker process that kills the process groups of
//! running jobs when the worker process dies.
//!
//! The supervisor is `sh` running [`SCRIPT`] in a process group of its own, ignoring
//! `SIGHUP`, `SIGINT` and `SIGTERM`. Its standard input is a pipe whose only write end the
//! worker process holds (close-on-exec, so no job inherits it). The worker writes `+ PGID`
//! when a job's group starts and `- PGID` when the attempt has ended, *before* the group's
//! leader is reaped (while it is an unreaped zombie, the group id cannot be reused). When
//! the worker process dies, even by `SIGKILL`, the kernel closes the pipe: the supervisor
//! reads end-of-file and sends `SIGKILL` to every group still registered, then exits.
//!
//! A job's leader starts behind a gate (see [`super`]): it waits for one line on its
//! standard input, which the worker writes only after registering the group here. A worker
//! that dies between spawning a job and registering it closes the gate without writing, and
//! the leader exits before running the command. So no command runs unregistered.
//!
//! The supervisor costs one process per worker process and nothing per job but two short
//! writes to a pipe, where a watcher per job cost two forks of the shell per attempt.

use std::collections::HashSet;
use std::io::{self, PipeWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use parking_lot::Mutex;

use super::context;

/// The supervisor's script. `g` holds the registered group ids, space separated and padded
/// with spaces so that `" $id "` matches whole ids only.
pub(super) const SCRIPT: &str = "trap '' HUP INT TERM; g=' '; \
     while read -r op id; do case $op in \
       +) g=\"$g$id \" ;; \
       -) case $g in *\" $id \"*) g=\"${g%% $id *} ${g#* $id }\" ;; esac ;; \
     esac; done; \
     for id in $g; do kill -KILL -\"$id\" 2>/dev/null; done";

/// The running supervisor of this process, started with the first job.
static SUPERVISOR: Mutex<Option<Supervisor>> = parking_lot::const_mutex(None);

struct Supervisor {
    child: Child,
    pipe: PipeWriter,
    /// Every group registered and not yet ended, to hand to a restarted supervisor.
    groups: HashSet<i32>,
}

impl Supervisor {
    fn start(shell: &Path, groups: HashSet<i32>) -> io::Result<Self> {
        let (read, pipe) = io::pipe().map_err(|e| context("create the supervisor's pipe", e))?;
        let mut command = Command::new(shell);
        command
            .args(["-c", SCRIPT, "queuectl-supervisor"])
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = command
            .spawn()
            .map_err(|e| context(format!("start the job supervisor {:?}", shell.display()), e))?;
        drop(command);
        let mut supervisor = Supervisor {
            child,
            pipe,
            groups: HashSet::new(),
        };
        for group in groups {
            supervisor.send('+', group)?;
        }
        Ok(supervisor)
    }

    fn send(&mut self, op: char, group: i32) -> io::Result<()> {
        writeln!(self.pipe, "{op} {group}")?;
        match op {
            '+' => self.groups.insert(group),
            _ => self.groups.remove(&group),
        };
        Ok(())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Only a supervisor that failed is dropped while the process lives: it has exited or
        // exits on the end-of-file its pipe's closing sends; reap it then.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tells the supervisor, starting (or restarting) it if needed, about a group that has
/// started (`op` `+`) or ended (`-`).
fn tell(shell: &Path, op: char, group: i32) -> io::Result<()> {
    let mut slot = SUPERVISOR.lock();
    if let Some(supervisor) = slot.as_mut()
        && supervisor.send(op, group).is_ok()
    {
        return Ok(());
    }
    // None yet, or it died (someone killed it): start a new one and hand it the groups the
    // old one guarded. The first executor's shell runs it.
    let mut groups = slot.take().map(|s| s.groups.clone()).unwrap_or_default();
    match op {
        '+' => groups.insert(group),
        _ => groups.remove(&group),
    };
    *slot = Some(Supervisor::start(shell, groups)?);
    Ok(())
}

/// Registers a job's process group: from now on the group dies with this process.
pub(super) fn register(shell: &Path, group: i32) -> io::Result<()> {
    tell(shell, '+', group).map_err(|e| context("register the job with its supervisor", e))
}

/// Unregisters a group whose attempt has ended. Call before reaping its leader.
pub(super) fn unregister(shell: &Path, group: i32) -> io::Result<()> {
    tell(shell, '-', group).map_err(|e| context("unregister the job from its supervisor", e))
}

/// The supervisor's pid, if it runs.
#[cfg(test)]
pub(super) fn pid() -> Option<u32> {
    SUPERVISOR.lock().as_ref().map(|s| s.child.id())
}
