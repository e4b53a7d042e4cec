//! The job state machine shared by the in-memory and file backends.
//!
//! `QueueState` holds every job plus ordered indexes, and implements each transition of the
//! [`Storage`](crate::Storage) contract once. `MemoryStorage` wraps it in a mutex;
//! `FileStorage` keeps a replica of it that it rebuilds from its journal, and persists the
//! [`Change`]s each transition records. Replaying changes never re-runs transition logic, so
//! the on-disk format does not depend on it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::error::{Result, StorageError};
use crate::job::{Job, JobId, JobState, Lease, NewJob, Timestamp, later, random_u64};
use crate::storage::{AttemptReport, ListQuery, Settlement, StateCounts, WorkerInfo};

/// One change to the state, as persisted by durable backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Externally tagged (`{"put":{"job":…}}`): serde decodes it without buffering, which is most
// of the time it takes to open a large store.
#[serde(rename_all = "snake_case")]
pub(crate) enum Change {
    /// Insert or replace a job.
    Put { job: Job },
    /// Delete a job.
    Remove { id: JobId },
    /// Replace the settings.
    Config { config: Config },
    /// Insert or replace a worker.
    PutWorker { worker: WorkerInfo },
    /// Delete a worker.
    RemoveWorker { id: String },
}

type ReadyKey = (Reverse<i32>, Timestamp, u64);

/// All jobs, settings and workers, with the indexes that make claiming O(log n).
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Every job by its enqueue sequence number, so iteration is in enqueue order.
    jobs: BTreeMap<u64, Job>,
    /// Job id → sequence number.
    ids: HashMap<JobId, u64>,
    index: Index,
    next_seq: u64,
    config: Config,
    workers: BTreeMap<String, WorkerInfo>,
    /// Whether transitions record their changes (durable backends).
    record: bool,
    changes: Vec<Change>,
    /// Counts changes of any kind; unchanged by operations that change nothing.
    revision: u64,
}

/// The orders claiming and recovery need, by sequence number; derived from the jobs.
#[derive(Debug, Default)]
struct Index {
    /// Runnable jobs not yet known to be due, by due time.
    scheduled: BTreeSet<(Timestamp, u64)>,
    /// Runnable jobs that were due at the last claim, in claim order.
    ready: BTreeSet<ReadyKey>,
    /// Processing jobs by lease expiry.
    leases: BTreeSet<(Timestamp, u64)>,
    counts: [usize; 5],
}

impl Index {
    fn insert(&mut self, job: &Job) {
        self.counts[job.state.index()] += 1;
        if job.state.is_runnable() {
            self.scheduled.insert((job.run_at, job.seq));
        }
        if let (JobState::Processing, Some(lease)) = (job.state, &job.lease) {
            self.leases.insert((lease.expires_at, job.seq));
        }
    }

    fn remove(&mut self, job: &Job) {
        self.counts[job.state.index()] -= 1;
        if job.state.is_runnable() && !self.scheduled.remove(&(job.run_at, job.seq)) {
            self.ready
                .remove(&(Reverse(job.priority), job.run_at, job.seq));
        }
        if let (JobState::Processing, Some(lease)) = (job.state, &job.lease) {
            self.leases.remove(&(lease.expires_at, job.seq));
        }
    }
}

impl QueueState {
    /// An empty state; `record` makes transitions record [`Change`]s for `take_changes`.
    pub(crate) fn new(record: bool) -> Self {
        Self {
            record,
            ..Self::default()
        }
    }

    /// A number that changes exactly when the state does.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// The changes recorded since the last call.
    pub(crate) fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Applies a persisted change (replay). Never records.
    pub(crate) fn apply(&mut self, change: Change) {
        match change {
            Change::Put { job } => self.insert(job),
            Change::Remove { id } => {
                if let Some(&seq) = self.ids.get(&id) {
                    self.delete(seq);
                }
            }
            Change::Config { config } => self.config = config,
            Change::PutWorker { worker } => {
                self.workers.insert(worker.id.clone(), worker);
            }
            Change::RemoveWorker { id } => {
                self.workers.remove(&id);
            }
        }
    }

    /// Every change needed to rebuild this state from nothing (a snapshot).
    pub(crate) fn snapshot(&self) -> Vec<Change> {
        let mut changes = Vec::with_capacity(self.jobs.len() + self.workers.len() + 1);
        changes.push(Change::Config {
            config: self.config.clone(),
        });
        for job in self.jobs.values() {
            changes.push(Change::Put { job: job.clone() });
        }
        for worker in self.workers.values() {
            changes.push(Change::PutWorker {
                worker: worker.clone(),
            });
        }
        changes
    }

