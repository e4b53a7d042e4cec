//! `enqueue`: add one job, or JSON lines from standard input, all or none.

use std::collections::HashMap;
use std::io::{self, BufRead, IsTerminal, Write};

use queuectl_core::relay::{self, Handover};
use queuectl_core::{Enqueued, JobId, JobSpec, NewJob, Storage, StorageError, Timestamp, now};

use crate::error::{CliError, Result};
use crate::progress::Progress;
use crate::render;
use crate::store::{self, Target};

/// The jobs of one `enqueue`, with the line of standard input of each that has an id.
#[derive(Default)]
pub struct Batch {
    jobs: Vec<NewJob>,
    lines: HashMap<JobId, usize>,
    /// When they were handed to a worker whose store failed (its commit may have taken
    /// effect all the same).
    relay_failed_since: Option<Timestamp>,
}

/// The jobs of `enqueue ARG`: one JSON object, or JSON lines on stdin for "-". Two lines that
/// give the same id are refused here, naming both.
pub fn parse(arg: &str) -> Result<Batch> {
    let at = now();
    if arg != "-" {
        return Ok(Batch {
            jobs: vec![JobSpec::parse(arg)?.into_new_job(at)?],
            ..Batch::default()
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

/// Hands `batch` to a worker on this machine that serves the queue (`relay`), when there is
/// one: `None` when the jobs are to be added here. Jobs without an id get one for the worker,
/// and keep it only when the worker's store failed, so that adding them here cannot add them
/// twice; otherwise the batch is added here as it was given, with the same messages.
pub fn hand_over(target: &Target, batch: &mut Batch) -> Result<Option<Vec<Enqueued>>> {
    let Some(key) = store::relay_key(target) else {
        return Ok(None);
    };
    if batch.jobs.is_empty() || batch.jobs.len() > relay::MAX_JOBS {
        return Ok(None);
    }
    let Some(socket) = relay::socket_to_call(&relay::runtime_dir(), &key) else {
        return Ok(None);
    };
    let mut jobs = batch.jobs.clone();
    for job in jobs.iter_mut().filter(|job| job.id.is_none()) {
        job.id = Some(JobId::generate());
    }
    let ids = || {
        let ids: Vec<String> = jobs
            .iter()
            .filter_map(|job| job.id.as_ref().map(ToString::to_string))
            .collect();
        match ids.len() {
            0..=3 => ids.join(", "),
            n => format!("{} and {} more", ids[..3].join(", "), n - 3),
        }
    };
    let since = now();
    match relay::hand_over(&socket, &key, &jobs) {
        Handover::Done(entries) => Ok(Some(entries)),
        Handover::NotHandedOver(_) => Ok(None),
        Handover::Failed(_) => {
            batch.jobs = jobs;
            batch.relay_failed_since = Some(since);
            Ok(None)
        }
        Handover::DoneUnshown(reason) => Err(CliError::Refused(format!(
            "the worker that takes this machine's enqueues ({}) added the jobs but could not \
             say how ({reason}): look for {} with queuectl show",
            socket.display(),
            ids()
        ))),
        Handover::Unknown(reason) => Err(CliError::Refused(format!(
            "the worker that takes this machine's enqueues ({}) stopped answering ({reason}): \
             the jobs may or may not have been added: look for {} with queuectl show",
            socket.display(),
            ids()
        ))),
    }
}

/// Adds `batch` (parsed by [`parse`] before the store was opened) to `store`.
pub fn submit(store: &dyn Storage, batch: Batch) -> Result<Vec<Enqueued>> {
    let Batch {
        jobs,
        lines,
        relay_failed_since,
    } = batch;
    let progress = (jobs.len() >= 1024).then(|| Progress::counter("adding jobs:"));
    if let Some(progress) = &progress {
        progress.set(jobs.len() as u64);
    }
    let submitted = match relay_failed_since {
        Some(since) => relay::submit_after_failure(store, jobs, since),
        None => store.submit(jobs, now()),
    };
    match submitted {
        Err(StorageError::AlreadyExists { id }) if lines.contains_key(&id) => {
            Err(CliError::StoredLine {
                line: lines[&id],
                source: StorageError::AlreadyExists { id },
            })
        }
        other => Ok(other?),
    }
}

/// Prints the ids of the jobs `submit` added, or the stored jobs as JSON (an object for one
/// job given as an argument, an array for stdin), each with `"duplicate": true` when it is an
/// existing job holding the new one's unique key.
pub fn print(entries: &[Enqueued], from_stdin: bool, json: bool, out: &mut dyn Write) -> Result {
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
        for entry in entries {
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
