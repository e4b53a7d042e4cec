//! The in-memory queue behind `MemoryStorage`.
//!
//! `QueueState` holds every job, its attempt history and the ordered indexes that make claiming
//! O(log n). It selects the jobs each transition applies to; what the transition does to a job
//! is a rule of [`crate::rules`], shared with the SQLite store.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::error::{Result, StorageError};
use crate::job::{Attempt, Job, JobId, JobState, Lease, NewJob, Timestamp};
use crate::rules::{self, Abandoned};
use crate::storage::{ListQuery, OutputChunk, RunningOutput, Settlement, StateCounts, WorkerInfo};

type ReadyKey = (Reverse<i32>, Timestamp, u64);

/// All jobs, settings and workers, with the indexes that make claiming O(log n).
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Every job by its enqueue sequence number, so iteration is in enqueue order.
    jobs: BTreeMap<u64, Job>,
    /// Job id → sequence number.
    ids: HashMap<JobId, u64>,
    /// Finished attempts by job sequence number, oldest first.
    history: HashMap<u64, Vec<Attempt>>,
    /// The output running attempts recorded so far, by job sequence number.
    live: HashMap<u64, Live>,
    index: Index,
    next_seq: u64,
    config: Config,
    workers: BTreeMap<String, WorkerInfo>,
    /// Counts changes of any kind; unchanged by operations that change nothing.
    revision: u64,
}

/// What a running attempt recorded of its output: the bytes of it that end at `end`.
#[derive(Debug, Default)]
struct Live {
    end: u64,
    text: String,
}

impl Live {
    /// Where `text` starts in the attempt's output.
    fn start(&self) -> u64 {
        self.end - self.text.len() as u64
    }
}

/// The orders claiming and recovery need, by sequence number; derived from the jobs.
#[derive(Debug, Default)]
struct Index {
    /// Runnable jobs not yet known to be due, by due time.
    scheduled: BTreeSet<(Timestamp, u64)>,
    /// Runnable jobs that were due at the last claim, in claim order.
    ready: BTreeSet<ReadyKey>,
    /// The jobs of `ready` by due time, for `next_due`.
    ready_at: BTreeSet<(Timestamp, u64)>,
    /// Processing jobs by lease expiry.
    leases: BTreeSet<(Timestamp, u64)>,
    counts: [usize; 6],
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
            self.ready_at.remove(&(job.run_at, job.seq));
        }
        if let (JobState::Processing, Some(lease)) = (job.state, &job.lease) {
            self.leases.remove(&(lease.expires_at, job.seq));
        }
    }
}

impl QueueState {
    /// A number that changes exactly when the state does.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    // ----- storage of jobs -----

    fn touch(&mut self) {
        self.revision += 1;
    }

    /// Inserts a new job.
    fn insert(&mut self, job: Job) {
        self.revision += 1;
        self.next_seq = self.next_seq.max(job.seq + 1);
        self.index.insert(&job);
        self.ids.insert(job.id.clone(), job.seq);
        self.jobs.insert(job.seq, job);
    }

    /// Deletes the job with sequence number `seq` and its history.
    fn remove(&mut self, seq: u64) {
        if let Some(job) = self.jobs.remove(&seq) {
            self.revision += 1;
            self.ids.remove(&job.id);
            self.history.remove(&seq);
            self.live.remove(&seq);
            self.index.remove(&job);
        }
    }

    /// Changes the job with sequence number `seq` in place (never its id or seq) and keeps the
    /// indexes in step.
    fn update<T>(&mut self, seq: u64, change: impl FnOnce(&mut Job) -> T) -> (&Job, T) {
        let job = self
            .jobs
            .get_mut(&seq)
            .expect("the indexes only hold sequence numbers of stored jobs");
        self.index.remove(job);
        let out = change(job);
        self.index.insert(job);
        self.revision += 1;
        (job, out)
    }

