//! Helpers shared by this crate's integration tests: bounded waits on pool events and on
//! processes. Each test binary uses a part of them.
#![allow(dead_code)]

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use queuectl_core::{
    Activity, ClaimRequest, Config, ConfigError, Enqueued, Event, Job, JobId, Lease, ListQuery,
    NewJob, OutputChunk, QueueChange, QueueInfo, Result, RunningOutput, Settlement, StateCounts,
    Storage, StorageError, Timestamp, WorkerInfo,
};

/// Upper bound of every wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a thread and returns its result; fails the test if it takes longer than
/// [`TIMEOUT`] (so a pool that cannot stop fails instead of hanging the suite).
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Collects events until `stop` matches one (returned last). Panics on timeout.
pub fn events_until(events: &Receiver<Event>, mut stop: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => {
                let done = stop(&event);
                seen.push(event);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("timed out waiting for an event; saw {seen:#?}"),
        }
    }
}

/// Collects events until `n` jobs have completed.
pub fn count_completed(events: &Receiver<Event>, n: usize) -> Vec<Event> {
    let mut done = 0;
    events_until(events, |e| {
        if matches!(e, Event::Completed { .. }) {
            done += 1;
        }
        done == n
    })
}

/// Whether `pid` is a live process (a zombie counts as dead: in a container, nobody may reap
/// an orphan).
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) if Path::new("/proc/self/stat").exists() => false,
        Err(_) => kill(Pid::from_raw(pid), None).is_ok(),
    }
}

