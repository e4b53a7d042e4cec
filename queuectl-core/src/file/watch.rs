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
    /// What is watched, shared with the thread.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    watched: Arc<linux::Watched>,
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
        // A waiter for any change: the wake file's writes count from now on (a handle that
        // only waits for work never wakes at them).
        let mut thread = self.thread.lock();
        if thread.is_none() {
            *thread = Some(start(&self.dir, self.shared.clone())?);
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(running) = thread.as_ref() {
            running.watched.watch_wake_file().ok()?;
        }
        drop(thread);
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

    /// How many times the watching thread woke for anything (for tests).
    #[cfg(test)]
    pub(super) fn wake_ups(&self) -> u64 {
        self.shared.any.get()
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
        if let Some(Running {
            thread, mut stop, ..
        }) = self.thread.get_mut().take()
        {
            // If the write fails the pipe still closes when `stop` drops: either ends the thread.
            let _ = stop.write_all(b"x");
            drop(stop);
            let _ = thread.join();
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn start(dir: &Path, shared: Arc<Counts>) -> Option<Running> {
    let watched = Arc::new(linux::Watched::new(dir).ok()?);
    let (stop_read, stop) = io::pipe().ok()?;
    let thread = std::thread::Builder::new()
        .name("queuectl-store-watch".into())
        .spawn({
            let watched = watched.clone();
            move || linux::watch(&watched, &stop_read, &shared)
        })
        .ok()?;
    Some(Running {
        thread,
        stop,
        watched,
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn start(_dir: &Path, _shared: Arc<Counts>) -> Option<Running> {
    None
}

/// Watching with inotify: the directory for the database and the wake files coming and
/// going, and the work file's writes; the wake file's writes only once someone waits for any
/// change. So the watching thread of a handle that waits for work only (an idle worker's)
/// sleeps through the commits of a busy queue.
#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
    use std::io;
    use std::path::{Path, PathBuf};

    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
    use parking_lot::Mutex;

    use super::{Counts, WAKE_FILE, WORK_FILE};

    /// The directory: files created, deleted or renamed in it, and it itself going away.
    const DIR: AddWatchFlags = AddWatchFlags::IN_MOVED_TO
        .union(AddWatchFlags::IN_CREATE)
        .union(AddWatchFlags::IN_DELETE)
        .union(AddWatchFlags::IN_MOVED_FROM)
        .union(AddWatchFlags::IN_DELETE_SELF)
        .union(AddWatchFlags::IN_MOVE_SELF);

    pub(super) struct Watched {
        inotify: Inotify,
        dir: PathBuf,
        watches: Mutex<Watches>,
    }

    /// What the watch descriptors stand for.
    #[derive(Default, Clone, Copy)]
    struct Watches {
        work: Option<WatchDescriptor>,
        wake: Option<WatchDescriptor>,
        /// A wake file was missing (a store opened read-only, of an earlier version): the
        /// directory's writes are watched instead, and tell the files apart by name.
        dir_writes: bool,
    }

    impl Watched {
        pub(super) fn new(dir: &Path) -> io::Result<Self> {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            inotify.add_watch(dir, DIR)?;
            let watched = Self {
                inotify,
                dir: dir.to_owned(),
                watches: Mutex::new(Watches::default()),
            };
            let mut watches = watched.watches.lock();
            match watched.watch_file(WORK_FILE) {
                Ok(wd) => watches.work = Some(wd),
                Err(_) => watched.watch_dir_writes(&mut watches)?,
            }
            drop(watches);
            Ok(watched)
        }

        /// Has the wake file's writes counted too (once).
        pub(super) fn watch_wake_file(&self) -> io::Result<()> {
            let mut watches = self.watches.lock();
            if watches.wake.is_some() || watches.dir_writes {
                return Ok(());
            }
            match self.watch_file(WAKE_FILE) {
                Ok(wd) => watches.wake = Some(wd),
                Err(_) => self.watch_dir_writes(&mut watches)?,
            }
            Ok(())
        }

        fn watch_file(&self, name: &str) -> io::Result<WatchDescriptor> {
            let mask = AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DONT_FOLLOW;
            Ok(self.inotify.add_watch(&self.dir.join(name), mask)?)
        }

        fn watch_dir_writes(&self, watches: &mut Watches) -> io::Result<()> {
            self.inotify
                .add_watch(&self.dir, DIR | AddWatchFlags::IN_MODIFY)?;
            watches.dir_writes = true;
            Ok(())
        }
    }

    /// The watching thread: counts relevant events until `stop` becomes readable.
    pub(super) fn watch(watched: &Watched, stop: &io::PipeReader, shared: &Counts) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        loop {
            let mut fds = [
                PollFd::new(watched.inotify.as_fd(), PollFlags::POLLIN),
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
            // Drain everything queued. What counts: the wake files written, the database or
            // a wake file created, deleted or renamed, the directory going away. SQLite's
            // own files are ignored: they are written before the commit is visible.
            let (mut any, mut work, mut replaced) = (false, false, false);
            while let Ok(events) = watched.inotify.read_events() {
                if events.is_empty() {
                    break;
                }
                let watches = *watched.watches.lock();
                for event in &events {
                    let written = event.mask.contains(AddWatchFlags::IN_MODIFY);
                    let name = event.name.as_deref().and_then(|n| n.to_str());
                    // A full event queue may have dropped the event that mattered; a watched
                    // file deleted ends its watch.
                    let everyone = event.mask.intersects(
                        AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF
                            | AddWatchFlags::IN_IGNORED
                            | AddWatchFlags::IN_Q_OVERFLOW,
                    ) || (!written
                        && matches!(
                            name,
                            Some(WAKE_FILE | WORK_FILE | super::super::schema::DB_FILE)
                        ));
                    let work_written = Some(event.wd) == watches.work
                        || (watches.dir_writes && written && name == Some(WORK_FILE));
                    let wake_written = Some(event.wd) == watches.wake
                        || (watches.dir_writes && written && name == Some(WAKE_FILE));
                    work |= everyone || work_written;
                    any |= everyone || work_written || wake_written;
                    // A wake file made anew: its watch stays with the old file, which only
                    // handles opened before still write to.
                    replaced |= event
                        .mask
                        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                        && matches!(name, Some(WAKE_FILE | WORK_FILE));
                }
            }
            if replaced {
                // From now on the files are told apart by name, whatever their inode. (If
                // that fails, waiters still look again every `poll_interval`.)
                let mut watches = watched.watches.lock();
                if !watches.dir_writes {
                    let _ = watched.watch_dir_writes(&mut watches);
                }
            }
            // Work first: a waiter for any change that sees the work count move has seen work.
            if work {
                shared.work.bump();
            }
            if any {
                shared.any.bump();
            }
        }
    }
}
