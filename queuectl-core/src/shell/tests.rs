use super::attempt::{Attempt, exit_status};
use super::output::Tail;
use super::*;
use crate::MemoryStorage;
use crate::job::{NewJob, now};
use crate::storage::StorageExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::thread;
use std::time::Instant;

use crate::executor::Status;

const LONG: Duration = Duration::from_secs(10);

fn job(command: &str) -> Job {
    let mut job = MemoryStorage::new()
        .enqueue(NewJob::new(command), now())
        .unwrap();
    job.attempts = 1;
    job.timeout = None;
    job
}

/// Runs `f` on a thread and returns its result, failing the test if it takes longer than
/// `LONG`.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(LONG)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) if std::path::Path::new("/proc/self/stat").exists() => false,
        Err(_) => nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok(),
    }
}

fn assert_gone(pid: i32) {
    let deadline = Instant::now() + LONG;
    while is_running(pid) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("process {pid} is still running");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn where_the_kept_output_starts_is_read_back_from_the_rendered_tail() {
    let mut tail = Tail::new(4);
    tail.push(b"abcdefgh");
    let rendered = tail.render();
    assert_eq!(super::kept_from(&rendered), (4, rendered.len() - 4));
    assert_eq!(super::kept_from("efgh"), (0, 0));
    for text in [
        "[... 4 bytes]\nx",
        "[... x bytes truncated]\n",
        "[... 4 bytes truncated]",
    ] {
        assert_eq!(super::kept_from(text), (0, 0), "{text:?}");
    }
}

#[test]
fn tail_keeps_everything_under_the_limit() {
    let mut tail = Tail::new(10);
    tail.push(b"hello ");
    tail.push(b"you");
    assert_eq!(tail.render(), "hello you");
    tail.push(b"!");
    assert_eq!(tail.render(), "hello you!");
}

#[test]
fn tail_keeps_the_last_bytes_and_counts_the_rest() {
    let mut tail = Tail::new(4);
    tail.push(b"abc");
    tail.push(b"defgh");
    assert_eq!(tail.render(), "[... 4 bytes truncated]\nefgh");
    tail.push(b"0123456789");
    assert_eq!(tail.render(), "[... 14 bytes truncated]\n6789");
    for byte in b"xyz" {
        tail.push(&[*byte]);
    }
    assert_eq!(tail.render(), "[... 17 bytes truncated]\n9xyz");

    let mut nothing = Tail::new(0);
    nothing.push(b"abc");
    assert_eq!(nothing.render(), "[... 3 bytes truncated]\n");
    assert_eq!(Tail::new(0).render(), "");
}

#[test]
fn tail_is_lossy_utf8_and_does_not_start_inside_a_character() {
    let mut invalid = Tail::new(100);
    invalid.push(b"ok \xff\n");
    assert_eq!(invalid.render(), "ok \u{fffd}\n");

    // "é" is two bytes: a cut after its first byte drops the orphaned second one.
    let mut cut = Tail::new(3);
    cut.push("aébc".as_bytes());
    assert_eq!(cut.render(), "[... 3 bytes truncated]\nbc");
    let mut whole = Tail::new(4);
    whole.push("aébc".as_bytes());
    assert_eq!(whole.render(), "[... 1 bytes truncated]\nébc");
}

#[test]
fn notes_follow_the_output_on_their_own_line() {
    let mut tail = Tail::new(100);
    tail.push(b"partial");
    tail.note("something happened".into());
    assert_eq!(tail.render(), "partial\n[something happened]\n");
}

#[test]
fn exit_statuses_are_described() {
    assert_eq!(
        exit_status(ExitStatus::from_raw(0)),
        (Status::Succeeded, Some(0))
    );
    assert_eq!(
        exit_status(ExitStatus::from_raw(3 << 8)),
        (Status::Failed("exited with code 3".into()), Some(3))
    );
    assert_eq!(
        exit_status(ExitStatus::from_raw(9)),
        (Status::Failed("killed by signal SIGKILL (9)".into()), None)
    );
    assert_eq!(
        exit_status(ExitStatus::from_raw(0x80 | 11)),
        (
            Status::Failed("killed by signal SIGSEGV (11), core dumped".into()),
            None
        )
    );
}

#[test]
fn errors_carry_their_context_in_the_chain() {
    let err = ShellExecutor::new()
        .shell("/nonexistent/queuectl-sh")
        .execute(&job("true"), &CancelSignal::never())
        .unwrap_err();
    let ExecutorError::Spawn { ref source, .. } = err else {
        panic!("expected a spawn error, got {err:?}");
    };
    assert_eq!(source.kind(), io::ErrorKind::NotFound);
    assert_eq!(
        source.to_string(),
        "could not run \"/nonexistent/queuectl-sh\""
    );
    let cause = std::error::Error::source(source).expect("the os error");
    assert!(cause.to_string().contains("No such file"), "{cause}");
}

/// Starts the supervisor's script with its standard input piped, as a worker does.
fn supervisor_script() -> std::process::Child {
    std::process::Command::new(DEFAULT_SHELL)
        .args(["-c", supervisor::SCRIPT, "queuectl-supervisor"])
        .stdin(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// A `sleep 30` leading a process group of its own, with a grandchild in the group;
/// returns it and the grandchild's pid.
fn group_with_grandchild() -> (std::process::Child, i32) {
    let mut child = std::process::Command::new(DEFAULT_SHELL)
        .args(["-c", "sleep 30 & echo $!; wait"])
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let grandchild = within("the grandchild's pid", move || {
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        line.trim().parse().unwrap()
    });
    (child, grandchild)
}

/// The mechanism behind worker-death protection: when the supervisor's pipe closes (the
/// worker died), it kills every group still registered, and only those.
#[test]
fn the_supervisor_kills_the_registered_groups_when_its_pipe_closes() {
    let mut supervisor = supervisor_script();
    let groups: Vec<_> = (0..3).map(|_| group_with_grandchild()).collect();
    {
        let pipe = supervisor.stdin.as_mut().unwrap();
        for (leader, _) in &groups {
            writeln!(pipe, "+ {}", leader.id()).unwrap();
        }
        // The middle job ended: unregistered, it must survive.
        writeln!(pipe, "- {}", groups[1].0.id()).unwrap();
    }
    // SIGTERM and SIGINT (a Ctrl+C to the group, a `kill`) do not stop it.
    let pid = nix::unistd::Pid::from_raw(supervisor.id() as i32);
    killpg(pid, Signal::SIGTERM).unwrap();
    killpg(pid, Signal::SIGINT).unwrap();
    drop(supervisor.stdin.take());
    assert!(within("the supervisor's exit", move || supervisor.wait().unwrap()).success());
    for (n, (mut leader, grandchild)) in groups.into_iter().enumerate() {
        if n == 1 {
            assert!(is_running(grandchild) && is_running(leader.id() as i32));
            killpg(Pid::from_raw(leader.id() as i32), Signal::SIGKILL).unwrap();
        }
        let exit = within("the leader's exit", move || leader.wait().unwrap());
        assert_eq!(exit.signal(), Some(Signal::SIGKILL as i32));
        assert_gone(grandchild);
    }
}

/// A supervisor killed by someone is replaced with the next job, which still runs.
#[test]
fn a_killed_supervisor_is_replaced() {
    let exec = ShellExecutor::new();
    assert!(
        exec.execute(&job("true"), &CancelSignal::never())
            .unwrap()
            .is_success()
    );
    let first = supervisor::pid().expect("a supervisor runs");
    nix::sys::signal::kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    assert_gone(first as i32);
    let outcome = exec
        .execute(&job("echo ok"), &CancelSignal::never())
        .unwrap();
    assert_eq!(outcome.output, "ok\n");
    let second = supervisor::pid().expect("a supervisor runs");
    assert_ne!(first, second);
}

fn threaded() -> ShellExecutor {
    ShellExecutor::new().exit_watch(ExitWatch::Thread)
}

/// The cleanup on error paths: an attempt dropped while its job runs kills the whole group,
/// and the leader is reaped, not left a zombie.
#[test]
fn a_dropped_attempt_kills_the_group_and_reaps_the_leader() {
    for exec in [ShellExecutor::new(), threaded()] {
        let job = job("sleep 30 & echo $$ $!; wait");
        let mut attempt = Attempt::start(&exec, &job, None).unwrap();
        let mut pids = String::new();
        while !pids.ends_with('\n') {
            let pipe = attempt.output.pipe.as_mut().unwrap();
            let mut buf = [0; 64];
            let n = pipe.read(&mut buf).unwrap();
            assert!(n > 0, "the job ended early: {pids:?}");
            pids.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        let pids: Vec<i32> = pids
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        let [leader, grandchild] = pids[..] else {
            panic!("expected two pids, got {pids:?}");
        };
        drop(attempt);
        assert_gone(grandchild);
        let deadline = Instant::now() + LONG;
        while std::path::Path::new(&format!("/proc/{leader}")).exists() {
            assert!(Instant::now() < deadline, "{leader} was not reaped");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A process that escaped the group may keep writing to the job's output after the
/// attempt has given up on it, without getting `SIGPIPE`.
#[test]
fn an_escaped_process_can_still_write_after_capture_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let done = dir.path().join("done");
    for fifo in [&go, &done] {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    }
    // The escaped shell waits for the test to let it write to its standard error (the
    // job's output), then reports whether that worked. As in the test above, the command
    // substitution returns once it has left the group.
    let command = format!(
        "pid=$(setsid sh -c 'echo $$; exec >/dev/null; read _ < {go}; echo late >&2; \
         echo written > {done}' &); echo started",
        go = go.display(),
        done = done.display(),
    );
    let exec = ShellExecutor {
        output_drain: Duration::from_millis(100),
        ..ShellExecutor::new()
    };
    let outcome = within("the attempt", move || {
        exec.execute(&job(&command), &CancelSignal::never())
    })
    .unwrap();
    assert!(
        outcome.output.starts_with("started\n"),
        "{:?}",
        outcome.output
    );
    assert!(
        outcome.output.contains("output capture stopped"),
        "{:?}",
        outcome.output
    );
    let report = within("the late write", move || {
        std::fs::write(&go, "go\n").unwrap();
        std::fs::read_to_string(&done).unwrap()
    });
    assert_eq!(report, "written\n");
}

/// A process that leaves the group and keeps the output open cannot hold the attempt.
#[test]
fn output_held_open_outside_the_group_stops_capture_after_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("escaped.pid");
    // The command substitution returns once the escaped process has left the group and
    // closed the substitution's pipe; its standard error is still the job's output.
    let command = format!(
        "echo before; pid=$(setsid sh -c 'echo $$; exec sleep 30 >/dev/null' &); \
         echo \"$pid\" > {}; echo after",
        pid_file.display()
    );
    let exec = ShellExecutor {
        output_drain: Duration::from_millis(200),
        ..ShellExecutor::new()
    };
    let started = Instant::now();
    let outcome = within("the attempt", move || {
        exec.execute(&job(&command), &CancelSignal::never())
    })
    .unwrap();
    let elapsed = started.elapsed();
    let escaped: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(is_running(escaped), "the process should have escaped");
    // Clean up what the executor cannot reach.
    nix::sys::signal::kill(Pid::from_raw(escaped), Signal::SIGKILL).unwrap();

    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert_eq!(outcome.status, Status::Succeeded);
    assert!(
        outcome.output.starts_with("before\nafter\n"),
        "{:?}",
        outcome.output
    );
    assert!(
        outcome
            .output
            .ends_with("still held its output open 200ms after the job ended]\n"),
        "{:?}",
        outcome.output
    );
}

/// A leader whose gate closes without opening (the worker died before it could register
/// the group) exits without running the command.
#[test]
fn a_leader_whose_gate_never_opens_does_not_run_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let (_output_read, output_write) = io::pipe().unwrap();
    let (mut child, gate) = ShellExecutor::new()
        .spawn(&job(&format!("touch '{}'", ran.display())), output_write)
        .unwrap();
    drop(gate);
    let exit = within("the leader's exit", move || child.wait().unwrap());
    assert_eq!(exit.code(), Some(125));
    assert!(!ran.exists(), "the command ran");

    // Opened, the same command runs.
    let (_output_read, output_write) = io::pipe().unwrap();
    let (mut child, gate) = ShellExecutor::new()
        .spawn(&job(&format!("touch '{}'", ran.display())), output_write)
        .unwrap();
    open_gate(gate).unwrap();
    assert!(within("the leader's exit", move || child.wait().unwrap()).success());
    assert!(ran.exists());
}

/// What a follower saw while the job ran (its live output) and the kept tail of the finished
/// attempt count offsets alike, so that the follower can show the rest exactly: here with
/// invalid UTF-8, a character split across reads, and more output than the limit.
#[test]
fn the_kept_tail_is_the_end_of_the_live_output_at_the_offset_it_says() {
    let chunks: [&[u8]; 5] = [
        b"ab\xff\xfecd",
        "\u{e9}".as_bytes(),
        b"\xe2\x82",
        b"\xac-\xff",
        b"xyz\n",
    ];
    for limit in [0, 3, 5, 8, 11, 100] {
        let live = LiveOutput::new();
        let mut tail = Tail::new(limit);
        for chunk in chunks {
            live.write(chunk);
            tail.push(chunk);
        }
        let (start, text) = live.unrecorded().expect("output was written");
        assert_eq!(start, 0);
        let rendered = tail.render();
        let (dropped, line) = super::kept_from(&rendered);
        let kept = &rendered[line..];
        assert_eq!(
            dropped + kept.len() as u64,
            text.len() as u64,
            "limit {limit}: {rendered:?}"
        );
        assert_eq!(&text[dropped as usize..], kept, "limit {limit}");
    }
    // Longer than what the tail holds before it drops in bulk: the same, whole.
    let many: Vec<u8> = (0..200_000u32)
        .map(|i| [b'a', 0xc3, 0xa9, 0xff][i as usize % 4])
        .collect();
    let mut whole = String::new();
    crate::executor::Utf8Stream::default().decode(&many, &mut whole);
    let mut tail = Tail::new(1000);
    for chunk in many.chunks(4093) {
        tail.push(chunk);
    }
    let rendered = tail.render();
    let (dropped, line) = super::kept_from(&rendered);
    assert_eq!(&whole[dropped as usize..], &rendered[line..]);
    assert!(rendered.len() - line <= 1000);
}
