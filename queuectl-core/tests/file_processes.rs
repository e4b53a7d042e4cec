//! `FileStorage` shared by several OS processes: exclusive claiming, acknowledged writes
//! surviving SIGKILL at random points, and prompt cross-process wake-up.
//!
//! The parent tests re-run this test executable as child processes
//! (`<exe> --exact <helper> --nocapture`), the role chosen by `QUEUECTL_TEST_ROLE`. Each helper
//! is a `#[test]` that returns at once when that variable is absent. Children report what the
//! store acknowledged on stdout, one fact per line; the parent checks the store against it.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use queuectl_core::file::FileOptions;
use queuectl_core::{
    AttemptReport, FileStorage, JobId, JobState, NewJob, Storage, StorageExt, now,
};

const ROLE: &str = "QUEUECTL_TEST_ROLE";
const DIR: &str = "QUEUECTL_TEST_DIR";
const ARG: &str = "QUEUECTL_TEST_ARG";
const LEASE: Duration = Duration::from_secs(600);
/// Bound on every wait for a child.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

/// This process's role and store directory, when it runs as a child of `role`.
fn child_of(role: &str) -> Option<(PathBuf, String)> {
    if std::env::var(ROLE).ok()? != role {
        return None;
    }
    let dir = PathBuf::from(std::env::var(DIR).expect("child needs a store dir"));
    Some((dir, std::env::var(ARG).unwrap_or_default()))
}

/// Marks the lines a child reports, which may share a line with the test harness's output.
const MARK: &str = "@queuectl ";

/// Prints one fact for the parent, flushed at once (the process may be killed next).
fn report(fact: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARK}{fact}").expect("stdout");
    out.flush().expect("stdout");
}

fn job(id: &str) -> NewJob {
    NewJob::new(format!("echo {id}")).id(id).unwrap()
}

fn id(s: &str) -> JobId {
    s.parse().unwrap()
}

