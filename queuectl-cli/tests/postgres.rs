//! The `queuectl` binary on a PostgreSQL store: several worker processes sharing one queue.
//! Each test has a schema of its own, dropped at the end. Skips, saying so, without
//! `QUEUECTL_TEST_DATABASE_URL` (`.ci/run` sets it).

mod support;

use std::collections::HashSet;

use nix::sys::signal::Signal;
use support::Queue;

/// A schema of its own on the test server, dropped when the test ends.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new() -> Option<Self> {
        let Some(url) = std::env::var("QUEUECTL_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            println!("skipping: QUEUECTL_TEST_DATABASE_URL is not set");
            return None;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "queuectl_cli_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000
        );
        Some(Self { url, name })
    }

    /// `--database-url URL --database-schema NAME` followed by `args`.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec![
            "--database-url",
            self.url.as_str(),
            "--database-schema",
            self.name.as_str(),
        ];
        all.extend_from_slice(args);
        all
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// 3 worker processes × 2 slots share 300 jobs through the database: each runs exactly once.
#[test]
fn three_worker_processes_run_each_of_300_jobs_exactly_once() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    let ran = q.scratch("ran");
    let jobs: String = (0..300)
        .map(|i| {
            let command = format!("echo j{i} >> '{}'", ran.display());
            serde_json::json!({ "id": format!("j{i}"), "command": command }).to_string() + "\n"
        })
        .collect();
    q.cmd(db.args(&["enqueue", "-"])).stdin(jobs).run();
    let workers: Vec<_> = (0..3)
        .map(|_| q.cmd(db.args(&["worker", "start", "--count", "2", "--exit-when-idle"])))
        .map(|cmd| std::thread::spawn(move || cmd.run()))
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let lines = std::fs::read_to_string(&ran).unwrap();
    let seen: Vec<&str> = lines.lines().collect();
    let unique: HashSet<&str> = seen.iter().copied().collect();
    assert_eq!((seen.len(), unique.len()), (300, 300), "each job once");
    let status = q.cmd(db.args(&["status", "--json"])).run().json();
    assert_eq!(status["counts"]["completed"], 300, "{status}");
    assert!(
        !q.home().exists(),
        "the embedded store was not touched: everything went to the database"
    );
}

/// A worker killed with SIGKILL mid-job: another worker process on the same database runs the
/// job to completion.
#[test]
fn a_job_of_a_killed_worker_completes_on_another() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    let marks = q.scratch("runs");
    let gate = q.scratch("gate");
    support::make_gate(&gate);
    // The first run waits on the gate (and is killed with its worker); the second completes.
    let command = format!(
        "echo run >> '{m}'; if [ $(wc -l < '{m}') -eq 1 ]; then read _ < '{g}'; fi; echo done",
        m = marks.display(),
        g = gate.display()
    );
    let job = serde_json::json!({ "id": "victim", "command": command });
    q.cmd(db.args(&["enqueue", &job.to_string()])).run();
    let mut doomed = q.worker(&db.args(&[]));
    doomed.wait_for("[running] job victim");
    support::eventually("the first run to start", || marks.exists());
    doomed.signal(Signal::SIGKILL);
    doomed.wait_exit();
    let mut rescuer = q.worker(&db.args(&[]));
    rescuer.wait_for("[completed] job victim");
    let job = q.cmd(db.args(&["show", "victim", "--json"])).run().json();
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["history"][0]["outcome"], "abandoned", "{job}");
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "run\nrun\n");
}
