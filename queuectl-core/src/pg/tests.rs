//! The conformance suite and white-box tests for `PgStorage`.
//!
//! They need a PostgreSQL server: `QUEUECTL_TEST_DATABASE_URL` names a database where the
//! tests may create schemas (`.ci/run` sets it). Each case works in a fresh schema with a
//! random name, dropped at its end. Without the variable every test says it skips and returns.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::{PG_SCHEMA_VERSION, PgOptions, PgStorage, SchemaCheck};
use crate::conformance::Harness;
use crate::storage::Storage;
use crate::{NewJob, QueueChange, StorageExt, now};

/// The test database's URL, or `None` (having said that the test skips).
fn database_url() -> Option<String> {
    let url = std::env::var("QUEUECTL_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty());
    if url.is_none() {
        eprintln!("skipping: QUEUECTL_TEST_DATABASE_URL is not set");
    }
    url
}

/// A fresh schema: `store()` is one shared handle, `reopen()` a new one on the same schema,
/// as another process would connect. The schema is dropped when the case ends.
struct Pg {
    url: String,
    schema: String,
    store: Option<Arc<PgStorage>>,
}

impl Pg {
    fn new() -> Self {
        Self::with(PgOptions::default())
    }

    /// A fresh schema name, with nothing made in the database yet.
    fn unopened() -> Self {
        Self {
            url: database_url().expect("the guard checked QUEUECTL_TEST_DATABASE_URL"),
            schema: format!("queuectl_test_{:016x}", crate::job::random_u64()),
            store: None,
        }
    }

    fn with(options: PgOptions) -> Self {
        let url = database_url().expect("the guard checked QUEUECTL_TEST_DATABASE_URL");
        let schema = format!("queuectl_test_{:016x}", crate::job::random_u64());
        let mut pg = Self {
            url,
            schema,
            store: None,
        };
        pg.store = Some(Arc::new(pg.connect(options)));
        pg
    }

    fn connect(&self, options: PgOptions) -> PgStorage {
        let options = PgOptions {
            schema: self.schema.clone(),
            ..options
        };
        PgStorage::connect(&self.url, options).expect("connect to the test database")
    }

    fn pg(&self) -> &PgStorage {
        self.store.as_ref().expect("open until dropped")
    }

    /// A plain connection to the test database.
    fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("connect to the test database")
    }

    /// The number a query of one `bigint` gives, `{s}` in it standing for the schema.
    fn count(&self, template: &str) -> i64 {
        let sql = template.replace("{s}", &format!("\"{}\"", self.schema));
        self.client().query_one(&sql, &[]).unwrap().get(0)
    }
}

impl Harness for Pg {
    fn store(&self) -> Arc<dyn Storage> {
        self.store.clone().expect("open until dropped")
    }

    /// As a one-shot command connects: the schema is checked with the first operation.
    fn reopen(&self) -> Option<Arc<dyn Storage>> {
        Some(Arc::new(self.connect(PgOptions {
            schema_check: SchemaCheck::WithFirstUse,
            ..PgOptions::default()
        })))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.store.take();
        // Bounded: a case that failed may have left a connection holding locks.
        let dropped = self.client().batch_execute(&format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ));
        if let Err(e) = dropped {
            eprintln!("could not drop the test schema {}: {e}", self.schema);
        }
    }
}

mod conformance {
    crate::storage_conformance!(
        super::Pg::new(),
        durable,
        guard = super::database_url().is_some()
    );
}

const LEASE: Duration = Duration::from_secs(30);

/// The version of a store that counted `work` changes that give work among `changes` in all.
fn version_of(work: u64, changes: u64) -> u64 {
    (work << 32) + changes
}

/// Concurrent claims by separate handles never run more jobs of a limited queue than its
/// limit, however they interleave (each round starts them together).
#[test]
fn queue_limits_hold_under_concurrent_claims() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let store = pg.pg();
    let batch = (0..60).map(|_| NewJob::new("true").queue("a")).collect();
    store.enqueue_batch(batch, now()).unwrap();
    store
        .change_queues(Some(&["a".to_owned()]), QueueChange::Limit(2))
        .unwrap();
    for round in 0..5 {
        let claimed: usize = crate::conformance::race(&pg, 4, |t, store| {
            store
                .claim(&format!("w{t}"), 5, LEASE, now())
                .unwrap()
                .len()
        })
        .into_iter()
        .sum();
        assert_eq!(claimed, 2, "round {round}: the limit is 2");
        let running = store
            .list(&crate::ListQuery::state(crate::JobState::Processing))
            .unwrap();
        for job in running {
            store
                .complete(job.lease.as_ref().unwrap(), Default::default(), now())
                .unwrap();
        }
    }
}

/// A waiter in one handle wakes on another handle's commit through the notification, long
/// before its poll would have looked.
#[test]
fn waiters_wake_on_notifications_not_the_poll() {
    if database_url().is_none() {
        return;
    }
    let slow_poll = PgOptions {
        poll_interval: Duration::from_secs(60),
        ..PgOptions::default()
    };
    let pg = Pg::with(slow_poll.clone());
    let waiter = pg.pg();
    let writer = pg.connect(PgOptions::default());
    let seen = waiter.change_version().unwrap();
    let started = Instant::now();
    let thread = std::thread::spawn(move || {
        writer.enqueue(NewJob::new("true"), now()).unwrap();
    });
    let version = waiter
        .wait_for_change(seen, Duration::from_secs(20))
        .unwrap();
    thread.join().unwrap();
    assert_ne!(version, seen, "the waiter saw the change");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the poll, not the notification: {:?}",
        started.elapsed()
    );
}

/// Without notifications (through a pooler in transaction mode), waiters still see changes,
/// by polling.
#[test]
fn poll_only_waiters_see_changes() {
    if database_url().is_none() {
        return;
    }
    let poll_only = PgOptions {
        listen: false,
        poll_interval: Duration::from_millis(50),
        ..PgOptions::default()
    };
    let pg = Pg::with(poll_only);
    let waiter = pg.pg();
    let writer = pg.connect(PgOptions::default());
    let seen = waiter.change_version().unwrap();
    writer.enqueue(NewJob::new("true"), now()).unwrap();
    let version = waiter
        .wait_for_change(seen, Duration::from_secs(20))
        .unwrap();
    assert_ne!(version, seen);
}

/// Handles connecting to a new schema at once all succeed: the migration runs once, under its
/// lock, and the others find it done.
#[test]
fn concurrent_connects_migrate_once() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    // A second, new schema, which the racing handles create.
    let fresh = format!("{}_b", pg.schema);
    let url = pg.url.clone();
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (url, fresh, barrier) = (url.clone(), fresh.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let options = PgOptions {
                    schema: fresh,
                    ..PgOptions::default()
                };
                PgStorage::connect(&url, options).map(drop)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut client = pg.client();
    let version: i32 = client
        .query_one(
            &format!("SELECT version FROM \"{fresh}\".schema_version"),
            &[],
        )
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!("DROP SCHEMA \"{fresh}\" CASCADE"))
        .unwrap();
    for result in results {
        result.expect("every concurrent connect succeeds");
    }
    assert_eq!(version, super::PG_SCHEMA_VERSION as i32);
}

/// Reads survive the loss of every pooled connection (the server ended them): they are run
/// again on new ones.
#[test]
fn reads_retry_after_lost_connections() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let store = pg.pg();
    let job = store.enqueue(NewJob::new("true"), now()).unwrap();
    end_the_pooled_backend(&pg, store);
    assert_eq!(store.get(&job.id).unwrap(), job);
    store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(store.counts().unwrap().pending, 2);
}

/// An error names what was being done and the database without its password, and says why
/// in words.
#[test]
fn errors_name_the_database_without_its_password() {
    let options = PgOptions {
        connect_timeout: Duration::from_secs(2),
        ..PgOptions::default()
    };
    // Nothing listens on port 1.
    let error = PgStorage::connect("postgres://someone:secret@127.0.0.1:1/queues", options)
        .expect_err("nothing to connect to");
    let message = error.to_string();
    assert!(
        message.contains("postgres://someone@127.0.0.1:1/queues (schema queuectl)")
            && message.contains("cannot be reached")
            && !message.contains("secret"),
        "{message}"
    );
}

