//! Storage operations written once for the SQL stores, over what their write transactions
//! offer ([`StoreTx`]) and what their reads offer ([`StoreRead`]): the SQLite store's and the
//! PostgreSQL store's implement both. Each store keeps what it does its own way (claims,
//! settlements, enqueues); these are the operations that only read rows, apply rules and
//! write them back, and the reads made of several rows.

use std::collections::HashMap;

use crate::config::{Config, ConfigError};
use crate::error::StorageError;
use crate::job::{Attempt, Job, JobId, JobState, Timestamp};
use crate::rules::{self, Dependency};
use crate::storage::{QueueChange, QueueInfo, RunningOutput, StateCounts, WorkerInfo};

/// A store's reads, as the read operations of this module use them.
pub(crate) trait StoreRead {
    /// What the reads fail with.
    type Error: From<StorageError>;
    /// The job with this id (without its output), or [`StorageError::NotFound`].
    fn existing_job(&mut self, id: &JobId) -> Result<Job, Self::Error>;
    /// The output of the job's last finished attempt.
    fn last_output(&mut self, seq: u64) -> Result<Option<String>, Self::Error>;
    /// The job's finished attempts, oldest first.
    fn finished_attempts(&mut self, seq: u64) -> Result<Vec<Attempt>, Self::Error>;
    /// How many finished attempts the job has.
    fn finished_count(&mut self, seq: u64) -> Result<usize, Self::Error>;
    /// What the job's running attempt recorded from `offset` on, and where that starts.
    fn live_output(&mut self, seq: u64, offset: u64) -> Result<(u64, String), Self::Error>;
    /// Jobs per queue and state.
    fn counts(&mut self) -> Result<Vec<(String, JobState, usize)>, Self::Error>;
}

/// Implements [`StoreRead`] for `$reader` (failing with `$error`) with the functions of the
/// calling module named as its methods, each taking the reader first.
macro_rules! store_read_by_module_fns {
    ($reader:ty, $error:ty) => {
        impl $crate::ops::StoreRead for $reader {
            type Error = $error;
            fn existing_job(
                &mut self,
                id: &$crate::job::JobId,
            ) -> Result<$crate::job::Job, $error> {
                existing_job(self, id)
            }
            fn last_output(&mut self, seq: u64) -> Result<Option<String>, $error> {
                last_output(self, seq)
            }
            fn finished_attempts(&mut self, seq: u64) -> Result<Vec<$crate::job::Attempt>, $error> {
                finished_attempts(self, seq)
            }
            fn finished_count(&mut self, seq: u64) -> Result<usize, $error> {
                finished_count(self, seq)
            }
            fn live_output(&mut self, seq: u64, offset: u64) -> Result<(u64, String), $error> {
                live_output(self, seq, offset)
            }
            fn counts(&mut self) -> Result<Vec<(String, $crate::job::JobState, usize)>, $error> {
                counts(self)
            }
        }
    };
}
pub(crate) use store_read_by_module_fns;

/// [`crate::Storage::get`].
pub(crate) fn get<R: StoreRead>(r: &mut R, id: &JobId) -> Result<Job, R::Error> {
    let mut job = r.existing_job(id)?;
    if job.state != JobState::Processing {
        job.output = r.last_output(job.seq)?;
    }
    Ok(job)
}

/// [`crate::Storage::attempts`]: the finished ones, then the running one with what it
/// printed so far.
pub(crate) fn attempts<R: StoreRead>(r: &mut R, id: &JobId) -> Result<Vec<Attempt>, R::Error> {
    let job = r.existing_job(id)?;
    let mut attempts = r.finished_attempts(job.seq)?;
    if let Some(mut running) = rules::running_attempt(&job) {
        let (_, text) = r.live_output(job.seq, 0)?;
        running.output = (!text.is_empty()).then_some(text);
        attempts.push(running);
    }
    Ok(attempts)
}

/// [`crate::Storage::output_since`].
pub(crate) fn output_since<R: StoreRead>(
    r: &mut R,
    id: &JobId,
    offset: u64,
) -> Result<RunningOutput, R::Error> {
    let job = r.existing_job(id)?;
    let finished = r.finished_count(job.seq)?;
    let (offset, text) = if job.state == JobState::Processing {
        r.live_output(job.seq, offset)?
    } else {
        (offset, String::new())
    };
    Ok(RunningOutput {
        job,
        finished,
        offset,
        text,
    })
}

/// What a store's check says of a (queue, state) whose stored count is `off_by` from the jobs
/// there (the same words on both SQL stores).
pub(crate) fn count_out_of_step(queue: &str, state: &str, off_by: i64) -> String {
    format!(
        "the count of {state} jobs in queue {queue} is off by {off_by} (the status summary \
         would be wrong)"
    )
}

