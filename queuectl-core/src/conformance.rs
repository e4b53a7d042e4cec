//! The storage conformance suite: one function per rule of the [`Storage`] contract.
//!
//! Every backend runs every case through [`storage_conformance!`](crate::storage_conformance),
//! each on a fresh store, so a failure names the backend and the rule. Backends in other crates
//! enable the `conformance` feature of `queuectl-core` in their dev-dependencies.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use time::macros::datetime;

use crate::config::ConfigError;
use crate::error::StorageError;
use crate::job::{Attempt, AttemptOutcome, Job, JobId, JobState, MAX_OUTPUT, NewJob, Timestamp};
use crate::storage::{
    AttemptReport, ClaimRequest, Enqueued, ListQuery, OutputChunk, QueueChange, QueueInfo,
    Settlement, Storage, StorageExt, WorkerInfo,
};

/// A fresh store for one case.
pub trait Harness {
    /// The store under test.
    fn store(&self) -> Arc<dyn Storage>;
    /// Another handle on the same data, as a new process would open it; `None` for backends
    /// whose data does not outlive the handle.
    fn reopen(&self) -> Option<Arc<dyn Storage>>;
}

/// Stamps out one `#[test]` per conformance case for a backend.
///
/// `$make` is an expression building a fresh [`Harness`] for each case. A backend whose data
/// outlives its handles passes `durable` too, for the cases about reopening. A backend that
/// needs something a machine may lack (a database server) passes `guard = EXPR` last: each
/// case first evaluates `EXPR` and, when it is `false`, returns at once (the guard says why).
#[macro_export]
macro_rules! storage_conformance {
    ($make:expr, durable) => {
        $crate::storage_conformance!(@durable {} $make);
    };
    ($make:expr, durable, guard = $guard:expr) => {
        $crate::storage_conformance!(@durable { if !$guard { return; } } $make);
    };
    ($make:expr) => {
        $crate::storage_conformance!(@all {} $make);
    };
    ($make:expr, guard = $guard:expr) => {
        $crate::storage_conformance!(@all { if !$guard { return; } } $make);
    };
    (@durable $guard:block $make:expr) => {
        $crate::storage_conformance!(@all $guard $make);
        $crate::storage_conformance!(@cases $guard $make;
            everything_survives_a_reopen,
            queue_settings_survive_a_reopen
        );
    };
    (@all $guard:block $make:expr) => {
        $crate::storage_conformance!(@cases $guard $make;
            enqueue_and_get,
            unset_fields_take_config_defaults,
            duplicate_id_is_refused_and_changes_nothing,
            a_refused_batch_names_its_first_problem_in_batch_order,
            invalid_job_is_refused,
            claim_orders_by_priority_then_due_time_then_enqueue_order,
            jobs_not_yet_due_are_not_claimed,
            claim_charges_an_attempt_and_leases,
            claim_is_exclusive_across_threads_and_handles,
            stale_lease_token_is_refused,
            complete_records_the_result,
            settle_and_claim_is_one_step,
            fail_waits_out_backoff_then_dies_after_max_retries,
            heartbeat_extends_the_lease,
            expired_leases_are_recovered,
            dead_workers_jobs_are_recovered,
            release_does_not_charge_the_attempt,
            dlq_retry_and_clear,
            list_filters_and_pages_in_enqueue_order,
            counts_per_state,
            purge_removes_old_completed_jobs_only,
            config_round_trip,
            worker_registry_and_stop_request,
            a_settlement_that_polls_claims_nothing_once_a_stop_is_asked,
            waiters_wake_on_change,
            every_attempt_is_recorded,
            released_and_abandoned_attempts_are_recorded,
            list_leaves_out_output_and_get_has_it,
            output_is_capped_to_its_tail,
            counts_follow_deletions_and_retries,
            scheduled_jobs_are_claimed_once_due_whatever_their_priority,
            next_due_is_the_earliest_whatever_the_priority,
            list_pages_newest_first,
            cancel_ends_waiting_and_running_jobs,
            cancel_refuses_finished_and_unknown_jobs,
            remove_deletes_jobs_that_are_not_running,
            retry_runs_finished_jobs_again,
            claims_take_only_the_queues_asked_for_in_claim_order,
            paused_queues_are_not_claimed_until_resumed,
            queue_limits_count_running_jobs_of_every_worker,
            queues_report_their_counts_and_list_filters_by_queue,
            queue_changes_refuse_invalid_names,
            unique_keys_add_nothing_while_a_job_holds_them,
            unique_keys_hold_under_concurrent_enqueues,
            retry_refuses_to_give_a_unique_key_to_two_jobs,
            dependencies_wait_until_every_one_completed,
            failed_dependencies_cancel_their_dependents_down_the_chain,
            enqueue_refuses_missing_or_failed_dependencies,
            retried_dependents_wait_again,
            purged_dependencies_count_as_completed,
            a_new_job_taking_a_purged_dependencys_id_is_not_that_dependency,
            removing_a_completed_dependency_cancels_nothing,
            settle_and_claim_sees_the_room_its_settlements_made,
            retrying_every_dead_job_leaves_those_whose_key_is_taken,
            activity_reports_what_finished_since,
            live_output_is_visible_to_other_handles,
            live_output_under_a_stale_lease_is_refused_and_changes_nothing,
            live_output_is_capped_to_its_tail,
            live_output_does_not_leak_into_the_next_attempt,
            settling_keeps_the_reported_output_not_the_live_one,
            nul_bytes_in_output_become_sub_on_every_store
        );
    };
    (@cases $guard:block $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $guard
                let harness = $make;
                $crate::conformance::$case(&harness);
            }
        )*
    };
}

/// A fixed instant all cases count from.
pub fn t0() -> Timestamp {
    datetime!(2026-01-01 00:00:00 UTC)
}

/// A worker registration as a pool makes one, not asked to stop.
pub(crate) fn worker_info(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.to_owned(),
        hostname: "host".to_owned(),
        pid: 42,
        concurrency: 2,
        started_at: at(0),
        last_seen: at(0),
        stop_requested: false,
        stop_forced: false,
        identity: Default::default(),
        queues: Vec::new(),
    }
}

fn at(secs: i64) -> Timestamp {
    t0() + time::Duration::seconds(secs)
}

const LEASE: Duration = Duration::from_secs(30);

fn job(id: &str) -> NewJob {
    NewJob::new(format!("echo {id}")).id(id).unwrap()
}

fn id(s: &str) -> JobId {
    JobId::new(s).unwrap()
}

fn ids(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|j| j.id.as_str()).collect()
}

fn failed(message: &str) -> AttemptReport {
    AttemptReport {
        exit_code: Some(1),
        signal: None,
        output: Some(format!("{message}\n")),
        error: Some(message.to_owned()),
    }
}

/// Runs `f` on `threads` threads at once (after a barrier), each with a handle of its own
/// where the backend has them (every other thread), and returns what each returned.
pub(crate) fn race<T: Send + 'static>(
    h: &dyn Harness,
    threads: usize,
    f: impl Fn(usize, Arc<dyn Storage>) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = if t % 2 == 1 {
                h.reopen().unwrap_or_else(|| h.store())
            } else {
                h.store()
            };
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                f(t, store)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn claim_one(store: &dyn Storage, now: Timestamp) -> Job {
    let mut claimed = store.claim("w1", 1, LEASE, now).unwrap();
    assert_eq!(claimed.len(), 1, "expected one due job at {now}");
    claimed.pop().unwrap()
}

/// `enqueue` stores a pending job that `get` returns unchanged.
pub fn enqueue_and_get(h: &dyn Harness) {
    let store = h.store();
    let job = store
        .enqueue(job("a").priority(5).max_retries(7), at(0))
        .unwrap();
    assert_eq!(job.id.as_str(), "a");
    assert_eq!(job.command, "echo a");
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.max_retries, 7);
    assert_eq!(job.priority, 5);
    assert_eq!(
        (job.created_at, job.updated_at, job.run_at),
        (at(0), at(0), at(0))
    );
    assert!(job.lease.is_none());
    assert_eq!(store.get(&job.id).unwrap(), job);
    assert!(matches!(
        store.get(&id("missing")),
        Err(StorageError::NotFound { .. })
    ));
    let generated = store.enqueue(NewJob::new("true"), at(0)).unwrap();
    let other = store.enqueue(NewJob::new("true"), at(0)).unwrap();
    assert_ne!(generated.id, other.id);
    assert_eq!(store.get(&generated.id).unwrap(), generated);
}

/// Unset `max_retries` and `timeout` come from the stored config at enqueue time.
pub fn unset_fields_take_config_defaults(h: &dyn Harness) {
    let store = h.store();
    let before = store.enqueue(job("before"), at(0)).unwrap();
    assert_eq!(before.max_retries, 3);
    assert_eq!(before.timeout, Some(Duration::from_secs(30)));
    store
        .update_config(&mut |c| {
            c.set("max-retries", "5")?;
            c.set("job-timeout", "0")
        })
        .unwrap();
    let after = store.enqueue(job("after"), at(1)).unwrap();
    assert_eq!(after.max_retries, 5);
    assert_eq!(after.timeout, None);
    let explicit = store
        .enqueue(job("explicit").timeout(Duration::from_millis(1500)), at(1))
        .unwrap();
    assert_eq!(explicit.timeout, Some(Duration::from_millis(1500)));
    store
        .update_config(&mut |c| c.set("job-timeout", "30"))
        .unwrap();
    let unlimited = store
        .enqueue(job("unlimited").timeout(Duration::ZERO), at(1))
        .unwrap();
    assert_eq!(unlimited.timeout, None, "zero asks for no limit");
    assert_eq!(store.get(&id("before")).unwrap().max_retries, 3);
}

/// A duplicate id, in the store or within a batch, refuses the whole batch.
pub fn duplicate_id_is_refused_and_changes_nothing(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let before = store.change_version().unwrap();
    let err = store.enqueue(job("a"), at(1)).unwrap_err();
    assert!(matches!(&err, StorageError::AlreadyExists { id } if id.as_str() == "a"));
    assert_eq!(
        store.change_version().unwrap(),
        before,
        "a refusal is no change"
    );
    assert_eq!(store.counts().unwrap().total(), 1);
    let err = store
        .enqueue_batch(vec![job("b"), job("c"), job("a")], at(1))
        .unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists { .. }));
    let err = store
        .enqueue_batch(vec![job("d"), job("d")], at(1))
        .unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists { .. }));
    assert_eq!(ids(&store.list(&ListQuery::all()).unwrap()), ["a"]);
    assert_eq!(store.get(&id("a")).unwrap().created_at, at(0));
}

/// A batch with several problems is refused for the first one in batch order, whatever the
/// store: the same input gets the same message everywhere.
pub fn a_refused_batch_names_its_first_problem_in_batch_order(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let refused = |batch: Vec<NewJob>| store.enqueue_batch(batch, at(1)).unwrap_err();
    let taken = |err: &StorageError, which: &str| matches!(err, StorageError::AlreadyExists { id } if id.as_str() == which);
    // Batches of plain jobs.
    let err = refused(vec![job("q"), job("q"), job("a")]);
    assert!(taken(&err, "q"), "{err:?}");
    let err = refused(vec![job("r"), job("a"), job("r")]);
    assert!(taken(&err, "a"), "{err:?}");
    // Batches with dependencies.
    let err = refused(vec![job("x"), job("a"), job("y").after([id("nope")])]);
    assert!(taken(&err, "a"), "{err:?}");
    let err = refused(vec![job("p").after([id("nope")]), job("a")]);
    assert!(
        matches!(&err, StorageError::DependencyNotFound { .. }),
        "{err:?}"
    );
    // One job with two problems: its dependencies are looked at before its id.
    let err = refused(vec![job("a").after([id("nope")])]);
    assert!(
        matches!(&err, StorageError::DependencyNotFound { .. }),
        "{err:?}"
    );
    // What a job says about itself is checked for the whole batch before the store is.
    let err = refused(vec![job("a"), NewJob::new("   ")]);
    assert!(matches!(err, StorageError::InvalidJob(_)), "{err:?}");
    assert_eq!(ids(&store.list(&ListQuery::all()).unwrap()), ["a"]);
}

