//! The worker pool: a dispatcher that claims jobs and N executor threads that run them.
//!
//! ```text
//!              claim (≤ free slots)              jobs (bounded)
//!   Storage ◀──────────────────────▶ dispatcher ─────────────────▶ executor threads ×N
//!      ▲        settle (batched)          ▲   ◀─────────────────────────┘ outcomes
//!      │ wait_for_change                  │ wake / control (graceful, forced)
//!    waker thread ────────────────────────┘
//! ```
//!
//! The dispatcher is the only thread that talks to storage about jobs. It also heartbeats the
//! leases of running jobs and the worker's registration, runs the recovery tick (expired leases,
//! workers on this host whose process is gone), purges old completed jobs, and obeys a stop
//! request recorded in storage. Because jobs run on other threads, none of this waits for a
//! long job.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, select};

use crate::backoff::BackoffPolicy;
use crate::config::Config;
use crate::error::StorageError;
use crate::executor::{
    CancelSignal, Canceller, Executor, Outcome, Status, cancel_pair, panic_message,
};
use crate::job::{Job, JobId, JobState, Lease, Timestamp, later, now};
use crate::storage::{AttemptReport, Settlement, Storage, WorkerInfo};

/// Something the pool did, for live output and for tests to wait on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The pool registered and is running.
    Started {
        /// Its worker id.
        worker: String,
        /// Executor threads.
        threads: usize,
    },
    /// A job was claimed for this pool (with prefetch, it may wait for a free thread).
    Claimed {
        /// The job.
        job: JobId,
        /// The attempt number (1 for the first).
        attempt: u32,
        /// Its command.
        command: String,
    },
    /// An attempt succeeded.
    Completed {
        /// The job.
        job: JobId,
        /// The attempt number.
        attempt: u32,
        /// How long it ran.
        duration: Duration,
    },
    /// An attempt failed; the job will run again after `retry_in`.
    Failed {
        /// The job.
        job: JobId,
        /// The attempt number.
        attempt: u32,
        /// Why.
        error: String,
        /// The backoff before the next attempt.
        retry_in: Duration,
    },
    /// An attempt failed and it was the job's last: the job is in the dead letter queue.
    Dead {
        /// The job.
        job: JobId,
        /// The attempt number.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A running job was handed back unfinished (forced shutdown); its attempt is not charged.
    Released {
        /// The job.
        job: JobId,
    },
    /// The pool lost a job's lease (it was presumed dead); its result was discarded.
    LeaseLost {
        /// The job.
        job: JobId,
    },
    /// The recovery tick returned a job abandoned by a dead worker to the queue.
    Recovered {
        /// The job.
        job: JobId,
        /// Its state now (`pending`, or `dead` if that was its last attempt).
        state: JobState,
    },
    /// Completed jobs past their retention were deleted.
    Purged {
        /// How many.
        count: usize,
    },
    /// The pool began to stop.
    Stopping {
        /// Whether running jobs are being killed (`true`) or allowed to finish.
        forced: bool,
        /// Why: "requested", "stop request in storage", "idle", "shutdown timeout",
        /// "pool handle dropped" or "storage failure".
        reason: &'static str,
    },
    /// A storage operation failed; the pool retries it.
    StorageError {
        /// What the pool was doing.
        op: &'static str,
        /// The error and its causes.
        error: String,
    },
    /// The pool has stopped; no more events follow.
    Stopped,
}

/// Why the pool could not start or ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A thread could not be spawned.
    #[error("could not spawn the {what} thread")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed in a way the pool cannot work around.
    #[error("storage failed while the pool was {op}")]
    Storage {
        /// What the pool was doing.
        op: &'static str,
        /// The error.
        source: StorageError,
    },
    /// A pool thread panicked.
    #[error("the {what} thread panicked")]
    Panicked {
        /// Which thread.
        what: &'static str,
    },
    /// Invalid builder settings.
    #[error("invalid worker pool setting: {0}")]
    Invalid(String),
}

/// What a pool did over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Attempts that succeeded.
    pub completed: usize,
    /// Attempts that failed and will be retried.
    pub failed: usize,
    /// Attempts that failed for the last time.
    pub dead: usize,
    /// Jobs handed back unfinished.
    pub released: usize,
    /// Results discarded because the lease was lost.
    pub lost: usize,
}

use crate::config::MAX_WORKERS;
const MAX_PREFETCH: usize = 1_000_000;
const MAX_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Configures and starts a [`WorkerPool`].
#[derive(Debug)]
pub struct WorkerPoolBuilder {
    storage: Arc<dyn Storage>,
    executor: Arc<dyn Executor>,
    workers: usize,
    prefetch: usize,
    backoff: Arc<dyn BackoffPolicy>,
    lease: Duration,
    heartbeat: Option<Duration>,
    recovery: Option<Duration>,
    retention: Option<Duration>,
    worker_id: Option<String>,
    exit_when_idle: bool,
    shutdown_timeout: Option<Duration>,
    events: bool,
}

impl WorkerPoolBuilder {
    /// Takes worker count, backoff, lease timeout and retention from stored settings.
    pub fn config(mut self, config: &Config) -> Self {
        self.workers = config.worker_count();
        self.backoff = Arc::new(config.backoff());
        self.lease = config.lease_duration();
        self.retention = config.completed_retention();
        self
    }

