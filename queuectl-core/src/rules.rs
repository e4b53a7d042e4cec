//! The transition rules of the job state machine, written once for every store.
//!
//! Each rule takes a job record and changes it as the [`Storage`](crate::Storage) contract
//! says. A store decides *which* jobs a transition applies to (its indexes or its SQL), loads
//! them, applies the rule here, and persists the result: `MemoryStorage` through `QueueState`,
//! `FileStorage` by reading rows and writing them back inside one SQLite transaction. The
//! conformance suite checks that the selections agree.

use std::time::Duration;

use crate::config::Config;
use crate::error::{Result, StorageError};
use crate::job::{
    Attempt, AttemptOutcome, Job, JobId, JobState, Lease, MAX_OUTPUT, NewJob, Timestamp, later,
    random_u64, tail,
};
use crate::storage::{AttemptReport, OutputChunk, QueueChange, Settlement};

/// The record of a new job; `seq` is its place in enqueue order and `dependencies` the
/// states of the jobs of `new.after` (checked by [`check_dependencies`]).
pub(crate) fn new_job(
    new: NewJob,
    id: JobId,
    seq: u64,
    dependencies: &[Dependency],
    config: &Config,
    now: Timestamp,
) -> Job {
    let queue = new.queue_name().to_owned();
    let mut after = Vec::with_capacity(new.after.len());
    for dependency in new.after {
        if !after.contains(&dependency) {
            after.push(dependency);
        }
    }
    Job {
        id,
        command: new.command,
        state: JobState::Pending,
        attempts: 0,
        max_retries: new.max_retries.unwrap_or(config.max_retries()),
        created_at: now,
        updated_at: now,
        priority: new.priority,
        run_at: new.run_at.unwrap_or(now),
        timeout: match new.timeout {
            Some(limit) if limit.is_zero() => None,
            Some(limit) => Some(limit),
            None => config.job_timeout(),
        },
        last_error: None,
        exit_code: None,
        output: None,
        started_at: None,
        finished_at: None,
        lease: None,
        seq,
        runs: 0,
        queue,
        unique_key: new.unique_key,
        after,
        blocked: is_blocked(dependencies),
    }
}

/// A job's dependency as a store found it: its id and state (`None`: not in the store).
pub(crate) type Dependency = (JobId, Option<JobState>);