/// A blank command is refused, and the batch holding it with it.
pub fn invalid_job_is_refused(h: &dyn Harness) {
    let store = h.store();
    let err = store
        .enqueue_batch(vec![job("ok"), NewJob::new("   ")], at(0))
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidJob(_)), "{err:?}");
    assert_eq!(store.counts().unwrap().total(), 0);
}

/// Due jobs are claimed by priority (high first), then due time, then enqueue order.
pub fn claim_orders_by_priority_then_due_time_then_enqueue_order(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![
                job("low-early").priority(-1).run_at(at(0)),
                job("mid-late").run_at(at(5)),
                job("mid-early").run_at(at(1)),
                job("mid-late-2").run_at(at(5)),
                job("high").priority(10).run_at(at(9)),
                job("mid-earliest").run_at(at(0)),
            ],
            at(0),
        )
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        for job in store.claim("w", 2, LEASE, at(10)).unwrap() {
            order.push(job.id.as_str().to_owned());
        }
    }
    assert_eq!(
        order,
        [
            "high",
            "mid-earliest",
            "mid-early",
            "mid-late",
            "mid-late-2",
            "low-early"
        ]
    );
    assert!(store.claim("w", 5, LEASE, at(10)).unwrap().is_empty());
}

/// A job is not claimed before its `run_at`, and `next_due` says when it will be.
pub fn jobs_not_yet_due_are_not_claimed(h: &dyn Harness) {
    let store = h.store();
    assert_eq!(store.next_due(at(0)).unwrap(), None);
    store.enqueue(job("later").run_at(at(60)), at(0)).unwrap();
    store
        .enqueue(job("later-high").priority(9).run_at(at(90)), at(0))
        .unwrap();
    assert_eq!(store.next_due(at(0)).unwrap(), Some(at(60)));
    assert!(store.claim("w", 10, LEASE, at(59)).unwrap().is_empty());
    assert_eq!(
        ids(&store.claim("w", 10, LEASE, at(60)).unwrap()),
        ["later"]
    );
    assert_eq!(store.next_due(at(0)).unwrap(), Some(at(90)));
    assert_eq!(
        ids(&store.claim("w", 10, LEASE, at(90)).unwrap()),
        ["later-high"]
    );
    assert_eq!(store.next_due(at(0)).unwrap(), None);
}

/// A claim moves the job to `processing`, counts the attempt and issues a lease.
pub fn claim_charges_an_attempt_and_leases(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let claimed = claim_one(&*store, at(1));
    assert_eq!(claimed.state, JobState::Processing);
    assert_eq!(claimed.attempts, 1);
    assert_eq!(claimed.started_at, Some(at(1)));
    let lease = claimed
        .lease
        .clone()
        .expect("a claimed job carries its lease");
    assert_eq!(lease.worker, "w1");
    assert_eq!(lease.job_id.as_str(), "a");
    assert_eq!(lease.expires_at, at(1) + LEASE);
    assert_eq!(store.get(&id("a")).unwrap(), claimed);
    assert!(store.claim("w2", 1, LEASE, at(2)).unwrap().is_empty());
}

/// Threads claiming at once (through separate handles where the backend has them) claim every
/// job exactly once.
pub fn claim_is_exclusive_across_threads_and_handles(h: &dyn Harness) {
    const JOBS: usize = 200;
    const THREADS: usize = 4;
    let store = h.store();
    let batch = (0..JOBS).map(|i| job(&format!("j{i}"))).collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    let claimed = race(h, THREADS, |t, store| {
        let mut mine = Vec::new();
        loop {
            let claimed = store.claim(&format!("w{t}"), 3, LEASE, at(1)).unwrap();
            if claimed.is_empty() {
                return mine;
            }
            mine.extend(claimed.into_iter().map(|j| j.id));
        }
    });
    let mut seen = HashSet::new();
    for mine in claimed {
        for id in mine {
            assert!(seen.insert(id.clone()), "{id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), JOBS);
    assert_eq!(store.counts().unwrap().processing, JOBS);
}

/// After a lease is lost, its holder can neither settle nor extend it, and the new holder's
/// work is untouched.
pub fn stale_lease_token_is_refused(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let first = claim_one(&*store, at(0)).lease.unwrap();
    assert_eq!(store.recover_expired(at(31)).unwrap().len(), 1);
    let second = claim_one(&*store, at(32)).lease.unwrap();
    assert_ne!(first.token, second.token);
    for settlement in [
        Settlement::Complete {
            lease: first.clone(),
            report: AttemptReport::default(),
        },
        Settlement::Fail {
            lease: first.clone(),
            report: failed("x"),
            retry_at: at(40),
        },
        Settlement::Release {
            lease: first.clone(),
        },
    ] {
        let err = store.settle_one(settlement, at(33)).unwrap_err();
        assert!(matches!(err, StorageError::LeaseLost { .. }), "{err:?}");
    }
    assert!(matches!(
        store.heartbeat(&first, LEASE, at(33)),
        Err(StorageError::LeaseLost { .. })
    ));
    let current = store.get(&id("a")).unwrap();
    assert_eq!(current.state, JobState::Processing);
    assert_eq!(current.lease.as_ref().unwrap().token, second.token);
    store
        .complete(&second, AttemptReport::default(), at(34))
        .unwrap();
    assert!(matches!(
        store.complete(&second, AttemptReport::default(), at(35)),
        Err(StorageError::LeaseLost { .. })
    ));
}

/// `complete` records exit code and output, and ends the lease.
pub fn complete_records_the_result(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(1)).lease.unwrap();
    let report = AttemptReport {
        exit_code: Some(0),
        signal: None,
        output: Some("hello\n".into()),
        error: None,
    };
    let done = store.complete(&lease, report, at(2)).unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.output.as_deref(), Some("hello\n"));
    assert_eq!(done.finished_at, Some(at(2)));
    assert_eq!(done.updated_at, at(2));
    assert!(done.lease.is_none());
    assert_eq!(store.get(&id("a")).unwrap(), done);
    assert!(store.claim("w", 1, LEASE, at(3)).unwrap().is_empty());
}

/// `settle_and_claim` settles first, then claims from what is due, and refuses per item.
pub fn settle_and_claim_is_one_step(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a"), job("b").max_retries(1), job("c")], at(0))
        .unwrap();
    let claimed = store.claim("w", 2, LEASE, at(0)).unwrap();
    let lease = |i: usize| claimed[i].lease.clone().unwrap();
    let stale = crate::Lease {
        token: lease(0).token ^ 1,
        ..lease(0)
    };
    let (settled, next) = store
        .settle_and_claim(
            vec![
                Settlement::Complete {
                    lease: stale,
                    report: AttemptReport::default(),
                },
                Settlement::Complete {
                    lease: lease(0),
                    report: AttemptReport::default(),
                },
                Settlement::Release { lease: lease(1) },
            ],
            &ClaimRequest::new("w", 5, LEASE),
            at(1),
        )
        .unwrap();
    assert!(matches!(settled[0], Err(StorageError::LeaseLost { .. })));
    assert_eq!(settled[1].as_ref().unwrap().state, JobState::Completed);
    assert_eq!(settled[2].as_ref().unwrap().state, JobState::Pending);
    // The released job is due again and is claimed in the same step, with "c".
    assert_eq!(ids(&next), ["b", "c"]);
    assert!(next.iter().all(|j| j.state == JobState::Processing));
    let (settled, none) = store
        .settle_and_claim(Vec::new(), &ClaimRequest::new("w", 0, LEASE), at(2))
        .unwrap();
    assert!(settled.is_empty() && none.is_empty());
}

/// A failure makes the job `failed` until `retry_at`; after `max_retries` failed attempts it is
/// `dead`.
pub fn fail_waits_out_backoff_then_dies_after_max_retries(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a").max_retries(2), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    let after_first = store.fail(&lease, failed("first"), at(2), at(0)).unwrap();
    assert_eq!(after_first.state, JobState::Failed);
    assert_eq!(after_first.attempts, 1);
    assert_eq!(after_first.run_at, at(2));
    assert_eq!(after_first.last_error.as_deref(), Some("first"));
    assert_eq!(after_first.exit_code, Some(1));
    assert_eq!(store.next_due(at(0)).unwrap(), Some(at(2)));
    assert!(store.claim("w", 1, LEASE, at(1)).unwrap().is_empty());
    let second = claim_one(&*store, at(2));
    assert_eq!(second.attempts, 2);
    let dead = store
        .fail(&second.lease.unwrap(), failed("second"), at(6), at(3))
        .unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.last_error.as_deref(), Some("second"));
    assert!(store.claim("w", 1, LEASE, at(100)).unwrap().is_empty());
    assert_eq!(store.next_due(at(0)).unwrap(), None);

    // max_retries 0: the job still gets its first attempt, and its first failure is final.
    store.enqueue(job("once").max_retries(0), at(10)).unwrap();
    let lease = claim_one(&*store, at(10)).lease.unwrap();
    let dead = store.fail(&lease, failed("x"), at(12), at(10)).unwrap();
    assert_eq!(dead.state, JobState::Dead);
}

/// A heartbeat moves the lease's expiry, so the job is not recovered at the old one.
pub fn heartbeat_extends_the_lease(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    store.heartbeat(&lease, LEASE, at(20)).unwrap();
    assert_eq!(
        store.get(&id("a")).unwrap().lease.unwrap().expires_at,
        at(20) + LEASE
    );
    assert!(store.recover_expired(at(31)).unwrap().is_empty());
    assert_eq!(store.recover_expired(at(50)).unwrap().len(), 1);
}

/// An expired lease sends the job back to `pending` with the attempt still charged, or to
/// `dead` when that was its last.
pub fn expired_leases_are_recovered(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a").max_retries(2), at(0)).unwrap();
    store.enqueue(job("b"), at(0)).unwrap();
    claim_one(&*store, at(0));
    claim_one(&*store, at(10));
    let recovered = store.recover_expired(at(30)).unwrap();
    assert_eq!(ids(&recovered), ["a"]);
    let a = store.get(&id("a")).unwrap();
    assert_eq!((a.state, a.attempts), (JobState::Pending, 1));
    assert!(a.lease.is_none());
    assert!(a.last_error.unwrap().contains("lease expired"));
    assert_eq!(store.get(&id("b")).unwrap().state, JobState::Processing);
    let again = claim_one(&*store, at(31));
    assert_eq!((again.id.as_str(), again.attempts), ("a", 2));
    let recovered = store.recover_expired(at(100)).unwrap();
    assert_eq!(recovered.len(), 2);
    assert_eq!(store.get(&id("a")).unwrap().state, JobState::Dead);
    assert_eq!(store.get(&id("b")).unwrap().state, JobState::Pending);
}

/// `recover_worker` recovers only that worker's jobs, at once.
pub fn dead_workers_jobs_are_recovered(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a"), job("b"), job("c")], at(0))
        .unwrap();
    store.claim("dead", 2, LEASE, at(0)).unwrap();
    store.claim("alive", 1, LEASE, at(0)).unwrap();
    let recovered = store.recover_worker("dead", at(1)).unwrap();
    assert_eq!(ids(&recovered), ["a", "b"]);
    assert!(recovered.iter().all(|j| j.state == JobState::Pending));
    assert_eq!(store.get(&id("c")).unwrap().state, JobState::Processing);
}

/// A released job is `pending` again and its attempt is not charged.
pub fn release_does_not_charge_the_attempt(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(1)).lease.unwrap();
    let released = store.release(&lease, at(2)).unwrap();
    assert_eq!((released.state, released.attempts), (JobState::Pending, 0));
    assert!(released.lease.is_none());
    assert_eq!(claim_one(&*store, at(3)).attempts, 1);
}

