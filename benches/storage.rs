#![allow(missing_docs)] // criterion_group! generates an undocumented function
//! Storage and pool benchmarks. One body per measurement, run for every backend.
//!
//! `cargo bench -p queuectl-core --bench storage` (add a filter such as `pool/` to run a part).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use queuectl_core::{
    FileStorage, FnExecutor, Job, MemoryStorage, NewJob, PgOptions, PgStorage, Settlement, Storage,
    StorageExt, WorkerPool, now,
};
use tempfile::TempDir;

/// A fresh store of one backend; the temp dir or database schema (if any) lives as long as
/// the store.
struct Fresh {
    store: Arc<dyn Storage>,
    dir: Option<TempDir>,
    schema: Option<(String, String)>,
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Some((url, schema)) = &self.schema
            && let Ok(mut client) = postgres::Client::connect(url, postgres::NoTls)
        {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}

/// The PostgreSQL server to measure, from `QUEUECTL_TEST_DATABASE_URL` (none: not measured).
fn database_url() -> Option<String> {
    std::env::var("QUEUECTL_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

type Backend = (&'static str, fn() -> Fresh);

fn memory() -> Fresh {
    Fresh {
        store: Arc::new(MemoryStorage::new()),
        dir: None,
        schema: None,
    }
}

fn pg() -> Fresh {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let url = database_url().expect("only measured with a server");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let schema = format!("queuectl_bench_{}_{n}", std::process::id());
    let options = PgOptions {
        schema: schema.clone(),
        ..PgOptions::default()
    };
    let store = PgStorage::connect(&url, options).expect("connect to PostgreSQL");
    Fresh {
        store: Arc::new(store),
        dir: None,
        schema: Some((url, schema)),
    }
}

fn file() -> Fresh {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FileStorage::open(dir.path()).expect("open file store");
    Fresh {
        store: Arc::new(store),
        dir: Some(dir),
        schema: None,
    }
}

/// The stores measured: PostgreSQL too when `QUEUECTL_TEST_DATABASE_URL` names a server.
fn backends() -> Vec<Backend> {
    let mut backends: Vec<Backend> = vec![("memory", memory), ("file", file)];
    if database_url().is_some() {
        backends.push(("postgres", pg));
    }
    backends
}

fn jobs(n: usize) -> Vec<NewJob> {
    (0..n).map(|_| NewJob::new("true")).collect()
}

/// Claims and completes `n` jobs, `batch` at a time. Returns how many were done.
fn drain(store: &dyn Storage, n: usize, batch: usize) -> usize {
    let mut done = 0;
    while done < n {
        let claimed: Vec<Job> = store
            .claim("bench", batch, Duration::from_secs(60), now())
            .expect("claim");
        if claimed.is_empty() {
            break;
        }
        done += claimed.len();
        let settlements = claimed
            .into_iter()
            .map(|job| Settlement::Complete {
                lease: job.lease.expect("leased"),
                report: Default::default(),
            })
            .collect();
        for result in store.settle(settlements, now()).expect("settle") {
            result.expect("complete");
        }
    }
    done
}

fn enqueue(c: &mut Criterion) {
    let mut group = c.benchmark_group("enqueue");
    for (name, make) in backends() {
        let fresh = make();
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("one", name), |b| {
            b.iter(|| fresh.store.enqueue(NewJob::new("true"), now()).unwrap())
        });
        let fresh = make();
        group.throughput(Throughput::Elements(100));
        group.bench_function(BenchmarkId::new("batch100", name), |b| {
            b.iter(|| fresh.store.enqueue_batch(jobs(100), now()).unwrap())
        });
    }
    group.finish();
}

fn claim_complete(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_complete");
    group.throughput(Throughput::Elements(1));
    for (name, make) in backends() {
        for batch in [1, 64] {
            let fresh = make();
            group.bench_function(BenchmarkId::new(format!("batch{batch}"), name), |b| {
                b.iter_custom(|iters| {
                    let n = iters as usize;
                    fresh.store.enqueue_batch(jobs(n), now()).unwrap();
                    let started = Instant::now();
                    assert_eq!(drain(&*fresh.store, n, batch), n);
                    started.elapsed()
                })
            });
        }
    }
    group.finish();
}

/// Per-operation cost with 1,000 vs 100,000 (completed) jobs already in the store.
fn history_size(c: &mut Criterion) {
    let mut group = c.benchmark_group("file_history");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    for history in [1_000, 100_000] {
        let fresh = file();
        let store = &*fresh.store;
        let mut left = history;
        while left > 0 {
            let n = left.min(10_000);
            store.enqueue_batch(jobs(n), now()).unwrap();
            assert_eq!(drain(store, n, 1_000), n);
            left -= n;
        }
        group.bench_function(BenchmarkId::new("enqueue", history), |b| {
            b.iter(|| store.enqueue(NewJob::new("true"), now()).unwrap())
        });
        group.bench_function(BenchmarkId::new("claim_complete", history), |b| {
            b.iter_custom(|iters| {
                let n = iters as usize;
                store.enqueue_batch(jobs(n), now()).unwrap();
                let started = Instant::now();
                assert_eq!(drain(store, n, 1), n);
                started.elapsed()
            })
        });
        if history == 100_000 {
            let dir = fresh
                .dir
                .as_ref()
                .expect("file store dir")
                .path()
                .to_owned();
            group.bench_function("open/100000", |b| {
                b.iter(|| black_box(FileStorage::open(&dir).unwrap()))
            });
        }
    }
    group.finish();
}

/// Jobs claimed ahead of the executor threads, so claims and completions are batched.
const PREFETCH: usize = 256;

/// Jobs per second through a pool with a no-op in-process executor.
fn pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    group.sample_size(10);
    const JOBS: usize = 20_000;
    group.throughput(Throughput::Elements(JOBS as u64));
    for (name, make) in backends() {
        for workers in [1, 2, 4] {
            group.bench_function(BenchmarkId::new(name, workers), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let fresh = make();
                        fresh.store.enqueue_batch(jobs(JOBS), now()).unwrap();
                        let started = Instant::now();
                        let pool = WorkerPool::builder(
                            fresh.store.clone(),
                            Arc::new(FnExecutor::new(|_| Ok(()))),
                        )
                        .workers(workers)
                        .prefetch(PREFETCH)
                        .exit_when_idle(true)
                        .events(false)
                        .start()
                        .unwrap();
                        let summary = pool.join().unwrap();
                        total += started.elapsed();
                        assert_eq!(summary.completed, JOBS);
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, enqueue, claim_complete, history_size, pool);
criterion_main!(benches);
