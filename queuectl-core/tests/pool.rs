//! The worker pool over `MemoryStorage`: every test waits on pool events or channels, each wait
//! bounded by a timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use parking_lot::Mutex;
use queuectl_core::{
    AttemptOutcome, BackoffPolicy, CancelSignal, Event, Executor, ExecutorError, FnExecutor, Job,
    JobId, JobState, LiveOutput, MemoryStorage, NewJob, Outcome, Status, StopReason, Storage,
    StorageExt, Timings, WorkerPool, now,
};

mod support;

use support::{Faulty, TIMEOUT, count_completed, events_until, within};

fn store() -> Arc<MemoryStorage> {
    Arc::new(MemoryStorage::new())
}

fn enqueue(store: &MemoryStorage, id: &str) {
    store
        .enqueue(NewJob::new(id).id(id).unwrap(), now())
        .unwrap();
}

/// A pool running `executor` on one job (`command`, id `id`) allowed a single attempt.
fn single_attempt_dies(
    command: &str,
    id: &str,
    executor: Arc<dyn Executor>,
) -> (Arc<MemoryStorage>, WorkerPool) {
    let store = store();
    store
        .enqueue(NewJob::new(command).id(id).unwrap().max_retries(1), now())
        .unwrap();
    let pool = WorkerPool::builder(store.clone(), executor)
        .backoff(queuectl_core::Fixed(Duration::from_millis(1)))
        .start()
        .unwrap();
    (store, pool)
}

/// Waits for a job to die in `pool` and returns its error.
fn dead_error(pool: &WorkerPool) -> String {
    let events = events_until(pool.events(), |e| matches!(e, Event::Dead { .. }));
    match events.last() {
        Some(Event::Dead { error, .. }) => error.clone(),
        other => panic!("expected a dead job, got {other:?}"),
    }
}

/// An executor whose jobs block until the test lets them go, and which reports starts.
#[derive(Debug)]
struct Gate {
    started: Sender<JobId>,
    release: Receiver<()>,
}

impl Executor for Gate {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        self.started.send(job.id.clone()).unwrap();
        let started = Instant::now();
        select! {
            recv(self.release) -> _ => Ok(Outcome::succeeded(started.elapsed())),
            recv(cancel.receiver()) -> _ => Ok(Outcome {
                status: Status::Cancelled,
                exit_code: None,
                signal: None,
                duration: started.elapsed(),
                output: String::new(),
            }),
        }
    }
}

fn gate() -> (Arc<Gate>, Receiver<JobId>, Sender<()>) {
    let (started_tx, started_rx) = unbounded();
    let (release_tx, release_rx) = unbounded();
    let gate = Gate {
        started: started_tx,
        release: release_rx,
    };
    (Arc::new(gate), started_rx, release_tx)
}

fn recv<T>(rx: &Receiver<T>) -> T {
    rx.recv_timeout(TIMEOUT).expect("timed out")
}

