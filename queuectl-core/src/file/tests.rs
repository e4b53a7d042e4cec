//! The conformance suite and white-box tests for `FileStorage`.

use std::sync::Arc;

use tempfile::TempDir;

use super::FileStorage;
use crate::conformance::Harness;
use crate::storage::Storage;

/// One store directory: `store()` is one shared handle, `reopen()` a new one on the same
/// directory, as another process would open it.
struct Files {
    dir: TempDir,
    store: Arc<FileStorage>,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(FileStorage::open(dir.path().join("store")).expect("open"));
        Self { dir, store }
    }
}

impl Harness for Files {
    fn store(&self) -> Arc<dyn Storage> {
        self.store.clone()
    }

    fn reopen(&self) -> Option<Arc<dyn Storage>> {
        let store = FileStorage::open(self.dir.path().join("store")).expect("reopen");
        Some(Arc::new(store))
    }
}

mod conformance {
    crate::storage_conformance!(super::Files::new(), durable);
}

mod plans {
    use super::super::{FileStorage, queries, rows};
    use crate::{NewJob, StorageExt, now};

    /// The query plan of `sql`, one line per step.
    fn plan(store: &FileStorage, sql: &str) -> Vec<String> {
        let conn = store.conn.lock();
        let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let count = statement.parameter_count();
        let args: Vec<i64> = vec![1; count];
        statement
            .query_map(rusqlite::params_from_iter(args), |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn jobs(tail: &str) -> String {
        format!("SELECT {} FROM jobs {tail}", rows::JOB_COLUMNS)
    }

    /// Every hot statement uses an index, never sorts, and scans only where the scan is in
    /// the order wanted and stops at its `LIMIT`.
    #[test]
    fn hot_paths_search_indexes_and_never_sort() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let batch = (0..500)
            .map(|i| NewJob::new("true").priority(i % 3))
            .collect();
        store.enqueue_batch(batch, now()).unwrap();
        store
            .claim("w", 100, std::time::Duration::from_secs(30), now())
            .unwrap();
        let searches = [
            (queries::PROMOTE.to_owned(), "jobs_scheduled"),
            (jobs(queries::BY_ID), "sqlite_autoindex_jobs_1"),
            (jobs(queries::EXPIRED), "jobs_lease_expiry"),
            (jobs(queries::OF_WORKER), "jobs_lease_worker"),
            (jobs(&queries::page(true, false, false)), "jobs_state"),
            (jobs(&queries::page(true, false, true)), "jobs_state"),
            (jobs(&queries::page(false, true, false)), "jobs_queue"),
            (jobs(&queries::page(false, true, true)), "jobs_queue"),
            (jobs(&queries::page(true, true, false)), "jobs_queue"),
            (jobs(&queries::page(true, true, true)), "jobs_queue"),
            (jobs(queries::DEAD), "jobs_state"),
            (jobs(queries::PICK_READY), "jobs_ready"),
            (jobs(queries::UNIQUE_HOLDER), "jobs_unique"),
            (queries::SELECT_PURGEABLE.to_owned(), "jobs_completed"),
            (queries::NEXT_SCHEDULED.to_owned(), "jobs_scheduled"),
            (queries::NEXT_READY.to_owned(), "jobs_ready_at"),
            (
                format!("SELECT * FROM attempts {}", queries::ATTEMPTS_OF),
                "attempts_job",
            ),
            (queries::LAST_OUTPUT.to_owned(), "attempts_job"),
            (queries::FINISHED_COUNT.to_owned(), "attempts_job"),
            (
                queries::LIVE_END.to_owned(),
                "sqlite_autoindex_live_output_1",
            ),
            (
                queries::LIVE_SINCE.to_owned(),
                "sqlite_autoindex_live_output_1",
            ),
            (
                queries::LIVE_FIRST.to_owned(),
                "sqlite_autoindex_live_output_1",
            ),
            (
                queries::LIVE_DROP.to_owned(),
                "sqlite_autoindex_live_output_1",
            ),
            (
                queries::LIVE_END_ATTEMPT.to_owned(),
                "sqlite_autoindex_live_output_1",
            ),
            (
                "UPDATE jobs SET state = 'dead' WHERE seq = ?1".to_owned(),
                "INTEGER PRIMARY KEY",
            ),
        ];
        for (sql, index) in &searches {
            let steps = plan(&store, sql);
            assert_eq!(steps.len(), 1, "{sql}: {steps:?}");
            assert!(
                steps[0].starts_with("SEARCH") && steps[0].contains(index),
                "{sql}: {steps:?}, expected a search of {index}"
            );
        }
        // A page of every job reads the table in enqueue order and stops after
        // `OFFSET + LIMIT` rows.
        for newest in [false, true] {
            let sql = jobs(&queries::page(false, false, newest));
            assert_eq!(plan(&store, &sql), ["SCAN jobs"], "{sql}");
            assert!(sql.contains("LIMIT"));
        }
        // The dependents of a job: its edges, then each job by its key.
        let steps = plan(&store, &jobs(queries::BLOCKED_DEPENDENTS));
        assert!(
            steps
                .iter()
                .any(|s| s.contains("SEARCH dependencies USING PRIMARY KEY"))
                && steps
                    .iter()
                    .all(|s| s.starts_with("SEARCH") || s.starts_with("LIST")),
            "{steps:?}"
        );
        // `counts` and claims read the small tables of counts (rows per queue and state) and
        // queue settings.
        assert_eq!(plan(&store, queries::COUNTS), ["SCAN counts"]);
        assert_eq!(plan(&store, queries::QUEUE_SETTINGS), ["SCAN queues"]);
    }
}

mod counts {
    use super::super::FileStorage;
    use crate::{JobState, NewJob, Storage, StorageExt, now};

