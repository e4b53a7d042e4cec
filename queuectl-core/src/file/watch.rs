//! Waiting for another handle or process to change the store, without busy-waiting.
//!
//! SQLite's own file writes say nothing about when a commit becomes visible: the WAL is
//! written (and fsynced) before the commit is published in shared memory, which no file event
//! marks. So every handle that commits a change then writes one byte to the store's wake file,
//! and waiters watch the directory for that (and for the database being deleted or replaced).
//! A commit that may give a worker something to do writes the work file as well: idle workers
//! wait for that one only, and sleep through jobs claimed and finished elsewhere.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::generation::Generation;

/// The file a committing handle writes to, to wake waiters.
pub(super) const WAKE_FILE: &str = "queuectl.wake";

/// The file a handle also writes to after a commit that may give a worker something to do.
pub(super) const WORK_FILE: &str = "queuectl.work";

/// How often to look again when inotify is unavailable.
const FALLBACK_POLL: Duration = Duration::from_millis(25);

/// Opens (creating it with mode 0600 if needed) the wake file `name` ([`WAKE_FILE`] or
/// [`WORK_FILE`]) for writing. A symbolic link or anything but a regular file in its place is
/// refused: the store writes to its own files only.
pub(super) fn open_wake_file(dir: &Path, name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(dir.join(name))?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Wakes every waiter on the store: a one-byte write at offset 0 (the file never grows).
pub(super) fn wake(file: &File) -> io::Result<()> {
    file.write_at(b"\n", 0).map(drop)
}

/// Wakes waiters when the wake file is written, or the database is deleted, renamed or
/// replaced.
///
/// One inotify instance and one thread per store handle, started by the first wait and
/// stopped (and joined) when the handle is dropped: closing an inotify instance costs the
/// kernel a grace period of several milliseconds, too much to pay on every wait. The thread
/// counts relevant events in a generation number; waiters read it before they look at the
/// store, so an event that comes between their look and their wait still ends the wait.
pub(super) struct Notifier {
    shared: Arc<Counts>,
    thread: Mutex<Option<Running>>,
    dir: PathBuf,
}

struct Running {
    thread: JoinHandle<()>,
    /// Written to (then dropped) to stop the thread.
    stop: io::PipeWriter,
}

/// What the watching thread counts: every relevant event, and those that may mean work.
#[derive(Debug, Default)]
struct Counts {
    any: Generation,
    work: Generation,
}

impl Notifier {
    pub(super) fn new(dir: &Path) -> Self {
        Self {
            shared: Arc::new(Counts::default()),
            thread: Mutex::new(None),
            dir: dir.to_owned(),
        }
    }

    /// The number of relevant events seen so far, starting the watching thread if needed.
    /// `None` when the directory cannot be watched (no inotify here, or its limit reached):
    /// then waiting is looking again in short steps.
    pub(super) fn generation(&self) -> Option<u64> {
        self.start()?;
        Some(self.shared.any.get())
    }

    /// The number of events seen so far that may mean work: the work file written, or the
    /// database deleted or replaced (or `None`, as [`Notifier::generation`]).
    pub(super) fn work_generation(&self) -> Option<u64> {
        self.start()?;
        Some(self.shared.work.get())
    }

    fn start(&self) -> Option<()> {
        let mut thread = self.thread.lock();
        if thread.is_none() {
            *thread = Some(start(&self.dir, self.shared.clone())?);
        }
        Some(())
    }

    /// Blocks until the generation differs from `seen` (a relevant event), or `timeout`
    /// passes. With no watching thread (`seen` is `None`), sleeps a short step instead.
    pub(super) fn wait(&self, seen: Option<u64>, timeout: Duration) {
        Self::wait_on(&self.shared.any, seen, timeout);
    }

    /// [`Notifier::wait`] for the work generation.
    pub(super) fn wait_work(&self, seen: Option<u64>, timeout: Duration) {
        Self::wait_on(&self.shared.work, seen, timeout);
    }

    fn wait_on(generation: &Generation, seen: Option<u64>, timeout: Duration) {
        let Some(seen) = seen else {
            std::thread::sleep(timeout.min(FALLBACK_POLL));
            return;
        };
        generation.wait(seen, timeout);
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(Running { thread, mut stop }) = self.thread.get_mut().take() {
            // If the write fails the pipe still closes when `stop` drops: either ends the thread.
            let _ = stop.write_all(b"x");
            drop(stop);
            let _ = thread.join();
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn start(dir: &Path, shared: Arc<Counts>) -> Option<Running> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let mask = AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    inotify.add_watch(dir, mask).ok()?;
    let (stop_read, stop) = io::pipe().ok()?;
    let thread = std::thread::Builder::new()
        .name("queuectl-store-watch".into())
        .spawn(move || watch(&inotify, &stop_read, &shared))
        .ok()?;
    Some(Running { thread, stop })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn start(_dir: &Path, _shared: Arc<Counts>) -> Option<Running> {
    None
}

/// The watching thread: counts relevant events until `stop` becomes readable.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn watch(inotify: &nix::sys::inotify::Inotify, stop: &io::PipeReader, shared: &Counts) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::inotify::AddWatchFlags;
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            // Cannot watch any more: wake everyone, so waiters fall back on their poll.
            Err(_) => {
                shared.work.bump();
                shared.any.bump();
                return;
            }
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        // Drain everything queued; what counts is the wake file, the database itself, or the
        // directory going away. SQLite's own writes to its -wal and -shm files are ignored:
        // they come before the commit is visible.
        let (mut relevant, mut work) = (false, false);
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in &events {
                let name = event.name.as_deref().and_then(|n| n.to_str());
                // A full event queue may have dropped the event that mattered.
                let everyone = event.mask.intersects(
                    AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_IGNORED
                        | AddWatchFlags::IN_Q_OVERFLOW,
                );
                let database = name == Some(super::schema::DB_FILE);
                // The database written in place is a checkpoint, not work; deleted, renamed
                // or replaced, everyone must look.
                let replaced = database && !event.mask.contains(AddWatchFlags::IN_MODIFY);
                work |= everyone || replaced || name == Some(WORK_FILE);
                relevant |= everyone || database || matches!(name, Some(WAKE_FILE | WORK_FILE));
            }
        }
        // Work first: a waiter for any change that sees the work count move has seen work.
        if work {
            shared.work.bump();
        }
        if relevant {
            shared.any.bump();
        }
    }
}