    /// Executor threads, i.e. jobs run at once (default 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Jobs claimed ahead of free executor threads (default 0). Prefetching saves a storage
    /// round trip per job for short jobs; its cost is that prefetched jobs wait for this pool
    /// even when another worker is idle. A graceful stop hands unstarted jobs back.
    pub fn prefetch(mut self, jobs: usize) -> Self {
        self.prefetch = jobs;
        self
    }

    /// The backoff after failed attempts (default: `2 ^ attempts` seconds, capped at 1 hour).
    pub fn backoff(mut self, backoff: impl BackoffPolicy + 'static) -> Self {
        self.backoff = Arc::new(backoff);
        self
    }

    /// How long a claim stays valid without a heartbeat (default 30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often leases and the worker registration are renewed (default: a third of the lease).
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = Some(every);
        self
    }

    /// How often expired leases and dead workers are looked for (default: half the lease,
    /// at most 1 s: the tick is a cheap look at the worker registry).
    pub fn recovery_interval(mut self, every: Duration) -> Self {
        self.recovery = Some(every);
        self
    }

    /// Deletes completed jobs older than this, checked every few minutes (default: never).
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// The id the pool registers under (default: `host-pid-random`).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Stop gracefully once nothing runs, nothing is due and no failed job waits for its retry
    /// (default: keep waiting for work). Jobs scheduled for later do not keep the pool.
    pub fn exit_when_idle(mut self, exit: bool) -> Self {
        self.exit_when_idle = exit;
        self
    }

    /// After a graceful stop begins, force it when jobs are still running after this long.
    pub fn shutdown_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Whether to produce [`Event`]s (default `true`). Events are buffered until read: turn
    /// them off when nothing reads [`WorkerPool::events`].
    pub fn events(mut self, enabled: bool) -> Self {
        self.events = enabled;
        self
    }

    fn validate(&self) -> Result<(), PoolError> {
        let invalid = |what: &str| Err(PoolError::Invalid(what.to_owned()));
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return invalid("workers must be from 1 to 4096");
        }
        if self.prefetch > MAX_PREFETCH {
            return invalid("prefetch must be at most 1000000");
        }
        if self.lease.is_zero() || self.lease > MAX_LEASE {
            return invalid("the lease must be longer than zero and at most a week");
        }
        if self
            .heartbeat
            .is_some_and(|h| h.is_zero() || h >= self.lease)
        {
            return invalid(
                "the heartbeat interval must be longer than zero and shorter than the lease",
            );
        }
        if self.recovery.is_some_and(|r| r.is_zero() || r > MAX_LEASE) {
            return invalid("the recovery interval must be longer than zero and at most a week");
        }
        Ok(())
    }

    /// Registers the worker, recovers expired leases and starts the threads.
    pub fn start(self) -> Result<WorkerPool, PoolError> {
        self.validate()?;
        let hostname = hostname();
        let id = self.worker_id.clone().unwrap_or_else(|| {
            format!(
                "{hostname}-{}-{:04x}",
                std::process::id(),
                crate::job::random_u64() & 0xffff
            )
        });
        let started = now();
        self.storage
            .register_worker(WorkerInfo {
                id: id.clone(),
                hostname: hostname.clone(),
                pid: std::process::id(),
                concurrency: self.workers,
                started_at: started,
                last_seen: started,
                stop_requested: false,
                stop_forced: false,
                identity: Default::default(),
            })
            .map_err(|source| PoolError::Storage {
                op: "registering",
                source,
            })?;

        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let events_tx = self.events.then_some(events_tx);
        let capacity = self.workers + self.prefetch;
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Assignment>(capacity);
        let (outcomes_tx, outcomes_rx) = crossbeam_channel::unbounded();
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let (arm_tx, arm_rx) = crossbeam_channel::bounded(1);
        let (waker_stop, waker_done) = cancel_pair();

        let mut threads = Vec::with_capacity(self.workers + 2);
        let spawn_result = (|| {
            for n in 0..self.workers {
                let runner = Runner {
                    executor: self.executor.clone(),
                    jobs: jobs_rx.clone(),
                    outcomes: outcomes_tx.clone(),
                };
                threads.push(spawn(
                    format!("queuectl-exec-{n}"),
                    "executor",
                    move || runner.run(),
                )?);
            }
            let storage = self.storage.clone();
            spawn("queuectl-waker".into(), "waker", move || {
                waker(&*storage, &arm_rx, &wake_tx, &waker_done)
            })?;
            Ok(())
        })();
        drop(outcomes_tx);
        let lease = self.lease;
        let mut dispatcher = Dispatcher {
            storage: self.storage.clone(),
            backoff: self.backoff.clone(),
            id: id.clone(),
            hostname,
            workers: self.workers,
            capacity,
            lease,
            heartbeat_every: self.heartbeat.unwrap_or(lease / 3),
            recovery_every: self
                .recovery
                .unwrap_or_else(|| (lease / 2).min(Duration::from_secs(1))),
            retention: self.retention,
            exit_when_idle: self.exit_when_idle,
            shutdown_timeout: self.shutdown_timeout,
            jobs: Some(jobs_tx),
            unstarted: jobs_rx.clone(),
            outcomes: outcomes_rx,
            control: control_rx,
            wake: wake_rx,
            arm: arm_tx,
            events: events_tx,
            waker_stop,
            running: HashMap::new(),
            current: HashMap::new(),
            lost_jobs: HashMap::new(),
            parked: Vec::new(),
            unsettled: Vec::new(),
            settle_failures: 0,
            claim_failures: 0,
            claim_retry_at: None,
            stopping: None,
            summary: Summary::default(),
            seen_version: None,
            stop_check_due: false,
            last_stop_check: Instant::now(),
            fatal: None,
        };
        if let Err(error) = spawn_result {
            // Dropping the dispatcher closes the jobs channel: started threads exit.
            drop(dispatcher);
            let _ = self.storage.deregister_worker(&id);
            return Err(error);
        }
        let handle = spawn("queuectl-dispatch".into(), "dispatcher", move || {
            let result = dispatcher.run();
            dispatcher.finish();
            result
        });
        let dispatcher = match handle {
            Ok(handle) => handle,
            Err(error) => {
                let _ = self.storage.deregister_worker(&id);
                return Err(error);
            }
        };
        Ok(WorkerPool {
            id,
            events: events_rx,
            control: control_tx,
            dispatcher,
            threads,
        })
    }
}

