//! `enqueue`: add one job, or JSON lines from standard input, all or none.

use std::io::{self, BufRead, Write};

use queuectl_core::{JobSpec, NewJob, Storage, now};

use crate::error::{CliError, Result};
use crate::render;

/// The jobs of `enqueue ARG`: one JSON object, or JSON lines on stdin for "-".
pub fn parse(arg: &str) -> Result<Vec<NewJob>> {
    let at = now();
    if arg != "-" {
        return Ok(vec![JobSpec::parse(arg)?.into_new_job(at)?]);
    }
    let mut jobs = Vec::new();
    for (n, line) in io::stdin().lock().lines().enumerate() {
        let line = line.map_err(CliError::Input)?;
        if line.trim().is_empty() {
            continue;
        }
        let job = JobSpec::parse(&line)
            .and_then(|spec| spec.into_new_job(at))
            .map_err(|source| CliError::Line {
                line: n + 1,
                source,
            })?;
        jobs.push(job);
    }
    Ok(jobs)
}

/// Adds `jobs` (parsed by [`parse`] before the store was opened) and prints their ids, or the
/// stored jobs as JSON (an object for one job given as an argument, an array for stdin).
pub fn run(
    store: &dyn Storage,
    jobs: Vec<NewJob>,
    from_stdin: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result {
    let created = store.enqueue_batch(jobs, now())?;
    if json && !from_stdin {
        render::print_json(out, &created[0])
    } else if json {
        render::print_json(out, &created)
    } else {
        for job in &created {
            writeln!(out, "{}", job.id)?;
        }
        Ok(())
    }
}
