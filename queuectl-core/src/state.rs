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
use crate::rules::{self, Abandoned, Dependency};
use crate::storage::{
    Activity, ClaimRequest, Enqueued, FinishedAttempt, ListQuery, OutputChunk, QueueChange,
    QueueInfo, RunningOutput, Settlement, StateCounts, WorkerInfo,
};

type ReadyKey = (Reverse<i32>, Timestamp, u64);

/// A queue's settings (the defaults when it has none stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct QueueSettings {
    paused: bool,
    limit: u32,
}

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
    /// Settings of the queues that have any.
    queues: BTreeMap<String, QueueSettings>,
    /// Job sequence number → the jobs that name it in `after`.
    dependents: HashMap<u64, Vec<u64>>,
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
    /// Jobs waiting to run ([`Job::waits_to_run`]) not yet known to be due, by due time.
    scheduled: BTreeSet<(Timestamp, u64)>,
    /// Per queue, jobs waiting to run that were due at the last claim, in claim order.
    ready: HashMap<String, BTreeSet<ReadyKey>>,
    /// The jobs of `ready` by due time, for `next_due`.
    ready_at: BTreeSet<(Timestamp, u64)>,
    /// Processing jobs by lease expiry.
    leases: BTreeSet<(Timestamp, u64)>,
    /// Jobs per state.
    counts: [usize; 6],
    /// Jobs per queue and state (a queue without jobs has no entry).
    queue_counts: BTreeMap<String, [usize; 6]>,
    /// Unique key → the job holding it ([`Job::holds_unique_key`]).
    unique: HashMap<String, u64>,
}

impl Index {
    fn insert(&mut self, job: &Job) {
        self.counts[job.state.index()] += 1;
        self.queue_counts.entry(job.queue.clone()).or_default()[job.state.index()] += 1;
        if job.waits_to_run() {
            self.scheduled.insert((job.run_at, job.seq));
        }
        if let (JobState::Processing, Some(lease)) = (job.state, &job.lease) {
            self.leases.insert((lease.expires_at, job.seq));
        }
        if let (true, Some(key)) = (job.holds_unique_key(), &job.unique_key) {
            self.unique.insert(key.clone(), job.seq);
        }
    }