#[test]
fn runs_every_job_exactly_once_across_workers() {
    const JOBS: usize = 500;
    let store = store();
    let runs = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let batch = (0..JOBS).map(|i| NewJob::new(format!("job{i}"))).collect();
    store.enqueue_batch(batch, now()).unwrap();
    let counter = runs.clone();
    let executor = FnExecutor::new(move |job| {
        *counter.lock().entry(job.command.clone()).or_default() += 1;
        Ok(())
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .workers(4)
        .start()
        .unwrap();
    count_completed(pool.events(), JOBS);
    let summary = within("the pool to stop", move || pool.shutdown()).unwrap();
    assert_eq!(summary.completed, JOBS);
    let runs = runs.lock();
    assert_eq!(runs.len(), JOBS);
    assert!(runs.values().all(|&n| n == 1), "a job ran twice");
    assert_eq!(store.counts().unwrap().completed, JOBS);
}

#[derive(Debug, Default)]
struct RecordingBackoff(Mutex<Vec<u32>>);

impl BackoffPolicy for RecordingBackoff {
    fn delay(&self, _job: &JobId, attempts: u32) -> Duration {
        self.0.lock().push(attempts);
        Duration::from_millis(attempts as u64)
    }
}

#[derive(Debug)]
struct SharedBackoff(Arc<RecordingBackoff>);

impl BackoffPolicy for SharedBackoff {
    fn delay(&self, job: &JobId, attempts: u32) -> Duration {
        self.0.delay(job, attempts)
    }
}

#[test]
fn failing_job_retries_with_backoff_then_goes_to_the_dlq() {
    let store = store();
    store
        .enqueue(NewJob::new("boom").id("f").unwrap().max_retries(3), now())
        .unwrap();
    let backoff = Arc::new(RecordingBackoff::default());
    let executor = FnExecutor::new(|_| Err("always fails".into()));
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .backoff(SharedBackoff(backoff.clone()))
        .start()
        .unwrap();
    let events = events_until(pool.events(), |e| matches!(e, Event::Dead { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();
    let outcomes: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Failed {
                attempt, retry_in, ..
            } => Some(format!("failed {attempt} retry in {retry_in:?}")),
            Event::Dead { attempt, error, .. } => Some(format!("dead {attempt}: {error}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            "failed 1 retry in 1ms",
            "failed 2 retry in 2ms",
            "dead 3: always fails"
        ]
    );
    assert_eq!(*backoff.0.lock(), [1, 2, 3]);
    let job = store.get(&JobId::new("f").unwrap()).unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Dead, 3));
    assert_eq!(job.last_error.as_deref(), Some("always fails"));
}

#[test]
fn panicking_and_erroring_jobs_fail_without_killing_the_worker() {
    #[derive(Debug)]
    struct Broken;
    impl Executor for Broken {
        fn execute(&self, job: &Job, _: &CancelSignal) -> Result<Outcome, ExecutorError> {
            Err(ExecutorError::Spawn {
                id: job.id.clone(),
                source: std::io::Error::other("no such shell"),
            })
        }
    }
    let (store, pool) = single_attempt_dies("x", "a", Arc::new(Broken));
    assert_eq!(
        dead_error(&pool),
        "could not start the command of job a: no such shell"
    );

    // The same pool goes on running jobs afterwards.
    enqueue(&store, "b");
    events_until(pool.events(), |e| matches!(e, Event::Dead { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();

    let store = Arc::new(MemoryStorage::new());
    store
        .enqueue(NewJob::new("panic").max_retries(1), now())
        .unwrap();
    enqueue(&store, "fine");
    let executor = FnExecutor::new(|job| {
        if job.command == "panic" {
            panic!("job exploded");
        }
        Ok(())
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .start()
        .unwrap();
    let events = events_until(pool.events(), |e| matches!(e, Event::Completed { .. }));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Dead { error, .. } if error == "panicked: job exploded"))
    );
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn graceful_shutdown_finishes_running_jobs_and_claims_no_more() {
    let store = store();
    enqueue(&store, "running");
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate).start().unwrap();
    assert_eq!(recv(&started).as_str(), "running");
    enqueue(&store, "waiting");
    let stopper = pool.stopper();
    let events = pool.events().clone();
    let joiner = std::thread::spawn(move || within("the pool to stop", move || pool.join()));
    stopper.graceful();
    events_until(&events, |e| {
        matches!(e, Event::Stopping { forced: false, .. })
    });
    release.send(()).unwrap();
    let summary = joiner.join().unwrap().unwrap();
    assert_eq!(summary.completed, 1);
    let state = |id: &str| store.get(&JobId::new(id).unwrap()).unwrap().state;
    assert_eq!(state("running"), JobState::Completed);
    assert_eq!(state("waiting"), JobState::Pending);
    assert!(store.workers().unwrap().is_empty(), "deregistered");
}

#[test]
fn forced_shutdown_cancels_running_jobs_and_hands_them_back() {
    let store = store();
    enqueue(&store, "long");
    let (gate, started, _release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate).start().unwrap();
    recv(&started);
    let events = pool.events().clone();
    let summary = within("the pool to stop", move || pool.shutdown_now()).unwrap();
    assert_eq!(summary.released, 1);
    let job = store.get(&JobId::new("long").unwrap()).unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Pending, 0));
    let seen: Vec<_> = events.try_iter().collect();
    assert!(seen.iter().any(|e| matches!(e, Event::Released { .. })));
    assert_eq!(seen.last(), Some(&Event::Stopped));
}

/// A second graceful request keeps the stop graceful (the CLI calls `forced` on a second
/// signal); `forced` then escalates it.
#[test]
fn a_second_graceful_request_does_not_force_but_forced_does() {
    let store = store();
    enqueue(&store, "long");
    let (gate, started, _release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate).start().unwrap();
    recv(&started);
    let stopper = pool.stopper();
    stopper.graceful();
    events_until(pool.events(), |e| {
        matches!(e, Event::Stopping { forced: false, .. })
    });
    stopper.graceful();
    // The job keeps running: a forced stop would release it at once.
    assert!(
        pool.events()
            .recv_timeout(Duration::from_millis(200))
            .is_err()
    );
    stopper.forced();
    events_until(pool.events(), |e| {
        matches!(e, Event::Stopping { forced: true, .. })
    });
    assert_eq!(
        within("the pool to stop", move || pool.join())
            .unwrap()
            .released,
        1
    );
}

#[test]
fn idle_pool_wakes_on_new_work_without_waiting_for_a_tick() {
    let store = store();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .lease(Duration::from_secs(7200))
        .heartbeat_interval(Duration::from_secs(3600))
        .recovery_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Started { .. }));
    enqueue(&store, "late");
    count_completed(pool.events(), 1);
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn scheduled_job_runs_once_due() {
    let store = store();
    let due = now() + Duration::from_millis(300);
    store
        .enqueue(NewJob::new("x").id("later").unwrap().run_at(due), now())
        .unwrap();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .lease(Duration::from_secs(7200))
        .heartbeat_interval(Duration::from_secs(3600))
        .recovery_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    count_completed(pool.events(), 1);
    let job = store.get(&JobId::new("later").unwrap()).unwrap();
    assert!(job.started_at.unwrap() >= due, "ran before it was due");
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn jobs_run_in_priority_order() {
    let store = store();
    for (id, priority) in [("low", -5), ("normal", 0), ("urgent", 10), ("high", 5)] {
        store
            .enqueue(NewJob::new(id).id(id).unwrap().priority(priority), now())
            .unwrap();
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let log = order.clone();
    let executor = FnExecutor::new(move |job| {
        log.lock().push(job.command.clone());
        Ok(())
    });
    let pool = WorkerPool::builder(store, Arc::new(executor))
        .exit_when_idle(true)
        .start()
        .unwrap();
    assert_eq!(
        within("the pool to stop", move || pool.join())
            .unwrap()
            .completed,
        4
    );
    assert_eq!(*order.lock(), ["urgent", "high", "normal", "low"]);
}

#[test]
fn recovery_tick_returns_jobs_of_a_silent_worker() {
    let store = store();
    enqueue(&store, "orphan");
    // A worker that claimed the job, then vanished without heartbeating.
    store
        .claim("ghost", 1, Duration::from_millis(100), now())
        .unwrap();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .lease(Duration::from_secs(5))
        .recovery_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    let events = count_completed(pool.events(), 1);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Recovered { job, state: JobState::Pending } if job.as_str() == "orphan"
    )));
    let job = store.get(&JobId::new("orphan").unwrap()).unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Completed, 2));
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn jobs_of_a_dead_process_on_this_host_are_recovered_at_once() {
    let store = store();
    enqueue(&store, "orphan");
    // A registered worker whose process has exited: its lease is long, but its pid is gone.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    let identity = queuectl_core::ProcessIdentity::of(dead_pid);
    child.wait().unwrap();
    store
        .register_worker(queuectl_core::WorkerInfo {
            id: "dead-worker".into(),
            hostname: queuectl_core::pool::hostname(),
            pid: dead_pid,
            concurrency: 1,
            started_at: now(),
            last_seen: now(),
            stop_requested: false,
            stop_forced: false,
            identity,
            queues: Vec::new(),
        })
        .unwrap();
    store
        .claim("dead-worker", 1, Duration::from_secs(3600), now())
        .unwrap();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .start()
        .unwrap();
    count_completed(pool.events(), 1);
    let ids: Vec<_> = store.workers().unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(ids, [pool.id()], "the dead worker was deregistered");
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn heartbeats_keep_a_long_job_leased() {
    let store = store();
    enqueue(&store, "long");
    let (gate, started, release) = gate();
    let lease = Duration::from_millis(300);
    let pool = WorkerPool::builder(store.clone(), gate)
        .lease(lease)
        .heartbeat_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    recv(&started);
    let claimed_at = Instant::now();
    // Let three lease lengths pass (waiting on the event stream, which stays quiet).
    while claimed_at.elapsed() < lease * 3 {
        if let Ok(event) = pool.events().recv_timeout(lease) {
            assert!(
                !matches!(event, Event::LeaseLost { .. } | Event::Recovered { .. }),
                "{event:?}"
            );
        }
    }
    assert!(
        store.recover_expired(now()).unwrap().is_empty(),
        "lease was kept alive"
    );
    release.send(()).unwrap();
    count_completed(pool.events(), 1);
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn a_worker_that_lost_its_lease_cannot_overwrite_the_new_owner() {
    let store = store();
    enqueue(&store, "contested");
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate)
        .lease(Duration::from_secs(7200))
        .heartbeat_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    recv(&started);
    // The store decides the pool is dead and gives the job to someone else.
    store.recover_worker(pool.id(), now()).unwrap();
    let other = store
        .claim("other", 1, Duration::from_secs(60), now())
        .unwrap();
    assert_eq!(other.len(), 1);
    release.send(()).unwrap();
    events_until(pool.events(), |e| matches!(e, Event::LeaseLost { .. }));
    let job = store.get(&JobId::new("contested").unwrap()).unwrap();
    assert_eq!(job.state, JobState::Processing);
    assert_eq!(job.lease.unwrap().worker, "other");
    within("the pool to stop", move || pool.shutdown_now()).unwrap();
}

#[test]
fn stop_request_in_storage_stops_the_pool_gracefully() {
    let store = store();
    // Heartbeats are an hour apart: the request is noticed because it wakes the pool.
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .lease(Duration::from_secs(7200))
        .heartbeat_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Started { .. }));
    assert_eq!(store.workers().unwrap().len(), 1);
    assert_eq!(store.request_stop().unwrap(), 1);
    events_until(pool.events(), |e| {
        matches!(
            e,
            Event::Stopping {
                forced: false,
                reason: StopReason::StopRequest
            }
        )
    });
    within("the pool to stop", move || pool.join()).unwrap();
    assert!(store.workers().unwrap().is_empty());
}