    // ----- storage of jobs -----

    fn record(&mut self, change: impl FnOnce() -> Change) {
        self.revision += 1;
        if self.record {
            self.changes.push(change());
        }
    }

    /// Inserts a job, replacing any job with the same id (replay), without recording.
    fn insert(&mut self, job: Job) {
        if let Some(&old) = self.ids.get(&job.id) {
            self.delete(old);
        }
        self.revision += 1;
        self.next_seq = self.next_seq.max(job.seq + 1);
        self.index.insert(&job);
        self.ids.insert(job.id.clone(), job.seq);
        self.jobs.insert(job.seq, job);
    }

    /// Deletes the job with sequence number `seq`, without recording.
    fn delete(&mut self, seq: u64) -> Option<Job> {
        let job = self.jobs.remove(&seq)?;
        self.revision += 1;
        self.ids.remove(&job.id);
        self.index.remove(&job);
        Some(job)
    }

    /// Deletes a job and records it.
    fn remove(&mut self, seq: u64) {
        if let Some(job) = self.delete(seq) {
            self.record(|| Change::Remove { id: job.id });
        }
    }

    /// Changes the job with sequence number `seq` in place (never its id or seq), keeps the
    /// indexes in step and records the result.
    fn update(&mut self, seq: u64, change: impl FnOnce(&mut Job)) -> &Job {
        let job = self
            .jobs
            .get_mut(&seq)
            .expect("the indexes only hold sequence numbers of stored jobs");
        self.index.remove(job);
        change(job);
        self.index.insert(job);
        self.revision += 1;
        if self.record {
            self.changes.push(Change::Put { job: job.clone() });
        }
        job
    }

    /// Moves runnable jobs due at `now` from `scheduled` to `ready`.
    fn promote(&mut self, now: Timestamp) {
        while let Some(&(run_at, seq)) = self.index.scheduled.first() {
            if run_at > now {
                break;
            }
            self.index.scheduled.pop_first();
            let priority = self.jobs[&seq].priority;
            self.index.ready.insert((Reverse(priority), run_at, seq));
        }
    }

    /// The sequence number of the job `lease` holds, if the lease is still its current one.
    fn leased(&self, lease: &Lease) -> Result<u64> {
        self.ids
            .get(&lease.job_id)
            .copied()
            .filter(|seq| {
                let job = &self.jobs[seq];
                job.state == JobState::Processing
                    && job.lease.as_ref().is_some_and(|l| l.token == lease.token)
            })
            .ok_or_else(|| StorageError::LeaseLost {
                id: lease.job_id.clone(),
            })
    }

    fn seq_of(&self, id: &JobId) -> Result<u64> {
        self.ids
            .get(id)
            .copied()
            .ok_or_else(|| StorageError::NotFound { id: id.clone() })
    }

    // ----- transitions -----