/// [`crate::Storage::counts`]: the jobs of every queue.
pub(crate) fn state_counts<R: StoreRead>(r: &mut R) -> Result<StateCounts, R::Error> {
    let mut counts = StateCounts::default();
    for (_, state, jobs) in r.counts()? {
        *counts.get_mut(state) += jobs;
    }
    Ok(counts)
}

/// A store's write transaction, as the operations of this module use it.
pub(crate) trait StoreTx {
    /// What the transaction's operations fail with.
    type Error: From<StorageError>;
    /// The jobs with these ids that exist, locked for a change where the store locks rows.
    fn locked_jobs(&mut self, ids: &[JobId]) -> Result<HashMap<JobId, Job>, Self::Error>;
    /// The job with this id (without its output).
    fn job(&mut self, id: &JobId) -> Result<Option<Job>, Self::Error>;
    /// The output of the job's last finished attempt.
    fn last_output(&mut self, seq: u64) -> Result<Option<String>, Self::Error>;
    /// The job holding a unique key.
    fn unique_holder(&mut self, key: &str) -> Result<Option<Job>, Self::Error>;
    /// The states of the stored job's dependencies, through the links made when it was
    /// enqueued (a dependency no longer linked, purged after it completed, is `None` even if
    /// a new job took its id), locked against changes where the store locks.
    fn dependency_states(&mut self, job: &Job) -> Result<Vec<Dependency>, Self::Error>;
    /// Writes what a rule changed in `old`; returns the job as stored.
    fn update_job(&mut self, old: Job, new: Job, now: Timestamp) -> Result<Job, Self::Error>;
    /// Adds a finished attempt to the job's history.
    fn insert_attempt(&mut self, seq: u64, attempt: Attempt) -> Result<(), Self::Error>;
    /// Deletes a job; the jobs blocked waiting for it are cancelled at `now`.
    fn delete_job(&mut self, job: &Job, now: Timestamp) -> Result<(), Self::Error>;
    /// Every queue that has jobs or settings.
    fn queues(&mut self) -> Result<Vec<QueueInfo>, Self::Error>;
    /// The settings of the queues that have any.
    fn queue_settings(&mut self) -> Result<HashMap<String, (bool, u32)>, Self::Error>;
    /// Stores a queue's settings.
    fn put_queue(&mut self, name: &str, paused: bool, limit: u32) -> Result<(), Self::Error>;
    /// The settings, locked for a change.
    fn locked_config(&mut self) -> Result<Config, Self::Error>;
    /// Stores the settings.
    fn set_config(&mut self, config: &Config) -> Result<(), Self::Error>;
    /// The registered workers (only `id`, when given), by id, locked for a change.
    fn locked_workers(&mut self, id: Option<&str>) -> Result<Vec<WorkerInfo>, Self::Error>;
    /// Inserts or replaces a worker.
    fn put_worker(&mut self, worker: &WorkerInfo) -> Result<(), Self::Error>;
}

/// The jobs `ids` names, each checked by `check`, in order and without repeats.
pub(crate) fn checked<T: StoreTx>(
    tx: &mut T,
    ids: &[JobId],
    check: fn(&Job) -> crate::Result<()>,
) -> Result<Vec<Job>, T::Error> {
    let mut found = tx.locked_jobs(ids)?;
    let mut jobs: Vec<Job> = Vec::with_capacity(ids.len());
    for id in ids {
        if jobs.iter().any(|job| &job.id == id) {
            continue;
        }
        let job = found
            .remove(id)
            .ok_or_else(|| StorageError::NotFound { id: id.clone() })?;
        check(&job)?;
        jobs.push(job);
    }
    Ok(jobs)
}

/// [`crate::Storage::change_queues`], the names checked.
pub(crate) fn change_queues<T: StoreTx>(
    tx: &mut T,
    names: Option<&[String]>,
    change: QueueChange,
) -> Result<Vec<QueueInfo>, T::Error> {
    let mut names: Vec<String> = match names {
        Some(names) => names.to_vec(),
        None => tx.queues()?.into_iter().map(|q| q.name).collect(),
    };
    names.sort();
    names.dedup();
    let settings = tx.queue_settings()?;
    let mut changed = Vec::with_capacity(names.len());
    for name in &names {
        let (mut paused, mut limit) = settings.get(name).copied().unwrap_or_default();
        rules::change_queue(&mut paused, &mut limit, change);
        tx.put_queue(name, paused, limit)?;
        changed.push((name, paused, limit));
    }
    // Every queue named, also one left without jobs or settings by the change.
    let mut all = tx.queues()?;
    Ok(changed
        .into_iter()
        .map(
            |(name, paused, limit)| match all.iter().position(|q| &q.name == name) {
                Some(i) => all.swap_remove(i),
                None => QueueInfo {
                    name: name.clone(),
                    paused,
                    limit,
                    counts: Default::default(),
                },
            },
        )
        .collect())
}

