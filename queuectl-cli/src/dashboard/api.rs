//! The JSON API the page uses (`docs/api.md`).

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use queuectl_core::{
    Job, JobId, JobState, ListQuery, QueueChange, Storage, StorageError, check_queue_name, now,
};
use serde::{Deserialize, Serialize};

use serde_json::json;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;

/// The most jobs one page of `/api/jobs` returns.
const MAX_LIMIT: usize = 200;

/// How many of the newest matching jobs a search by command text looks through.
const SEARCH_DEPTH: usize = 20_000;

/// An error response: `{"error": "..."}` with `status`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A store error as its HTTP status: unknown job 404, refused transition 409, bad input 400.
fn storage_error(failure: &StorageError) -> Response {
    let status = match failure {
        StorageError::NotFound { .. } => StatusCode::NOT_FOUND,
        StorageError::InvalidState { .. }
        | StorageError::UniqueKeyTaken { .. }
        | StorageError::AlreadyExists { .. } => StatusCode::CONFLICT,
        StorageError::InvalidJob(_) | StorageError::Config(_) => StatusCode::BAD_REQUEST,
        StorageError::ReadOnly { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &queuectl_core::pool::error_chain(failure))
}

/// Runs a blocking store call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&dyn Storage) -> queuectl_core::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || f(&*store)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(storage_error(&e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())),
    }
}

fn ok(value: impl Serialize) -> Response {
    Json(value).into_response()
}

/// `GET /api/status`: counts per state and queue, workers, the last hour per minute.
pub(crate) async fn status(State(state): State<Shared>) -> Response {
    let read_only = state.read_only;
    let shared = state.clone();
    let found = blocking(&state, move |store| {
        shared.metrics.refresh(store)?;
        let counts = store.counts()?;
        let workers = store.workers()?;
        Ok(json!({
            "counts": counts,
            "total": counts.total(),
            "queues": store.queues()?,
            "worker_slots": workers.iter().map(|w| w.concurrency).sum::<usize>(),
            "workers": workers,
            "last_hour": shared.metrics.last_hour(),
            "read_only": read_only,
        }))
    })
    .await;
    found.map_or_else(|e| e, ok)
}

/// The filters of `GET /api/jobs`.
#[derive(Debug, Deserialize)]
pub(crate) struct JobsQuery {
    state: Option<String>,
    queue: Option<String>,
    q: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `GET /api/jobs`: newest first, filtered by state and queue, searched by id or command.
pub(crate) async fn jobs(State(state): State<Shared>, Query(query): Query<JobsQuery>) -> Response {
    let job_state = match query.state.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => match s.parse::<JobState>() {
            Ok(parsed) => Some(parsed),
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        None => None,
    };
    let queue = query.queue.filter(|q| !q.is_empty());
    if let Some(Err(e)) = queue.as_deref().map(check_queue_name) {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("limit must be from 1 to {MAX_LIMIT}"),
        );
    }
    let offset = query.offset.unwrap_or(0);
    let search = query
        .q
        .map(|q| q.trim().to_owned())
        .filter(|q| !q.is_empty());
    let found = blocking(&state, move |store| {
        let filter = ListQuery {
            state: job_state,
            queue: queue.clone(),
            newest_first: true,
            ..ListQuery::default()
        };
        let (jobs, more) = match &search {
            None => {
                let page = store.list(&ListQuery {
                    offset,
                    limit: Some(limit + 1),
                    ..filter
                })?;
                let more = page.len() > limit;
                (page.into_iter().take(limit).collect::<Vec<_>>(), more)
            }
            Some(text) => search_jobs(store, &filter, text, offset, limit)?,
        };
        Ok(json!({ "jobs": jobs, "offset": offset, "limit": limit, "has_more": more }))
    })
    .await;
    found.map_or_else(|e| e, ok)
}

