//! A counter of events that threads can wait on: the watcher threads of the stores count
//! what they see in one, and waiters wait for it to move.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How many events were seen, and a condition variable that wakes waiters on each.
#[derive(Debug, Default)]
pub(crate) struct Generation {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Generation {
    /// The number of events seen so far.
    pub(crate) fn get(&self) -> u64 {
        *self.count.lock()
    }

    /// Counts an event and wakes every waiter.
    pub(crate) fn bump(&self) {
        *self.count.lock() += 1;
        self.changed.notify_all();
    }

    /// Blocks until the count differs from `seen`, or `timeout` passes.
    pub(crate) fn wait(&self, seen: u64, timeout: Duration) {
        // A timeout too long to represent as an instant is as good as forever.
        let deadline = Instant::now().checked_add(timeout);
        let mut count = self.count.lock();
        while *count == seen {
            match deadline {
                Some(deadline) => {
                    if self.changed.wait_until(&mut count, deadline).timed_out() {
                        return;
                    }
                }
                None => self.changed.wait(&mut count),
            }
        }
    }
}
