//! `enqueue`: add one job, or JSON lines from standard input, all or none.

use std::collections::HashMap;
use std::io::{self, BufRead, IsTerminal, Write};

use queuectl_core::{Enqueued, JobId, JobSpec, NewJob, Storage, StorageError, now};

use crate::error::{CliError, Result};
use crate::progress::Progress;
use crate::render;

/// The jobs of one `enqueue`, with the line of standard input of each that has an id.
#[derive(Default)]
pub struct Batch {
    jobs: Vec<NewJob>,
    lines: HashMap<JobId, usize>,
}

/// The jobs of `enqueue ARG`: one JSON object, or JSON lines on stdin for "-". Two lines that
/// give the same id are refused here, naming both.
pub fn parse(arg: &str) -> Result<Batch> {
    let at = now();
    if arg != "-" {
        return Ok(Batch {
            jobs: vec![JobSpec::parse(arg)?.into_new_job(at)?],
            lines: HashMap::new(),
        });
    }
    let mut batch = Batch::default();
    // Not while someone types the jobs: the spinner would draw over their line.
    let progress = (!io::stdin().is_terminal()).then(|| Progress::counter("reading jobs:"));
    for (n, line) in io::stdin().lock().lines().enumerate() {
        if let Some(progress) = progress.as_ref().filter(|_| n % 1024 == 0) {
            progress.set(n as u64);
        }
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
        if let Some(id) = &job.id
            && let Some(first) = batch.lines.insert(id.clone(), n + 1)
        {
            return Err(CliError::Refused(format!(
                "job on line {} of standard input refused: line {first} has its id {id} too; \
                 nothing was enqueued",
                n + 1
            )));
        }
        batch.jobs.push(job);
    }
    Ok(batch)
}

/// Adds `jobs` (parsed by [`parse`] before the store was opened) and prints their ids, or the
/// stored jobs as JSON (an object for one job given as an argument, an array for stdin), each
/// with `"duplicate": true` when it is an existing job holding the new one's unique key.
pub fn run(
    store: &dyn Storage,
    batch: Batch,
    from_stdin: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result {
    let Batch { jobs, lines } = batch;
    let progress = (jobs.len() >= 1024).then(|| Progress::counter("adding jobs:"));
    if let Some(progress) = &progress {
        progress.set(jobs.len() as u64);
    }
    let entries = match store.submit(jobs, now()) {
        Err(StorageError::AlreadyExists { id }) if lines.contains_key(&id) => {
            return Err(CliError::StoredLine {
                line: lines[&id],
                source: StorageError::AlreadyExists { id },
            });
        }
        other => other?,
    };
    drop(progress);
    for entry in entries.iter().filter(|e| e.duplicate) {
        let job = &entry.job;
        say!(
            "job {} with unique key {:?} is already {}: nothing added",
            job.id,
            render::one_line(job.unique_key.as_deref().unwrap_or_default()),
            job.state
        );
    }
    if json && !from_stdin {
        render::print_json(out, &with_flag(&entries[0]))
    } else if json {
        let all: Vec<_> = entries.iter().map(with_flag).collect();
        render::print_json(out, &all)
    } else {
        for entry in &entries {
            writeln!(out, "{}", entry.job.id)?;
        }
        Ok(())
    }
}

/// The job as JSON with its `duplicate` flag.
fn with_flag(entry: &Enqueued) -> serde_json::Value {
    let mut value = serde_json::to_value(&entry.job).expect("a job serialises");
    value["duplicate"] = entry.duplicate.into();
    value
}
