//! `ShellExecutor` end to end: real shells, real process groups, real signals.
//!
//! Waits are bounded: ordering comes from FIFOs the job writes to (never from sleeps), and
//! polling loops only observe that a process has died. Every case runs under both exit-watch
//! strategies (`pidfd::…` and `threads::…`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use queuectl_core::executor::{Canceller, cancel_pair};
use queuectl_core::shell::{ExitWatch, JOB_ID_VAR};
use queuectl_core::{
    CancelSignal, Executor, ExecutorError, Job, LiveOutput, MemoryStorage, NewJob, Outcome,
    ShellExecutor, Status, StorageExt, now,
};

mod support;

use support::{TIMEOUT as LONG, assert_gone, is_running, within};

fn job(id: &str, command: &str) -> Job {
    let mut job = MemoryStorage::new()
        .enqueue(NewJob::new(command).id(id).unwrap(), now())
        .unwrap();
    job.attempts = 1;
    job.timeout = None;
    job
}

/// An executor watching its leaders with `watch`.
fn shell(watch: ExitWatch) -> ShellExecutor {
    ShellExecutor::new().exit_watch(watch)
}

fn run(exec: &ShellExecutor, job: &Job) -> Outcome {
    exec.execute(job, &CancelSignal::never()).unwrap()
}

/// A FIFO at `dir/name` and a channel receiving what is written to it (by one writer).
fn fifo(dir: &Path, name: &str) -> (PathBuf, Receiver<String>) {
    let path = dir.join(name);
    mkfifo(&path, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let reader = path.clone();
    thread::spawn(move || {
        let _ = tx.send(fs::read_to_string(reader).unwrap());
    });
    (path, rx)
}

fn recv(what: &str, rx: &Receiver<String>) -> String {
    rx.recv_timeout(LONG)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn pid(text: &str) -> i32 {
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("not a pid {text:?}: {e}"))
}

/// Starts `job` on a thread with a fresh cancel signal; returns the canceller and the outcome.
fn start_cancellable(
    exec: ShellExecutor,
    job: Job,
) -> (Canceller, Receiver<Result<Outcome, ExecutorError>>) {
    let (canceller, signal) = cancel_pair();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(exec.execute(&job, &signal));
    });
    (canceller, rx)
}

fn exit_code_zero_succeeds_with_stdout_and_stderr_in_order(watch: ExitWatch) {
    let outcome = run(
        &shell(watch),
        &job("ok", "echo out; echo err >&2; echo out again"),
    );
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.output, "out\nerr\nout again\n");
    assert!(outcome.duration < LONG);
}

fn non_zero_exit_is_a_failure_with_its_code(watch: ExitWatch) {
    let outcome = run(&shell(watch), &job("three", "echo trying; exit 3"));
    assert_eq!(outcome.status, Status::Failed("exited with code 3".into()));
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.output, "trying\n");
    assert_eq!(outcome.error_message().unwrap(), "exited with code 3");
}

fn nothing_of_the_executor_is_visible_to_wait_and_jobs(watch: ExitWatch) {
    // A bare `wait` waits for the command's own background jobs only; `jobs` lists none of ours.
    let outcome = within("bare wait", move || {
        run(
            &shell(watch),
            &job("waits", "jobs; sleep 0.1 & wait; echo waited"),
        )
    });
    assert!(outcome.is_success(), "{outcome:?}");
    assert_eq!(outcome.output, "waited\n");
}

