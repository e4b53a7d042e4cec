//! Shell commands through the worker pool: successes, a failing exit code, a command that does
//! not exist, and a job killed by its timeout.
//!
//! Run with `cargo run --example shell_jobs`.

use std::sync::Arc;
use std::time::Duration;

use queuectl_core::{
    Event, Fixed, ListQuery, MemoryStorage, NewJob, ShellExecutor, Storage, StorageExt, WorkerPool,
    now,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(MemoryStorage::new());
    let jobs = [
        ("hello", "echo hello from $QUEUECTL_JOB_ID", None),
        ("disk", "df -h / | tail -1", None),
        ("exit3", "echo about to fail >&2; exit 3", None),
        ("missing", "no-such-command-here", None),
        ("slow", "sleep 10", Some(Duration::from_secs(1))),
    ];
    for (id, command, timeout) in jobs {
        let mut job = NewJob::new(command).id(id)?.max_retries(2);
        if let Some(timeout) = timeout {
            job = job.timeout(timeout);
        }
        store.enqueue(job, now())?;
    }

    let pool = WorkerPool::builder(store.clone(), Arc::new(ShellExecutor::new()))
        .workers(3)
        .backoff(Fixed(Duration::from_millis(100)))
        .exit_when_idle(true)
        .start()?;
    for event in pool.events() {
        match event {
            Event::Running {
                job,
                attempt,
                command,
            } => {
                println!("run  {job} #{attempt}: {command}")
            }
            Event::Completed { job, duration, .. } => println!("ok   {job} in {duration:.2?}"),
            Event::Failed { job, error, .. } => println!("fail {job}: {error} (will retry)"),
            Event::Dead { job, error, .. } => println!("dead {job}: {error}"),
            Event::Stopped => break,
            _ => {}
        }
    }
    pool.join()?;

    println!();
    for job in store.list(&ListQuery::all())? {
        let output = job.output.as_deref().unwrap_or("").trim_end();
        println!(
            "{:<8} {:<9} exit {:<5} {}",
            job.id.as_str(),
            job.state.as_str(),
            job.exit_code.map_or("-".to_owned(), |c| c.to_string()),
            job.last_error.as_deref().unwrap_or(output)
        );
    }
    Ok(())
}
