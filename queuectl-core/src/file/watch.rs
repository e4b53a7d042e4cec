//! Waiting for another handle or process to change the store, without busy-waiting.

use std::path::Path;
use std::time::Duration;

/// How often to look again when inotify is unavailable.
const FALLBACK_POLL: Duration = Duration::from_millis(25);

/// Wakes up when a file in the store directory is written, created, renamed or deleted (a
/// commit writes the database's WAL file; deleting the store must wake waiters too).
///
/// Created before the caller's first look at the store, so a change made between that look
/// and [`Watcher::wait`] is still queued and wakes the wait at once.
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

    /// Blocks until something in the directory may have changed, or `timeout` passes. Spurious
    /// wake-ups are fine: the caller looks at the store again.
    pub(super) fn wait(&self, timeout: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let Some(inotify) = &self.inotify else {
            std::thread::sleep(timeout.min(FALLBACK_POLL));
            return;
        };
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        // An error (EINTR) just ends this wait early.
        if poll(&mut fds, timeout).is_ok_and(|ready| ready > 0) {
            // Drain, so the next wait blocks until a newer event; the fd is non-blocking.
            while inotify.read_events().is_ok_and(|events| !events.is_empty()) {}
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
