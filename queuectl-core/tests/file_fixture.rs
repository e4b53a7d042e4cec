//! Stores written by released versions stay loadable, forever (`tests/fixtures/README.md`).

use std::fs;
use std::path::Path;
use std::time::Duration;

use queuectl_core::{
    AttemptOutcome, AttemptReport, FileStorage, JobState, ListQuery, NewJob, Storage, StorageError,
    StorageExt, Timestamp,
};
use time::macros::datetime;

fn at(secs: i64) -> Timestamp {
    datetime!(2026-01-01 00:00:00 UTC) + time::Duration::seconds(secs)
}

const LEASE: Duration = Duration::from_secs(30);

/// A copy of a fixture directory (opening a store may change it; the original must never be).
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn summary(store: &FileStorage) -> Vec<(String, JobState, u32)> {
    store
        .list(&ListQuery::all())
        .unwrap()
        .into_iter()
        .map(|j| (j.id.to_string(), j.state, j.attempts))
        .collect()
}

fn owned(rows: &[(&str, JobState, u32)]) -> Vec<(String, JobState, u32)> {
    rows.iter()
        .map(|&(id, s, n)| (id.to_owned(), s, n))
        .collect()
}

#[test]
fn a_journal_store_of_version_1_is_imported_on_first_open_and_moved_aside() {
    let dir = copy_fixture("file-v1");
    let original: Vec<Vec<u8>> = ["snapshot", "journal"]
        .iter()
        .map(|f| fs::read(dir.path().join(f)).unwrap())
        .collect();
    let store = FileStorage::open(dir.path()).unwrap();
    let report = store.imported().expect("the journal was imported").clone();
    assert_eq!(report.jobs, 7);
    assert_eq!(report.dropped_tail, None);
    assert_eq!(report.moved_to, dir.path().join("imported-v1"));
    // Moved aside, not deleted, byte for byte.
    for (file, bytes) in ["snapshot", "journal"].iter().zip(&original) {
        assert!(!dir.path().join(file).exists(), "{file} still in place");
        assert_eq!(&fs::read(report.moved_to.join(file)).unwrap(), bytes);
    }
    assert_eq!(
        summary(&store),
        owned(&[
            ("done", JobState::Completed, 1),
            ("flaky", JobState::Failed, 1),
            ("doomed", JobState::Dead, 1),
            ("running", JobState::Processing, 1),
            ("later", JobState::Pending, 0),
            ("urgent", JobState::Pending, 0),
            ("after-snapshot", JobState::Pending, 0),
        ])
    );
    let get = |id: &str| store.get(&id.parse().unwrap()).unwrap();
    let done = get("done");
    assert_eq!(done.output.as_deref(), Some("done\n"));
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(
        (done.created_at, done.started_at, done.finished_at),
        (at(0), Some(at(1)), Some(at(2)))
    );
    let history = store.attempts(&"done".parse().unwrap()).unwrap();
    assert_eq!(
        history.len(),
        1,
        "the last attempt's summary became its history"
    );
    assert_eq!(history[0].outcome, AttemptOutcome::Succeeded);
    assert_eq!(history[0].output.as_deref(), Some("done\n"));
    assert_eq!(get("flaky").run_at, at(60));
    assert_eq!(get("doomed").last_error.as_deref(), Some("boom"));
    let lease = get("running").lease.unwrap();
    assert_eq!(lease.token, 0x41e3_bcdc_eca3_e8d9);
    assert_eq!(lease.expires_at, at(4) + LEASE);
    assert_eq!(get("later").timeout, Some(Duration::from_millis(2500)));
    assert_eq!(get("urgent").priority, 10);
    let config = store.config().unwrap();
    assert_eq!((config.max_retries(), config.backoff_base()), (5, 3.0));
    let workers = store.workers().unwrap();
    assert_eq!(
        (
            workers[0].id.as_str(),
            workers[0].pid,
            workers[0].stop_requested
        ),
        ("w1", 4242, true)
    );
    assert_eq!(store.counts().unwrap().total(), 7);

    // The imported store works, and a second open imports nothing again.
    store
        .complete(&lease, AttemptReport::default(), at(5))
        .unwrap();
    drop(store);
    let again = FileStorage::open(dir.path()).unwrap();
    assert!(again.imported().is_none());
    assert_eq!(again.counts().unwrap().completed, 2);
}

#[test]
fn a_damaged_journal_is_refused_and_left_as_it_was() {
    let dir = copy_fixture("file-v1");
    let journal = dir.path().join("journal");
    let mut bytes = fs::read(&journal).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&journal, &bytes).unwrap();
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StorageError::Corrupt { path, .. } if path == &journal),
        "{err}"
    );
    assert!(err.to_string().contains("journal"), "{err}");
    assert_eq!(
        fs::read(&journal).unwrap(),
        bytes,
        "the journal is untouched"
    );
    assert!(dir.path().join("snapshot").exists());
    assert!(!dir.path().join("imported-v1").exists());
}