    pub(crate) fn enqueue_batch(&mut self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Job>> {
        let mut ids = HashSet::with_capacity(jobs.len());
        let mut prepared = Vec::with_capacity(jobs.len());
        for new in jobs {
            new.validate()?;
            let id = new.id.clone().unwrap_or_else(JobId::generate);
            if self.ids.contains_key(&id) || !ids.insert(id.clone()) {
                return Err(StorageError::AlreadyExists { id });
            }
            prepared.push((id, new));
        }
        let mut created = Vec::with_capacity(prepared.len());
        for (id, new) in prepared {
            let job = Job {
                id,
                command: new.command,
                state: JobState::Pending,
                attempts: 0,
                max_retries: new.max_retries.unwrap_or(self.config.max_retries()),
                created_at: now,
                updated_at: now,
                priority: new.priority,
                run_at: new.run_at.unwrap_or(now),
                timeout: match new.timeout {
                    Some(limit) if limit.is_zero() => None,
                    Some(limit) => Some(limit),
                    None => self.config.job_timeout(),
                },
                last_error: None,
                exit_code: None,
                output: None,
                started_at: None,
                finished_at: None,
                lease: None,
                seq: self.next_seq,
            };
            self.record(|| Change::Put { job: job.clone() });
            self.insert(job.clone());
            created.push(job);
        }
        Ok(created)
    }

    pub(crate) fn claim(
        &mut self,
        worker: &str,
        max: usize,
        lease_for: Duration,
        now: Timestamp,
    ) -> Vec<Job> {
        self.promote(now);
        let mut picked = Vec::new();
        // A job in `ready` was due at an earlier claim's `now`; with a `now` that went
        // backwards (another process's clock read) it may not be due yet: skip it.
        for &(_, run_at, seq) in &self.index.ready {
            if picked.len() == max {
                break;
            }
            if run_at <= now {
                picked.push(seq);
            }
        }
        picked
            .into_iter()
            .map(|seq| {
                self.update(seq, |job| {
                    job.state = JobState::Processing;
                    job.attempts = job.attempts.saturating_add(1);
                    job.started_at = Some(now);
                    job.finished_at = None;
                    job.updated_at = now;
                    job.lease = Some(Lease {
                        job_id: job.id.clone(),
                        worker: worker.to_owned(),
                        token: random_u64(),
                        expires_at: later(now, lease_for),
                    });
                })
                .clone()
            })
            .collect()
    }

    pub(crate) fn extend_leases(
        &mut self,
        leases: &[Lease],
        lease_for: Duration,
        now: Timestamp,
    ) -> Vec<JobId> {
        let mut lost = Vec::new();
        for lease in leases {
            match self.leased(lease) {
                Ok(seq) => {
                    self.update(seq, |job| {
                        if let Some(l) = job.lease.as_mut() {
                            l.expires_at = later(now, lease_for);
                        }
                    });
                }
                Err(_) => lost.push(lease.job_id.clone()),
            }
        }
        lost
    }

    pub(crate) fn settle(
        &mut self,
        settlements: Vec<Settlement>,
        now: Timestamp,
    ) -> Vec<Result<Job>> {
        settlements
            .into_iter()
            .map(|settlement| self.settle_one(settlement, now))
            .collect()
    }

    pub(crate) fn settle_and_claim(
        &mut self,
        settlements: Vec<Settlement>,
        worker: &str,
        max: usize,
        lease_for: Duration,
        now: Timestamp,
    ) -> (Vec<Result<Job>>, Vec<Job>) {
        let settled = self.settle(settlements, now);
        (settled, self.claim(worker, max, lease_for, now))
    }

    fn settle_one(&mut self, settlement: Settlement, now: Timestamp) -> Result<Job> {
        let seq = self.leased(settlement.lease())?;
        let record = |job: &mut Job, report: AttemptReport| {
            job.finished_at = Some(now);
            job.exit_code = report.exit_code;
            job.output = report.output;
            if report.error.is_some() {
                job.last_error = report.error;
            }
        };
        let job = self.update(seq, |job| {
            job.lease = None;
            job.updated_at = now;
            match settlement {
                Settlement::Complete { report, .. } => {
                    record(job, report);
                    job.state = JobState::Completed;
                }
                Settlement::Fail {
                    report, retry_at, ..
                } => {
                    record(job, report);
                    if job.attempts >= job.max_retries {
                        job.state = JobState::Dead;
                    } else {
                        job.state = JobState::Failed;
                        job.run_at = retry_at;
                    }
                }
                Settlement::Release { .. } => {
                    job.state = JobState::Pending;
                    job.attempts = job.attempts.saturating_sub(1);
                    job.run_at = job.run_at.min(now);
                }
            }
        });
        Ok(job.clone())
    }

    pub(crate) fn recover_expired(&mut self, now: Timestamp) -> Vec<Job> {
        let mut expired = Vec::new();
        for &(expires_at, seq) in &self.index.leases {
            if expires_at > now {
                break;
            }
            expired.push(seq);
        }
        expired
            .into_iter()
            .map(|seq| self.recover(seq, "its lease expired", now))
            .collect()
    }

    pub(crate) fn recover_worker(&mut self, worker: &str, now: Timestamp) -> Vec<Job> {
        let owned: Vec<u64> = self
            .index
            .leases
            .iter()
            .map(|&(_, seq)| seq)
            .filter(|seq| {
                self.jobs[seq]
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.worker == worker)
            })
            .collect();
        owned
            .into_iter()
            .map(|seq| self.recover(seq, "its worker died", now))
            .collect()
    }

    fn recover(&mut self, seq: u64, why: &str, now: Timestamp) -> Job {
        self.update(seq, |job| {
            let worker = job.lease.take().map(|l| l.worker).unwrap_or_default();
            job.last_error = Some(format!(
                "attempt {} abandoned: {why} (worker {worker})",
                job.attempts
            ));
            job.state = if job.attempts >= job.max_retries {
                JobState::Dead
            } else {
                JobState::Pending
            };
            job.run_at = now;
            job.finished_at = Some(now);
            job.updated_at = now;
        })
        .clone()
    }