/// A database that does not exist and a user the server does not let in are told apart,
/// each with what to check.
#[test]
fn a_missing_database_and_a_refused_login_say_which() {
    let Some(url) = database_url() else { return };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let Some(tokio_postgres::config::Host::Tcp(host)) = config.get_hosts().first() else {
        println!("skipping: the test server is not reached over TCP");
        return;
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let fault = |url: String| match PgStorage::connect(&url, PgOptions::default()) {
        Err(crate::StorageError::Postgres { fault, .. }) => fault,
        other => panic!("{url}: {other:?}"),
    };
    let nosuch = format!("queuectl_nosuch_{:08x}", crate::job::random_u64() as u32);
    assert_eq!(
        fault(format!("postgres://{user}@{host}:{port}/{nosuch}")),
        crate::DatabaseFault::NoDatabase
    );
    assert_eq!(
        fault(format!("postgres://{nosuch}@{host}:{port}/postgres")),
        crate::DatabaseFault::LoginRefused
    );
}

mod plans {
    use super::super::{queries, rows};
    use super::*;

    /// The plan PostgreSQL chooses for `sql` (with `{s}` and `J` filled in) with `params`.
    fn plan(
        client: &mut Client,
        schema: &str,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> String {
        let sql = sql
            .replace(" J ", &format!(" {} ", rows::JOB_COLUMNS))
            .replace("{s}", &format!("\"{schema}\""));
        client
            .query(&format!("EXPLAIN {sql}"), params)
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The generic plan (the session's `plan_cache_mode` forcing it) of `sql`, prepared as
    /// `name` and run with `args` (SQL literals).
    fn generic_plan(
        client: &mut Client,
        schema: &str,
        name: &str,
        sql: &str,
        args: &str,
    ) -> String {
        let sql = sql
            .replace(" J ", &format!(" {} ", rows::JOB_COLUMNS))
            .replace("{s}", &format!("\"{schema}\""));
        client
            .batch_execute(&format!("PREPARE {name} AS {sql}"))
            .unwrap();
        let explained = client
            .simple_query(&format!("EXPLAIN EXECUTE {name}({args})"))
            .unwrap();
        first_column(explained).join("\n")
    }

    fn jobs(tail: &str) -> String {
        format!("SELECT {} FROM {{s}}.jobs {tail}", rows::JOB_COLUMNS)
    }

    /// The hot statements read an index. The table holds 20,000 jobs (statistics gathered),
    /// enough that the planner would scan it whole if no index served: the plans are the
    /// ones PostgreSQL chooses on its own, not forced with `enable_seqscan = off`.
    #[test]
    fn hot_paths_use_indexes() {
        if database_url().is_none() {
            return;
        }
        let pg = Pg::new();
        let store = pg.pg();
        let at = now();
        for chunk in 0..4 {
            let batch = (0..5_000)
                .map(|i| {
                    NewJob::new("true")
                        .priority(i % 3)
                        .queue(if i % 2 == 0 { "a" } else { "b" })
                        .unique_key(format!("k{chunk}-{i}"))
                })
                .collect();
            store.enqueue_batch(batch, at).unwrap();
        }
        let rare = (0..10).map(|_| NewJob::new("true").queue("rare")).collect();
        store.enqueue_batch(rare, at).unwrap();
        let claimed = store.claim("w", 100, LEASE, at).unwrap();
        let mut client = pg.client();
        client
            .batch_execute(&format!("ANALYZE \"{}\".jobs", pg.schema))
            .unwrap();
        let s = pg.schema.as_str();
        let us = crate::file::rows::micros(at);
        let queues = vec!["a".to_owned(), "b".to_owned()];
        let rooms = vec![10i64, 10];
        let id = claimed[0].id.as_str();
        let ids = vec![claimed[0].id.as_str(), claimed[1].id.as_str()];
        let limit = Some(50i64);
        let offset = 0i64;
        let none: Option<&str> = None;
        let cases: Vec<(String, Vec<&(dyn postgres::types::ToSql + Sync)>, &str)> = vec![
            (
                queries::PICK_READY.to_owned(),
                vec![&queues, &rooms, &us],
                "jobs_ready",
            ),
            (
                queries::PICK_READY_IN.to_owned(),
                vec![&"a", &rooms[0], &us],
                "jobs_ready",
            ),
            (jobs(queries::BY_ID), vec![&id], "jobs_id_key"),
            (jobs(queries::BY_ID_FOR_UPDATE), vec![&id], "jobs_id_key"),
            (
                queries::HAS_DEPENDENTS_BY_ID.to_owned(),
                vec![&id],
                "jobs_id_key",
            ),
            (jobs(queries::BY_IDS_FOR_UPDATE), vec![&ids], "jobs_id_key"),
            (
                queries::HAVE_DEPENDENTS_BY_IDS.to_owned(),
                vec![&ids],
                "jobs_id_key",
            ),
            (jobs(queries::UNIQUE_HOLDER), vec![&"k1-7"], "jobs_unique"),
            (
                jobs(&queries::page(false, false, true)),
                vec![&none, &none, &limit, &offset],
                "jobs_pkey",
            ),
            (
                jobs(&queries::page(true, false, false)),
                vec![&"dead", &none, &limit, &offset],
                "jobs_state",
            ),
            (
                jobs(&queries::page(false, true, false)),
                vec![&none, &"rare", &limit, &offset],
                "jobs_queue",
            ),
            (jobs(queries::EXPIRED), vec![&us], "jobs_lease_expiry"),
            (jobs(queries::OF_WORKER), vec![&"w"], "jobs_lease_expiry"),
            (
                queries::PROMOTE.to_owned(),
                vec![&us, &0i32, &"channel"],
                "jobs_scheduled",
            ),
            (queries::NEXT_DUE.to_owned(), vec![&us], "jobs_scheduled"),
        ];
        for (sql, params, index) in &cases {
            let plan = plan(&mut client, s, sql, params);
            assert_scans(sql, &plan, index);
        }
        // The statements of one value are there to be planned once, generically: those plans
        // read the index too.
        let seq = claimed[0].seq;
        let generic = [
            (
                jobs(queries::BY_ID_FOR_UPDATE),
                format!("'{id}'"),
                "jobs_id_key",
            ),
            (
                queries::HAS_DEPENDENTS_BY_ID.to_owned(),
                format!("'{id}'"),
                "jobs_id_key",
            ),
            (
                queries::PICK_READY_IN.to_owned(),
                format!("'a', 10, {us}"),
                "jobs_ready",
            ),
            (
                "UPDATE {s}.jobs SET state = $2::text WHERE seq = $1".to_owned(),
                format!("{seq}, 'completed'"),
                "jobs_pkey",
            ),
        ];
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .unwrap();
        for (i, (sql, args, index)) in generic.iter().enumerate() {
            let plan = generic_plan(&mut client, s, &format!("generic{i}"), sql, args);
            assert_scans(sql, &plan, index);
        }
    }

    /// Claims read the claim-order index even where the table has no statistics yet (a new
    /// queue, or a burst of jobs before autovacuum's `ANALYZE`): a plan that read every due
    /// job through `jobs_ready_at` and sorted them would make a drain quadratic. Both the
    /// plans made for the values given and the generic ones.
    #[test]
    fn claims_read_the_claim_order_index_before_statistics_exist() {
        if database_url().is_none() {
            return;
        }
        let (pg, mut client, at) = without_statistics(1_000);
        let s = pg.schema.as_str();
        let us = crate::file::rows::micros(at);
        let (queues, rooms) = (vec!["default".to_owned()], vec![1i64]);
        let cases: [(&str, Vec<&(dyn postgres::types::ToSql + Sync)>, String); 2] = [
            (
                queries::PICK_READY,
                vec![&queues, &rooms, &us],
                format!("'{{default}}', '{{1}}', {us}"),
            ),
            (
                queries::PICK_READY_IN,
                vec![&"default", &rooms[0], &us],
                format!("'default', 1, {us}"),
            ),
        ];
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .unwrap();
        for (i, (sql, params, args)) in cases.iter().enumerate() {
            assert_scans(sql, &plan(&mut client, s, sql, params), "jobs_ready");
            let generic = generic_plan(&mut client, s, &format!("fresh{i}"), sql, args);
            assert_scans(sql, &generic, "jobs_ready");
        }
    }

    /// A batch of jobs changed in one statement (a claim's, a settlement's) is found through
    /// the key even where the table has no statistics yet: joined on the column arrays alone,
    /// the planner scanned and hashed the whole table for every batch of a drain.
    #[test]
    fn batch_updates_read_the_key_before_statistics_exist() {
        if database_url().is_none() {
            return;
        }
        let (pg, mut client, _) = without_statistics(2_000);
        let s = pg.schema.as_str();
        let sql = rows::update_many_sql_of(&["state", "lane"]);
        let seqs: Vec<i64> = (100..109).collect();
        let states: Vec<String> = seqs.iter().map(|_| "processing".to_owned()).collect();
        let lanes: Vec<Option<i32>> = seqs.iter().map(|_| None).collect();
        assert_scans(
            &sql,
            &plan(&mut client, s, &sql, &[&seqs, &states, &lanes]),
            "jobs_pkey",
        );
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .unwrap();
        let args = "'{100,101}', '{processing,processing}', '{NULL,NULL}'";
        let generic = generic_plan(&mut client, s, "batch", &sql, args);
        assert_scans(&sql, &generic, "jobs_pkey");
    }

    /// A new schema holding `jobs` pending jobs, enqueued at the time returned, with no
    /// statistics gathered yet, and a client on its server.
    fn without_statistics(jobs: usize) -> (Pg, Client, crate::Timestamp) {
        let pg = Pg::new();
        let at = now();
        let batch = (0..jobs).map(|_| NewJob::new("true")).collect();
        pg.pg().enqueue_batch(batch, at).unwrap();
        let client = pg.client();
        (pg, client, at)
    }

    fn assert_scans(sql: &str, plan: &str, index: &str) {
        assert!(
            (plan.contains(&format!("using {index} ")) || plan.contains(&format!("on {index} ")))
                && !plan.contains("Seq Scan on jobs"),
            "{sql}\nexpected a scan of {index}:\n{plan}"
        );
    }
}

/// A worker on another machine (another host name: its pid means nothing here) that holds a
/// job and goes silent loses it when its lease runs out: a worker here runs it, and the
/// abandoned attempt stays in the history.
#[test]
fn a_silent_worker_on_another_host_loses_its_job_when_the_lease_runs_out() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.store();
    store
        .enqueue(NewJob::new("x").id("far").unwrap(), now())
        .unwrap();
    store
        .register_worker(crate::WorkerInfo {
            id: "elsewhere-1".into(),
            hostname: "another-host".into(),
            pid: std::process::id(),
            concurrency: 1,
            started_at: now(),
            last_seen: now(),
            stop_requested: false,
            stop_forced: false,
            identity: Default::default(),
            queues: Vec::new(),
        })
        .unwrap();
    let held = store
        .claim("elsewhere-1", 1, Duration::from_millis(300), now())
        .unwrap();
    assert_eq!(held.len(), 1);
    let (tx, ran) = crossbeam_channel::unbounded();
    let executor = crate::FnExecutor::new(move |job: &crate::Job| {
        let _ = tx.send(job.id.to_string());
        Ok(())
    });
    let pool = crate::WorkerPool::builder(pg.reopen().unwrap(), Arc::new(executor))
        .recovery_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    // The worker's pid is this process, alive: only the lease can free the job.
    assert_eq!(
        ran.recv_timeout(Duration::from_secs(10)).unwrap(),
        "far",
        "run here once the lease ran out"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get(&"far".parse().unwrap()).unwrap().state != crate::JobState::Completed {
        assert!(Instant::now() < deadline, "the job never completed");
        store
            .wait_for_change(store.change_version().unwrap(), Duration::from_millis(200))
            .unwrap();
    }
    pool.shutdown().unwrap();
    let history = store.attempts(&"far".parse().unwrap()).unwrap();
    let outcomes: Vec<_> = history.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [
            crate::AttemptOutcome::Abandoned,
            crate::AttemptOutcome::Succeeded
        ]
    );
    assert_eq!(history[0].worker, "elsewhere-1");
}

/// A batch enqueued through a handle is built with the settings its previous batch read, and
/// reads them again in its insert's round trip: settings changed through another handle in
/// between apply to it all the same.
#[test]
fn a_batch_uses_settings_changed_since_the_handles_last_batch() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.pg();
    let batch = || vec![NewJob::new("x"), NewJob::new("x")];
    let first = store.enqueue_batch(batch(), now()).unwrap();
    assert!(first.iter().all(|job| job.max_retries == 3));
    let other = pg.reopen().unwrap();
    other
        .update_config(&mut |config| config.set("max-retries", "7"))
        .unwrap();
    let second = store.enqueue_batch(batch(), now()).unwrap();
    assert!(second.iter().all(|job| job.max_retries == 7), "{second:?}");
    for job in &second {
        assert_eq!(store.get(&job.id).unwrap().max_retries, 7);
    }
    let third = store.enqueue_batch(batch(), now()).unwrap();
    assert!(third.iter().all(|job| job.max_retries == 7));
}

/// A handle writes concurrently with two pooled connections or more, not with one: a
/// settlement beside a claim would wait for the claim's connection.
#[test]
fn a_handle_of_one_connection_does_not_write_concurrently() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    assert!(pg.pg().writes_concurrently(), "the default pool has 4");
    let single = pg.connect(PgOptions {
        pool_size: 1,
        ..PgOptions::default()
    });
    assert!(!single.writes_concurrently());
}

/// A pool on PostgreSQL records finished jobs on its settling thread while it claims for the
/// slots they free (`Storage::writes_concurrently`), each in a transaction of its own. With
/// `attempts` locked by another transaction, the settlement waits: the next jobs are claimed
/// and run all the same, and their leases are renewed while it waits. Once the lock goes,
/// every job completes, each once.
#[test]
fn a_pool_claims_and_runs_while_its_settlement_waits_for_a_lock() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.store();
    let wave = |name: &str, priority: i32| -> Vec<NewJob> {
        (0..4)
            .map(|i| {
                let job = NewJob::new("x").id(format!("{name}{i}")).unwrap();
                job.priority(priority)
            })
            .collect()
    };
    store.enqueue_batch(wave("first", 1), now()).unwrap();
    store.enqueue_batch(wave("second", 0), now()).unwrap();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let executor = crate::FnExecutor::new(move |job: &crate::Job| {
        let _ = started_tx.send(job.id.to_string());
        if job.id.as_str().starts_with("first") {
            // Until the test drops its end.
            let _ = gate_rx.recv_timeout(Duration::from_secs(30));
        }
        Ok(())
    });
    let pool = crate::WorkerPool::builder(pg.reopen().unwrap(), Arc::new(executor))
        .workers(4)
        .lease(Duration::from_secs(600))
        .heartbeat_interval(Duration::from_millis(100))
        .exit_when_idle(true)
        .timings(crate::Timings {
            settle_beside_claim_from: 1,
            ..Default::default()
        })
        .start()
        .unwrap();
    for _ in 0..4 {
        let id = started.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            id.starts_with("first"),
            "{id} started before the first wave"
        );
    }
    // A settlement records attempts; claims and lease renewals do not.
    let mut client = pg.client();
    let mut lock = client.transaction().unwrap();
    let attempts = format!("LOCK TABLE \"{}\".attempts IN SHARE MODE", pg.schema);
    lock.batch_execute(&attempts).unwrap();
    drop(gate);
    let second = loop {
        let id = started
            .recv_timeout(Duration::from_secs(10))
            .expect("a job of the second wave starts while the settlement waits");
        if id.starts_with("second") {
            break id;
        }
    };
    let lease = |id: &str| {
        let job = store.get(&id.parse().unwrap()).unwrap();
        job.lease.expect("leased").expires_at
    };
    let claimed_until = lease(&second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lease(&second) <= claimed_until {
        assert!(
            Instant::now() < deadline,
            "the lease of {second} was not renewed while the settlement waited"
        );
        store
            .wait_for_change(store.change_version().unwrap(), Duration::from_millis(200))
            .unwrap();
    }
    let states: Vec<_> = (0..4)
        .map(|i| {
            store
                .get(&format!("first{i}").parse().unwrap())
                .unwrap()
                .state
        })
        .collect();
    assert!(
        states
            .iter()
            .all(|state| *state == crate::JobState::Processing),
        "a first-wave job was settled through the lock: {states:?}"
    );
    lock.rollback().unwrap();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || done_tx.send(pool.join()));
    let summary = done
        .recv_timeout(Duration::from_secs(30))
        .expect("the pool ends once the queue is empty")
        .unwrap();
    assert_eq!(summary.completed, 8);
    for name in ["first", "second"] {
        for i in 0..4 {
            let job = store.get(&format!("{name}{i}").parse().unwrap()).unwrap();
            assert_eq!((job.state, job.attempts), (crate::JobState::Completed, 1));
        }
    }
}