/// [`crate::Storage::cancel`].
pub(crate) fn cancel<T: StoreTx>(
    tx: &mut T,
    ids: &[JobId],
    now: Timestamp,
) -> Result<Vec<Job>, T::Error> {
    let targets = checked(tx, ids, rules::check_cancel)?;
    let mut cancelled = Vec::with_capacity(targets.len());
    for target in targets {
        // Read again: cancelling an earlier target may have cancelled its dependents.
        let old = existing(tx, &target.id)?;
        if old.state.is_finished() {
            cancelled.push(old);
            continue;
        }
        let mut job = old.clone();
        let attempt = rules::cancel(&mut job, now);
        let job = tx.update_job(old, job, now)?;
        if let Some(attempt) = attempt {
            tx.insert_attempt(job.seq, attempt)?;
        }
        cancelled.push(job);
    }
    Ok(cancelled)
}

/// [`crate::Storage::remove`].
pub(crate) fn remove<T: StoreTx>(
    tx: &mut T,
    ids: &[JobId],
    now: Timestamp,
) -> Result<Vec<JobId>, T::Error> {
    let targets = checked(tx, ids, rules::check_remove)?;
    for target in &targets {
        // Read again: removing an earlier target may have cancelled this one.
        let job = existing(tx, &target.id)?;
        tx.delete_job(&job, now)?;
    }
    Ok(targets.into_iter().map(|job| job.id).collect())
}

/// [`crate::Storage::retry_dead`] without ids: every dead job that can run again
/// ([`rules::retry_all_targets`]).
pub(crate) fn retry_all_dead<T: StoreTx>(
    tx: &mut T,
    dead: Vec<Job>,
    now: Timestamp,
) -> Result<Vec<Job>, T::Error> {
    let mut held = std::collections::HashSet::new();
    for key in dead.iter().filter_map(|job| job.unique_key.as_ref()) {
        if tx.unique_holder(key)?.is_some() {
            held.insert(key.clone());
        }
    }
    let targets = rules::retry_all_targets(dead, |key| held.contains(key));
    rerun(tx, targets, now)
}

/// Runs `targets` (checked by the caller) again, each with a fresh set of attempts, unless
/// that would give a unique key to two jobs (then nothing is retried).
pub(crate) fn rerun<T: StoreTx>(
    tx: &mut T,
    targets: Vec<Job>,
    now: Timestamp,
) -> Result<Vec<Job>, T::Error> {
    let mut retried = Vec::with_capacity(targets.len());
    for old in targets {
        // Read again: an earlier target retried in this transaction may hold its key now.
        if let Some(key) = &old.unique_key {
            let holder = tx.unique_holder(key)?;
            rules::check_unique(&old, holder.as_ref())?;
        }
        let dependencies = tx.dependency_states(&old)?;
        let mut job = old.clone();
        rules::retry(&mut job, &dependencies, now);
        let mut job = tx.update_job(old, job, now)?;
        job.output = tx.last_output(job.seq)?;
        retried.push(job);
    }
    Ok(retried)
}

/// [`crate::Storage::update_config`].
pub(crate) fn update_config<T: StoreTx>(
    tx: &mut T,
    update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
) -> Result<Config, T::Error> {
    let current = tx.locked_config()?;
    let mut config = current.clone();
    update(&mut config).map_err(StorageError::from)?;
    if config != current {
        tx.set_config(&config)?;
    }
    Ok(config)
}

/// [`crate::Storage::worker_heartbeat`].
pub(crate) fn worker_heartbeat<T: StoreTx>(
    tx: &mut T,
    worker: &str,
    now: Timestamp,
) -> Result<bool, T::Error> {
    let mut info =
        tx.locked_workers(Some(worker))?
            .pop()
            .ok_or_else(|| StorageError::UnknownWorker {
                id: worker.to_owned(),
            })?;
    info.last_seen = now;
    tx.put_worker(&info)?;
    Ok(info.stop_requested)
}

/// [`crate::Storage::request_stop`].
pub(crate) fn request_stop<T: StoreTx>(tx: &mut T) -> Result<usize, T::Error> {
    let workers = tx.locked_workers(None)?;
    for mut worker in workers.iter().cloned() {
        worker.stop_requested = true;
        tx.put_worker(&worker)?;
    }
    Ok(workers.len())
}

fn existing<T: StoreTx>(tx: &mut T, id: &JobId) -> Result<Job, T::Error> {
    tx.job(id)?
        .ok_or_else(|| StorageError::NotFound { id: id.clone() }.into())
}