    /// Adds a finished attempt to the job's history; the output it recorded while running
    /// goes.
    fn remember(&mut self, seq: u64, attempt: Attempt) {
        self.live.remove(&seq);
        self.history.entry(seq).or_default().push(attempt);
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
            self.index.ready_at.insert((run_at, seq));
        }
    }

    /// The sequence number of the job `lease` holds, if the lease is still its current one.
    fn leased(&self, lease: &Lease) -> Result<u64> {
        self.ids
            .get(&lease.job_id)
            .copied()
            .ok_or_else(|| StorageError::LeaseLost {
                id: lease.job_id.clone(),
            })
            .and_then(|seq| rules::check_lease(&self.jobs[&seq], lease).map(|()| seq))
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
            let job = rules::new_job(new, id, self.next_seq, &self.config, now);
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
                self.update(seq, |job| rules::claim(job, worker, lease_for, now))
                    .0
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
                    self.update(seq, |job| rules::extend_lease(job, lease_for, now));
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
        let (job, attempt) = self.update(seq, |job| rules::settle(job, &settlement, now));
        let job = job.clone();
        self.remember(seq, attempt);
        Ok(job)
    }

    pub(crate) fn record_output(&mut self, chunks: &[OutputChunk]) -> Vec<JobId> {
        let mut lost = Vec::new();
        for chunk in chunks {
            let Ok(seq) = self.leased(&chunk.lease) else {
                lost.push(chunk.lease.job_id.clone());
                continue;
            };
            let end = self.live.get(&seq).map_or(0, |live| live.end);
            let Some(appended) = rules::append_output(end, chunk) else {
                continue;
            };
            let live = self.live.entry(seq).or_default();
            let kept = rules::keep_from(&live.text, live.start(), appended.keep_from).len();
            live.text.drain(..live.text.len() - kept);
            live.text.push_str(&appended.text);
            live.end = appended.end;
            self.touch();
        }
        lost
    }

    pub(crate) fn output_since(&self, id: &JobId, offset: u64) -> Result<RunningOutput> {
        let seq = self.seq_of(id)?;
        let job = Job {
            output: None,
            ..self.jobs[&seq].clone()
        };
        let (offset, text) = match self.live.get(&seq) {
            Some(live) if job.state == JobState::Processing => {
                let (at, text) = rules::output_from(&live.text, live.start(), offset);
                (at, text.to_owned())
            }
            _ => (offset, String::new()),
        };
        Ok(RunningOutput {
            finished: self.history.get(&seq).map_or(0, Vec::len),
            job,
            offset,
            text,
        })
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
            .map(|seq| self.recover(seq, Abandoned::LeaseExpired, now))
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
            .map(|seq| self.recover(seq, Abandoned::WorkerDied, now))
            .collect()
    }

    fn recover(&mut self, seq: u64, why: Abandoned, now: Timestamp) -> Job {
        let (job, attempt) = self.update(seq, |job| rules::recover(job, why, now));
        let job = job.clone();
        self.remember(seq, attempt);
        job
    }

    pub(crate) fn get(&self, id: &JobId) -> Result<Job> {
        Ok(self.jobs[&self.seq_of(id)?].clone())
    }

    /// The job's attempts: finished ones oldest first, then the running one.
    pub(crate) fn attempts(&self, id: &JobId) -> Result<Vec<Attempt>> {
        let seq = self.seq_of(id)?;
        let mut attempts = self.history.get(&seq).cloned().unwrap_or_default();
        let output = self
            .live
            .get(&seq)
            .map(|live| live.text.clone())
            .filter(|text| !text.is_empty());
        attempts.extend(
            rules::running_attempt(&self.jobs[&seq]).map(|running| Attempt { output, ..running }),
        );
        Ok(attempts)
    }

    pub(crate) fn list(&self, query: &ListQuery) -> Vec<Job> {
        let in_order: Box<dyn Iterator<Item = &Job>> = if query.newest_first {
            Box::new(self.jobs.values().rev())
        } else {
            Box::new(self.jobs.values())
        };
        in_order
            .filter(|job| query.state.is_none_or(|s| job.state == s))
            .skip(query.offset)
            .take(query.limit.unwrap_or(usize::MAX))
            .map(|job| Job {
                output: None,
                ..job.clone()
            })
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
            cancelled: c[JobState::Cancelled.index()],
        }
    }

    pub(crate) fn next_due(&self) -> Option<Timestamp> {
        let ready = self.index.ready_at.first().map(|&(run_at, _)| run_at);
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
                    rules::check_retry(&self.jobs[&seq])?;
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
            let (job, ()) = self.update(seq, |job| rules::retry(job, now));
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

    /// The sequence numbers of `ids`, each checked by `check`, in order and without repeats.
    fn checked(&self, ids: &[JobId], check: fn(&Job) -> Result<()>) -> Result<Vec<u64>> {
        let mut seqs = Vec::with_capacity(ids.len());
        for id in ids {
            let seq = self.seq_of(id)?;
            check(&self.jobs[&seq])?;
            if !seqs.contains(&seq) {
                seqs.push(seq);
            }
        }
        Ok(seqs)
    }

    pub(crate) fn cancel(&mut self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        let seqs = self.checked(ids, rules::check_cancel)?;
        let mut cancelled = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let (job, attempt) = self.update(seq, |job| rules::cancel(job, now));
            cancelled.push(job.clone());
            if let Some(attempt) = attempt {
                self.remember(seq, attempt);
            }
        }
        Ok(cancelled)
    }

    pub(crate) fn remove_jobs(&mut self, ids: &[JobId]) -> Result<Vec<JobId>> {
        let seqs = self.checked(ids, rules::check_remove)?;
        let mut removed = Vec::with_capacity(seqs.len());
        for seq in seqs {
            removed.push(self.jobs[&seq].id.clone());
            self.remove(seq);
        }
        Ok(removed)
    }

    pub(crate) fn retry(&mut self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        let seqs = self.checked(ids, rules::check_rerun)?;
        let mut retried = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let (job, ()) = self.update(seq, |job| rules::retry(job, now));
            retried.push(job.clone());
        }
        Ok(retried)
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
            .filter(|job| rules::is_purgeable(job, finished_before))
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
            self.touch();
        }
        Ok(config)
    }

    pub(crate) fn register_worker(&mut self, worker: WorkerInfo) {
        self.touch();
        self.workers.insert(worker.id.clone(), worker);
    }

    pub(crate) fn worker_heartbeat(&mut self, id: &str, now: Timestamp) -> Result<bool> {
        let worker = self
            .workers
            .get_mut(id)
            .ok_or_else(|| StorageError::UnknownWorker { id: id.to_owned() })?;
        worker.last_seen = now;
        let stop = worker.stop_requested;
        self.touch();
        Ok(stop)
    }

    pub(crate) fn deregister_worker(&mut self, id: &str) {
        if self.workers.remove(id).is_some() {
            self.touch();
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
