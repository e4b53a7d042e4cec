//! End-to-end figures for the `queuectl` binary on the embedded file store, in one run:
//!
//! 1. shell drain: 1,000 `true` jobs through `worker start --count 2` (with the default
//!    `--prefetch auto`, and with `--prefetch 0`), next to the raw rate of running
//!    `sh -c true` two at a time on the same machine, and their ratio;
//! 2. CLI enqueue: median milliseconds per `queuectl enqueue` process;
//! 3. pickup latency: enqueue in one process → the job starts in an idle worker process;
//! 4. crash recovery: SIGKILL a worker mid-job → seconds until the job completes elsewhere;
//! 5. worker stop latency: `worker stop` with two idle worker processes → both have exited;
//! 6. cancel latency: `queuectl cancel` of a job running in another worker process → its
//!    process group is gone;
//! 7. queue limit: a limit of 3 on a queue drained by 3 worker processes × 4 slots (500 jobs):
//!    the most jobs of the queue seen running at once;
//! 8. the drain beside 3 idle worker processes (waiting on a queue that gets no jobs), against
//!    the drain alone, in turns: what idle workers cost while jobs finish elsewhere.
//!
//! Run with `cargo bench -p queuectl-cli --bench e2e` (set `E2E_JOBS` to change the drain size,
//! `E2E_DATABASE_URL=postgres://…` to run on PostgreSQL instead, a schema per figure; the drain
//! is then also run in turns with the embedded store, side by side, with either prefetch;
//! `E2E_POOLER_URL`, a pooler
//! such as PgBouncer in front of the same database, adds the CLI's enqueue through it).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_queuectl");

