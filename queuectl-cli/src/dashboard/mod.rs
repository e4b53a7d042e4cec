//! `queuectl dashboard`: a web UI, a JSON API under `/api/` and Prometheus metrics on
//! `/metrics`, for whichever store the command is pointed at.
//!
//! One binary: the page, its script and its style sheet are compiled in (`assets/`), with no
//! build step and nothing loaded from another host. HTTP runs on axum over tokio; every call
//! into the store (which blocks) runs on tokio's blocking pool. See `docs/api.md`.
//!
//! Security: loopback by default; any other address needs a token (generated and printed when
//! none is given), which every request must carry (`Authorization: Bearer`, the
//! `queuectl_token` cookie the page sets from `?token=` once, or `?token=`). Actions are `POST`
//! only and need the page's CSRF token in `X-CSRF-Token`; `--read-only` refuses them all. The
//! page builds every piece of job text with `textContent`, never as markup, and is served with
//! a Content-Security-Policy that allows only its own script and style.

mod api;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use queuectl_core::{Storage, now};

use crate::error::{CliError, Result};

/// How `queuectl dashboard` serves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen.
    pub bind: SocketAddr,
    /// The token every request must carry (`None`: none, loopback only).
    pub token: Option<String>,
    /// Refuse every action and hide them.
    pub read_only: bool,
}

/// What every handler sees.
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn Storage>,
    token: Option<String>,
    /// Required in `X-CSRF-Token` on every action; written into the page.
    csrf: String,
    pub(crate) read_only: bool,
    /// What `/metrics` serves.
    pub(crate) metrics: metrics::Metrics,
}

type Shared = Arc<AppState>;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// Only this page's own script, style and requests; nothing framed, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Serves until SIGINT or SIGTERM. Prints the address to open on stdout (with the token when
/// there is one) and diagnostics on stderr.
pub fn serve(store: Arc<dyn Storage>, options: Options, out: &mut dyn std::io::Write) -> Result {
    let loopback = options.bind.ip().is_loopback();
    let token = match options.token {
        Some(token) if token.len() < 16 => {
            return Err(CliError::Refused(
                "the token must have at least 16 characters".into(),
            ));
        }
        Some(token) => Some(token),
        None if loopback => None,
        None => {
            let token = random_token()?;
            say!("no --token given for a non-loopback address: generated one");
            Some(token)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Refused(format!("could not start the HTTP runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.bind)
            .await
            .map_err(|e| CliError::Refused(format!("could not listen on {}: {e}", options.bind)))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AppState {
            store,
            token: token.clone(),
            csrf: random_token()?,
            read_only: options.read_only,
            metrics: metrics::Metrics::new(now()),
        });
        let url = match &token {
            Some(token) => format!("http://{addr}/?token={token}"),
            None => format!("http://{addr}/"),
        };
        writeln!(out, "{url}")?;
        out.flush()?;
        say!(
            "serving the dashboard on http://{addr}/{}; Ctrl+C stops it",
            if options.read_only {
                " (read-only)"
            } else {
                ""
            }
        );
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| CliError::Refused(format!("the HTTP server failed: {e}")))
    })
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/assets/app.js",
            get(|| asset(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/assets/app.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .route("/metrics", get(metrics::render))
        .route("/api/status", get(api::status))
        .route("/api/jobs", get(api::jobs))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/{action}", post(api::job_action))
        .route("/api/dlq/retry", post(api::retry_dead))
        .route("/api/queues/{name}/{action}", post(api::queue_action))
        .route("/api/events", get(api::events))
        .fallback(|| async { api::error(StatusCode::NOT_FOUND, "no such page") })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Token, CSRF, read-only and the headers every response carries.
async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = presented_token(request.headers(), request.uri().query());
        if given.as_deref() != Some(token.as_str()) {
            return with_headers(api::error(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs its token: open the address `queuectl dashboard` printed",
            ));
        }
        // Opened with `?token=`: keep it in a cookie and drop it from the address bar.
        let from_query = query_token(request.uri().query()).is_some();
        if from_query && request.method() == Method::GET && request.uri().path() == "/" {
            let mut response = Redirect::to("/").into_response();
            let cookie = format!("queuectl_token={token}; Path=/; HttpOnly; SameSite=Strict");
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            return with_headers(response);
        }
    }
    if request.method() == Method::POST {
        if state.read_only {
            return with_headers(api::error(
                StatusCode::FORBIDDEN,
                "this dashboard is read-only",
            ));
        }
        let csrf = request
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok());
        if csrf != Some(state.csrf.as_str()) {
            return with_headers(api::error(
                StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token (take it from the page)",
            ));
        }
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        return with_headers(api::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET, and POST for actions",
        ));
    }
    with_headers(next.run(request).await)
}

fn with_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_owned());
    }
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("queuectl_token=").map(str::to_owned));
    from_cookie.or_else(|| query_token(query))
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(str::to_owned))
}

async fn index(State(state): State<Shared>) -> Response {
    let page = INDEX.replace("{{csrf}}", &state.csrf).replace(
        "{{read_only}}",
        if state.read_only { "true" } else { "false" },
    );
    let mut response = Response::new(Body::from(page));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    say!("stopping the dashboard");
}

/// 128 bits from the kernel, as hex.
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CliError::Refused(format!("could not read /dev/urandom for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