/// `sslmode=require` in the URL makes every connection (the pool's and the listener's)
/// encrypted; without it they are plain.
#[test]
fn sslmode_require_encrypts_every_connection() {
    let Some(url) = database_url() else { return };
    let mut client = Client::connect(&url, NoTls).unwrap();
    let ssl: String = client.query_one("SHOW ssl", &[]).unwrap().get(0);
    if ssl != "on" {
        println!("skipping: the test server does not offer TLS (ssl = {ssl})");
        return;
    }
    let schema = format!("queuectl_test_{:016x}", crate::job::random_u64());
    let separator = if url.contains('?') { '&' } else { '?' };
    let tls_url = format!("{url}{separator}sslmode=require&application_name=queuectl_tls_test");
    let options = PgOptions {
        schema: schema.clone(),
        ..PgOptions::default()
    };
    let store = PgStorage::connect(&tls_url, options).expect("connect with TLS");
    store
        .enqueue(NewJob::new("true").id("over-tls").unwrap(), now())
        .unwrap();
    let encrypted: Vec<bool> = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
             WHERE a.application_name = 'queuectl_tls_test'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        encrypted.len() >= 2,
        "the pool's and the listener's: {encrypted:?}"
    );
    assert!(encrypted.iter().all(|on| *on), "{encrypted:?}");
    drop(store);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
}

/// Statements sent together keep their order, and the first that fails is the error a
/// transaction reports (not the "transaction is aborted" of those sent after it); the
/// transaction is rolled back, and the connection stays usable.
#[test]
fn pipelined_statements_run_in_order_and_report_the_first_failure() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let store = pg.pg();
    let schema = format!("\"{}\"", pg.schema);
    let mut conn = store.pool.get().unwrap();
    let super::Conn {
        link, statements, ..
    } = &mut *conn;
    {
        let mut tx = super::rows::Db::begin(link, statements, &schema, "BEGIN");
        // Statements are prepared before any of them runs: the table must be there first.
        tx.batch_execute("CREATE TEMP TABLE pipelined (n int)")
            .unwrap();
        tx.defer("INSERT INTO pipelined VALUES (1)", Vec::new());
        tx.defer("INSERT INTO pipelined VALUES (2)", Vec::new());
        let rows = tx.query("SELECT count(*) FROM pipelined", &[]).unwrap();
        assert_eq!(
            rows[0].get::<_, i64>(0),
            2,
            "deferred statements ran first, in order"
        );
        tx.defer("INSERT INTO pipelined VALUES (1 / 0)", Vec::new());
        tx.defer("INSERT INTO pipelined VALUES (3)", Vec::new());
        let error = match tx.query("SELECT count(*) FROM pipelined", &[]) {
            Err(super::rows::TxError::Db(error)) => error,
            other => panic!("expected a database error, got {other:?}"),
        };
        assert_eq!(
            error.code(),
            Some(&postgres::error::SqlState::DIVISION_BY_ZERO),
            "{error}"
        );
    }
    // Dropped without a commit: rolled back, the temporary table with it.
    let mut single = super::rows::Db::single(link, statements, &schema);
    let rows = single
        .query("SELECT to_regclass('pg_temp.pipelined') IS NULL", &[])
        .unwrap();
    assert!(rows[0].get::<_, bool>(0), "the transaction was rolled back");
}

/// The plan a handle's connection uses for the settlement's lock by id after it ran claims
/// and settlements on a nearly empty queue and the queue then grew to 200,000 jobs, with
/// the growth looked for every `replan_check`; and the size of `jobs` its plans are now
/// taken to be made for.
fn lock_plan_after_growth(replan_check: Duration) -> (String, i64) {
    let pg = Pg::with(PgOptions {
        pool_size: 1,
        replan_check,
        ..PgOptions::default()
    });
    let store = pg.pg();
    let cycle = || {
        let batch = (0..3).map(|_| NewJob::new("true")).collect();
        store.enqueue_batch(batch, now()).unwrap();
        let claimed = store.claim("w", 3, Duration::from_secs(60), now()).unwrap();
        let settlements = claimed
            .into_iter()
            .map(|job| crate::Settlement::Complete {
                lease: job.lease.unwrap(),
                report: Default::default(),
            })
            .collect();
        for result in store.settle(settlements, now()).unwrap() {
            result.unwrap();
        }
    };
    // More than the five runs after which PostgreSQL weighs a generic plan.
    for _ in 0..12 {
        cycle();
    }
    pg.client()
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".jobs (id, command, state, attempts, max_retries, \
             created_at, updated_at, priority, run_at, runs, queue, blocked) SELECT 'old' || g, \
             'true', 'completed', 1, 3, 1, 1, 0, 1, 1, 'default', false \
             FROM generate_series(1, 200000) g",
            s = pg.schema
        ))
        .unwrap();
    cycle();
    let conn = store.pool.get().unwrap();
    let names = first_column(
        conn.link
            .simple(
                "SELECT name FROM pg_prepared_statements \
                 WHERE statement LIKE '%WHERE id = ANY($1) ORDER BY seq FOR UPDATE'",
            )
            .unwrap(),
    );
    assert_eq!(
        names.len(),
        1,
        "the lock statement is prepared once: {names:?}"
    );
    let plan = first_column(
        conn.link
            .simple(&format!("EXPLAIN EXECUTE {}('{{nope}}')", names[0]))
            .unwrap(),
    )
    .join("\n");
    (plan, conn.planned_for.0[0])
}