/// `retry_dead` gives dead jobs a fresh set of attempts; `clear_dead` deletes them.
pub fn dlq_retry_and_clear(h: &dyn Harness) {
    let store = h.store();
    for name in ["d1", "d2", "d3"] {
        store.enqueue(job(name).max_retries(1), at(0)).unwrap();
        let lease = claim_one(&*store, at(0)).lease.unwrap();
        store.fail(&lease, failed("no"), at(1), at(0)).unwrap();
    }
    store.enqueue(job("alive"), at(0)).unwrap();
    assert_eq!(store.counts().unwrap().dead, 3);

    let err = store
        .retry_dead(Some(&[id("d1"), id("alive")]), at(5))
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidState { .. }), "{err:?}");
    let err = store.retry_dead(Some(&[id("nope")]), at(5)).unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
    assert_eq!(
        store.counts().unwrap().dead,
        3,
        "refused retries change nothing"
    );

    let retried = store.retry_dead(Some(&[id("d1")]), at(5)).unwrap();
    assert_eq!(ids(&retried), ["d1"]);
    let d1 = store.get(&id("d1")).unwrap();
    assert_eq!(
        (d1.state, d1.attempts, d1.run_at),
        (JobState::Pending, 0, at(5))
    );
    assert_eq!(d1.last_error.as_deref(), Some("no"), "history is kept");

    let all = store.retry_dead(None, at(6)).unwrap();
    assert_eq!(ids(&all), ["d2", "d3"]);
    assert_eq!(store.counts().unwrap().dead, 0);

    for job in store.claim("w", 4, LEASE, at(6)).unwrap() {
        store
            .fail(&job.lease.unwrap(), failed("again"), at(7), at(6))
            .unwrap();
    }
    assert_eq!(store.counts().unwrap().dead, 3);
    assert_eq!(store.clear_dead(at(9)).unwrap(), 3);
    assert!(matches!(
        store.get(&id("d1")),
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(ids(&store.list(&ListQuery::all()).unwrap()), ["alive"]);
    assert_eq!(store.clear_dead(at(9)).unwrap(), 0);
}

/// `list` filters by state and pages through results in enqueue order.
pub fn list_filters_and_pages_in_enqueue_order(h: &dyn Harness) {
    let store = h.store();
    let batch = (0..10)
        .map(|i| job(&format!("j{i}")).priority(i % 3))
        .collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    store.claim("w", 3, LEASE, at(1)).unwrap(); // j2, j5, j8 (priority 2)
    let all = store.list(&ListQuery::all()).unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(ids(&all)[..3], ["j0", "j1", "j2"]);
    let processing = store.list(&ListQuery::state(JobState::Processing)).unwrap();
    assert_eq!(ids(&processing), ["j2", "j5", "j8"]);
    let page = store
        .list(&ListQuery {
            state: Some(JobState::Pending),
            offset: 2,
            limit: Some(3),
            newest_first: false,
            ..ListQuery::default()
        })
        .unwrap();
    assert_eq!(ids(&page), ["j3", "j4", "j6"]);
    assert!(
        store
            .list(&ListQuery::state(JobState::Dead))
            .unwrap()
            .is_empty()
    );
}

/// `counts` follows every transition.
pub fn counts_per_state(h: &dyn Harness) {
    let store = h.store();
    let batch = ["a", "b", "c", "d"].map(job).to_vec();
    store.enqueue_batch(batch, at(0)).unwrap();
    let claimed = store.claim("w", 3, LEASE, at(0)).unwrap();
    let lease = |i: usize| claimed[i].lease.clone().unwrap();
    store
        .complete(&lease(0), AttemptReport::default(), at(1))
        .unwrap();
    store.fail(&lease(1), failed("x"), at(9), at(1)).unwrap();
    let counts = store.counts().unwrap();
    assert_eq!(
        (
            counts.pending,
            counts.processing,
            counts.completed,
            counts.failed,
            counts.dead
        ),
        (1, 1, 1, 1, 0)
    );
    assert_eq!(counts.total(), 4);
    assert_eq!(counts.get(JobState::Failed), 1);
}

/// `purge_completed` deletes completed jobs that finished before the cutoff, nothing else.
pub fn purge_removes_old_completed_jobs_only(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("old"), job("new"), job("pending")], at(0))
        .unwrap();
    let claimed = store.claim("w", 2, LEASE, at(0)).unwrap();
    store
        .complete(
            claimed[0].lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(10),
        )
        .unwrap();
    store
        .complete(
            claimed[1].lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(100),
        )
        .unwrap();
    assert_eq!(store.purge_completed(at(50)).unwrap(), 1);
    assert_eq!(
        ids(&store.list(&ListQuery::all()).unwrap()),
        ["new", "pending"]
    );
    assert_eq!(store.purge_completed(at(50)).unwrap(), 0);
}

/// Settings round-trip, and a refused update changes nothing.
pub fn config_round_trip(h: &dyn Harness) {
    let store = h.store();
    assert_eq!(store.config().unwrap(), crate::Config::default());
    let updated = store
        .update_config(&mut |c| c.set("backoff-base", "3"))
        .unwrap();
    assert_eq!(updated.backoff_base(), 3.0);
    assert_eq!(store.config().unwrap(), updated);
    let err = store
        .update_config(&mut |c| {
            c.set("max-retries", "9")?;
            c.set("worker-count", "0")
        })
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Config(ConfigError::InvalidValue { .. })),
        "{err:?}"
    );
    assert_eq!(
        store.config().unwrap(),
        updated,
        "a refused update changes nothing"
    );
}

/// A worker settling its jobs reads its registration and the version in the same call: while
/// it may run, it claims as asked; once asked to stop, it records its results and claims
/// nothing. The version is the one before the settlement.
pub fn a_settlement_that_polls_claims_nothing_once_a_stop_is_asked(h: &dyn Harness) {
    let store = h.store();
    store.register_worker(worker_info("w1")).unwrap();
    let request = ClaimRequest::new("w1", 1, LEASE);
    // A store that never held a job: no queue to claim from, the poll read all the same.
    let empty = store.change_version().unwrap();
    let polled = store
        .settle_and_claim_polling(Vec::new(), &request, at(0))
        .unwrap();
    let (version, me) = polled.poll.unwrap();
    assert_eq!(version, empty);
    assert!(me.is_some_and(|w| !w.stop_requested));
    assert!(polled.claimed.is_empty() && polled.settled.is_empty());
    let batch = (0..3).map(|_| NewJob::new("true")).collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    let complete = |job: &Job| Settlement::Complete {
        lease: job.lease.clone().unwrap(),
        report: AttemptReport::default(),
    };
    let first = store.claim_jobs(&request, at(1)).unwrap();
    let before = store.change_version().unwrap();
    let polled = store
        .settle_and_claim_polling(vec![complete(&first[0])], &request, at(2))
        .unwrap();
    let (version, worker) = polled.poll.unwrap();
    assert_eq!(version, before, "read before the settlement");
    assert_ne!(store.change_version().unwrap(), before);
    assert!(worker.is_some_and(|w| !w.stop_requested));
    assert_eq!(polled.settled.len(), 1);
    assert_eq!(
        polled.settled[0].as_ref().unwrap().state,
        JobState::Completed
    );
    assert_eq!(polled.claimed.len(), 1, "claims while it may run");
    store.request_stop().unwrap();
    let asked = store.change_version().unwrap();
    let polled = store
        .settle_and_claim_polling(vec![complete(&polled.claimed[0])], &request, at(3))
        .unwrap();
    let (version, worker) = polled.poll.unwrap();
    assert_eq!(version, asked);
    assert!(worker.is_some_and(|w| w.stop_requested));
    assert_eq!(
        polled.settled[0].as_ref().unwrap().state,
        JobState::Completed
    );
    assert!(
        polled.claimed.is_empty(),
        "claims nothing once asked to stop"
    );
    assert_eq!(store.counts().unwrap().pending, 1);
    // Not registered: nothing stops it.
    let other = ClaimRequest::new("w2", 1, LEASE);
    let polled = store
        .settle_and_claim_polling(Vec::new(), &other, at(4))
        .unwrap();
    assert!(polled.poll.unwrap().1.is_none());
    assert_eq!(polled.claimed.len(), 1);
}

/// Workers register, heartbeat and deregister; a stop request reaches every registered worker
/// but not workers that register afterwards.
pub fn worker_registry_and_stop_request(h: &dyn Harness) {
    let store = h.store();
    store.register_worker(worker_info("w1")).unwrap();
    store.register_worker(worker_info("w2")).unwrap();
    assert!(!store.worker_heartbeat("w1", at(5)).unwrap());
    let listed = store.workers().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].last_seen, at(5));
    let (before, w1) = store.poll_worker("w1").unwrap();
    assert_eq!(w1.as_ref(), listed.first());
    assert_eq!(store.request_stop().unwrap(), 2);
    let (after, w1) = store.poll_worker("w1").unwrap();
    assert_ne!(after, before, "a stop request is a change");
    assert_eq!(after, store.change_version().unwrap());
    assert!(w1.is_some_and(|w| w.stop_requested && !w.stop_forced));
    assert_eq!(store.poll_worker("nobody").unwrap().1, None);
    store.register_worker(worker_info("w3")).unwrap();
    assert!(store.worker_heartbeat("w1", at(6)).unwrap());
    assert!(store.worker_heartbeat("w2", at(6)).unwrap());
    assert!(!store.worker_heartbeat("w3", at(6)).unwrap());
    store.deregister_worker("w1").unwrap();
    store.deregister_worker("never-registered").unwrap();
    assert!(matches!(
        store.worker_heartbeat("w1", at(7)),
        Err(StorageError::UnknownWorker { .. })
    ));
    let left: Vec<_> = store.workers().unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(left, ["w2", "w3"]);
}

/// A waiter on `wait_for_change` wakes when another thread changes the store; a new job also
/// ends a wait for work.
pub fn waiters_wake_on_change(h: &dyn Harness) {
    let store = h.store();
    let seen = store.change_version().unwrap();
    assert_eq!(
        store
            .wait_for_change(seen, Duration::from_millis(1))
            .unwrap(),
        seen,
        "no change, no new version"
    );
    // Operations that change nothing leave the version alone, so an idle worker that looks
    // for work is not woken by its own look.
    assert!(store.claim("w", 5, LEASE, at(0)).unwrap().is_empty());
    assert!(store.recover_expired(at(0)).unwrap().is_empty());
    assert_eq!(store.clear_dead(at(9)).unwrap(), 0);
    assert_eq!(
        store.change_version().unwrap(),
        seen,
        "a no-op changed the version"
    );
    let writer = h.reopen().unwrap_or_else(|| h.store());
    let started = Arc::new(Barrier::new(2));
    let go = started.clone();
    let thread = std::thread::spawn(move || {
        go.wait();
        writer.enqueue(job("wake"), at(0)).unwrap();
    });
    started.wait();
    let mut version = seen;
    // Generous timeout: it is a bound, the wake-up is the event.
    for _ in 0..100 {
        version = store
            .wait_for_change(seen, Duration::from_millis(100))
            .unwrap();
        if version != seen {
            break;
        }
    }
    thread.join().unwrap();
    assert_ne!(version, seen, "the waiter saw the change");
    assert_eq!(store.get(&id("wake")).unwrap().state, JobState::Pending);
    // A new job is work: what an idle pool waits with ends at it too.
    assert_ne!(
        store.wait_for_work(seen, Duration::ZERO).unwrap(),
        seen,
        "a new job ends a wait for work"
    );
}