#[test]
fn builder_refuses_zero_workers() {
    let err = WorkerPool::builder(store(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .workers(0)
        .start()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("workers must be a whole number from 1 to 4096"),
        "{err}"
    );
}

#[test]
fn exit_when_idle_drains_the_queue_then_stops() {
    let store = store();
    for i in 0..20 {
        enqueue(&store, &format!("j{i}"));
    }
    let (tx, rx) = bounded(100);
    let executor = FnExecutor::new(move |job| {
        tx.send(job.id.clone()).unwrap();
        Ok(())
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .workers(3)
        .exit_when_idle(true)
        .start()
        .unwrap();
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!(summary.completed, 20);
    assert_eq!(rx.try_iter().count(), 20);
    assert_eq!(store.counts().unwrap().completed, 20);
}

#[test]
fn graceful_stop_hands_back_prefetched_jobs_unstarted_and_uncharged() {
    let store = store();
    for i in 0..6 {
        enqueue(&store, &format!("j{i}"));
    }
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate)
        .prefetch(3)
        .start()
        .unwrap();
    assert_eq!(recv(&started).as_str(), "j0");
    // One running, three prefetched, two left in the queue.
    assert_eq!(store.counts().unwrap().processing, 4);
    let stopper = pool.stopper();
    let events = pool.events().clone();
    let joiner = std::thread::spawn(move || within("the pool to stop", move || pool.join()));
    stopper.graceful();
    events_until(&events, |e| matches!(e, Event::Stopping { .. }));
    release.send(()).unwrap();
    let summary = joiner.join().unwrap().unwrap();
    assert_eq!((summary.completed, summary.released), (1, 3));
    let counts = store.counts().unwrap();
    assert_eq!(
        (counts.completed, counts.pending, counts.processing),
        (1, 5, 0)
    );
    let pending = store
        .list(&queuectl_core::ListQuery::state(JobState::Pending))
        .unwrap();
    assert!(pending.iter().all(|j| j.attempts == 0));
}

#[test]
fn prefetching_pool_runs_every_job_once() {
    const JOBS: usize = 300;
    let store = store();
    let batch = (0..JOBS).map(|i| NewJob::new(format!("job{i}"))).collect();
    store.enqueue_batch(batch, now()).unwrap();
    let runs = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let counter = runs.clone();
    let executor = FnExecutor::new(move |job| {
        *counter.lock().entry(job.command.clone()).or_default() += 1;
        Ok(())
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .workers(2)
        .prefetch(32)
        .exit_when_idle(true)
        .start()
        .unwrap();
    assert_eq!(
        within("the pool to stop", move || pool.join())
            .unwrap()
            .completed,
        JOBS
    );
    let runs = runs.lock();
    assert_eq!(runs.len(), JOBS);
    assert!(runs.values().all(|&n| n == 1));
}

/// Counts how many attempts of each job run at once; each blocks until cancelled or released.
#[derive(Debug)]
struct Overlap {
    running: Mutex<HashMap<JobId, usize>>,
    most: Mutex<usize>,
    started: Sender<JobId>,
    release: Receiver<()>,
}

impl Executor for Overlap {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        {
            let mut running = self.running.lock();
            let n = running.entry(job.id.clone()).or_default();
            *n += 1;
            let mut most = self.most.lock();
            *most = (*most).max(*n);
        }
        self.started.send(job.id.clone()).unwrap();
        let status = select! {
            recv(self.release) -> _ => Status::Succeeded,
            recv(cancel.receiver()) -> _ => Status::Cancelled,
        };
        *self.running.lock().get_mut(&job.id).unwrap() -= 1;
        Ok(Outcome {
            status,
            exit_code: None,
            signal: None,
            duration: Duration::ZERO,
            output: String::new(),
        })
    }
}

#[test]
fn a_lost_lease_cancels_the_attempt_and_the_job_never_runs_twice_here() {
    let store = store();
    enqueue(&store, "contested");
    let (started_tx, started) = unbounded();
    let (release_tx, release) = unbounded();
    let executor = Arc::new(Overlap {
        running: Mutex::new(HashMap::new()),
        most: Mutex::new(0),
        started: started_tx,
        release,
    });
    let pool = WorkerPool::builder(store.clone(), executor.clone())
        .workers(2)
        .lease(Duration::from_secs(60))
        .heartbeat_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    assert_eq!(recv(&started).as_str(), "contested");
    // The store gives up on the pool (as if it had been frozen): the job is pending again,
    // and the pool's free slot claims it again while the first attempt still runs.
    store.recover_worker(pool.id(), now()).unwrap();
    // The pool learns that the lease is lost (from the change to the store, or its
    // heartbeat) and claims the job again, in either order.
    let (mut lost, mut reclaimed) = (false, false);
    events_until(pool.events(), |e| {
        lost |= matches!(e, Event::LeaseLost { .. });
        reclaimed |= matches!(e, Event::Claimed { attempt: 2, .. });
        lost && reclaimed
    });
    // The first attempt was cancelled; only then does the second one start.
    assert_eq!(recv(&started).as_str(), "contested");
    release_tx.send(()).unwrap();
    count_completed(pool.events(), 1);
    within("the pool to stop", move || pool.shutdown()).unwrap();
    assert_eq!(*executor.most.lock(), 1, "two attempts ran at once");
    let job = store.get(&JobId::new("contested").unwrap()).unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Completed, 2));
}

#[test]
fn a_panicking_executor_fails_the_attempt_and_the_pool_goes_on() {
    #[derive(Debug)]
    struct Panics;
    impl Executor for Panics {
        fn execute(&self, job: &Job, _: &CancelSignal) -> Result<Outcome, ExecutorError> {
            if job.command == "boom" {
                panic!("executor bug");
            }
            Ok(Outcome::succeeded(Duration::ZERO))
        }
    }
    let (store, pool) = single_attempt_dies("boom", "boom", Arc::new(Panics));
    assert_eq!(dead_error(&pool), "the executor panicked: executor bug");
    enqueue(&store, "fine");
    count_completed(pool.events(), 1);
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn a_pool_that_cannot_record_results_gives_up_and_stops() {
    let store = Arc::new(Faulty::default());
    store.fail_settles.store(true, Ordering::SeqCst);
    store
        .enqueue(NewJob::new("x").id("x").unwrap(), now())
        .unwrap();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .timings(queuectl_core::Timings {
            settle_retry: Duration::from_millis(1),
            ..Default::default()
        })
        .start()
        .unwrap();
    let events = pool.events().clone();
    let err = within("the pool to stop", move || pool.join()).unwrap_err();
    assert!(
        matches!(
            err,
            queuectl_core::PoolError::Storage {
                op: "recording job results",
                ..
            }
        ),
        "{err:?}"
    );
    let seen: Vec<_> = events.try_iter().collect();
    assert!(seen.iter().any(|e| matches!(e, Event::StorageError { .. })));
    assert_eq!(seen.last(), Some(&Event::Stopped));
    // The job was never recorded as done: its lease will expire and it will run again.
    let job = store.get(&JobId::new("x").unwrap()).unwrap();
    assert_eq!(job.state, JobState::Processing);
}

/// On a store that writes concurrently, finished jobs are recorded beside the claim that
/// refills their slots, each in a transaction of its own. When recording fails and the claim
/// works, the jobs claimed run while the results wait; no more are claimed until results are
/// recorded again (turns are one transaction again); then every job completes once.
#[test]
fn results_recorded_beside_a_claim_wait_for_the_store_while_the_claimed_jobs_run() {
    let store = Arc::new(Faulty {
        concurrent: true,
        ..Faulty::default()
    });
    store.fail_settles.store(true, Ordering::SeqCst);
    for i in 0..6 {
        enqueue(&store.inner, &format!("j{i}"));
    }
    let (started_tx, started) = unbounded();
    // Jobs after the first two wait until the test drops `gate`.
    let (gate, gate_rx) = bounded::<()>(0);
    let starts = std::sync::atomic::AtomicUsize::new(0);
    let executor = FnExecutor::new(move |job: &Job| {
        let _ = started_tx.send(job.id.clone());
        if starts.fetch_add(1, Ordering::SeqCst) >= 2 {
            let _ = gate_rx.recv_timeout(TIMEOUT);
        }
        Ok(())
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .workers(2)
        .exit_when_idle(true)
        .timings(Timings {
            settle_retry: Duration::from_millis(20),
            settle_attempts: 10_000,
            claim_backoff_max: Duration::from_millis(50),
            settle_beside_claim_from: 1,
            ..Default::default()
        })
        .start()
        .unwrap();
    events_until(pool.events(), |e| {
        matches!(
            e,
            Event::StorageError {
                op: "recording job results",
                ..
            }
        )
    });
    // The first results are not recorded, yet more jobs start.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        let id = started
            .recv_timeout(TIMEOUT)
            .expect("a third job starts while results cannot be recorded");
        seen.insert(id);
    }
    drop(gate);
    let mut failures = 1;
    events_until(pool.events(), |e| {
        if matches!(
            e,
            Event::StorageError {
                op: "recording job results",
                ..
            }
        ) {
            failures += 1;
        }
        failures == 5
    });
    assert_eq!(
        store.settled_beside.load(Ordering::SeqCst),
        1,
        "results were recorded beside a claim again after a failure"
    );
    assert!(
        store
            .inner
            .list(&Default::default())
            .unwrap()
            .iter()
            .all(|job| job.state != JobState::Completed),
        "no result was recorded yet"
    );
    store.fail_settles.store(false, Ordering::SeqCst);
    let summary = within("the pool to finish", move || pool.join()).unwrap();
    assert_eq!(summary.completed, 6);
    for i in 0..6 {
        let job = store.get(&JobId::new(format!("j{i}")).unwrap()).unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Completed, 1), "j{i}");
    }
}

#[test]
fn a_busy_pool_notices_a_stop_request_before_starting_more_work() {
    let store = store();
    enqueue(&store, "first");
    enqueue(&store, "second");
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate)
        .lease(Duration::from_secs(7200))
        .heartbeat_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    assert_eq!(recv(&started).as_str(), "first");
    store.request_stop().unwrap();
    // No heartbeat for an hour: the pool finds the request when "first" finishes, before it
    // would refill the slot with "second".
    release.send(()).unwrap();
    let events = events_until(pool.events(), |e| *e == Event::Stopped);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Stopping {
            reason: StopReason::StopRequest,
            ..
        }
    )));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Claimed { job, .. } if job.as_str() == "second")),
        "{events:#?}"
    );
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!(summary.completed, 1);
    let second = store.get(&JobId::new("second").unwrap()).unwrap();
    assert_eq!((second.state, second.attempts), (JobState::Pending, 0));
}