/// Checks the dependencies of a job being enqueued: each must exist and may still complete.
pub(crate) fn check_dependencies(id: Option<&JobId>, dependencies: &[Dependency]) -> Result<()> {
    for (after, state) in dependencies {
        match state {
            None => {
                return Err(StorageError::DependencyNotFound {
                    id: id.cloned(),
                    after: after.clone(),
                });
            }
            Some(state @ (JobState::Dead | JobState::Cancelled)) => {
                return Err(StorageError::DependencyFailed {
                    id: id.cloned(),
                    after: after.clone(),
                    state: *state,
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Whether a job with these dependencies must wait: one of them exists and has not
/// completed. (A dependency no longer in the store completed and was purged: a removed one
/// cancels its dependents when it is removed.)
pub(crate) fn is_blocked(dependencies: &[Dependency]) -> bool {
    dependencies
        .iter()
        .any(|(_, state)| state.is_some_and(|s| s != JobState::Completed))
}

/// What happens to a blocked job when one of its dependencies finished (completed, died, was
/// cancelled) or, with `removed`, was removed: it runs once all have completed, and is
/// cancelled as soon as one can no longer complete. Returns whether it was cancelled (its own
/// dependents then follow).
pub(crate) fn resolve_dependencies(
    job: &mut Job,
    dependencies: &[Dependency],
    removed: Option<&JobId>,
    now: Timestamp,
) -> bool {
    debug_assert!(job.blocked && job.state.is_runnable());
    let doomed = removed
        .map(|id| format!("its dependency {id} was removed"))
        .or_else(|| {
            dependencies.iter().find_map(|(id, state)| match state {
                Some(state @ (JobState::Dead | JobState::Cancelled)) => {
                    Some(format!("its dependency {id} is {state}"))
                }
                _ => None,
            })
        });
    match doomed {
        Some(why) => {
            cancel(job, now);
            job.blocked = false;
            job.last_error = Some(format!("cancelled: {why}"));
            true
        }
        None => {
            if !is_blocked(dependencies) {
                // Due from now on at the earliest: the wait for a worker starts here.
                job.blocked = false;
                job.run_at = job.run_at.max(now);
                job.updated_at = now;
            }
            false
        }
    }
}

/// A store seen as a graph of dependencies, for [`propagate`].
pub(crate) trait Dependents {
    /// What the store's operations fail with.
    type Error: From<StorageError>;
    /// The blocked jobs that wait for the job `seq`.
    fn blocked_dependents(&mut self, seq: u64) -> std::result::Result<Vec<Job>, Self::Error>;
    /// The dependencies of `job`, with their states.
    fn dependencies(&mut self, job: &Job) -> std::result::Result<Vec<Dependency>, Self::Error>;
    /// Stores `new` (the job `old` after a rule ran), without propagating further.
    fn write(&mut self, old: &Job, new: Job) -> std::result::Result<(), Self::Error>;
}

/// After the job `finished` reached a finished state (or, with `removed`, was deleted): each
/// blocked job waiting for it runs or is cancelled as [`resolve_dependencies`] says, and so on
/// down the graph. Removing a job that had not completed cancels its dependents.
pub(crate) fn propagate<D: Dependents>(
    store: &mut D,
    finished: &Job,
    removed: bool,
    now: Timestamp,
) -> std::result::Result<(), D::Error> {
    // A completed job that is removed still completed: its dependents go on waiting for the
    // others only (as when retention purges it).
    let cancels = removed && finished.state != JobState::Completed;
    let mut work = vec![(finished.seq, cancels.then(|| finished.id.clone()))];
    while let Some((seq, removed)) = work.pop() {
        for old in store.blocked_dependents(seq)? {
            let dependencies = store.dependencies(&old)?;
            let mut job = old.clone();
            if resolve_dependencies(&mut job, &dependencies, removed.as_ref(), now) {
                work.push((job.seq, None));
            }
            store.write(&old, job)?;
        }
    }
    Ok(())
}

/// Whether a job's state change makes its dependents look again.
pub(crate) fn finishes(old: &Job, new: &Job) -> bool {
    new.state.is_finished() && new.state != old.state
}

/// Checks that retrying `job` would not give its unique key to a second job: `holder` is the
/// job that holds the key now, if any.
pub(crate) fn check_unique(job: &Job, holder: Option<&Job>) -> Result<()> {
    match (holder, &job.unique_key) {
        (Some(holder), Some(key)) if holder.seq != job.seq => Err(StorageError::UniqueKeyTaken {
            id: job.id.clone(),
            key: key.clone(),
            holder: holder.id.clone(),
            state: holder.state,
        }),
        _ => Ok(()),
    }
}

/// Of the dead jobs `retry_dead(None)` looks at, the ones it runs again: of jobs sharing a
/// unique key, only the newest (the others stay dead: running them too would give the key to
/// two jobs), and none whose key `held` says another job holds.
pub(crate) fn retry_all_targets(dead: Vec<Job>, held: impl Fn(&str) -> bool) -> Vec<Job> {
    let mut newest: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for job in &dead {
        if let Some(key) = &job.unique_key {
            let seq = newest.entry(key.clone()).or_insert(job.seq);
            *seq = (*seq).max(job.seq);
        }
    }
    dead.into_iter()
        .filter(|job| match &job.unique_key {
            Some(key) => newest.get(key) == Some(&job.seq) && !held(key),
            None => true,
        })
        .collect()
}

/// Applies `change` to a queue's settings.
pub(crate) fn change_queue(paused: &mut bool, limit: &mut u32, change: QueueChange) {
    match change {
        QueueChange::Pause => *paused = true,
        QueueChange::Resume => *paused = false,
        QueueChange::Limit(n) => *limit = n,
    }
}

/// How many more jobs of a queue may start now under its limit (`0`: no limit), with
/// `running` of its jobs processing.
pub(crate) fn room_in_queue(limit: u32, running: usize, wanted: usize) -> usize {
    if limit == 0 {
        wanted
    } else {
        (limit as usize).saturating_sub(running).min(wanted)
    }
}

/// Claims a due job for `worker`: it becomes `processing` under a fresh lease, with one more
/// attempt charged. The new attempt has no output yet.
pub(crate) fn claim(job: &mut Job, worker: &str, lease_for: Duration, now: Timestamp) {
    debug_assert!(job.is_due(now), "only due jobs are claimed");
    job.state = JobState::Processing;
    job.attempts = job.attempts.saturating_add(1);
    job.runs = job.runs.saturating_add(1);
    job.started_at = Some(now);
    job.finished_at = None;
    job.output = None;
    job.updated_at = now;
    job.lease = Some(Lease {
        job_id: job.id.clone(),
        worker: worker.to_owned(),
        token: random_u64(),
        expires_at: later(now, lease_for),
    });
}

/// Whether `lease` is the job's current lease (fencing): anything else is
/// [`StorageError::LeaseLost`].
pub(crate) fn check_lease(job: &Job, lease: &Lease) -> Result<()> {
    let current = job.state == JobState::Processing
        && job.lease.as_ref().is_some_and(|l| l.token == lease.token);
    if current {
        Ok(())
    } else {
        Err(StorageError::LeaseLost {
            id: lease.job_id.clone(),
        })
    }
}

/// Extends the job's (checked) lease to `now + lease_for`.
pub(crate) fn extend_lease(job: &mut Job, lease_for: Duration, now: Timestamp) {
    if let Some(lease) = job.lease.as_mut() {
        lease.expires_at = later(now, lease_for);
    }
}

/// The attempt a `processing` job is running, as the history shows it.
pub(crate) fn running_attempt(job: &Job) -> Option<Attempt> {
    let lease = job
        .lease
        .as_ref()
        .filter(|_| job.state == JobState::Processing)?;
    Some(Attempt {
        number: job.runs,
        worker: lease.worker.clone(),
        started_at: job.started_at.unwrap_or(job.updated_at),
        finished_at: None,
        outcome: AttemptOutcome::Running,
        exit_code: None,
        signal: None,
        error: None,
        output: None,
        due_at: Some(job.run_at),
    })
}

/// What a running attempt's recorded output becomes when a chunk arrives ([`append_output`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Appended {
    /// What to add after the output kept.
    pub(crate) text: String,
    /// Where the recorded output ends now.
    pub(crate) end: u64,
    /// Recorded output before this offset is dropped (cut with [`keep_from`]).
    pub(crate) keep_from: u64,
}

/// Appends `chunk` to the output a running attempt (whose lease was checked) recorded so far,
/// which ends at offset `end`. The part of the chunk before `end` was recorded already and is
/// skipped; a chunk starting after `end` (its writer dropped output) replaces everything
/// recorded; and only the last [`MAX_OUTPUT`] bytes are kept. `None` when nothing is new.
pub(crate) fn append_output(end: u64, chunk: &OutputChunk) -> Option<Appended> {
    let chunk_end = chunk.offset.saturating_add(chunk.text.len() as u64);
    if chunk_end <= end {
        return None;
    }
    let gap = chunk.offset > end;
    let new_end = chunk_end;
    let mut keep = new_end.saturating_sub(MAX_OUTPUT as u64);
    if gap {
        keep = keep.max(chunk.offset);
    }
    // Of the chunk, what is neither recorded already nor dropped at once.
    let text = as_stored(keep_from(&chunk.text, chunk.offset, keep.max(end)).to_owned());
    Some(Appended {
        text,
        end: new_end,
        keep_from: keep,
    })
}

/// What every store keeps of text a job printed, and of the error its attempt reports: each
/// NUL byte becomes SUB (U+001A, the ASCII substitute character), one byte for one, so that
/// offsets into the output stay right. PostgreSQL's `text` cannot hold NUL, and a job's
/// output is the same text on every store (as bytes that are not UTF-8 already became
/// U+FFFD when the output was read).
pub(crate) fn as_stored(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{1a}")
    } else {
        text
    }
}

/// `text`, which starts at offset `start` of an attempt's output, without what comes before
/// offset `keep`: cut forward to a character boundary, as [`tail`] does.
pub(crate) fn keep_from(text: &str, start: u64, keep: u64) -> &str {
    let skip = keep.saturating_sub(start);
    if skip >= text.len() as u64 {
        return "";
    }
    let mut skip = skip as usize;
    while !text.is_char_boundary(skip) {
        skip += 1;
    }
    &text[skip..]
}

/// What of `text`, which starts at offset `start` of an attempt's output, lies from `offset`
/// on, and where that starts: at `offset`, or later when the text kept starts later.
pub(crate) fn output_from(text: &str, start: u64, offset: u64) -> (u64, &str) {
    let from = start.max(offset);
    let rest = keep_from(text, start, from);
    let end = start + text.len() as u64;
    let at = if rest.is_empty() {
        from
    } else {
        end - rest.len() as u64
    };
    (at, rest)
}

/// Ends the job's current attempt (whose lease was checked) as `settlement` says, and returns
/// the finished attempt for the history.
pub(crate) fn settle(job: &mut Job, settlement: &Settlement, now: Timestamp) -> Attempt {
    let mut attempt = running_attempt(job).expect("a settled job holds a checked lease");
    attempt.finished_at = Some(now);
    job.lease = None;
    job.updated_at = now;
    match settlement {
        Settlement::Complete { report, .. } => {
            record(job, &mut attempt, report, now);
            attempt.outcome = AttemptOutcome::Succeeded;
            job.state = JobState::Completed;
        }
        Settlement::Fail {
            report, retry_at, ..
        } => {
            record(job, &mut attempt, report, now);
            attempt.outcome = AttemptOutcome::Failed;
            if job.attempts >= job.max_retries {
                job.state = JobState::Dead;
            } else {
                job.state = JobState::Failed;
                job.run_at = *retry_at;
            }
        }
        Settlement::Release { .. } => {
            attempt.outcome = AttemptOutcome::Released;
            attempt.error = Some(
                "handed back unfinished: a forced shutdown, or claimed ahead and never started"
                    .to_owned(),
            );
            job.state = JobState::Pending;
            job.attempts = job.attempts.saturating_sub(1);
            job.runs = job.runs.saturating_sub(1);
            job.run_at = job.run_at.min(now);
        }
    }
    attempt
}

/// Copies what an attempt produced onto the job (its summary of the last attempt) and the
/// attempt record.
fn record(job: &mut Job, attempt: &mut Attempt, report: &AttemptReport, now: Timestamp) {
    let output = report
        .output
        .clone()
        .map(|text| as_stored(tail(text, MAX_OUTPUT)));
    let error = report.error.clone().map(as_stored);
    job.finished_at = Some(now);
    job.exit_code = report.exit_code;
    job.output = output.clone();
    if error.is_some() {
        job.last_error = error.clone();
    }
    attempt.exit_code = report.exit_code;
    attempt.signal = report.signal;
    attempt.error = error;
    attempt.output = output;
}

/// Why a job's attempt was abandoned, for [`recover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Abandoned {
    /// Its lease ran out without a heartbeat.
    LeaseExpired,
    /// Its worker is known to be dead.
    WorkerDied,
}

/// Returns a `processing` job whose worker vanished to the queue: `pending` again (due now),
/// or `dead` when its attempts are used up. The attempt stays charged. Returns the abandoned
/// attempt for the history.
pub(crate) fn recover(job: &mut Job, why: Abandoned, now: Timestamp) -> Attempt {
    let mut attempt = running_attempt(job).expect("only processing jobs are recovered");
    let why = match why {
        Abandoned::LeaseExpired => "its lease expired",
        Abandoned::WorkerDied => "its worker died",
    };
    let error = format!(
        "attempt {} abandoned: {why} (worker {})",
        job.attempts, attempt.worker
    );
    attempt.finished_at = Some(now);
    attempt.outcome = AttemptOutcome::Abandoned;
    attempt.error = Some(error.clone());
    job.lease = None;
    job.last_error = Some(error);
    job.state = if job.attempts >= job.max_retries {
        JobState::Dead
    } else {
        JobState::Pending
    };
    job.run_at = now;
    job.finished_at = Some(now);
    job.updated_at = now;
    attempt
}

/// Checks that a job may be cancelled: anything not finished.
pub(crate) fn check_cancel(job: &Job) -> Result<()> {
    if job.state.is_finished() {
        Err(StorageError::InvalidState {
            id: job.id.clone(),
            state: job.state,
            op: "cancel",
        })
    } else {
        Ok(())
    }
}

/// Cancels a job (checked by [`check_cancel`]). A running attempt ends `cancelled` (returned
/// for the history) and its lease with it, so its worker can record nothing more.
pub(crate) fn cancel(job: &mut Job, now: Timestamp) -> Option<Attempt> {
    let attempt = running_attempt(job).map(|mut attempt| {
        attempt.finished_at = Some(now);
        attempt.outcome = AttemptOutcome::Cancelled;
        attempt.error = Some("cancelled while running".to_owned());
        attempt
    });
    job.state = JobState::Cancelled;
    job.blocked = false;
    job.lease = None;
    job.last_error = Some("cancelled".to_owned());
    job.finished_at = Some(now);
    job.updated_at = now;
    attempt
}

/// Checks that a job may be removed: anything not running.
pub(crate) fn check_remove(job: &Job) -> Result<()> {
    if job.state == JobState::Processing {
        Err(StorageError::InvalidState {
            id: job.id.clone(),
            state: job.state,
            op: "remove",
        })
    } else {
        Ok(())
    }
}

/// Checks that a job may run again with `retry`: finished ones only.
pub(crate) fn check_rerun(job: &Job) -> Result<()> {
    if job.state.is_finished() {
        Ok(())
    } else {
        Err(StorageError::InvalidState {
            id: job.id.clone(),
            state: job.state,
            op: "retry",
        })
    }
}

/// Checks that a job named by `dlq retry` may be retried: only `dead` jobs are.
pub(crate) fn check_retry(job: &Job) -> Result<()> {
    if job.state == JobState::Dead {
        Ok(())
    } else {
        Err(StorageError::InvalidState {
            id: job.id.clone(),
            state: job.state,
            op: "retry",
        })
    }
}

/// Moves a finished job back to `pending`, due now, with a full new set of attempts; it waits
/// again for those of its `dependencies` that have not completed.
pub(crate) fn retry(job: &mut Job, dependencies: &[Dependency], now: Timestamp) {
    job.blocked = is_blocked(dependencies);
    job.state = JobState::Pending;
    job.attempts = 0;
    job.run_at = now;
    job.updated_at = now;
}

/// Whether a job is a completed one that `purge_completed(finished_before)` deletes.
pub(crate) fn is_purgeable(job: &Job, finished_before: Timestamp) -> bool {
    job.state == JobState::Completed && finished_at(job) < finished_before
}

/// When a job finished, for retention (its last update when it never recorded a finish).
pub(crate) fn finished_at(job: &Job) -> Timestamp {
    job.finished_at.unwrap_or(job.updated_at)
}