/// Each attempt is in the job's history with what it produced; the running one is last.
pub fn every_attempt_is_recorded(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a").max_retries(3), at(0)).unwrap();
    assert!(store.attempts(&id("a")).unwrap().is_empty());
    let first = claim_one(&*store, at(1));
    let running = store.attempts(&id("a")).unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(
        (
            running[0].number,
            running[0].outcome,
            running[0].worker.as_str()
        ),
        (1, AttemptOutcome::Running, "w1")
    );
    assert_eq!(
        (running[0].started_at, running[0].finished_at),
        (at(1), None)
    );
    let report = AttemptReport {
        exit_code: None,
        signal: Some(9),
        output: Some("partial\n".into()),
        error: Some("killed by signal 9".into()),
    };
    store
        .fail(first.lease.as_ref().unwrap(), report, at(5), at(2))
        .unwrap();
    let second = claim_one(&*store, at(5));
    assert_eq!(
        store.get(&id("a")).unwrap().output,
        None,
        "a running attempt has no output yet"
    );
    let report = AttemptReport {
        exit_code: Some(0),
        signal: None,
        output: Some("done\n".into()),
        error: None,
    };
    store
        .complete(second.lease.as_ref().unwrap(), report, at(7))
        .unwrap();
    let history = store.attempts(&id("a")).unwrap();
    let expected = [
        Attempt {
            number: 1,
            worker: "w1".into(),
            started_at: at(1),
            finished_at: Some(at(2)),
            outcome: AttemptOutcome::Failed,
            exit_code: None,
            signal: Some(9),
            error: Some("killed by signal 9".into()),
            output: Some("partial\n".into()),
            due_at: Some(at(0)),
        },
        Attempt {
            number: 2,
            worker: "w1".into(),
            started_at: at(5),
            finished_at: Some(at(7)),
            outcome: AttemptOutcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            error: None,
            output: Some("done\n".into()),
            due_at: Some(at(5)),
        },
    ];
    assert_eq!(history, expected);
    let job = store.get(&id("a")).unwrap();
    assert_eq!(
        job.output.as_deref(),
        Some("done\n"),
        "the last attempt's output"
    );
    assert_eq!(job.last_error.as_deref(), Some("killed by signal 9"));
    assert!(matches!(
        store.attempts(&id("missing")),
        Err(StorageError::NotFound { .. })
    ));
}

/// A released attempt is kept as released (and the next one has its number); an abandoned one
/// names why.
pub fn released_and_abandoned_attempts_are_recorded(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(1)).lease.unwrap();
    store.release(&lease, at(2)).unwrap();
    claim_one(&*store, at(3));
    store.recover_expired(at(100)).unwrap();
    claim_one(&*store, at(101));
    store.recover_worker("w1", at(102)).unwrap();
    let history = store.attempts(&id("a")).unwrap();
    let summary: Vec<_> = history.iter().map(|a| (a.number, a.outcome)).collect();
    assert_eq!(
        summary,
        [
            (1, AttemptOutcome::Released),
            (1, AttemptOutcome::Abandoned),
            (2, AttemptOutcome::Abandoned),
        ]
    );
    assert!(history[1].error.as_ref().unwrap().contains("lease expired"));
    assert!(history[2].error.as_ref().unwrap().contains("worker died"));
    assert_eq!(history[2].finished_at, Some(at(102)));
}

/// `list` leaves output out; `get` has the last attempt's.
pub fn list_leaves_out_output_and_get_has_it(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    let report = AttemptReport {
        output: Some("big output\n".into()),
        ..AttemptReport::default()
    };
    store.complete(&lease, report, at(1)).unwrap();
    let listed = store.list(&ListQuery::all()).unwrap();
    assert_eq!(listed[0].output, None);
    let got = store.get(&id("a")).unwrap();
    assert_eq!(got.output.as_deref(), Some("big output\n"));
    assert_eq!(
        Job {
            output: None,
            ..got
        },
        listed[0]
    );
}

/// Output over [`MAX_OUTPUT`] is cut to its tail, at a character boundary.
pub fn output_is_capped_to_its_tail(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    // A two-byte character straddles the cut.
    let output = format!("{}é{}", "x".repeat(10), "y".repeat(MAX_OUTPUT - 1));
    let report = AttemptReport {
        output: Some(output),
        ..AttemptReport::default()
    };
    let done = store.complete(&lease, report, at(1)).unwrap();
    let kept = store.get(&id("a")).unwrap().output.unwrap();
    assert_eq!(kept.len(), MAX_OUTPUT - 1);
    assert!(kept.bytes().all(|b| b == b'y'));
    assert_eq!(done.output.as_deref(), Some(kept.as_str()));
}

/// A NUL byte in what a job printed, live or at its end, and in its attempt's error is kept
/// as SUB (U+001A), one byte for one: the same text on every store, offsets unchanged.
pub fn nul_bytes_in_output_become_sub_on_every_store(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a").max_retries(1), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    store.record_output(&[chunk(&lease, 0, "li\0ve")]).unwrap();
    store.record_output(&[chunk(&lease, 5, "\0!")]).unwrap();
    let live = store.output_since(&id("a"), 2).unwrap();
    assert_eq!((live.offset, live.text.as_str()), (2, "\u{1a}ve\u{1a}!"));
    let report = AttemptReport {
        exit_code: Some(1),
        output: Some("out\0put".to_owned()),
        error: Some("said \0".to_owned()),
        ..AttemptReport::default()
    };
    let dead = store.fail(&lease, report, at(1), at(1)).unwrap();
    assert_eq!(dead.output.as_deref(), Some("out\u{1a}put"));
    assert_eq!(dead.last_error.as_deref(), Some("said \u{1a}"));
    assert_eq!(store.get(&id("a")).unwrap(), dead, "returned as stored");
    let attempts = store.attempts(&id("a")).unwrap();
    assert_eq!(attempts[0].output, dead.output);
    assert_eq!(attempts[0].error, dead.last_error);
}

/// `counts` stays right through deletions, retries and recoveries.
pub fn counts_follow_deletions_and_retries(h: &dyn Harness) {
    let store = h.store();
    let batch = (0..6)
        .map(|i| job(&format!("j{i}")).max_retries(1))
        .collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    let claimed = store.claim("w", 6, LEASE, at(0)).unwrap();
    for (i, job) in claimed.iter().enumerate() {
        let lease = job.lease.as_ref().unwrap();
        match i {
            0 | 1 => store
                .complete(lease, AttemptReport::default(), at(1))
                .map(drop),
            2..=4 => store.fail(lease, failed("x"), at(9), at(1)).map(drop),
            _ => Ok(()),
        }
        .unwrap();
    }
    let expect = |store: &dyn Storage, want: [usize; 5]| {
        let c = store.counts().unwrap();
        assert_eq!(
            [c.pending, c.processing, c.completed, c.failed, c.dead],
            want
        );
        let want: Vec<usize> = want.into_iter().chain([0]).collect();
        let listed: Vec<usize> = JobState::ALL
            .iter()
            .map(|&s| store.list(&ListQuery::state(s)).unwrap().len())
            .collect();
        assert_eq!(listed, want, "counts agree with the jobs");
    };
    expect(&*store, [0, 1, 2, 0, 3]);
    store.retry_dead(Some(&[id("j2")]), at(2)).unwrap();
    expect(&*store, [1, 1, 2, 0, 2]);
    assert_eq!(store.clear_dead(at(9)).unwrap(), 2);
    expect(&*store, [1, 1, 2, 0, 0]);
    assert_eq!(store.purge_completed(at(5)).unwrap(), 2);
    expect(&*store, [1, 1, 0, 0, 0]);
    // j5 used its only attempt: dead.
    store.recover_expired(at(100)).unwrap();
    expect(&*store, [1, 0, 0, 0, 1]);
}

/// Jobs scheduled for later, of any priority, do not hide due ones, and are claimed once due.
pub fn scheduled_jobs_are_claimed_once_due_whatever_their_priority(h: &dyn Harness) {
    let store = h.store();
    let later = (0..50).map(|i| job(&format!("later{i}")).priority(5).run_at(at(100)));
    let mut batch: Vec<NewJob> = later.collect();
    batch.push(job("now").priority(1));
    store.enqueue_batch(batch, at(0)).unwrap();
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(1)).unwrap()), ["now"]);
    assert!(store.claim("w", 10, LEASE, at(99)).unwrap().is_empty());
    store.enqueue(job("low").priority(-5), at(99)).unwrap();
    let claimed = store.claim("w", 60, LEASE, at(100)).unwrap();
    assert_eq!(claimed.len(), 51);
    assert_eq!(claimed[0].id.as_str(), "later0");
    assert_eq!(claimed[50].id.as_str(), "low");
}

/// `cancel` makes waiting jobs `cancelled` at once, and a running one too: its lease is over,
/// so its worker can record nothing, and its attempt is in the history as cancelled.
pub fn cancel_ends_waiting_and_running_jobs(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("pending"), job("running"), job("failing")], at(0))
        .unwrap();
    let running = store.claim("w", 1, LEASE, at(1)).unwrap().remove(0);
    assert_eq!(running.id.as_str(), "pending");
    let failing = store.claim("w", 2, LEASE, at(1)).unwrap();
    store
        .fail(
            failing[1].lease.as_ref().unwrap(),
            failed("x"),
            at(50),
            at(2),
        )
        .unwrap();
    // Now: "pending" runs, "running" runs, "failing" waits for its retry.
    let cancelled = store
        .cancel(&[id("running"), id("failing"), id("running")], at(3))
        .unwrap();
    assert_eq!(ids(&cancelled), ["running", "failing"]);
    for job in &cancelled {
        assert_eq!(job.state, JobState::Cancelled);
        assert!(job.lease.is_none());
        assert_eq!(job.finished_at, Some(at(3)));
    }
    let lease = failing[0].lease.clone().unwrap();
    assert!(matches!(
        store.complete(&lease, AttemptReport::default(), at(4)),
        Err(StorageError::LeaseLost { .. })
    ));
    assert!(matches!(
        store.heartbeat(&lease, LEASE, at(4)),
        Err(StorageError::LeaseLost { .. })
    ));
    let history = store.attempts(&id("running")).unwrap();
    assert_eq!(
        history.iter().map(|a| a.outcome).collect::<Vec<_>>(),
        [AttemptOutcome::Cancelled]
    );
    // Never claimed again, whatever the time.
    let later = store.claim("w", 5, LEASE, at(1000)).unwrap();
    assert!(later.is_empty(), "{:?}", ids(&later));
    let counts = store.counts().unwrap();
    assert_eq!(
        (counts.cancelled, counts.processing, counts.total()),
        (2, 1, 3)
    );
    assert_eq!(
        store
            .list(&ListQuery::state(JobState::Cancelled))
            .unwrap()
            .len(),
        2
    );
}

/// `cancel` refuses finished and unknown jobs, and then changes nothing at all.
pub fn cancel_refuses_finished_and_unknown_jobs(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("done"), job("waiting")], at(0))
        .unwrap();
    let lease = claim_one(&*store, at(1)).lease.unwrap();
    store
        .complete(&lease, AttemptReport::default(), at(2))
        .unwrap();
    let err = store
        .cancel(&[id("waiting"), id("done")], at(3))
        .unwrap_err();
    assert!(
        matches!(err, StorageError::InvalidState { op, state: JobState::Completed, .. } if op == "cancel"),
        "{err:?}"
    );
    let err = store
        .cancel(&[id("waiting"), id("nope")], at(3))
        .unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
    assert_eq!(store.get(&id("waiting")).unwrap().state, JobState::Pending);
    store.cancel(&[id("waiting")], at(4)).unwrap();
    let err = store.cancel(&[id("waiting")], at(5)).unwrap_err();
    assert!(matches!(err, StorageError::InvalidState { .. }), "{err:?}");
}