#[test]
fn an_idle_pool_does_not_write_to_its_store() {
    let store = store();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .start()
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Started { .. }));
    // Registration changed the store; idling must not: a look for work that finds none
    // changes nothing, so it wakes nobody, the pool itself included.
    let version = store.change_version().unwrap();
    // Let several recovery ticks pass (the event stream stays quiet meanwhile).
    assert!(
        pool.events()
            .recv_timeout(Duration::from_millis(600))
            .is_err()
    );
    assert_eq!(
        store.change_version().unwrap(),
        version,
        "the idle pool wrote to the store"
    );
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn exit_when_idle_waits_for_retries_but_not_for_scheduled_jobs() {
    let store = store();
    store
        .enqueue(
            NewJob::new("flaky").id("flaky").unwrap().max_retries(2),
            now(),
        )
        .unwrap();
    store
        .enqueue(
            NewJob::new("x")
                .id("tomorrow")
                .unwrap()
                .run_at(now() + Duration::from_secs(86_400)),
            now(),
        )
        .unwrap();
    let executor = FnExecutor::new(|job| {
        if job.attempts == 1 {
            Err("first try fails".into())
        } else {
            Ok(())
        }
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .backoff(queuectl_core::Fixed(Duration::from_millis(100)))
        .exit_when_idle(true)
        .start()
        .unwrap();
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!((summary.failed, summary.completed), (1, 1));
    let state = |id: &str| store.get(&JobId::new(id).unwrap()).unwrap().state;
    assert_eq!(state("flaky"), JobState::Completed);
    assert_eq!(state("tomorrow"), JobState::Pending);
}

#[test]
fn failing_claims_back_off_and_do_not_count_as_idle() {
    let store = Arc::new(Faulty::default());
    store.fail_claims.store(true, Ordering::SeqCst);
    store
        .enqueue(NewJob::new("x").id("x").unwrap(), now())
        .unwrap();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .exit_when_idle(true)
        .timings(queuectl_core::Timings {
            settle_retry: Duration::from_millis(20),
            claim_backoff_max: Duration::from_millis(80),
            ..Default::default()
        })
        .start()
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::StorageError { .. }));
    // Over this quiet window a spinning dispatcher would claim many thousands of times; one
    // that backs off (20 ms, doubling up to 80 ms) claims a handful.
    let before = store.claims.load(Ordering::SeqCst);
    let mut seen = Vec::new();
    let window = Instant::now() + Duration::from_millis(400);
    while let Ok(event) = pool
        .events()
        .recv_timeout(window.saturating_duration_since(Instant::now()))
    {
        seen.push(event);
    }
    let during = store.claims.load(Ordering::SeqCst) - before;
    assert!(during <= 10, "{during} claims in 0.4 s: {seen:#?}");
    // Failed claims are not "nothing to do": the pool did not stop as idle.
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Stopping { .. })),
        "{seen:#?}"
    );
    within("the pool to stop", move || pool.shutdown()).unwrap();
    assert_eq!(
        store.get(&JobId::new("x").unwrap()).unwrap().state,
        JobState::Pending
    );
}