/// A child process and the facts it reported, read on a thread so a full pipe never blocks it.
/// Dropping it kills the child, so a failing test leaves no process behind.
struct Kid {
    child: Child,
    lines: Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl Kid {
    fn spawn(helper: &str, role: &str, dir: &Path, arg: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", helper, "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(DIR, dir)
            .env(ARG, arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some((_, fact)) = line.split_once(MARK) else {
                    continue;
                };
                if tx.send(fact.to_owned()).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for a fact starting with `prefix`; returns it with the facts before it.
    fn wait_for(&self, prefix: &str) -> (String, Vec<String>) {
        let deadline = Instant::now() + CHILD_DEADLINE;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return (line, before),
                Ok(line) => before.push(line),
                Err(RecvTimeoutError::Timeout) => panic!("no {prefix:?} line from the child"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("child exited before printing {prefix:?}; it printed {before:?}")
                }
            }
        }
    }

    /// Waits (bounded) for the child to exit successfully; returns everything it reported.
    fn finish(mut self) -> Vec<String> {
        let deadline = Instant::now() + CHILD_DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("child did not finish within {CHILD_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "child failed: {status}");
        self.drain()
    }

    /// SIGKILLs the child; returns everything it reported.
    fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.drain()
    }

    fn drain(&mut self) -> Vec<String> {
        self.reader.take().unwrap().join().unwrap();
        self.lines.try_iter().collect()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ----- several processes claim from one store -----

const PRELOADED: usize = 150;
const LATE: usize = 150;
const CLAIMERS: usize = 3;

#[test]
fn several_processes_claim_each_job_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    let claimers: Vec<Kid> = (0..CLAIMERS)
        .map(|i| Kid::spawn("child_claimer", "claimer", dir.path(), &format!("w{i}")))
        .collect();
    // Start everyone at once: the claimers are waiting for work when the first jobs arrive.
    for claimer in &claimers {
        claimer.wait_for("ready");
    }
    let enqueuer = Kid::spawn("child_enqueuer", "enqueuer", dir.path(), "");
    let batch = (0..PRELOADED).map(|i| job(&format!("pre-{i}"))).collect();
    store.enqueue_batch(batch, now()).unwrap();

    let enqueued = enqueuer.finish();
    assert_eq!(
        enqueued
            .iter()
            .filter(|l| l.starts_with("enqueued "))
            .count(),
        LATE
    );
    let mut claimed_by = HashMap::new();
    for (worker, kid) in claimers.into_iter().enumerate() {
        for line in kid.finish() {
            if let Some(job) = line.strip_prefix("claimed ")
                && let Some(other) = claimed_by.insert(job.to_owned(), worker)
            {
                panic!("{job} was claimed by claimer {other} and claimer {worker}");
            }
        }
    }
    let expected: HashSet<String> = (0..PRELOADED)
        .map(|i| format!("pre-{i}"))
        .chain((0..LATE).map(|i| format!("late-{i}")))
        .collect();
    let claimed: HashSet<String> = claimed_by.keys().cloned().collect();
    assert_eq!(claimed, expected, "every job claimed, none lost");
    let mut per_claimer = [0; CLAIMERS];
    claimed_by.values().for_each(|&w| per_claimer[w] += 1);
    println!("jobs per claimer: {per_claimer:?}");
    assert!(
        per_claimer.iter().filter(|&&n| n > 0).count() > 1,
        "the claimers shared the work"
    );
    let counts = store.counts().unwrap();
    assert_eq!(counts.completed, PRELOADED + LATE, "{counts:?}");
}

/// Child: claims and completes jobs until all `PRELOADED + LATE` jobs exist and none is
/// pending.
#[test]
fn child_claimer() {
    let Some((dir, worker)) = child_of("claimer") else {
        return;
    };
    let store = FileStorage::open(&dir).unwrap();
    report("ready");
    let deadline = Instant::now() + CHILD_DEADLINE;
    while Instant::now() < deadline {
        let seen = store.change_version().unwrap();
        let jobs = store.claim(&worker, 2, LEASE, now()).unwrap();
        if jobs.is_empty() {
            let counts = store.counts().unwrap();
            if counts.total() == PRELOADED + LATE && counts.pending == 0 {
                return;
            }
            store
                .wait_for_change(seen, Duration::from_millis(50))
                .unwrap();
            continue;
        }
        for job in jobs {
            report(&format!("claimed {}", job.id));
            let lease = job.lease.unwrap();
            store
                .complete(&lease, AttemptReport::default(), now())
                .unwrap();
        }
    }
    panic!("claimer {worker} ran out of time");
}

/// Child: enqueues `LATE` jobs one at a time while the claimers run.
#[test]
fn child_enqueuer() {
    let Some((dir, _)) = child_of("enqueuer") else {
        return;
    };
    let store = FileStorage::open(&dir).unwrap();
    for i in 0..LATE {
        let id = format!("late-{i}");
        store.enqueue(job(&id), now()).unwrap();
        report(&format!("enqueued {id}"));
    }
}

// ----- SIGKILL at random points -----

const ROUNDS: usize = 60;

/// Options of the crash child: a tiny compaction threshold, so compactions (and crashes
/// inside them) happen throughout.
fn crash_options() -> FileOptions {
    FileOptions {
        compact_min_bytes: 16 << 10,
        ..FileOptions::default()
    }
}

/// splitmix64: reproducible randomness from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_points() {
    let seed = std::env::var("QUEUECTL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (rerun with QUEUECTL_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let (mut enqueued, mut claimed, mut done) = (Vec::new(), Vec::new(), Vec::new());
    let (mut compactions, mut torn_tails, mut mid_compaction) = (0, 0, 0);

    for round in 0..ROUNDS {
        let kid = Kid::spawn(
            "child_crash_writer",
            "crash-writer",
            dir.path(),
            &round.to_string(),
        );
        // Kill after a random number of acknowledged operations (so machine speed does not
        // matter) or, every other round, a moment after a compaction started; then a random
        // delay of a few milliseconds lands the kill inside an operation.
        let (_, mut lines) = kid.wait_for("ready");
        let (event, count) = if round % 2 == 0 {
            ("ack ", rng.below(40))
        } else {
            ("compacting", 1 + rng.below(3))
        };
        for _ in 0..count {
            let (line, before) = kid.wait_for(event);
            lines.extend(before);
            lines.push(line);
        }
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        lines.extend(kid.kill());

        for line in &lines {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("ack"), Some("enqueue"), Some(id)) => enqueued.push(id.to_owned()),
                (Some("ack"), Some("claim"), Some(id)) => claimed.push(id.to_owned()),
                (Some("ack"), Some("complete"), Some(id)) => done.push(id.to_owned()),
                (Some("ack"), Some("compact"), None) => compactions += 1,
                _ => {}
            }
        }

        // A temporary file left behind means the kill landed inside a compaction.
        mid_compaction += std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp")
            })
            .count()
            .min(1);
        let store = FileStorage::open_with(dir.path(), crash_options())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): store does not open: {e}"));
        torn_tails += store.recovery_warnings().len();
        let state = |name: &String| {
            store
                .get(&id(name))
                .unwrap_or_else(|e| panic!("round {round} (seed {seed}): {name}: {e}"))
                .state
        };
        for name in &enqueued {
            state(name);
        }
        for name in &claimed {
            let s = state(name);
            assert!(
                matches!(s, JobState::Processing | JobState::Completed),
                "round {round} (seed {seed}): claimed {name} is {s}"
            );
        }
        for name in &done {
            assert_eq!(
                state(name),
                JobState::Completed,
                "round {round} (seed {seed})"
            );
        }
    }
    println!(
        "{ROUNDS} rounds: {} enqueues, {} claims, {} completions, {compactions} compactions \
         acknowledged; {mid_compaction} kills inside a compaction; {torn_tails} torn tails dropped",
        enqueued.len(),
        claimed.len(),
        done.len()
    );
    assert!(enqueued.len() > ROUNDS, "the children got work done");
    assert!(compactions > 0, "compaction happened during the rounds");
}