/// `remove` deletes jobs and their history, but never a running one.
pub fn remove_deletes_jobs_that_are_not_running(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a"), job("b"), job("c")], at(0))
        .unwrap();
    let lease = claim_one(&*store, at(1)).lease.unwrap(); // a
    let err = store.remove(&[id("b"), id("a")], at(9)).unwrap_err();
    assert!(matches!(err, StorageError::InvalidState { .. }), "{err:?}");
    let err = store.remove(&[id("b"), id("zzz")], at(9)).unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
    assert_eq!(
        store.counts().unwrap().total(),
        3,
        "refusals changed nothing"
    );
    store.fail(&lease, failed("x"), at(9), at(2)).unwrap();
    let removed = store.remove(&[id("a"), id("c")], at(9)).unwrap();
    assert_eq!(
        removed.iter().map(JobId::as_str).collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert!(matches!(
        store.get(&id("a")),
        Err(StorageError::NotFound { .. })
    ));
    assert!(matches!(
        store.attempts(&id("a")),
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(ids(&store.list(&ListQuery::all()).unwrap()), ["b"]);
    assert_eq!(store.counts().unwrap().failed, 0);
    // A new job comes after every job there ever was, removed ones included.
    let c = store.get(&id("b")).unwrap().seq;
    store.remove(&[id("b")], at(9)).unwrap();
    let d = store.enqueue(job("d"), at(3)).unwrap();
    assert!(d.seq > c, "{} after {c}", d.seq);
    store.enqueue(job("b"), at(3)).unwrap();
    assert_eq!(store.next_due(at(0)).unwrap(), Some(at(3)));
}

/// `retry` runs dead, cancelled and completed jobs again with a fresh set of attempts, and
/// refuses jobs that are not finished.
pub fn retry_runs_finished_jobs_again(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![
                job("done"),
                job("dead").max_retries(1),
                job("gone"),
                job("waiting"),
            ],
            at(0),
        )
        .unwrap();
    let claimed = store.claim("w", 2, LEASE, at(1)).unwrap();
    store
        .complete(
            claimed[0].lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(2),
        )
        .unwrap();
    store
        .fail(
            claimed[1].lease.as_ref().unwrap(),
            failed("x"),
            at(3),
            at(2),
        )
        .unwrap();
    store.cancel(&[id("gone")], at(2)).unwrap();
    let err = store
        .retry(&[id("done"), id("waiting")], at(5))
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidState { .. }), "{err:?}");
    assert_eq!(store.get(&id("done")).unwrap().state, JobState::Completed);
    let retried = store
        .retry(&[id("done"), id("dead"), id("gone")], at(5))
        .unwrap();
    assert_eq!(ids(&retried), ["done", "dead", "gone"]);
    for job in &retried {
        assert_eq!(
            (job.state, job.attempts, job.run_at),
            (JobState::Pending, 0, at(5))
        );
    }
    assert_eq!(store.counts().unwrap().pending, 4);
    let again = store.claim("w", 10, LEASE, at(5)).unwrap();
    assert_eq!(again.len(), 4);
    let done = again.iter().find(|j| j.id.as_str() == "done").unwrap();
    assert_eq!(
        (done.attempts, done.runs),
        (1, 2),
        "a fresh budget, the life-long count goes on"
    );
    store
        .complete(
            done.lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(6),
        )
        .unwrap();
    let numbers: Vec<u32> = store
        .attempts(&id("done"))
        .unwrap()
        .iter()
        .map(|a| a.number)
        .collect();
    assert_eq!(
        numbers,
        [1, 2],
        "each attempt keeps its own number across a retry"
    );
}

/// `list` pages newest first when asked, with and without a state.
pub fn list_pages_newest_first(h: &dyn Harness) {
    let store = h.store();
    let batch = (0..10).map(|i| job(&format!("j{i}"))).collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    store.claim("w", 2, LEASE, at(1)).unwrap(); // j0, j1
    let newest = |state, offset, limit| ListQuery {
        state,
        offset,
        limit,
        newest_first: true,
        ..ListQuery::default()
    };
    let page = store.list(&newest(None, 0, Some(3))).unwrap();
    assert_eq!(ids(&page), ["j9", "j8", "j7"]);
    let page = store.list(&newest(None, 8, None)).unwrap();
    assert_eq!(ids(&page), ["j1", "j0"]);
    let page = store
        .list(&newest(Some(JobState::Processing), 0, Some(5)))
        .unwrap();
    assert_eq!(ids(&page), ["j1", "j0"]);
    let page = store
        .list(&newest(Some(JobState::Pending), 1, Some(2)))
        .unwrap();
    assert_eq!(ids(&page), ["j8", "j7"]);
}

/// `next_due` is the earliest due time among runnable jobs, not that of the first in claim
/// order.
pub fn next_due_is_the_earliest_whatever_the_priority(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![
                job("urgent").priority(9).run_at(at(5)),
                job("early").run_at(at(1)),
                job("urgent-too").priority(9).run_at(at(5)),
            ],
            at(0),
        )
        .unwrap();
    // Due at 10: all three become ready; one urgent job is claimed.
    assert_eq!(
        ids(&store.claim("w", 1, LEASE, at(10)).unwrap()),
        ["urgent"]
    );
    assert_eq!(store.next_due(at(0)).unwrap(), Some(at(1)));
}

fn chunk(lease: &crate::Lease, offset: u64, text: &str) -> OutputChunk {
    OutputChunk {
        lease: lease.clone(),
        offset,
        text: text.to_owned(),
    }
}

/// The running attempt, as the history shows it.
fn running(store: &dyn Storage, name: &str) -> Attempt {
    let attempt = store.attempts(&id(name)).unwrap().pop().unwrap();
    assert_eq!(attempt.outcome, AttemptOutcome::Running);
    attempt
}

/// Output a running attempt recorded is its output in the history, seen from every handle
/// (`get` and `list` leave it out); a follower reads what is new since an offset, and what was
/// recorded already is skipped when it comes again.
pub fn live_output_is_visible_to_other_handles(h: &dyn Harness) {
    let store = h.store();
    let other = h.reopen().unwrap_or_else(|| h.store());
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(1)).lease.unwrap();
    assert_eq!(running(&*other, "a").output, None);
    let before = other.change_version().unwrap();
    let lost = store.record_output(&[chunk(&lease, 0, "one\n")]).unwrap();
    assert!(lost.is_empty(), "{lost:?}");
    assert_ne!(
        other.change_version().unwrap(),
        before,
        "followers are woken"
    );
    assert_eq!(running(&*other, "a").output.as_deref(), Some("one\n"));
    // A writer that sends again what was recorded already adds only what is new.
    store
        .record_output(&[chunk(&lease, 0, "one\ntwo\n")])
        .unwrap();
    store.record_output(&[chunk(&lease, 8, "thr")]).unwrap();
    store.record_output(&[chunk(&lease, 11, "ee\n")]).unwrap();
    assert_eq!(
        running(&*other, "a").output.as_deref(),
        Some("one\ntwo\nthree\n")
    );
    let since = other.output_since(&id("a"), 4).unwrap();
    assert_eq!((since.offset, since.text.as_str()), (4, "two\nthree\n"));
    assert_eq!(
        (since.job.state, since.job.output.as_ref(), since.finished),
        (JobState::Processing, None, 0)
    );
    assert_eq!(since.job.lease.as_ref().map(|l| l.token), Some(lease.token));
    let end = other.output_since(&id("a"), 14).unwrap();
    assert_eq!((end.offset, end.text.as_str()), (14, ""));
    assert_eq!(other.get(&id("a")).unwrap().output, None);
    assert_eq!(other.list(&ListQuery::all()).unwrap()[0].output, None);
    // A writer that dropped output: what comes after the gap replaces what was recorded.
    store
        .record_output(&[chunk(&lease, 100, "later\n")])
        .unwrap();
    let since = other.output_since(&id("a"), 14).unwrap();
    assert_eq!((since.offset, since.text.as_str()), (100, "later\n"));
    assert_eq!(running(&*other, "a").output.as_deref(), Some("later\n"));
    assert!(matches!(
        other.output_since(&id("missing"), 0),
        Err(StorageError::NotFound { .. })
    ));
}

/// Output recorded under a lost lease (the job was recovered, claimed again or cancelled) is
/// refused per chunk and changes nothing, in a batch with chunks that are taken.
pub fn live_output_under_a_stale_lease_is_refused_and_changes_nothing(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a"), job("b"), job("c")], at(0))
        .unwrap();
    let first = claim_one(&*store, at(0)).lease.unwrap();
    assert_eq!(store.recover_expired(at(31)).unwrap().len(), 1);
    let claimed = store.claim("w2", 3, LEASE, at(32)).unwrap();
    let lease = |name: &str| {
        let job = claimed.iter().find(|j| j.id.as_str() == name).unwrap();
        job.lease.clone().unwrap()
    };
    store.cancel(&[id("c")], at(33)).unwrap();
    let version = store.change_version().unwrap();
    let unknown = crate::Lease {
        job_id: id("nobody"),
        ..lease("a")
    };
    let lost = store
        .record_output(&[
            chunk(&first, 0, "stale\n"),
            chunk(&lease("c"), 0, "cancelled\n"),
            chunk(&unknown, 0, "unknown\n"),
        ])
        .unwrap();
    assert_eq!(
        lost.iter().map(JobId::as_str).collect::<Vec<_>>(),
        ["a", "c", "nobody"]
    );
    assert_eq!(store.change_version().unwrap(), version, "nothing changed");
    assert_eq!(running(&*store, "a").output, None);
    let lost = store
        .record_output(&[chunk(&first, 0, "stale\n"), chunk(&lease("b"), 0, "b\n")])
        .unwrap();
    assert_eq!(lost.iter().map(JobId::as_str).collect::<Vec<_>>(), ["a"]);
    assert_eq!(running(&*store, "a").output, None);
    assert_eq!(running(&*store, "b").output.as_deref(), Some("b\n"));
    assert_eq!(store.output_since(&id("c"), 0).unwrap().text, "");
    assert_eq!(
        store.attempts(&id("c")).unwrap()[0].output,
        None,
        "the cancelled attempt's output is what was recorded before the cancel"
    );
    assert!(store.record_output(&[]).unwrap().is_empty());
}