fn spawn<T: Send + 'static>(
    name: String,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, PoolError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|source| PoolError::Spawn { what, source })
}

/// The host name, for worker ids and dead-worker detection.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Graceful,
    Forced,
}

/// Asks a running pool to stop, from any thread (a signal handler's thread, say).
#[derive(Debug, Clone)]
pub struct Stopper(Sender<Control>);

impl Stopper {
    /// Stop claiming; let running jobs finish.
    pub fn graceful(&self) {
        // The pool may already be gone: then there is nothing to stop.
        let _ = self.0.send(Control::Graceful);
    }

    /// Kill running jobs and hand them back to the queue.
    pub fn forced(&self) {
        let _ = self.0.send(Control::Forced);
    }
}

/// A running pool of workers. See the [module docs](self).
#[derive(Debug)]
pub struct WorkerPool {
    id: String,
    events: Receiver<Event>,
    control: Sender<Control>,
    dispatcher: JoinHandle<Result<Summary, PoolError>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// A builder for a pool running `executor` on jobs from `storage`.
    pub fn builder(storage: Arc<dyn Storage>, executor: Arc<dyn Executor>) -> WorkerPoolBuilder {
        WorkerPoolBuilder {
            storage,
            executor,
            workers: 1,
            prefetch: 0,
            backoff: Arc::new(Config::default().backoff()),
            lease: Duration::from_secs(30),
            heartbeat: None,
            recovery: None,
            retention: None,
            worker_id: None,
            exit_when_idle: false,
            shutdown_timeout: None,
            events: true,
        }
    }

    /// The id this pool registered under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pool's events, ending with [`Event::Stopped`].
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// A handle that stops the pool from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.control.clone())
    }

    /// Stops gracefully (running jobs finish) and waits.
    pub fn shutdown(self) -> Result<Summary, PoolError> {
        self.stopper().graceful();
        self.join()
    }

    /// Stops now: running jobs are killed and handed back without charging the attempt.
    pub fn shutdown_now(self) -> Result<Summary, PoolError> {
        self.stopper().forced();
        self.join()
    }

    /// Waits until the pool stops (by a [`Stopper`], a stop request in storage, or idleness).
    pub fn join(self) -> Result<Summary, PoolError> {
        let result = self
            .dispatcher
            .join()
            .map_err(|_| PoolError::Panicked { what: "dispatcher" })?;
        for thread in self.threads {
            thread
                .join()
                .map_err(|_| PoolError::Panicked { what: "executor" })?;
        }
        result
    }
}

/// A job given to an executor thread, with the signal that cancels this attempt alone.
struct Assignment {
    job: Job,
    cancel: CancelSignal,
}

/// One finished attempt, sent from an executor thread to the dispatcher. `job.lease` is the
/// lease of the attempt.
struct Finished {
    job: Job,
    outcome: Result<Outcome, String>,
}

impl Finished {
    /// An attempt that never ran: it is handed back to the queue uncharged.
    fn unstarted(job: Job) -> Self {
        Self {
            job,
            outcome: Ok(Outcome::cancelled()),
        }
    }

    fn token(&self) -> Option<u64> {
        self.job.lease.as_ref().map(|l| l.token)
    }
}

struct Runner {
    executor: Arc<dyn Executor>,
    jobs: Receiver<Assignment>,
    outcomes: Sender<Finished>,
}

impl Runner {
    fn run(self) {
        for Assignment { job, cancel } in self.jobs.iter() {
            // A panicking executor fails the attempt; the thread, and its slot, live on.
            let outcome =
                match catch_unwind(AssertUnwindSafe(|| self.executor.execute(&job, &cancel))) {
                    Ok(result) => result.map_err(|e| error_chain(&e)),
                    Err(panic) => Err(format!("the executor panicked: {}", panic_message(&*panic))),
                };
            if self.outcomes.send(Finished { job, outcome }).is_err() {
                return;
            }
        }
    }
}

