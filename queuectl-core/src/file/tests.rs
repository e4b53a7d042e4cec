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
    use crate::{NewJob, Storage, now};

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
            (jobs(queries::PAGE_IN_STATE), "jobs_state"),
            (jobs(queries::PAGE_IN_STATE_NEWEST), "jobs_state"),
            (jobs(queries::DEAD), "jobs_state"),
            (queries::SELECT_DEAD.to_owned(), "jobs_state"),
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
        // Claims read the ready index in claim order and stop after `LIMIT` due jobs; a page of
        // every job reads the table in enqueue order and stops after `OFFSET + LIMIT` rows.
        for (sql, scan) in [
            (
                jobs(queries::PICK_READY),
                "SCAN jobs USING INDEX jobs_ready",
            ),
            (jobs(queries::PAGE), "SCAN jobs"),
            (jobs(queries::PAGE_NEWEST), "SCAN jobs"),
        ] {
            assert_eq!(plan(&store, &sql), [scan], "{sql}");
            assert!(sql.contains("LIMIT"));
        }
        // `counts` reads the five rows of its own table.
        assert_eq!(plan(&store, queries::COUNTS), ["SCAN counts"]);
    }
}
