//! The worker pool: a dispatcher that claims jobs and N executor threads that run them.
//!
//! ```text
//!              claim (≤ free slots)              jobs (bounded)
//!   Storage ◀──────────────────────▶ dispatcher ─────────────────▶ executor threads ×N
//!      ▲        settle (batched)          ▲   ◀─────────────────────────┘ outcomes
//!      │ wait_for_change                  │ wake / control (graceful, forced)
//!    waker thread ────────────────────────┘
//! ```
//!
//! The dispatcher is the only thread that talks to storage about jobs. Each turn of its loop
//! settles what finished, runs what is due (heartbeat, recovery, purge), obeys a stop, and
//! claims for free slots; then, unless the pool has finished, it waits for the first of: an
//! outcome, a control message, a storage change, or the next deadline. Because jobs run on
//! other threads, none of this waits for a long job.
//!
//! Modules by role: [`builder`](WorkerPoolBuilder) (settings, start), `events` ([`Event`],
//! [`StopReason`], [`Summary`], [`PoolError`]), `ledger` (the attempts the pool holds),
//! `dispatcher` (the loop), `settle` (outcomes into settlements and events), `recovery`
//! (dead-worker detection), `runner` (executor threads) and `waker`.

mod builder;
mod dispatcher;
mod events;
mod ledger;
mod recovery;
mod runner;
mod settle;
mod waker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

pub use builder::{AUTO_PREFETCH_PER_THREAD, Prefetch, Timings, WorkerPoolBuilder};
pub use events::{Event, PoolError, StopReason, Summary, error_chain};
pub use recovery::{hostname, is_dead, recover_abandoned};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Graceful,
    Forced,
}

/// Asks a running pool to stop, from any thread (a signal handler's thread, say).
#[derive(Debug, Clone)]
pub struct Stopper(Sender<Control>);

impl Stopper {
    /// Stop claiming; let running jobs finish. Asking again changes nothing: a graceful stop
    /// stays graceful until [`forced`](Self::forced) is called or its shutdown timeout ends.
    pub fn graceful(&self) {
        // The pool may already be gone: then there is nothing to stop.
        let _ = self.0.send(Control::Graceful);
    }

    /// Kill running jobs and hand them back to the queue (also during a graceful stop).
    pub fn forced(&self) {
        let _ = self.0.send(Control::Forced);
    }
}

/// A running pool of workers. See the [module docs](self).
#[derive(Debug)]
pub struct WorkerPool {
    id: String,
    events: Receiver<Event>,
    dropped_events: Arc<AtomicU64>,
    control: Sender<Control>,
    dispatcher: JoinHandle<Result<Summary, PoolError>>,
    threads: Vec<(&'static str, JoinHandle<()>)>,
}

impl WorkerPool {
    /// A builder for a pool running `executor` on jobs from `storage`.
    pub fn builder(
        storage: Arc<dyn crate::Storage>,
        executor: Arc<dyn crate::Executor>,
    ) -> WorkerPoolBuilder {
        WorkerPoolBuilder::new(storage, executor)
    }

    /// The id this pool registered under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pool's events, ending with [`Event::Stopped`]. They are kept in a ring of
    /// [`WorkerPoolBuilder::event_capacity`] events: a reader that falls that far behind
    /// loses the oldest ([`dropped_events`](Self::dropped_events) counts them), and a pool
    /// whose events nobody reads holds no more than that.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// How many events were dropped because the ring was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    /// A handle that stops the pool from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.control.clone())
    }

    /// Stops gracefully (running jobs finish) and waits.
    pub fn shutdown(self) -> Result<Summary, PoolError> {
        self.stopper().graceful();
        self.join()
    }

    /// Stops now: running jobs are killed and handed back without charging the attempt.
    pub fn shutdown_now(self) -> Result<Summary, PoolError> {
        self.stopper().forced();
        self.join()
    }

    /// Waits until the pool stops (by a [`Stopper`], a stop request in storage, or idleness).
    /// When it returns, every thread of the pool has ended.
    pub fn join(self) -> Result<Summary, PoolError> {
        let result = self
            .dispatcher
            .join()
            .map_err(|_| PoolError::Panicked { what: "dispatcher" });
        let mut panicked = None;
        for (what, thread) in self.threads {
            if thread.join().is_err() {
                panicked.get_or_insert(PoolError::Panicked { what });
            }
        }
        let result = result?;
        match panicked {
            Some(error) => Err(error),
            None => result,
        }
    }
}
