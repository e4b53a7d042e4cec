//! `logs ID [--attempt N]`: the output an attempt left.

use std::io::{IsTerminal, Write};

use queuectl_core::{AttemptOutcome, JobId, SpecError, Storage};

use crate::error::{CliError, Result};
use crate::render;

/// Prints the output of the job's last finished attempt, or of attempt `number` (the last one
/// with that number: a released attempt's number is used again).
pub fn run(store: &dyn Storage, id: &str, number: Option<u32>, out: &mut dyn Write) -> Result {
    let id = JobId::new(id).map_err(SpecError::from)?;
    let attempts = store.attempts(&id)?;
    // Newest first: the last finished attempt (with that number) is the first found.
    let mut finished = attempts
        .iter()
        .rev()
        .filter(|a| a.outcome != AttemptOutcome::Running);
    let attempt = match number {
        Some(n) => finished
            .find(|a| a.number == n)
            .ok_or_else(|| CliError::Refused(format!("job {id} has no finished attempt {n}")))?,
        None => finished
            .next()
            .ok_or_else(|| CliError::Refused(format!("job {id} has no finished attempt yet")))?,
    };
    let output = attempt.output.as_deref().unwrap_or("");
    if std::io::stdout().is_terminal() {
        out.write_all(render::visible(output).as_bytes())?;
    } else {
        out.write_all(output.as_bytes())?;
    }
    Ok(())
}