/// A handle whose connections made their plans while the queue was nearly empty has them
/// made again once it has grown: they search the index instead of scanning the table.
/// (Whether PostgreSQL would have kept a generic plan made on the nearly empty table
/// depends on its cost estimates; when it does, that plan scans the table.)
#[test]
fn cached_plans_are_made_again_once_the_queue_has_grown() {
    if database_url().is_none() {
        return;
    }
    let (plan, planned_for) = lock_plan_after_growth(Duration::ZERO);
    assert!(!plan.contains("Seq Scan on jobs"), "{plan}");
    assert!(
        planned_for > 8 << 20,
        "plans made again for {planned_for} bytes"
    );
    // Looked at only once, before the growth: the plans stay as they were made.
    let (_, planned_for) = lock_plan_after_growth(Duration::from_secs(3600));
    assert!(planned_for < 64 << 10, "{planned_for} bytes");
}

/// A connection found lost by the look at the tables' sizes is replaced, as one found lost
/// by a read is.
#[test]
fn a_connection_lost_before_the_plan_check_is_replaced() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::with(PgOptions {
        pool_size: 1,
        replan_check: Duration::ZERO,
        ..PgOptions::default()
    });
    let store = pg.pg();
    let job = store.enqueue(NewJob::new("true"), now()).unwrap();
    end_the_pooled_backend(&pg, store);
    assert_eq!(store.get(&job.id).unwrap(), job);
}

/// A worker that settles and claims one job at a time, as a busy one mostly does, runs
/// statements whose plans PostgreSQL makes once and keeps: none of them is planned afresh
/// at every run, as statements with array parameters are.
#[test]
fn one_job_turns_keep_their_plans() {
    if database_url().is_none() {
        return;
    }
    let version: i32 = Pg::new()
        .client()
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .unwrap()
        .get(0);
    if version < 140000 {
        eprintln!("skipping: pg_prepared_statements counts plans from PostgreSQL 14 on");
        return;
    }
    let pg = Pg::with(PgOptions {
        pool_size: 1,
        ..PgOptions::default()
    });
    let store = pg.pg();
    // Enough jobs that PostgreSQL would not take a plan for several rows over one for one.
    let batch = (0..3_000).map(|_| NewJob::new("true")).collect();
    store.enqueue_batch(batch, now()).unwrap();
    let request = crate::ClaimRequest::new("w", 1, LEASE);
    let mut held = store.claim("w", 1, LEASE, now()).unwrap();
    let runs = 12;
    for _ in 0..runs {
        let job = held.pop().expect("a job claimed");
        let settlement = crate::Settlement::Complete {
            lease: job.lease.unwrap(),
            report: Default::default(),
        };
        // What a busy pool calls.
        let polled = store
            .settle_and_claim_polling(vec![settlement], &request, now())
            .unwrap();
        polled.poll.unwrap();
        assert_eq!(polled.settled.len(), 1);
        polled.settled.into_iter().for_each(|r| drop(r.unwrap()));
        held = polled.claimed;
    }
    let conn = store.pool.get().unwrap();
    let replanned = first_column(
        conn.link
            .simple(&format!(
                "SELECT custom_plans || ' ' || statement FROM pg_prepared_statements \
                 WHERE custom_plans >= {runs}"
            ))
            .unwrap(),
    );
    assert!(replanned.is_empty(), "planned at every run: {replanned:#?}");
}

/// One-job enqueues of the same ids, from threads on one handle and on several: each id is
/// added once and refused to every other, and the counts and the change counter follow the
/// jobs added, not the attempts.
#[test]
fn one_job_enqueues_of_the_same_id_race_to_one_winner() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    const THREADS: usize = 6;
    const ROUNDS: usize = 40;
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = if t % 2 == 0 {
                pg.store()
            } else {
                pg.reopen().unwrap()
            };
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut won = Vec::new();
                for round in 0..ROUNDS {
                    barrier.wait();
                    let job = NewJob::new("true").id(format!("j{round}")).unwrap();
                    match store.enqueue(job, now()) {
                        Ok(_) => won.push(round),
                        Err(crate::StorageError::AlreadyExists { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                won
            })
        })
        .collect();
    let mut wins = [0; ROUNDS];
    for thread in threads {
        for round in thread.join().unwrap() {
            wins[round] += 1;
        }
    }
    assert!(wins.iter().all(|&w| w == 1), "{wins:?}");
    let store = pg.store();
    assert_eq!(store.counts().unwrap().pending, ROUNDS);
    let rounds = ROUNDS as u64;
    assert_eq!(
        store.change_version().unwrap(),
        version_of(rounds, rounds),
        "one change each, each giving work"
    );
}

/// An enqueue whose insert fails, or whose commit does, leaves nothing counted and no
/// transaction open on the pooled connection: the next enqueue on it is a transaction of its
/// own, committed.
#[test]
fn a_failed_one_job_enqueue_leaves_no_transaction_open() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::with(PgOptions {
        pool_size: 1,
        ..PgOptions::default()
    });
    let store = pg.pg();
    store.enqueue(NewJob::new("true"), now()).unwrap();
    let s = &pg.schema;
    // `boom` fails as it is inserted, `late` only when the transaction commits. (Bounded: a
    // transaction left open by the enqueue above would hold the table.)
    pg.client()
        .batch_execute(&format!(
            "SET lock_timeout = '10s'; CREATE FUNCTION \"{s}\".refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.command = 'boom' OR (NEW.command = 'late' AND TG_WHEN = 'AFTER') THEN \
             RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER boom BEFORE INSERT ON \"{s}\".jobs \
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse(); \
             CREATE CONSTRAINT TRIGGER late AFTER INSERT ON \"{s}\".jobs \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse();"
        ))
        .unwrap();
    let pid: i32 = {
        let conn = store.pool.get().unwrap();
        first_column(conn.link.simple("SELECT pg_backend_pid()").unwrap())[0]
            .parse()
            .unwrap()
    };
    let mut watcher = pg.client();
    let mut state = || -> String {
        watcher
            .query_one("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap()
            .get(0)
    };
    for command in ["boom", "late"] {
        let error = store.enqueue(NewJob::new(command), now()).unwrap_err();
        let mut said = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            said = format!("{said}: {cause}");
            source = cause.source();
        }
        assert!(said.contains("refused by the test"), "{said}");
        assert_eq!(state(), "idle", "after {command}");
    }
    store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(state(), "idle");
    assert_eq!(pg.count("SELECT count(*) FROM {s}.jobs"), 2);
    assert_eq!(store.counts().unwrap().pending, 2);
    assert_eq!(store.change_version().unwrap(), version_of(2, 2));
}

/// The first column of each row of a simple query's answer.
fn first_column(messages: Vec<postgres::SimpleQueryMessage>) -> Vec<String> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// Has the server end the one connection `store`'s pool holds so far.
fn end_the_pooled_backend(pg: &Pg, store: &PgStorage) {
    let pid: i32 = {
        let conn = store.pool.get().unwrap();
        let rows = conn.link.simple("SELECT pg_backend_pid()").unwrap();
        rows.iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => row.get(0).map(|p| p.parse().unwrap()),
                _ => None,
            })
            .unwrap()
    };
    let ended: bool = pg
        .client()
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(ended);
}

/// The schema's version, or `None` when the schema has no version table.
fn stored_version(pg: &Pg) -> Option<i32> {
    let rows = pg
        .client()
        .query(
            &format!(
                "SELECT version FROM \"{}\".schema_version WHERE to_regclass($1) IS NOT NULL",
                pg.schema
            ),
            &[&format!("\"{}\".schema_version", pg.schema)],
        )
        .ok()?;
    rows.first().map(|row| row.get(0))
}

fn checked_with_first_use(pg: &Pg) -> PgStorage {
    pg.connect(PgOptions {
        schema_check: SchemaCheck::WithFirstUse,
        ..PgOptions::default()
    })
}

/// A handle that checks the schema with its first operation makes nothing on connect;
/// its first operation (a one-job enqueue, a read of one statement, a read transaction)
/// creates the schema and then runs.
#[test]
fn a_first_use_that_finds_no_schema_creates_it_and_runs() {
    if database_url().is_none() {
        return;
    }
    let first_uses: [fn(&PgStorage); 3] = [
        |store| {
            store
                .enqueue(NewJob::new("true").id("a").unwrap(), now())
                .unwrap();
            assert_eq!(store.counts().unwrap().total(), 1);
        },
        |store| assert_eq!(store.counts().unwrap().total(), 0),
        |store| assert!(store.queues().unwrap().is_empty()),
    ];
    for first_use in first_uses {
        let pg = Pg::unopened();
        let store = checked_with_first_use(&pg);
        let schema_made = |pg: &Pg| -> bool {
            pg.client()
                .query_one(
                    "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)",
                    &[&pg.schema],
                )
                .unwrap()
                .get(0)
        };
        assert!(!schema_made(&pg), "nothing is made on connect");
        first_use(&store);
        assert_eq!(stored_version(&pg), Some(PG_SCHEMA_VERSION as i32));
        // And on the schema now there, the check passes with what it goes with.
        let again = checked_with_first_use(&pg);
        assert_eq!(again.config().unwrap(), crate::Config::default());
    }
}