/// A running attempt keeps the last [`MAX_OUTPUT`] bytes of what it recorded, cut at a
/// character boundary; a follower learns where the kept output starts.
pub fn live_output_is_capped_to_its_tail(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a"), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    // "é" takes bytes 2 and 3; the cap falls between them.
    store.record_output(&[chunk(&lease, 0, "abé")]).unwrap();
    let rest = "y".repeat(MAX_OUTPUT - 1);
    store.record_output(&[chunk(&lease, 4, &rest)]).unwrap();
    let since = store.output_since(&id("a"), 0).unwrap();
    assert_eq!(since.offset, 4, "what was dropped, to a character boundary");
    assert_eq!(since.text.len(), MAX_OUTPUT - 1);
    assert!(since.text.bytes().all(|b| b == b'y'));
    let kept = running(&*store, "a").output.unwrap();
    assert_eq!(kept, since.text);
    // One chunk longer than the cap keeps its tail.
    store.enqueue(job("b"), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    let big = format!("x{}", "z".repeat(MAX_OUTPUT));
    store.record_output(&[chunk(&lease, 0, &big)]).unwrap();
    let since = store.output_since(&id("b"), 0).unwrap();
    assert_eq!((since.offset, since.text.len()), (1, MAX_OUTPUT));
    assert!(since.text.bytes().all(|b| b == b'z'));
}

/// What an attempt recorded while running goes when it ends, whichever way: the next attempt
/// starts with no output.
pub fn live_output_does_not_leak_into_the_next_attempt(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(job("a").max_retries(5), at(0)).unwrap();
    let lease = claim_one(&*store, at(0)).lease.unwrap();
    store.record_output(&[chunk(&lease, 0, "first\n")]).unwrap();
    store.fail(&lease, failed("boom"), at(2), at(1)).unwrap();
    let lease = claim_one(&*store, at(2)).lease.unwrap();
    assert_eq!(running(&*store, "a").output, None);
    let since = store.output_since(&id("a"), 0).unwrap();
    assert_eq!((since.finished, since.text.as_str()), (1, ""));
    store
        .record_output(&[chunk(&lease, 0, "second\n")])
        .unwrap();
    assert_eq!(store.recover_expired(at(100)).unwrap().len(), 1);
    let lease = claim_one(&*store, at(101)).lease.unwrap();
    assert_eq!(running(&*store, "a").output, None, "after a recovery");
    store.record_output(&[chunk(&lease, 0, "third\n")]).unwrap();
    store.release(&lease, at(102)).unwrap();
    let lease = claim_one(&*store, at(103)).lease.unwrap();
    assert_eq!(running(&*store, "a").output, None, "after a release");
    store
        .record_output(&[chunk(&lease, 0, "fourth\n")])
        .unwrap();
    store.recover_worker("w1", at(104)).unwrap();
    let history = store.attempts(&id("a")).unwrap();
    let outputs: Vec<_> = history
        .iter()
        .map(|a| (a.outcome, a.output.as_deref()))
        .collect();
    assert_eq!(
        outputs,
        [
            (AttemptOutcome::Failed, Some("boom\n")),
            (AttemptOutcome::Abandoned, None),
            (AttemptOutcome::Released, None),
            (AttemptOutcome::Abandoned, None),
        ]
    );
    let lease = claim_one(&*store, at(105)).lease.unwrap();
    assert_eq!(running(&*store, "a").output, None);
    assert_eq!(store.output_since(&id("a"), 0).unwrap().finished, 4);
    store.record_output(&[chunk(&lease, 0, "fifth\n")]).unwrap();
    store.cancel(&[id("a")], at(106)).unwrap();
    store.retry(&[id("a")], at(107)).unwrap();
    claim_one(&*store, at(108));
    assert_eq!(running(&*store, "a").output, None, "after a cancel");
}

/// Settling an attempt records the output its settlement reports, as it did before there was
/// live output, whatever the attempt recorded while running.
pub fn settling_keeps_the_reported_output_not_the_live_one(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a"), job("b")], at(0))
        .unwrap();
    let claimed = store.claim("w1", 2, LEASE, at(0)).unwrap();
    let lease = |i: usize| claimed[i].lease.clone().unwrap();
    store
        .record_output(&[chunk(&lease(0), 0, "part"), chunk(&lease(1), 0, "b so far")])
        .unwrap();
    let report = AttemptReport {
        exit_code: Some(0),
        signal: None,
        output: Some("partial\nwhole\n".into()),
        error: None,
    };
    let done = store.complete(&lease(0), report, at(1)).unwrap();
    assert_eq!(done.output.as_deref(), Some("partial\nwhole\n"));
    assert_eq!(store.get(&id("a")).unwrap(), done);
    let history = store.attempts(&id("a")).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].output.as_deref(), Some("partial\nwhole\n"));
    let since = store.output_since(&id("a"), 0).unwrap();
    assert_eq!(
        (since.job.state, since.finished, since.text.as_str()),
        (JobState::Completed, 1, "")
    );
    // A settlement that reports no output leaves none.
    store
        .fail(&lease(1), AttemptReport::default(), at(5), at(1))
        .unwrap();
    assert_eq!(store.attempts(&id("b")).unwrap()[0].output, None);
    assert_eq!(store.get(&id("b")).unwrap().output, None);
}

/// Every kind of change is visible through a newly opened handle (durable backends).
pub fn everything_survives_a_reopen(h: &dyn Harness) {
    let store = h.store();
    assert!(
        h.reopen().is_some(),
        "a durable backend opens a second handle"
    );
    store
        .enqueue_batch(
            vec![
                job("done"),
                job("fails"),
                job("running"),
                job("later").run_at(at(500)),
            ],
            at(0),
        )
        .unwrap();
    store.enqueue(job("dead").max_retries(1), at(0)).unwrap();
    store.enqueue(job("purged"), at(0)).unwrap();
    let claimed = store.claim("w", 5, LEASE, at(1)).unwrap();
    let lease = |name: &str| {
        claimed
            .iter()
            .find(|j| j.id.as_str() == name)
            .unwrap()
            .lease
            .clone()
            .unwrap()
    };
    store
        .complete(&lease("done"), AttemptReport::default(), at(2))
        .unwrap();
    store
        .fail(&lease("fails"), failed("oops"), at(9), at(2))
        .unwrap();
    store
        .fail(&lease("dead"), failed("fatal"), at(9), at(2))
        .unwrap();
    store
        .complete(&lease("purged"), AttemptReport::default(), at(1))
        .unwrap();
    store.purge_completed(at(2)).unwrap();
    store
        .update_config(&mut |c| c.set("max-retries", "8"))
        .unwrap();
    store.register_worker(worker_info("w")).unwrap();
    store.request_stop().unwrap();

    let reopened = h.reopen().unwrap();
    let all = ListQuery::all();
    assert_eq!(reopened.list(&all).unwrap(), store.list(&all).unwrap());
    for job in store.list(&all).unwrap() {
        assert_eq!(reopened.get(&job.id).unwrap(), store.get(&job.id).unwrap());
        assert_eq!(
            reopened.attempts(&job.id).unwrap(),
            store.attempts(&job.id).unwrap()
        );
    }
    assert_eq!(reopened.attempts(&id("fails")).unwrap().len(), 1);
    assert_eq!(reopened.counts().unwrap(), store.counts().unwrap());
    assert_eq!(reopened.config().unwrap(), store.config().unwrap());
    assert_eq!(reopened.workers().unwrap(), store.workers().unwrap());
    assert_eq!(reopened.next_due(at(0)).unwrap(), Some(at(9)));
    // The reopened handle keeps working with the state it loaded: the lease still fences.
    reopened
        .complete(&lease("running"), AttemptReport::default(), at(3))
        .unwrap();
    assert_eq!(
        store.get(&id("running")).unwrap().state,
        JobState::Completed
    );
    assert!(matches!(
        store.get(&id("purged")),
        Err(StorageError::NotFound { .. })
    ));
}

// ----- queues -----

fn in_queue(name: &str, queue: &str) -> NewJob {
    job(name).queue(queue)
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn queue_of<'a>(queues: &'a [QueueInfo], name: &str) -> &'a QueueInfo {
    queues
        .iter()
        .find(|q| q.name == name)
        .unwrap_or_else(|| panic!("no queue {name} in {queues:?}"))
}

/// A claim takes jobs of the queues it names only (all without names), and across queues in
/// the one claim order: priority, due time, enqueue order.
pub fn claims_take_only_the_queues_asked_for_in_claim_order(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![
                in_queue("a1", "a"),
                in_queue("b1", "b").priority(5),
                job("d1"),
                in_queue("a2", "a").priority(9),
                in_queue("b2", "b"),
            ],
            at(0),
        )
        .unwrap();
    let only_a = ClaimRequest::new("w", 10, LEASE).queues(["a"]);
    assert!(only_a.takes("a") && !only_a.takes("b"));
    assert_eq!(
        ids(&store.claim_jobs(&only_a, at(1)).unwrap()),
        ["a2", "a1"]
    );
    assert!(store.claim_jobs(&only_a, at(1)).unwrap().is_empty());
    let two = ClaimRequest::new("w", 2, LEASE).queues(["b", "default"]);
    assert_eq!(ids(&store.claim_jobs(&two, at(1)).unwrap()), ["b1", "d1"]);
    let claimed = store.claim("w", 10, LEASE, at(1)).unwrap();
    assert_eq!(ids(&claimed), ["b2"]);
    assert_eq!(claimed[0].queue, "b");
    assert_eq!(store.get(&id("d1")).unwrap().queue, "default");
}

/// A paused queue's jobs are not claimed (its running ones still settle); resuming it makes
/// them claimable; pausing without names pauses every known queue.
pub fn paused_queues_are_not_claimed_until_resumed(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![in_queue("a1", "a"), in_queue("a2", "a"), job("d1")],
            at(0),
        )
        .unwrap();
    let running = claim_one(&*store, at(1)); // a1
    let changed = store
        .change_queues(Some(&names(&["a", "later"])), QueueChange::Pause)
        .unwrap();
    assert_eq!(
        changed
            .iter()
            .map(|q| (q.name.as_str(), q.paused))
            .collect::<Vec<_>>(),
        [("a", true), ("later", true)],
        "a queue with no jobs yet keeps its setting"
    );
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(2)).unwrap()), ["d1"]);
    assert!(store.claim("w", 10, LEASE, at(2)).unwrap().is_empty());
    assert_eq!(
        store.next_due(at(2)).unwrap(),
        None,
        "a due job of a paused queue is not waited for by time"
    );
    store
        .complete(
            running.lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(3),
        )
        .unwrap();
    store.enqueue(in_queue("l1", "later"), at(3)).unwrap();
    assert!(store.claim("w", 10, LEASE, at(3)).unwrap().is_empty());
    store
        .change_queues(Some(&names(&["a"])), QueueChange::Resume)
        .unwrap();
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(4)).unwrap()), ["a2"]);
    let all = store.change_queues(None, QueueChange::Pause).unwrap();
    assert_eq!(
        all.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        ["a", "default", "later"]
    );
    assert!(all.iter().all(|q| q.paused));
    store.enqueue(job("d2"), at(5)).unwrap();
    assert!(store.claim("w", 10, LEASE, at(5)).unwrap().is_empty());
    store.change_queues(None, QueueChange::Resume).unwrap();
    assert_eq!(
        ids(&store.claim("w", 10, LEASE, at(6)).unwrap()),
        ["l1", "d2"]
    );
    assert!(store.queues().unwrap().iter().all(|q| !q.paused));
}

/// A queue's limit counts its processing jobs whoever holds them: no claim takes it past the
/// limit, and a finished job makes room. 0 means no limit.
pub fn queue_limits_count_running_jobs_of_every_worker(h: &dyn Harness) {
    let store = h.store();
    let batch = (0..5).map(|i| in_queue(&format!("a{i}"), "a")).collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    store.enqueue(job("d1"), at(0)).unwrap();
    let limited = store
        .change_queues(Some(&names(&["a"])), QueueChange::Limit(2))
        .unwrap();
    assert_eq!(limited[0].limit, 2);
    let first = store.claim("w1", 10, LEASE, at(1)).unwrap();
    assert_eq!(ids(&first), ["a0", "a1", "d1"]);
    let other = h.reopen().unwrap_or_else(|| h.store());
    assert!(other.claim("w2", 10, LEASE, at(1)).unwrap().is_empty());
    other
        .complete(
            first[0].lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(2),
        )
        .unwrap();
    assert_eq!(ids(&other.claim("w2", 10, LEASE, at(2)).unwrap()), ["a2"]);
    // Lowered below what runs: nothing more starts until enough finish.
    store
        .change_queues(Some(&names(&["a"])), QueueChange::Limit(1))
        .unwrap();
    let lease = |id: &str, jobs: &[Job]| {
        jobs.iter()
            .find(|j| j.id.as_str() == id)
            .and_then(|j| j.lease.clone())
            .unwrap()
    };
    store
        .complete(&lease("a1", &first), AttemptReport::default(), at(3))
        .unwrap();
    assert!(store.claim("w1", 10, LEASE, at(3)).unwrap().is_empty());
    store
        .change_queues(Some(&names(&["a"])), QueueChange::Limit(0))
        .unwrap();
    assert_eq!(
        ids(&store.claim("w1", 10, LEASE, at(4)).unwrap()),
        ["a3", "a4"]
    );
    assert_eq!(queue_of(&store.queues().unwrap(), "a").limit, 0);
}