#[test]
fn dropping_the_pool_handle_stops_the_pool() {
    let store = store();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .start()
        .unwrap();
    let events = pool.events().clone();
    events_until(&events, |e| matches!(e, Event::Started { .. }));
    drop(pool);
    let seen = events_until(&events, |e| *e == Event::Stopped);
    assert!(seen.iter().any(|e| matches!(
        e,
        Event::Stopping {
            reason: StopReason::HandleDropped,
            ..
        }
    )));
    assert!(store.workers().unwrap().is_empty());
}

/// An executor whose jobs print a line (as output they report live) and say so, then wait for
/// the test before each next line: "ID one", "ID two", "ID three"; they succeed with all three
/// as their output.
#[derive(Debug)]
struct Talks {
    said: Sender<JobId>,
    /// Each job's go-ahead for its next line, by id.
    next: HashMap<String, Receiver<()>>,
}

impl Executor for Talks {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        self.execute_live(job, cancel, &LiveOutput::new())
    }

    fn execute_live(
        &self,
        job: &Job,
        cancel: &CancelSignal,
        live: &LiveOutput,
    ) -> Result<Outcome, ExecutorError> {
        let started = Instant::now();
        let mut output = String::new();
        for (i, word) in ["one", "two", "three"].into_iter().enumerate() {
            if i > 0 {
                select! {
                    recv(self.next[job.id.as_str()]) -> _ => {}
                    recv(cancel.receiver()) -> _ => return Ok(Outcome::cancelled()),
                }
            }
            let line = format!("{} {word}\n", job.id);
            live.write(line.as_bytes());
            output.push_str(&line);
            self.said.send(job.id.clone()).unwrap();
        }
        Ok(Outcome {
            output,
            ..Outcome::succeeded(started.elapsed())
        })
    }
}

