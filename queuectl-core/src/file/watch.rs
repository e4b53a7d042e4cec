//! Waiting for another handle or process to change the store, without busy-waiting.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// How often to look again when inotify is unavailable.
const FALLBACK_POLL: Duration = Duration::from_millis(25);

/// Wakes up when a file in the store directory is written, created or renamed into place.
///
/// Created before the caller's first look at the store, so a change made between that look
/// and [`Watcher::wait`] is still queued and wakes the wait at once.
pub(super) struct Watcher(Option<Inotify>);

impl Watcher {
    /// Watches `dir`; falls back to sleeping in short steps if inotify is unavailable (another
    /// OS, or the per-user instance limit reached).
    pub(super) fn new(dir: &Path) -> Self {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .ok()
            .filter(|inotify| {
                let mask = AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE;
                inotify.add_watch(dir, mask).is_ok()
            });
        Self(inotify)
    }

    /// Blocks until something in the directory may have changed, or `timeout` passes. Spurious
    /// wake-ups are fine: the caller looks at the store again.
    pub(super) fn wait(&self, timeout: Duration) {
        let Some(inotify) = &self.0 else {
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
