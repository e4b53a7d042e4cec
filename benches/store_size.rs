//! What a `queuectl` command costs as the store grows: the binary itself, on stores of 1,000
//! and 100,000 jobs with their history (completed jobs with output, a few failed or recovered),
//! in one run.
//!
//! For `enqueue`, `status`, `list --limit 10` and `show ID`: the median wall time of repeated
//! runs at each size and the 100k/1k ratio, and for `enqueue` also with a worker running (on
//! PostgreSQL it takes the machine's enqueues); the peak memory (max RSS) of `status` and `list`
//! at 100k; and the peak memory of an idle `worker start` at 100k after it ran a few jobs.
//!
//! The dashboard on the 100k store: the median time to serve the overview (its page and
//! `/api/status`) and `/api/jobs?limit=50`, and how long after a `queuectl enqueue` returns the
//! change reaches an open page's event stream.
//!
//! Run with `cargo bench -p queuectl-cli --bench store_size` (`STORE_SIZE_RUNS` sets the runs
//! per figure, default 30). The stores are embedded ones in temporary directories, unless
//! `E2E_DATABASE_URL=postgres://…` names a PostgreSQL database (as for the `e2e` bench): the
//! stores are then built there, in two fresh schemas `bench_size_1k_PID` and
//! `bench_size_100k_PID`, and vacuumed and analysed once built, as autovacuum would have done
//! during the week (the server may have it off); every command runs with `--database-url` and
//! `--database-schema`, the size reported is that of the schema's tables with their indexes,
//! and both schemas are dropped at the end, also when a figure fails.

use std::io::{BufRead, BufReader};

#[path = "support/worker.rs"]
mod worker;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use worker::Worker;

use queuectl_core::{
    AttemptReport, FileStorage, JobState, NewJob, PgOptions, PgStorage, Settlement, Storage,
    StorageExt, now,
};

const BIN: &str = env!("CARGO_BIN_EXE_queuectl");
const LEASE: Duration = Duration::from_secs(600);

/// A store of `n` jobs as a week of use leaves it: 97% completed with output, 2% failed
/// waiting for their retry, 1% pending again after their worker died.
fn build(store: &dyn Storage, n: usize) {
    let chunks = n.div_ceil(1000);
    for chunk in 0..chunks {
        let size = 1000.min(n - chunk * 1000);
        // Spread over the week before now, oldest first.
        let week = 7.0 * 24.0 * 3600.0;
        let at = now() - time::Duration::seconds_f64(week * (1.0 - chunk as f64 / chunks as f64));
        let batch = (0..size)
            .map(|i| {
                let k = chunk * 1000 + i;
                NewJob::new(format!("backup --host web-{k} --target /srv/backups/{k}"))
                    .id(format!("job-{k:06}"))
                    .expect("id")
                    .max_retries(3)
            })
            .collect();
        store.enqueue_batch(batch, at).expect("enqueue");
        let claimed = store.claim("bench", size, LEASE, at).expect("claim");
        let settlements = claimed
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 100 != 99)
            .map(|(i, job)| {
                let report = AttemptReport {
                    exit_code: Some(if i % 100 < 97 { 0 } else { 1 }),
                    signal: None,
                    output: Some(format!("copied 1234 files for {}\n", job.id).repeat(4)),
                    error: (i % 100 >= 97).then(|| "exited with code 1".to_owned()),
                };
                let lease = job.lease.expect("lease");
                if i % 100 < 97 {
                    Settlement::Complete { lease, report }
                } else {
                    Settlement::Fail {
                        lease,
                        report,
                        retry_at: at + time::Duration::hours(1),
                    }
                }
            })
            .collect();
        for result in store.settle(settlements, at).expect("settle") {
            result.expect("settled");
        }
        // The hundredth of each hundred goes back to pending.
        store.recover_worker("bench", at).expect("recover");
    }
    let counts = store.counts().expect("counts");
    assert_eq!(counts.total(), n);
    assert!(counts.get(JobState::Completed) > 0 && counts.get(JobState::Pending) > 0);
}

/// Where a store is: an embedded one in a temporary directory, or a schema of its own in a
/// PostgreSQL database, dropped with the value.
enum Target {
    Home(TempDir),
    Database { url: String, schema: String },
}

impl Target {
    /// A fresh schema `schema` in the database at `url` (one left by an earlier run of the
    /// same name is dropped first).
    fn database(url: &str, schema: String) -> Target {
        let target = Target::Database {
            url: url.to_owned(),
            schema,
        };
        target.drop_schema().expect("drop a leftover bench schema");
        target
    }