fn unknown_command_is_exit_127_not_an_error(watch: ExitWatch) {
    let outcome = run(
        &shell(watch),
        &job("missing", "queuectl-no-such-command-xyz --flag"),
    );
    assert_eq!(
        outcome.status,
        Status::Failed("exited with code 127 (command not found)".into())
    );
    assert_eq!(outcome.exit_code, Some(127));
    // What `sh -c` itself prints: no wrapper (`eval`, `queuectl-job`) shows through.
    let raw = Command::new("sh")
        .args(["-c", "queuectl-no-such-command-xyz --flag"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(outcome.output, String::from_utf8_lossy(&raw.stderr));
    assert!(
        outcome
            .output
            .starts_with("sh: 1: queuectl-no-such-command-xyz: ")
            || outcome.output.starts_with("sh: line 1: "),
        "{:?}",
        outcome.output
    );
}

fn death_by_signal_is_a_failure_without_exit_code(watch: ExitWatch) {
    let outcome = run(&shell(watch), &job("killed", "kill -9 $$"));
    assert_eq!(
        outcome.status,
        Status::Failed("killed by signal SIGKILL (9)".into())
    );
    assert_eq!(outcome.exit_code, None);
}

fn the_command_keeps_its_shell_meaning(watch: ExitWatch) {
    // Quotes, `$1`, a trailing comment and a newline all keep their shell meaning.
    let outcome = run(
        &shell(watch),
        &job(
            "quoting",
            "set -- 'a b' \"c\"; echo \"$#:$1:$2\" # comment\necho 'it''s'",
        ),
    );
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(outcome.output, "2:a b:c\nits\n");
}

fn a_shell_that_cannot_start_is_a_spawn_error(watch: ExitWatch) {
    let err = shell(watch)
        .shell("/nonexistent/queuectl-sh")
        .execute(&job("noshell", "true"), &CancelSignal::never())
        .unwrap_err();
    match err {
        ExecutorError::Spawn { id, .. } => assert_eq!(id.as_str(), "noshell"),
        other => panic!("expected a spawn error, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let err = shell(watch)
        .working_dir(dir.path().join("missing"))
        .execute(&job("nodir", "true"), &CancelSignal::never())
        .unwrap_err();
    assert!(
        matches!(&err, ExecutorError::Spawn { id, .. } if id.as_str() == "nodir"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "could not start the command of job nodir");
}

fn job_id_attempt_and_extra_environment_are_set(watch: ExitWatch) {
    let exec = shell(watch)
        .env("GREETING", "hello there")
        .env(JOB_ID_VAR, "cannot override");
    let mut job = job(
        "env-job",
        "echo \"$QUEUECTL_JOB_ID|$QUEUECTL_ATTEMPT|$GREETING|$PATH\"",
    );
    job.attempts = 2;
    let outcome = run(&exec, &job);
    let path = std::env::var("PATH").unwrap_or_default();
    assert_eq!(outcome.output, format!("env-job|2|hello there|{path}\n"));
}

fn working_dir_is_used(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(&shell(watch).working_dir(dir.path()), &job("cwd", "pwd -P"));
    let expected = dir.path().canonicalize().unwrap();
    assert_eq!(outcome.output, format!("{}\n", expected.display()));
}

fn stdin_is_dev_null_and_no_descriptor_leaks(watch: ExitWatch) {
    // `cat` would block if its stdin were the gate or any other pipe of the executor.
    let mut job = job(
        "stdin",
        "cat; read line || echo eof; \
         if { true <&3; } 2>/dev/null; then echo fd3 open; else echo fd3 closed; fi",
    );
    job.timeout = Some(LONG);
    let outcome = within("the attempt", move || run(&shell(watch), &job));
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(outcome.output, "eof\nfd3 closed\n");
}

fn the_job_runs_in_its_own_process_group(watch: ExitWatch) {
    // Field 5 of /proc/PID/stat is the process group.
    let outcome = run(
        &shell(watch),
        &job("pgrp", "echo $$; cut -d' ' -f5 /proc/$$/stat"),
    );
    let lines: Vec<&str> = outcome.output.lines().collect();
    assert_eq!(lines.len(), 2, "{:?}", outcome.output);
    let (leader, group) = (pid(lines[0]), pid(lines[1]));
    assert_eq!(leader, group, "the job's shell leads its own group");
    assert_ne!(group, nix::unistd::getpgrp().as_raw());
}

fn a_megabyte_of_output_does_not_block_and_keeps_the_tail(watch: ExitWatch) {
    // 1 MiB on stdout plus a marker on stderr; the default cap is 64 KiB.
    let command = "head -c 1048576 /dev/zero | tr '\\0' 'x'; echo; echo end-marker >&2";
    let mut job = job("chatty", command);
    job.timeout = Some(LONG);
    let outcome = within("the attempt", move || run(&shell(watch), &job));
    assert_eq!(outcome.status, Status::Succeeded);
    let total = 1048576 + 1 + "end-marker\n".len();
    let dropped = total - 64 * 1024;
    let header = format!("[... {dropped} bytes truncated]\n");
    assert!(
        outcome.output.starts_with(&header),
        "{:.80}",
        outcome.output
    );
    assert_eq!(outcome.output.len(), header.len() + 64 * 1024);
    assert!(outcome.output.ends_with("xxx\nend-marker\n"));
}

fn output_limit_is_configurable(watch: ExitWatch) {
    let exec = shell(watch).output_limit(10);
    let outcome = run(&exec, &job("capped", "printf 0123456789abcdef"));
    assert_eq!(outcome.output, "[... 6 bytes truncated]\n6789abcdef");
    let outcome = run(&exec, &job("fits", "printf 0123456789"));
    assert_eq!(outcome.output, "0123456789");
}

fn output_is_lossy_utf8(watch: ExitWatch) {
    let outcome = run(
        &shell(watch),
        &job("bytes", "printf 'caf\\303\\251 \\377\\n'"),
    );
    assert_eq!(outcome.output, "café \u{fffd}\n");
}

fn a_job_that_closes_its_output_early_still_runs_to_its_end(watch: ExitWatch) {
    // Once its output is closed, the job waits for the test, which can only get through to
    // it while the attempt still runs.
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    mkfifo(&go, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let command = format!(
        "echo before; exec >&- 2>&-; read line < {}; exit \"$line\"",
        go.display()
    );
    let (_canceller, outcome) = start_cancellable(shell(watch), job("closes", &command));
    within("the job's read", move || fs::write(go, "6\n").unwrap());
    let outcome = outcome.recv_timeout(LONG).unwrap().unwrap();
    assert_eq!(outcome.status, Status::Failed("exited with code 6".into()));
    assert_eq!(outcome.output, "before\n");
}

fn leftover_background_processes_are_killed_when_the_job_exits(watch: ExitWatch) {
    // The grandchild keeps stdout open; the attempt must still end at once, with the job's
    // own exit code.
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let command = format!(
        "sleep 30 & echo $! > {}; echo done; exit 5",
        pid_file.display()
    );
    let started = Instant::now();
    let job = job("leftovers", &command);
    let outcome = within("the attempt", move || run(&shell(watch), &job));
    assert!(started.elapsed() < Duration::from_secs(3), "{outcome:?}");
    assert_eq!(outcome.status, Status::Failed("exited with code 5".into()));
    assert_eq!(outcome.exit_code, Some(5));
    assert_eq!(outcome.output, "done\n");
    assert_gone(pid(&fs::read_to_string(pid_file).unwrap()));
}

fn timeout_kills_the_whole_process_group(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // The limit leaves the shell ample time to write the pid file before it fires.
    let limit = Duration::from_secs(1);
    let mut job = job(
        "slow",
        &format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
    );
    job.timeout = Some(limit);
    let outcome = within("the attempt", move || run(&shell(watch), &job));
    assert_eq!(outcome.status, Status::TimedOut(limit));
    assert_eq!(outcome.exit_code, None);
    assert_eq!(outcome.error_message().unwrap(), "timed out after 1.000s");
    // Every process died of SIGTERM, so the 5 s grace period was not waited out.
    assert!(outcome.duration >= limit, "{outcome:?}");
    assert!(
        outcome.duration < limit + Duration::from_secs(3),
        "{outcome:?}"
    );
    assert_gone(pid(&fs::read_to_string(pid_file).unwrap()));
}

fn cancel_stops_the_job_and_its_grandchildren(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let (ready, ready_rx) = fifo(dir.path(), "ready");
    let job = job(
        "cancelled",
        &format!("sleep 30 & echo $! > {}; wait", ready.display()),
    );
    let (mut canceller, outcome) = start_cancellable(shell(watch), job);
    let grandchild = pid(&recv("the grandchild's pid", &ready_rx));
    assert!(is_running(grandchild));

    canceller.cancel();
    let outcome = outcome.recv_timeout(LONG).unwrap().unwrap();
    assert_eq!(outcome.status, Status::Cancelled);
    assert_eq!(outcome.exit_code, None);
    assert!(outcome.duration < Duration::from_secs(3), "{outcome:?}");
    assert_gone(grandchild);
}

fn a_cancelled_signal_does_not_start_the_job(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let (mut canceller, signal) = cancel_pair();
    canceller.cancel();
    let outcome = shell(watch)
        .execute(
            &job("never", &format!("touch {}", marker.display())),
            &signal,
        )
        .unwrap();
    assert_eq!(outcome.status, Status::Cancelled);
    assert!(!marker.exists());
}

fn sigterm_comes_first_and_the_job_may_clean_up(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let (ready, ready_rx) = fifo(dir.path(), "ready");
    let job = job(
        "graceful",
        &format!(
            "trap 'echo cleaning up; exit 7' TERM; echo ready > {}; \
             while :; do sleep 1; done",
            ready.display()
        ),
    );
    // The default 5 s grace is not waited out: the attempt ends when the job does.
    let (mut canceller, outcome) = start_cancellable(shell(watch), job);
    recv("readiness", &ready_rx);
    let cancelled_at = Instant::now();
    canceller.cancel();
    let outcome = outcome.recv_timeout(LONG).unwrap().unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(3));
    assert_eq!(outcome.status, Status::Cancelled);
    assert_eq!(outcome.exit_code, Some(7));
    // (Some shells first report that `sleep` was terminated.)
    assert!(
        outcome.output.ends_with("cleaning up\n"),
        "{:?}",
        outcome.output
    );
}

fn sigkill_follows_when_the_grace_period_is_over(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let (ready, ready_rx) = fifo(dir.path(), "ready");
    let grace = Duration::from_millis(300);
    // SIGTERM is ignored by the shell and inherited as ignored by `sleep`.
    let job = job(
        "stubborn",
        &format!("trap '' TERM; echo ready > {}; sleep 30", ready.display()),
    );
    let (mut canceller, outcome) = start_cancellable(shell(watch).kill_grace(grace), job);
    recv("readiness", &ready_rx);
    let cancelled_at = Instant::now();
    canceller.cancel();
    let outcome = outcome.recv_timeout(LONG).unwrap().unwrap();
    let took = cancelled_at.elapsed();
    assert!(took >= grace, "killed after {took:?}");
    assert!(
        took < grace + Duration::from_secs(3),
        "killed after {took:?}"
    );
    assert_eq!(outcome.status, Status::Cancelled);
    assert_eq!(outcome.exit_code, None);
}

fn the_grace_period_covers_the_whole_group_not_just_the_shell(watch: ExitWatch) {
    // The shell dies of SIGTERM at once; its grandchild ignores SIGTERM and must still be
    // killed when the grace period is over.
    let dir = tempfile::tempdir().unwrap();
    let (ready, ready_rx) = fifo(dir.path(), "ready");
    let grace = Duration::from_millis(300);
    let job = job(
        "stubborn-child",
        &format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; exec sleep 30' & wait",
            ready.display()
        ),
    );
    let (mut canceller, outcome) = start_cancellable(shell(watch).kill_grace(grace), job);
    let grandchild = pid(&recv("the grandchild's pid", &ready_rx));
    let cancelled_at = Instant::now();
    canceller.cancel();
    let outcome = outcome.recv_timeout(LONG).unwrap().unwrap();
    let took = cancelled_at.elapsed();
    assert_eq!(outcome.status, Status::Cancelled);
    assert!(took >= grace, "ended after {took:?}");
    assert_gone(grandchild);
}

fn concurrent_attempts_stay_apart(watch: ExitWatch) {
    let exec = shell(watch);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let exec = &exec;
                scope.spawn(move || {
                    let job = job(
                        &format!("job-{i}"),
                        "echo \"$QUEUECTL_JOB_ID\"; exit $((3 + 0))",
                    );
                    run(exec, &job)
                })
            })
            .collect();
        for (i, handle) in handles.into_iter().enumerate() {
            let outcome = handle.join().unwrap();
            assert_eq!(outcome.output, format!("job-{i}\n"));
            assert_eq!(outcome.exit_code, Some(3));
        }
    });
}

