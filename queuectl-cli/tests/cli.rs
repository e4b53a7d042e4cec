//! End-to-end tests of the `queuectl` binary: each test has its own temporary home, runs real
//! worker processes, and waits on the events they print instead of sleeping.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use support::{BIN, Queue, eventually, states};

/// `list --json` as (id, state) pairs.
fn list(q: &Queue) -> Vec<(String, String)> {
    states(&q.json(&["list"]))
}

#[test]
fn basic_job_completes() {
    let q = Queue::new();
    let out = q
        .cmd(["enqueue", r#"{"id":"job1","command":"echo hello"}"#])
        .run();
    assert_eq!(out.stdout, "job1\n");
    assert_eq!(list(&q), [("job1".into(), "pending".into())]);

    let out = q.cmd(["worker", "start", "--exit-when-idle"]).run();
    assert_eq!(out.stdout, "", "worker output goes to stderr");
    assert!(
        out.stderr.contains("[completed] job job1"),
        "{}",
        out.stderr
    );

    let jobs = q.json(&["list"]);
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["id"], "job1");
    assert_eq!(jobs[0]["state"], "completed");
    assert_eq!(jobs[0]["attempts"], 1);

    let job = q.job("job1");
    assert_eq!(job["state"], "completed");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["output"].as_str().unwrap().trim_end(), "hello");
    // The seven public fields are there, with RFC 3339 UTC times.
    for field in [
        "id",
        "command",
        "state",
        "attempts",
        "max_retries",
        "created_at",
        "updated_at",
    ] {
        assert!(!job[field].is_null(), "missing {field}: {job}");
    }
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(job["command"], "echo hello");

    // The human view shows the output too.
    let text = q.run(&["show", "job1"]);
    assert!(
        text.contains("completed") && text.contains("hello"),
        "{text}"
    );
}

#[test]
fn failing_job_backs_off_exponentially_then_dies() {
    let q = Queue::new();
    q.config_set("backoff-base", "2");
    q.config_set("max-retries", "3");
    q.enqueue(r#"{"id":"flaky","command":"echo attempt $QUEUECTL_ATTEMPT; exit 1"}"#);

    let mut worker = q.worker(&[]);
    let starts: Vec<Instant> = (1..=3)
        .map(|n| {
            worker
                .wait_for(&format!("[running] job flaky (attempt {n})"))
                .at
        })
        .collect();
    let dead = worker.wait_for("[dead] job flaky");
    assert!(dead.text.contains("after 3 attempt(s)"), "{}", dead.text);
    let retries = worker.seen_containing("[retry] job flaky");
    assert_eq!(retries.len(), 2, "{}", worker.transcript());
    assert!(
        retries[0].text.contains("retrying in 2.0s"),
        "{}",
        retries[0].text
    );
    assert!(
        retries[1].text.contains("retrying in 4.0s"),
        "{}",
        retries[1].text
    );

    // delay = base ^ attempts: 2 s after the first attempt, 4 s after the second.
    for (gap, expected) in [(starts[1] - starts[0], 2.0), (starts[2] - starts[1], 4.0)] {
        let gap = gap.as_secs_f64();
        assert!(
            gap >= 0.9 * expected && gap <= expected + 1.5,
            "gap between attempts was {gap:.2}s, expected about {expected}s\n{}",
            worker.transcript()
        );
    }

    let dlq = q.json(&["dlq", "list"]);
    let dlq = dlq.as_array().unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["id"], "flaky");
    assert_eq!(dlq[0]["state"], "dead");
    assert_eq!(dlq[0]["attempts"], 3);
    assert_eq!(dlq[0]["exit_code"], 1);
    let shown = q.job("flaky");
    assert_eq!(shown["output"].as_str().unwrap().trim_end(), "attempt 3");
    let history = shown["history"].as_array().unwrap();
    let outcomes: Vec<_> = history
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "failed"], "{history:?}");
    assert_eq!(
        history[0]["output"].as_str().unwrap().trim_end(),
        "attempt 1"
    );
    assert!(worker.is_running(), "a dead job does not stop the worker");

    // Back from the DLQ with a fresh set of retries, and then gone with `dlq clear`.
    let out = q.cmd(["dlq", "retry", "flaky"]).run();
    assert_eq!(out.stdout, "flaky\n");
    worker.wait_for("[running] job flaky (attempt 1)");
    worker.wait_for("[retry] job flaky attempt 1");
    drop(worker);
    let out = q.cmd(["dlq", "clear"]).run();
    assert_eq!(
        out.stdout, "0\n",
        "the job is failed, not dead: nothing to clear"
    );
}

#[test]
fn many_jobs_across_three_worker_processes_run_exactly_once() {
    const JOBS: usize = 60;
    let q = Queue::new();
    let log = q.scratch("ran.log");
    let input: String = (0..JOBS)
        .map(|n| {
            format!(
                "{{\"id\":\"j{n:02}\",\"command\":\"echo $QUEUECTL_JOB_ID >> '{}'\"}}\n",
                log.display()
            )
        })
        .collect();
    let out = q.cmd(["enqueue", "-"]).stdin(input).run();
    assert_eq!(out.stdout.lines().count(), JOBS);

    let mut workers: Vec<_> = (0..3).map(|_| q.worker(&["--count", "2"])).collect();
    for worker in &mut workers {
        worker.wait_for("[started]");
    }
    eventually("every job completed", || {
        q.status()["counts"]["completed"] == JOBS
    });
    let counts = &q.status()["counts"];
    assert_eq!(counts["pending"], 0);
    assert_eq!(counts["processing"], 0);
    assert_eq!(counts["failed"], 0);
    assert_eq!(counts["dead"], 0);

    q.cmd(["worker", "stop"]).run();
    let mut claims = 0;
    for worker in &mut workers {
        assert!(worker.wait_exit().success());
        claims += worker.seen_containing("[running]").len();
    }
    assert_eq!(claims, JOBS, "each job claimed once in all");

    let text = std::fs::read_to_string(&log).unwrap();
    let mut runs: BTreeMap<&str, usize> = BTreeMap::new();
    for id in text.lines() {
        *runs.entry(id).or_default() += 1;
    }
    assert_eq!(runs.len(), JOBS, "every job ran: {runs:?}");
    assert!(runs.values().all(|&n| n == 1), "a job ran twice: {runs:?}");
    for job in q.json(&["list"]).as_array().unwrap() {
        assert_eq!(job["attempts"], 1, "{job}");
    }
}