/// Forwards storage changes (from any process) to the dispatcher as wake-ups. Before each
/// wait the dispatcher arms it with the store version it has seen, so it is woken by what
/// happens after, not by its own earlier writes. Ends when `done` fires; not joined: it
/// notices within one wait.
fn waker(storage: &dyn Storage, arm: &Receiver<u64>, wake: &Sender<()>, done: &CancelSignal) {
    loop {
        let mut seen = select! {
            recv(arm) -> seen => match seen {
                Ok(seen) => seen,
                Err(_) => return,
            },
            recv(done.receiver()) -> _ => return,
        };
        while !done.is_cancelled() {
            // A newer arming replaces the one being waited on.
            if let Ok(newer) = arm.try_recv() {
                seen = newer;
            }
            match storage.wait_for_change(seen, Duration::from_millis(500)) {
                Ok(version) if version != seen => {
                    if let Err(TrySendError::Disconnected(())) = wake.try_send(()) {
                        return;
                    }
                    break;
                }
                Ok(_) => {}
                // A failing store is reported by the dispatcher's own calls; back off here.
                Err(_) => {
                    let _ = done.receiver().recv_timeout(Duration::from_millis(500));
                }
            }
        }
    }
}

struct Stopping {
    forced: bool,
    deadline: Option<Instant>,
}

/// How an attempt ended, as the dispatcher reports it.
#[derive(Debug, Clone, Copy)]
enum Ended {
    Completed,
    Released,
    Failed { retry_at: Timestamp },
}

/// An attempt this pool holds a lease for: running, queued for an executor, or parked.
struct Attempt {
    lease: Lease,
    canceller: Canceller,
    /// The store reported the lease lost: the attempt is cancelled and its result dropped.
    lost: bool,
}

struct Dispatcher {
    storage: Arc<dyn Storage>,
    backoff: Arc<dyn BackoffPolicy>,
    id: String,
    hostname: String,
    workers: usize,
    /// Jobs handed out at most: executor threads plus prefetch.
    capacity: usize,
    lease: Duration,
    heartbeat_every: Duration,
    recovery_every: Duration,
    retention: Option<Duration>,
    exit_when_idle: bool,
    shutdown_timeout: Option<Duration>,
    jobs: Option<Sender<Assignment>>,
    /// The executors' end of `jobs`, to take back jobs no executor has started.
    unstarted: Receiver<Assignment>,
    outcomes: Receiver<Finished>,
    control: Receiver<Control>,
    wake: Receiver<()>,
    arm: Sender<u64>,
    events: Option<Sender<Event>>,
    waker_stop: Canceller,
    /// Every attempt this pool holds a lease for, by lease token.
    running: HashMap<u64, Attempt>,
    /// The attempt (lease token) of each job whose lease this pool still holds.
    current: HashMap<JobId, u64>,
    /// Jobs with a lost attempt still running here, and how many such attempts.
    lost_jobs: HashMap<JobId, usize>,
    /// Claimed again while a lost attempt of the same job still runs here: they start when it
    /// has ended, so a job never runs twice at once in this pool.
    parked: Vec<Assignment>,
    /// Settlements storage did not accept (it failed); retried each turn.
    unsettled: Vec<Finished>,
    /// Consecutive failed attempts to record results.
    settle_failures: u32,
    /// Consecutive failed claims, and when to try again.
    claim_failures: u32,
    claim_retry_at: Option<Instant>,
    stopping: Option<Stopping>,
    summary: Summary,
    /// The store version when the dispatcher last looked.
    seen_version: Option<u64>,
    /// The store changed since the last look for a stop request.
    stop_check_due: bool,
    last_stop_check: Instant,
    /// An error that ends the pool, found where it could not be returned.
    fatal: Option<PoolError>,
}

const PURGE_EVERY: Duration = Duration::from_secs(300);
/// Least time between two reads of the stop flag prompted by storage changes.
const STOP_CHECK_EVERY: Duration = Duration::from_millis(50);
/// Failed attempts to record results, 200 ms apart, before the pool gives up and stops.
const MAX_SETTLE_FAILURES: u32 = 25;
const SETTLE_RETRY: Duration = Duration::from_millis(200);

impl Dispatcher {
    /// Sends the event `make` builds, if anyone asked for events (it is not built otherwise).
    fn emit(&self, make: impl FnOnce() -> Event) {
        if let Some(events) = &self.events {
            // Nobody listening any more is fine.
            let _ = events.send(make());
        }
    }

    fn storage_error(&self, op: &'static str, error: &StorageError) {
        self.emit(|| Event::StorageError {
            op,
            error: error_chain(error),
        });
    }