/// `queues` lists every queue with jobs or settings and its jobs per state; `list` filters by
/// queue, with a state and newest first too.
pub fn queues_report_their_counts_and_list_filters_by_queue(h: &dyn Harness) {
    let store = h.store();
    assert!(store.queues().unwrap().is_empty());
    store
        .enqueue_batch(
            vec![
                in_queue("a1", "a"),
                in_queue("a2", "a"),
                job("d1"),
                in_queue("a3", "a"),
            ],
            at(0),
        )
        .unwrap();
    let a1 = claim_one(&*store, at(1));
    store
        .complete(a1.lease.as_ref().unwrap(), AttemptReport::default(), at(2))
        .unwrap();
    claim_one(&*store, at(3)); // a2
    let queues = store.queues().unwrap();
    assert_eq!(
        queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        ["a", "default"]
    );
    let a = queue_of(&queues, "a");
    assert_eq!(
        (a.counts.pending, a.counts.processing, a.counts.completed),
        (1, 1, 1)
    );
    assert_eq!(queue_of(&queues, "default").counts.total(), 1);
    assert_eq!(store.counts().unwrap().total(), 4);
    let of = |queue: &str, state, newest_first| ListQuery {
        queue: Some(queue.to_owned()),
        state,
        newest_first,
        ..ListQuery::default()
    };
    assert_eq!(
        ids(&store.list(&of("a", None, false)).unwrap()),
        ["a1", "a2", "a3"]
    );
    assert_eq!(
        ids(&store.list(&of("a", None, true)).unwrap()),
        ["a3", "a2", "a1"]
    );
    assert_eq!(
        ids(&store
            .list(&of("a", Some(JobState::Pending), false))
            .unwrap()),
        ["a3"]
    );
    assert!(store.list(&of("none", None, false)).unwrap().is_empty());
    // A queue whose jobs are all gone is no longer listed.
    store.remove(&[id("d1")], at(4)).unwrap();
    assert_eq!(
        store
            .queues()
            .unwrap()
            .iter()
            .map(|q| q.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
}

/// A queue name outside the id character set is refused and changes nothing.
pub fn queue_changes_refuse_invalid_names(h: &dyn Harness) {
    let store = h.store();
    let err = store
        .change_queues(Some(&names(&["ok", "not ok"])), QueueChange::Pause)
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::InvalidJob(crate::InvalidJob::Queue { .. })
        ),
        "{err:?}"
    );
    assert!(store.queues().unwrap().is_empty());
    // A queue with no jobs whose settings go back to the defaults is still reported.
    store
        .change_queues(Some(&names(&["empty"])), QueueChange::Pause)
        .unwrap();
    let resumed = store
        .change_queues(Some(&names(&["empty"])), QueueChange::Resume)
        .unwrap();
    assert_eq!(
        resumed
            .iter()
            .map(|q| (q.name.as_str(), q.paused))
            .collect::<Vec<_>>(),
        [("empty", false)]
    );
    assert!(store.queues().unwrap().is_empty());
    let err = store.enqueue(job("x").queue("../etc"), at(0)).unwrap_err();
    assert!(matches!(err, StorageError::InvalidJob(_)), "{err:?}");
    assert_eq!(store.counts().unwrap().total(), 0);
}

/// The queue settings are stored with the jobs: a new handle sees them.
pub fn queue_settings_survive_a_reopen(h: &dyn Harness) {
    let store = h.store();
    store.enqueue(in_queue("a1", "a"), at(0)).unwrap();
    store
        .change_queues(Some(&names(&["a"])), QueueChange::Pause)
        .unwrap();
    store
        .change_queues(Some(&names(&["b"])), QueueChange::Limit(3))
        .unwrap();
    drop(store);
    let reopened = h.reopen().expect("a durable backend reopens");
    let queues = reopened.queues().unwrap();
    assert!(queue_of(&queues, "a").paused);
    assert_eq!(queue_of(&queues, "b").limit, 3);
    assert!(reopened.claim("w", 1, LEASE, at(1)).unwrap().is_empty());
}

// ----- unique keys -----

fn keyed(name: &str, key: &str) -> NewJob {
    job(name).unique_key(key)
}

/// While a job with a key is pending, processing or failed, a job with the same key adds
/// nothing (the holder is returned, marked duplicate, in a batch too); once it finished, the
/// key is free.
pub fn unique_keys_add_nothing_while_a_job_holds_them(h: &dyn Harness) {
    let store = h.store();
    let first = store.submit(vec![keyed("a", "k")], at(0)).unwrap();
    assert!(!first[0].duplicate);
    let again = store
        .submit(
            vec![
                keyed("b", "k"),
                job("c"),
                keyed("d", "k2"),
                keyed("e", "k2"),
            ],
            at(1),
        )
        .unwrap();
    let summary: Vec<(&str, bool)> = again
        .iter()
        .map(|e: &Enqueued| (e.job.id.as_str(), e.duplicate))
        .collect();
    assert_eq!(
        summary,
        [("a", true), ("c", false), ("d", false), ("d", true)]
    );
    assert_eq!(store.counts().unwrap().total(), 3, "b and e were not added");
    assert!(matches!(
        store.get(&id("b")),
        Err(StorageError::NotFound { .. })
    ));
    // Held while it runs and while it waits for a retry.
    let running = claim_one(&*store, at(2)); // a
    assert!(store.submit(vec![keyed("f", "k")], at(2)).unwrap()[0].duplicate);
    store
        .fail(running.lease.as_ref().unwrap(), failed("x"), at(10), at(3))
        .unwrap();
    assert!(store.submit(vec![keyed("f", "k")], at(3)).unwrap()[0].duplicate);
    // A finished holder frees the key.
    store.cancel(&[id("a")], at(4)).unwrap();
    let free = store.submit(vec![keyed("f", "k")], at(4)).unwrap();
    assert!(!free[0].duplicate);
    assert_eq!(free[0].job.id.as_str(), "f");
    assert_eq!(free[0].job.unique_key.as_deref(), Some("k"));
}

/// Enqueues of one key racing from several threads and handles add exactly one job.
pub fn unique_keys_hold_under_concurrent_enqueues(h: &dyn Harness) {
    const THREADS: usize = 4;
    const ROUNDS: usize = 25;
    let entries = race(h, THREADS, |_, store| {
        (0..ROUNDS)
            .map(|r| {
                let new = NewJob::new("true").unique_key(format!("k{r}"));
                let entry = store.submit(vec![new], at(0)).unwrap().remove(0);
                (r, entry.job.id, entry.duplicate)
            })
            .collect::<Vec<_>>()
    });
    let mut holders = std::collections::HashMap::new();
    let mut added = 0;
    for mine in entries {
        for (round, job, duplicate) in mine {
            added += usize::from(!duplicate);
            let holder = holders.entry(round).or_insert_with(|| job.clone());
            assert_eq!(*holder, job, "key k{round} went to two jobs");
        }
    }
    assert_eq!(added, ROUNDS);
    assert_eq!(h.store().counts().unwrap().pending, ROUNDS);
}

/// `retry` and `dlq retry` refuse, changing nothing, to run a finished job again while another
/// holds its key, or two finished jobs with one key at once.
pub fn retry_refuses_to_give_a_unique_key_to_two_jobs(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![keyed("a", "k"), keyed("b", "k2")], at(0))
        .unwrap();
    store.cancel(&[id("a")], at(1)).unwrap();
    store.enqueue(keyed("c", "k"), at(2)).unwrap();
    let err = store.retry(&[id("a")], at(3)).unwrap_err();
    match &err {
        StorageError::UniqueKeyTaken {
            id, key, holder, ..
        } => {
            assert_eq!(
                (id.as_str(), key.as_str(), holder.as_str()),
                ("a", "k", "c")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get(&id("a")).unwrap().state, JobState::Cancelled);
    store.cancel(&[id("c")], at(4)).unwrap();
    let err = store.retry(&[id("a"), id("c")], at(5)).unwrap_err();
    assert!(
        matches!(err, StorageError::UniqueKeyTaken { .. }),
        "{err:?}"
    );
    assert_eq!(store.get(&id("a")).unwrap().state, JobState::Cancelled);
    assert_eq!(store.get(&id("c")).unwrap().state, JobState::Cancelled);
    // Dead jobs: `dlq retry` keeps the same rule.
    let b = claim_one(&*store, at(6));
    assert_eq!(b.id.as_str(), "b");
    store
        .fail(b.lease.as_ref().unwrap(), failed("x"), at(6), at(6))
        .unwrap();
    let b = store.get(&id("b")).unwrap();
    if b.state == JobState::Failed {
        // Not dead yet with the default budget: the key is still held.
        assert!(store.submit(vec![keyed("z", "k2")], at(7)).unwrap()[0].duplicate);
    }
    assert_eq!(ids(&store.retry(&[id("a")], at(8)).unwrap()), ["a"]);
}

// ----- dependencies -----

fn after(name: &str, deps: &[&str]) -> NewJob {
    job(name).after(deps.iter().map(|d| id(d)))
}

/// A job with dependencies is `blocked` and not claimed (nor waited for by `next_due`) until
/// every one has completed; dependencies may come earlier in the same batch.
pub fn dependencies_wait_until_every_one_completed(h: &dyn Harness) {
    let store = h.store();
    let created = store
        .enqueue_batch(
            vec![job("a"), job("b"), after("c", &["a", "b", "a"])],
            at(0),
        )
        .unwrap();
    assert_eq!(created[2].after, [id("a"), id("b")], "repeats are dropped");
    assert!(created[2].blocked && created[2].state == JobState::Pending);
    let both = store.claim("w", 10, LEASE, at(1)).unwrap();
    assert_eq!(ids(&both), ["a", "b"]);
    assert_eq!(store.next_due(at(0)).unwrap(), None);
    store
        .complete(
            both[0].lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(2),
        )
        .unwrap();
    assert!(store.get(&id("c")).unwrap().blocked, "b has not completed");
    assert!(store.claim("w", 10, LEASE, at(2)).unwrap().is_empty());
    store
        .complete(
            both[1].lease.as_ref().unwrap(),
            AttemptReport::default(),
            at(3),
        )
        .unwrap();
    let c = store.get(&id("c")).unwrap();
    assert!(!c.blocked);
    assert_eq!(c.run_at, at(3), "due once its dependencies completed");
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(3)).unwrap()), ["c"]);
    // A dependency that already completed does not block.
    let d = store.enqueue(after("d", &["a"]), at(4)).unwrap();
    assert!(!d.blocked);
    // A failed attempt of a dependency (it will retry) keeps its dependents waiting.
    store
        .enqueue_batch(vec![job("e"), after("f", &["e"])], at(5))
        .unwrap();
    let e = store.claim("w", 1, LEASE, at(6)).unwrap().remove(0);
    assert_eq!(e.id.as_str(), "d");
    let e = store.claim("w", 1, LEASE, at(6)).unwrap().remove(0);
    store
        .fail(e.lease.as_ref().unwrap(), failed("x"), at(7), at(6))
        .unwrap();
    assert!(store.get(&id("f")).unwrap().blocked);
}

/// When a dependency ends dead or cancelled, or is removed, each job waiting for it is
/// cancelled with `last_error` naming it, and so on down the chain; jobs that already ran
/// are left alone.
pub fn failed_dependencies_cancel_their_dependents_down_the_chain(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![
                job("a").max_retries(1),
                after("b", &["a"]),
                after("c", &["b"]),
                job("x"),
                after("y", &["x"]),
                job("r"),
                after("s", &["r"]),
            ],
            at(0),
        )
        .unwrap();
    let a = claim_one(&*store, at(1));
    store
        .fail(a.lease.as_ref().unwrap(), failed("boom"), at(2), at(2))
        .unwrap();
    let b = store.get(&id("b")).unwrap();
    assert_eq!((b.state, b.blocked), (JobState::Cancelled, false));
    assert!(
        b.last_error.as_deref().unwrap().contains("a is dead"),
        "{b:?}"
    );
    let c = store.get(&id("c")).unwrap();
    assert_eq!(c.state, JobState::Cancelled);
    assert!(
        c.last_error.as_deref().unwrap().contains("b is cancelled"),
        "{c:?}"
    );
    store.cancel(&[id("x")], at(3)).unwrap();
    let y = store.get(&id("y")).unwrap();
    assert_eq!(y.state, JobState::Cancelled);
    assert!(y.last_error.as_deref().unwrap().contains("x is cancelled"));
    store.remove(&[id("r")], at(4)).unwrap();
    let s = store.get(&id("s")).unwrap();
    assert_eq!(s.state, JobState::Cancelled);
    assert!(s.last_error.as_deref().unwrap().contains("r was removed"));
    assert_eq!(store.counts().unwrap().cancelled, 5, "b, c, x, y and s");
    // Cancelling a job and its dependent in one call reports both.
    store
        .enqueue_batch(vec![job("p"), after("q", &["p"])], at(5))
        .unwrap();
    let cancelled = store.cancel(&[id("p"), id("q")], at(6)).unwrap();
    assert_eq!(ids(&cancelled), ["p", "q"]);
    assert!(cancelled.iter().all(|j| j.state == JobState::Cancelled));
}

