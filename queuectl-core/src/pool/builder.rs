//! Configuring and starting a pool.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backoff::BackoffPolicy;
use crate::config::{Config, MAX_WORKERS, WORKERS};
use crate::executor::{Executor, cancel_pair};
use crate::job::{now, random_u64};
use crate::storage::{ProcessIdentity, Storage, WorkerInfo};

use super::dispatcher::Dispatcher;
use super::events::{EventSink, PoolError};
use super::recovery::hostname;
use super::runner::{Assignment, Runner};
use super::settle::Settler;
use super::{WorkerPool, waker};

const MAX_PREFETCH: usize = 1_000_000;
const MAX_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most jobs claimed ahead that [`Prefetch`]'s `FromStr` accepts (as `worker start
/// --prefetch` did before it read `auto`): the channel that holds them is allocated whole.
const MAX_PREFETCH_ARG: usize = 100_000;

/// The longest [`Timings::prefetch_window`] and [`Timings::settle_delay`].
const MAX_TIMING: Duration = Duration::from_secs(3600);

/// With [`Prefetch::Auto`], at most this many jobs per executor thread are claimed ahead.
pub const AUTO_PREFETCH_PER_THREAD: usize = 32;

/// How many jobs a pool claims ahead of its free executor threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// Always this many (`0`: none, a job is claimed when a thread is free for it).
    Fixed(usize),
    /// As many as the threads would start within [`Timings::prefetch_window`] at the pace of
    /// the attempts that finished lately (at most [`AUTO_PREFETCH_PER_THREAD`] per thread):
    /// jobs that take milliseconds are claimed several at a time, so the store is asked once
    /// for many of them; jobs that take longer than the window are claimed one per free
    /// thread, so none waits here while another worker could run it. When no attempt has
    /// finished and no job been claimed for a window's time, the jobs waiting behind running
    /// ones go back to the queue. None is claimed ahead before an attempt has finished, nor
    /// after such a hand-back until one has.
    Auto,
}

impl std::str::FromStr for Prefetch {
    type Err = String;

    /// `auto` or a number of jobs (at most 100,000).
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        match text.parse::<usize>() {
            Ok(jobs) if jobs <= MAX_PREFETCH_ARG => Ok(Self::Fixed(jobs)),
            _ => Err(format!(
                "expected \"auto\" or a number of jobs from 0 to {MAX_PREFETCH_ARG}, not {text:?}"
            )),
        }
    }
}

/// The pool's internal timings. The defaults suit production; tests shorten them so that no
/// test waits on a production constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Wait before retrying to record results the store refused to take (default 200 ms);
    /// also the first wait after a failed claim, doubling up to `claim_backoff_max`.
    pub settle_retry: Duration,
    /// Failed attempts in a row to record results before the pool gives up (default 25).
    pub settle_attempts: u32,
    /// Longest wait between failing claims (default 5 s).
    pub claim_backoff_max: Duration,
    /// How often completed jobs past their retention are purged (default 5 minutes).
    pub purge_every: Duration,
    /// Least time between two reads of the stop flag prompted by the pool's own busy
    /// writes (default 50 ms). An idle pool reads it on every change of the store.
    pub stop_check_every: Duration,
    /// Longest single wait of the waker thread in `wait_for_change` (default 500 ms); it
    /// bounds how long `join` may wait for the waker with a store that notifies nothing.
    pub waker_poll: Duration,
    /// How often the new output of running attempts is recorded in the store, in one call for
    /// all of them (default 250 ms). An attempt's output is first recorded this long after its
    /// first output, so an attempt that ends sooner costs the store nothing more.
    pub live_output_every: Duration,
    /// On a store that writes concurrently ([`Storage::writes_concurrently`]), a batch of at
    /// least this many results that refills at least this many slots is recorded on the
    /// settling thread while the dispatcher claims (default 16), unless the jobs waiting to
    /// start outlast a turn at the pace of recent attempts (then the threads have work while
    /// one transaction records and claims, and one costs the store less than two). Smaller
    /// turns cost the store less as one transaction than as two either way.
    pub settle_beside_claim_from: usize,
    /// With [`Prefetch::Auto`], how long the jobs claimed ahead of the threads may keep
    /// them busy at the pace of recent attempts (default 50 ms), and how long without a
    /// finished attempt hands them back.
    pub prefetch_window: Duration,
    /// While every executor thread has a job claimed ahead waiting for it, results are
    /// recorded up to this long after the first of them finished (default 20 ms; zero: at
    /// once), or once they are half of what the pool holds, so that one transaction records
    /// several and claims what replaces them. No thread waits for it: each has its next job.
    pub settle_delay: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            settle_retry: Duration::from_millis(200),
            settle_attempts: 25,
            claim_backoff_max: Duration::from_secs(5),
            purge_every: Duration::from_secs(300),
            stop_check_every: Duration::from_millis(50),
            waker_poll: Duration::from_millis(500),
            live_output_every: Duration::from_millis(250),
            settle_beside_claim_from: 16,
            prefetch_window: Duration::from_millis(50),
            settle_delay: Duration::from_millis(20),
        }
    }
}

