//! `MemoryStorage`: the whole queue in one process's memory.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::{Config, ConfigError};
use crate::error::Result;
use crate::job::{Attempt, Job, JobId, Lease, NewJob, Timestamp};
use crate::state::QueueState;
use crate::storage::{
    Activity, ClaimRequest, Enqueued, ListQuery, OutputChunk, QueueChange, QueueInfo,
    RunningOutput, Settlement, StateCounts, Storage, WorkerInfo,
};

/// A [`Storage`] kept in memory: fast, shared between threads, gone when the process exits.
///
/// For tests, embedding and benchmarks. Claiming costs O(log n) in the number of jobs: due jobs
/// sit in an ordered index.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Inner {
    state: QueueState,
}

impl MemoryStorage {
    /// An empty store with default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs a read-only operation.
    fn read<T>(&self, f: impl FnOnce(&QueueState) -> T) -> T {
        f(&self.inner.lock().state)
    }

    /// Runs a mutating operation, then wakes every waiter if it changed anything.
    fn write<T>(&self, f: impl FnOnce(&mut QueueState) -> T) -> T {
        let mut inner = self.inner.lock();
        let before = inner.state.revision();
        let out = f(&mut inner.state);
        let changed = inner.state.revision() != before;
        drop(inner);
        if changed {
            self.changed.notify_all();
        }
        out
    }
}

impl Storage for MemoryStorage {
    fn submit(&self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Enqueued>> {
        self.write(|s| s.submit(jobs, now))
    }

    fn claim_jobs(&self, request: &ClaimRequest, now: Timestamp) -> Result<Vec<Job>> {
        Ok(self.write(|s| s.claim(request, now)))
    }

    fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<Vec<JobId>> {
        Ok(self.write(|s| s.extend_leases(leases, lease_for, now)))
    }

    fn settle(&self, settlements: Vec<Settlement>, now: Timestamp) -> Result<Vec<Result<Job>>> {
        Ok(self.write(|s| s.settle(settlements, now)))
    }

    fn settle_and_claim(
        &self,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<(Vec<Result<Job>>, Vec<Job>)> {
        Ok(self.write(|s| s.settle_and_claim(settlements, request, now)))
    }

    fn record_output(&self, chunks: &[OutputChunk]) -> Result<Vec<JobId>> {
        Ok(self.write(|s| s.record_output(chunks)))
    }

    fn output_since(&self, id: &JobId, offset: u64) -> Result<RunningOutput> {
        self.read(|s| s.output_since(id, offset))
    }

    fn recover_expired(&self, now: Timestamp) -> Result<Vec<Job>> {
        Ok(self.write(|s| s.recover_expired(now)))
    }

    fn recover_worker(&self, worker: &str, now: Timestamp) -> Result<Vec<Job>> {
        Ok(self.write(|s| s.recover_worker(worker, now)))
    }

    fn get(&self, id: &JobId) -> Result<Job> {
        self.read(|s| s.get(id))
    }

    fn attempts(&self, id: &JobId) -> Result<Vec<Attempt>> {
        self.read(|s| s.attempts(id))
    }

    fn list(&self, query: &ListQuery) -> Result<Vec<Job>> {
        Ok(self.read(|s| s.list(query)))
    }

    fn counts(&self) -> Result<StateCounts> {
        Ok(self.read(|s| s.counts()))
    }

    fn queues(&self) -> Result<Vec<QueueInfo>> {
        Ok(self.read(|s| s.queues()))
    }

    fn activity(&self, since: Timestamp) -> Result<Activity> {
        Ok(self.read(|s| s.activity(since)))
    }

    fn change_queues(
        &self,
        names: Option<&[String]>,
        change: QueueChange,
    ) -> Result<Vec<QueueInfo>> {
        self.write(|s| s.change_queues(names, change))
    }

    fn next_due(&self, after: Timestamp) -> Result<Option<Timestamp>> {
        Ok(self.read(|s| s.next_due(after)))
    }

    fn retry_dead(&self, ids: Option<&[JobId]>, now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.retry_dead(ids, now))
    }

    fn cancel(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.cancel(ids, now))
    }

    fn remove(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<JobId>> {
        self.write(|s| s.remove_jobs(ids, now))
    }

    fn retry(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.retry(ids, now))
    }

    fn clear_dead(&self, now: Timestamp) -> Result<usize> {
        Ok(self.write(|s| s.clear_dead(now)))
    }

    fn purge_completed(&self, finished_before: Timestamp) -> Result<usize> {
        Ok(self.write(|s| s.purge_completed(finished_before)))
    }

    fn config(&self) -> Result<Config> {
        Ok(self.read(|s| s.config().clone()))
    }

    fn update_config(
        &self,
        update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<Config> {
        self.write(|s| s.update_config(update))
    }

    fn register_worker(&self, worker: WorkerInfo) -> Result<()> {
        self.write(|s| s.register_worker(worker));
        Ok(())
    }

    fn worker_heartbeat(&self, worker: &str, now: Timestamp) -> Result<bool> {
        self.write(|s| s.worker_heartbeat(worker, now))
    }

    fn deregister_worker(&self, worker: &str) -> Result<()> {
        self.write(|s| s.deregister_worker(worker));
        Ok(())
    }

    fn workers(&self) -> Result<Vec<WorkerInfo>> {
        Ok(self.read(|s| s.workers()))
    }

    fn request_stop(&self) -> Result<usize> {
        Ok(self.write(|s| s.request_stop()))
    }

    fn change_version(&self) -> Result<u64> {
        Ok(self.inner.lock().state.revision())
    }

    fn wait_for_change(&self, seen: u64, timeout: Duration) -> Result<u64> {
        let mut inner = self.inner.lock();
        // A timeout too long to represent as an instant is as good as forever.
        let deadline = Instant::now().checked_add(timeout);
        while inner.state.revision() == seen {
            match deadline {
                Some(deadline) => {
                    if self.changed.wait_until(&mut inner, deadline).timed_out() {
                        break;
                    }
                }
                None => self.changed.wait(&mut inner),
            }
        }
        Ok(inner.state.revision())
    }
}
