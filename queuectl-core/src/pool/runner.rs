//! The executor threads: each takes assignments from the bounded jobs channel, runs them and
//! sends the outcome back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::executor::{CancelSignal, Executor, LiveOutput, Outcome, panic_message};
use crate::job::Job;

use super::events::{Event, EventSink, error_chain};

/// A job given to an executor thread, with the signal that cancels this attempt alone and
/// where its output goes as it is produced.
#[derive(Debug)]
pub(crate) struct Assignment {
    pub(crate) job: Job,
    pub(crate) cancel: CancelSignal,
    pub(crate) live: LiveOutput,
}

impl Assignment {
    /// The lease token of the attempt.
    pub(crate) fn token(&self) -> Option<u64> {
        self.job.lease.as_ref().map(|l| l.token)
    }
}

/// One finished attempt, sent from an executor thread to the dispatcher. `job.lease` is the
/// lease of the attempt.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) job: Job,
    pub(crate) outcome: Result<Outcome, String>,
}

impl Finished {
    /// An attempt that never ran: it is handed back to the queue uncharged.
    pub(crate) fn unstarted(job: Job) -> Self {
        Self {
            job,
            outcome: Ok(Outcome::cancelled()),
        }
    }

    pub(crate) fn token(&self) -> Option<u64> {
        self.job.lease.as_ref().map(|l| l.token)
    }
}

/// One executor thread.
pub(crate) struct Runner {
    pub(crate) executor: Arc<dyn Executor>,
    pub(crate) jobs: Receiver<Assignment>,
    pub(crate) outcomes: Sender<Finished>,
    pub(crate) events: EventSink,
}

impl Runner {
    /// Runs assignments until the jobs channel closes (or nobody takes outcomes any more).
    pub(crate) fn run(self) {
        for Assignment { job, cancel, live } in self.jobs.iter() {
            self.events.emit(|| Event::Running {
                job: job.id.clone(),
                attempt: job.attempts,
                command: job.command.clone(),
            });
            // A panicking executor fails the attempt; the thread, and its slot, live on.
            let run = || self.executor.execute_live(&job, &cancel, &live);
            let outcome = match catch_unwind(AssertUnwindSafe(run)) {
                Ok(result) => result.map_err(|e| error_chain(&e)),
                Err(panic) => Err(format!("the executor panicked: {}", panic_message(&*panic))),
            };
            if self.outcomes.send(Finished { job, outcome }).is_err() {
                return;
            }
        }
    }
}