/// A handle that checks the schema with its first operation, on a schema of a newer
/// version: the operation fails saying so, and nothing of it is applied, whether it is a
/// one-job enqueue, a batch, a settings change or a worker's registration.
#[test]
fn a_first_use_on_a_schema_of_another_version_applies_nothing() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let newer = PG_SCHEMA_VERSION as i32 + 1;
    let set_version = |version: i32| {
        pg.client()
            .execute(
                &format!("UPDATE \"{}\".schema_version SET version = $1", pg.schema),
                &[&version],
            )
            .unwrap();
    };
    set_version(newer);
    let first_uses: [fn(&PgStorage) -> crate::Result<()>; 4] = [
        |store| store.enqueue(NewJob::new("true"), now()).map(drop),
        |store| {
            let batch = vec![NewJob::new("true"), NewJob::new("true")];
            store.enqueue_batch(batch, now()).map(drop)
        },
        |store| {
            let mut set = |config: &mut crate::Config| config.set("max-retries", "5");
            store.update_config(&mut set).map(drop)
        },
        |store| store.register_worker(crate::conformance::worker_info("w")),
    ];
    for first_use in first_uses {
        let store = checked_with_first_use(&pg);
        match first_use(&store) {
            Err(crate::StorageError::UnsupportedFormat { found, .. }) => {
                assert_eq!(found, newer as u32)
            }
            other => panic!("expected the version to be refused, got {other:?}"),
        }
    }
    set_version(PG_SCHEMA_VERSION as i32);
    let written = pg.count(
        "SELECT (SELECT count(*) FROM {s}.jobs) + (SELECT count(*) FROM {s}.workers) + \
         (SELECT count(*) FROM {s}.meta WHERE value IS NOT NULL) + \
         (SELECT sum(n) FROM {s}.changes)::bigint",
    );
    assert_eq!(written, 0, "nothing was written");
}

/// The check goes with the first statements, after `BEGIN`: on a schema of another
/// version it aborts the transaction, so statements sent with it, a `COMMIT` included, are
/// not applied.
#[test]
fn the_schema_check_aborts_what_is_sent_with_it() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    pg.client()
        .batch_execute(&format!(
            "UPDATE \"{s}\".schema_version SET version = version + 1; \
             CREATE TABLE \"{s}\".probe (n int)",
            s = pg.schema
        ))
        .unwrap();
    let store = pg.pg();
    let schema = format!("\"{}\"", pg.schema);
    let checked = std::sync::atomic::AtomicBool::new(false);
    let mut conn = store.pool.get().unwrap();
    let super::Conn {
        link, statements, ..
    } = &mut *conn;
    let mut db = super::rows::Db::begin(link, statements, &schema, "BEGIN");
    db.check_schema(&checked);
    db.defer("INSERT INTO {s}.probe VALUES (1)", Vec::new());
    match db.commit() {
        Err(super::rows::TxError::Unchecked(error)) => assert_eq!(
            error.code(),
            Some(&postgres::error::SqlState::INVALID_TEXT_REPRESENTATION),
            "{error}"
        ),
        other => panic!("expected the check to fail, got {other:?}"),
    }
    assert!(!checked.load(std::sync::atomic::Ordering::Acquire));
    assert_eq!(
        pg.count("SELECT count(*) FROM {s}.probe"),
        0,
        "the insert sent with the check was not applied"
    );
}

/// What a one-shot command's handle (one connection, the schema checked with the first use)
/// costs in round trips after connecting: an enqueue of one job one (the check, the insert
/// and its commit), and a read of one statement without parameters one, prepared or not.
#[test]
fn one_shot_operations_keep_their_round_trips() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let store = pg.connect(one_shot());
    let round_trips = || store.pool.get().unwrap().link.round_trips();
    store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(round_trips(), 1, "a one-job enqueue");
    for turn in ["first", "second"] {
        let before = round_trips();
        assert_eq!(store.counts().unwrap().total(), 1);
        assert_eq!(round_trips() - before, 1, "the {turn} count of jobs");
    }
}

/// The options of a one-shot command's handle.
fn one_shot() -> PgOptions {
    PgOptions {
        pool_size: 1,
        listen: false,
        schema_check: SchemaCheck::WithFirstUse,
        ..PgOptions::default()
    }
}

/// A one-job enqueue is built with the settings its handle last saw, none stored if it saw
/// none, and goes in only if they are still the stored ones: a handle that guessed wrong,
/// or whose settings another changed since, finds that out in the insert's round trip and
/// builds the job again with the stored ones.
#[test]
fn a_one_job_enqueue_is_built_with_the_stored_settings_whoever_changed_them() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let other = pg.pg();
    let set = |key: &str, value: &str| {
        other
            .update_config(&mut |config| config.set(key, value))
            .unwrap();
    };
    set("max-retries", "5");
    let store = pg.connect(one_shot());
    let round_trips = || store.pool.get().unwrap().link.round_trips();
    let first = store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(first.max_retries, 5, "built again with the stored settings");
    assert_eq!(
        round_trips(),
        2,
        "the guess of none stored, then the insert"
    );
    let second = store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(second.max_retries, 5);
    assert_eq!(round_trips(), 3, "the settings seen last were right");
    set("max-retries", "2");
    set("job-timeout", "0");
    let third = store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(
        (third.max_retries, third.timeout),
        (2, None),
        "changed elsewhere"
    );
    let stored: Vec<(i64, Option<i64>)> = pg
        .client()
        .query(
            &format!(
                "SELECT max_retries, timeout_us FROM \"{}\".jobs ORDER BY seq",
                pg.schema
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        stored,
        [(5, Some(30_000_000)), (5, Some(30_000_000)), (2, None)]
    );
    assert_eq!(store.counts().unwrap().total(), 3, "each counted once");
    // Set back to the defaults, the settings are stored as none: as a new handle assumes.
    set("max-retries", "3");
    set("job-timeout", "30");
    let fresh = pg.connect(one_shot());
    let job = fresh.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(
        (job.max_retries, job.timeout),
        (3, Some(Duration::from_secs(30)))
    );
    assert_eq!(
        fresh.pool.get().unwrap().link.round_trips(),
        1,
        "the defaults, as assumed"
    );
}

/// A handle of several connections, a long-lived one's, prepares the one-job insert with its
/// first run on a connection and runs it prepared afterwards; a one-shot command's handle,
/// which would run it once, does not prepare it.
#[test]
fn the_one_job_insert_is_prepared_by_handles_that_keep_their_connections() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    for (pool_size, prepared) in [(1, false), (2, true)] {
        let store = pg.connect(PgOptions {
            pool_size,
            ..one_shot()
        });
        // Whichever connection the enqueue took (a slow connect may have had the pool open
        // another).
        let is_prepared = || {
            let conns: Vec<_> = (0..pool_size).map(|_| store.pool.get().unwrap()).collect();
            conns.iter().any(|conn| {
                conn.statements
                    .contains_key(super::rows::INSERT_JOB_AND_FINISH.as_str())
            })
        };
        let first = store.enqueue(NewJob::new("true"), now()).unwrap();
        assert_eq!(is_prepared(), prepared, "with a pool of {pool_size}");
        let second = store.enqueue(NewJob::new("true"), now()).unwrap();
        assert!(second.seq > first.seq, "both went in");
    }
    assert_eq!(pg.pg().counts().unwrap().total(), 4);
}

/// Only changes that may give a worker something to do end a wait for work: a job claimed,
/// kept alive or finished elsewhere does not, so idle workers sleep through a busy queue; a
/// new job, a retry, a dependent set free, room in a limited queue jobs wait for, a resumed
/// queue and a stop request do.
#[test]
fn only_changes_that_may_give_work_end_a_wait_for_work() {
    use crate::{ClaimRequest, JobState, Settlement};
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.pg();
    let id = |id: &str| id.parse::<crate::JobId>().unwrap();
    let claim_from = |queue: &str| {
        let request = ClaimRequest::new("w", 1, LEASE).queues([queue]);
        let mut claimed = store.claim_jobs(&request, now()).unwrap();
        assert_eq!(claimed.len(), 1, "a job of {queue} to claim");
        claimed.pop().unwrap().lease.unwrap()
    };
    // Settles as a busy worker does, claiming with the same call (from a queue with nothing).
    let settle = |settlement: Settlement| {
        let request = ClaimRequest::new("w", 1, LEASE).queues(["nothing"]);
        let (mut settled, claimed) = store
            .settle_and_claim(vec![settlement], &request, now())
            .unwrap();
        assert!(claimed.is_empty());
        settled.pop().unwrap().unwrap()
    };
    let complete = |lease| {
        settle(Settlement::Complete {
            lease,
            report: Default::default(),
        })
    };
    let fail = |lease| {
        settle(Settlement::Fail {
            lease,
            report: Default::default(),
            retry_at: now() + Duration::from_secs(60),
        })
    };
    // Whether what happened since `seen` ends a wait for work (one that does not wait).
    let gives_work = |seen: u64| store.wait_for_work(seen, Duration::ZERO).unwrap() != seen;
    let version = || store.change_version().unwrap();

    let seen = version();
    store
        .enqueue(NewJob::new("a").id("a").unwrap(), now())
        .unwrap();
    assert!(gives_work(seen), "a new job");

    let seen = version();
    let lease = claim_from("default");
    store.heartbeat(&lease, LEASE, now()).unwrap();
    let chunk = crate::OutputChunk {
        lease: lease.clone(),
        offset: 0,
        text: "out".into(),
    };
    assert!(store.record_output(&[chunk]).unwrap().is_empty());
    assert_eq!(complete(lease).state, JobState::Completed);
    assert_ne!(version(), seen, "each of them changed the store");
    assert!(
        !gives_work(seen),
        "a claim, a heartbeat, output, a completion"
    );
    let worker = crate::conformance::worker_info("elsewhere");
    store.register_worker(worker).unwrap();
    assert!(!gives_work(seen), "a worker registered");
    assert!(
        !store.worker_heartbeat("elsewhere", now()).unwrap(),
        "not asked to stop"
    );
    assert!(!gives_work(seen), "a worker's heartbeat");
    assert_ne!(version(), seen, "they changed the store");
    store.deregister_worker("elsewhere").unwrap();
    assert!(
        gives_work(seen),
        "a worker gone: its own waker sees its pool closing"
    );

    store
        .enqueue(NewJob::new("b").id("b").unwrap().max_retries(2), now())
        .unwrap();
    let seen = version();
    assert_eq!(fail(claim_from("default")).state, JobState::Failed);
    assert!(gives_work(seen), "a failure to retry");

    store
        .enqueue(NewJob::new("c").id("c").unwrap().max_retries(1), now())
        .unwrap();
    store
        .enqueue(NewJob::new("d").id("d").unwrap(), now())
        .unwrap();
    let after_d = NewJob::new("e").id("e").unwrap().after([id("d")]);
    store.enqueue(after_d, now()).unwrap();
    let seen = version();
    let mut leases = vec![claim_from("default"), claim_from("default")];
    leases.sort_by(|a, b| a.job_id.as_str().cmp(b.job_id.as_str()));
    let [c, d] = <[_; 2]>::try_from(leases).unwrap();
    assert_eq!((c.job_id.as_str(), d.job_id.as_str()), ("c", "d"));
    assert_eq!(fail(c).state, JobState::Dead);
    assert!(!gives_work(seen), "a job that died with nothing after it");
    complete(d);
    assert!(gives_work(seen), "a completion that lets its dependent run");

    for queue in ["limited", "open"] {
        for n in 0..2 {
            let job = NewJob::new("x").id(format!("{queue}{n}")).unwrap();
            store.enqueue(job.queue(queue), now()).unwrap();
        }
    }
    store
        .change_queues(Some(&["limited".to_owned()]), QueueChange::Limit(1))
        .unwrap();
    let (limited, open) = (claim_from("limited"), claim_from("open"));
    let seen = version();
    complete(open);
    assert!(
        !gives_work(seen),
        "a completion where nobody waits for room"
    );
    complete(limited);
    assert!(
        gives_work(seen),
        "room in a limited queue with a job waiting"
    );
    let last = claim_from("limited");
    let seen = version();
    complete(last);
    // A job enqueued after the counts were read may wait for this room.
    assert!(
        gives_work(seen),
        "room in a limited queue, whatever the counts said"
    );

    let seen = version();
    store
        .change_queues(Some(&["open".to_owned()]), QueueChange::Pause)
        .unwrap();
    assert!(gives_work(seen), "a paused queue");
    store
        .register_worker(crate::conformance::worker_info("w"))
        .unwrap();
    let seen = version();
    assert_eq!(store.request_stop().unwrap(), 1);
    assert!(gives_work(seen), "a stop request");
}

