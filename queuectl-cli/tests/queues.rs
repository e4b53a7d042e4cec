//! Named queues, unique keys and dependencies, end to end: several `queuectl` processes at once.

mod support;

use std::process::{Command, Stdio};

use serde_json::json;
use support::{Queue, TIMEOUT};

/// A job in `queue` that marks itself running in `dir`, records how many jobs of the queue it
/// saw running (itself included) in `dir/seen`, waits for the file `gate`, and unmarks itself.
fn gated(id: &str, queue: &str, dir: &std::path::Path, gate: &std::path::Path) -> String {
    let command = format!(
        "d='{dir}'; touch \"$d/run.{id}\"; ls \"$d\" | grep -c '^run\\.' >> \"$d/seen\"; \
         until [ -e '{gate}' ]; do sleep 0.01; done; rm \"$d/run.{id}\"",
        dir = dir.display(),
        gate = gate.display()
    );
    json!({ "id": id, "queue": queue, "command": command }).to_string()
}

fn processing_in(q: &Queue, queue: &str) -> usize {
    let list = q.json(&["list", "--queue", queue, "--state", "processing"]);
    list.as_array().unwrap().len()
}

/// `queue pause` holds a queue's jobs in every worker process, the others run on, the pause
/// outlives the workers, and `queue resume` lets the jobs run.
#[test]
fn a_paused_queue_waits_in_every_worker_process_until_resumed() {
    let q = Queue::new();
    let out = q.cmd(["queue", "pause", "mail"]).run();
    assert_eq!(out.stdout, "mail\n");
    assert!(out.stderr.contains("paused mail"), "{}", out.stderr);
    let mut first = q.worker(&[]);
    let mut second = q.worker(&[]);
    q.enqueue(r#"{"id":"m1","queue":"mail","command":"true"}"#);
    q.enqueue(r#"{"id":"d1","command":"true"}"#);
    q.cmd(["wait", "d1", "--timeout", "30"]).run();
    assert_eq!(q.job("m1")["state"], "pending");
    let queues = q.json(&["queue", "list"]);
    let mail = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "mail")
        .unwrap();
    assert_eq!(
        (mail["paused"].clone(), mail["counts"]["pending"].clone()),
        (json!(true), json!(1))
    );
    // The pause outlives the workers.
    q.cmd(["worker", "stop"]).run();
    first.wait_exit();
    second.wait_exit();
    let mut worker = q.worker(&[]);
    q.enqueue(r#"{"id":"d2","command":"true"}"#);
    worker.wait_for("[completed] job d2");
    assert_eq!(q.job("m1")["state"], "pending");
    let table = q.run(&["queue", "list"]);
    assert!(table.contains("mail     paused"), "{table}");
    q.cmd(["queue", "resume"]).run();
    worker.wait_for("[completed] job m1");
    // Bad names change nothing.
    let out = q.cmd(["queue", "pause", "no spaces"]).status(1).run();
    assert!(out.stderr.contains("invalid queue name"), "{}", out.stderr);
    let out = q.cmd(["worker", "start", "--queue", "a/b"]).status(1).run();
    assert!(out.stderr.contains("invalid queue name"), "{}", out.stderr);
    assert!(
        q.json(&["queue", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["paused"] == false)
    );
}

/// A queue limit holds across worker processes: 3 processes × 4 slots, a limit of 2, and no
/// job of the queue ever saw more than 2 of them running; other queues are not held back.
#[test]
fn a_queue_limit_holds_across_worker_processes() {
    let q = Queue::new();
    q.cmd(["queue", "limit", "q", "2"]).run();
    let dir = q.scratch("limit");
    std::fs::create_dir_all(&dir).unwrap();
    let gate = q.scratch("gate");
    let jobs: String = (0..8)
        .map(|i| gated(&format!("j{i}"), "q", &dir, &gate) + "\n")
        .collect();
    q.cmd(["enqueue", "-"]).stdin(jobs).run();
    let _workers: Vec<_> = (0..3).map(|_| q.worker(&["--count", "4"])).collect();
    support::eventually("two jobs of q running", || processing_in(&q, "q") == 2);
    // Another queue runs beside them.
    q.enqueue(r#"{"id":"other","queue":"fast","command":"true"}"#);
    q.cmd(["wait", "other", "--timeout", "30"]).run();
    assert_eq!(processing_in(&q, "q"), 2);
    std::fs::write(&gate, "").unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("j{i}")).collect();
    let mut wait = vec!["wait", "--timeout", "60"];
    wait.extend(ids.iter().map(String::as_str));
    q.cmd(wait).run();
    let seen = std::fs::read_to_string(dir.join("seen")).unwrap();
    let counts: Vec<usize> = seen.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(counts.len(), 8, "{seen}");
    assert_eq!(counts.iter().max(), Some(&2), "{seen}");
    let status = q.run(&["status"]);
    assert!(status.contains("q      running  2      0"), "{status}");
    q.cmd(["queue", "limit", "q", "0"]).run();
    let queues = q.json(&["queue", "list"]);
    assert!(
        queues.as_array().unwrap().iter().all(|q| q["limit"] == 0),
        "{queues}"
    );
}

/// Enqueues of one unique key from many processes at once add one job; every process prints
/// its id, and the others say on stderr that nothing was added.
#[test]
fn a_unique_key_adds_one_job_under_concurrent_enqueues() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"first","command":"true"}"#); // the store exists before the race
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(support::BIN)
                .arg("--home")
                .arg(q.home())
                .args([
                    "enqueue",
                    r#"{"command":"echo once","unique_key":"report-7"}"#,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|child| support::wait_output(child, TIMEOUT))
        .collect();
    let ids: std::collections::HashSet<_> = outputs
        .iter()
        .map(|out| {
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{outputs:?}");
    let said_duplicate = outputs
        .iter()
        .filter(|out| String::from_utf8_lossy(&out.stderr).contains("nothing added"))
        .count();
    assert_eq!(said_duplicate, 7, "{outputs:?}");
    assert_eq!(q.status()["counts"]["pending"], 2);
    let again = q.json(&["enqueue", r#"{"command":"x","unique_key":"report-7"}"#]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["id"].as_str(), ids.iter().next().map(String::as_str));
}

/// A chain of dependencies runs in order on several workers; when a link dies, the rest of
/// the chain is cancelled, naming why, and `wait` says so.
#[test]
fn a_dependency_chain_runs_in_order_and_a_failed_link_cancels_the_rest() {
    let q = Queue::new();
    let order = q.scratch("order");
    let step = |id: &str, after: Option<&str>| {
        let command = format!("echo {id} >> '{}'", order.display());
        let mut job = json!({ "id": id, "command": command });
        if let Some(after) = after {
            job["after"] = json!(after);
        }
        job.to_string() + "\n"
    };
    let jobs = step("c1", None) + &step("c2", Some("c1")) + &step("c3", Some("c2"));
    q.cmd(["enqueue", "-"]).stdin(jobs).run();
    let shown = q.run(&["show", "c3"]);
    assert!(shown.contains("after        c2 (waiting)"), "{shown}");
    let listed = q.run(&["list"]);
    assert!(listed.contains("pending (after)"), "{listed}");
    let _workers: Vec<_> = (0..2).map(|_| q.worker(&["--count", "2"])).collect();
    let out = q.cmd(["wait", "c3", "--timeout", "30"]).run();
    assert_eq!(out.stdout, "c3 completed\n");
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "c1\nc2\nc3\n");

    let failing = concat!(
        r#"{"id":"f1","command":"exit 1","max_retries":1}"#,
        "\n",
        r#"{"id":"f2","command":"true","after":"f1"}"#,
        "\n",
        r#"{"id":"f3","command":"true","after":["f2","c1"]}"#,
    );
    q.cmd(["enqueue", "-"]).stdin(failing).run();
    let out = q.cmd(["wait", "f3", "--timeout", "30"]).status(1).run();
    assert_eq!(out.stdout, "f3 cancelled\n");
    let f3 = q.job("f3");
    assert!(
        f3["last_error"]
            .as_str()
            .unwrap()
            .contains("f2 is cancelled"),
        "{f3}"
    );
    // Refused, adding nothing: a missing dependency, one that can no longer complete.
    let out = q
        .cmd(["enqueue", r#"{"command":"true","after":"nope"}"#])
        .status(1)
        .run();
    assert!(
        out.stderr.contains("there is no such job"),
        "{}",
        out.stderr
    );
    let out = q
        .cmd(["enqueue", r#"{"command":"true","after":"f1"}"#])
        .status(1)
        .run();
    assert!(out.stderr.contains("that job is dead"), "{}", out.stderr);
    assert_eq!(q.status()["total"], 6);
}

/// `stats` counts, per queue, what finished in its window, from the attempt history.
#[test]
fn stats_tally_each_queue_over_a_window() {
    let q = Queue::new();
    let jobs = concat!(
        r#"{"id":"ok1","command":"true"}"#,
        "\n",
        r#"{"id":"ok2","command":"true","queue":"mail"}"#,
        "\n",
        r#"{"id":"bad","command":"exit 1","max_retries":1,"queue":"mail"}"#,
        "\n",
        r#"{"id":"never","command":"true","run_at":"2099-01-01T00:00:00Z"}"#,
    );
    q.cmd(["enqueue", "-"]).stdin(jobs).run();
    q.cmd(["cancel", "never"]).run();
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let stats = q.json(&["stats", "--since", "10m"]);
    let queues = stats["queues"].as_array().unwrap();
    let tally: Vec<_> = queues
        .iter()
        .map(|s| {
            (
                s["queue"].as_str().unwrap(),
                s["completed"].as_u64().unwrap(),
                s["failed_attempts"].as_u64().unwrap(),
                s["dead"].as_u64().unwrap(),
                s["cancelled"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(tally, [("default", 1, 0, 0, 1), ("mail", 1, 1, 1, 0)]);
    assert_eq!(queues[1]["run"]["count"], 2, "{stats}");
    assert!(queues[1]["wait"]["max"].as_f64().unwrap() >= 0.0);
    let table = q.run(&["stats"]);
    assert!(
        table.lines().nth(1).unwrap().starts_with("QUEUE"),
        "{table}"
    );
    let out = q.cmd(["stats", "--since", "soon"]).status(2).run();
    assert!(out.stderr.contains("expected a duration"), "{}", out.stderr);
}