/// The PostgreSQL server to run on instead of the embedded store (`E2E_DATABASE_URL`).
fn database_url() -> Option<String> {
    if EMBEDDED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    if POOLED.load(std::sync::atomic::Ordering::Relaxed) {
        return pooler_url();
    }
    std::env::var("E2E_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Set while a figure is taken on the embedded store for comparison, in a PostgreSQL run.
static EMBEDDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A connection pooler in front of the same database (`E2E_POOLER_URL`, e.g. PgBouncer in
/// session mode), through which the CLI's enqueue is measured as well.
fn pooler_url() -> Option<String> {
    std::env::var("E2E_POOLER_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Set while a figure is taken through the pooler.
static POOLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `f` on the embedded store, whatever `E2E_DATABASE_URL` says.
fn on_embedded<T>(f: impl FnOnce() -> T) -> T {
    EMBEDDED.store(true, std::sync::atomic::Ordering::Relaxed);
    let out = f();
    EMBEDDED.store(false, std::sync::atomic::Ordering::Relaxed);
    out
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The schemas used, dropped at the end.
static SCHEMAS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `queuectl` on the queue of `home`: the embedded store there, or with `E2E_DATABASE_URL`
/// a PostgreSQL schema of its own named after `home`.
fn queuectl(home: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.env("QUEUECTL_HOME", home);
    if let Some(url) = database_url() {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        home.hash(&mut hasher);
        let schema = format!("queuectl_e2e_{:x}", hasher.finish());
        let mut schemas = SCHEMAS.lock().unwrap();
        if !schemas.contains(&schema) {
            schemas.push(schema.clone());
        }
        command
            .env("QUEUECTL_DATABASE_URL", url)
            .env("QUEUECTL_DATABASE_SCHEMA", schema);
    }
    command
}

fn drop_schemas() {
    let Some(url) = database_url() else { return };
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    for schema in SCHEMAS.lock().unwrap().drain(..) {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .expect("drop a bench schema");
    }
}

fn run(home: &Path, args: &[&str]) -> String {
    let output = queuectl(home).args(args).output().expect("run queuectl");
    assert!(
        output.status.success(),
        "queuectl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

fn enqueue_many(home: &Path, lines: &str) {
    let mut child = queuectl(home)
        .args(["enqueue", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn enqueue");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write jobs");
    assert!(child.wait().expect("wait enqueue").success());
}

#[path = "support/worker.rs"]
mod worker;
use worker::Worker;

/// A worker on the queue of `home` (`worker start ARGS`), once it has started.
fn start_worker(home: &Path, args: &[&str]) -> Worker {
    let mut command = queuectl(home);
    command.args(["worker", "start"]).args(args);
    Worker::spawn(command)
}

fn raw_shell_rate(jobs: usize) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..jobs / 2 {
                    let status = Command::new("sh").args(["-c", "true"]).status();
                    assert!(status.expect("sh").success());
                }
            });
        }
    });
    jobs as f64 / started.elapsed().as_secs_f64()
}

fn shell_drain(jobs: usize, prefetch: &str) -> f64 {
    shell_drain_beside(jobs, prefetch, 0)
}

/// [`shell_drain`] with `idle` more worker processes (2 slots each) started first on a queue
/// that gets no jobs: what they cost the drain while they wait.
fn shell_drain_beside(jobs: usize, prefetch: &str, idle: usize) -> f64 {
    let home = tempfile::tempdir().expect("temp dir");
    let lines: String = (0..jobs).map(|_| "{\"command\":\"true\"}\n").collect();
    enqueue_many(home.path(), &lines);
    let _idle: Vec<Worker> = (0..idle)
        .map(|_| start_worker(home.path(), &["--count", "2", "--queue", "elsewhere"]))
        .collect();
    let started = Instant::now();
    let status = queuectl(home.path())
        .args(["worker", "start", "--count", "2", "--exit-when-idle"])
        .args(["--prefetch", prefetch])
        .stderr(Stdio::null())
        .status()
        .expect("worker");
    let elapsed = started.elapsed();
    assert!(status.success());
    let status: Value = serde_json::from_str(&run(home.path(), &["status", "--json"])).unwrap();
    assert_eq!(status["counts"]["completed"], jobs, "every job completed");
    jobs as f64 / elapsed.as_secs_f64()
}

fn cli_enqueue_median_ms(samples: usize, beside_worker: bool) -> f64 {
    let home = tempfile::tempdir().expect("temp dir");
    run(home.path(), &["status"]);
    // On PostgreSQL the worker takes this machine's enqueues on its open connections.
    let _worker = beside_worker.then(|| {
        let worker = start_worker(home.path(), &["--count", "1"]);
        if database_url().is_some() && !EMBEDDED.load(std::sync::atomic::Ordering::Relaxed) {
            worker.wait_for("[relay]");
        }
        worker
    });
    let mut times: Vec<f64> = (0..samples)
        .map(|_| {
            let started = Instant::now();
            run(home.path(), &["enqueue", r#"{"command":"true"}"#]);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[samples / 2]
}

/// Milliseconds from a job's `created_at` (taken by the enqueueing process) to its
/// `started_at` (taken by the worker process when it claimed the job).
fn pickup_latency_ms(samples: usize) -> (f64, f64) {
    let home = tempfile::tempdir().expect("temp dir");
    let worker = start_worker(home.path(), &["--count", "1"]);
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let id = format!("p{i}");
        run(
            home.path(),
            &["enqueue", &format!(r#"{{"id":"{id}","command":"true"}}"#)],
        );
        worker.wait_for(&format!("[completed] job {id} "));
        let job: Value = serde_json::from_str(&run(home.path(), &["show", &id, "--json"])).unwrap();
        let parse = |field: &str| {
            time::OffsetDateTime::parse(
                job[field].as_str().expect("timestamp"),
                &time::format_description::well_known::Rfc3339,
            )
            .expect("RFC 3339")
        };
        let latency = parse("started_at") - parse("created_at");
        latencies.push(latency.as_seconds_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies[(samples * 99).div_ceil(100) - 1];
    (latencies[samples / 2], p99)
}

/// Seconds from SIGKILL of the worker running a job to the job completing on another worker,
/// and how much of that was the job's own second run.
fn crash_recovery_secs() -> (f64, f64) {
    let home = tempfile::tempdir().expect("temp dir");
    run(
        home.path(),
        &["enqueue", r#"{"id":"victim","command":"sleep 1"}"#],
    );
    let mut doomed = start_worker(home.path(), &["--count", "1"]);
    doomed.wait_for("[running] job victim");
    let rescuer = start_worker(home.path(), &["--count", "1"]);
    let killed = Instant::now();
    doomed.child.kill().expect("SIGKILL the worker");
    doomed.child.wait().expect("reap the worker");
    rescuer.wait_for("[running] job victim");
    let restarted = killed.elapsed().as_secs_f64();
    rescuer.wait_for("[completed] job victim");
    (killed.elapsed().as_secs_f64(), restarted)
}

/// Milliseconds from starting `queuectl worker stop` to the exit of both idle worker
/// processes it asked, over `samples` rounds: (p50, p99).
fn stop_latency_ms(samples: usize) -> (f64, f64) {
    let home = tempfile::tempdir().expect("temp dir");
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut workers = [
            start_worker(home.path(), &["--count", "1"]),
            start_worker(home.path(), &["--count", "1"]),
        ];
        // Both idle: give them a moment to finish their first look for work.
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        let stop = queuectl(home.path())
            .args(["worker", "stop", "--no-wait"])
            .stderr(Stdio::null())
            .status()
            .expect("worker stop");
        assert!(stop.success());
        for worker in &mut workers {
            assert!(worker.child.wait().expect("wait worker").success());
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies[(samples * 99).div_ceil(100) - 1];
    (latencies[samples / 2], p99)
}

/// Milliseconds from starting `queuectl cancel` to the exit of the job's process (a `sleep`
/// the job's shell waits on) in another worker process, over `samples` rounds: (p50, max).
fn cancel_latency_ms(samples: usize) -> (f64, f64) {
    let home = tempfile::tempdir().expect("temp dir");
    let scratch = tempfile::tempdir().expect("temp dir");
    let worker = start_worker(home.path(), &["--count", "1"]);
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let pid_file = scratch.path().join(format!("pid{i}"));
        let command = format!(
            "sleep 60 & echo $! > '{0}.tmp'; mv '{0}.tmp' '{0}'; wait",
            pid_file.display()
        );
        let job = serde_json::json!({ "id": format!("c{i}"), "command": command });
        run(home.path(), &["enqueue", &job.to_string()]);
        worker.wait_for(&format!("[running] job c{i} "));
        let pid = loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                break text.trim().to_owned();
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let started = Instant::now();
        run(home.path(), &["cancel", &format!("c{i}")]);
        let gone = |pid: &str| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        };
        while !gone(&pid) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "job never stopped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    (latencies[samples / 2], latencies[samples - 1])
}

/// Drains `jobs` jobs of a queue limited to `limit` with 3 worker processes × 4 slots. Each
/// job counts the jobs of the queue running as it starts (marker files); returns the most
/// seen and the drain time in seconds.
fn queue_limit_max(jobs: usize, limit: u32) -> (usize, f64) {
    let home = tempfile::tempdir().expect("temp dir");
    let scratch = tempfile::tempdir().expect("temp dir");
    let marks = scratch.path().join("marks");
    std::fs::create_dir(&marks).expect("marks dir");
    run(home.path(), &["queue", "limit", "q", &limit.to_string()]);
    let lines: String = (0..jobs)
        .map(|i| {
            let command = format!(
                "d='{}'; touch \"$d/run.{i}\"; ls \"$d\" | grep -c '^run\\.' >> \"$d/../seen\"; \
                 sleep 0.01; rm \"$d/run.{i}\"",
                marks.display()
            );
            serde_json::json!({ "queue": "q", "command": command }).to_string() + "\n"
        })
        .collect();
    enqueue_many(home.path(), &lines);
    let started = Instant::now();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            queuectl(home.path())
                .args(["worker", "start", "--count", "4", "--exit-when-idle"])
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    for mut worker in workers {
        assert!(worker.wait().expect("wait worker").success());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let seen = std::fs::read_to_string(scratch.path().join("seen")).expect("seen");
    let counts: Vec<usize> = seen
        .lines()
        .map(|l| l.trim().parse().expect("a count"))
        .collect();
    assert_eq!(counts.len(), jobs, "every job ran once");
    (counts.into_iter().max().unwrap_or(0), elapsed)
}

fn main() {
    // `cargo bench` passes --bench; filters are not supported by this harness.
    let jobs: usize = std::env::var("E2E_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let store = if database_url().is_some() {
        "PostgreSQL (E2E_DATABASE_URL)"
    } else {
        "the embedded store"
    };
    println!("queuectl end-to-end figures on {store} ({jobs} jobs for the drain)");
    let raw = raw_shell_rate(jobs);
    let drain = shell_drain(jobs, "auto");
    let unprefetched = shell_drain(jobs, "0");
    println!("shell drain        {drain:>10.0} jobs/s");
    println!("raw sh -c true ×2  {raw:>10.0} jobs/s");
    println!("drain / raw        {:>10.2}", drain / raw);
    println!(
        "with --prefetch 0  {unprefetched:>10.0} jobs/s ({:.2} of raw)",
        unprefetched / raw
    );
    if database_url().is_some() {
        // Side by side with the embedded store, in turns, so that both meet the same machine.
        for prefetch in ["auto", "0"] {
            let (mut here, mut embedded) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                embedded.push(on_embedded(|| shell_drain(jobs, prefetch)));
                here.push(shell_drain(jobs, prefetch));
            }
            let (here, embedded) = (median(here), median(embedded));
            println!(
                "side by side, --prefetch {prefetch:<4} {here:>6.0} jobs/s here, {embedded:.0} on \
                 the embedded store (median of 3 turns each): {:.2} of it",
                here / embedded
            );
        }
    }
    // Alone and beside idle workers, in turns.
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        alone.push(shell_drain(jobs, "auto"));
        beside.push(shell_drain_beside(jobs, "auto", 3));
    }
    let (alone, beside) = (median(alone), median(beside));
    println!(
        "beside 3 idle workers {beside:>7.0} jobs/s, {alone:.0} alone (median of 3 turns each): \
         {:.2} of it",
        beside / alone
    );
    let enqueue = cli_enqueue_median_ms(101, false);
    let beside = cli_enqueue_median_ms(101, true);
    println!(
        "CLI enqueue        {enqueue:>10.2} ms median per process, no worker running; \
         {beside:.2} ms with one running"
    );
    if database_url().is_some() {
        let embedded = on_embedded(|| cli_enqueue_median_ms(101, false));
        let beside = on_embedded(|| cli_enqueue_median_ms(101, true));
        println!(
            "  on the embedded store, same run: {embedded:.2} ms; {beside:.2} ms with a worker"
        );
        if pooler_url().is_some() {
            POOLED.store(true, std::sync::atomic::Ordering::Relaxed);
            let pooled = cli_enqueue_median_ms(101, false);
            POOLED.store(false, std::sync::atomic::Ordering::Relaxed);
            println!("  through the pooler (E2E_POOLER_URL), same run: {pooled:.2} ms");
        }
    }
    let (p50, p99) = pickup_latency_ms(100);
    println!("pickup latency     {p50:>10.2} ms p50   {p99:.2} ms p99");
    let (stop50, stop99) = stop_latency_ms(20);
    println!(
        "worker stop        {stop50:>10.2} ms p50   {stop99:.2} ms p99 (two idle workers exited)"
    );
    let (cancel50, cancel_max) = cancel_latency_ms(20);
    println!(
        "cancel             {cancel50:>10.2} ms p50   {cancel_max:.2} ms max (running job in \
         another worker process → its processes gone)"
    );
    let (most, took) = queue_limit_max(500, 3);
    println!(
        "queue limit 3      {most:>10} most seen running (3 processes × 4 slots, 500 jobs, \
         {took:.1} s)"
    );
    let (recovered, restarted) = crash_recovery_secs();
    println!(
        "crash recovery     {recovered:>10.2} s to completion elsewhere \
         (restarted after {restarted:.2} s; the job itself takes 1 s)"
    );
    drop_schemas();
}
