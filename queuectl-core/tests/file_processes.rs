//! `FileStorage` shared by several OS processes: exclusive claiming, acknowledged writes
//! surviving SIGKILL at random points (inside writes and inside WAL checkpoints), and prompt
//! cross-process wake-up.
//!
//! The other processes are `queuectl-store-helper` (`tests/helpers/store_helper.rs`), which
//! prints each fact the store acknowledged on its own line; the test checks the store against
//! those facts.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use queuectl_core::{FileOptions, FileStorage, JobId, JobState, NewJob, Storage, StorageExt, now};

/// Bound on every wait for a child.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

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
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl Kid {
    fn spawn(role: &str, dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_queuectl-store-helper"))
            .arg(role)
            .arg(dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the store helper");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for a fact starting with `prefix`; returns it with the facts before it.
    fn wait_for(&self, prefix: &str) -> (String, Vec<String>) {
        let mut before = Vec::new();
        loop {
            match self.lines.recv_timeout(CHILD_DEADLINE) {
                Ok(line) if line.starts_with(prefix) => return (line, before),
                Ok(line) => before.push(line),
                Err(RecvTimeoutError::Timeout) => panic!("no {prefix:?} line from the child"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("child exited before printing {prefix:?}; it printed {before:?}")
                }
            }
        }
    }

    /// Writes a line to the child's stdin.
    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits (bounded) for the child to close its stdout and exit successfully; returns
    /// everything it reported.
    fn finish(mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(CHILD_DEADLINE) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("child did not finish within {CHILD_DEADLINE:?}; printed {lines:?}")
                }
            }
        }
        // Its stdout closed: it has exited (or is exiting).
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "child failed: {status}; printed {lines:?}"
        );
        self.reader.take().unwrap().join().unwrap();
        lines
    }

    /// SIGKILLs the child; returns everything it reported.
    fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
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

// ----- several claimers -----

const CLAIMERS: usize = 3;
const PRELOADED: usize = 150;
const LATE: usize = 150;

/// Three claimer processes and an enqueuer process share one store: every job is claimed
/// exactly once, and all are completed.
#[test]
fn several_processes_claim_each_job_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    let total = (PRELOADED + LATE).to_string();
    let claimers: Vec<Kid> = (0..CLAIMERS)
        .map(|i| Kid::spawn("claimer", dir.path(), &[&format!("w{i}"), &total]))
        .collect();
    // Start everyone at once: the claimers are waiting for work when the first jobs arrive.
    for claimer in &claimers {
        claimer.wait_for("ready");
    }
    let enqueuer = Kid::spawn("enqueuer", dir.path(), &[&LATE.to_string()]);
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
    let counts = store.counts().unwrap();
    assert_eq!(counts.completed, PRELOADED + LATE, "{counts:?}");
    assert_eq!(counts.total(), PRELOADED + LATE, "{counts:?}");
}

// ----- SIGKILL at random points -----

const ROUNDS: usize = 60;

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

/// A writer process is SIGKILLed 60 times, at random moments inside writes or inside WAL
/// checkpoints: every operation it saw acknowledged is in the store afterwards, and the store
/// passes SQLite's integrity check.
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
    let mut checkpoints = 0;

    for round in 0..ROUNDS {
        let kid = Kid::spawn("crash-writer", dir.path(), &[&round.to_string()]);
        // Kill after a random number of acknowledged operations (so machine speed does not
        // matter) or, every other round, just after a checkpoint started; then a random delay
        // of a few milliseconds lands the kill inside an operation.
        let (_, mut lines) = kid.wait_for("ready");
        let (event, count) = if round % 2 == 0 {
            ("ack ", rng.below(40))
        } else {
            ("checkpointing", 1 + rng.below(3))
        };
        for _ in 0..count {
            let (line, before) = kid.wait_for(event);
            lines.extend(before);
            lines.push(line);
        }
        // Not a synchronisation: a random offset for the kill, after the event waited for.
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        lines.extend(kid.kill());

        for line in &lines {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("ack"), Some("enqueue"), Some(id)) => enqueued.push(id.to_owned()),
                (Some("ack"), Some("claim"), Some(id)) => claimed.push(id.to_owned()),
                (Some("ack"), Some("complete"), Some(id)) => done.push(id.to_owned()),
                (Some("ack"), Some("checkpoint"), None) => checkpoints += 1,
                _ => {}
            }
        }

        let store = FileStorage::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): store does not open: {e}"));
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
    let report = FileStorage::check(dir.path()).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    println!(
        "{ROUNDS} rounds: {} enqueues, {} claims, {} completions, {checkpoints} checkpoints \
         acknowledged",
        enqueued.len(),
        claimed.len(),
        done.len()
    );
    assert!(enqueued.len() > ROUNDS, "the children got work done");
    assert!(checkpoints > 0, "checkpoints happened during the rounds");
}

// ----- wake-up across processes -----

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A waiter in this process wakes when another process enqueues: by the wake-up event, since
/// its fallback poll and its own timeout are an hour away.
#[test]
fn a_change_by_another_process_wakes_a_waiter() {
    const HOUR: Duration = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    FileStorage::open(dir.path()).unwrap();
    let options = FileOptions {
        poll_interval: HOUR,
        ..FileOptions::default()
    };
    let store = FileStorage::open_with(dir.path(), options).unwrap();
    let seen = store.change_version().unwrap();
    let mut kid = Kid::spawn("poker", dir.path(), &[]);
    kid.wait_for("ready");
    let (woken, wake) = mpsc::channel();
    std::thread::spawn(move || {
        let version = store.wait_for_change(seen, HOUR).unwrap();
        let _ = woken.send((version, unix_nanos(), store));
    });
    kid.tell("go");
    let lines = kid.finish();
    let (version, woke, store) = wake
        .recv_timeout(CHILD_DEADLINE)
        .expect("the waiter was not woken by the other process's change");
    assert_ne!(version, seen);
    let stamp = |prefix: &str| -> u128 {
        let line = lines.iter().find(|l| l.starts_with(prefix)).unwrap();
        line[prefix.len()..].parse().unwrap()
    };
    // How soon it wakes is a benchmark figure (pickup latency, benches/e2e.rs); here: that
    // it woke because of the change.
    assert!(woke >= stamp("before "), "woke before the change was made");
    assert_eq!(store.get(&id("poke")).unwrap().state, JobState::Pending);
}
