//! A background job queue: durable storage, shell and in-process executors, exponential
//! backoff with a dead letter queue, and a worker pool.
//!
//! ```
//! use std::time::Duration;
//! use queuectl_core::{Event, FnExecutor, MemoryStorage, NewJob, StorageExt, WorkerPool, now};
//! use std::sync::Arc;
//!
//! let store = Arc::new(MemoryStorage::new());
//! store.enqueue(NewJob::new("greet").id("hello")?, now())?;
//!
//! let executor = Arc::new(FnExecutor::new(|job| {
//!     println!("running {}", job.command);
//!     Ok(())
//! }));
//! let pool = WorkerPool::builder(store.clone(), executor).workers(2).start()?;
//! // Wait for the job to finish, then stop the pool gracefully.
//! let completed = pool.events().iter().find_map(|event| match event {
//!     Event::Completed { job, .. } => Some(job),
//!     _ => None,
//! });
//! assert_eq!(completed.unwrap().as_str(), "hello");
//! pool.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod backoff;
pub mod config;
mod error;
pub mod executor;
pub mod file;
mod follow;
mod generation;
pub mod job;
mod memory;
mod ops;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod pool;
pub mod relay;
mod rules;
pub mod shell;
pub mod spec;
mod state;
pub mod stats;
pub mod storage;
mod wait;

pub use backoff::{BackoffPolicy, Exponential, Fixed};
pub use config::{Config, ConfigError};
pub use error::{DatabaseFault, Result, StorageError};
pub use executor::{
    CancelSignal, Executor, ExecutorError, FnExecutor, LiveOutput, Outcome, Status,
};

pub use file::{CheckReport, FileOptions, FileStorage, ImportReport};
pub use follow::{Follow, FollowStep, follow_attempt, follow_job};
pub use job::{
    Attempt, AttemptOutcome, DEFAULT_QUEUE, InvalidJob, Job, JobId, JobState, Lease, MAX_OUTPUT,
    NewJob, Timestamp, check_queue_name, now,
};
pub use memory::MemoryStorage;
#[cfg(feature = "postgres")]
pub use pg::{PG_SCHEMA_VERSION, PgOptions, PgStorage, SchemaCheck};
pub use pool::{
    AUTO_PREFETCH_PER_THREAD, Event, PoolError, Prefetch, StopReason, Stopper, Summary, Timings,
    WorkerPool, WorkerPoolBuilder,
};

pub use shell::ShellExecutor;
pub use spec::{JobSpec, SpecError};
pub use storage::{
    Activity, AttemptReport, ClaimRequest, Enqueued, FinishedAttempt, ListQuery, OutputChunk,
    Polled, ProcessIdentity, QueueChange, QueueInfo, RunningOutput, Settlement, StateCounts,
    Storage, StorageExt, WorkerInfo,
};
pub use wait::{WaitOutcome, wait_for_jobs, wait_for_jobs_with};

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