    /// Builds a store of `n` jobs here (see [`build`]).
    fn build(&self, n: usize) {
        match self {
            Target::Home(dir) => {
                let store = FileStorage::open(dir.path()).expect("open store");
                build(&store, n);
                store.checkpoint().expect("checkpoint");
            }
            Target::Database { url, schema } => {
                let options = PgOptions {
                    schema: schema.clone(),
                    ..PgOptions::default()
                };
                let store = PgStorage::connect(url, options).expect("connect");
                build(&store, n);
                drop(store);
                // What autovacuum would have done in a week: without it, every index of the
                // jobs table still points at the dead rows of each job's earlier states.
                let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                let tables: Vec<String> = client
                    .query(
                        "SELECT tablename FROM pg_tables WHERE schemaname = $1",
                        &[schema],
                    )
                    .expect("the schema's tables")
                    .iter()
                    .map(|row| format!("{schema}.{}", row.get::<_, String>(0)))
                    .collect();
                client
                    .batch_execute(&format!("VACUUM (ANALYZE) {}", tables.join(", ")))
                    .expect("vacuum");
            }
        }
    }

    /// Adds the arguments that point `queuectl` here.
    fn apply<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        match self {
            // `--home` wins over the variable; without it the run is plainer to read.
            Target::Home(dir) => command
                .env_remove("QUEUECTL_DATABASE_URL")
                .arg("--home")
                .arg(dir.path()),
            Target::Database { url, schema } => command
                .args(["--database-url", url])
                .args(["--database-schema", schema]),
        }
    }

    /// The store's size in MiB: the database file, or the schema's tables with their indexes
    /// and TOAST data.
    fn size_mib(&self) -> f64 {
        let bytes = match self {
            Target::Home(dir) => std::fs::metadata(dir.path().join("queuectl.db"))
                .map(|m| m.len())
                .unwrap_or(0),
            Target::Database { url, schema } => {
                let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                let row = client
                    .query_one(
                        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = $1 AND c.relkind = 'r'",
                        &[schema],
                    )
                    .expect("the schema's size");
                row.get::<_, i64>(0) as u64
            }
        };
        bytes as f64 / (1 << 20) as f64
    }

    fn drop_schema(&self) -> Result<(), postgres::Error> {
        if let Target::Database { url, schema } = self {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Err(e) = self.drop_schema() {
            eprintln!("could not drop a bench schema: {e}");
        }
    }
}

fn queuectl(target: &Target, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    target.apply(&mut command).args(args);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    command
}

