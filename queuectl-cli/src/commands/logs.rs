//! `logs ID [--attempt N] [--follow]`: the output an attempt left, or a running job's as it
//! is produced.

use std::io::{IsTerminal, Write};

use queuectl_core::{
    AttemptOutcome, FollowStep, JobId, JobState, SpecError, Storage, follow_attempt, follow_job,
};

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
    write_output(out, attempt.output.as_deref().unwrap_or(""))
}

/// Writes output as `logs` shows it: escaped on a terminal, the bytes as they were elsewhere.
fn write_output(out: &mut dyn Write, output: &str) -> Result {
    if std::io::stdout().is_terminal() {
        out.write_all(render::visible(output).as_bytes())?;
    } else {
        out.write_all(output.as_bytes())?;
    }
    Ok(())
}

/// Prints the job's output as it is produced until it ends (with `number`, until that
/// attempt, which must be the running one, ends). Notes about attempts go to stderr.
pub fn follow(store: &dyn Storage, id: &str, number: Option<u32>, out: &mut dyn Write) -> Result {
    let id = JobId::new(id).map_err(SpecError::from)?;
    let steps = match number {
        None => follow_job(store, &id)?,
        Some(n) => follow_attempt(store, &id, n)?.ok_or_else(|| not_running(store, &id, n))?,
    };
    let mut attempts_ended = 0;
    for step in steps {
        match step? {
            FollowStep::Started { attempt, worker } if attempts_ended > 0 => {
                say!(
                    "attempt {attempt} started on worker {}",
                    render::one_line(&worker)
                );
            }
            FollowStep::Started { .. } => {}
            FollowStep::Output { text, .. } => {
                write_output(out, &text)?;
                out.flush()?;
            }
            FollowStep::Skipped { attempt, bytes } => {
                say!("[... {bytes} bytes of attempt {attempt} were not kept]");
            }
            FollowStep::Ended(attempt) => {
                attempts_ended += 1;
                if attempt.outcome != AttemptOutcome::Succeeded {
                    let why = attempt.error.as_deref().map(render::one_line);
                    say!(
                        "attempt {} {}{}",
                        attempt.number,
                        attempt.outcome.as_str(),
                        why.map(|why| format!(": {why}")).unwrap_or_default()
                    );
                }
            }
            FollowStep::Done {
                succeeded: true, ..
            } => return Ok(()),
            FollowStep::Done { job, .. } => {
                return Err(CliError::Refused(match number {
                    None => format!("job {id} did not complete: it is {}", job.state),
                    Some(n) => format!("attempt {n} of job {id} did not succeed"),
                }));
            }
        }
    }
    Ok(())
}

/// Why `--follow --attempt N` was refused.
fn not_running(store: &dyn Storage, id: &JobId, n: u32) -> CliError {
    let running = match store.get(id) {
        Ok(job) if job.state == JobState::Processing => {
            format!("it is running attempt {}", job.runs)
        }
        Ok(job) => format!("it is {}", job.state),
        Err(error) => return error.into(),
    };
    CliError::Refused(format!(
        "cannot follow attempt {n} of job {id}: {running}; --follow follows the running attempt \
         (leave out --attempt to follow the job)"
    ))
}
