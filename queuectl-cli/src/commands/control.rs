//! `cancel`, `remove` and `retry`: job control, all or nothing.

use std::io::Write;

use queuectl_core::{JobId, SpecError, Storage, now};

use crate::error::Result;

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
    let removed = store.remove(&parse(ids)?)?;
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