/// Notifications of changes that give no work reach waiters for any change, not waiters for
/// work: a worker out of work is not woken each time a job finishes elsewhere.
#[test]
fn finished_jobs_notify_waiters_for_changes_but_not_for_work() {
    use super::listen::Heard;
    use crate::{ClaimRequest, Settlement};
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let waiter = pg.pg();
    let writer = pg.connect(PgOptions::default());
    // Each of these commits sends one notification: work, quiet, quiet, work.
    writer.enqueue(NewJob::new("true"), now()).unwrap();
    let lease = writer
        .claim("w", 1, LEASE, now())
        .unwrap()
        .pop()
        .unwrap()
        .lease
        .unwrap();
    let request = ClaimRequest::new("w", 1, LEASE).queues(["nothing"]);
    let settlement = Settlement::Complete {
        lease,
        report: Default::default(),
    };
    writer
        .settle_and_claim(vec![settlement], &request, now())
        .unwrap();
    writer.enqueue(NewJob::new("true"), now()).unwrap();
    // They arrive in commit order; the waiter's listener heard nothing before.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let heard = waiter.listener.generation(Heard::Any);
        if heard >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {heard} notifications heard"
        );
        waiter
            .listener
            .wait(Heard::Any, heard, Duration::from_secs(1));
    }
    assert_eq!(waiter.listener.generation(Heard::Any), 4);
    assert_eq!(
        waiter.listener.generation(Heard::Work),
        2,
        "the two enqueues, not the claim and the completion"
    );
}

/// A schema made by the first release (version 1) is brought to the current version on
/// connect, its change counter gaining the count of changes that give work. A view someone
/// added to it is theirs, and the schema still a queue's.
#[test]
fn a_schema_of_version_1_is_migrated() {
    let Some(_) = database_url() else { return };
    let pg = Pg::unopened();
    let quoted = format!("\"{}\"", pg.schema);
    let v1 = [super::schema::BOOTSTRAP, super::schema::MIGRATIONS[0]]
        .map(|sql| sql.replace("{s}", &quoted))
        .join(";");
    let mut client = pg.client();
    client
        .batch_execute(&format!(
            "{v1}; UPDATE {quoted}.schema_version SET version = 1; \
             UPDATE {quoted}.changes SET n = 7 WHERE stripe = 0; \
             CREATE VIEW {quoted}.report AS SELECT id FROM {quoted}.jobs"
        ))
        .unwrap();
    let store = pg.connect(PgOptions::default());
    assert_eq!(stored_version(&pg), Some(PG_SCHEMA_VERSION as i32));
    let seen = store.change_version().unwrap();
    assert_eq!(seen, version_of(0, 7), "no work counted yet, seven changes");
    store.enqueue(NewJob::new("true"), now()).unwrap();
    let version = store.wait_for_work(seen, Duration::ZERO).unwrap();
    assert_eq!(version, version_of(1, 8));
}

/// `attempts` has no foreign key to `jobs` (schema version 3): each way of deleting jobs
/// (remove, clear the dead letter queue, purge) deletes their attempts with them.
#[test]
fn deleted_jobs_take_their_attempts_with_them() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.pg();
    for id in ["removed", "cleared", "purged"] {
        let max_retries = if id == "purged" { 3 } else { 1 };
        let job = NewJob::new("x").id(id).unwrap().max_retries(max_retries);
        store.enqueue(job, now()).unwrap();
    }
    for job in store.claim("w", 3, LEASE, now()).unwrap() {
        let lease = job.lease.unwrap();
        if job.id.as_str() == "purged" {
            store.complete(&lease, Default::default(), now()).unwrap();
        } else {
            store
                .fail(&lease, Default::default(), now(), now())
                .unwrap();
        }
    }
    let attempts = || pg.count("SELECT count(*) FROM {s}.attempts");
    assert_eq!(attempts(), 3);
    let removed = crate::JobId::new("removed").unwrap();
    assert_eq!(store.remove(&[removed], now()).unwrap().len(), 1);
    assert_eq!(attempts(), 2, "the removed job's attempt goes with it");
    assert_eq!(store.clear_dead(now()).unwrap(), 1);
    assert_eq!(attempts(), 1, "the cleared dead job's attempt goes with it");
    let later = now() + time::Duration::hours(1);
    assert_eq!(store.purge_completed(later).unwrap(), 1);
    assert_eq!(attempts(), 0, "the purged job's attempt goes with it");
}

/// The migration of a schema of version 1, 2 or 3 while a worker of that build settles a job
/// (its row locked, then an attempt inserted, which up to version 2 the foreign key checks
/// against `jobs`, then the change counter): the migration waits for the settlement, which
/// completes, instead of the two deadlocking.
#[test]
fn a_migration_waits_for_an_older_builds_settlement() {
    let Some(_) = database_url() else { return };
    for from in [1, 2, 3, 4] {
        migrate_beside_a_settlement(from);
    }
}

/// What makes schema `quoted` as a build of schema version `version` made it (its
/// `schema_version` row still to be set).
fn schema_at(version: usize, quoted: &str) -> String {
    std::iter::once(super::schema::BOOTSTRAP)
        .chain(super::schema::MIGRATIONS[..version].iter().copied())
        .map(|sql| sql.replace("{s}", quoted))
        .collect::<Vec<_>>()
        .join(";")
}

fn migrate_beside_a_settlement(from: usize) {
    let pg = Pg::unopened();
    let quoted = format!("\"{}\"", pg.schema);
    let older = schema_at(from, &quoted);
    let mut client = pg.client();
    client
        .batch_execute(&format!(
            "{older}; UPDATE {quoted}.schema_version SET version = {from}; \
             INSERT INTO {quoted}.jobs (id, command, state, attempts, max_retries, created_at, \
             updated_at, priority, run_at, queue) \
             VALUES ('j', 'x', 'processing', 1, 3, 0, 0, 0, 0, 'default')"
        ))
        .unwrap();
    let mut settling = client.transaction().unwrap();
    let seq: i64 = settling
        .query_one(
            &format!("SELECT seq FROM {quoted}.jobs WHERE id = 'j' FOR UPDATE"),
            &[],
        )
        .unwrap()
        .get(0);
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    let (migrated_tx, migrated) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let options = PgOptions {
            schema,
            ..PgOptions::default()
        };
        let _ = migrated_tx.send(PgStorage::connect(&url, options).map(|_| ()));
    });
    // The migration is waiting for a lock the settlement holds.
    let mut watcher = pg.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
                &[&pg.schema],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration from {from} never waited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    settling
        .execute(
            &format!(
                "INSERT INTO {quoted}.attempts (job_seq, number, worker, started_at, outcome) \
                 VALUES ($1, 1, 'w', 0, 'succeeded')"
            ),
            &[&seq],
        )
        .expect("the older build's settlement records its attempt");
    settling
        .execute(
            &format!("UPDATE {quoted}.changes SET n = n + 1 WHERE stripe = 0"),
            &[],
        )
        .expect("the older build's settlement counts its change");
    settling.commit().unwrap();
    migrated
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("the migration runs once the settlement has committed");
    assert_eq!(
        stored_version(&pg),
        Some(PG_SCHEMA_VERSION as i32),
        "from {from}"
    );
}

