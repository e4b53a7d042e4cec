//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver).
//! Skips, saying so, where Chromium or chromedriver is not installed; `.ci/run` installs them.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use support::{Queue, TIMEOUT};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("started successfully") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(TIMEOUT)
            .expect("chromedriver said it started");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900",
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a browser session")
}

/// The text of the element `css`, once `ready` says it is what the test waits for.
async fn wait_text(client: &Client, css: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
            && ready(&text)
        {
            return text;
        }
        if std::time::Instant::now() >= deadline {
            let page = client
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!("{css} never showed what was expected; the page says:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_changes_live_and_retries_a_dead_job() {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        println!(
            "skipped: {CHROMIUM} or {CHROMEDRIVER} is not installed (apt-get install chromium chromium-driver)"
        );
        return;
    }
    let q = Queue::new();
    q.enqueue(r#"{"id":"doomed","command":"echo trying; exit 1","max_retries":1}"#);
    q.cmd(["worker", "start", "--exit-when-idle"]).run();
    let hostile = r#""><img src=x onerror="window.pwned=1"><b>bold</b>"#;
    q.enqueue(&json!({ "id": "evil", "command": hostile }).to_string());
    let mut dashboard = q.background(&["dashboard", "--bind", "127.0.0.1:0"]);
    let url = dashboard.next_line();
    let driver = Driver::start();
    let client = browser(&driver).await;

    // The overview, then a job enqueued by the CLI shows without a reload.
    client.goto(&url).await.unwrap();
    wait_text(&client, "#count-pending .n", |t| t == "1").await;
    wait_text(&client, "#count-dead .n", |t| t == "1").await;
    wait_text(&client, "#live", |t| t == "live").await;
    q.enqueue(r#"{"id":"fresh","command":"true"}"#);
    wait_text(&client, "#count-pending .n", |t| t == "2").await;
    let shot = client.screenshot().await.unwrap();
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("dashboard-overview.png"), &shot).unwrap();

    // Hostile job text is text: shown as written, nothing it carries runs or renders.
    client.goto(&format!("{url}#/jobs")).await.unwrap();
    wait_text(&client, "#jobs", |t| t.contains("fresh")).await;
    let seen = client
        .execute(
            "return [document.querySelector('#jobs').textContent.includes(arguments[0]), \
             document.querySelectorAll('#jobs img, #jobs b').length, window.pwned === undefined];",
            vec![json!(hostile)],
        )
        .await
        .unwrap();
    assert_eq!(seen, json!([true, 0, true]));

    // A dead job, retried with a click, is pending.
    client.goto(&format!("{url}#/job/doomed")).await.unwrap();
    wait_text(&client, "#field-state", |t| t == "dead").await;
    let shot = client.screenshot().await.unwrap();
    std::fs::write(target.join("dashboard-job.png"), &shot).unwrap();
    client
        .find(Locator::Css("#retry"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&client, "#field-state", |t| t == "pending").await;
    assert_eq!(q.job("doomed")["state"], "pending");
    client.close().await.unwrap();
}