/// Configures and starts a [`WorkerPool`].
#[derive(Debug)]
pub struct WorkerPoolBuilder {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) executor: Arc<dyn Executor>,
    pub(super) workers: usize,
    pub(super) prefetch: Prefetch,
    pub(super) backoff: Arc<dyn BackoffPolicy>,
    pub(super) lease: Duration,
    pub(super) heartbeat: Option<Duration>,
    pub(super) recovery: Option<Duration>,
    pub(super) retention: Option<Duration>,
    pub(super) worker_id: Option<String>,
    pub(super) queues: Vec<String>,
    pub(super) exit_when_idle: bool,
    pub(super) shutdown_timeout: Option<Duration>,
    pub(super) event_capacity: usize,
    pub(super) timings: Timings,
}

impl WorkerPoolBuilder {
    pub(super) fn new(storage: Arc<dyn Storage>, executor: Arc<dyn Executor>) -> Self {
        Self {
            storage,
            executor,
            workers: 1,
            prefetch: Prefetch::Fixed(0),
            backoff: Arc::new(Config::default().backoff()),
            lease: Duration::from_secs(30),
            heartbeat: None,
            recovery: None,
            retention: None,
            worker_id: None,
            queues: Vec::new(),
            exit_when_idle: false,
            shutdown_timeout: None,
            event_capacity: 1024,
            timings: Timings::default(),
        }
    }

    /// Takes worker count, backoff, lease timeout and retention from stored settings.
    pub fn config(mut self, config: &Config) -> Self {
        self.workers = config.worker_count();
        self.backoff = Arc::new(config.backoff());
        self.lease = config.lease_duration();
        self.retention = config.completed_retention();
        self
    }