/// Median wall time of `runs` runs, in milliseconds.
fn median_ms(target: &Target, args: &[&str], runs: usize) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let status = queuectl(target, args).status().expect("run queuectl");
            let took = started.elapsed().as_secs_f64() * 1000.0;
            assert!(status.success(), "queuectl {args:?} failed");
            took
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Peak resident memory of one run, in MiB (from `/usr/bin/time`).
fn peak_mib(target: &Target, args: &[&str]) -> Option<f64> {
    let mut command = Command::new("/usr/bin/time");
    command.args(["-f", "%M", BIN]);
    let output = target
        .apply(&mut command)
        .args(args)
        .stdout(Stdio::null())
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let kib: f64 = stderr.lines().last()?.trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Median wall time of `runs` enqueues while a worker runs on the store (on PostgreSQL it
/// takes this machine's enqueues), in milliseconds. The worker and the jobs keep to a queue
/// of their own, so the store's own jobs stay as they are.
fn enqueue_beside_worker_ms(target: &Target, runs: usize) -> f64 {
    let mut command = Command::new(BIN);
    target
        .apply(&mut command)
        .args(["worker", "start", "--count", "1", "--queue", "bench-beside"]);
    let worker = Worker::spawn(command);
    if matches!(target, Target::Database { .. }) {
        worker.wait_for("[relay]");
    }
    median_ms(
        target,
        &["enqueue", r#"{"command":"true","queue":"bench-beside"}"#],
        runs,
    )
}

/// Peak memory of a worker that started on the store and ran `jobs` jobs, then idles.
fn idle_worker_peak_mib(target: &Target, jobs: usize) -> f64 {
    let mut command = Command::new(BIN);
    target.apply(&mut command).args(["worker", "start"]);
    let worker = Worker::spawn(command);
    for i in 0..jobs {
        let job = format!(r#"{{"id":"idle-{i}","command":"true"}}"#);
        assert!(
            queuectl(target, &["enqueue", &job])
                .status()
                .unwrap()
                .success()
        );
        worker.wait_for(&format!("[completed] job idle-{i}"));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.child.id())).unwrap();
    drop(worker);
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024.0
}

fn main() {
    let runs: usize = std::env::var("STORE_SIZE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let url = std::env::var("E2E_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let (small, large) = match &url {
        Some(url) => {
            let pid = std::process::id();
            let small = Target::database(url, format!("bench_size_1k_{pid}"));
            let large = Target::database(url, format!("bench_size_100k_{pid}"));
            println!(
                "queuectl store size figures on PostgreSQL (E2E_DATABASE_URL, schemas \
                 bench_size_1k_{pid} and bench_size_100k_{pid})"
            );
            (small, large)
        }
        None => {
            let dir = || Target::Home(tempfile::tempdir().expect("temp dir"));
            println!("queuectl store size figures on the embedded store");
            (dir(), dir())
        }
    };
    let started = Instant::now();
    small.build(1_000);
    let large_started = Instant::now();
    large.build(100_000);
    println!(
        "stores built in {:.1} s (100k store: {:.1} s, {:.1} MiB); {runs} runs per figure",
        started.elapsed().as_secs_f64(),
        large_started.elapsed().as_secs_f64(),
        large.size_mib()
    );
    println!(
        "{:<22} {:>9} {:>9} {:>7}",
        "command", "1k ms", "100k ms", "ratio"
    );
    let commands: [&[&str]; 4] = [
        &["status"],
        &["list", "--limit", "10"],
        &["show", "job-000500"],
        &["enqueue", r#"{"command":"true"}"#],
    ];
    for args in commands {
        let a = median_ms(&small, args, runs);
        let b = median_ms(&large, args, runs);
        let name = args[..args.len().min(3)].join(" ");
        let name = if name.starts_with("enqueue") {
            "enqueue"
        } else {
            &name
        };
        println!("{name:<22} {a:>9.2} {b:>9.2} {:>7.2}", b / a);
    }
    let a = enqueue_beside_worker_ms(&small, runs);
    let b = enqueue_beside_worker_ms(&large, runs);
    println!(
        "{:<22} {a:>9.2} {b:>9.2} {:>7.2}",
        "enqueue, worker running",
        b / a
    );
    for args in [&["status"][..], &["list", "--limit", "10"]] {
        match peak_mib(&large, args) {
            Some(mib) => println!("peak memory at 100k: {:<18} {mib:>6.1} MiB", args.join(" ")),
            None => println!("peak memory: /usr/bin/time is not installed"),
        }
    }
    let worker = idle_worker_peak_mib(&large, 20);
    println!("peak memory at 100k: idle worker (after 20 jobs) {worker:>6.1} MiB");
    dashboard(&large, runs);
}

/// The dashboard's figures on the store at `target`.
fn dashboard(target: &Target, runs: usize) {
    let mut command = Command::new(BIN);
    let mut child = target
        .apply(&mut command)
        .args(["dashboard", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the dashboard");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut url)
        .expect("the dashboard's address");
    let base = url.trim().to_owned();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let median = |paths: &[&str]| {
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let started = Instant::now();
                for path in paths {
                    let mut response = agent.get(&format!("{base}{path}")).call().expect("GET");
                    response.body_mut().read_to_string().expect("a body");
                }
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[runs / 2]
    };
    let overview = median(&["", "api/status"]);
    let jobs = median(&["api/jobs?limit=50"]);
    let last_page = median(&["api/jobs?limit=50&offset=99950"]);
    println!("dashboard at 100k: overview (page + /api/status)  {overview:>6.2} ms");
    println!("dashboard at 100k: /api/jobs?limit=50             {jobs:>6.2} ms");
    println!("dashboard at 100k: /api/jobs, last page            {last_page:>6.2} ms");
    // Change → event: from starting `queuectl enqueue` (a process of its own, ~3 ms) to the
    // event reaching the open stream.
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    use std::io::Write as _;
    write!(stream, "GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut events = BufReader::new(stream);
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        events.read_line(&mut line).expect("headers");
    }
    let mut delays: Vec<f64> = (0..runs.min(20))
        .map(|_| {
            let started = Instant::now();
            let status = queuectl(target, &["enqueue", r#"{"command":"true"}"#])
                .status()
                .expect("enqueue");
            assert!(status.success());
            loop {
                line.clear();
                events.read_line(&mut line).expect("an event");
                if line.starts_with("event: change") {
                    break;
                }
            }
            // The data line and the blank line after it.
            for _ in 0..2 {
                line.clear();
                events.read_line(&mut line).expect("the event's end");
            }
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    println!(
        "dashboard: queuectl enqueue started → event on an open page p50 {:.2} ms, max {:.2} ms",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    let _ = child.kill();
    let _ = child.wait();
}
