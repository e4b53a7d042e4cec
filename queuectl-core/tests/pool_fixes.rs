//! Regression tests for pool bugs: each failed before its fix.

use std::sync::Arc;
use std::time::Duration;

use queuectl_core::pool::{hostname, recover_abandoned};
use queuectl_core::{
    ClaimRequest, Event, FnExecutor, JobId, JobState, MemoryStorage, NewJob, ProcessIdentity,
    Storage, StorageExt, WorkerInfo, WorkerPool, now,
};

mod support;

use support::{Faulty, TIMEOUT, events_until, within};

const HOUR: Duration = Duration::from_secs(3600);

/// A worker record for `pid` on this host with `identity`, holding job `orphan`.
fn abandoned(store: &MemoryStorage, pid: u32, identity: ProcessIdentity) {
    store
        .enqueue(NewJob::new("x").id("orphan").unwrap(), now())
        .unwrap();
    store
        .register_worker(WorkerInfo {
            id: "other".into(),
            hostname: hostname(),
            pid,
            concurrency: 1,
            started_at: now(),
            last_seen: now(),
            stop_requested: false,
            stop_forced: false,
            identity,
            queues: Vec::new(),
        })
        .unwrap();
    assert_eq!(store.claim("other", 1, HOUR, now()).unwrap().len(), 1);
}

fn orphan_state(store: &MemoryStorage) -> JobState {
    store.get(&JobId::new("orphan").unwrap()).unwrap().state
}

/// An idle pool whose ticks are an hour apart still stops at once on a stop request: the
/// request wakes it.
#[test]
fn an_idle_pool_stops_on_a_stop_request_without_waiting_for_a_tick() {
    let (store, waits) = Faulty::reporting();
    let pool = idle_pool(store.clone());
    // The waker waits on the store: the pool has looked for work, found none, and sleeps.
    waits.recv_timeout(TIMEOUT).unwrap();
    store.request_stop().unwrap();
    events_until(pool.events(), |e| *e == Event::Stopped);
    within("the pool to stop", move || pool.join()).unwrap();
}