/// What the executor reads goes to the live output as it comes, held up to the output limit
/// like the outcome's own tail, so the two agree on where the output they keep starts.
fn live_output_gets_what_the_outcome_keeps(watch: ExitWatch) {
    let exec = shell(watch).output_limit(1000);
    // "é" is written in two halves; 5,000 bytes overflow the limit.
    let job = job(
        "j",
        "echo one; head -c 5000 /dev/zero | tr '\\0' x; printf '\\ncaf\\303'; printf '\\251\\n'",
    );
    let live = LiveOutput::new();
    let outcome = exec
        .execute_live(&job, &CancelSignal::never(), &live)
        .unwrap();
    assert_eq!(outcome.status, Status::Succeeded);
    let total = 4 + 5000 + 7;
    let (offset, text) = live.unrecorded().expect("live output");
    assert!(text.ends_with("xx\ncafé\n"), "{text:?}");
    assert_eq!(offset + text.len() as u64, total);
    assert_eq!(
        outcome.output,
        format!("[... {offset} bytes truncated]\n{text}"),
        "the outcome keeps what the live output holds"
    );
    // Recorded output is no longer held.
    live.recorded(offset + 10);
    let (after, rest) = live.unrecorded().unwrap();
    assert_eq!((after, rest.as_str()), (offset + 10, &text[10..]));
    // `execute` writes no live output anywhere (nothing to check but that it still works).
    assert_eq!(run(&exec, &job).output, outcome.output);
}

