//! `queuectl dashboard` over HTTP: every endpoint, its status codes, the token and CSRF rules,
//! hostile job text, live events and `/metrics` read by a Prometheus text parser.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use serde_json::Value;
use support::{Background, Queue, TIMEOUT};

/// An HTTP client that returns every status as a response, not as an error.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into()
}

struct Dashboard {
    /// `http://127.0.0.1:PORT/` (plus `?token=…` when it has one).
    url: String,
    base: String,
    _process: Background,
}

impl Dashboard {
    fn start(q: &Queue, args: &[&str]) -> Self {
        let mut all = vec!["dashboard"];
        all.extend_from_slice(args);
        if !args.contains(&"--bind") {
            all.extend(["--bind", "127.0.0.1:0"]);
        }
        let mut process = q.background(&all);
        let url = process.next_line();
        let base = url.split('?').next().unwrap().to_owned();
        Self {
            url,
            base,
            _process: process,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = agent().get(&format!("{}{path}", self.base)).call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The CSRF token the page carries.
    fn csrf(&self) -> String {
        let (_, page) = self.get("");
        let marker = "name=\"csrf-token\" content=\"";
        let start = page.find(marker).expect("a CSRF token in the page") + marker.len();
        page[start..start + 32].to_owned()
    }

    fn post(&self, path: &str, csrf: Option<&str>) -> (u16, Value) {
        let mut request = agent().post(&format!("{}{path}", self.base));
        if let Some(csrf) = csrf {
            request = request.header("X-CSRF-Token", csrf);
        }
        let mut response = request.send_empty().unwrap();
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }
}

fn ids(page: &Value) -> Vec<&str> {
    page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect()
}

#[test]
fn the_api_filters_pages_and_says_what_went_wrong() {
    let q = Queue::new();
    let jobs = concat!(
        r#"{"id":"ok1","command":"true"}"#,
        "\n",
        r#"{"id":"bad","command":"exit 1","max_retries":1,"queue":"mail"}"#,
        "\n",
        r#"{"id":"ok2","command":"echo findme","queue":"mail"}"#,
        "\n",
    );
    q.cmd(["enqueue", "-"]).stdin(jobs).run();
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    q.enqueue(r#"{"id":"later","command":"true","delay":3600}"#);
    let d = Dashboard::start(&q, &[]);

    let status = d.json("api/status");
    assert_eq!(status["counts"]["completed"], 2);
    assert_eq!(status["counts"]["dead"], 1);
    assert_eq!(status["last_hour"].as_array().unwrap().len(), 60);
    let done: u64 = status["last_hour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(done, 2);
    assert_eq!(status["queues"].as_array().unwrap().len(), 2);

    assert_eq!(ids(&d.json("api/jobs")), ["later", "ok2", "bad", "ok1"]);
    assert_eq!(ids(&d.json("api/jobs?state=dead")), ["bad"]);
    assert_eq!(ids(&d.json("api/jobs?queue=mail")), ["ok2", "bad"]);
    assert_eq!(ids(&d.json("api/jobs?q=findme")), ["ok2"]);
    assert_eq!(ids(&d.json("api/jobs?q=ok1")), ["ok1"]);
    let page = d.json("api/jobs?limit=2&offset=1");
    assert_eq!(ids(&page), ["ok2", "bad"]);
    assert_eq!(page["has_more"], true);
    assert_eq!(d.json("api/jobs?limit=2&offset=2")["has_more"], false);
    let job = d.json("api/jobs/bad");
    assert_eq!(job["job"]["state"], "dead");
    assert_eq!(job["attempts"][0]["outcome"], "failed");

    for (path, code) in [
        ("api/jobs/nope", 404),
        ("api/jobs/..%2Fetc", 400),
        ("api/jobs?state=running", 400),
        ("api/jobs?limit=0", 400),
        ("api/jobs?limit=5000", 400),
        ("api/jobs?queue=no%20spaces", 400),
        ("no/such/page", 404),
    ] {
        let (status, body) = d.get(path);
        assert_eq!(status, code, "GET {path}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }

    // Actions: POST with the page's CSRF token only.
    let csrf = d.csrf();
    assert_eq!(d.post("api/jobs/bad/retry", None).0, 403);
    assert_eq!(
        d.post("api/jobs/bad/retry", Some("0".repeat(32).as_str()))
            .0,
        403
    );
    assert_eq!(
        d.json("api/jobs/bad")["job"]["state"],
        "dead",
        "refused: nothing changed"
    );
    let (status, body) = d.post("api/jobs/bad/retry", Some(&csrf));
    assert_eq!(
        (status, body["job"]["state"].as_str()),
        (200, Some("pending"))
    );
    assert_eq!(d.post("api/jobs/ok1/cancel", Some(&csrf)).0, 409);
    assert_eq!(d.post("api/jobs/nope/cancel", Some(&csrf)).0, 404);
    assert_eq!(d.post("api/jobs/later/explode", Some(&csrf)).0, 404);
    assert_eq!(d.post("api/jobs/later/cancel", Some(&csrf)).0, 200);
    assert_eq!(d.post("api/jobs/later/remove", Some(&csrf)).0, 200);
    assert_eq!(d.get("api/jobs/later").0, 404);
    assert_eq!(d.post("api/queues/mail/pause", Some(&csrf)).0, 200);
    let queues = d.json("api/status")["queues"].clone();
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "mail" && q["paused"] == true)
    );
    assert_eq!(d.post("api/queues/mail/resume", Some(&csrf)).0, 200);
    assert_eq!(d.post("api/queues/bad%20name/pause", Some(&csrf)).0, 400);
    let (status, body) = d.post("api/dlq/retry", Some(&csrf));
    assert_eq!((status, body["retried"].as_u64()), (200, Some(0)));
    let deleted = agent()
        .delete(&format!("{}api/jobs/ok1", d.base))
        .call()
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 405);
}

#[test]
fn hostile_job_text_is_data_and_the_page_is_locked_down() {
    let q = Queue::new();
    let hostile = r#""><img src=x onerror=alert(1)><script>alert(2)</script>"#;
    let job = serde_json::json!({ "id": "evil", "command": hostile });
    q.enqueue(&job.to_string());
    let d = Dashboard::start(&q, &[]);
    let response = agent().get(&d.base).call().unwrap();
    let csp = response
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(
        response.headers().get("x-content-type-options").unwrap(),
        "nosniff"
    );
    let (_, page) = d.get("");
    assert!(!page.contains("onerror"), "the page carries no job text");
    // The API hands the text over as JSON data, exactly as it was.
    let job = d.json("api/jobs/evil");
    assert_eq!(job["job"]["command"], hostile);
    let (_, raw) = d.get("api/jobs/evil");
    assert!(!raw.contains("<script>") || raw.contains(r#""command":"\"><img"#));
    let (_, script) = d.get("assets/app.js");
    assert!(
        !script.contains("innerHTML"),
        "job text is never parsed as markup"
    );
}

#[test]
fn other_addresses_need_the_token() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"a","command":"true"}"#);
    let d = Dashboard::start(&q, &["--bind", "0.0.0.0:0"]);
    let token = d
        .url
        .split("?token=")
        .nth(1)
        .expect("a generated token in the address");
    assert_eq!(token.len(), 32);
    let base = d.base.replace("0.0.0.0", "127.0.0.1");
    let get = |path: &str, auth: Option<&str>| {
        let mut request = agent().get(&format!("{base}{path}"));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        request.call().unwrap()
    };
    assert_eq!(get("api/status", None).status().as_u16(), 401);
    assert_eq!(get("metrics", None).status().as_u16(), 401);
    assert_eq!(
        get("", Some("Bearer wrong-token-value")).status().as_u16(),
        401
    );
    assert_eq!(
        get("api/status", Some(&format!("Bearer {token}")))
            .status()
            .as_u16(),
        200
    );
    // Opening the printed address sets a cookie and drops the token from the address bar.
    let opened = get(&format!("?token={token}"), None);
    assert_eq!(opened.status().as_u16(), 303);
    let cookie = opened
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let with_cookie = agent()
        .get(&format!("{base}api/status"))
        .header("Cookie", &format!("queuectl_token={token}"))
        .call()
        .unwrap();
    assert_eq!(with_cookie.status().as_u16(), 200);

    let out = q
        .cmd(["dashboard", "--bind", "127.0.0.1:0", "--token", "short"])
        .status(1)
        .run();
    assert!(
        out.stderr.contains("at least 16 characters"),
        "{}",
        out.stderr
    );
}

#[test]
fn read_only_refuses_every_action() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"a","command":"true"}"#);
    let d = Dashboard::start(&q, &["--read-only"]);
    let (_, page) = d.get("");
    assert!(page.contains(r#"name="read-only" content="true""#));
    let csrf = d.csrf();
    for path in [
        "api/jobs/a/cancel",
        "api/dlq/retry",
        "api/queues/default/pause",
    ] {
        let (status, body) = d.post(path, Some(&csrf));
        assert_eq!(status, 403, "{path}: {body}");
    }
    assert_eq!(d.json("api/jobs/a")["job"]["state"], "pending");
}

/// A change made by another process (a CLI enqueue) reaches an open event stream at once.
#[test]
fn events_announce_changes_made_anywhere() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"a","command":"true"}"#);
    let d = Dashboard::start(&q, &[]);
    let addr = d
        .base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // The headers, up to the blank line.
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if line.to_ascii_lowercase().starts_with("content-type") {
            assert!(line.contains("text/event-stream"), "{line}");
        }
    }
    q.enqueue(r#"{"id":"b","command":"true"}"#);
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if line.contains("event: change") {
            break;
        }
    }
}