#[test]
fn killed_worker_job_is_recovered_and_its_first_attempt_does_not_run_on() {
    let q = Queue::new();
    q.config_set("lease-timeout", "2");
    let log = q.scratch("attempts.log");
    let pids = q.scratch("pid");
    // Records the pid of its `sleep` in pid.ATTEMPT, then logs its start and end.
    let command = format!(
        "echo start $QUEUECTL_ATTEMPT >> '{0}'; sleep 3 & pid=$!; echo $pid > '{1}.tmp'; \
         mv '{1}.tmp' '{1}'.$QUEUECTL_ATTEMPT; wait $pid; echo done $QUEUECTL_ATTEMPT >> '{0}'",
        log.display(),
        pids.display()
    );
    q.enqueue(&serde_json::json!({ "id": "long", "command": command }).to_string());

    let mut first = q.worker(&[]);
    first.wait_for("[running] job long (attempt 1)");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let sleep_pid = support::read_pid(&pids.with_extension("1"));
    assert!(read().contains("start 1"));
    first.kill_and_reap();
    // The dead worker's job does not run on unobserved.
    eventually("the killed worker's job to end", || {
        support::process_gone(sleep_pid)
    });

    let mut second = q.worker(&[]);
    second.wait_for("[running] job long (attempt 2)");
    second.wait_for("[completed] job long");
    // Attempt 2 slept 3 s, so the first attempt would have finished its own `sleep 3` and
    // logged "done 1" by now had it survived the kill.
    assert_eq!(
        read(),
        "start 1\nstart 2\ndone 2\n",
        "the orphaned attempt ran on"
    );

    let job = q.job("long");
    assert_eq!(job["state"], "completed");
    assert_eq!(job["attempts"], 2);
    assert_eq!(
        q.json(&["list", "--state", "processing"]),
        Value::Array(vec![])
    );
    let status = q.status();
    assert_eq!(status["counts"]["processing"], 0);
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(
        workers.len(),
        1,
        "the killed worker is deregistered: {workers:?}"
    );
    assert_eq!(workers[0]["pid"], second.pid().as_raw());
}

#[test]
fn status_counts_workers_as_count_does() {
    let q = Queue::new();
    let mut three = q.worker(&["--count", "3"]);
    let mut two = q.worker(&["--count", "2"]);
    // A worker registers before it says it started.
    three.wait_for("[started]");
    two.wait_for("[started]");
    let status = q.status();
    assert_eq!(status["worker_slots"], 5, "{status}");
    assert_eq!(status["worker_processes"], 2, "{status}");
    let text = q.run(&["status"]);
    assert!(
        text.contains("Workers: 5 (running up to 5 job(s) at once) in 2 process(es)"),
        "{text}"
    );
    three.signal(Signal::SIGTERM);
    two.signal(Signal::SIGTERM);
    assert!(three.wait_exit().success() && two.wait_exit().success());
}