    fn run(&mut self) -> Result<Summary, PoolError> {
        self.emit(|| Event::Started {
            worker: self.id.clone(),
            threads: self.workers,
        });
        self.recover();
        let mut next_heartbeat = Instant::now() + self.heartbeat_every;
        let mut next_recovery = Instant::now() + self.recovery_every;
        let mut next_purge = Instant::now();
        loop {
            self.settle_finished();
            if let Some(error) = self.fatal.take() {
                self.abandon();
                return Err(error);
            }
            if let Some(stopping) = &self.stopping {
                if self.running.is_empty() {
                    return Ok(self.summary);
                }
                if !stopping.forced && stopping.deadline.is_some_and(|d| Instant::now() >= d) {
                    self.begin_stop(true, "shutdown timeout");
                }
            }
            let now_instant = Instant::now();
            if now_instant >= next_heartbeat {
                self.heartbeat();
                next_heartbeat = now_instant + self.heartbeat_every;
            }
            if now_instant >= next_recovery {
                self.recover();
                next_recovery = now_instant + self.recovery_every;
            }
            if now_instant >= next_purge {
                self.purge();
                next_purge = now_instant + PURGE_EVERY;
            }
            // One read of the version per turn, before looking for a stop request and for work:
            // any change after it wakes the pool.
            let version = self.storage.change_version().ok();
            self.poll_stop_request(version, true);
            let mut wait_until = next_heartbeat.min(next_recovery);
            if self.stopping.is_none() && self.claim_retry_at.is_none_or(|t| Instant::now() >= t) {
                let (asked, claimed) = self.claim();
                if claimed < asked && self.claim_retry_at.is_none() {
                    // Out of work: have the waker report the next change of the store. (A busy
                    // pool is not armed, so its own writes do not wake it; it looks for a stop
                    // request before refilling slots instead.)
                    if let Some(version) = version {
                        // Full means an arming is pending; the waker takes the newest one.
                        let _ = self.arm.try_send(version);
                    }
                    if self.exit_when_idle && self.running.is_empty() && claimed == 0 {
                        // Nothing runs and nothing is due. Jobs waiting for a retry keep the
                        // pool; jobs scheduled for later do not.
                        match self.storage.counts() {
                            Ok(counts) if counts.failed == 0 => {
                                self.begin_stop(false, "idle");
                                continue;
                            }
                            Ok(_) => {}
                            Err(error) => self.storage_error("counting jobs", &error),
                        }
                    }
                    // Free slots and nothing more was due: sleep until the next due job or a
                    // change in the store.
                    match self.storage.next_due() {
                        Ok(Some(due)) => {
                            let until_due = (due - now()).max(time::Duration::ZERO);
                            let until_due = Duration::try_from(until_due).unwrap_or_default();
                            if let Some(due) = Instant::now().checked_add(until_due) {
                                wait_until = wait_until.min(due);
                            }
                        }
                        Ok(None) => {}
                        Err(error) => self.storage_error("looking for due jobs", &error),
                    }
                }
            }
            if let Some(retry) = self.claim_retry_at {
                wait_until = wait_until.min(retry);
            }
            if self.stop_check_due && self.stopping.is_none() {
                wait_until = wait_until.min(self.last_stop_check + STOP_CHECK_EVERY);
            }
            if !self.unsettled.is_empty() {
                wait_until = wait_until.min(Instant::now() + SETTLE_RETRY);
            }
            if let Some(deadline) = self.stopping.as_ref().and_then(|s| s.deadline) {
                wait_until = wait_until.min(deadline);
            }
            self.wait(wait_until);
        }
    }

    fn note_version(&mut self, version: u64) {
        if self.seen_version != Some(version) {
            self.seen_version = Some(version);
            self.stop_check_due = true;
        }
    }

    /// Looks for a stop request in storage if the store changed since the last look (when
    /// `throttled`, at most every [`STOP_CHECK_EVERY`]): an idle pool notices `worker stop`
    /// when the write wakes it, a busy one before it refills the slots of finished jobs.
    /// `version` is the store version just read, if any.
    fn poll_stop_request(&mut self, version: Option<u64>, throttled: bool) {
        if self.stopping.is_some() {
            return;
        }
        if let Some(version) = version {
            self.note_version(version);
        }
        let due = !throttled || Instant::now() >= self.last_stop_check + STOP_CHECK_EVERY;
        if self.stop_check_due && due {
            self.stop_check_due = false;
            self.last_stop_check = Instant::now();
            match self.storage.workers() {
                Ok(workers) => {
                    if workers.iter().any(|w| w.id == self.id && w.stop_requested) {
                        self.begin_stop(false, "stop request in storage");
                    }
                }
                Err(error) => self.storage_error("looking for a stop request", &error),
            }
        }
    }

    /// Blocks until an outcome, a control message, a storage change or `until`.
    fn wait(&mut self, until: Instant) {
        let timeout = until.saturating_duration_since(Instant::now());
        select! {
            recv(self.outcomes) -> finished => {
                if let Ok(finished) = finished {
                    self.settle_batch(vec![finished]);
                }
            }
            recv(self.control) -> control => match control {
                Ok(Control::Graceful) => {
                    let forced = self.stopping.is_some();
                    // A second graceful request escalates, like a second Ctrl+C.
                    self.begin_stop(forced, "requested");
                }
                Ok(Control::Forced) => self.begin_stop(true, "requested"),
                Err(_) => {
                    // The WorkerPool and every Stopper were dropped: nobody can stop the pool
                    // any more, so stop now, gracefully.
                    self.control = crossbeam_channel::never();
                    self.begin_stop(false, "pool handle dropped");
                }
            },
            recv(self.wake) -> woken => {
                if woken.is_err() {
                    // The waker thread ended: no more wake-ups (ticks still come).
                    self.wake = crossbeam_channel::never();
                }
            }
            default(timeout) => {}
        }
    }

