//! Waiting for another handle or process to change the store, without busy-waiting.
//!
//! SQLite's own file writes say nothing about when a commit becomes visible: the WAL is
//! written (and fsynced) before the commit is published in shared memory, which no file event
//! marks. So every handle that commits a change then writes one byte to the store's wake file,
//! and waiters watch the directory for that (and for the database being deleted or replaced).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// The file a committing handle writes to, to wake waiters.
pub(super) const WAKE_FILE: &str = "queuectl.wake";

/// How often to look again when inotify is unavailable.
const FALLBACK_POLL: Duration = Duration::from_millis(25);

/// Opens (creating it with mode 0600 if needed) the wake file for writing.
pub(super) fn open_wake_file(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(WAKE_FILE))
}

/// Wakes every waiter on the store: a one-byte write at offset 0 (the file never grows).
pub(super) fn wake(file: &File) -> io::Result<()> {
    file.write_at(b"\n", 0).map(drop)
}

/// Wakes up when the wake file is written, or the database is deleted, renamed or replaced.
///
/// Created before the caller's look at the store, so a change made between that look and
/// [`Watcher::wait`] is still queued and ends the wait at once.
pub(super) struct Watcher {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    inotify: Option<nix::sys::inotify::Inotify>,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl Watcher {
    /// Watches `dir`; falls back to sleeping in short steps if inotify is unavailable (the
    /// per-user instance limit reached, or a file system without it).
    pub(super) fn new(dir: &Path) -> Self {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let mask = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .ok()
            .filter(|inotify| inotify.add_watch(dir, mask).is_ok());
        Self { inotify }
    }

    /// Blocks until the store may have changed, or `timeout` passes. Spurious wake-ups are
    /// fine: the caller looks at the store again.
    pub(super) fn wait(&self, timeout: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use nix::sys::inotify::AddWatchFlags;
        use std::os::fd::AsFd;
        let Some(inotify) = &self.inotify else {
            std::thread::sleep(timeout.min(FALLBACK_POLL));
            return;
        };
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return;
            }
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(ready) if ready > 0 => {}
                // A timeout, or an error (EINTR): the caller looks again.
                _ => return,
            }
            // Drain everything queued; wake for the wake file, the database itself, or the
            // directory going away. SQLite's own writes to its -wal and -shm files are ignored:
            // they come before the commit is visible.
            let mut relevant = false;
            while let Ok(events) = inotify.read_events() {
                if events.is_empty() {
                    break;
                }
                relevant |= events.iter().any(|event| {
                    let name = event.name.as_deref().and_then(|n| n.to_str());
                    event
                        .mask
                        .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
                        || matches!(name, Some(WAKE_FILE | super::schema::DB_FILE))
                });
            }
            if relevant {
                return;
            }
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
impl Watcher {
    /// Without inotify, waiting is looking again every [`FALLBACK_POLL`].
    pub(super) fn new(_dir: &Path) -> Self {
        Self {}
    }

    /// Sleeps for at most [`FALLBACK_POLL`].
    pub(super) fn wait(&self, timeout: Duration) {
        std::thread::sleep(timeout.min(FALLBACK_POLL));
    }
}