/// Waits (bounded) for `pid` to die; kills it and fails if it does not.
pub fn assert_gone(pid: i32) {
    let deadline = Instant::now() + TIMEOUT;
    while is_running(pid) {
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("process {pid} is still running");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A `MemoryStorage` with faults to switch on. It does not override `settle_and_claim`, so
/// the pool goes through the trait's default.
#[derive(Debug, Default)]
pub struct Faulty {
    pub inner: queuectl_core::MemoryStorage,
    /// Claims fail with an I/O error.
    pub fail_claims: AtomicBool,
    /// Settlements of results fail with an I/O error (results can never be recorded); jobs
    /// handed back without a result are taken.
    pub fail_settles: AtomicBool,
    /// How many claims were made.
    pub claims: AtomicUsize,
    /// Recording live output fails with an I/O error.
    pub fail_output: AtomicBool,
    /// Reading the version with a worker's registration (`poll_worker`) fails.
    pub fail_polls: AtomicBool,
    /// Every batch of live output the store was asked to record, in order.
    pub outputs: parking_lot::Mutex<Vec<Vec<OutputChunk>>>,
    /// When set, `wait_for_work` (what the pool's waker waits with) reports each wait here,
    /// then waits for real.
    pub waits: Option<crossbeam_channel::Sender<()>>,
    /// `wait_for_change` and `wait_for_work` never see a change: they sleep their whole
    /// timeout.
    pub deaf: bool,
    /// Another store to work on instead of `inner` ([`Faulty::over`]).
    pub over: Option<std::sync::Arc<dyn Storage>>,
    /// What `writes_concurrently` says: a pool then records large batches of results
    /// beside its claims.
    pub concurrent: bool,
    /// How many settlements of results were asked for on a pool's settling thread.
    pub settled_beside: AtomicUsize,
}

impl Faulty {
    /// A store whose `wait_for_work` reports that the waker is waiting, then waits.
    pub fn reporting() -> (std::sync::Arc<Self>, Receiver<()>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let store = Faulty {
            waits: Some(tx),
            ..Faulty::default()
        };
        (std::sync::Arc::new(store), rx)
    }

    /// A store over `store`, whose `wait_for_work` reports that the waker is waiting.
    pub fn over(store: std::sync::Arc<dyn Storage>) -> (std::sync::Arc<Self>, Receiver<()>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let faulty = Faulty {
            waits: Some(tx),
            over: Some(store),
            ..Faulty::default()
        };
        (std::sync::Arc::new(faulty), rx)
    }

    /// The store underneath.
    fn store(&self) -> &dyn Storage {
        self.over.as_deref().unwrap_or(&self.inner)
    }

    fn io_error<T>() -> Result<T> {
        Err(StorageError::Io {
            op: "append to",
            path: "/gone/journal".into(),
            source: std::io::Error::other("the disk went away"),
        })
    }
}

impl Storage for Faulty {
    fn submit(&self, jobs: Vec<NewJob>, at: Timestamp) -> Result<Vec<Enqueued>> {
        self.store().submit(jobs, at)
    }
    fn claim_jobs(&self, request: &ClaimRequest, at: Timestamp) -> Result<Vec<Job>> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        if self.fail_claims.load(Ordering::SeqCst) {
            return Self::io_error();
        }
        self.store().claim_jobs(request, at)
    }
    fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
        at: Timestamp,
    ) -> Result<Vec<JobId>> {
        self.store().extend_leases(leases, lease_for, at)
    }
    fn settle(&self, settlements: Vec<Settlement>, at: Timestamp) -> Result<Vec<Result<Job>>> {
        if !settlements.is_empty() && thread::current().name() == Some("queuectl-settle") {
            self.settled_beside.fetch_add(1, Ordering::SeqCst);
        }
        // Only results fail: nothing to record (a claim through the default
        // `settle_and_claim` settles nothing), or jobs handed back (what that default does
        // with the jobs it claimed when the results failed), is taken.
        let results = settlements
            .iter()
            .any(|s| !matches!(s, Settlement::Release { .. }));
        if self.fail_settles.load(Ordering::SeqCst) && results {
            return Self::io_error();
        }
        self.store().settle(settlements, at)
    }
    fn record_output(&self, chunks: &[OutputChunk]) -> Result<Vec<JobId>> {
        self.outputs.lock().push(chunks.to_vec());
        if self.fail_output.load(Ordering::SeqCst) {
            return Self::io_error();
        }
        self.store().record_output(chunks)
    }
    fn output_since(&self, id: &JobId, offset: u64) -> Result<RunningOutput> {
        self.store().output_since(id, offset)
    }
    fn recover_expired(&self, at: Timestamp) -> Result<Vec<Job>> {
        self.store().recover_expired(at)
    }
    fn recover_worker(&self, worker: &str, at: Timestamp) -> Result<Vec<Job>> {
        self.store().recover_worker(worker, at)
    }
    fn get(&self, id: &JobId) -> Result<Job> {
        self.store().get(id)
    }
    fn attempts(&self, id: &JobId) -> Result<Vec<queuectl_core::Attempt>> {
        self.store().attempts(id)
    }
    fn cancel(&self, ids: &[JobId], at: Timestamp) -> Result<Vec<Job>> {
        self.store().cancel(ids, at)
    }
    fn remove(&self, ids: &[JobId], at: Timestamp) -> Result<Vec<JobId>> {
        self.store().remove(ids, at)
    }
    fn retry(&self, ids: &[JobId], at: Timestamp) -> Result<Vec<Job>> {
        self.store().retry(ids, at)
    }
    fn list(&self, query: &ListQuery) -> Result<Vec<Job>> {
        self.store().list(query)
    }
    fn counts(&self) -> Result<StateCounts> {
        self.store().counts()
    }
    fn queues(&self) -> Result<Vec<QueueInfo>> {
        self.store().queues()
    }
    fn activity(&self, since: Timestamp) -> Result<Activity> {
        self.store().activity(since)
    }
    fn change_queues(
        &self,
        names: Option<&[String]>,
        change: QueueChange,
    ) -> Result<Vec<QueueInfo>> {
        self.store().change_queues(names, change)
    }
    fn next_due(&self, after: Timestamp) -> Result<Option<Timestamp>> {
        self.store().next_due(after)
    }
    fn retry_dead(&self, ids: Option<&[JobId]>, at: Timestamp) -> Result<Vec<Job>> {
        self.store().retry_dead(ids, at)
    }
    fn clear_dead(&self, at: Timestamp) -> Result<usize> {
        self.store().clear_dead(at)
    }
    fn purge_completed(&self, before: Timestamp) -> Result<usize> {
        self.store().purge_completed(before)
    }
    fn config(&self) -> Result<Config> {
        self.store().config()
    }
    fn update_config(
        &self,
        update: &mut dyn FnMut(&mut Config) -> std::result::Result<(), ConfigError>,
    ) -> Result<Config> {
        self.store().update_config(update)
    }
    fn register_worker(&self, worker: WorkerInfo) -> Result<()> {
        self.store().register_worker(worker)
    }
    fn worker_heartbeat(&self, worker: &str, at: Timestamp) -> Result<bool> {
        self.store().worker_heartbeat(worker, at)
    }
    fn deregister_worker(&self, worker: &str) -> Result<()> {
        self.store().deregister_worker(worker)
    }
    fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.store().workers()
    }
    fn request_stop(&self) -> Result<usize> {
        self.store().request_stop()
    }
    fn change_version(&self) -> Result<u64> {
        self.store().change_version()
    }
    fn poll_worker(&self, worker: &str) -> Result<(u64, Option<WorkerInfo>)> {
        if self.fail_polls.load(Ordering::SeqCst) {
            return Self::io_error();
        }
        self.store().poll_worker(worker)
    }
    fn wait_for_change(&self, seen: u64, timeout: Duration) -> Result<u64> {
        if self.deaf {
            thread::sleep(timeout);
            return self.store().change_version();
        }
        self.store().wait_for_change(seen, timeout)
    }
    fn writes_concurrently(&self) -> bool {
        self.concurrent
    }
    fn wait_for_work(&self, seen: u64, timeout: Duration) -> Result<u64> {
        if let Some(waits) = &self.waits {
            let _ = waits.send(());
        }
        if self.deaf {
            thread::sleep(timeout);
            return self.store().change_version();
        }
        self.store().wait_for_work(seen, timeout)
    }
}