/// Every table, index and trigger of a database, as SQLite keeps their definitions.
fn schema_of(db: &Path) -> Vec<(String, String, Option<String>)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut statement = conn
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap();
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Until version 1 is released its schema may still change, and the fixture with it: the
/// fixture must have exactly the schema a new store gets (a table missing from it would make
/// the other tests of it fail for the wrong reason, or pass for one).
#[test]
fn schema_v1_fixture_has_the_schema_of_a_new_store() {
    assert_eq!(
        queuectl_core::file::SCHEMA_VERSION,
        1,
        "a new schema version gets a fixture of its own; compare that one here"
    );
    let fixture = copy_fixture("sqlite-v1");
    let new = tempfile::tempdir().unwrap();
    drop(FileStorage::open(new.path()).unwrap());
    let (fixture, new) = (
        schema_of(&fixture.path().join("queuectl.db")),
        schema_of(&new.path().join("queuectl.db")),
    );
    let missing: Vec<_> = new.iter().filter(|item| !fixture.contains(item)).collect();
    let extra: Vec<_> = fixture.iter().filter(|item| !new.contains(item)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the fixture lacks {missing:#?}\nand has {extra:#?}\nunlike a new store \
         (tests/fixtures/README.md says how to change it)"
    );
}

#[test]
fn schema_v1_fixture_opens_with_its_contents() {
    let dir = copy_fixture("sqlite-v1");
    let store = FileStorage::open(dir.path()).unwrap();
    assert!(store.imported().is_none());
    assert_eq!(
        summary(&store),
        owned(&[
            ("done", JobState::Completed, 1),
            ("flaky", JobState::Failed, 1),
            ("doomed", JobState::Dead, 1),
            ("running", JobState::Processing, 1),
            ("later", JobState::Pending, 0),
            ("urgent", JobState::Pending, 0),
            ("report", JobState::Pending, 0),
        ])
    );
    let id = |s: &str| s.parse().unwrap();
    let done = store.get(&id("done")).unwrap();
    assert_eq!(done.output.as_deref(), Some("done\n"));
    assert_eq!(done.finished_at, Some(at(2)));
    let doomed = store.attempts(&id("doomed")).unwrap();
    assert_eq!(
        (doomed[0].outcome, doomed[0].signal, doomed[0].exit_code),
        (AttemptOutcome::Failed, Some(9), None)
    );
    assert_eq!(store.get(&id("flaky")).unwrap().run_at, at(60));
    let later = store.get(&id("later")).unwrap();
    assert_eq!(
        (later.run_at, later.timeout),
        (at(3600), Some(Duration::from_millis(2500)))
    );
    let urgent = store.get(&id("urgent")).unwrap();
    assert_eq!((urgent.priority, urgent.max_retries), (10, 5));
    assert_eq!(
        (urgent.queue.as_str(), urgent.unique_key.as_deref()),
        ("mail", Some("u-1"))
    );
    let report = store.get(&id("report")).unwrap();
    assert_eq!(
        (report.after.clone(), report.blocked),
        (vec![id("running")], true)
    );
    let queues: Vec<_> = store
        .queues()
        .unwrap()
        .into_iter()
        .map(|q| (q.name, q.paused, q.limit, q.counts.total()))
        .collect();
    assert_eq!(
        queues,
        [
            ("bulk".to_owned(), true, 0, 0),
            ("default".to_owned(), false, 0, 6),
            ("mail".to_owned(), false, 2, 1)
        ]
    );
    let running = store.get(&id("running")).unwrap();
    let lease = running.lease.clone().unwrap();
    assert_eq!(lease.token, 0xb637_ddfb_7ec2_3a64);
    assert_eq!(lease.expires_at, at(4) + LEASE);
    let attempts = store.attempts(&id("running")).unwrap();
    assert_eq!(attempts.last().unwrap().outcome, AttemptOutcome::Running);
    let counts = store.counts().unwrap();
    assert_eq!(
        [
            counts.pending,
            counts.processing,
            counts.completed,
            counts.failed,
            counts.dead
        ],
        [3, 1, 1, 1, 1]
    );
    assert_eq!(store.config().unwrap().backoff_base(), 3.0);
    let workers = store.workers().unwrap();
    assert_eq!((workers[0].pid, workers[0].stop_requested), (4242, true));
    assert_eq!(store.next_due(at(0)).unwrap(), Some(at(2)));

    // It works: the lease fences, claims follow priority, dependencies follow, writes land.
    store
        .complete(&lease, AttemptReport::default(), at(5))
        .unwrap();
    assert!(!store.get(&id("report")).unwrap().blocked);
    let next = store.claim("w2", 1, LEASE, at(61)).unwrap();
    assert_eq!(next[0].id.as_str(), "urgent");
    let again = store
        .enqueue(NewJob::new("true").unique_key("u-1"), at(61))
        .unwrap();
    assert_eq!(again.id.as_str(), "urgent");
    store.enqueue(NewJob::new("true"), at(61)).unwrap();
    store.cancel(&[id("later")], at(62)).unwrap();
    assert_eq!(store.counts().unwrap().cancelled, 1);
    assert!(FileStorage::check(dir.path()).unwrap().is_ok());
}