#[test]
fn metrics_are_prometheus_text() {
    let q = Queue::new();
    q.enqueue(r#"{"id":"before","command":"true"}"#);
    let d = Dashboard::start(&q, &[]);
    let jobs = concat!(
        r#"{"id":"m1","command":"true","queue":"mail"}"#,
        "\n",
        r#"{"id":"m2","command":"exit 1","max_retries":1,"queue":"mail"}"#,
        "\n",
    );
    q.cmd(["enqueue", "-"]).stdin(jobs).run();
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let (status, text) = d.get("metrics");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text");
    // A second scrape counts nothing twice.
    let (_, again) = d.get("metrics");
    assert_eq!(
        again
            .lines()
            .filter(|l| l.starts_with("queuectl_attempts_total"))
            .collect::<Vec<_>>(),
        text.lines()
            .filter(|l| l.starts_with("queuectl_attempts_total"))
            .collect::<Vec<_>>()
    );
    let value = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {metric} {labels:?}"))
    };
    assert_eq!(
        value("queuectl_jobs", &[("queue", "mail"), ("state", "dead")]),
        1.0
    );
    assert_eq!(
        value(
            "queuectl_jobs",
            &[("queue", "default"), ("state", "completed")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "queuectl_attempts_total",
            &[("queue", "mail"), ("outcome", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "queuectl_attempts_total",
            &[("queue", "mail"), ("outcome", "failed")]
        ),
        1.0
    );
    assert_eq!(value("queuectl_workers", &[]), 0.0);
    let histogram = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "queuectl_job_duration_seconds" && s.labels.get("queue") == Some("mail")
        })
        .expect("the duration histogram of mail");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(total, 2.0, "{buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }
}
