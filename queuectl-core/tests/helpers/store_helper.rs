//! A process for the multi-process store tests (`tests/file_processes.rs`): it opens the
//! store in a directory and plays one role, printing each fact the store acknowledged on
//! stdout, one per line, flushed at once (it may be killed at any moment).
//!
//! ```text
//! queuectl-store-helper claimer DIR WORKER TOTAL   claim and complete until TOTAL jobs are done
//! queuectl-store-helper enqueuer DIR COUNT         enqueue COUNT jobs named late-N, one at a time
//! queuectl-store-helper crash-writer DIR ROUND     enqueue, claim, complete, checkpoint until killed
//! queuectl-store-helper poker DIR                  wait for a line on stdin, then enqueue one job
//! queuectl-store-helper reader DIR                 open read-only, count, wait for a line, count
//! queuectl-store-helper write-fixture DIR          write the schema fixture (tests/fixtures)
//! ```

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use queuectl_core::{
    AttemptReport, FileOptions, FileStorage, JobId, NewJob, ProcessIdentity, QueueChange, Storage,
    StorageExt, Timestamp, WorkerInfo, now,
};

const LEASE: Duration = Duration::from_secs(600);
/// Bound on a claimer's life, so a broken test never leaves it running.
const DEADLINE: Duration = Duration::from_secs(120);

fn report(fact: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{fact}").expect("stdout");
    out.flush().expect("stdout");
}

fn job(id: &str) -> NewJob {
    NewJob::new(format!("echo {id}")).id(id).expect("valid id")
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["claimer", dir, worker, total] => claimer(dir, worker, total.parse().expect("TOTAL")),
        ["enqueuer", dir, count] => enqueuer(dir, count.parse().expect("COUNT")),
        ["crash-writer", dir, round] => crash_writer(dir, round),
        ["poker", dir] => poker(dir),
        ["reader", dir] => reader(dir),
        ["write-fixture", dir] => write_fixture(dir),
        _ => {
            eprintln!("usage: see the source of this helper");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("helper failed: {error}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn claimer(dir: &str, worker: &str, total: usize) -> Result {
    let store = FileStorage::open(dir)?;
    report("ready");
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        let seen = store.change_version()?;
        let jobs = store.claim(worker, 2, LEASE, now())?;
        if jobs.is_empty() {
            if store.counts()?.completed >= total {
                return Ok(());
            }
            store.wait_for_change(seen, Duration::from_millis(200))?;
            continue;
        }
        for job in jobs {
            report(&format!("claimed {}", job.id));
            let lease = job.lease.expect("a claimed job has a lease");
            store.complete(&lease, AttemptReport::default(), now())?;
        }
    }
    Err(format!("claimer {worker} ran out of time").into())
}

fn enqueuer(dir: &str, count: usize) -> Result {
    let store = FileStorage::open(dir)?;
    for i in 0..count {
        let id = format!("late-{i}");
        store.enqueue(job(&id), now())?;
        report(&format!("enqueued {id}"));
    }
    Ok(())
}

fn crash_writer(dir: &str, round: &str) -> Result {
    let store = FileStorage::open(dir)?;
    report("ready");
    for i in 0u64.. {
        let name = format!("r{round}-{i}");
        store.enqueue(job(&name), now())?;
        report(&format!("ack enqueue {name}"));
        if i % 2 == 1 {
            for job in store.claim("crasher", 1, LEASE, now())? {
                report(&format!("ack claim {}", job.id));
                if i % 4 == 1 {
                    let lease = job.lease.expect("a claimed job has a lease");
                    store.complete(&lease, AttemptReport::default(), now())?;
                    report(&format!("ack complete {}", job.id));
                }
            }
        }
        if i % 10 == 9 {
            report("checkpointing");
            store.checkpoint()?;
            report("ack checkpoint");
        }
    }
    Ok(())
}

fn poker(dir: &str) -> Result {
    let store = FileStorage::open(dir)?;
    report("ready");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    report(&format!("before {}", unix_nanos()));
    store.enqueue(job("poke"), now())?;
    report(&format!("after {}", unix_nanos()));
    Ok(())
}

fn reader(dir: &str) -> Result {
    let store = FileStorage::open_with(dir, FileOptions::read_only())?;
    report(&format!("count {}", store.counts()?.total()));
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    match store.counts() {
        Ok(counts) => report(&format!("count {}", counts.total())),
        Err(error) => report(&format!("error {error}")),
    }
    Ok(())
}

/// Writes the store `tests/fixtures/README.md` describes for the current schema, with fixed
/// times, and prints the running job's lease token (random: the test checks it).
fn write_fixture(dir: &str) -> Result {
    let at = |secs: i64| -> Timestamp {
        time::macros::datetime!(2026-01-01 00:00:00 UTC) + time::Duration::seconds(secs)
    };
    let lease = Duration::from_secs(30);
    let store = FileStorage::open(dir)?;
    let batch = vec![
        job("done"),
        job("flaky"),
        job("doomed").max_retries(1),
        job("running"),
        job("later")
            .run_at(at(3600))
            .timeout(Duration::from_millis(2500)),
    ];
    store.enqueue_batch(batch, at(0))?;
    let report = |exit_code, signal, output: &str, error: Option<&str>| AttemptReport {
        exit_code,
        signal,
        output: Some(output.to_owned()),
        error: error.map(str::to_owned),
    };
    let done = store.claim("w0", 1, lease, at(1))?.remove(0);
    store.complete(
        done.lease.as_ref().ok_or("no lease")?,
        report(Some(0), None, "done\n", None),
        at(2),
    )?;
    let flaky = store.claim("w0", 1, lease, at(2))?.remove(0);
    store.fail(
        flaky.lease.as_ref().ok_or("no lease")?,
        report(Some(1), None, "oops\n", Some("exit code 1")),
        at(60),
        at(3),
    )?;
    let doomed = store.claim("w0", 1, lease, at(3))?.remove(0);
    store.fail(
        doomed.lease.as_ref().ok_or("no lease")?,
        report(None, Some(9), "", Some("killed by signal 9")),
        at(60),
        at(3),
    )?;
    let running = store.claim("w1", 1, lease, at(3))?.remove(0);
    let running_lease = running.lease.clone().ok_or("no lease")?;
    store.heartbeat(&running_lease, lease, at(4))?;
    store.update_config(&mut |config| {
        config.set("max-retries", "5")?;
        config.set("backoff-base", "3")
    })?;
    let running_id = JobId::new("running")?;
    store.enqueue_batch(
        vec![
            job("urgent").priority(10).queue("mail").unique_key("u-1"),
            job("report").after([running_id]),
        ],
        at(2),
    )?;
    store.change_queues(Some(&["mail".to_owned()]), QueueChange::Limit(2))?;
    store.change_queues(Some(&["bulk".to_owned()]), QueueChange::Pause)?;
    store.register_worker(WorkerInfo {
        id: "w1".into(),
        hostname: "fixture-host".into(),
        pid: 4242,
        concurrency: 1,
        started_at: at(0),
        last_seen: at(4),
        stop_requested: false,
        stop_forced: false,
        identity: ProcessIdentity::default(),
        queues: Vec::new(),
    })?;
    store.request_stop()?;
    store.checkpoint()?;
    report_token(running_lease.token);
    Ok(())
}

fn report_token(token: u64) {
    report(&format!("running lease token {token:#018x}"));
}