    fn remove(&mut self, job: &Job) {
        self.counts[job.state.index()] -= 1;
        if let Some(counts) = self.queue_counts.get_mut(&job.queue) {
            counts[job.state.index()] -= 1;
            if counts.iter().all(|&n| n == 0) {
                self.queue_counts.remove(&job.queue);
            }
        }
        if job.waits_to_run() && !self.scheduled.remove(&(job.run_at, job.seq)) {
            if let Some(ready) = self.ready.get_mut(&job.queue) {
                ready.remove(&(Reverse(job.priority), job.run_at, job.seq));
            }
            self.ready_at.remove(&(job.run_at, job.seq));
        }
        if let (JobState::Processing, Some(lease)) = (job.state, &job.lease) {
            self.leases.remove(&(lease.expires_at, job.seq));
        }
        if let (true, Some(key)) = (job.holds_unique_key(), &job.unique_key) {
            self.unique.remove(key);
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
        for after in &job.after {
            if let Some(&after) = self.ids.get(after) {
                self.dependents.entry(after).or_default().push(job.seq);
            }
        }
        self.jobs.insert(job.seq, job);
    }

    /// Deletes the job with sequence number `seq` and its history. With `cancel_at`, the jobs
    /// blocked waiting for it are cancelled then (it can no longer complete); without, they
    /// count it as completed (a purged completed job).
    fn remove(&mut self, seq: u64, cancel_at: Option<Timestamp>) {
        if let Some(job) = self.jobs.remove(&seq) {
            self.revision += 1;
            self.ids.remove(&job.id);
            self.history.remove(&seq);
            self.live.remove(&seq);
            self.index.remove(&job);
            for after in &job.after {
                if let Some(list) = self.ids.get(after).and_then(|a| self.dependents.get_mut(a)) {
                    list.retain(|&dependent| dependent != seq);
                }
            }
            if let Some(now) = cancel_at {
                self.propagate(&job, true, now);
            }
            self.dependents.remove(&seq);
        }
    }

    /// Changes the job with sequence number `seq` in place (never its id or seq), keeps the
    /// indexes in step, and lets the jobs waiting for it follow when it finished.
    fn update<T>(
        &mut self,
        seq: u64,
        now: Timestamp,
        change: impl FnOnce(&mut Job) -> T,
    ) -> (Job, T) {
        let job = self
            .jobs
            .get_mut(&seq)
            .expect("the indexes only hold sequence numbers of stored jobs");
        let old = job.clone();
        self.index.remove(job);
        let out = change(job);
        self.index.insert(job);
        self.revision += 1;
        let new = job.clone();
        if rules::finishes(&old, &new) {
            self.propagate(&new, false, now);
        }
        (new, out)
    }

    /// Replaces a job's record, keeping the indexes in step (and nothing else).
    fn replace(&mut self, new: Job) {
        let job = self
            .jobs
            .get_mut(&new.seq)
            .expect("only stored jobs are replaced");
        self.index.remove(job);
        *job = new;
        self.index.insert(job);
        self.revision += 1;
    }

    fn propagate(&mut self, finished: &Job, removed: bool, now: Timestamp) {
        let result: Result<()> = rules::propagate(self, finished, removed, now);
        result.expect("the memory store's graph operations cannot fail");
    }

    /// The states of a stored job's dependencies, through the links made when it was enqueued:
    /// a dependency no longer linked (purged after it completed) is `None`, even if a new job
    /// has taken its id since.
    fn dependencies_of(&self, job: &Job) -> Vec<Dependency> {
        job.after
            .iter()
            .map(|id| {
                let state = self
                    .ids
                    .get(id)
                    .filter(|seq| {
                        self.dependents
                            .get(seq)
                            .is_some_and(|waiting| waiting.contains(&job.seq))
                    })
                    .map(|seq| self.jobs[seq].state);
                (id.clone(), state)
            })
            .collect()
    }

    /// Adds a finished attempt to the job's history; the output it recorded while running
    /// goes.
    fn remember(&mut self, seq: u64, attempt: Attempt) {
        self.live.remove(&seq);
        self.history.entry(seq).or_default().push(attempt);
    }

    /// Moves jobs due at `now` from `scheduled` to `ready`.
    fn promote(&mut self, now: Timestamp) {
        while let Some(&(run_at, seq)) = self.index.scheduled.first() {
            if run_at > now {
                break;
            }
            self.index.scheduled.pop_first();
            let job = &self.jobs[&seq];
            self.index
                .ready
                .entry(job.queue.clone())
                .or_default()
                .insert((Reverse(job.priority), run_at, seq));
            self.index.ready_at.insert((run_at, seq));
        }
    }

    fn settings(&self, queue: &str) -> QueueSettings {
        self.queues.get(queue).copied().unwrap_or_default()
    }

    fn queue_info(&self, name: &str) -> QueueInfo {
        let settings = self.settings(name);
        QueueInfo {
            name: name.to_owned(),
            paused: settings.paused,
            limit: settings.limit,
            counts: self
                .index
                .queue_counts
                .get(name)
                .map(counts_of)
                .unwrap_or_default(),
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

    pub(crate) fn submit(&mut self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Enqueued>> {
        // Checked in full first, so that a refusal changes nothing: each job on its own, then
        // against the store and the earlier jobs of the batch (the order of the SQL stores).
        for new in &jobs {
            new.validate()?;
        }
        let mut ids = HashSet::with_capacity(jobs.len());
        let mut keys = HashSet::new();
        let mut prepared = Vec::with_capacity(jobs.len());
        for new in jobs {
            let id = new.id.clone().unwrap_or_else(JobId::generate);
            let duplicate = new
                .unique_key
                .as_ref()
                .is_some_and(|key| self.index.unique.contains_key(key) || keys.contains(key));
            if !duplicate {
                // The dependencies, then the id: the order in which the SQL stores meet them
                // (the id when the row is inserted).
                for after in &new.after {
                    let state = match self.ids.get(after) {
                        Some(seq) => Some(self.jobs[seq].state),
                        None => ids.contains(after).then_some(JobState::Pending),
                    };
                    rules::check_dependencies(new.id.as_ref(), &[(after.clone(), state)])?;
                }
                if self.ids.contains_key(&id) || ids.contains(&id) {
                    return Err(StorageError::AlreadyExists { id });
                }
                ids.insert(id.clone());
                keys.extend(new.unique_key.clone());
            }
            prepared.push((id, new));
        }
        let mut entries = Vec::with_capacity(prepared.len());
        for (id, new) in prepared {
            let holder = new
                .unique_key
                .as_ref()
                .and_then(|key| self.index.unique.get(key));
            if let Some(&seq) = holder {
                entries.push(Enqueued {
                    job: self.jobs[&seq].clone(),
                    duplicate: true,
                });
                continue;
            }
            let dependencies: Vec<Dependency> = new
                .after
                .iter()
                .map(|after| {
                    (
                        after.clone(),
                        self.ids.get(after).map(|s| self.jobs[s].state),
                    )
                })
                .collect();
            let job = rules::new_job(new, id, self.next_seq, &dependencies, &self.config, now);
            self.insert(job.clone());
            entries.push(Enqueued {
                job,
                duplicate: false,
            });
        }
        Ok(entries)
    }

    pub(crate) fn claim(&mut self, request: &ClaimRequest, now: Timestamp) -> Vec<Job> {
        if request.max == 0 {
            return Vec::new();
        }
        self.promote(now);
        // The first jobs of each queue the request may take, merged in claim order.
        let mut picked: Vec<ReadyKey> = Vec::new();
        for (queue, ready) in &self.index.ready {
            let settings = self.settings(queue);
            if !request.takes(queue) || settings.paused {
                continue;
            }
            let running = self
                .index
                .queue_counts
                .get(queue)
                .map_or(0, |c| c[JobState::Processing.index()]);
            let room = rules::room_in_queue(settings.limit, running, request.max);
            // A job in `ready` was due at an earlier claim's `now`; with a `now` that went
            // backwards (another process's clock read) it may not be due yet: skip it.
            picked.extend(
                ready
                    .iter()
                    .filter(|&&(_, run_at, _)| run_at <= now)
                    .take(room),
            );
        }
        picked.sort_unstable();
        picked.truncate(request.max);
        picked
            .into_iter()
            .map(|(_, _, seq)| {
                self.update(seq, now, |job| {
                    rules::claim(job, &request.worker, request.lease_for, now)
                })
                .0
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
                    self.update(seq, now, |job| rules::extend_lease(job, lease_for, now));
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
        request: &ClaimRequest,
        now: Timestamp,
    ) -> (Vec<Result<Job>>, Vec<Job>) {
        let settled = self.settle(settlements, now);
        (settled, self.claim(request, now))
    }

    fn settle_one(&mut self, settlement: Settlement, now: Timestamp) -> Result<Job> {
        let seq = self.leased(settlement.lease())?;
        let (job, attempt) = self.update(seq, now, |job| rules::settle(job, &settlement, now));
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
        let (job, attempt) = self.update(seq, now, |job| rules::recover(job, why, now));
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
            .filter(|job| query.queue.as_ref().is_none_or(|q| &job.queue == q))
            .skip(query.offset)
            .take(query.limit.unwrap_or(usize::MAX))
            .map(|job| Job {
                output: None,
                ..job.clone()
            })
            .collect()
    }

    pub(crate) fn counts(&self) -> StateCounts {
        counts_of(&self.index.counts)
    }

    pub(crate) fn activity(&self, since: Timestamp) -> Activity {
        let mut attempts: Vec<FinishedAttempt> = self
            .history
            .iter()
            .flat_map(|(seq, attempts)| {
                let job = &self.jobs[seq];
                attempts
                    .iter()
                    .filter(|a| a.finished_at.is_some_and(|at| at >= since))
                    .map(|a| FinishedAttempt {
                        queue: job.queue.clone(),
                        job: job.id.clone(),
                        attempt: Attempt {
                            output: None,
                            ..a.clone()
                        },
                    })
            })
            .collect();
        attempts.sort_by_key(|a| a.attempt.finished_at);
        let ended = self
            .jobs
            .values()
            .filter(|job| matches!(job.state, JobState::Dead | JobState::Cancelled))
            .filter(|job| rules::finished_at(job) >= since)
            .map(|job| (job.queue.clone(), job.state))
            .collect();
        Activity { attempts, ended }
    }

    pub(crate) fn queues(&self) -> Vec<QueueInfo> {
        let mut names: BTreeSet<&String> = self.index.queue_counts.keys().collect();
        names.extend(self.queues.keys());
        names
            .into_iter()
            .map(|name| self.queue_info(name))
            .collect()
    }

    pub(crate) fn change_queues(
        &mut self,
        names: Option<&[String]>,
        change: QueueChange,
    ) -> Result<Vec<QueueInfo>> {
        let names: Vec<String> = match names {
            Some(names) => {
                for name in names {
                    crate::job::check_queue_name(name)?;
                }
                let mut unique = names.to_vec();
                unique.sort();
                unique.dedup();
                unique
            }
            None => self.queues().into_iter().map(|q| q.name).collect(),
        };
        for name in &names {
            let mut settings = self.settings(name);
            rules::change_queue(&mut settings.paused, &mut settings.limit, change);
            if settings != self.settings(name) {
                self.touch();
            }
            if settings == QueueSettings::default() {
                self.queues.remove(name);
            } else {
                self.queues.insert(name.clone(), settings);
            }
        }
        Ok(names.iter().map(|name| self.queue_info(name)).collect())
    }

    pub(crate) fn next_due(&self, after: Timestamp) -> Option<Timestamp> {
        let later = |set: &BTreeSet<(Timestamp, u64)>| {
            set.range((after, u64::MAX)..)
                .find(|&&(run_at, _)| run_at > after)
                .map(|&(run_at, _)| run_at)
        };
        match (later(&self.index.ready_at), later(&self.index.scheduled)) {
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
            None => {
                let dead = self
                    .seqs_in(JobState::Dead)
                    .into_iter()
                    .map(|seq| self.jobs[&seq].clone())
                    .collect();
                let held = |key: &str| self.index.unique.contains_key(key);
                rules::retry_all_targets(dead, held)
                    .into_iter()
                    .map(|job| job.seq)
                    .collect()
            }
        };
        let mut targets = targets;
        let mut seen = HashSet::new();
        targets.retain(|&seq| seen.insert(seq));
        self.check_reruns(&targets)?;
        let mut retried = Vec::with_capacity(targets.len());
        for seq in targets {
            retried.push(self.rerun(seq, now));
        }
        Ok(retried)
    }

    /// Checks that running the finished jobs `seqs` again gives no unique key to two jobs.
    fn check_reruns(&self, seqs: &[u64]) -> Result<()> {
        let mut taken: HashMap<&String, u64> = HashMap::new();
        for &seq in seqs {
            let job = &self.jobs[&seq];
            if let Some(key) = &job.unique_key {
                let holder = self.index.unique.get(key).or_else(|| taken.get(key));
                rules::check_unique(job, holder.map(|seq| &self.jobs[seq]))?;
                taken.insert(key, seq);
            }
        }
        Ok(())
    }

    /// Runs the finished job `seq` again (checked by [`Self::check_reruns`]).
    fn rerun(&mut self, seq: u64, now: Timestamp) -> Job {
        let dependencies = self.dependencies_of(&self.jobs[&seq]);
        self.update(seq, now, |job| rules::retry(job, &dependencies, now))
            .0
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
            if self.jobs[&seq].state.is_finished() {
                // Cancelled meanwhile, as a dependent of an earlier one.
                cancelled.push(self.jobs[&seq].clone());
                continue;
            }
            let (job, attempt) = self.update(seq, now, |job| rules::cancel(job, now));
            cancelled.push(job);
            if let Some(attempt) = attempt {
                self.remember(seq, attempt);
            }
        }
        Ok(cancelled)
    }

    pub(crate) fn remove_jobs(&mut self, ids: &[JobId], now: Timestamp) -> Result<Vec<JobId>> {
        let seqs = self.checked(ids, rules::check_remove)?;
        let mut removed = Vec::with_capacity(seqs.len());
        for seq in seqs {
            removed.push(self.jobs[&seq].id.clone());
            self.remove(seq, Some(now));
        }
        Ok(removed)
    }

    pub(crate) fn retry(&mut self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        let seqs = self.checked(ids, rules::check_rerun)?;
        self.check_reruns(&seqs)?;
        let mut retried = Vec::with_capacity(seqs.len());
        for seq in seqs {
            retried.push(self.rerun(seq, now));
        }
        Ok(retried)
    }

    pub(crate) fn clear_dead(&mut self, now: Timestamp) -> usize {
        let dead = self.seqs_in(JobState::Dead);
        for &seq in &dead {
            self.remove(seq, Some(now));
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
            self.remove(seq, None);
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

fn counts_of(c: &[usize; 6]) -> StateCounts {
    StateCounts {
        pending: c[JobState::Pending.index()],
        processing: c[JobState::Processing.index()],
        completed: c[JobState::Completed.index()],
        failed: c[JobState::Failed.index()],
        dead: c[JobState::Dead.index()],
        cancelled: c[JobState::Cancelled.index()],
    }
}

impl rules::Dependents for QueueState {
    type Error = StorageError;

    fn blocked_dependents(&mut self, seq: u64) -> Result<Vec<Job>> {
        Ok(self
            .dependents
            .get(&seq)
            .into_iter()
            .flatten()
            .filter_map(|seq| self.jobs.get(seq))
            .filter(|job| job.blocked && job.state.is_runnable())
            .cloned()
            .collect())
    }

    fn dependencies(&mut self, job: &Job) -> Result<Vec<Dependency>> {
        Ok(self.dependencies_of(job))
    }

    fn write(&mut self, _old: &Job, new: Job) -> Result<()> {
        self.replace(new);
        Ok(())
    }
}