/// A pool on `store` running `Talks` jobs `ids` (enqueued here) on one thread each,
/// recording live output every 5 ms; and the senders that let each job go on.
fn talking_pool(
    store: &Arc<Faulty>,
    ids: &[&str],
) -> (WorkerPool, Receiver<JobId>, HashMap<String, Sender<()>>) {
    let (said_tx, said) = unbounded();
    let mut next = HashMap::new();
    let mut go = HashMap::new();
    for id in ids {
        enqueue(&store.inner, id);
        let (tx, rx) = unbounded();
        go.insert(id.to_string(), tx);
        next.insert(id.to_string(), rx);
    }
    let executor = Talks {
        said: said_tx,
        next,
    };
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .workers(ids.len())
        .timings(Timings {
            live_output_every: Duration::from_millis(5),
            ..Timings::default()
        })
        .start()
        .unwrap();
    (pool, said, go)
}

/// The running attempt's output, as the history shows it.
fn running_output(store: &dyn Storage, id: &str) -> Option<String> {
    let attempt = store.attempts(&id.parse().unwrap()).unwrap().pop()?;
    (attempt.outcome == AttemptOutcome::Running)
        .then_some(attempt.output)
        .flatten()
}

/// Waits (on store changes, bounded) until `cond` holds.
fn until_store(store: &dyn Storage, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let seen = store.change_version().unwrap();
        if cond() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        store.wait_for_change(seen, left).unwrap();
    }
}