/// Stamps one `#[test]` per case per exit-watch strategy.
macro_rules! both_strategies {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod pidfd {
            $( $(#[$attr])* #[test] fn $name() { super::$name(super::ExitWatch::Pidfd) } )*
        }
        mod threads {
            $( $(#[$attr])* #[test] fn $name() { super::$name(super::ExitWatch::Thread) } )*
        }
    };
}

both_strategies!(
    exit_code_zero_succeeds_with_stdout_and_stderr_in_order,
    non_zero_exit_is_a_failure_with_its_code,
    nothing_of_the_executor_is_visible_to_wait_and_jobs,
    unknown_command_is_exit_127_not_an_error,
    death_by_signal_is_a_failure_without_exit_code,
    the_command_keeps_its_shell_meaning,
    a_shell_that_cannot_start_is_a_spawn_error,
    job_id_attempt_and_extra_environment_are_set,
    working_dir_is_used,
    stdin_is_dev_null_and_no_descriptor_leaks,
    #[cfg(target_os = "linux")]
    the_job_runs_in_its_own_process_group,
    a_megabyte_of_output_does_not_block_and_keeps_the_tail,
    output_limit_is_configurable,
    output_is_lossy_utf8,
    a_job_that_closes_its_output_early_still_runs_to_its_end,
    leftover_background_processes_are_killed_when_the_job_exits,
    timeout_kills_the_whole_process_group,
    cancel_stops_the_job_and_its_grandchildren,
    a_cancelled_signal_does_not_start_the_job,
    sigterm_comes_first_and_the_job_may_clean_up,
    sigkill_follows_when_the_grace_period_is_over,
    the_grace_period_covers_the_whole_group_not_just_the_shell,
    concurrent_attempts_stay_apart,
    worker_death_kills_the_job,
    live_output_gets_what_the_outcome_keeps,
);

/// The helper worker process (a real binary, `tests/helpers/shell_worker.rs`).
const SHELL_WORKER: &str = env!("CARGO_BIN_EXE_queuectl-test-shell-worker");

/// The product rule: when a worker process dies, even by SIGKILL, the commands it started
/// must not run on unobserved.
fn worker_death_kills_the_job(watch: ExitWatch) {
    let dir = tempfile::tempdir().unwrap();
    let (pids_fifo, pids_rx) = fifo(dir.path(), "pids");
    let mut worker = Command::new(SHELL_WORKER)
        .arg(&pids_fifo)
        .arg(match watch {
            ExitWatch::Pidfd => "pidfd",
            ExitWatch::Thread => "thread",
        })
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pids = recv("the job's pids", &pids_rx);
    let pids: Vec<i32> = pids.split_whitespace().map(pid).collect();
    let [shell, grandchild] = pids[..] else {
        panic!("expected two pids, got {pids:?}");
    };
    assert!(is_running(shell) && is_running(grandchild));

    worker.kill().unwrap();
    let status = worker.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_gone(grandchild);
    assert_gone(shell);
}