    pub(crate) fn get(&self, id: &JobId) -> Result<Job> {
        Ok(self.jobs[&self.seq_of(id)?].clone())
    }

    pub(crate) fn list(&self, query: &ListQuery) -> Vec<Job> {
        self.jobs
            .values()
            .filter(|job| query.state.is_none_or(|s| job.state == s))
            .skip(query.offset)
            .take(query.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    pub(crate) fn counts(&self) -> StateCounts {
        let c = &self.index.counts;
        StateCounts {
            pending: c[JobState::Pending.index()],
            processing: c[JobState::Processing.index()],
            completed: c[JobState::Completed.index()],
            failed: c[JobState::Failed.index()],
            dead: c[JobState::Dead.index()],
        }
    }

    pub(crate) fn next_due(&self) -> Option<Timestamp> {
        let ready = self.index.ready.first().map(|&(_, run_at, _)| run_at);
        let scheduled = self.index.scheduled.first().map(|&(run_at, _)| run_at);
        match (ready, scheduled) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn retry_dead(&mut self, ids: Option<&[JobId]>, now: Timestamp) -> Result<Vec<Job>> {
        let targets: Vec<u64> = match ids {
            Some(ids) => {
                let mut seqs = Vec::with_capacity(ids.len());
                for id in ids {
                    let seq = self.seq_of(id)?;
                    let state = self.jobs[&seq].state;
                    if state != JobState::Dead {
                        return Err(StorageError::InvalidState {
                            id: id.clone(),
                            state,
                            op: "retry",
                        });
                    }
                    seqs.push(seq);
                }
                seqs
            }
            None => self.seqs_in(JobState::Dead),
        };
        let mut retried = Vec::with_capacity(targets.len());
        for seq in targets {
            if self.jobs[&seq].state != JobState::Dead {
                continue; // named twice in `ids`
            }
            let job = self.update(seq, |job| {
                job.state = JobState::Pending;
                job.attempts = 0;
                job.run_at = now;
                job.updated_at = now;
            });
            retried.push(job.clone());
        }
        Ok(retried)
    }

    fn seqs_in(&self, state: JobState) -> Vec<u64> {
        self.jobs
            .values()
            .filter(|job| job.state == state)
            .map(|job| job.seq)
            .collect()
    }

    pub(crate) fn clear_dead(&mut self) -> usize {
        let dead = self.seqs_in(JobState::Dead);
        for &seq in &dead {
            self.remove(seq);
        }
        dead.len()
    }

    pub(crate) fn purge_completed(&mut self, finished_before: Timestamp) -> usize {
        let old: Vec<u64> = self
            .jobs
            .values()
            .filter(|job| {
                job.state == JobState::Completed
                    && job.finished_at.unwrap_or(job.updated_at) < finished_before
            })
            .map(|job| job.seq)
            .collect();
        for &seq in &old {
            self.remove(seq);
        }
        old.len()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn update_config(
        &mut self,
        update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<Config> {
        let mut config = self.config.clone();
        update(&mut config)?;
        if config != self.config {
            self.config = config.clone();
            self.record(|| Change::Config {
                config: config.clone(),
            });
        }
        Ok(config)
    }

    pub(crate) fn register_worker(&mut self, worker: WorkerInfo) {
        self.record(|| Change::PutWorker {
            worker: worker.clone(),
        });
        self.workers.insert(worker.id.clone(), worker);
    }

    pub(crate) fn worker_heartbeat(&mut self, id: &str, now: Timestamp) -> Result<bool> {
        let worker = self
            .workers
            .get_mut(id)
            .ok_or_else(|| StorageError::UnknownWorker { id: id.to_owned() })?;
        worker.last_seen = now;
        let stop = worker.stop_requested;
        let worker = worker.clone();
        self.record(|| Change::PutWorker { worker });
        Ok(stop)
    }

    pub(crate) fn deregister_worker(&mut self, id: &str) {
        if self.workers.remove(id).is_some() {
            self.record(|| Change::RemoveWorker { id: id.to_owned() });
        }
    }

    pub(crate) fn workers(&self) -> Vec<WorkerInfo> {
        self.workers.values().cloned().collect()
    }

    pub(crate) fn request_stop(&mut self) -> usize {
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in &ids {
            let mut worker = self.workers[id].clone();
            worker.stop_requested = true;
            self.register_worker(worker);
        }
        ids.len()
    }
}
