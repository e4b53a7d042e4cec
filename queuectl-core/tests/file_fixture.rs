//! Stores written by released formats stay loadable, forever.
//!
//! `tests/fixtures/file-v1/` holds a store (snapshot plus journal) written by format version 1.
//! It was generated once by `write_fixture_v1` below and checked in; it must never be
//! regenerated, only added to (a new format gets a new fixture directory and test).

use std::fs;
use std::path::Path;
use std::time::Duration;

use queuectl_core::{
    AttemptReport, FileStorage, JobState, ListQuery, NewJob, Storage, StorageExt, Timestamp,
    WorkerInfo,
};
use time::macros::datetime;

fn at(secs: i64) -> Timestamp {
    datetime!(2026-01-01 00:00:00 UTC) + time::Duration::seconds(secs)
}

const LEASE: Duration = Duration::from_secs(30);

/// Opens a copy of the fixture (opening may repair a store, and must never touch the original).
fn open_fixture(name: &str) -> (tempfile::TempDir, FileStorage) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    for file in ["snapshot", "journal"] {
        fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    let store = FileStorage::open(dir.path()).unwrap();
    (dir, store)
}

#[test]
fn fixture_v1_loads_with_its_contents() {
    let (_dir, store) = open_fixture("file-v1");
    assert!(store.recovery_warnings().is_empty());
    let jobs = store.list(&ListQuery::all()).unwrap();
    let summary: Vec<_> = jobs
        .iter()
        .map(|j| (j.id.as_str(), j.state, j.attempts))
        .collect();
    assert_eq!(
        summary,
        [
            ("done", JobState::Completed, 1),
            ("flaky", JobState::Failed, 1),
            ("doomed", JobState::Dead, 1),
            ("running", JobState::Processing, 1),
            ("later", JobState::Pending, 0),
            ("urgent", JobState::Pending, 0),
            ("after-snapshot", JobState::Pending, 0),
        ]
    );
    let get = |id: &str| store.get(&id.parse().unwrap()).unwrap();

    let done = get("done");
    assert_eq!(done.command, "echo done");
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.output.as_deref(), Some("done\n"));
    assert_eq!(
        (done.created_at, done.started_at, done.finished_at),
        (at(0), Some(at(1)), Some(at(2)))
    );
    assert_eq!(done.timeout, Some(Duration::from_secs(30)));
    assert_eq!(done.max_retries, 3);

    let flaky = get("flaky");
    assert_eq!(flaky.run_at, at(60));
    assert_eq!(flaky.last_error.as_deref(), Some("exit status 1"));
    assert_eq!(flaky.exit_code, Some(1));

    let doomed = get("doomed");
    assert_eq!(doomed.max_retries, 1);
    assert_eq!(doomed.last_error.as_deref(), Some("boom"));

    let running = get("running");
    let lease = running.lease.clone().unwrap();
    assert_eq!(lease.worker, "w1");
    assert_eq!(lease.expires_at, at(4) + LEASE, "extended by a heartbeat");
    assert_eq!(lease.token, 0x41e3_bcdc_eca3_e8d9);

    let later = get("later");
    assert_eq!(later.run_at, at(3600));
    assert_eq!(later.timeout, Some(Duration::from_millis(2500)));
    let urgent = get("urgent");
    assert_eq!(urgent.priority, 10);
    assert_eq!(urgent.timeout, None);
    assert_eq!(get("after-snapshot").max_retries, 5);

    let config = store.config().unwrap();
    assert_eq!(config.max_retries(), 5);
    assert_eq!(config.backoff_base(), 3.0);
    let workers = store.workers().unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(
        (
            workers[0].id.as_str(),
            workers[0].pid,
            workers[0].last_seen,
            workers[0].stop_requested
        ),
        ("w1", 4242, at(4), true)
    );

    // The loaded store works: the lease still fences, and new writes land.
    store
        .complete(&lease, AttemptReport::default(), at(5))
        .unwrap();
    store.enqueue(NewJob::new("true"), at(5)).unwrap();
}

/// Writes a format-1 store to `$QUEUECTL_WRITE_FIXTURE` (a directory); does nothing otherwise.
/// Used once to create `tests/fixtures/file-v1`.
#[test]
fn write_fixture_v1() {
    let Some(out) = std::env::var_os("QUEUECTL_WRITE_FIXTURE") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    let job = |id: &str| NewJob::new(format!("echo {id}")).id(id).unwrap();
    store
        .enqueue_batch(
            vec![
                job("done"),
                job("flaky"),
                job("doomed").max_retries(1),
                job("running"),
                job("later")
                    .run_at(at(3600))
                    .timeout(Duration::from_millis(2500)),
            ],
            at(0),
        )
        .unwrap();
    let claimed = store.claim("w1", 4, LEASE, at(1)).unwrap();
    let lease = |i: usize| claimed[i].lease.clone().unwrap();
    store
        .complete(
            &lease(0),
            AttemptReport {
                exit_code: Some(0),
                output: Some("done\n".into()),
                error: None,
            },
            at(2),
        )
        .unwrap();
    let failed = |error: &str| AttemptReport {
        exit_code: Some(1),
        output: None,
        error: Some(error.into()),
    };
    store
        .fail(&lease(1), failed("exit status 1"), at(60), at(2))
        .unwrap();
    store
        .fail(&lease(2), failed("boom"), at(60), at(2))
        .unwrap();
    store
        .update_config(&mut |c| {
            c.set("backoff-base", "3")?;
            c.set("job-timeout", "0")
        })
        .unwrap();
    store.enqueue(job("urgent").priority(10), at(2)).unwrap();
    store
        .register_worker(WorkerInfo {
            id: "w1".into(),
            hostname: "fixture-host".into(),
            pid: 4242,
            concurrency: 4,
            started_at: at(0),
            last_seen: at(0),
            stop_requested: false,
            stop_forced: false,
            identity: Default::default(),
        })
        .unwrap();
    store.compact().unwrap();

    // After the snapshot: journal records.
    store
        .update_config(&mut |c| c.set("max-retries", "5"))
        .unwrap();
    store.enqueue(job("after-snapshot"), at(3)).unwrap();
    store.heartbeat(&lease(3), LEASE, at(4)).unwrap();
    store.worker_heartbeat("w1", at(4)).unwrap();
    store.request_stop().unwrap();
    println!("running job's lease token: {:#x}", lease(3).token);
    drop(store);

    let out = Path::new(&out);
    fs::create_dir_all(out).unwrap();
    for file in ["snapshot", "journal"] {
        fs::copy(dir.path().join(file), out.join(file)).unwrap();
    }
}
