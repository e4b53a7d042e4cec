//! Stopping `worker start`: hang-ups and `worker stop --force`.

mod support;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::Queue;

/// A job that records the pid of its `sleep` and waits for it.
fn long_job(q: &Queue, id: &str) -> std::path::PathBuf {
    let pid_file = q.scratch(id);
    let command = format!(
        "sleep 20 & pid=$!; echo $pid > '{0}.tmp'; mv '{0}.tmp' '{0}'; wait $pid",
        pid_file.display()
    );
    q.enqueue(&serde_json::json!({ "id": id, "command": command }).to_string());
    pid_file
}

/// A closed terminal or a dropped ssh session sends SIGHUP: the worker stops like on
/// SIGTERM, letting its job finish, instead of dying with it and charging its attempt.
#[test]
fn sighup_is_a_graceful_stop() {
    let q = Queue::new();
    let gate = q.scratch("gate");
    let started = q.scratch("started");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let command = format!(
        "touch '{}'; read _ < '{}'; echo finished",
        started.display(),
        gate.display()
    );
    q.enqueue(&serde_json::json!({ "id": "job", "command": command }).to_string());
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job job");
    // Once the command runs: a job claimed but not yet started by an executor is handed
    // back by a graceful stop instead (it has not begun, so nothing is cut short).
    support::eventually("the job to start", || started.exists());
    worker.signal(Signal::SIGHUP);
    worker.wait_for("[signal] SIGHUP");
    worker.wait_for("[stopping]");
    let (tx, rx) = std::sync::mpsc::channel();
    let g = gate.clone();
    std::thread::spawn(move || {
        std::fs::write(&g, "go\n").unwrap();
        tx.send(()).unwrap();
    });
    if rx.recv_timeout(support::TIMEOUT).is_err() {
        panic!(
            "nobody reads the gate; worker said:\n{}",
            worker.transcript()
        );
    }
    let status = worker.wait_exit();
    assert!(status.success(), "{status}\n{}", worker.transcript());
    let job = q.job("job");
    assert_eq!(job["state"], "completed");
    assert_eq!(job["output"].as_str().unwrap().trim_end(), "finished");
}

/// `worker stop --force` kills the running jobs and hands them back uncharged.
#[test]
fn worker_stop_force_kills_running_jobs_and_hands_them_back() {
    let q = Queue::new();
    let pid_file = long_job(&q, "long");
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job long");
    let sleep_pid = support::read_pid(&pid_file);
    let out = q
        .cmd(["worker", "stop", "--force", "--timeout", "20"])
        .run();
    assert!(out.stderr.contains("stop now"), "{}", out.stderr);
    assert!(out.stderr.contains("all workers stopped"), "{}", out.stderr);
    worker.wait_for("[released] job long");
    assert!(worker.wait_exit().success(), "{}", worker.transcript());
    let job = q.job("long");
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("pending"), Some(0))
    );
    assert_eq!(q.status()["workers"], Value::Array(vec![]));
    assert!(support::process_gone(sleep_pid), "the job was killed");
}

/// A plain `worker stop` that times out says why and what would end it now.
#[test]
fn worker_stop_timeout_points_to_force() {
    let q = Queue::new();
    let pid_file = long_job(&q, "long");
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job long");
    support::read_pid(&pid_file);
    let out = q
        .cmd(["worker", "stop", "--timeout", "0.2"])
        .status(1)
        .run();
    assert!(out.stderr.contains("still running after"), "{}", out.stderr);
    assert!(out.stderr.contains("worker stop --force"), "{}", out.stderr);
    q.cmd(["worker", "stop", "--force"]).run();
    assert!(worker.wait_exit().success(), "{}", worker.transcript());
}

/// `cancel` of a job running in another worker process: its whole process group is stopped,
/// the job ends cancelled and is not retried, and the worker goes on.
#[test]
fn cancel_stops_a_job_running_in_another_worker_process() {
    let q = Queue::new();
    let pid_file = long_job(&q, "long");
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job long");
    // A grandchild in the job's process group: `cancel` must reach it too.
    let sleep_pid = support::read_pid(&pid_file);
    let out = q.cmd(["cancel", "long"]).run();
    assert_eq!(out.stdout, "long\n");
    worker.wait_for("job long");
    support::eventually("the job's processes to be gone", || {
        support::process_gone(sleep_pid)
    });
    let job = q.job("long");
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["history"][0]["outcome"], "cancelled", "{job}");
    // The worker still runs jobs, and the cancelled one never again.
    q.enqueue(r#"{"id":"next","command":"true"}"#);
    worker.wait_for("[completed] job next");
    assert_eq!(q.job("long")["state"], "cancelled");
    assert!(worker.is_running());
    // Refused: finished or unknown jobs, and nothing changes.
    let out = q.cmd(["cancel", "next"]).status(1).run();
    assert!(
        out.stderr
            .contains("cannot cancel job next: it is completed"),
        "{}",
        out.stderr
    );
    q.cmd(["cancel", "nope"]).status(1).run();
    q.cmd(["retry", "long"]).run();
    worker.wait_for("[running] job long (attempt 1)");
    q.cmd(["cancel", "long"]).run();
    q.cmd(["remove", "long"]).run();
    assert_eq!(q.cmd(["show", "long"]).status(1).run().stdout, "");
}