    /// Runs only jobs of these queues (default: every queue). Names are checked when the pool
    /// starts.
    pub fn queues(mut self, queues: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Executor threads, i.e. jobs run at once (default 1, at most [`MAX_WORKERS`]).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Jobs claimed ahead of free executor threads (default 0). Prefetching saves a storage
    /// round trip per job for short jobs; its cost is that prefetched jobs wait for this pool
    /// even when another worker is idle (and count under their queue's limit meanwhile). A
    /// graceful stop hands unstarted jobs back.
    pub fn prefetch(mut self, jobs: usize) -> Self {
        self.prefetch = Prefetch::Fixed(jobs);
        self
    }

    /// Jobs claimed ahead as [`Prefetch::Auto`] adapts them to how long jobs run.
    pub fn prefetch_auto(mut self) -> Self {
        self.prefetch = Prefetch::Auto;
        self
    }

    /// Jobs claimed ahead: a fixed number or [`Prefetch::Auto`].
    pub fn prefetching(mut self, prefetch: Prefetch) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The most jobs ever claimed ahead.
    pub(super) fn max_prefetch(&self) -> usize {
        match self.prefetch {
            Prefetch::Fixed(jobs) => jobs,
            Prefetch::Auto => self.workers * AUTO_PREFETCH_PER_THREAD,
        }
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

    /// Whether to produce [`Event`](super::Event)s (default `true`). Turning them off saves
    /// building them; when on, at most [`event_capacity`](Self::event_capacity) are held.
    pub fn events(mut self, enabled: bool) -> Self {
        if !enabled {
            self.event_capacity = 0;
        } else if self.event_capacity == 0 {
            self.event_capacity = 1024;
        }
        self
    }

    /// How many unread events are kept before the oldest are dropped (default 1024; 0 turns
    /// events off).
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.event_capacity = events;
        self
    }

    /// The pool's internal timings (default [`Timings::default`]).
    pub fn timings(mut self, timings: Timings) -> Self {
        self.timings = timings;
        self
    }

    fn validate(&self) -> Result<(), PoolError> {
        let invalid = |what: String| Err(PoolError::Invalid(what));
        if !WORKERS.contains(self.workers as f64) {
            return invalid(format!("workers must be {}", WORKERS.expected));
        }
        if self.max_prefetch() > MAX_PREFETCH {
            return invalid("prefetch must be at most 1000000".into());
        }
        if self.timings.prefetch_window > MAX_TIMING || self.timings.settle_delay > MAX_TIMING {
            return invalid(
                "the prefetch window and the settle delay must be at most an hour".into(),
            );
        }
        if self.lease.is_zero() || self.lease > MAX_LEASE {
            return invalid("the lease must be longer than zero and at most a week".into());
        }
        if self
            .heartbeat
            .is_some_and(|h| h.is_zero() || h >= self.lease)
        {
            return invalid(
                "the heartbeat interval must be longer than zero and shorter than the lease".into(),
            );
        }
        if self.recovery.is_some_and(|r| r.is_zero() || r > MAX_LEASE) {
            return invalid(
                "the recovery interval must be longer than zero and at most a week".into(),
            );
        }
        if let Some(error) = self
            .queues
            .iter()
            .find_map(|q| crate::job::check_queue_name(q).err())
        {
            return invalid(error.to_string());
        }
        let t = &self.timings;
        if t.settle_retry.is_zero()
            || t.waker_poll.is_zero()
            || t.live_output_every.is_zero()
            || t.settle_attempts == 0
        {
            return invalid("timings must be longer than zero".into());
        }
        debug_assert!(self.workers <= MAX_WORKERS);
        Ok(())
    }

    /// Registers the worker, recovers expired leases and starts the threads. Every thread is
    /// built before any job is claimed; a thread that cannot be spawned is an error, and the
    /// threads already started are stopped and joined.
    pub fn start(self) -> Result<WorkerPool, PoolError> {
        self.validate()?;
        let hostname = hostname();
        let id = self.worker_id.clone().unwrap_or_else(|| {
            format!(
                "{hostname}-{}-{:04x}",
                std::process::id(),
                random_u64() & 0xffff
            )
        });
        let started = now();
        let info = WorkerInfo {
            id: id.clone(),
            hostname: hostname.clone(),
            pid: std::process::id(),
            concurrency: self.workers,
            started_at: started,
            last_seen: started,
            stop_requested: false,
            stop_forced: false,
            identity: ProcessIdentity::current(),
            queues: self.queues.clone(),
        };
        self.storage
            .register_worker(info.clone())
            .map_err(|source| PoolError::Storage {
                op: "registering",
                source,
            })?;

        let (events, events_rx, dropped_events) = EventSink::new(self.event_capacity);
        let capacity = self.workers + self.max_prefetch();
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Assignment>(capacity);
        let (outcomes_tx, outcomes_rx) = crossbeam_channel::unbounded();
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let (arm_tx, arm_rx) = crossbeam_channel::bounded(1);
        let (waker_stop, waker_done) = cancel_pair();
        // The settling thread's ends, for a store that writes concurrently.
        let (settler, settling) = if self.storage.writes_concurrently() {
            let (requests_tx, requests_rx) = crossbeam_channel::bounded(1);
            let (results_tx, results_rx) = crossbeam_channel::bounded(1);
            let settler = Settler {
                requests: requests_tx,
                results: results_rx,
            };
            (Some(settler), Some((requests_rx, results_tx)))
        } else {
            (None, None)
        };

        let mut threads: Vec<(&'static str, JoinHandle<()>)> = Vec::with_capacity(self.workers + 1);
        let spawned = (|| {
            for n in 0..self.workers {
                let runner = Runner {
                    executor: self.executor.clone(),
                    jobs: jobs_rx.clone(),
                    outcomes: outcomes_tx.clone(),
                    events: events.clone(),
                };
                let handle = spawn(format!("queuectl-exec-{n}"), "executor", move || {
                    runner.run()
                })?;
                threads.push(("executor", handle));
            }
            let storage = self.storage.clone();
            let poll = self.timings.waker_poll;
            let handle = spawn("queuectl-waker".into(), "waker", move || {
                waker::run(&*storage, &arm_rx, &wake_tx, &waker_done, poll)
            })?;
            threads.push(("waker", handle));
            if let Some((requests, results)) = settling {
                let storage = self.storage.clone();
                let handle = spawn("queuectl-settle".into(), "settling", move || {
                    super::settle::settle_on_request(&*storage, &requests, &results)
                })?;
                threads.push(("settling", handle));
            }
            Ok(())
        })();
        drop(outcomes_tx);
        let dispatcher = Dispatcher::new(
            &self,
            id.clone(),
            info,
            events,
            super::dispatcher::Channels {
                jobs: jobs_tx,
                unstarted: jobs_rx,
                outcomes: outcomes_rx,
                control: control_rx,
                wake: wake_rx,
                arm: arm_tx,
                waker_stop,
                settler,
            },
        );
        // Dropping the dispatcher closes the jobs channel and stops the waker: the started
        // threads end, and are joined.
        let cleanup = |threads: Vec<(&'static str, JoinHandle<()>)>| {
            for (_, thread) in threads {
                let _ = thread.join();
            }
            let _ = self.storage.deregister_worker(&id);
        };
        if let Err(error) = spawned {
            drop(dispatcher);
            cleanup(threads);
            return Err(error);
        }
        let handle = spawn("queuectl-dispatch".into(), "dispatcher", move || {
            let mut dispatcher = dispatcher;
            let result = dispatcher.run();
            dispatcher.finish();
            result
        });
        let handle = match handle {
            Ok(handle) => handle,
            Err(error) => {
                cleanup(threads);
                return Err(error);
            }
        };
        Ok(WorkerPool {
            id,
            events: events_rx,
            dropped_events,
            control: control_tx,
            dispatcher: handle,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_reads_auto_or_a_number_and_says_what_else_it_wants() {
        assert_eq!("auto".parse(), Ok(Prefetch::Auto));
        assert_eq!("0".parse(), Ok(Prefetch::Fixed(0)));
        assert_eq!("100000".parse(), Ok(Prefetch::Fixed(100_000)));
        for bad in ["100001", "-1", "", "Auto", "2.5"] {
            let error = bad.parse::<Prefetch>().unwrap_err();
            assert!(
                error.contains("\"auto\" or a number of jobs"),
                "{bad}: {error}"
            );
        }
    }
}