/// What running attempts print reaches the store while they run, each byte once, in one call
/// per flush for every attempt with something new; the settled output is the outcome's.
#[test]
fn running_attempts_output_reaches_the_store_while_they_run() {
    let store = Arc::new(Faulty::default());
    let ids = ["a", "b"];
    let (pool, said, go) = talking_pool(&store, &ids);
    let all_say = |lines: &str| {
        for _ in ids {
            recv(&said);
        }
        until_store(&*store, lines, || {
            ids.iter()
                .all(|id| running_output(&*store, id) == Some(lines.replace("ID", id)))
        });
    };
    all_say("ID one\n");
    go.values().for_each(|tx| tx.send(()).unwrap());
    all_say("ID one\nID two\n");
    go.values().for_each(|tx| tx.send(()).unwrap());
    count_completed(pool.events(), 2);
    within("the pool to stop", move || pool.shutdown()).unwrap();
    let batches = store.outputs.lock().clone();
    let mut recorded: HashMap<String, String> = HashMap::new();
    for batch in &batches {
        let mut jobs: Vec<_> = batch.iter().map(|c| c.lease.job_id.as_str()).collect();
        jobs.sort();
        jobs.dedup();
        assert_eq!(jobs.len(), batch.len(), "one chunk per attempt per call");
        for chunk in batch {
            let text = recorded.entry(chunk.lease.job_id.to_string()).or_default();
            assert_eq!(chunk.offset, text.len() as u64, "only what is new is sent");
            text.push_str(&chunk.text);
        }
    }
    for id in ids {
        let job = store.get(&id.parse().unwrap()).unwrap();
        let all = format!("{id} one\n{id} two\n{id} three\n");
        assert_eq!(job.output.as_deref(), Some(all.as_str()));
        assert!(all.starts_with(&recorded[id]), "{:?}", recorded[id]);
        assert_eq!(store.output_since(&job.id, 0).unwrap().text, "");
    }
}

/// The error of the first storage error event of `op` the pool sends.
fn storage_error(pool: &WorkerPool, op: &str) -> String {
    let events = events_until(
        pool.events(),
        |e| matches!(e, Event::StorageError { op: seen, .. } if *seen == op),
    );
    match events.last() {
        Some(Event::StorageError { error, .. }) => error.clone(),
        other => panic!("{other:?}"),
    }
}

/// A store that fails to record live output is reported (a storage error event; the output is
/// sent again at the next flush) and does not fail the attempt.
#[test]
fn a_failure_to_record_live_output_is_reported_and_the_job_still_completes() {
    let store = Arc::new(Faulty::default());
    store.fail_output.store(true, Ordering::SeqCst);
    let (pool, said, go) = talking_pool(&store, &["a"]);
    recv(&said);
    let error = storage_error(&pool, "recording live output");
    assert!(error.contains("the disk went away"), "{error}");
    store.fail_output.store(false, Ordering::SeqCst);
    until_store(&*store, "the first line", || {
        running_output(&*store, "a").as_deref() == Some("a one\n")
    });
    go["a"].send(()).unwrap();
    go["a"].send(()).unwrap();
    count_completed(pool.events(), 1);
    within("the pool to stop", move || pool.shutdown()).unwrap();
    let job = store.get(&"a".parse().unwrap()).unwrap();
    assert_eq!(
        (job.state, job.output.as_deref()),
        (JobState::Completed, Some("a one\na two\na three\n"))
    );
}

/// A look for a stop request that fails is reported and does not hold up the results it
/// goes with: the jobs complete and the slots are refilled.
#[test]
fn a_failed_look_for_a_stop_request_is_reported_and_results_are_still_recorded() {
    let store = Arc::new(Faulty::default());
    store.fail_polls.store(true, Ordering::SeqCst);
    for id in ["a", "b", "c"] {
        enqueue(&store.inner, id);
    }
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_: &Job| Ok(()))))
        .workers(1)
        .start()
        .unwrap();
    let error = storage_error(&pool, "looking for a stop request");
    assert!(error.contains("the disk went away"), "{error}");
    until_store(&*store, "every job completed", || {
        store.counts().unwrap().completed == 3
    });
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

#[test]
fn a_job_claimed_ahead_is_reported_running_only_when_a_thread_starts_it() {
    let store = store();
    enqueue(&store, "first");
    enqueue(&store, "second");
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate)
        .workers(1)
        .prefetch(1)
        .exit_when_idle(true)
        .start()
        .unwrap();
    let running =
        |e: &Event, id: &str| matches!(e, Event::Running { job, .. } if job.as_str() == id);
    // The one thread runs "first" (and said so before it began); "second" is claimed ahead.
    assert_eq!(recv(&started).as_str(), "first");
    let mut seen = events_until(
        pool.events(),
        |e| matches!(e, Event::Claimed { job, .. } if job.as_str() == "second"),
    );
    seen.extend(pool.events().try_iter());
    assert!(!seen.iter().any(|e| running(e, "second")), "{seen:#?}");
    release.send(()).unwrap();
    events_until(pool.events(), |e| running(e, "second"));
    assert_eq!(recv(&started).as_str(), "second");
    release.send(()).unwrap();
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!(summary.completed, 2);
}

