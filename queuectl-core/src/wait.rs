//! Waiting for jobs to finish, without polling: the store wakes the waiter on every change.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::job::{Job, JobId};
use crate::storage::Storage;

/// How waiting for jobs ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Every job finished; here they are as they ended (some may not have completed).
    Finished(Vec<Job>),
    /// The timeout passed first; these jobs had not finished.
    TimedOut(Vec<Job>),
}

/// Blocks until every job in `ids` is finished (`completed`, `dead` or `cancelled`), or
/// `timeout` (if any) passes. An unknown job is an error at once, and so is a job removed
/// while waited for.
pub fn wait_for_jobs(
    store: &dyn Storage,
    ids: &[JobId],
    timeout: Option<Duration>,
) -> Result<WaitOutcome> {
    wait_for_jobs_with(store, ids, timeout, &mut |_, _| {})
}

/// [`wait_for_jobs`], calling `progress(finished, total)` each time it looks at the jobs (a
/// progress bar, say).
pub fn wait_for_jobs_with(
    store: &dyn Storage,
    ids: &[JobId],
    timeout: Option<Duration>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<WaitOutcome> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        // The version first: a change after it ends the wait below at once.
        let seen = store.change_version()?;
        let jobs = ids
            .iter()
            .map(|id| store.get(id))
            .collect::<Result<Vec<_>>>()?;
        let finished = jobs.iter().filter(|job| job.state.is_finished()).count();
        progress(finished, jobs.len());
        if finished == jobs.len() {
            return Ok(WaitOutcome::Finished(jobs));
        }
        let left = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        if left.is_zero() {
            let waiting = jobs
                .into_iter()
                .filter(|j| !j.state.is_finished())
                .collect();
            return Ok(WaitOutcome::TimedOut(waiting));
        }
        store.wait_for_change(seen, left)?;
    }
}
