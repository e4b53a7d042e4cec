//! The shell executor alone, next to the machine's spawn rate, in one run:
//!
//! 1. raw: `sh -c true` two at a time (`std::process::Command`, stdin closed, output piped);
//! 2. executor: `ShellExecutor::execute` of `true` on two threads;
//! 3. pool: `true` jobs through a two-thread `WorkerPool` with a `ShellExecutor` on
//!    `MemoryStorage` (no durable writes: the executor and the pool, without the store),
//!    without and with `prefetch(2)`;
//! 4. the same pool on `FileStorage` (SQLite, `synchronous=FULL`, as `worker start`), without
//!    and with `prefetch(2)`: what the store's durable writes cost the drain.
//!
//! Run with `cargo bench -p queuectl-core --bench shell` (`SHELL_JOBS` sets the count).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use queuectl_core::{
    CancelSignal, Executor, FileStorage, MemoryStorage, NewJob, ShellExecutor, Storage, StorageExt,
    WorkerPool, now,
};

fn two_at_a_time(jobs: usize, run: impl Fn() + Sync) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..jobs / 2 {
                    run();
                }
            });
        }
    });
    jobs as f64 / started.elapsed().as_secs_f64()
}

fn raw(jobs: usize) -> f64 {
    two_at_a_time(jobs, || {
        let mut child = Command::new("sh")
            .args(["-c", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        assert!(child.wait().expect("wait").success());
    })
}

fn executor(jobs: usize) -> f64 {
    let store = MemoryStorage::new();
    let job = store.enqueue(NewJob::new("true"), now()).unwrap();
    let exec = ShellExecutor::new();
    two_at_a_time(jobs, || {
        let outcome = exec.execute(&job, &CancelSignal::never()).unwrap();
        assert!(outcome.is_success());
    })
}

/// Jobs per second of `true` jobs through a two-thread pool with a `ShellExecutor` on `store`.
fn drain(store: Arc<dyn Storage>, jobs: usize, prefetch: usize) -> f64 {
    let batch: Vec<NewJob> = (0..jobs).map(|_| NewJob::new("true")).collect();
    store.enqueue_batch(batch, now()).unwrap();
    let started = Instant::now();
    let summary = WorkerPool::builder(store.clone(), Arc::new(ShellExecutor::new()))
        .workers(2)
        .prefetch(prefetch)
        .exit_when_idle(true)
        .events(false)
        .start()
        .unwrap()
        .join()
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(summary.completed, jobs);
    assert_eq!(store.counts().unwrap().completed, jobs);
    jobs as f64 / elapsed.as_secs_f64()
}

fn pool(jobs: usize, prefetch: usize) -> f64 {
    drain(Arc::new(MemoryStorage::new()), jobs, prefetch)
}

fn file_pool(jobs: usize, prefetch: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    drain(
        Arc::new(FileStorage::open(dir.path()).expect("open")),
        jobs,
        prefetch,
    )
}

fn main() {
    let jobs: usize = std::env::var("SHELL_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    println!("shell executor figures ({jobs} `true` jobs, two at a time)");
    let raw = raw(jobs);
    let executor = executor(jobs);
    let prefetched = pool(jobs, 2);
    let file = file_pool(jobs, 0);
    let grouped = file_pool(jobs, 2);
    let pool = pool(jobs, 0);
    println!("raw sh -c true ×2       {raw:>8.0} /s");
    println!(
        "ShellExecutor ×2        {executor:>8.0} /s   {:.2} of raw",
        executor / raw
    );
    println!(
        "pool on MemoryStorage   {pool:>8.0} /s   {:.2} of raw",
        pool / raw
    );
    println!(
        "  with prefetch 2       {prefetched:>8.0} /s   {:.2} of raw",
        prefetched / raw
    );
    println!(
        "pool on FileStorage     {file:>8.0} /s   {:.2} of raw",
        file / raw
    );
    println!(
        "  with prefetch 2       {grouped:>8.0} /s   {:.2} of raw",
        grouped / raw
    );
}