    fn begin_stop(&mut self, forced: bool, reason: &'static str) {
        if self.stopping.as_ref().is_some_and(|s| s.forced || !forced) {
            return;
        }
        self.stopping = Some(Stopping {
            forced,
            deadline: if forced {
                None
            } else {
                self.shutdown_timeout
                    .and_then(|t| Instant::now().checked_add(t))
            },
        });
        if forced {
            for attempt in self.running.values_mut() {
                attempt.canceller.cancel();
            }
        }
        // Jobs no executor has started go back to the queue, uncharged: queued for the next
        // settlement (never settled from here, which may run inside a settlement).
        let unstarted: Vec<Finished> = self
            .unstarted
            .try_iter()
            .chain(self.parked.drain(..))
            .map(|a| Finished::unstarted(a.job))
            .collect();
        self.unsettled.extend(unstarted);
        self.emit(|| Event::Stopping { forced, reason });
    }

    /// Claims jobs for free slots and hands them to executors. Returns how many it asked for
    /// and how many it got.
    fn claim(&mut self) -> (usize, usize) {
        let free = self.capacity.saturating_sub(self.running.len());
        if free == 0 {
            return (0, 0);
        }
        match self.storage.claim(&self.id, free, self.lease, now()) {
            Ok(claimed) => {
                self.claim_failures = 0;
                self.claim_retry_at = None;
                let count = claimed.len();
                self.hand_out(claimed);
                (free, count)
            }
            Err(error) => {
                // Back off (200 ms, doubling up to 5 s) instead of retrying at once: a failing
                // store must not make the dispatcher spin.
                let backoff = SETTLE_RETRY
                    .saturating_mul(1 << self.claim_failures.min(5))
                    .min(Duration::from_secs(5));
                self.claim_failures = self.claim_failures.saturating_add(1);
                self.claim_retry_at = Instant::now().checked_add(backoff);
                self.tolerate("claiming jobs", error);
                (free, 0)
            }
        }
    }

    /// Gives claimed jobs to the executors (or parks them behind a lost attempt of the same
    /// job that is still running here).
    fn hand_out(&mut self, claimed: Vec<Job>) {
        for job in claimed {
            let Some(lease) = job.lease.clone() else {
                continue;
            };
            self.emit(|| Event::Claimed {
                job: job.id.clone(),
                attempt: job.attempts,
                command: job.command.clone(),
            });
            let (canceller, cancel) = cancel_pair();
            if let Some(old) = self.current.insert(job.id.clone(), lease.token) {
                // The store handed out a job this pool is still running: the old attempt's
                // lease was lost.
                self.mark_lost(old);
            }
            let behind_lost = !self.lost_jobs.is_empty() && self.lost_jobs.contains_key(&job.id);
            self.running.insert(
                lease.token,
                Attempt {
                    lease,
                    canceller,
                    lost: false,
                },
            );
            let assignment = Assignment { job, cancel };
            if behind_lost {
                self.parked.push(assignment);
            } else if let Some(jobs) = &self.jobs {
                // Cannot block: the channel holds `capacity` jobs and we never have more out;
                // cannot fail: `self.unstarted` keeps it connected.
                let _ = jobs.send(assignment);
            }
        }
    }

    /// Settles whatever executors have finished, in one storage call.
    fn settle_finished(&mut self) {
        let finished: Vec<Finished> = self.outcomes.try_iter().collect();
        if !finished.is_empty() || !self.unsettled.is_empty() {
            self.settle_batch(finished);
        }
    }

    fn settle_batch(&mut self, mut finished: Vec<Finished>) {
        finished.extend(self.outcomes.try_iter());
        let at = now();
        let mut batch: Vec<Finished> = Vec::with_capacity(finished.len() + self.unsettled.len());
        let earlier = std::mem::take(&mut self.unsettled);
        for done in earlier.into_iter().chain(finished) {
            let Some(token) = done.token() else { continue };
            let Some(attempt) = self.running.get(&token) else {
                continue;
            };
            if attempt.lost {
                // Already reported; the job belongs to someone else now.
                self.end_lost_attempt(token, &done.job.id);
                continue;
            }
            batch.push(done);
        }
        if batch.is_empty() {
            return;
        }
        // Only attempts this pool still holds (all of them, short of a bug) are settled, and
        // `batch`, `settlements` and `ends` stay in step.
        batch.retain(|done| done.token().is_some_and(|t| self.running.contains_key(&t)));
        // Look for a stop request before refilling the slots this batch frees.
        let version = self.storage.change_version().ok();
        self.poll_stop_request(version, false);
        let want = if self.stopping.is_none() {
            let busy = self.running.len().saturating_sub(batch.len());
            self.capacity.saturating_sub(busy)
        } else {
            0
        };
        let (settlements, ends): (Vec<Settlement>, Vec<Ended>) = batch
            .iter()
            .map(|done| {
                let token = done.token().unwrap_or_default();
                let lease = self.running[&token].lease.clone();
                self.settlement(lease, done, at)
            })
            .unzip();
        let settled = self
            .storage
            .settle_and_claim(settlements, &self.id, want, self.lease, at);
        let (results, claimed) = match settled {
            Ok(settled) => settled,
            Err(error) => {
                self.storage_error("recording job results", &error);
                self.settle_failures += 1;
                let poisoned = matches!(error, StorageError::Poisoned { .. });
                if poisoned || self.settle_failures >= MAX_SETTLE_FAILURES {
                    // Results cannot be recorded: stop. The leases expire and the jobs run
                    // again elsewhere.
                    for done in &batch {
                        if let Some(token) = done.token() {
                            self.untrack(token);
                        }
                    }
                    self.fatal.get_or_insert(PoolError::Storage {
                        op: "recording job results",
                        source: error,
                    });
                } else {
                    // Keep anything queued meanwhile (jobs handed back by a stop).
                    self.unsettled.extend(batch);
                }
                return;
            }
        };
        self.settle_failures = 0;
        for ((end, done), result) in ends.into_iter().zip(batch).zip(results) {
            if let Some(token) = done.token() {
                self.untrack(token);
            }
            self.report(end, &done, result);
        }
        self.hand_out(claimed);
    }