/// Child: a stream of enqueues, claims, completions and compactions, each reported once the
/// store acknowledged it, until it is killed.
#[test]
fn child_crash_writer() {
    let Some((dir, round)) = child_of("crash-writer") else {
        return;
    };
    let store = FileStorage::open_with(&dir, crash_options()).unwrap();
    report("ready");
    for i in 0.. {
        let name = format!("r{round}-{i}");
        store.enqueue(job(&name), now()).unwrap();
        report(&format!("ack enqueue {name}"));
        if i % 2 == 1 {
            for job in store.claim("crasher", 1, LEASE, now()).unwrap() {
                report(&format!("ack claim {}", job.id));
                if i % 4 == 1 {
                    let lease = job.lease.unwrap();
                    store
                        .complete(&lease, AttemptReport::default(), now())
                        .unwrap();
                    report(&format!("ack complete {}", job.id));
                }
            }
        }
        if i % 10 == 9 {
            report("compacting");
            store.compact().unwrap();
            report("ack compact");
        }
    }
}

// ----- wake-up across processes -----

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn a_change_by_another_process_wakes_a_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    let seen = store.change_version().unwrap();
    let kid = Kid::spawn("child_poker", "poker", dir.path(), "");
    kid.wait_for("ready");
    let version = store
        .wait_for_change(seen, Duration::from_secs(20))
        .unwrap();
    let woke = unix_nanos();
    assert_ne!(version, seen, "woke on the change, not the timeout");
    let lines = kid.finish();
    let stamp = |prefix: &str| -> u128 {
        let line = lines.iter().find(|l| l.starts_with(prefix)).unwrap();
        line[prefix.len()..].parse().unwrap()
    };
    // How soon it wakes is a benchmark figure (pickup latency, benches/e2e.rs); here: that
    // it woke because of the change, long before its own 20 s timeout.
    assert!(woke >= stamp("before "), "woke before the change was made");
    assert_eq!(store.get(&id("poke")).unwrap().state, JobState::Pending);
}

/// Child: enqueues one job a moment after starting, printing the time around the call.
#[test]
fn child_poker() {
    let Some((dir, _)) = child_of("poker") else {
        return;
    };
    let store = FileStorage::open(&dir).unwrap();
    report("ready");
    std::thread::sleep(Duration::from_millis(300));
    let before = unix_nanos();
    store.enqueue(job("poke"), now()).unwrap();
    let after = unix_nanos();
    report(&format!("before {before}"));
    report(&format!("after {after}"));
}
