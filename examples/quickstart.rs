//! Embeds the queue in a Rust program: in-memory storage, jobs that are Rust closures, and one
//! job that keeps failing, is retried with backoff, and ends in the dead letter queue.
//!
//! Run with `cargo run --example quickstart`.

use std::sync::Arc;
use std::time::Duration;

use queuectl_core::{
    Event, Fixed, FnExecutor, JobState, ListQuery, MemoryStorage, NewJob, Storage, StorageExt,
    WorkerPool, now,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(MemoryStorage::new());
    store.enqueue(NewJob::new("resize photo.jpg").id("resize")?, now())?;
    store.enqueue(
        NewJob::new("send welcome email").id("email")?.priority(10),
        now(),
    )?;
    store.enqueue(
        NewJob::new("charge card").id("charge")?.max_retries(3),
        now(),
    )?;

    // The "charge card" job always fails; the others succeed.
    let executor = FnExecutor::new(|job| {
        if job.command.starts_with("charge") {
            Err("card declined".to_owned())
        } else {
            println!("  (doing: {})", job.command);
            Ok(())
        }
    });

    // A short fixed backoff keeps the demo quick; the default is 2^attempts seconds.
    let pool = WorkerPool::builder(store.clone(), Arc::new(executor))
        .workers(2)
        .backoff(Fixed(Duration::from_millis(200)))
        .exit_when_idle(true)
        .start()?;
    for event in pool.events() {
        match event {
            Event::Claimed { job, attempt, .. } => println!("claimed   {job} (attempt {attempt})"),
            Event::Completed { job, .. } => println!("completed {job}"),
            Event::Failed {
                job,
                error,
                retry_in,
                ..
            } => println!("failed    {job}: {error}; retry in {retry_in:?}"),
            Event::Dead {
                job,
                attempt,
                error,
            } => {
                println!("dead      {job} after {attempt} attempts: {error}")
            }
            Event::Stopped => break,
            _ => {}
        }
    }
    let summary = pool.join()?;
    println!(
        "\npool stopped: {} completed, {} failed attempts, {} dead",
        summary.completed, summary.failed, summary.dead
    );

    println!("\nfinal states:");
    for job in store.list(&ListQuery::all())? {
        println!(
            "  {:<8} {:<10} attempts {}",
            job.id, job.state, job.attempts
        );
    }
    let dead = store.list(&ListQuery::state(JobState::Dead))?;
    println!(
        "\ndead letter queue: {:?}",
        dead.iter().map(|j| j.id.as_str()).collect::<Vec<_>>()
    );
    Ok(())
}