    /// Forgets an attempt.
    fn untrack(&mut self, token: u64) {
        if let Some(attempt) = self.running.remove(&token)
            && self.current.get(&attempt.lease.job_id) == Some(&token)
        {
            self.current.remove(&attempt.lease.job_id);
        }
    }

    /// Marks an attempt whose lease was lost, and cancels it: its job belongs to someone else.
    fn mark_lost(&mut self, token: u64) {
        let Some(attempt) = self.running.get_mut(&token) else {
            return;
        };
        if attempt.lost {
            return;
        }
        attempt.lost = true;
        attempt.canceller.cancel();
        let job = attempt.lease.job_id.clone();
        if self.current.get(&job) == Some(&token) {
            self.current.remove(&job);
        }
        *self.lost_jobs.entry(job.clone()).or_default() += 1;
        self.emit(|| Event::LeaseLost { job });
        // A lost attempt that was parked never started: end it now. (One still queued for an
        // executor comes back cancelled without having run.)
        let (lost_parked, kept): (Vec<_>, Vec<_>) = self
            .parked
            .drain(..)
            .partition(|a| a.job.lease.as_ref().is_some_and(|l| l.token == token));
        self.parked = kept;
        for assignment in lost_parked {
            self.end_lost_attempt(token, &assignment.job.id);
        }
    }

    /// Forgets a lost attempt that has ended and starts what was parked behind it.
    fn end_lost_attempt(&mut self, token: u64, job: &JobId) {
        self.untrack(token);
        self.summary.lost += 1;
        if let Some(count) = self.lost_jobs.get_mut(job) {
            *count -= 1;
            if *count == 0 {
                self.lost_jobs.remove(job);
            }
        }
        if self.lost_jobs.contains_key(job) {
            return;
        }
        let (ready, still_parked): (Vec<_>, Vec<_>) =
            self.parked.drain(..).partition(|a| &a.job.id == job);
        self.parked = still_parked;
        for assignment in ready {
            if let Some(jobs) = &self.jobs {
                let _ = jobs.send(assignment);
            }
        }
    }

    /// The settlement of a finished attempt, and how the attempt ended (for reporting).
    fn settlement(&self, lease: Lease, done: &Finished, at: Timestamp) -> (Settlement, Ended) {
        let (report, status) = match &done.outcome {
            Ok(outcome) => (
                AttemptReport {
                    exit_code: outcome.exit_code,
                    output: (!outcome.output.is_empty()).then(|| outcome.output.clone()),
                    error: outcome.error_message(),
                },
                Some(&outcome.status),
            ),
            Err(error) => (
                AttemptReport {
                    exit_code: None,
                    output: None,
                    error: Some(error.clone()),
                },
                None,
            ),
        };
        match status {
            Some(Status::Succeeded) => (Settlement::Complete { lease, report }, Ended::Completed),
            Some(Status::Cancelled) => (Settlement::Release { lease }, Ended::Released),
            Some(Status::Failed(_) | Status::TimedOut(_)) | None => {
                let delay = self.backoff.delay(&done.job.id, done.job.attempts);
                let retry_at = later(at, delay);
                let fail = Settlement::Fail {
                    lease,
                    report,
                    retry_at,
                };
                (fail, Ended::Failed { retry_at })
            }
        }
    }

    fn report(&mut self, end: Ended, done: &Finished, result: crate::Result<Job>) {
        let job = done.job.id.clone();
        let attempt = done.job.attempts;
        let job_after = match result {
            Ok(job_after) => job_after,
            Err(StorageError::LeaseLost { .. }) => {
                self.summary.lost += 1;
                self.emit(|| Event::LeaseLost { job });
                return;
            }
            Err(error) => {
                self.storage_error("recording a job result", &error);
                return;
            }
        };
        let error = job_after.last_error.clone().unwrap_or_default();
        match (end, job_after.state) {
            (Ended::Completed, _) => {
                self.summary.completed += 1;
                let duration = done
                    .outcome
                    .as_ref()
                    .map(|o| o.duration)
                    .unwrap_or_default();
                self.emit(|| Event::Completed {
                    job,
                    attempt,
                    duration,
                });
            }
            (Ended::Released, _) => {
                self.summary.released += 1;
                self.emit(|| Event::Released { job });
            }
            (Ended::Failed { .. }, JobState::Dead) => {
                self.summary.dead += 1;
                self.emit(|| Event::Dead {
                    job,
                    attempt,
                    error,
                });
            }
            (Ended::Failed { retry_at }, _) => {
                self.summary.failed += 1;
                let retry_in =
                    Duration::try_from(retry_at - job_after.updated_at).unwrap_or_default();
                self.emit(|| Event::Failed {
                    job,
                    attempt,
                    error,
                    retry_in,
                });
            }
        }
    }