/// From version 4 a job's attempts go with it whatever deletes it, as they did with the
/// foreign key version 3 dropped: an older build's purge (a bare delete of jobs) leaves none
/// behind, and the migration from version 3 deletes those such a purge left.
#[test]
fn attempts_go_with_their_job_whoever_deletes_it() {
    let Some(_) = database_url() else { return };
    let pg = Pg::unopened();
    let quoted = format!("\"{}\"", pg.schema);
    let version_3 = schema_at(3, &quoted);
    let attempt = |job: &str| {
        format!(
            "INSERT INTO {quoted}.attempts (job_seq, number, worker, started_at, outcome) \
             SELECT seq, 1, 'w', 0, 'failed' FROM {quoted}.jobs WHERE id = '{job}'"
        )
    };
    let job = |id: &str| {
        format!(
            "INSERT INTO {quoted}.jobs (id, command, state, attempts, max_retries, \
             created_at, updated_at, priority, run_at, queue) \
             VALUES ('{id}', 'x', 'completed', 1, 3, 0, 0, 0, 0, 'default')"
        )
    };
    pg.client()
        .batch_execute(&format!(
            "{version_3}; UPDATE {quoted}.schema_version SET version = 3; {}; {}; {}; {}; \
             DELETE FROM {quoted}.jobs WHERE id = 'purged'",
            job("kept"),
            job("purged"),
            attempt("kept"),
            attempt("purged"),
        ))
        .unwrap();
    let attempts = || pg.count("SELECT count(*) FROM {s}.attempts");
    assert_eq!(attempts(), 2, "version 3 leaves the purged job's attempt");
    let store = pg.connect(PgOptions::default());
    assert_eq!(stored_version(&pg), Some(PG_SCHEMA_VERSION as i32));
    assert_eq!(
        attempts(),
        1,
        "the migration deletes the attempt left without its job"
    );
    assert_eq!(
        store
            .attempts(&crate::JobId::new("kept").unwrap())
            .unwrap()
            .len(),
        1
    );
    pg.client()
        .batch_execute(&format!("DELETE FROM {quoted}.jobs WHERE id = 'kept'"))
        .unwrap();
    assert_eq!(attempts(), 0, "a bare delete of the job takes its attempt");
}

/// A job that has failed for good once, with its one attempt recorded: what `clear_dead`
/// deletes, attempt and all.
fn dead_job_with_an_attempt(store: &PgStorage, id: &str) {
    store
        .enqueue(NewJob::new("x").id(id).unwrap().max_retries(1), now())
        .unwrap();
    let lease = store.claim("w", 1, LEASE, now()).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let failed = crate::Settlement::Fail {
        lease,
        report: crate::AttemptReport::default(),
        retry_at: now(),
    };
    let settled = store.settle(vec![failed], now()).unwrap();
    assert_eq!(settled[0].as_ref().unwrap().state, crate::JobState::Dead);
    assert_eq!(
        store
            .attempts(&crate::JobId::new(id).unwrap())
            .unwrap()
            .len(),
        1
    );
}

/// A queue's schema may be renamed, and a new queue made under its old name: deleting jobs
/// from the renamed one deletes their attempts there, and nothing of the other queue's, whose
/// jobs have the same seqs.
#[test]
fn deletes_in_a_renamed_schema_keep_to_it() {
    let Some(_) = database_url() else { return };
    let renamed = Pg::unopened();
    let first = Pg::unopened();
    dead_job_with_an_attempt(&first.connect(PgOptions::default()), "old");
    first
        .client()
        .batch_execute(&format!(
            "ALTER SCHEMA \"{}\" RENAME TO \"{}\"",
            first.schema, renamed.schema
        ))
        .unwrap();
    let other = first.connect(PgOptions::default());
    dead_job_with_an_attempt(&other, "new");
    let seq = |pg: &Pg| pg.count("SELECT seq FROM {s}.jobs");
    assert_eq!(seq(&first), seq(&renamed), "the two jobs have the same seq");
    let store = renamed.connect(PgOptions::default());
    assert_eq!(store.clear_dead(now()).unwrap(), 1);
    assert_eq!(renamed.count("SELECT count(*) FROM {s}.attempts"), 0);
    assert_eq!(
        other
            .attempts(&crate::JobId::new("new").unwrap())
            .unwrap()
            .len(),
        1,
        "the other queue keeps its job's attempt"
    );
}

/// What a job prints may hold NUL bytes, which PostgreSQL's `text` refuses: its output, live
/// and final, and its error are recorded with SUB in their place (same length), and the
/// results settled with it are recorded, not refused with it.
#[test]
fn output_with_nul_bytes_is_recorded_with_sub_in_their_place() {
    use crate::{ClaimRequest, Settlement};
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.pg();
    for id in ["nul", "plain"] {
        store
            .enqueue(NewJob::new("x").id(id).unwrap().max_retries(1), now())
            .unwrap();
    }
    let leases: Vec<_> = store
        .claim("w", 2, LEASE, now())
        .unwrap()
        .into_iter()
        .map(|job| job.lease.unwrap())
        .collect();
    let nul = leases.iter().find(|l| l.job_id.as_str() == "nul").unwrap();
    let chunk = crate::OutputChunk {
        lease: nul.clone(),
        offset: 0,
        text: "live\0".into(),
    };
    assert!(store.record_output(&[chunk]).unwrap().is_empty());
    let live = store.output_since(&nul.job_id, 0).unwrap();
    assert_eq!(live.text, "live\u{1a}");
    let settlements = leases
        .iter()
        .map(|lease| Settlement::Fail {
            lease: lease.clone(),
            report: crate::AttemptReport {
                exit_code: Some(1),
                output: Some(format!("{}\0out\n", lease.job_id)),
                error: Some("said \0".into()),
                ..Default::default()
            },
            retry_at: now(),
        })
        .collect();
    let request = ClaimRequest::new("w", 1, LEASE).queues(["nothing"]);
    let (settled, _) = store
        .settle_and_claim(settlements, &request, now())
        .unwrap();
    for (job, id) in settled.into_iter().zip(["nul", "plain"]) {
        let job = job.unwrap();
        assert_eq!(job.state, crate::JobState::Dead);
        assert_eq!(
            job.output.as_deref(),
            Some(format!("{id}\u{1a}out\n").as_str())
        );
        assert_eq!(job.last_error.as_deref(), Some("said \u{1a}"));
        assert_eq!(store.get(&job.id).unwrap(), job, "returned as stored");
        let attempts = store.attempts(&job.id).unwrap();
        assert_eq!(attempts[0].output, job.output);
        assert_eq!(attempts[0].error, job.last_error);
    }
}

/// What a schema holds, counted (as `schema::CONTENTS` lists it), and the rows of a `schema_version` table in it if there is one.
fn holdings(pg: &Pg) -> (usize, Vec<i32>) {
    let mut client = pg.client();
    let contents = client
        .query(super::schema::CONTENTS, &[&pg.schema])
        .unwrap()
        .len();
    let versions = client
        .query(
            &format!("SELECT version FROM \"{}\".schema_version", pg.schema),
            &[],
        )
        .map(|rows| rows.iter().map(|row| row.get(0)).collect())
        .unwrap_or_default();
    (contents, versions)
}

/// A schema holding anything queuectl does not make is refused, whatever it holds and
/// however the handle checks it, and is left as it was.
#[test]
fn schemas_not_made_by_queuectl_are_refused_and_left_alone() {
    let Some(_) = database_url() else { return };
    let version_table = "CREATE TABLE {s}.schema_version (version int); ";
    for (what, sql) in [
        ("a table", "CREATE TABLE {s}.customers (id int)".to_owned()),
        (
            "a view",
            "CREATE VIEW {s}.report AS SELECT 1 AS x".to_owned(),
        ),
        ("a sequence", "CREATE SEQUENCE {s}.invoice_no".to_owned()),
        (
            "a function",
            "CREATE FUNCTION {s}.f() RETURNS int LANGUAGE sql AS 'SELECT 1'".to_owned(),
        ),
        ("a type", "CREATE TYPE {s}.mood AS ENUM ('ok')".to_owned()),
        (
            "an operator",
            "CREATE OPERATOR {s}.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq)".to_owned(),
        ),
        (
            "a collation",
            "CREATE COLLATION {s}.plain FROM \"C\"".to_owned(),
        ),
        (
            "a text search configuration",
            "CREATE TEXT SEARCH CONFIGURATION {s}.plain (COPY = simple)".to_owned(),
        ),
        (
            "a version table beside a table",
            format!(
                "{version_table}INSERT INTO {{s}}.schema_version VALUES (0); \
                 CREATE TABLE {{s}}.customers (id int)"
            ),
        ),
        (
            "a version table alone",
            format!("{version_table}INSERT INTO {{s}}.schema_version VALUES (1)"),
        ),
    ] {
        let pg = Pg::unopened();
        let quoted = format!("\"{}\"", pg.schema);
        pg.client()
            .batch_execute(&format!(
                "CREATE SCHEMA {quoted}; {}",
                sql.replace("{s}", &quoted)
            ))
            .unwrap();
        let before = holdings(&pg);
        let options = PgOptions {
            schema: pg.schema.clone(),
            ..PgOptions::default()
        };
        let on_connect = PgStorage::connect(&pg.url, options.clone()).map(drop);
        let first_use = PgStorage::connect(
            &pg.url,
            PgOptions {
                schema_check: SchemaCheck::WithFirstUse,
                ..options
            },
        )
        .unwrap()
        .enqueue(NewJob::new("true"), now())
        .map(drop);
        for result in [on_connect, first_use] {
            let error = result.expect_err(what);
            assert!(
                matches!(error, crate::StorageError::Conflict { .. }),
                "{what}: {error}"
            );
        }
        assert_eq!(holdings(&pg), before, "{what}: left as it was");
    }
}