/// The jobs matching `filter` whose id or command contains `text`, newest first: an exact id
/// first, then the newest [`SEARCH_DEPTH`] jobs looked through.
fn search_jobs(
    store: &dyn Storage,
    filter: &ListQuery,
    text: &str,
    offset: usize,
    limit: usize,
) -> queuectl_core::Result<(Vec<Job>, bool)> {
    let matches = |job: &Job| {
        filter.state.is_none_or(|s| job.state == s)
            && filter.queue.as_ref().is_none_or(|q| &job.queue == q)
    };
    let mut found: Vec<Job> = Vec::new();
    if let Ok(id) = JobId::new(text) {
        match store.get(&id) {
            Ok(mut job) if matches(&job) => {
                job.output = None;
                found.push(job);
            }
            Ok(_) | Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let page = 1_000;
    let mut seen = 0;
    while seen < SEARCH_DEPTH && found.len() <= offset + limit {
        let batch = store.list(&ListQuery {
            offset: seen,
            limit: Some(page),
            ..filter.clone()
        })?;
        seen += page;
        let done = batch.len() < page;
        found.extend(batch.into_iter().filter(|job| {
            (job.id.as_str().contains(text) || job.command.contains(text))
                && job.id.as_str() != text
        }));
        if done {
            break;
        }
    }
    let more = found.len() > offset + limit;
    Ok((found.into_iter().skip(offset).take(limit).collect(), more))
}

/// `GET /api/jobs/{id}`: every field and every attempt, a running one with its output so far.
pub(crate) async fn job(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let id = match JobId::new(id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let found = blocking(&state, move |store| {
        let job = store.get(&id)?;
        let attempts = store.attempts(&id)?;
        Ok(json!({ "job": job, "attempts": attempts }))
    })
    .await;
    found.map_or_else(|e| e, ok)
}

/// `POST /api/jobs/{id}/retry|cancel|remove`.
pub(crate) async fn job_action(
    State(state): State<Shared>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let id = match JobId::new(id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let ids = [id];
    let done = match action.as_str() {
        "retry" => {
            blocking(&state, move |s| {
                Ok(json!({ "job": s.retry(&ids, now())?.pop() }))
            })
            .await
        }
        "cancel" => {
            blocking(&state, move |s| {
                Ok(json!({ "job": s.cancel(&ids, now())?.pop() }))
            })
            .await
        }
        "remove" => {
            blocking(&state, move |s| {
                Ok(json!({ "removed": s.remove(&ids, now())? }))
            })
            .await
        }
        _ => return error(StatusCode::NOT_FOUND, "actions: retry, cancel, remove"),
    };
    done.map_or_else(|e| e, ok)
}

/// `POST /api/dlq/retry`: every dead job runs again.
pub(crate) async fn retry_dead(State(state): State<Shared>) -> Response {
    let done = blocking(&state, |s| {
        let retried = s.retry_dead(None, now())?;
        Ok(json!({ "retried": retried.len() }))
    })
    .await;
    done.map_or_else(|e| e, ok)
}

/// `POST /api/queues/{name}/pause|resume`.
pub(crate) async fn queue_action(
    State(state): State<Shared>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    let change = match action.as_str() {
        "pause" => QueueChange::Pause,
        "resume" => QueueChange::Resume,
        _ => return error(StatusCode::NOT_FOUND, "actions: pause, resume"),
    };
    if let Err(e) = check_queue_name(&name) {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let done = blocking(&state, move |s| {
        Ok(json!({ "queue": s.change_queues(Some(&[name]), change)?.pop() }))
    })
    .await;
    done.map_or_else(|e| e, ok)
}

/// `GET /api/events`: one `change` event each time the store changes (in any process), so the
/// page refreshes what it shows; a comment every 15 s keeps the connection open.
pub(crate) async fn events(
    State(state): State<Shared>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let store = state.store.clone();
    // One blocking waiter per open page; it ends when the page goes away.
    tokio::task::spawn_blocking(move || {
        let mut seen = match store.change_version() {
            Ok(version) => version,
            Err(_) => return,
        };
        while !tx.is_closed() {
            match store.wait_for_change(seen, Duration::from_secs(1)) {
                Ok(version) if version != seen => {
                    seen = version;
                    let event = Event::default().event("change").data(version.to_string());
                    if tx.blocking_send(Ok(event)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let event = Event::default()
                        .event("failure")
                        .data(queuectl_core::pool::error_chain(&e));
                    let _ = tx.blocking_send(Ok(event));
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