/// An idle pool whose ticks are an hour apart runs a new job at once: the enqueue wakes it.
#[test]
fn an_idle_pool_wakes_on_new_work_without_waiting_for_a_tick() {
    let (store, waits) = Faulty::reporting();
    let pool = idle_pool(store.clone());
    waits.recv_timeout(TIMEOUT).unwrap();
    store
        .enqueue(NewJob::new("x").id("late").unwrap(), now())
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Completed { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

/// A job scheduled for later wakes an idle pool when it is due, with no tick in between.
#[test]
fn an_idle_pool_wakes_when_a_scheduled_job_is_due() {
    let (store, waits) = Faulty::reporting();
    store
        .enqueue(
            NewJob::new("x")
                .id("soon")
                .unwrap()
                .run_at(now() + Duration::from_millis(200)),
            now(),
        )
        .unwrap();
    let pool = idle_pool(store.clone());
    waits.recv_timeout(TIMEOUT).unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Completed { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

/// A pool of no-op jobs whose heartbeat, recovery and purge are all an hour or more away.
fn idle_pool(store: Arc<Faulty>) -> WorkerPool {
    quiet_pool(store, FnExecutor::new(|_| Ok(())))
}

/// A container sharing our host name but not our PID namespace: its pid means nothing here,
/// so only its lease may decide that it is dead.
#[test]
fn a_worker_in_another_pid_namespace_is_not_judged_by_its_pid() {
    let store = MemoryStorage::new();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let mut identity = ProcessIdentity::of(child.id());
    child.wait().unwrap();
    identity.pid_namespace = identity.pid_namespace.map(|n| n ^ 1).or(Some(1));
    abandoned(&store, child.id(), identity);
    let recovered = recover_abandoned(&store, &hostname(), HOUR, now()).unwrap();
    assert!(recovered.is_empty(), "{recovered:?}");
    assert_eq!(orphan_state(&store), JobState::Processing);
}

/// A killed worker its parent has not reaped yet is a zombie: dead, its jobs recovered now.
#[test]
fn a_zombie_worker_is_dead() {
    let store = MemoryStorage::new();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    abandoned(&store, child.id(), ProcessIdentity::of(child.id()));
    child.kill().unwrap();
    // Wait for it to become a zombie, without reaping it.
    nix::sys::wait::waitid(
        nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(child.id() as i32)),
        nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
    )
    .unwrap();
    let recovered = recover_abandoned(&store, &hostname(), HOUR, now()).unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(orphan_state(&store), JobState::Pending);
    child.wait().unwrap();
}

/// An embedder that never reads the events does not make the pool grow.
#[test]
fn unread_events_are_bounded() {
    let store = Arc::new(MemoryStorage::new());
    let jobs: Vec<NewJob> = (0..3000).map(|_| NewJob::new("x")).collect();
    store.enqueue_batch(jobs, now()).unwrap();
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .exit_when_idle(true)
        .start()
        .unwrap();
    let events = pool.events().clone();
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!(summary.completed, 3000);
    assert!(events.len() <= 1024, "{} events held", events.len());
    assert_eq!(events.try_iter().last(), Some(Event::Stopped));
}

/// The trait's default `settle_and_claim` reports a failing claim, and has then recorded
/// nothing (the outer error means nothing was applied).
#[test]
fn the_default_settle_and_claim_does_not_hide_a_failing_claim() {
    let store = Faulty::default();
    store
        .enqueue(NewJob::new("x").id("running").unwrap(), now())
        .unwrap();
    store
        .enqueue(NewJob::new("x").id("next").unwrap(), now())
        .unwrap();
    let job = store.claim("w", 1, HOUR, now()).unwrap().pop().unwrap();
    store
        .fail_claims
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let settlement = queuectl_core::Settlement::Complete {
        lease: job.lease.clone().unwrap(),
        report: Default::default(),
    };
    let err = store
        .settle_and_claim(vec![settlement], &ClaimRequest::new("w", 1, HOUR), now())
        .unwrap_err();
    assert!(
        matches!(err, queuectl_core::StorageError::Io { .. }),
        "{err:?}"
    );
    assert_eq!(store.get(&job.id).unwrap().state, JobState::Processing);
}

/// `join` returns only once every pool thread has ended: none holds the store afterwards,
/// even with a store whose change notification never comes.
#[test]
fn no_pool_thread_outlives_join() {
    let store = Arc::new(Faulty {
        deaf: true,
        ..Faulty::default()
    });
    let pool = WorkerPool::builder(store.clone(), Arc::new(FnExecutor::new(|_| Ok(()))))
        .workers(2)
        .timings(queuectl_core::Timings {
            waker_poll: Duration::from_millis(20),
            ..Default::default()
        })
        .start()
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Started { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "a pool thread still holds the store"
    );
}

/// A graceful stop under way becomes forced when a forced stop request is recorded in
/// storage (`worker stop --force` after `worker stop`), without waiting for a tick.
#[test]
fn a_forced_stop_request_forces_a_graceful_stop_under_way() {
    let (store, waits) = Faulty::reporting();
    store
        .enqueue(NewJob::new("x").id("long").unwrap(), now())
        .unwrap();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let executor = Arc::new(Blocking(started_tx));
    let pool = WorkerPool::builder(store.clone(), executor)
        .lease(2 * HOUR)
        .heartbeat_interval(HOUR)
        .recovery_interval(HOUR)
        .timings(queuectl_core::Timings {
            purge_every: HOUR,
            ..Default::default()
        })
        .start()
        .unwrap();
    started.recv_timeout(TIMEOUT).unwrap();
    store.request_stop().unwrap();
    events_until(pool.events(), |e| {
        matches!(e, Event::Stopping { forced: false, .. })
    });
    // The stopping pool waits on the store again before the forced request is recorded.
    while waits.try_recv().is_ok() {}
    waits.recv_timeout(TIMEOUT).unwrap();
    let me = store.workers().unwrap().pop().unwrap();
    store
        .register_worker(WorkerInfo {
            stop_forced: true,
            ..me
        })
        .unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Released { .. }));
    let summary = within("the pool to stop", move || pool.join()).unwrap();
    assert_eq!(summary.released, 1);
    assert_eq!(
        store.get(&JobId::new("long").unwrap()).unwrap().attempts,
        0,
        "handed back uncharged"
    );
}

/// An executor whose jobs run until cancelled, reporting when they start.
#[derive(Debug)]
struct Blocking(crossbeam_channel::Sender<()>);

impl queuectl_core::Executor for Blocking {
    fn execute(
        &self,
        _: &queuectl_core::Job,
        cancel: &queuectl_core::CancelSignal,
    ) -> Result<queuectl_core::Outcome, queuectl_core::ExecutorError> {
        let _ = self.0.send(());
        let _ = cancel.receiver().recv();
        Ok(queuectl_core::Outcome::cancelled())
    }
}

/// A pool on `store` whose heartbeat, recovery and purge are an hour or more away: only the
/// store's changes wake it.
fn quiet_pool(
    store: Arc<dyn Storage>,
    executor: impl queuectl_core::Executor + 'static,
) -> WorkerPool {
    WorkerPool::builder(store, Arc::new(executor))
        .lease(2 * HOUR)
        .heartbeat_interval(HOUR)
        .recovery_interval(HOUR)
        .timings(queuectl_core::Timings {
            purge_every: HOUR,
            ..Default::default()
        })
        .start()
        .unwrap()
}

/// Runs until its attempt is cancelled, and says which happened.
#[derive(Debug)]
struct UntilCancelled(std::sync::Mutex<std::sync::mpsc::Sender<&'static str>>);

impl queuectl_core::Executor for UntilCancelled {
    fn execute(
        &self,
        _job: &queuectl_core::Job,
        cancel: &queuectl_core::CancelSignal,
    ) -> Result<queuectl_core::Outcome, queuectl_core::ExecutorError> {
        let report = |what| self.0.lock().unwrap().send(what).unwrap();
        report("started");
        match cancel.receiver().recv_timeout(TIMEOUT) {
            Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                report("cancelled");
                Ok(queuectl_core::Outcome::cancelled())
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                report("ran out");
                Ok(queuectl_core::Outcome::succeeded(TIMEOUT))
            }
        }
    }
}

/// A running job cancelled in the store is stopped as soon as the pool sees the change, not
/// at its next heartbeat (an hour away here), and stays cancelled.
#[test]
fn a_cancelled_running_job_is_stopped_without_waiting_for_a_heartbeat() {
    let store = Arc::new(MemoryStorage::new());
    let (tx, said) = std::sync::mpsc::channel();
    let pool = quiet_pool(store.clone(), UntilCancelled(tx.into()));
    let id: JobId = "long".parse().unwrap();
    store
        .enqueue(NewJob::new("x").id("long").unwrap(), now())
        .unwrap();
    assert_eq!(said.recv_timeout(TIMEOUT).unwrap(), "started");
    store.cancel(std::slice::from_ref(&id), now()).unwrap();
    assert_eq!(said.recv_timeout(TIMEOUT).unwrap(), "cancelled");
    events_until(pool.events(), |e| matches!(e, Event::LeaseLost { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();
    let job = store.get(&id).unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.attempts, 1);
}

/// A second cancel soon after the first (while looking for lost leases is throttled) is seen
/// once the throttle allows, not at the next heartbeat or recovery (an hour away here): the
/// change that made the look due has already been seen, so no later one would wake the pool.
#[test]
fn a_cancel_seen_while_lease_checks_are_throttled_is_acted_on_soon_after() {
    let store = Arc::new(MemoryStorage::new());
    let (tx, said) = std::sync::mpsc::channel();
    let pool = WorkerPool::builder(store.clone(), Arc::new(UntilCancelled(tx.into())))
        .lease(2 * HOUR)
        .heartbeat_interval(HOUR)
        .recovery_interval(HOUR)
        .timings(queuectl_core::Timings {
            purge_every: HOUR,
            stop_check_every: Duration::from_millis(300),
            ..Default::default()
        })
        .start()
        .unwrap();
    for name in ["first", "second"] {
        let id: JobId = name.parse().unwrap();
        store
            .enqueue(NewJob::new("x").id(name).unwrap(), now())
            .unwrap();
        assert_eq!(said.recv_timeout(TIMEOUT).unwrap(), "started");
        store.cancel(std::slice::from_ref(&id), now()).unwrap();
        assert_eq!(said.recv_timeout(TIMEOUT).unwrap(), "cancelled", "{name}");
    }
    within("the pool to stop", move || pool.shutdown()).unwrap();
}

/// Reports each start, then waits for the test to say go, then succeeds.
#[derive(Debug)]
struct Gated {
    said: std::sync::Mutex<std::sync::mpsc::Sender<u32>>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl queuectl_core::Executor for Gated {
    fn execute(
        &self,
        job: &queuectl_core::Job,
        _: &queuectl_core::CancelSignal,
    ) -> Result<queuectl_core::Outcome, queuectl_core::ExecutorError> {
        self.said.lock().unwrap().send(job.attempts).unwrap();
        let _ = self.go.lock().unwrap().recv_timeout(TIMEOUT);
        Ok(queuectl_core::Outcome::succeeded(Duration::ZERO))
    }
}

/// A job cancelled just as its attempt ends on its own, then retried, runs again: the pool
/// keeps no stale "lost attempt" behind which the new one would wait forever.
#[test]
fn a_job_cancelled_as_it_finishes_then_retried_runs_again() {
    let store = Arc::new(MemoryStorage::new());
    let (said_tx, said) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let executor = Gated {
        said: said_tx.into(),
        go: go_rx.into(),
    };
    let pool = quiet_pool(store.clone(), executor);
    let id: JobId = "j".parse().unwrap();
    store
        .enqueue(NewJob::new("x").id("j").unwrap(), now())
        .unwrap();
    assert_eq!(said.recv_timeout(TIMEOUT).unwrap(), 1);
    store.cancel(std::slice::from_ref(&id), now()).unwrap();
    go.send(()).unwrap();
    events_until(pool.events(), |e| matches!(e, Event::LeaseLost { .. }));
    assert_eq!(store.get(&id).unwrap().state, JobState::Cancelled);
    store.retry(std::slice::from_ref(&id), now()).unwrap();
    assert_eq!(
        said.recv_timeout(TIMEOUT).expect("the retried job started"),
        1
    );
    go.send(()).unwrap();
    events_until(pool.events(), |e| matches!(e, Event::Completed { .. }));
    within("the pool to stop", move || pool.shutdown()).unwrap();
    assert_eq!(store.get(&id).unwrap().state, JobState::Completed);
}

/// An idle pool stops at once even when its waker would look again only after an hour: the
/// pool's deregistration ends the waker's wait for work (it once was a quiet change there,
/// and the pool's exit waited out the waker's poll). On the embedded store, and on
/// PostgreSQL where `QUEUECTL_TEST_DATABASE_URL` is set.
#[test]
fn an_idle_pool_stops_without_waiting_out_its_wakers_poll() {
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<Arc<dyn Storage>> = vec![Arc::new(
        queuectl_core::FileStorage::open(dir.path().join("store")).unwrap(),
    )];
    let schema = format!("queuectl_stop_{:016x}", rand_u64());
    match std::env::var("QUEUECTL_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            let options = queuectl_core::PgOptions {
                schema: schema.clone(),
                ..Default::default()
            };
            stores.push(Arc::new(
                queuectl_core::PgStorage::connect(&url, options).unwrap(),
            ));
        }
        _ => println!("skipping PostgreSQL: QUEUECTL_TEST_DATABASE_URL is not set"),
    }
    for store in stores {
        let (store, waits) = Faulty::over(store);
        let pool = WorkerPool::builder(store, Arc::new(FnExecutor::new(|_| Ok(()))))
            .timings(queuectl_core::Timings {
                waker_poll: HOUR,
                ..queuectl_core::Timings::default()
            })
            .start()
            .unwrap();
        // Idle: its waker waits for work.
        waits.recv_timeout(TIMEOUT).expect("the waker to wait");
        let stopper = pool.stopper();
        stopper.graceful();
        within("the idle pool to stop", move || pool.join()).unwrap();
    }
    if let Ok(url) = std::env::var("QUEUECTL_TEST_DATABASE_URL")
        && !url.is_empty()
        && let Ok(mut client) = postgres::Client::connect(&url, postgres::NoTls)
    {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish()
}