    /// `check` compares the kept counts with the jobs, per queue and state, both ways: a count
    /// too high, and jobs no count row covers.
    #[test]
    fn check_finds_counts_out_of_step_per_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let jobs = vec![NewJob::new("a").queue("mail"), NewJob::new("b")];
        store.enqueue_batch(jobs, now()).unwrap();
        assert!(FileStorage::check(dir.path()).unwrap().is_ok());
        assert_eq!(store.counts().unwrap().get(JobState::Pending), 2);
        {
            let conn = store.conn.lock();
            conn.execute_batch(
                "UPDATE counts SET jobs = jobs + 1 WHERE queue = 'mail'; \
                 DELETE FROM counts WHERE queue = 'default';",
            )
            .unwrap();
        }
        let report = FileStorage::check(dir.path()).unwrap();
        assert_eq!(
            report.problems,
            [
                "the count of pending jobs in queue default is off by -1 (the status summary \
                 would be wrong)",
                "the count of pending jobs in queue mail is off by 1 (the status summary would \
                 be wrong)"
            ]
        );
    }
}

/// Another handle's commits that give no worker anything to do (a claim, a lease extended,
/// output, a completion with a claim, a worker registering or beating) leave the work
/// count an idle pool waits on alone; a new job, a worker leaving, a retry, a job handed back
/// and a completion that frees room in a limited queue end a wait for work.
#[test]
fn only_commits_that_may_give_work_end_a_wait_for_work() {
    use crate::conformance::worker_info;
    use crate::job::{NewJob, now};
    use crate::storage::{ClaimRequest, OutputChunk, QueueChange, Settlement, StorageExt};
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(10);
    const LEASE: Duration = Duration::from_secs(30);
    let files = Files::new();
    // It never looks again on its own within a wait: only a wake-up ends one.
    let options = super::FileOptions {
        poll_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let watcher = FileStorage::open_with(files.dir.path().join("store"), options).unwrap();
    let other = &files.store;
    let claim = |queue: &str| {
        let request = ClaimRequest::new("w", 1, LEASE).queues([queue]);
        let mut claimed = other.claim_jobs(&request, now()).unwrap();
        claimed.pop().expect("a job to claim").lease.unwrap()
    };
    // Settles as a busy worker does: with a claim (from a queue with nothing).
    let settle = |settlement: Settlement| {
        let request = ClaimRequest::new("w", 1, LEASE).queues(["nothing"]);
        other
            .settle_and_claim(vec![settlement], &request, now())
            .unwrap();
    };
    // Runs `op` on the other handle and waits until the watcher has counted its wake file
    // (written after the work file, when there is one): the work file was not written.
    let quietly = |what: &str, op: &dyn Fn()| {
        let any = watcher.notifier.generation().expect("inotify here");
        let work = watcher.notifier.work_generation();
        op();
        let deadline = Instant::now() + WAIT;
        while watcher.notifier.generation() == Some(any) {
            assert!(Instant::now() < deadline, "{what}: no wake-up came");
            watcher.notifier.wait(Some(any), WAIT);
        }
        assert_eq!(
            watcher.notifier.work_generation(),
            work,
            "{what}: woke idle workers"
        );
    };
    // Work is counted, and the work file written: a waiting idle worker wakes.
    let gives_work = |what: &str, op: &dyn Fn()| {
        let seen = watcher.change_version().unwrap();
        let work = watcher.notifier.work_generation().expect("inotify here");
        op();
        assert_ne!(watcher.wait_for_work(seen, WAIT).unwrap(), seen, "{what}");
        let deadline = Instant::now() + WAIT;
        while watcher.notifier.work_generation() == Some(work) {
            assert!(Instant::now() < deadline, "{what}: no work wake-up came");
            watcher.notifier.wait_work(Some(work), WAIT);
        }
    };

    gives_work("a new job", &|| {
        other
            .enqueue(NewJob::new("a").id("a").unwrap(), now())
            .unwrap();
    });
    let seen = watcher.change_version().unwrap();
    let lease = std::cell::RefCell::new(None);
    quietly("a claim", &|| *lease.borrow_mut() = Some(claim("default")));
    let lease = lease.into_inner().unwrap();
    quietly("a lease extended", &|| {
        other
            .extend_leases(std::slice::from_ref(&lease), LEASE, now())
            .unwrap();
    });
    quietly("output", &|| {
        let chunk = OutputChunk {
            lease: lease.clone(),
            offset: 0,
            text: "out".into(),
        };
        other.record_output(&[chunk]).unwrap();
    });
    quietly("a completion", &|| {
        settle(Settlement::Complete {
            lease: lease.clone(),
            report: Default::default(),
        });
    });
    quietly("a worker registered", &|| {
        other.register_worker(worker_info("x")).unwrap()
    });
    quietly("a heartbeat", &|| {
        other.worker_heartbeat("x", now()).unwrap();
    });
    let now_version = watcher.change_version().unwrap();
    assert_ne!(now_version, seen, "each of them changed the store");
    assert_eq!(now_version >> 32, seen >> 32, "none of them was work");
    assert_eq!(watcher.wait_for_work(seen, Duration::ZERO).unwrap(), seen);
    gives_work(
        "a worker gone: its own waker sees its pool closing",
        &|| {
            other.deregister_worker("x").unwrap();
        },
    );

    other
        .enqueue(NewJob::new("b").id("b").unwrap().max_retries(2), now())
        .unwrap();
    let lease = claim("default");
    gives_work("a failure to retry", &|| {
        settle(Settlement::Fail {
            lease: lease.clone(),
            report: Default::default(),
            retry_at: now() + Duration::from_secs(60),
        });
    });
    other
        .enqueue(NewJob::new("c").id("c").unwrap(), now())
        .unwrap();
    let lease = claim("default");
    gives_work("a job handed back", &|| {
        settle(Settlement::Release {
            lease: lease.clone(),
        });
    });
    let limited = ["limited".to_owned()];
    other
        .change_queues(Some(&limited), QueueChange::Limit(1))
        .unwrap();
    for id in ["l1", "l2"] {
        let job = NewJob::new(id).id(id).unwrap().queue("limited");
        other.enqueue(job, now()).unwrap();
    }
    let lease = claim("limited");
    gives_work("room made in a limited queue", &|| {
        settle(Settlement::Complete {
            lease: lease.clone(),
            report: Default::default(),
        });
    });
}

/// The watching thread of a handle that waits for work only (an idle worker's) is not woken
/// by commits that give none: it watches the work file, not the wake file, until someone on
/// the handle waits for any change.
#[test]
fn a_handle_waiting_for_work_only_sleeps_through_quiet_commits() {
    use crate::conformance::worker_info;
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(10);
    let files = Files::new();
    let idle = FileStorage::open(files.dir.path().join("store")).unwrap();
    let observer = FileStorage::open(files.dir.path().join("store")).unwrap();
    let busy = &files.store;
    let work = idle.notifier.work_generation().expect("inotify here");
    let woke = idle.notifier.wake_ups();
    for i in 0..20 {
        // Quiet commits, each seen by a handle that watches everything.
        let seen = observer.notifier.generation().unwrap();
        busy.register_worker(worker_info(&format!("w{i}"))).unwrap();
        let deadline = Instant::now() + WAIT;
        while observer.notifier.generation() == Some(seen) {
            assert!(Instant::now() < deadline, "no wake-up came");
            observer.notifier.wait(Some(seen), WAIT);
        }
    }
    busy.request_stop().unwrap();
    let deadline = Instant::now() + WAIT;
    while idle.notifier.work_generation() == Some(work) {
        assert!(Instant::now() < deadline, "the work wake-up never came");
        idle.notifier.wait_work(Some(work), WAIT);
    }
    // The watching thread counts a wake-up just after the work it saw.
    let works = idle.notifier.work_generation().unwrap() - work;
    let deadline = Instant::now() + WAIT;
    while idle.notifier.wake_ups() - woke < works {
        assert!(Instant::now() < deadline, "the wake-up was not counted");
        idle.notifier
            .wait(Some(idle.notifier.wake_ups()), Duration::from_millis(10));
    }
    assert_eq!(idle.notifier.wake_ups() - woke, works, "woken by work only");
}

/// A wake file deleted and made anew (by the next handle to open the store) keeps waking the
/// handles that were already watching: the watch follows the name, not the old file.
#[test]
fn wake_files_made_anew_still_wake_the_handles_watching() {
    use crate::job::{NewJob, now};
    use crate::storage::StorageExt;
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(10);
    let files = Files::new();
    let dir = files.dir.path().join("store");
    let watcher = &files.store;
    let work = watcher.notifier.work_generation().expect("inotify here");
    // It waits for work and for any change: it watches both files.
    watcher.notifier.generation().expect("inotify here");
    for name in [super::watch::WAKE_FILE, super::watch::WORK_FILE] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let newcomer = FileStorage::open(&dir).unwrap();
    // The files' deletion and making anew wake everyone; seen, they move nothing any more.
    let deadline = Instant::now() + WAIT;
    while watcher.notifier.work_generation() == Some(work) {
        assert!(
            Instant::now() < deadline,
            "the files made anew were not seen"
        );
        watcher.notifier.wait_work(Some(work), WAIT);
    }
    let (work, any) = (
        watcher.notifier.work_generation().unwrap(),
        watcher.notifier.generation().unwrap(),
    );
    // Until the watcher has seen the files made anew, a write may still go unseen: try a few.
    let woke = |generation: &dyn Fn() -> Option<u64>, before: u64| {
        (0..5).any(|i| {
            let at = generation().unwrap();
            newcomer
                .enqueue(NewJob::new("x").id(format!("j{i}-{at}")).unwrap(), now())
                .unwrap();
            let deadline = Instant::now() + WAIT / 5;
            while generation() == Some(at) && Instant::now() < deadline {
                watcher
                    .notifier
                    .wait_work(Some(at), deadline - Instant::now());
            }
            generation() != Some(at) && generation().unwrap() > before
        })
    };
    assert!(woke(&|| watcher.notifier.work_generation(), work), "work");
    assert!(woke(&|| watcher.notifier.generation(), any), "any change");
}
