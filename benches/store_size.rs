//! What a `queuectl` command costs as the store grows: the binary itself, on stores of 1,000
//! and 100,000 jobs with their history (completed jobs with output, a few failed or recovered),
//! in one run.
//!
//! For `enqueue`, `status`, `list --limit 10` and `show ID`: the median wall time of repeated
//! runs at each size and the 100k/1k ratio; the peak memory (max RSS) of `status` and `list`
//! at 100k; and the peak memory of an idle `worker start` at 100k after it ran a few jobs.
//!
//! The dashboard on the 100k store: the median time to serve the overview (its page and
//! `/api/status`) and `/api/jobs?limit=50`, and how long after a `queuectl enqueue` returns the
//! change reaches an open page's event stream.
//!
//! Run with `cargo bench -p queuectl-cli --bench store_size` (`STORE_SIZE_RUNS` sets the runs
//! per figure, default 30).

use std::io::{BufRead, BufReader};

#[path = "support/worker.rs"]
mod worker;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use worker::Worker;

use queuectl_core::{
    AttemptReport, FileStorage, JobState, NewJob, Settlement, Storage, StorageExt, now,
};

const BIN: &str = env!("CARGO_BIN_EXE_queuectl");
const LEASE: Duration = Duration::from_secs(600);

/// A store of `n` jobs as a week of use leaves it: 97% completed with output, 2% failed
/// waiting for their retry, 1% pending again after their worker died.
fn build(home: &Path, n: usize) {
    let store = FileStorage::open(home).expect("open store");
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
    store.checkpoint().expect("checkpoint");
}

fn queuectl(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("--home").arg(home).args(args);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    command
}

/// Median wall time of `runs` runs, in milliseconds.
fn median_ms(home: &Path, args: &[&str], runs: usize) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let status = queuectl(home, args).status().expect("run queuectl");
            let took = started.elapsed().as_secs_f64() * 1000.0;
            assert!(status.success(), "queuectl {args:?} failed");
            took
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Peak resident memory of one run, in MiB (from `/usr/bin/time`).
fn peak_mib(home: &Path, args: &[&str]) -> Option<f64> {
    let output = Command::new("/usr/bin/time")
        .args(["-f", "%M", BIN, "--home"])
        .arg(home)
        .args(args)
        .stdout(Stdio::null())
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let kib: f64 = stderr.lines().last()?.trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak memory of a worker that started on the store and ran `jobs` jobs, then idles.
fn idle_worker_peak_mib(home: &Path, jobs: usize) -> f64 {
    let mut command = Command::new(BIN);
    command.arg("--home").arg(home).args(["worker", "start"]);
    let worker = Worker::spawn(command);
    for i in 0..jobs {
        let job = format!(r#"{{"id":"idle-{i}","command":"true"}}"#);
        assert!(
            queuectl(home, &["enqueue", &job])
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
    let small = tempfile::tempdir().expect("temp dir");
    let large = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    build(small.path(), 1_000);
    build(large.path(), 100_000);
    let db_mib = std::fs::metadata(large.path().join("queuectl.db"))
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(0.0);
    println!(
        "stores built in {:.1} s (100k store: {db_mib:.1} MiB); {runs} runs per figure",
        started.elapsed().as_secs_f64()
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
        let a = median_ms(small.path(), args, runs);
        let b = median_ms(large.path(), args, runs);
        let name = args[..args.len().min(3)].join(" ");
        let name = if name.starts_with("enqueue") {
            "enqueue"
        } else {
            &name
        };
        println!("{name:<22} {a:>9.2} {b:>9.2} {:>7.2}", b / a);
    }
    for args in [&["status"][..], &["list", "--limit", "10"]] {
        match peak_mib(large.path(), args) {
            Some(mib) => println!("peak memory at 100k: {:<18} {mib:>6.1} MiB", args.join(" ")),
            None => println!("peak memory: /usr/bin/time is not installed"),
        }
    }
    let worker = idle_worker_peak_mib(large.path(), 20);
    println!("peak memory at 100k: idle worker (after 20 jobs) {worker:>6.1} MiB");
    dashboard(large.path(), runs);
}

/// The dashboard's figures on the store in `home`.
fn dashboard(home: &Path, runs: usize) {
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(home)
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
            let status = queuectl(home, &["enqueue", r#"{"command":"true"}"#])
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