/// A handle that does not create (what read and change commands open) finds no queue in a
/// missing or empty schema and makes nothing there; once a queue is there, it uses it.
#[test]
fn a_handle_that_does_not_create_finds_no_queue_and_makes_none() {
    let Some(_) = database_url() else { return };
    let pg = Pg::unopened();
    let not_creating = |schema_check| PgOptions {
        schema: pg.schema.clone(),
        create: false,
        schema_check,
        ..PgOptions::default()
    };
    let no_store = |error: crate::StorageError| {
        assert!(
            matches!(error, crate::StorageError::NoStore { .. }),
            "{error}"
        );
    };
    for schema_exists in [false, true] {
        if schema_exists {
            pg.client()
                .batch_execute(&format!("CREATE SCHEMA \"{}\"", pg.schema))
                .unwrap();
        }
        no_store(PgStorage::connect(&pg.url, not_creating(SchemaCheck::OnConnect)).unwrap_err());
        let store = PgStorage::connect(&pg.url, not_creating(SchemaCheck::WithFirstUse)).unwrap();
        no_store(store.list(&crate::ListQuery::default()).unwrap_err());
        no_store(store.enqueue(NewJob::new("true"), now()).unwrap_err());
        assert_eq!(holdings(&pg), (0, Vec::new()), "nothing made");
    }
    pg.connect(PgOptions::default());
    let store = PgStorage::connect(&pg.url, not_creating(SchemaCheck::OnConnect)).unwrap();
    assert!(store.list(&crate::ListQuery::default()).unwrap().is_empty());
}

/// `schema::OURS` names everything the migrations make: a migration that adds a table
/// without naming it there would have its own schema refused as another program's.
#[test]
fn the_schema_holds_what_ours_names() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let mut held: Vec<String> = pg
        .client()
        .query(super::schema::CONTENTS, &[&pg.schema])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    held.sort();
    let mut ours: Vec<&str> = super::schema::OURS.to_vec();
    ours.sort();
    assert_eq!(held, ours);
}

/// A connect that cannot succeed (a database or a user that does not exist, a port where
/// nothing listens) fails at once with the reason, not once `connect_timeout` has passed with
/// only "db error" to show.
#[test]
fn a_connect_that_cannot_succeed_fails_at_once_with_its_cause() {
    let Some(url) = database_url() else { return };
    let config: postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        postgres::config::Host::Tcp(host) => host.clone(),
        postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let dbname = config.get_dbname().unwrap_or(&user).to_owned();
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let at = |host: &str, port: u16, user: &str, dbname: &str| {
        format!("host={host} port={port} user={user} dbname={dbname}")
    };
    for (url, cause) in [
        (
            at(&host, port, &user, "queuectl_no_such_db"),
            "does not exist",
        ),
        (
            at(&host, port, "queuectl_no_such_user", &dbname),
            "does not exist",
        ),
        (at("127.0.0.1", free_port, &user, &dbname), "refused"),
    ] {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let target = url.clone();
        std::thread::spawn(move || {
            let options = PgOptions {
                connect_timeout: Duration::from_secs(60),
                ..PgOptions::default()
            };
            let _ = tx.send(PgStorage::connect(&target, options).map(drop));
        });
        let error = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{url}: still trying"))
            .expect_err(&url);
        let mut said = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            said = format!("{said}: {cause}");
            source = cause.source();
        }
        assert!(said.contains(cause), "{url}: {said}");
    }
}

/// A claim that locked jobs it did not keep (the first of several queues' jobs, beyond its
/// room), or made scheduled jobs ready that it did not take, gives work: a worker that skipped
/// those rows while they were locked has them to claim.
#[test]
fn claims_that_leave_jobs_they_locked_give_work() {
    use crate::ClaimRequest;
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.pg();
    let t = now();
    let gives_work = |seen: u64| store.wait_for_work(seen, Duration::ZERO).unwrap() != seen;
    for queue in ["qa", "qb"] {
        store.enqueue(NewJob::new("x").queue(queue), t).unwrap();
    }
    let seen = store.change_version().unwrap();
    let request = ClaimRequest::new("w", 1, LEASE);
    assert_eq!(store.claim_jobs(&request, t).unwrap().len(), 1);
    assert!(gives_work(seen), "a job locked and left");
    let later = t + Duration::from_secs(1);
    store
        .enqueue(NewJob::new("x").queue("later").run_at(later), t)
        .unwrap();
    let seen = store.change_version().unwrap();
    let elsewhere = ClaimRequest::new("w", 1, LEASE).queues(["nothing"]);
    let after = later + Duration::from_secs(1);
    assert!(store.claim_jobs(&elsewhere, after).unwrap().is_empty());
    assert!(gives_work(seen), "a scheduled job made ready and left");
    let seen = store.change_version().unwrap();
    assert!(store.claim_jobs(&elsewhere, after).unwrap().is_empty());
    assert_eq!(
        store.change_version().unwrap(),
        seen,
        "nothing left to promote"
    );
}

/// `check` finds nothing in a sound queue, and names each (queue, state) whose stored count
/// is out of step with its jobs, by how much.
#[test]
fn check_names_counts_out_of_step_with_the_jobs() {
    let Some(_) = database_url() else { return };
    let pg = Pg::new();
    let store = pg.pg();
    for (id, queue) in [("a", "default"), ("b", "default"), ("c", "mail")] {
        let job = NewJob::new("true").id(id).unwrap().queue(queue);
        store.enqueue(job, now()).unwrap();
    }
    store.claim("w", 1, LEASE, now()).unwrap();
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
    let quoted = format!("\"{}\"", pg.schema);
    pg.client()
        .batch_execute(&format!(
            "UPDATE {quoted}.counts SET jobs = jobs + 2 \
             WHERE (queue, state, stripe) IN (SELECT queue, state, stripe FROM {quoted}.counts \
             WHERE queue = 'mail' AND jobs > 0 LIMIT 1)"
        ))
        .unwrap();
    let problems = store.check().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("queue mail") && problems[0].contains("off by 2"),
        "{problems:?}"
    );
}

/// A server that accepts the connection and then says nothing (a link cut after the TCP
/// handshake, a server stuck in authentication) fails the connect after `connect_timeout`
/// with that cause, instead of holding the pool's connecting thread for good. (No real
/// server needed: a socket that is never read.)
#[test]
fn a_server_that_never_answers_fails_the_connect_with_its_cause() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=test");
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let options = PgOptions {
            connect_timeout: Duration::from_millis(300),
            listen: false,
            ..PgOptions::default()
        };
        let _ = tx.send(PgStorage::connect(&url, options).map(drop));
    });
    let error = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the connect to give up")
        .expect_err("nothing answered");
    let said = crate::pool::error_chain(&error);
    assert!(
        said.contains("did not finish starting the connection"),
        "{said}"
    );
    drop(silent);
}

/// A TCP link to the test server that, while armed, closes the connection in place of
/// passing on the server's answer to a `COMMIT`: the transaction committed, and its client
/// never hears so. It disarms itself when it did.
struct LosesCommitAnswers {
    url: String,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl LosesCommitAnswers {
    fn to_test_server() -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let url = database_url().expect("the guard checked QUEUECTL_TEST_DATABASE_URL");
        let config: postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("a TCP host is needed for the link, not {other:?}"),
        };
        let upstream = format!("{host}:{}", config.get_ports().first().unwrap_or(&5432));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let arming = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let mut server = std::net::TcpStream::connect(&upstream).unwrap();
                let (mut to_server, mut from_server) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut client, &mut to_server));
                let armed = arming.clone();
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 64 * 1024];
                    loop {
                        let n = match server.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let answers = &buffer[..n];
                        let commit = answers.windows(7).any(|w| w == b"COMMIT\0");
                        if commit && armed.swap(false, Ordering::SeqCst) {
                            break;
                        }
                        if from_server.write_all(answers).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    let _ = from_server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        let at = url.find('@').unwrap() + 1;
        let end = at + url[at..].find('/').unwrap();
        let url = format!("{}127.0.0.1:{port}{}", &url[..at], &url[end..]);
        Self { url, armed }
    }
}

/// A one-job enqueue whose commit went through but whose answer was lost with the
/// connection runs again on a new one, finds its id taken by the job it added itself, and
/// returns that job: the caller is not told that its own job's id is taken, nor is the job
/// added twice. A job of the same id that another enqueue added is still refused.
#[test]
fn a_one_job_enqueue_whose_commit_answer_was_lost_returns_the_job_it_added() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::new();
    let link = LosesCommitAnswers::to_test_server();
    let store = PgStorage::connect(
        &link.url,
        PgOptions {
            schema: pg.schema.clone(),
            ..one_shot()
        },
    )
    .unwrap();
    for new in [NewJob::new("true"), NewJob::new("true").id("mine").unwrap()] {
        link.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let job = store.enqueue(new, now()).unwrap();
        assert!(
            !link.armed.load(std::sync::atomic::Ordering::SeqCst),
            "the answer to the commit was lost"
        );
        assert_eq!(pg.pg().get(&job.id).unwrap().seq, job.seq);
    }
    assert_eq!(pg.count("SELECT count(*) FROM {s}.jobs"), 2);
    assert_eq!(pg.pg().counts().unwrap().total(), 2, "each counted once");
    let again = store.enqueue(NewJob::new("true").id("mine").unwrap(), now());
    assert!(
        matches!(again, Err(crate::StorageError::AlreadyExists { .. })),
        "{again:?}"
    );
}

/// A listening handle whose connect fails after its listening connection was made (here: no
/// queue in the schema, and the handle may not create one) leaves no connection behind.
#[test]
fn a_failed_connect_leaves_no_listening_connection() {
    if database_url().is_none() {
        return;
    }
    let pg = Pg::unopened();
    let Err(error) = PgStorage::connect(
        &pg.url,
        PgOptions {
            schema: pg.schema.clone(),
            create: false,
            ..PgOptions::default()
        },
    ) else {
        panic!("no queue there, and none to be made");
    };
    assert!(
        matches!(error, crate::StorageError::NoStore { .. }),
        "{error}"
    );
    let mut client = pg.client();
    let listening = format!("LISTEN \"{}\";%", pg.schema);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1",
                &[&listening],
            )
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} listening connection(s) left after the failed connect"
        );
        std::thread::yield_now();
    }
}
