//! The waker thread: turns [`Storage::wait_for_work`] into a channel message, so that the
//! dispatcher can wait on outcomes, control messages and storage changes at once.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, select};

use crate::executor::CancelSignal;
use crate::storage::Storage;

/// Forwards storage changes (from any process) to the dispatcher as wake-ups. Before each
/// wait the dispatcher arms it with the store version it has seen, so it is woken by what
/// happens after, not by its own earlier writes. Ends when `done` fires or the dispatcher's
/// channels close; a wait in progress ends at the next change (the dispatcher deregistering
/// is one) or after `poll`, whichever comes first. The pool joins it.
pub(crate) fn run(
    storage: &dyn Storage,
    arm: &Receiver<u64>,
    wake: &Sender<()>,
    done: &CancelSignal,
    poll: Duration,
) {
    loop {
        let mut seen = select! {
            recv(arm) -> seen => match seen {
                Ok(seen) => seen,
                Err(_) => return,
            },
            recv(done.receiver()) -> _ => return,
        };
        loop {
            if done.is_cancelled() {
                return;
            }
            // A newer arming replaces the one being waited on.
            if let Ok(newer) = arm.try_recv() {
                seen = newer;
            }
            match storage.wait_for_work(seen, poll) {
                Ok(version) if version != seen => {
                    if let Err(TrySendError::Disconnected(())) = wake.try_send(()) {
                        return;
                    }
                    break;
                }
                Ok(_) => {}
                // A failing store is reported by the dispatcher's own calls; back off here.
                Err(_) => {
                    let _ = done.receiver().recv_timeout(poll);
                }
            }
        }
    }
}
