//! Test helper: a worker process that runs one shell job and is killed while it runs.
//!
//! `queuectl-test-shell-worker FIFO pidfd|thread` runs `sleep 30 & echo $$ $! > FIFO; wait`
//! with a `ShellExecutor` watching through the given strategy. The test reads the job's pids
//! from the FIFO, kills this process with `SIGKILL`, and checks that the job died with it.

use queuectl_core::shell::ExitWatch;
use queuectl_core::{CancelSignal, Executor, MemoryStorage, NewJob, ShellExecutor, StorageExt};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(fifo), Some(watch)) = (args.next(), args.next()) else {
        eprintln!("usage: queuectl-test-shell-worker FIFO pidfd|thread");
        std::process::exit(2);
    };
    let watch = match watch.as_str() {
        "pidfd" => ExitWatch::Pidfd,
        "thread" => ExitWatch::Thread,
        other => {
            eprintln!("unknown exit watch {other:?}");
            std::process::exit(2);
        }
    };
    let command = format!("sleep 30 & echo $$ $! > '{fifo}'; wait");
    let job = MemoryStorage::new()
        .enqueue(NewJob::new(command), queuectl_core::now())
        .expect("enqueue the job");
    let outcome = ShellExecutor::new()
        .exit_watch(watch)
        .execute(&job, &CancelSignal::never());
    // Only reached if the test failed to kill this process.
    eprintln!("the job should have run until this process was killed: {outcome:?}");
    std::process::exit(1);
}
