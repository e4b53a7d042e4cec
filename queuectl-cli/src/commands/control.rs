//! `cancel`, `remove` and `retry`: job control, all or nothing.

use std::io::Write;

use std::time::Duration;

use queuectl_core::{JobId, JobState, SpecError, Storage, WaitOutcome, now, wait_for_jobs_with};

use crate::error::{CliError, Result};
use crate::progress::Progress;

fn parse(ids: &[String]) -> Result<Vec<JobId>> {
    let ids = ids
        .iter()
        .map(|id| JobId::new(id.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SpecError::from)?;
    Ok(ids)
}

/// Cancels the jobs and prints their ids.
pub fn cancel(store: &dyn Storage, ids: &[String], out: &mut dyn Write) -> Result {
    let cancelled = store.cancel(&parse(ids)?, now())?;
    for job in &cancelled {
        writeln!(out, "{}", job.id)?;
    }
    say!(
        "cancelled {} job(s); a running one is stopped by its worker within a second",
        cancelled.len()
    );
    Ok(())
}

/// Deletes the jobs and prints their ids.
pub fn remove(store: &dyn Storage, ids: &[String], out: &mut dyn Write) -> Result {
    let removed = store.remove(&parse(ids)?, now())?;
    for id in &removed {
        writeln!(out, "{id}")?;
    }
    say!("removed {} job(s)", removed.len());
    Ok(())
}

/// Runs the jobs again and prints their ids.
pub fn retry(store: &dyn Storage, ids: &[String], out: &mut dyn Write) -> Result {
    let retried = store.retry(&parse(ids)?, now())?;
    for job in &retried {
        writeln!(out, "{}", job.id)?;
    }
    say!("moved {} job(s) back to pending", retried.len());
    Ok(())
}

/// Waits for the jobs to finish; prints each with the state it ended in.
pub fn wait(
    store: &dyn Storage,
    ids: &[String],
    timeout: Option<Duration>,
    out: &mut dyn Write,
) -> Result {
    let ids = parse(ids)?;
    let bar = Progress::bar(ids.len() as u64, "waiting: finished");
    let mut progress = |finished: usize, _total: usize| bar.set(finished as u64);
    let outcome = wait_for_jobs_with(store, &ids, timeout, &mut progress)?;
    drop(bar);
    match outcome {
        WaitOutcome::Finished(jobs) => {
            for job in &jobs {
                writeln!(out, "{} {}", job.id, job.state)?;
            }
            let failed: Vec<String> = jobs
                .iter()
                .filter(|job| job.state != JobState::Completed)
                .map(|job| format!("{} ({})", job.id, job.state))
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(CliError::Refused(format!(
                    "not every job completed: {}",
                    failed.join(", ")
                )))
            }
        }
        WaitOutcome::TimedOut(waiting) => {
            let names: Vec<String> = waiting
                .iter()
                .map(|job| format!("{} ({})", job.id, job.state))
                .collect();
            Err(CliError::WaitTimedOut(names.join(", ")))
        }
    }
}