/// `after` must name jobs that exist and may still complete; a refusal adds nothing of the
/// batch.
pub fn enqueue_refuses_missing_or_failed_dependencies(h: &dyn Harness) {
    let store = h.store();
    let err = store
        .enqueue_batch(vec![job("a"), after("b", &["nope"])], at(0))
        .unwrap_err();
    match &err {
        StorageError::DependencyNotFound { id, after } => {
            assert_eq!(
                (id.as_ref().map(JobId::as_str), after.as_str()),
                (Some("b"), "nope")
            );
        }
        other => panic!("{other:?}"),
    }
    // A job without an id is not named by the one generated for it.
    let err = store
        .enqueue(NewJob::new("true").after([id("nope")]), at(0))
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::DependencyNotFound { id: None, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the job cannot run after nope: there is no such job"
    );
    assert_eq!(store.counts().unwrap().total(), 0);
    store.enqueue(job("a"), at(0)).unwrap();
    store.cancel(&[id("a")], at(1)).unwrap();
    let err = store.enqueue(after("b", &["a"]), at(2)).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::DependencyFailed {
                state: JobState::Cancelled,
                ..
            }
        ),
        "{err:?}"
    );
    // A later job of the batch cannot be a dependency of an earlier one.
    let err = store
        .enqueue_batch(vec![after("c", &["d"]), job("d")], at(3))
        .unwrap_err();
    assert!(
        matches!(err, StorageError::DependencyNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(store.counts().unwrap().total(), 1);
}

/// A cancelled dependent that is retried waits again for its dependencies that have not
/// completed, and runs once they have.
pub fn retried_dependents_wait_again(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a").max_retries(1), after("b", &["a"])], at(0))
        .unwrap();
    let a = claim_one(&*store, at(1));
    store
        .fail(a.lease.as_ref().unwrap(), failed("x"), at(1), at(1))
        .unwrap();
    assert_eq!(store.get(&id("b")).unwrap().state, JobState::Cancelled);
    let b = store.retry(&[id("b")], at(2)).unwrap().remove(0);
    assert_eq!((b.state, b.blocked), (JobState::Pending, true));
    assert!(store.claim("w", 10, LEASE, at(2)).unwrap().is_empty());
    store.retry_dead(Some(&[id("a")]), at(3)).unwrap();
    let a = claim_one(&*store, at(4));
    assert_eq!(a.id.as_str(), "a");
    store
        .complete(a.lease.as_ref().unwrap(), AttemptReport::default(), at(5))
        .unwrap();
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(5)).unwrap()), ["b"]);
    // A dead dependency deleted by `dlq clear` cancels the jobs waiting for it.
    store
        .enqueue_batch(vec![job("c").max_retries(1), after("d", &["c"])], at(6))
        .unwrap();
    let c = claim_one(&*store, at(6));
    store
        .fail(c.lease.as_ref().unwrap(), failed("x"), at(6), at(6))
        .unwrap();
    store.retry(&[id("d")], at(7)).unwrap();
    assert!(store.get(&id("d")).unwrap().blocked);
    assert_eq!(store.clear_dead(at(8)).unwrap(), 1);
    let d = store.get(&id("d")).unwrap();
    assert_eq!(d.state, JobState::Cancelled);
    assert!(d.last_error.as_deref().unwrap().contains("c was removed"));
}

/// A completed dependency deleted by retention still counts as completed.
pub fn purged_dependencies_count_as_completed(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(vec![job("a"), job("b"), after("c", &["a", "b"])], at(0))
        .unwrap();
    let a = claim_one(&*store, at(1));
    store
        .complete(a.lease.as_ref().unwrap(), AttemptReport::default(), at(2))
        .unwrap();
    assert_eq!(store.purge_completed(at(3)).unwrap(), 1);
    let c = store.get(&id("c")).unwrap();
    assert_eq!((c.state, c.blocked), (JobState::Pending, true));
    let b = claim_one(&*store, at(4));
    store
        .complete(b.lease.as_ref().unwrap(), AttemptReport::default(), at(5))
        .unwrap();
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(5)).unwrap()), ["c"]);
}

/// `b` after `d` and `e`; `d` has completed.
fn b_after_d_and_e_with_d_completed(store: &dyn Storage) {
    store
        .enqueue_batch(vec![job("d"), job("e"), after("b", &["d", "e"])], at(0))
        .unwrap();
    let d = claim_one(store, at(1));
    store
        .complete(d.lease.as_ref().unwrap(), AttemptReport::default(), at(2))
        .unwrap();
}

/// A dependency purged after it completed counts as completed even when a new job takes its
/// id: the dependent waits for the jobs it was enqueued after, not for whatever has their ids
/// now (and a retried dependent likewise).
pub fn a_new_job_taking_a_purged_dependencys_id_is_not_that_dependency(h: &dyn Harness) {
    let store = h.store();
    b_after_d_and_e_with_d_completed(&*store);
    assert_eq!(store.purge_completed(at(3)).unwrap(), 1);
    store.enqueue(job("d").run_at(at(100)), at(3)).unwrap();
    let e = claim_one(&*store, at(4));
    assert_eq!(e.id.as_str(), "e");
    store
        .complete(e.lease.as_ref().unwrap(), AttemptReport::default(), at(5))
        .unwrap();
    let b = store.get(&id("b")).unwrap();
    assert!(!b.blocked, "the new d is not the d b waited for");
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(6)).unwrap()), ["b"]);
    // Retried, it still does not wait for the new d.
    store.cancel(&[id("b")], at(7)).unwrap();
    let again = store.retry(&[id("b")], at(8)).unwrap().remove(0);
    assert!(!again.blocked, "{again:?}");
}

/// Removing a dependency that completed cancels nothing: the dependents wait for the others.
pub fn removing_a_completed_dependency_cancels_nothing(h: &dyn Harness) {
    let store = h.store();
    b_after_d_and_e_with_d_completed(&*store);
    store.remove(&[id("d")], at(3)).unwrap();
    let b = store.get(&id("b")).unwrap();
    assert_eq!((b.state, b.blocked), (JobState::Pending, true), "{b:?}");
    let e = claim_one(&*store, at(4));
    store
        .complete(e.lease.as_ref().unwrap(), AttemptReport::default(), at(5))
        .unwrap();
    assert_eq!(ids(&store.claim("w", 10, LEASE, at(6)).unwrap()), ["b"]);
}

/// In one `settle_and_claim`, the claim sees what the settlements did: a job failed with its
/// retry due now, and room a finished job made under its queue's limit.
pub fn settle_and_claim_sees_the_room_its_settlements_made(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![in_queue("k1", "one"), in_queue("k2", "one"), job("j")],
            at(0),
        )
        .unwrap();
    store
        .change_queues(Some(&names(&["one"])), QueueChange::Limit(1))
        .unwrap();
    let first = store.claim("w", 10, LEASE, at(1)).unwrap();
    assert_eq!(ids(&first), ["k1", "j"]);
    let lease = |id: &str| {
        first
            .iter()
            .find(|job| job.id.as_str() == id)
            .and_then(|job| job.lease.clone())
            .unwrap()
    };
    let settlements = vec![
        Settlement::Complete {
            lease: lease("k1"),
            report: AttemptReport::default(),
        },
        Settlement::Fail {
            lease: lease("j"),
            report: failed("x"),
            retry_at: at(2),
        },
    ];
    let (settled, claimed) = store
        .settle_and_claim(settlements, &ClaimRequest::new("w", 10, LEASE), at(2))
        .unwrap();
    assert!(settled.iter().all(Result::is_ok));
    assert_eq!(ids(&claimed), ["k2", "j"]);
}

/// `retry_dead(None)` runs again every dead job that can: of dead jobs sharing a unique key
/// only the newest, none whose key a waiting job holds, and every other dead job.
pub fn retrying_every_dead_job_leaves_those_whose_key_is_taken(h: &dyn Harness) {
    let store = h.store();
    let doomed = |name: &str, key: Option<&str>| {
        let new = job(name).max_retries(1);
        match key {
            Some(key) => new.unique_key(key),
            None => new,
        }
    };
    for (name, key) in [
        ("x1", Some("k")),
        ("x2", Some("k")),
        ("y", None),
        ("z", Some("held")),
    ] {
        store.enqueue(doomed(name, key), at(0)).unwrap();
        let running = claim_one(&*store, at(1));
        store
            .fail(running.lease.as_ref().unwrap(), failed("x"), at(2), at(2))
            .unwrap();
    }
    store.enqueue(keyed("holder", "held"), at(3)).unwrap();
    let retried = store.retry_dead(None, at(4)).unwrap();
    let mut names = ids(&retried);
    names.sort();
    assert_eq!(names, ["x2", "y"]);
    assert_eq!(store.get(&id("x1")).unwrap().state, JobState::Dead);
    assert_eq!(store.get(&id("z")).unwrap().state, JobState::Dead);
}

// ----- statistics -----

/// `activity` returns the attempts that finished at or after `since`, oldest first, with
/// their queue and due time, and the jobs that ended dead or cancelled then.
pub fn activity_reports_what_finished_since(h: &dyn Harness) {
    let store = h.store();
    store
        .enqueue_batch(
            vec![
                in_queue("old", "a"),
                in_queue("a1", "a").max_retries(1),
                job("d1").run_at(at(5)),
                job("gone"),
            ],
            at(0),
        )
        .unwrap();
    let old = claim_one(&*store, at(1));
    store
        .complete(old.lease.as_ref().unwrap(), AttemptReport::default(), at(2))
        .unwrap();
    let a1 = claim_one(&*store, at(10));
    store
        .fail(a1.lease.as_ref().unwrap(), failed("x"), at(11), at(12))
        .unwrap();
    store.cancel(&[id("gone")], at(12)).unwrap();
    let d1 = store.claim("w", 1, LEASE, at(13)).unwrap().remove(0);
    assert_eq!(d1.id.as_str(), "d1");
    store
        .complete(d1.lease.as_ref().unwrap(), AttemptReport::default(), at(14))
        .unwrap();
    let activity = store.activity(at(3)).unwrap();
    let seen: Vec<_> = activity
        .attempts
        .iter()
        .map(|f| {
            let a = &f.attempt;
            (
                f.queue.as_str(),
                f.job.as_str(),
                a.outcome,
                a.due_at,
                a.started_at,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("a", "a1", AttemptOutcome::Failed, Some(at(0)), at(10)),
            (
                "default",
                "d1",
                AttemptOutcome::Succeeded,
                Some(at(5)),
                at(13)
            ),
        ]
    );
    assert!(
        activity.attempts.iter().all(|f| f.attempt.output.is_none()),
        "without output"
    );
    let mut ended = activity.ended.clone();
    ended.sort();
    assert_eq!(
        ended,
        [
            ("a".to_owned(), JobState::Dead),
            ("default".to_owned(), JobState::Cancelled)
        ]
    );
    assert_eq!(store.activity(at(15)).unwrap(), Default::default());
    assert_eq!(store.activity(at(0)).unwrap().attempts.len(), 3);
}

/// The conformance suite for [`crate::MemoryStorage`].
#[cfg(test)]
mod memory {
    use super::*;

    struct Memory(Arc<crate::MemoryStorage>);

    impl Harness for Memory {
        fn store(&self) -> Arc<dyn Storage> {
            self.0.clone()
        }
        fn reopen(&self) -> Option<Arc<dyn Storage>> {
            None
        }
    }

    crate::storage_conformance!(Memory(Arc::new(crate::MemoryStorage::new())));
}
