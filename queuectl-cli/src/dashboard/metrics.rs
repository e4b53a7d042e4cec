//! `GET /metrics` in the Prometheus text format (prometheus-client).
//!
//! Gauges (`queuectl_jobs`, `queuectl_workers`) are read from the store at each scrape.
//! `queuectl_attempts_total` and `queuectl_job_duration_seconds` count the attempts that
//! finished since this dashboard started, read incrementally from the attempt history at
//! each scrape (a restart of the dashboard is a counter reset, which Prometheus handles).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use queuectl_core::{AttemptOutcome, JobId, JobState, Timestamp};

use super::Shared;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    queue: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    queue: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// How far back each read of the history goes again: longer than a commit takes to land after
/// the time it records (a write waits at most the store's busy timeout, 10 s, for its lock).
const LOOKBACK: time::Duration = time::Duration::seconds(15);

/// The attempts counted, to count each once.
struct Counted {
    /// Attempts that finished before this instant are not in the counters.
    started: Timestamp,
    /// When the history was last read (`None`: never; the first read goes an hour back).
    read_at: Option<Timestamp>,
    /// The attempts counted that finished within [`LOOKBACK`] of the last read.
    seen: HashSet<(JobId, u32, Timestamp)>,
    /// Attempts that succeeded and that failed, per minute (Unix time / 60) of their end, for
    /// the last hour.
    minutes: BTreeMap<i64, (usize, usize)>,
}

/// Completions and failures in one minute.
#[derive(serde::Serialize)]
pub(crate) struct Minute {
    /// When the minute ends.
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) at: Timestamp,
    pub(crate) completed: usize,
    pub(crate) failed: usize,
}

/// Run time buckets, in seconds: 5 ms to an hour.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The metrics of one dashboard process.
pub(crate) struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Gauge>,
    workers: Gauge,
    attempts: Family<AttemptLabels, Counter>,
    durations: Family<QueueLabel, Histogram>,
    /// What the counters have counted.
    counted: Mutex<Counted>,
}

impl Metrics {
    pub(crate) fn new(since: Timestamp) -> Self {
        let mut registry = Registry::default();
        let jobs = Family::<JobLabels, Gauge>::default();
        let workers = Gauge::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        let durations = Family::<QueueLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(BUCKETS)) as fn() -> Histogram,
        );
        registry.register("queuectl_jobs", "Jobs per queue and state", jobs.clone());
        registry.register(
            "queuectl_workers",
            "Job slots of the live workers (what --count counts)",
            workers.clone(),
        );
        registry.register(
            "queuectl_attempts",
            "Attempts finished since this dashboard started, per queue and outcome",
            attempts.clone(),
        );
        registry.register(
            "queuectl_job_duration_seconds",
            "Run time of attempts that succeeded or failed since this dashboard started",
            durations.clone(),
        );
        Self {
            registry,
            jobs,
            workers,
            attempts,
            durations,
            counted: Mutex::new(Counted {
                started: since,
                read_at: None,
                seen: HashSet::new(),
                minutes: BTreeMap::new(),
            }),
        }
    }
}

impl Metrics {
    /// Reads the attempts that finished since the last read (and the minute before it, for
    /// commits that landed late), counting each once: into the counters if it ended after the
    /// dashboard started, into the per-minute tally if it ended in the last hour.
    pub(crate) fn refresh(&self, store: &dyn queuectl_core::Storage) -> queuectl_core::Result<()> {
        let mut counted = self
            .counted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let read_at = queuectl_core::now();
        let hour_ago = read_at - time::Duration::HOUR;
        let from = counted
            .read_at
            .map_or(hour_ago, |at| (at - LOOKBACK).max(hour_ago));
        let activity = store.activity(from)?;
        for finished in &activity.attempts {
            let attempt = &finished.attempt;
            let Some(end) = attempt.finished_at else {
                continue;
            };
            if !counted
                .seen
                .insert((finished.job.clone(), attempt.number, end))
            {
                continue;
            }
            let minute = counted
                .minutes
                .entry(end.unix_timestamp().div_euclid(60))
                .or_default();
            match attempt.outcome {
                AttemptOutcome::Succeeded => minute.0 += 1,
                AttemptOutcome::Failed | AttemptOutcome::Abandoned => minute.1 += 1,
                _ => {}
            }
            if end < counted.started {
                continue;
            }
            let queue = &finished.queue;
            let labels = AttemptLabels {
                queue: queue.clone(),
                outcome: attempt.outcome.as_str().to_owned(),
            };
            self.attempts.get_or_create(&labels).inc();
            if matches!(
                attempt.outcome,
                AttemptOutcome::Succeeded | AttemptOutcome::Failed
            ) {
                let took = (end - attempt.started_at).as_seconds_f64().max(0.0);
                self.durations
                    .get_or_create(&QueueLabel {
                        queue: queue.clone(),
                    })
                    .observe(took);
            }
        }
        let forget_before = read_at - LOOKBACK;
        counted.seen.retain(|(_, _, end)| *end >= forget_before);
        let first_minute = hour_ago.unix_timestamp().div_euclid(60);
        counted.minutes.retain(|minute, _| *minute >= first_minute);
        counted.read_at = Some(read_at);
        Ok(())
    }

    /// The last hour, minute by minute, oldest first (after [`Metrics::refresh`]).
    pub(crate) fn last_hour(&self) -> Vec<Minute> {
        let counted = self
            .counted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = counted.read_at.unwrap_or_else(queuectl_core::now);
        let this_minute = now.unix_timestamp().div_euclid(60);
        (this_minute - 59..=this_minute)
            .map(|minute| {
                let (completed, failed) = counted.minutes.get(&minute).copied().unwrap_or_default();
                Minute {
                    at: Timestamp::from_unix_timestamp((minute + 1) * 60).unwrap_or(now),
                    completed,
                    failed,
                }
            })
            .collect()
    }
}

/// `GET /metrics`.
pub(crate) async fn render(State(state): State<Shared>) -> Response {
    let shared = state.clone();
    let text = tokio::task::spawn_blocking(move || -> queuectl_core::Result<String> {
        let metrics = &shared.metrics;
        let store = &*shared.store;
        for queue in store.queues()? {
            for job_state in JobState::ALL {
                let labels = JobLabels {
                    queue: queue.name.clone(),
                    state: job_state.as_str().to_owned(),
                };
                let n = queue.counts.get(job_state) as i64;
                metrics.jobs.get_or_create(&labels).set(n);
            }
        }
        let slots: usize = store.workers()?.iter().map(|w| w.concurrency).sum();
        metrics.workers.set(slots as i64);
        metrics.refresh(store)?;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry)
            .expect("writing to a String cannot fail");
        Ok(text)
    })
    .await;
    match text {
        Ok(Ok(text)) => {
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Ok(Err(e)) => super::api::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &queuectl_core::pool::error_chain(&e),
        ),
        Err(e) => super::api::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