#[test]
fn jobs_survive_a_restart() {
    let q = Queue::new();
    q.config_set("max-retries", "1");
    q.enqueue(r#"{"id":"ok","command":"echo fine"}"#);
    q.enqueue(r#"{"id":"bad","command":"exit 3"}"#);
    q.enqueue(r#"{"id":"later","command":"echo later","delay":3600}"#);
    q.enqueue(r#"{"id":"prio","command":"echo p","priority":7,"delay":3600}"#);

    let mut worker = q.worker(&[]);
    worker.wait_for("[completed] job ok");
    worker.wait_for("[dead] job bad");
    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit().success());
    drop(worker);

    // Every process has exited; new ones see the same jobs in the same states.
    let before = q.json(&["list"]);
    let expected: Vec<(String, String)> = [
        ("ok", "completed"),
        ("bad", "dead"),
        ("later", "pending"),
        ("prio", "pending"),
    ]
    .map(|(id, state)| (id.to_owned(), state.to_owned()))
    .into();
    assert_eq!(states(&before), expected);
    let after = q.json(&["list"]);
    assert_eq!(before, after, "a second invocation reads the same records");
    assert_eq!(after[1]["exit_code"], 3);
    assert_eq!(after[3]["priority"], 7);
    assert_eq!(q.run(&["config", "get", "max-retries"]), "1\n");
    let counts = &q.status()["counts"];
    assert_eq!(
        (
            counts["pending"].as_u64(),
            counts["completed"].as_u64(),
            counts["dead"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
}

#[test]
fn sigterm_lets_the_running_job_finish_and_claims_no_more() {
    let q = Queue::new();
    let started = q.scratch("started");
    let command = format!("touch '{}'; sleep 1.5; echo finished", started.display());
    q.enqueue(&serde_json::json!({ "id": "first", "command": command }).to_string());
    q.enqueue(r#"{"id":"second","command":"echo second"}"#);

    let mut worker = q.worker(&["--count", "1"]);
    worker.wait_for("[running] job first");
    // Once it runs: a claimed job no executor has started yet is handed back instead.
    eventually("the job to start", || started.exists());
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit();
    assert!(status.success(), "{status}\n{}", worker.transcript());
    assert_eq!(
        worker.seen_containing("[completed] job first").len(),
        1,
        "{}",
        worker.transcript()
    );
    assert!(worker.seen_containing("[running] job second").is_empty());

    let first = q.job("first");
    assert_eq!(first["state"], "completed");
    assert_eq!(first["output"].as_str().unwrap().trim_end(), "finished");
    let second = q.job("second");
    assert_eq!(second["state"], "pending");
    assert_eq!(second["attempts"], 0);
    assert_eq!(q.status()["workers"], Value::Array(vec![]));
}

#[test]
fn ctrl_c_reaches_the_worker_but_not_its_job() {
    let q = Queue::new();
    let started = q.scratch("started");
    let command = format!("touch '{}'; sleep 1; echo survived", started.display());
    q.enqueue(&serde_json::json!({ "id": "job", "command": command }).to_string());
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job job");
    // Only once the command runs: a signal sent while the shell is being spawned (before it
    // has left the worker's group) still reaches it.
    eventually("the job to start", || started.exists());
    // A terminal sends SIGINT to its whole foreground group; the job runs in a group of its
    // own, so only the worker hears it and lets the job finish.
    worker.signal_group(Signal::SIGINT);
    worker.wait_for("[signal] SIGINT");
    assert!(worker.wait_exit().success(), "{}", worker.transcript());
    assert_eq!(worker.seen_containing("[completed] job job").len(), 1);
    let job = q.job("job");
    assert_eq!(job["state"], "completed");
    assert_eq!(job["output"].as_str().unwrap().trim_end(), "survived");
}

#[test]
fn second_signal_kills_the_job_and_hands_it_back_uncharged() {
    let q = Queue::new();
    let pid_file = q.scratch("pid");
    let command = format!(
        "sleep 20 & pid=$!; echo $pid > '{0}.tmp'; mv '{0}.tmp' '{0}'; wait $pid",
        pid_file.display()
    );
    q.enqueue(&serde_json::json!({ "id": "long", "command": command }).to_string());
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job long");
    let sleep_pid = support::read_pid(&pid_file);
    worker.signal(Signal::SIGTERM);
    worker.wait_for("[stopping]");
    let second = Instant::now();
    worker.signal(Signal::SIGINT);
    worker.wait_for("[released] job long");
    assert!(worker.wait_exit().success(), "{}", worker.transcript());
    assert!(second.elapsed() < Duration::from_secs(10));

    let job = q.job("long");
    assert_eq!(job["state"], "pending");
    assert_eq!(
        job["attempts"], 0,
        "a forced stop does not charge the attempt"
    );
    assert_eq!(q.status()["workers"], Value::Array(vec![]));
    assert!(
        support::process_gone(sleep_pid),
        "the job was killed, not left behind"
    );
}

#[test]
fn worker_stop_stops_every_worker_process() {
    let q = Queue::new();
    q.config_set("lease-timeout", "1");
    let mut a = q.worker(&[]);
    let mut b = q.worker(&["--count", "2"]);
    a.wait_for("[started]");
    b.wait_for("[started]");
    assert_eq!(q.status()["workers"].as_array().unwrap().len(), 2);

    let out = q.cmd(["worker", "stop", "--timeout", "20"]).run();
    assert_eq!(out.stdout, "");
    assert!(out.stderr.contains("asked 2 worker(s)"), "{}", out.stderr);
    assert!(a.wait_exit().success(), "{}", a.transcript());
    assert!(b.wait_exit().success(), "{}", b.transcript());
    assert_eq!(q.status()["workers"], Value::Array(vec![]));

    let out = q.cmd(["worker", "stop"]).run();
    assert!(out.stderr.contains("no workers"), "{}", out.stderr);
}

#[test]
fn invalid_command_dies_without_crashing_the_worker() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"bad","command":"definitely-not-a-command-xyz","max_retries":1}"#);
    q.enqueue(r#"{"id":"good","command":"echo still here"}"#);

    let mut worker = q.worker(&[]);
    worker.wait_for("[dead] job bad");
    worker.wait_for("[completed] job good");
    assert!(worker.is_running());

    let bad = q.job("bad");
    assert_eq!(bad["state"], "dead");
    assert_eq!(bad["attempts"], 1);
    assert_eq!(bad["exit_code"], 127);
    assert!(!bad["last_error"].is_null(), "{bad}");
    assert!(
        bad["output"].as_str().unwrap_or("").contains("not found"),
        "the shell's complaint is kept: {bad}"
    );
    assert_eq!(q.job("good")["state"], "completed");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"existing","command":"echo hi"}"#);
    let before = (q.json(&["list"]), q.json(&["config", "show"]));

    let stdin_batch = "{\"id\":\"b1\",\"command\":\"echo 1\"}\n\
                       {\"id\":\"b2\",\"command\":\"\"}\n\
                       {\"id\":\"b3\",\"command\":\"echo 3\"}\n";
    // (args, stdin, exit code, part of the error message)
    let cases: &[(&[&str], Option<&str>, i32, &str)] = &[
        (&["enqueue", "not json"], None, 1, "invalid job JSON"),
        (&["enqueue", "[1]"], None, 1, "must be a JSON object"),
        (
            &["enqueue", r#"["x","echo hi",null,null,null,null,null]"#],
            None,
            1,
            "not an array",
        ),
        (&["enqueue", r#""a string""#], None, 1, "not a string"),
        (&["enqueue", r#"{"id":"x"}"#], None, 1, "no \"command\""),
        (
            &["enqueue", r#"{"command":""}"#],
            None,
            1,
            "command is empty",
        ),
        (
            &["enqueue", r#"{"command":"   "}"#],
            None,
            1,
            "command is empty",
        ),
        (
            &["enqueue", r#"{"command":"x","colour":"red"}"#],
            None,
            1,
            "unknown field `colour`",
        ),
        (
            &["enqueue", r#"{"id":"../x","command":"x"}"#],
            None,
            1,
            "invalid job id",
        ),
        (
            &["enqueue", r#"{"id":"a b","command":"x"}"#],
            None,
            1,
            "invalid job id",
        ),
        (
            &["enqueue", r#"{"command":"x","max_retries":-1}"#],
            None,
            1,
            "invalid job JSON",
        ),
        (
            &["enqueue", r#"{"id":"existing","command":"x"}"#],
            None,
            1,
            "job existing already exists",
        ),
        (
            &["enqueue", r#"{"command":"x","run_at":"tomorrow"}"#],
            None,
            1,
            "invalid job JSON",
        ),
        (
            &["enqueue", r#"{"command":"x","delay":-1}"#],
            None,
            1,
            "invalid \"delay\"",
        ),
        (&["enqueue", "-"], Some(stdin_batch), 1, "line 2"),
        (
            &["enqueue", "-"],
            Some("{\"id\":\"c1\",\"command\":\"x\"}\n\n{\"id\":\"c1\",\"command\":\"y\"}\n"),
            1,
            "job on line 3 of standard input refused: line 1 has its id c1 too",
        ),
        (
            &["enqueue", "-"],
            Some("{\"id\":\"c2\",\"command\":\"x\"}\n{\"id\":\"existing\",\"command\":\"y\"}\n"),
            1,
            "line 2 of standard input refused; nothing was enqueued\ncaused by: job existing already exists",
        ),
        (
            &["config", "set", "max-retries", "-1"],
            None,
            1,
            "invalid value",
        ),
        (
            &["config", "set", "max-retries", "many"],
            None,
            1,
            "invalid value",
        ),
        (
            &["config", "set", "backoff-base", "0"],
            None,
            1,
            "invalid value",
        ),
        (
            &["config", "set", "nope", "1"],
            None,
            1,
            "unknown config key",
        ),
        (&["config", "get", "nope"], None, 1, "unknown config key"),
        (&["list", "--state", "bogus"], None, 2, "bogus"),
        (
            &["worker", "stop", "--timeout", "1e19"],
            None,
            2,
            "expected seconds",
        ),
        (
            &["worker", "stop", "--timeout=-1"],
            None,
            2,
            "expected seconds",
        ),
        (
            &["purge", "--older-than", "1e15"],
            None,
            2,
            "expected seconds",
        ),
        (&["worker", "start", "--count", "0"], None, 2, "--count"),
        (
            &["worker", "start", "--prefetch", "18446744073709551615"],
            None,
            2,
            "--prefetch",
        ),
        (
            &["worker", "start", "--prefetch", "sometimes"],
            None,
            2,
            "expected \"auto\" or a number of jobs from 0 to 100000",
        ),
        (&["frobnicate"], None, 2, "frobnicate"),
        (&["show", "missing-id"], None, 1, "job missing-id not found"),
        (&["show", "../etc"], None, 1, "invalid job id"),
        (
            &["dlq", "retry", "missing-id"],
            None,
            1,
            "job missing-id not found",
        ),
        (&["dlq", "retry", "existing"], None, 1, "it is pending"),
        (&["dlq", "retry"], None, 2, "required"),
    ];
    for (args, stdin, code, message) in cases {
        let mut cmd = q.cmd(*args).status(*code);
        if let Some(input) = stdin {
            cmd = cmd.stdin(*input);
        }
        let out = cmd.run();
        assert_eq!(out.stdout, "", "{args:?} printed on stdout");
        let first = out.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: "),
            "{args:?}: stderr does not start with `error: `:\n{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(message),
            "{args:?}: expected {message:?} in:\n{}",
            out.stderr
        );
        if *code == 1 {
            // One `error:` line, then only its causes, each said once.
            let lines: Vec<&str> = out.stderr.lines().collect();
            assert!(
                lines[1..].iter().all(|l| l.starts_with("caused by: ")),
                "{args:?}:\n{}",
                out.stderr
            );
            for pair in lines.windows(2) {
                let said = pair[0].split_once(": ").map_or("", |(_, m)| m);
                let cause = pair[1].trim_start_matches("caused by: ");
                assert!(
                    !said.ends_with(cause),
                    "{args:?}: a cause repeats the line before it:\n{}",
                    out.stderr
                );
            }
        }
        let after = (q.json(&["list"]), q.json(&["config", "show"]));
        assert_eq!(after, before, "{args:?} changed the store");
    }
}

#[test]
fn job_timeout_kills_the_command() {
    let q = Queue::new();
    q.config_set("job-timeout", "1");
    let marker = q.scratch("survived");
    let command = format!("sleep 30; touch '{}'", marker.display());
    q.enqueue(
        &serde_json::json!({ "id": "slow", "command": command, "max_retries": 1 }).to_string(),
    );
    assert_eq!(q.job("slow")["timeout"], 1.0);

    let started = Instant::now();
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job slow");
    let dead = worker.wait_for("[dead] job slow");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout did not stop the job"
    );
    assert!(dead.text.contains("timed out"), "{}", dead.text);
    let job = q.job("slow");
    assert_eq!(job["state"], "dead");
    assert!(
        job["last_error"].as_str().unwrap().contains("timed out"),
        "{job}"
    );
    assert!(!marker.exists());
}

#[test]
fn closed_stdout_is_not_an_error() {
    let q = Queue::new();
    let input: String = (0..2000)
        .map(|n| format!("{{\"id\":\"pipe-{n:04}\",\"command\":\"echo {n}\"}}\n"))
        .collect();
    q.cmd(["enqueue", "-"]).stdin(input).run();

    for args in ["list", "list --json", "status", "dlq list --json"] {
        let status_file = q.scratch("status");
        let script = format!("{{ \"$0\" --home \"$1\" {args}; echo $? > \"$2\"; }} | head -1",);
        let out = support::run_sh(
            &script,
            &[BIN.as_ref(), q.home().as_os_str(), status_file.as_os_str()],
        );
        assert!(out.status.success());
        assert_eq!(out.stdout.lines().count(), 1, "{args}: {}", out.stdout);
        assert_eq!(
            out.stderr, "",
            "`queuectl {args} | head -1` printed an error"
        );
        assert_eq!(
            std::fs::read_to_string(&status_file).unwrap().trim(),
            "0",
            "`queuectl {args}` exit status"
        );
    }
}

#[test]
fn worker_keeps_working_when_its_log_reader_goes_away() {
    let q = Queue::new();
    let input: String = (0..3)
        .map(|n| format!("{{\"id\":\"w{n}\",\"command\":\"sleep 0.2\"}}\n"))
        .collect();
    q.cmd(["enqueue", "-"]).stdin(input).run();
    let status_file = q.scratch("status");
    // `head` exits after the first line; the worker's next lines meet a closed pipe.
    let script = "{ \"$0\" --home \"$1\" worker start --exit-when-idle 2>&1; echo $? > \"$2\"; } \
                  | head -1";
    let out = support::run_sh(
        script,
        &[BIN.as_ref(), q.home().as_os_str(), status_file.as_os_str()],
    );
    assert!(out.status.success());
    assert!(out.stdout.contains("[started]"), "{}", out.stdout);
    assert_eq!(
        std::fs::read_to_string(&status_file).unwrap().trim(),
        "0",
        "the worker's exit status"
    );
    for (id, state) in list(&q) {
        assert_eq!(state, "completed", "{id}");
    }
}

#[test]
fn json_output_is_json_only() {
    let q = Queue::new();
    // No store yet: an empty result, and a note on stderr, not on stdout.
    for args in [&["list"][..], &["dlq", "list"]] {
        let out = q.cmd(args).args(["--json"]).run();
        assert_eq!(out.stdout.trim_end(), "[]");
        assert!(
            out.stderr.starts_with("note: there is no queue at"),
            "{}",
            out.stderr
        );
    }
    assert!(!q.home().exists(), "reading created no store");

    q.config_set("max-retries", "1");
    let out = q
        .cmd(["enqueue", "--json", r#"{"id":"a","command":"echo a"}"#])
        .run();
    assert_eq!(out.json()["id"], "a");
    q.enqueue(r#"{"id":"b","command":"exit 1"}"#);
    q.cmd(["worker", "start", "--exit-when-idle"]).run();

    for args in [
        &["status", "--json"][..],
        &["list", "--json"],
        &["list", "--json", "--state", "dead"],
        &["show", "a", "--json"],
        &["config", "show", "--json"],
        &["dlq", "list", "--json"],
    ] {
        let out = q.cmd(args).run();
        let value = out.json();
        assert!(value.is_object() || value.is_array(), "{args:?}: {value}");
        assert_eq!(out.stderr, "", "{args:?}");
    }
    let status = q.status();
    assert_eq!(status["counts"]["completed"], 1);
    assert_eq!(status["counts"]["dead"], 1);
    assert_eq!(status["total"], 2);
    assert_eq!(status["config"]["max-retries"], 1);
    let dead = q.json(&["dlq", "list"]);
    assert_eq!(states(&dead), [("b".to_owned(), "dead".to_owned())]);
    let limited = q.json(&["list", "--limit", "1"]);
    assert_eq!(states(&limited), [("a".to_owned(), "completed".to_owned())]);
}

#[test]
fn config_set_persists_and_show_lists_every_key() {
    let q = Queue::new();
    const KEYS: [&str; 8] = [
        "max-retries",
        "backoff-base",
        "backoff-cap",
        "worker-count",
        "job-timeout",
        "lease-timeout",
        "completed-retention",
        "output-limit",
    ];
    assert_eq!(q.run(&["config", "get", "max-retries"]), "3\n");

    let out = q.cmd(["config", "set", "max-retries", "5"]).run();
    assert_eq!(out.stdout, "");
    q.config_set("backoff-base", "3");
    q.config_set("worker-count", "4");
    assert_eq!(q.run(&["config", "get", "max-retries"]), "5\n");
    assert_eq!(q.run(&["config", "get", "backoff-base"]), "3\n");
    assert_eq!(q.run(&["config", "get", "worker-count"]), "4\n");

    let shown = q.json(&["config", "show"]);
    let object = shown.as_object().unwrap();
    for key in KEYS {
        assert!(
            object.contains_key(key),
            "config show --json lacks {key}: {shown}"
        );
    }
    assert_eq!(object.len(), KEYS.len(), "{shown}");
    assert_eq!(shown["max-retries"], 5);
    let text = q.run(&["config", "show"]);
    for key in KEYS {
        assert!(text.contains(key), "config show lacks {key}:\n{text}");
    }

    // New jobs take the setting.
    q.enqueue(r#"{"id":"j","command":"true"}"#);
    assert_eq!(q.job("j")["max_retries"], 5);
    // QUEUECTL_HOME names the same store as --home.
    let out = support::Cmd::without_home()
        .env("QUEUECTL_HOME", q.home())
        .args(["config", "get", "max-retries"])
        .run();
    assert_eq!(out.stdout, "5\n");
}

#[test]
fn enqueue_from_stdin_adds_every_line() {
    let q = Queue::new();
    let input = "{\"id\":\"one\",\"command\":\"echo 1\"}\n\
                 \n\
                 {\"command\":\"echo 2\",\"priority\":5}\n\
                 {\"id\":\"three\",\"command\":\"echo 3\",\"max_retries\":0}\n";
    let out = q.cmd(["enqueue", "-"]).stdin(input).run();
    let ids: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{}", out.stdout);
    assert_eq!(ids[0], "one");
    assert_eq!(ids[2], "three");
    assert!(!ids[1].is_empty());

    let listed: Vec<String> = states(&q.json(&["list"]))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(q.job(ids[1])["priority"], 5);
    assert_eq!(q.job("three")["max_retries"], 0);

    // The higher priority job runs first.
    let out = q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let running: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("[running]"))
        .collect();
    assert_eq!(running.len(), 3, "{}", out.stderr);
    assert!(running[0].contains(ids[1]), "{}", out.stderr);
}

#[test]
fn an_unrelated_home_is_refused_and_left_untouched() {
    let q = Queue::new();
    std::fs::create_dir_all(q.home()).unwrap();
    std::fs::write(q.home().join("thesis.tex"), "years of work").unwrap();
    std::fs::write(q.home().join(".tmp-autosave"), "more work").unwrap();
    for args in [
        &["list"][..],
        &["status"],
        &["enqueue", r#"{"command":"true"}"#],
        &["worker", "start", "--exit-when-idle"],
        &["config", "set", "max-retries", "2"],
        &["dlq", "clear"],
    ] {
        let out = q.cmd(args).status(1).run();
        assert!(
            out.stderr.contains("is not a queuectl store")
                && out.stderr.contains(&q.home().display().to_string()),
            "{args:?}: {}",
            out.stderr
        );
        assert_eq!(out.stdout, "", "{args:?}");
    }
    let mut names: Vec<_> = std::fs::read_dir(q.home())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [".tmp-autosave", "thesis.tex"]);
    assert_eq!(
        std::fs::read_to_string(q.home().join(".tmp-autosave")).unwrap(),
        "more work"
    );
}

#[test]
fn reading_a_missing_queue_shows_it_empty_and_creates_nothing() {
    let q = Queue::new();
    let status = q.cmd(["status", "--json"]).run();
    assert_eq!(status.json()["total"], 0);
    assert!(
        status.stderr.contains("there is no queue at"),
        "{}",
        status.stderr
    );
    let out = q.cmd(["show", "nope"]).status(1).run();
    assert!(out.stderr.contains("job nope not found"), "{}", out.stderr);
    // No jobs is said on stderr: stdout, the data, is empty.
    for (list, says) in [
        (&["list"][..], "no jobs"),
        (&["dlq", "list"], "the dead letter queue is empty"),
    ] {
        let out = q.cmd(list).run();
        assert_eq!(out.stdout, "", "{list:?}");
        assert!(out.stderr.contains(says), "{list:?}: {}", out.stderr);
    }
    q.cmd(["config", "show"]).run();
    let out = q.cmd(["dlq", "retry", "x"]).status(1).run();
    assert!(
        out.stderr.contains("there is no queue at"),
        "{}",
        out.stderr
    );
    let out = q.cmd(["check"]).status(1).run();
    assert!(
        out.stderr.contains("there is no queue at"),
        "{}",
        out.stderr
    );
    // Refused settings are refused before a store is made for them.
    for (setting, says) in [
        (["max-retries", "many"], "max-retries"),
        (["no-such-key", "1"], "no-such-key"),
    ] {
        let out = q.cmd(["config", "set"]).args(setting).status(1).run();
        assert!(out.stderr.contains(says), "{}", out.stderr);
    }
    // Every queue paused where there are none: nothing to change, nothing made.
    let out = q.cmd(["queue", "pause"]).run();
    assert!(out.stderr.contains("no queues yet"), "{}", out.stderr);
    assert!(!q.home().exists());
}

/// Runs `script` with `$Q` the binary and `$H` the store, in a private mount namespace where
/// the store is mounted read-only; `None` where this machine cannot do that.
fn on_a_read_only_mount(q: &Queue, script: &str) -> Option<support::Output> {
    let setup = "mount --bind \"$H\" \"$H\" && mount -o remount,ro,bind \"$H\"";
    let probe = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", setup])
        .env("H", q.home())
        .output();
    if !matches!(&probe, Ok(out) if out.status.success()) {
        return None;
    }
    let full = format!("{setup} && {script}");
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &full])
        .env("H", q.home())
        .env("Q", support::BIN)
        .output()
        .unwrap();
    Some(support::Output {
        status: out.status,
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    })
}

#[test]
fn a_read_only_store_can_still_be_read() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"a","command":"echo a"}"#);
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    q.enqueue(r#"{"id":"b","command":"echo b"}"#);

    let Some(out) = on_a_read_only_mount(
        &q,
        "$Q --home \"$H\" list && $Q --home \"$H\" show a && $Q --home \"$H\" status --json",
    ) else {
        println!("skipped the read-only mount: this machine cannot make a mount namespace");
        return read_as_another_user(&q);
    };
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("a   default  completed"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("\"pending\": 1"), "{}", out.stdout);
    let out =
        on_a_read_only_mount(&q, "$Q --home \"$H\" enqueue '{\"command\":\"true\"}'").unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    // A change of every queue is a change: refused with the store's own reason.
    let out = on_a_read_only_mount(&q, "$Q --home \"$H\" queue pause").unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("could not open the store") && !out.stderr.contains("read-only"),
        "{}",
        out.stderr
    );
    read_as_another_user(&q);
}

/// Another user reads a store its owner made readable to others.
fn read_as_another_user(q: &Queue) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // The store was made by this process: its owner is who we are.
    if std::fs::metadata(q.home()).unwrap().uid() != 0 {
        println!("skipped reading as another user: needs root to switch users");
        return;
    }
    let open = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(q.home().parent().unwrap(), 0o755);
    open(q.home(), 0o755);
    for entry in std::fs::read_dir(q.home()).unwrap() {
        open(&entry.unwrap().path(), 0o644);
    }
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", support::BIN, "--home"])
        .arg(q.home())
        .args(["list", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");
}

#[test]
fn check_says_what_it_found() {
    let q = Queue::new();
    let batch: String = (0..2000)
        .map(|i| format!("{{\"command\":\"echo {i} and some words to fill pages\"}}\n"))
        .collect();
    q.cmd(["enqueue", "-"]).stdin(batch).run();
    let out = q.cmd(["check"]).run();
    assert!(out.stdout.starts_with("ok: "), "{}", out.stdout);
    let db = q.home().join("queuectl.db");
    let mut bytes = std::fs::read(&db).unwrap();
    // The second half of the file: pages of the jobs table among them, whatever the layout.
    let page = 4096 * (bytes.len() / 4096 / 2);
    bytes[page..].fill(0xa5);
    std::fs::write(&db, &bytes).unwrap();
    let out = q.cmd(["check"]).status(1).run();
    assert!(out.stdout.contains("has problems"), "{}", out.stdout);
    assert!(out.stderr.contains("is damaged"), "{}", out.stderr);
    let report = q.cmd(["check", "--json"]).status(1).run().json();
    assert_eq!(report["ok"], false);
    let path = db.display().to_string();
    assert_eq!(
        (&report["store"], &report["path"]),
        (&path.clone().into(), &path.into())
    );
    assert!(!report["problems"].as_array().unwrap().is_empty());
    let out = q.cmd(["list"]).status(1).run();
    assert!(
        out.stderr.contains("corrupt") && out.stderr.contains(&db.display().to_string()),
        "{}",
        out.stderr
    );
}

#[test]
fn a_worker_stops_with_a_clear_error_when_its_store_is_deleted() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"a","command":"true"}"#);
    let mut worker = q.worker(&[]);
    worker.wait_for("[completed] job a");
    std::fs::remove_dir_all(q.home()).unwrap();
    let status = worker.wait_exit();
    assert!(!status.success(), "{}", worker.transcript());
    assert!(
        worker.transcript().contains("deleted or replaced"),
        "{}",
        worker.transcript()
    );
    assert!(!q.home().exists(), "the worker recreated nothing");
}

#[test]
fn a_queue_of_the_journal_format_is_imported_by_the_first_command() {
    let q = Queue::new();
    std::fs::create_dir_all(q.home()).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../queuectl-core/tests/fixtures/file-v1");
    for file in ["snapshot", "journal"] {
        std::fs::copy(fixture.join(file), q.home().join(file)).unwrap();
    }
    let out = q.cmd(["list", "--json"]).run();
    assert!(
        out.stderr.contains("imported 7 job(s)") && out.stderr.contains("imported-v1"),
        "{}",
        out.stderr
    );
    assert_eq!(out.json().as_array().unwrap().len(), 7);
    assert!(q.home().join("imported-v1/journal").exists());
    let again = q.cmd(["status"]).run();
    assert!(!again.stderr.contains("imported"), "{}", again.stderr);
}

#[test]
fn the_history_records_the_signal_that_killed_a_job() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"k","command":"kill -9 $$","max_retries":1}"#);
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let job = q.job("k");
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{job}");
    assert_eq!(history[0]["signal"], 9, "{job}");
    assert_eq!(history[0]["exit_code"], Value::Null, "{job}");
    assert!(q.run(&["show", "k"]).contains("signal 9"));
}

#[test]
fn completions_and_the_manual_describe_the_commands_without_a_store() {
    let q = Queue::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = q.cmd(["completions", shell]).run();
        assert!(
            out.stdout.contains("enqueue") && out.stdout.contains("dlq"),
            "{shell}: {}",
            out.stdout
        );
    }
    let man = q.cmd(["man"]).run().stdout;
    assert!(man.starts_with(".ie") || man.starts_with(".TH"), "{man}");
    assert!(
        man.contains(".TH queuectl 1") && man.contains("enqueue"),
        "{man}"
    );
    q.cmd(["completions", "tcsh"]).status(2).run();
    assert!(!q.home().exists(), "no store was created");
}

#[test]
fn list_pages_newest_first_and_config_has_list_and_get_json() {
    let q = Queue::new();
    for i in 0..5 {
        q.enqueue(&format!(r#"{{"id":"j{i}","command":"true"}}"#));
    }
    let ids = |args: &[&str]| -> Vec<String> {
        states(&q.json(args))
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    assert_eq!(ids(&["list", "--newest", "--limit", "2"]), ["j4", "j3"]);
    assert_eq!(
        ids(&["list", "--offset", "1", "--limit", "2"]),
        ["j1", "j2"]
    );
    assert_eq!(
        ids(&["list", "--newest", "--offset", "3", "--state", "pending"]),
        ["j1", "j0"]
    );
    assert_eq!(q.run(&["config", "list"]), q.run(&["config", "show"]));
    q.config_set("max-retries", "7");
    let got = q.json(&["config", "get", "max-retries"]);
    assert_eq!(got, serde_json::json!({"key": "max-retries", "value": 7}));
    let out = q.cmd(["config", "get", "nope", "--json"]).status(1).run();
    assert_eq!(out.stdout, "");
}

#[test]
fn more_bad_input_is_refused_and_changes_nothing() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"keep","command":"true"}"#);
    let long = format!("{{\"command\":\"echo {}\"}}\n", "x".repeat(130 * 1024));
    for (job, says) in [
        (
            r#"{"command":"a","command":"b"}"#.to_owned(),
            "duplicate field",
        ),
        (
            r#"{"command":"true","timeout":1e-12}"#.to_owned(),
            "too short",
        ),
        (long, "at most 130000"),
    ] {
        // On stdin: the long one would not even fit in the command line.
        let out = q.cmd(["enqueue", "-"]).stdin(job).status(1).run();
        let chain = out.stderr.to_lowercase();
        assert!(chain.contains(says), "{says}: {}", out.stderr);
        assert_eq!(out.stdout, "");
    }
    assert_eq!(states(&q.json(&["list"])).len(), 1, "nothing was enqueued");
    let out = q
        .cmd(["config", "set", "job-timeout", "0.0000001"])
        .status(1)
        .run();
    assert!(out.stderr.contains("or from 0.001"), "{}", out.stderr);
    // The longest command accepted runs.
    let longest = format!(
        "{{\"id\":\"longest\",\"command\":\": {}\"}}\n",
        "x".repeat(130_000 - 2)
    );
    q.cmd(["enqueue", "-"]).stdin(longest).run();
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    assert_eq!(q.job("longest")["state"], "completed");
    // `QUEUECTL_HOME=` set but empty counts as unset (the --home flag wins anyway).
    let out = q.cmd(["list"]).env("QUEUECTL_HOME", "").run();
    assert!(out.stdout.contains("keep"), "{}", out.stdout);
}

#[test]
fn job_text_cannot_drive_the_terminal_of_whoever_reads_it() {
    let q = Queue::new();
    // ESC ] 0 ; title BEL retitles a terminal, ESC [ 2 J clears it, CSI (U+009B) too.
    let hostile = "printf '\\033]0;pwned\\007\\033[2J\\302\\233'";
    q.enqueue(&serde_json::json!({"id": "x", "command": hostile}).to_string());
    q.enqueue(&serde_json::json!({"id": "y", "command": "echo \u{1b}[2J"}).to_string());
    let out = q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let shown = [
        q.run(&["list"]),
        q.run(&["show", "x"]),
        q.run(&["show", "y"]),
        out.stderr,
    ];
    for text in &shown {
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "raw control characters in {text:?}"
        );
    }
    assert!(
        shown[1].contains("\\x1b]0;pwned\\x07\\x1b[2J\\u{9b}"),
        "{}",
        shown[1]
    );
    assert!(shown[2].contains("echo \\x1b[2J"), "{}", shown[2]);
    // A one-line field cannot fake the lines after it, nor reorder itself.
    q.enqueue(
        &serde_json::json!({"id": "z", "command": "true\nstate        completed \u{202e}"})
            .to_string(),
    );
    let shown = q.run(&["show", "z"]);
    assert_eq!(shown.matches("\nstate ").count(), 1, "{shown}");
    assert!(
        shown.contains("true\\x0astate        completed \\u{202e}"),
        "{shown}"
    );
    // JSON keeps the bytes as they are.
    let job = q.job("x");
    assert_eq!(job["output"], "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}");
}

#[test]
fn wait_blocks_until_jobs_finish_and_says_how_they_ended() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"ok","command":"true"}"#);
    q.enqueue(r#"{"id":"bad","command":"exit 3","max_retries":1}"#);
    // Nobody runs them: the timeout has its own exit code.
    let out = q.cmd(["wait", "ok", "--timeout", "0.2"]).status(124).run();
    assert!(
        out.stderr.contains("timed out waiting for: ok (pending)"),
        "{}",
        out.stderr
    );
    // A waiter started before any worker returns when the worker (another process) is done.
    let waiter = std::process::Command::new(support::BIN)
        .arg("--home")
        .arg(q.home())
        .args(["wait", "ok"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(waiter.wait_with_output().unwrap()).unwrap());
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let waited = rx.recv_timeout(support::TIMEOUT).expect("wait returned");
    assert!(waited.status.success(), "{waited:?}");
    assert_eq!(String::from_utf8_lossy(&waited.stdout), "ok completed\n");
    // One did not complete: exit 1, naming it.
    let out = q.cmd(["wait", "ok", "bad"]).status(1).run();
    assert_eq!(out.stdout, "ok completed\nbad dead\n");
    assert!(
        out.stderr.contains("not every job completed: bad (dead)"),
        "{}",
        out.stderr
    );
    q.cmd(["wait", "nope"]).status(1).run();
}

#[test]
fn logs_print_an_attempts_output_as_it_was() {
    let q = Queue::new();
    q.config_set("backoff-base", "1");
    q.config_set("backoff-cap", "0");
    let command = "printf 'attempt %s\\033[0m\\n' $QUEUECTL_ATTEMPT; test $QUEUECTL_ATTEMPT = 2";
    q.enqueue(&serde_json::json!({"id": "j", "command": command}).to_string());
    q.enqueue(r#"{"id":"never","command":"true","delay":3600}"#);
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    assert_eq!(q.job("j")["state"], "completed");
    // Into a pipe: the bytes as they were.
    assert_eq!(q.run(&["logs", "j"]), "attempt 2\u{1b}[0m\n");
    assert_eq!(
        q.run(&["logs", "j", "--attempt", "1"]),
        "attempt 1\u{1b}[0m\n"
    );
    let out = q.cmd(["logs", "j", "--attempt", "3"]).status(1).run();
    assert!(
        out.stderr.contains("no finished attempt 3"),
        "{}",
        out.stderr
    );
    let out = q.cmd(["logs", "never"]).status(1).run();
    assert!(
        out.stderr.contains("no finished attempt yet"),
        "{}",
        out.stderr
    );
    q.cmd(["logs", "nope"]).status(1).run();
}

/// Long operations draw progress on stderr when it is a terminal, and nothing when it is not.
#[test]
fn progress_shows_on_a_terminal_only() {
    let q = Queue::new();
    let batch: String = (0..3000).map(|_| "{\"command\":\"true\"}\n").collect();
    let piped = q.cmd(["enqueue", "-"]).stdin(batch.clone()).run();
    assert_eq!(piped.stderr, "", "nothing but data without a terminal");
    assert_eq!(piped.stdout.lines().count(), 3000);
    let ids: Vec<&str> = piped.stdout.lines().take(2).collect();
    let out = q
        .cmd(["wait", "--timeout", "0.1", ids[0], ids[1]])
        .status(124)
        .run();
    assert!(!out.stderr.contains("waiting: finished"), "{}", out.stderr);
    if !std::path::Path::new("/usr/bin/script").exists() {
        println!("skipped the terminal half: util-linux `script` is not installed");
        return;
    }
    let input = q.scratch("jobs.jsonl");
    std::fs::write(&input, batch).unwrap();
    let typescript = q.scratch("typescript");
    let command = format!(
        "{} --home '{}' enqueue - < '{}' > /dev/null",
        support::BIN,
        q.home().display(),
        input.display()
    );
    let status = std::process::Command::new("/usr/bin/script")
        .args(["-qec", &command])
        .arg(&typescript)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let drawn = std::fs::read_to_string(&typescript).unwrap();
    assert!(drawn.contains("adding jobs: 3000"), "{drawn}");
    assert_eq!(q.status()["counts"]["pending"], 6000);
}

/// `logs --follow` on a job waiting to run waits for it, prints what the running job prints
/// (from a worker in another process) before the job goes on, and ends with the job: exit 0
/// when it completed. Another follower, started while the job runs, prints what is there
/// first.
#[test]
fn logs_follow_prints_a_running_jobs_output_as_it_comes_and_ends_with_it() {
    let q = Queue::new();
    let gate = q.scratch("gate");
    support::make_gate(&gate);
    let command = format!("echo first; read _ < '{}'; echo second", gate.display());
    q.enqueue(&serde_json::json!({ "id": "j", "command": command }).to_string());
    let mut waiting = q.background(&["logs", "j", "--follow"]);
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job j");
    assert_eq!(waiting.next_line(), "first", "shown while the job waits");
    let mut late = q.background(&["logs", "j", "-f"]);
    assert_eq!(late.next_line(), "first");
    support::open_gate(&gate);
    for follower in [&mut waiting, &mut late] {
        assert_eq!(follower.next_line(), "second");
        let (status, rest, stderr) = follower.wait_exit();
        assert_eq!(status.code(), Some(0), "{stderr}");
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(stderr, "");
    }
    worker.wait_for("[completed] job j");
    // The job has ended: its output, at once.
    assert_eq!(q.run(&["logs", "j", "--follow"]), "first\nsecond\n");
}

/// A job that does not complete makes `logs --follow` exit 1, saying why; `--attempt N`
/// follows only the running attempt and refuses any other.
#[test]
fn logs_follow_exits_1_when_the_job_does_not_complete() {
    let q = Queue::new();
    let gate = q.scratch("gate");
    support::make_gate(&gate);
    let command = format!("echo trying; read _ < '{}'; exit 3", gate.display());
    let job = serde_json::json!({ "id": "j", "command": command, "max_retries": 1 });
    q.enqueue(&job.to_string());
    let out = q
        .cmd(["logs", "j", "--follow", "--attempt", "1"])
        .status(1)
        .run();
    assert!(
        out.stderr
            .contains("cannot follow attempt 1 of job j: it is pending"),
        "{}",
        out.stderr
    );
    let mut worker = q.worker(&[]);
    worker.wait_for("[running] job j");
    let mut job = q.background(&["logs", "j", "--follow"]);
    let mut attempt = q.background(&["logs", "j", "--follow", "--attempt", "1"]);
    assert_eq!(job.next_line(), "trying");
    assert_eq!(attempt.next_line(), "trying");
    let out = q
        .cmd(["logs", "j", "--follow", "--attempt", "2"])
        .status(1)
        .run();
    assert!(
        out.stderr.contains("it is running attempt 1"),
        "{}",
        out.stderr
    );
    support::open_gate(&gate);
    let (status, rest, stderr) = job.wait_exit();
    assert_eq!((status.code(), rest.len()), (Some(1), 0), "{stderr}");
    assert!(
        stderr.contains("attempt 1 failed: exited with code 3"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error: job j did not complete: it is dead"),
        "{stderr}"
    );
    let (status, _, stderr) = attempt.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("attempt 1 of job j did not succeed"),
        "{stderr}"
    );
    worker.wait_for("[dead] job j");
}

/// A database URL that cannot be read is refused before anything is tried, saying what is
/// wrong with it, in either form of the URL; the embedded store is left alone.
#[test]
fn an_unreadable_database_url_is_refused_with_its_fault() {
    let q = Queue::new();
    for (url, cause) in [
        ("postgres://u@h:notaport/db", "`port`"),
        ("host='h user=u", "not closed"),
        ("postgres://u@h/db?sslrootcert=%ff", "not UTF-8"),
    ] {
        let out = q
            .on_database(["--database-url", url, "enqueue", r#"{"command":"true"}"#])
            .status(1)
            .run();
        assert!(
            out.stderr.starts_with(
                "error: could not read the connection settings in the database URL given: it \
                 is not a PostgreSQL connection URL"
            ),
            "{url}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(cause), "{url}: {}", out.stderr);
        assert!(out.stdout.is_empty());
    }
    assert!(!q.home().exists(), "nothing was created");
}

/// Flags that contradict each other are refused before anything is opened: `--home` with a
/// database URL, and `--database-schema` with no database to put it in. The environment's
/// settings are defaults a flag overrides, not a contradiction.
#[test]
fn contradicting_store_flags_are_refused() {
    let q = Queue::new();
    let out = q
        .cmd([
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "status",
        ])
        .status(1)
        .run();
    assert!(out.stderr.contains("give one of them"), "{}", out.stderr);
    let out = q
        .cmd([
            "--database-schema",
            "jobs",
            "enqueue",
            r#"{"command":"true"}"#,
        ])
        .status(1)
        .run();
    assert!(
        out.stderr.contains("--database-schema needs"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    assert!(!q.home().exists(), "nothing was created");
    // A URL in the environment gives way to --home.
    q.cmd(["enqueue", r#"{"id":"here","command":"true"}"#])
        .env(
            "QUEUECTL_DATABASE_URL",
            "postgres://nobody@127.0.0.1:1/none",
        )
        .run();
    assert_eq!(q.job("here")["state"], "pending");
}

/// `dlq retry --all` runs one dead job per unique key again (the newest); the others stay dead,
/// and it says which and why instead of leaving them silently.
#[test]
fn dlq_retry_all_names_the_jobs_a_unique_key_keeps_dead() {
    let q = Queue::new();
    q.config_set("max-retries", "1");
    for id in ["old", "new"] {
        q.enqueue(&format!(
            r#"{{"id":"{id}","command":"exit 1","unique_key":"nightly"}}"#
        ));
        q.cmd(["worker", "start", "--exit-when-idle"]).run();
    }
    q.enqueue(r#"{"id":"plain","command":"exit 1"}"#);
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let out = q.cmd(["dlq", "retry", "--all"]).run();
    assert_eq!(out.stdout, "new\nplain\n");
    assert!(
        out.stderr.contains("job old stays dead") && out.stderr.contains("\"nightly\""),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("job new"), "{}", out.stderr);
    assert_eq!(q.job("old")["state"], "dead");
}

/// With a worker on the machine serving a PostgreSQL queue's enqueues (here a relay over a
/// memory store in the test, for a database nothing listens for), `enqueue` hands the jobs over
/// instead of connecting: they land in the relay's store, and the output is the same. What the
/// relay declines, or with no relay at all, the enqueue adds itself, so here it fails to
/// connect.
#[test]
fn enqueue_hands_its_jobs_to_the_worker_serving_the_machine() {
    use std::sync::Arc;

    use queuectl_core::relay::{self, Relay};
    use queuectl_core::{JobId, MemoryStorage, Storage};

    let q = Queue::new();
    let url = "postgres://nobody@127.0.0.1:9/nowhere";
    let key = relay::database_key(url, "queuectl");
    let runtime = support::runtime_dir(q.home());
    let socket = relay::socket_to_serve(&runtime.join("queuectl"), &key).unwrap();
    let store = Arc::new(MemoryStorage::new());
    let relay = Relay::start(store.clone(), &socket, &key)
        .unwrap()
        .expect("no other relay");
    let job = |id: &str| store.get(&JobId::new(id).unwrap()).unwrap();

    let out = q
        .on_database(["--database-url", url, "enqueue"])
        .args([r#"{"id":"one","command":"echo one","priority":3}"#])
        .run();
    assert_eq!(out.stdout, "one\n");
    assert_eq!(job("one").command, "echo one");
    assert_eq!(job("one").priority, 3);

    let out = q
        .on_database(["--database-url", url, "enqueue", "--json"])
        .args([r#"{"command":"echo two"}"#])
        .run()
        .json();
    let id = out["id"].as_str().unwrap();
    assert_eq!(out["duplicate"], false);
    assert_eq!(out["command"], "echo two");
    assert_eq!(job(id).command, "echo two");

    let out = q
        .on_database(["--database-url", url, "enqueue", "-"])
        .stdin("{\"id\":\"a\",\"command\":\"true\"}\n{\"id\":\"b\",\"command\":\"true\"}\n")
        .run();
    assert_eq!(out.stdout, "a\nb\n");
    assert_eq!(store.list(&Default::default()).unwrap().len(), 4);

    // Adding it here fails: nothing listens at the database's address.
    let added_here = |job: &str| {
        let out = q
            .on_database(["--database-url", url, "enqueue", job])
            .status(1)
            .run();
        assert!(out.stderr.contains("127.0.0.1:9"), "{}", out.stderr);
        assert_eq!(out.stdout, "");
    };
    // A taken id: the relay declines, and the enqueue connects itself.
    added_here(r#"{"id":"one","command":"true"}"#);
    assert_eq!(store.list(&Default::default()).unwrap().len(), 4);
    relay.stop();
    added_here(r#"{"id":"three","command":"true"}"#);
    assert_eq!(store.list(&Default::default()).unwrap().len(), 4);
}