/// Pausing a queue keeps its jobs claimed ahead (`prefetch`) from starting: they go back to
/// the queue unstarted and uncharged, while the job already running finishes. Jobs of other
/// queues claimed ahead still run.
#[test]
fn pausing_a_queue_hands_back_its_jobs_claimed_ahead() {
    let store = store();
    enqueue(&store, "running");
    for (id, queue) in [("mail-1", "mail"), ("other", "default"), ("mail-2", "mail")] {
        let job = NewJob::new(id).id(id).unwrap().queue(queue);
        store.enqueue(job, now()).unwrap();
    }
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), gate)
        .workers(1)
        .prefetch(3)
        .timings(Timings {
            stop_check_every: Duration::from_millis(5),
            ..Timings::default()
        })
        .start()
        .unwrap();
    assert_eq!(recv(&started).as_str(), "running");
    assert_eq!(store.counts().unwrap().processing, 4, "three claimed ahead");
    store
        .change_queues(
            Some(&["mail".to_owned()]),
            queuectl_core::QueueChange::Pause,
        )
        .unwrap();
    let released = |e: &Event| matches!(e, Event::Released { .. });
    let mut seen = Vec::new();
    while seen.iter().filter(|e| released(e)).count() < 2 {
        seen.extend(events_until(pool.events(), released));
    }
    let handed_back: Vec<String> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Released { job } => Some(job.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(handed_back, ["mail-1", "mail-2"], "{seen:#?}");
    release.send(()).unwrap();
    assert_eq!(recv(&started).as_str(), "other");
    release.send(()).unwrap();
    let stopper = pool.stopper();
    count_completed(pool.events(), 2);
    stopper.graceful();
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!((summary.completed, summary.released), (2, 2));
    assert!(
        started.try_recv().is_err(),
        "no job of the paused queue started"
    );
    for id in ["mail-1", "mail-2"] {
        let job = store.get(&JobId::new(id).unwrap()).unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Pending, 0), "{id}");
    }
}

/// Jobs that report a run time (`paced <ms>`, without taking it) or block until released
/// (`gate`), reporting their starts.
#[derive(Debug)]
struct Paced {
    gate: Arc<Gate>,
}

impl Executor for Paced {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        match job.command.strip_prefix("paced ") {
            Some(ms) => Ok(Outcome::succeeded(Duration::from_micros(
                (ms.parse::<f64>().unwrap() * 1000.0) as u64,
            ))),
            None => self.gate.execute(job, cancel),
        }
    }
}

/// A store holding a paced job (priority 2) reporting `took_ms`, a gate job (priority 1),
/// and `short` paced jobs of 0.1 ms after them; a pool of one thread on it, prefetching
/// automatically within `window`.
fn auto_prefetching(
    took_ms: f64,
    short: usize,
    window: Duration,
) -> (Arc<MemoryStorage>, WorkerPool, Receiver<JobId>, Sender<()>) {
    let store = store();
    let mut batch = vec![
        NewJob::new(format!("paced {took_ms}"))
            .id("first")
            .unwrap()
            .priority(2),
        NewJob::new("gate").id("gate").unwrap().priority(1),
    ];
    batch.extend((0..short).map(|i| NewJob::new("paced 0.1").id(format!("s{i}")).unwrap()));
    store.enqueue_batch(batch, now()).unwrap();
    let (gate, started, release) = gate();
    let pool = WorkerPool::builder(store.clone(), Arc::new(Paced { gate }))
        .prefetch_auto()
        .exit_when_idle(true)
        .timings(Timings {
            prefetch_window: window,
            ..Timings::default()
        })
        .start()
        .unwrap();
    (store, pool, started, release)
}

#[test]
fn automatic_prefetch_claims_ahead_after_short_attempts_only() {
    // After an attempt of 1 ms, a window of an hour holds more than the most per thread.
    let short = queuectl_core::AUTO_PREFETCH_PER_THREAD + 8;
    let (store, pool, started, release) = auto_prefetching(1.0, short, Duration::from_secs(3600));
    assert_eq!(recv(&started).as_str(), "gate");
    // The gate's claim took the most the thread may have ahead of it.
    let ahead = queuectl_core::AUTO_PREFETCH_PER_THREAD;
    assert_eq!(store.counts().unwrap().processing, 1 + ahead);
    release.send(()).unwrap();
    assert_eq!(
        within("the pool to stop", move || pool.join())
            .unwrap()
            .completed,
        short + 2
    );

    // After an attempt of two hours, the same window holds none: one job at a time.
    let (store, pool, started, release) = auto_prefetching(7.2e6, 20, Duration::from_secs(3600));
    assert_eq!(recv(&started).as_str(), "gate");
    assert_eq!(store.counts().unwrap().processing, 1);
    release.send(()).unwrap();
    assert_eq!(
        within("the pool to stop", move || pool.join())
            .unwrap()
            .completed,
        22
    );
}

#[test]
fn automatic_prefetch_hands_back_jobs_waiting_behind_a_long_attempt() {
    // A window of 10 ms: the gate job, blocked, outlasts it.
    let (store, pool, started, release) = auto_prefetching(0.1, 5, Duration::from_millis(10));
    assert_eq!(recv(&started).as_str(), "gate");
    let events = pool.events().clone();
    events_until(&events, |e| matches!(e, Event::Released { .. }));
    // Every job waiting behind it went back at once (one settlement, then an event per job),
    // and nothing is claimed ahead again until an attempt has finished: they wait in the
    // queue, uncharged, for a free thread here or elsewhere.
    let counts = store.counts().unwrap();
    assert_eq!((counts.processing, counts.pending), (1, 5));
    let pending = store
        .list(&queuectl_core::ListQuery::state(JobState::Pending))
        .unwrap();
    assert!(pending.iter().all(|j| j.attempts == 0));
    release.send(()).unwrap();
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!(summary.completed, 7);
    let done = store
        .list(&queuectl_core::ListQuery::state(JobState::Completed))
        .unwrap();
    assert!(done.iter().all(|j| j.attempts == 1), "each ran once");
}