    /// Renews the leases of this pool's attempts and its registration; obeys a stored stop.
    /// An attempt whose lease was lost is cancelled at once: its job belongs to someone else.
    fn heartbeat(&mut self) {
        let at = now();
        let leases: Vec<Lease> = self
            .running
            .values()
            .filter(|a| !a.lost)
            .map(|a| a.lease.clone())
            .collect();
        if !leases.is_empty() {
            match self.storage.extend_leases(&leases, self.lease, at) {
                Ok(lost) => {
                    for id in lost {
                        self.lose(&id);
                    }
                }
                Err(error) => self.tolerate("renewing leases", error),
            }
        }
        match self.storage.worker_heartbeat(&self.id, at) {
            Ok(true) => self.begin_stop(false, "stop request in storage"),
            Ok(false) => {}
            Err(StorageError::UnknownWorker { .. }) => {
                // Someone deregistered us (presumed dead): register again.
                let info = self.info(at);
                if let Err(error) = self.storage.register_worker(info) {
                    self.tolerate("registering", error);
                }
            }
            Err(error) => self.tolerate("heartbeating", error),
        }
    }

    /// Cancels this pool's attempt of `job`, whose lease the store reports lost.
    fn lose(&mut self, job: &JobId) {
        if let Some(&token) = self.current.get(job) {
            self.mark_lost(token);
        }
    }

    fn info(&self, at: Timestamp) -> WorkerInfo {
        WorkerInfo {
            id: self.id.clone(),
            hostname: self.hostname.clone(),
            pid: std::process::id(),
            concurrency: self.workers,
            started_at: at,
            last_seen: at,
            stop_requested: false,
            stop_forced: false,
            identity: Default::default(),
        }
    }

    /// Reports a storage error the pool can work around (the operation is retried later);
    /// a poisoned store ends the pool.
    fn tolerate(&mut self, op: &'static str, error: StorageError) {
        self.storage_error(op, &error);
        if matches!(error, StorageError::Poisoned { .. }) {
            self.fatal
                .get_or_insert(PoolError::Storage { op, source: error });
        }
    }

    fn recover(&mut self) {
        let at = now();
        let stale_after = self.lease * 3;
        match recover_abandoned(&*self.storage, &self.hostname, stale_after, at) {
            Ok(jobs) => {
                for job in jobs {
                    self.emit(|| Event::Recovered {
                        job: job.id,
                        state: job.state,
                    });
                }
            }
            Err(error) => self.storage_error("recovering abandoned jobs", &error),
        }
    }

    fn purge(&mut self) {
        let Some(retention) = self.retention else {
            return;
        };
        let Some(cutoff) =
            now().checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
        else {
            return;
        };
        match self.storage.purge_completed(cutoff) {
            Ok(0) => {}
            Ok(count) => self.emit(|| Event::Purged { count }),
            Err(error) => self.storage_error("purging completed jobs", &error),
        }
    }

    /// Ends the pool after a fatal error: kills running attempts and forgets them (their
    /// leases expire and the jobs run again elsewhere).
    fn abandon(&mut self) {
        self.begin_stop(true, "storage failure");
        self.running.clear();
        self.current.clear();
        self.unsettled.clear();
    }

    /// Closes the pool: stops executor threads, deregisters, emits `Stopped`.
    fn finish(&mut self) {
        // Closing the jobs channel ends the executor threads.
        self.jobs = None;
        self.waker_stop.cancel();
        if let Err(error) = self.storage.deregister_worker(&self.id) {
            self.storage_error("deregistering", &error);
        }
        self.emit(|| Event::Stopped);
    }
}

/// Returns to the queue every job abandoned by a dead worker: leases that expired, and the jobs
/// of workers on `hostname` whose process no longer exists (no need to wait for their leases).
/// Workers silent for longer than `stale_after` are deregistered, but their jobs keep their
/// leases until they expire: a silent worker may be alive with a longer lease than ours.
pub fn recover_abandoned(
    storage: &dyn Storage,
    hostname: &str,
    stale_after: Duration,
    at: Timestamp,
) -> crate::Result<Vec<Job>> {
    let mut recovered = Vec::new();
    for worker in storage.workers()? {
        let dead_here = worker.hostname == hostname
            && worker.pid != std::process::id()
            && !process_exists(worker.pid);
        if dead_here {
            recovered.extend(storage.recover_worker(&worker.id, at)?);
            storage.deregister_worker(&worker.id)?;
        } else if at - worker.last_seen > stale_after {
            storage.deregister_worker(&worker.id)?;
        }
    }
    recovered.extend(storage.recover_expired(at)?);
    Ok(recovered)
}

/// Whether a process with this pid exists on this host.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // It exists but belongs to someone else.
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// An error and its causes on one line: `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
