//! The `queuectl` binary on a PostgreSQL store: several worker processes sharing one queue.
//! Each test has a schema of its own, dropped at the end. Skips, saying so, without
//! `QUEUECTL_TEST_DATABASE_URL` (`.ci/run` sets it).

mod support;

use std::collections::HashSet;

use nix::sys::signal::Signal;
use support::Queue;

/// A schema of its own on the test server, dropped when the test ends.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new() -> Option<Self> {
        let Some(url) = std::env::var("QUEUECTL_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            println!("skipping: QUEUECTL_TEST_DATABASE_URL is not set");
            return None;
        };
        // Tests of one process start at once: the clock alone does not tell them apart.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "queuectl_cli_{}_{n}_{}",
            std::process::id(),
            nanos % 1_000_000_000
        );
        Some(Self { url, name })
    }

    /// `--database-url URL --database-schema NAME` followed by `args`.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec![
            "--database-url",
            self.url.as_str(),
            "--database-schema",
            self.name.as_str(),
        ];
        all.extend_from_slice(args);
        all
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// 3 worker processes × 2 slots share 300 jobs through the database: each runs exactly once.
#[test]
fn three_worker_processes_run_each_of_300_jobs_exactly_once() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    let ran = q.scratch("ran");
    let jobs: String = (0..300)
        .map(|i| {
            let command = format!("echo j{i} >> '{}'", ran.display());
            serde_json::json!({ "id": format!("j{i}"), "command": command }).to_string() + "\n"
        })
        .collect();
    q.on_database(db.args(&["enqueue", "-"])).stdin(jobs).run();
    let workers: Vec<_> = (0..3)
        .map(|_| q.on_database(db.args(&["worker", "start", "--count", "2", "--exit-when-idle"])))
        .map(|cmd| std::thread::spawn(move || cmd.run()))
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let lines = std::fs::read_to_string(&ran).unwrap();
    let seen: Vec<&str> = lines.lines().collect();
    let unique: HashSet<&str> = seen.iter().copied().collect();
    assert_eq!((seen.len(), unique.len()), (300, 300), "each job once");
    let status = q.on_database(db.args(&["status", "--json"])).run().json();
    assert_eq!(status["counts"]["completed"], 300, "{status}");
    assert!(
        !q.home().exists(),
        "the embedded store was not touched: everything went to the database"
    );
}

/// A worker killed with SIGKILL mid-job: another worker process on the same database runs the
/// job to completion.
#[test]
fn a_job_of_a_killed_worker_completes_on_another() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    let marks = q.scratch("runs");
    let gate = q.scratch("gate");
    support::make_gate(&gate);
    // The first run waits on the gate (and is killed with its worker); the second completes.
    let command = format!(
        "echo run >> '{m}'; if [ $(wc -l < '{m}') -eq 1 ]; then read _ < '{g}'; fi; echo done",
        m = marks.display(),
        g = gate.display()
    );
    let job = serde_json::json!({ "id": "victim", "command": command });
    q.on_database(db.args(&["enqueue", &job.to_string()])).run();
    let mut doomed = q.worker(&db.args(&[]));
    doomed.wait_for("[running] job victim");
    support::eventually("the first run to start", || marks.exists());
    doomed.signal(Signal::SIGKILL);
    doomed.wait_exit();
    let mut rescuer = q.worker(&db.args(&[]));
    rescuer.wait_for("[completed] job victim");
    let job = q
        .on_database(db.args(&["show", "victim", "--json"]))
        .run()
        .json();
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["history"][0]["outcome"], "abandoned", "{job}");
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "run\nrun\n");
}

/// A throwaway PostgreSQL server of this test's own (`initdb` and `pg_ctl`), stopped and
/// deleted when dropped.
struct Server {
    dir: tempfile::TempDir,
    port: u16,
    /// `-c name=value` settings the server starts with.
    settings: Vec<String>,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Server {
    /// A new server on a free port. Run as the `postgres` user when this process is root
    /// (PostgreSQL refuses to run as root), as this user otherwise.
    fn start() -> Self {
        Self::start_with(&[], |_| {})
    }

    /// As [`Server::start`], with `settings` (`name=value`), and `prepare` given the data
    /// directory once it is made, before the server starts. Files it writes there are handed
    /// to the server's user.
    fn start_with(settings: &[&str], prepare: impl FnOnce(&std::path::Path)) -> Self {
        assert!(
            std::path::Path::new(PG_BIN).join("initdb").exists(),
            "{PG_BIN}/initdb is missing: this machine's PostgreSQL (QUEUECTL_TEST_DATABASE_URL \
             is set) comes with it"
        );
        let dir = tempfile::tempdir().unwrap();
        if nix::unistd::Uid::effective().is_root() {
            let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(postgres.uid), None).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Self {
            dir,
            port,
            settings: settings.iter().map(|s| format!("-c {s}")).collect(),
        };
        server.as_postgres(&[
            "initdb",
            "-D",
            &server.data(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        let data = std::path::PathBuf::from(server.data());
        prepare(&data);
        if nix::unistd::Uid::effective().is_root() {
            let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            for entry in std::fs::read_dir(&data).unwrap() {
                let path = entry.unwrap().path();
                nix::unistd::chown(&path, Some(postgres.uid), Some(postgres.gid)).unwrap();
            }
        }
        server.pg_ctl(&["start", "-w"]);
        server
    }

    /// `PG_BIN/args[0] args[1..]`, as the `postgres` user when this process is root.
    fn command(args: &[&str]) -> std::process::Command {
        let program = format!("{PG_BIN}/{}", args[0]);
        let mut command = if nix::unistd::Uid::effective().is_root() {
            let mut runuser = std::process::Command::new("runuser");
            runuser.args(["-u", "postgres", "--", &program]);
            runuser
        } else {
            std::process::Command::new(program)
        };
        command
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, args: &[&str]) {
        let status = Self::command(args).status().unwrap();
        assert!(status.success(), "{args:?} failed");
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.dir.path().display(),
            self.settings.join(" ")
        );
        let log = self.dir.path().join("log").display().to_string();
        let data = self.data();
        let mut all = vec![
            "pg_ctl",
            "-D",
            data.as_str(),
            "-o",
            options.as_str(),
            "-l",
            log.as_str(),
        ];
        all.extend_from_slice(args);
        self.as_postgres(&all);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Self::command(&["pg_ctl", "-D", &data, "-m", "immediate", "stop"]).status();
    }
}

/// The server crashes (`pg_ctl stop -m immediate`) and comes back mid-run: the worker rides it
/// out, every acknowledged job completes, none is left `processing`.
#[test]
fn the_server_crashing_and_coming_back_mid_run_loses_nothing() {
    // Runs where the test server runs (its URL set), on a throwaway server of its own.
    if Schema::new().is_none() {
        return;
    }
    let server = Server::start();
    let q = Queue::new();
    let url = server.url();
    let db = |args: &[&str]| {
        let mut all = vec!["--database-url", url.as_str()];
        all.extend_from_slice(args);
        q.on_database(all)
    };
    db(&["config", "set", "lease-timeout", "2"]).run();
    let ran = q.scratch("ran");
    let jobs: String = (0..100)
        .map(|i| {
            let command = format!("sleep 0.05; echo j{i} >> '{}'", ran.display());
            serde_json::json!({ "id": format!("j{i}"), "command": command }).to_string() + "\n"
        })
        .collect();
    let acknowledged = db(&["enqueue", "-"]).stdin(jobs).run().stdout;
    assert_eq!(acknowledged.lines().count(), 100);
    let mut worker = q.worker(&["--database-url", &url, "--count", "2", "--exit-when-idle"]);
    support::eventually("20 jobs to have run", || {
        std::fs::read_to_string(&ran).is_ok_and(|t| t.lines().count() >= 20)
    });
    server.pg_ctl(&["stop", "-m", "immediate"]);
    server.pg_ctl(&["start", "-w"]);
    let status = worker.wait_exit();
    assert!(status.success(), "{}", worker.transcript());
    let counts = db(&["status", "--json"]).run().json()["counts"].clone();
    assert_eq!(counts["completed"], 100, "{counts}");
    assert_eq!(counts["processing"], 0, "{counts}");
    let lines = std::fs::read_to_string(&ran).unwrap();
    let unique: HashSet<&str> = lines.lines().collect();
    assert_eq!(
        unique.len(),
        100,
        "every job ran (some maybe twice: at least once)"
    );
}

/// A TCP proxy to the test server that the test can cut (every connection closed, new ones
/// refused) and mend.
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// New connections are closed at once; those already made carry on.
    refuse_new: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn to(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse_new = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let refusing = refuse_new.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if flag.load(Ordering::SeqCst) || refusing.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || pump(from, to, &flag));
                }
            }
        });
        Self {
            port,
            cut,
            refuse_new,
        }
    }

    /// The proxy to the test server, and the test URL through it.
    fn for_test_server(db: &Schema) -> (Self, String) {
        let config: postgres::Config = db.url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("a TCP host is needed for the proxy, not {other:?}"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let proxy = Proxy::to(format!("{host}:{port}"));
        let via_proxy = db.url.replacen(
            &db.url[db.url.find('@').unwrap() + 1..db.url.rfind('/').unwrap()],
            &format!("127.0.0.1:{}", proxy.port),
            1,
        );
        (proxy, via_proxy)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }

    fn set_refuse_new(&self, refuse: bool) {
        self.refuse_new
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes or the proxy is cut (then closes both).
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cut: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    from.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if cut.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A network cut between one worker and the server: its lease runs out, a worker that still
/// reaches the server runs the job, and when the link comes back the cut-off worker's result
/// is refused and overwrites nothing.
#[test]
fn a_worker_cut_off_from_the_server_has_its_stale_result_refused() {
    let Some(db) = Schema::new() else { return };
    let (proxy, via_proxy) = Proxy::for_test_server(&db);
    let q = Queue::new();
    q.on_database(db.args(&["config", "set", "lease-timeout", "2"]))
        .run();
    let marks = q.scratch("runs");
    let gate = q.scratch("gate");
    support::make_gate(&gate);
    // The first run (behind the cut) waits for the gate and prints "first"; the second
    // completes at once.
    let command = format!(
        "echo run >> '{m}'; if [ $(wc -l < '{m}') -eq 1 ]; then read _ < '{g}'; echo first; \
         else echo second; fi",
        m = marks.display(),
        g = gate.display()
    );
    let job = serde_json::json!({ "id": "far", "command": command });
    q.on_database(db.args(&["enqueue", &job.to_string()])).run();
    let mut cut_off = q.worker(&["--database-url", &via_proxy, "--database-schema", &db.name]);
    cut_off.wait_for("[running] job far");
    support::eventually("the first run to start", || marks.exists());
    proxy.set_cut(true);
    // Its lease (2 s) runs out without heartbeats; a worker that reaches the server runs it.
    let mut rescuer = q.worker(&db.args(&[]));
    rescuer.wait_for("[completed] job far");
    proxy.set_cut(false);
    support::open_gate(&gate);
    cut_off.wait_for("[lost] job far");
    let job = q
        .on_database(db.args(&["show", "far", "--json"]))
        .run()
        .json();
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(
        job["output"].as_str().unwrap().trim(),
        "second",
        "not overwritten: {job}"
    );
    let outcomes: Vec<&str> = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["abandoned", "succeeded"], "{job}");
}

/// A worker serves the enqueues of its machine on its own connections: with the server
/// refusing new connections, an enqueue still gets its job added and run. Once the worker has
/// stopped, the enqueue connects itself, and here fails, adding nothing.
#[test]
fn enqueues_on_the_machine_go_through_its_worker() {
    let Some(db) = Schema::new() else { return };
    let (proxy, via_proxy) = Proxy::for_test_server(&db);
    let on_proxy = [
        "--database-url",
        via_proxy.as_str(),
        "--database-schema",
        &db.name,
    ];
    let q = Queue::new();
    let enqueue = |job: &str| {
        let mut args = on_proxy.to_vec();
        args.extend(["enqueue", job]);
        q.on_database(args)
    };
    let mut worker = q.worker(&on_proxy);
    worker.wait_for("[relay] enqueues on this machine go through this worker");
    enqueue(r#"{"id":"warm","command":"true"}"#).run();
    worker.wait_for("[completed] job warm");
    // What the worker declines is added here, with the words it has without a worker: no id
    // made up for the handover shows.
    let refused = enqueue(r#"{"command":"true","after":"nope"}"#)
        .status(1)
        .run();
    assert!(
        refused
            .stderr
            .contains("the job cannot run after nope: there is no such job"),
        "{}",
        refused.stderr
    );

    proxy.set_refuse_new(true);
    let out = enqueue(r#"{"id":"relayed","command":"echo relayed"}"#).run();
    assert_eq!(out.stdout, "relayed\n");
    worker.wait_for("[completed] job relayed");

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit().success());
    let out = enqueue(r#"{"id":"alone","command":"true"}"#)
        .status(1)
        .run();
    assert!(out.stderr.contains("127.0.0.1"), "{}", out.stderr);
    proxy.set_refuse_new(false);
    let jobs = q.on_database(db.args(&["list", "--json"])).run().json();
    let ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["warm", "relayed"]);
}

/// On a schema that does not exist, read commands show an empty queue and say there is none,
/// commands that change a queue refuse, and neither creates the schema: a mistyped name
/// leaves nothing behind. `enqueue` creates it.
#[test]
fn commands_on_a_missing_schema_create_nothing_but_enqueue() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    let exists = || {
        let mut client = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
        let sql = "SELECT count(*) FROM pg_namespace WHERE nspname = $1";
        client.query_one(sql, &[&db.name]).unwrap().get::<_, i64>(0) == 1
    };
    for read in [
        &["status", "--json"][..],
        &["list", "--json"],
        &["dlq", "list", "--json"],
        &["config", "show", "--json"],
    ] {
        let out = q.on_database(db.args(read)).run();
        out.json();
        assert!(
            out.stderr.contains("note: there is no queue at"),
            "{read:?}: {}",
            out.stderr
        );
    }
    assert_eq!(
        q.on_database(db.args(&["status", "--json"])).run().json()["counts"]["pending"],
        0
    );
    for change in [
        &["cancel", "nosuch"][..],
        &["dlq", "retry", "--all"],
        &["purge"],
        &["worker", "stop", "--no-wait"],
    ] {
        let out = q.on_database(db.args(change)).status(1).run();
        assert!(out.stdout.is_empty(), "{change:?}: {}", out.stdout);
        assert!(
            out.stderr.contains("there is no queue at"),
            "{change:?}: {}",
            out.stderr
        );
    }
    let out = q
        .on_database(db.args(&["config", "set", "max-retries", "many"]))
        .status(1)
        .run();
    assert!(out.stderr.contains("max-retries"), "{}", out.stderr);
    let out = q.on_database(db.args(&["queue", "resume"])).run();
    assert!(out.stderr.contains("no queues yet"), "{}", out.stderr);
    assert!(!exists(), "nothing was created");
    q.on_database(db.args(&["enqueue", r#"{"id":"a","command":"true"}"#]))
        .run();
    assert!(exists());
    let out = q.on_database(db.args(&["cancel", "a"])).run();
    assert!(!out.stderr.contains("no queue"), "{}", out.stderr);
}

/// A database user that may read the queue but not change it (here: read-only transactions,
/// as on a replica) can run the read commands: the recovery they do first is skipped, and
/// they say so. A change is refused.
#[test]
fn read_commands_work_for_a_user_that_cannot_write() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    q.on_database(db.args(&["enqueue", r#"{"id":"a","command":"true"}"#]))
        .run();
    let read_only = format!(
        "{}{}options=-c%20default_transaction_read_only%3Don",
        db.url,
        if db.url.contains('?') { "&" } else { "?" }
    );
    let as_reader = |args: &[&str]| {
        let mut all = vec!["--database-url", read_only.as_str()];
        all.extend_from_slice(&["--database-schema", db.name.as_str()]);
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for read in [
        &["status", "--json"][..],
        &["list", "--json"],
        &["show", "a", "--json"],
    ] {
        let out = q.on_database(as_reader(read)).run();
        out.json();
        assert!(
            out.stderr.contains("were not looked for") && out.stderr.contains("refused"),
            "{read:?}: {}",
            out.stderr
        );
    }
    let out = q.on_database(as_reader(&["cancel", "a"])).status(1).run();
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    let job = q
        .on_database(db.args(&["show", "a", "--json"]))
        .run()
        .json();
    assert_eq!(job["state"], "pending");
}

/// `check` on PostgreSQL checks the queue's job counts: sound, it says so (in JSON with
/// `--json`, naming the database); with a count off, it names it and exits 1.
#[test]
fn check_reports_on_the_queue_in_the_database() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    q.on_database(db.args(&["enqueue", r#"{"id":"a","command":"true"}"#]))
        .run();
    let out = q.on_database(db.args(&["check"])).run();
    assert!(
        out.stdout.starts_with("ok: ") && out.stdout.contains(&db.name),
        "{}",
        out.stdout
    );
    let report = q.on_database(db.args(&["check", "--json"])).run().json();
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["database"].as_str().unwrap().contains(&db.name),
        "{report}"
    );
    assert_eq!(report["store"], report["database"], "{report}");
    let mut client = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!(
            "UPDATE {}.counts SET jobs = jobs - 1 WHERE jobs > 0",
            db.name
        ))
        .unwrap();
    let out = q.on_database(db.args(&["check"])).status(1).run();
    assert!(
        out.stdout.contains("has problems") && out.stdout.contains("off by -1"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("is damaged"), "{}", out.stderr);
    let report = q
        .on_database(db.args(&["check", "--json"]))
        .status(1)
        .run()
        .json();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["problems"].as_array().unwrap().len(), 1, "{report}");
}

/// A worker process's connection pool (four connections) runs three threads to open them,
/// named as ours; a one-shot command's pool of one runs one.
#[test]
fn a_worker_runs_one_thread_for_its_connection_pool() {
    let Some(db) = Schema::new() else { return };
    let q = Queue::new();
    let mut worker = q.worker(&db.args(&[]));
    worker.wait_for("[started]");
    let tasks = format!("/proc/{}/task", worker.pid());
    let names: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect();
    let pool_threads = names
        .iter()
        .filter(|name| name.starts_with("queuectl-pool") || name.starts_with("r2d2"))
        .count();
    assert_eq!(pool_threads, 3, "{names:?}");
    assert!(
        !names.iter().any(|name| name.starts_with("r2d2")),
        "{names:?}"
    );
}

/// A certificate authority of a test's own.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// The CA's own certificate (PEM).
    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `name` (a server's host, or a client's user: subject name and
    /// common name) and its key (PEM).
    fn issue(&self, name: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A throwaway server that takes TLS connections only, with a certificate for `localhost`
/// issued by `ca`, which it also trusts for client certificates; `auth` is the method of
/// every TCP connection (`trust`, or `cert` for a client certificate).
fn tls_server(ca: &Ca, auth: &str) -> Server {
    let (cert, key) = ca.issue("localhost");
    let settings = [
        "ssl=on",
        "ssl_cert_file=server.crt",
        "ssl_key_file=server.key",
        "ssl_ca_file=ca.crt",
    ];
    Server::start_with(&settings, |data| {
        std::fs::write(data.join("server.crt"), &cert).unwrap();
        std::fs::write(data.join("ca.crt"), ca.pem()).unwrap();
        write_private(&data.join("server.key"), &key);
        let hba = format!(
            "local all all trust\nhostssl all all 127.0.0.1/32 {auth}\n\
             hostssl all all ::1/128 {auth}\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
    })
}

/// Writes a private key, readable by its owner alone.
fn write_private(path: &std::path::Path, key: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, key).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `status` on `url` (with `HOME` at `home`) succeeds, on an empty queue.
fn connects(q: &Queue, url: &str, home: &std::path::Path) {
    let out = q
        .on_database(["--database-url", url, "status", "--json"])
        .env("HOME", home)
        .run();
    assert_eq!(out.json()["total"], 0, "{url}: {}", out.stdout);
}

/// `status` on `url` (with `HOME` at `home`) fails, printing nothing, its error saying `why`.
fn refused(q: &Queue, url: &str, home: &std::path::Path, why: &[&str]) {
    let out = q
        .on_database(["--database-url", url, "status", "--json"])
        .env("HOME", home)
        .status(1)
        .run();
    assert!(out.stdout.is_empty(), "{url}: {}", out.stdout);
    for words in why {
        assert!(
            out.stderr.contains(words),
            "{url}: {words:?} in {}",
            out.stderr
        );
    }
}

/// The server's certificate is checked as the URL asks, with libpq's rules: on a server of
/// the test's own that takes TLS connections only, with a certificate for `localhost` issued
/// by a CA of the test's own. Every refusal fails the command at once, saying why.
#[test]
fn the_servers_certificate_is_checked_as_the_url_asks() {
    if Schema::new().is_none() {
        return;
    }
    let ca = Ca::new("queuectl test CA");
    let another = Ca::new("another CA");
    let server = tls_server(&ca, "trust");
    let q = Queue::new();
    let roots = q.scratch("roots.pem");
    std::fs::write(&roots, ca.pem()).unwrap();
    let others = q.scratch("others.pem");
    std::fs::write(&others, another.pem()).unwrap();
    let empty_home = tempfile::tempdir().unwrap();
    let home_with_root = tempfile::tempdir().unwrap();
    std::fs::create_dir(home_with_root.path().join(".postgresql")).unwrap();
    std::fs::write(home_with_root.path().join(".postgresql/root.crt"), ca.pem()).unwrap();
    let url = |host: &str, query: &str| {
        let query = query
            .replace("ROOTS", &roots.display().to_string())
            .replace("OTHERS", &others.display().to_string());
        format!(
            "postgres://postgres@{host}:{}/postgres?{query}",
            server.port
        )
    };
    let connects = |url: &str, home: &std::path::Path| connects(&q, url, home);
    let refused = |url: &str, home: &std::path::Path, why: &[&str]| refused(&q, url, home, why);
    let empty = empty_home.path();
    // The server takes no plain connection: each that succeeds below was encrypted.
    refused(
        &url("localhost", "sslmode=disable"),
        empty,
        &["takes only encrypted connections", "add sslmode=require"],
    );
    // `require` encrypts and checks nothing, unless a root certificate is given.
    connects(&url("localhost", "sslmode=require"), empty);
    connects(
        &url("127.0.0.1", "sslmode=require&sslrootcert=ROOTS"),
        empty,
    );
    refused(
        &url("localhost", "sslmode=require&sslrootcert=OTHERS"),
        empty,
        &["TLS with the server could not be set up", "UnknownIssuer"],
    );
    // `verify-full` checks the issuer and the name; `verify-ca` the issuer alone.
    connects(
        &url("localhost", "sslmode=verify-full&sslrootcert=ROOTS"),
        empty,
    );
    refused(
        &url("127.0.0.1", "sslmode=verify-full&sslrootcert=ROOTS"),
        empty,
        &["TLS with the server", "not valid for name", "127.0.0.1"],
    );
    connects(
        &url("127.0.0.1", "sslmode=verify-ca&sslrootcert=ROOTS"),
        empty,
    );
    refused(
        &url("127.0.0.1", "sslmode=verify-ca&sslrootcert=OTHERS"),
        empty,
        &["UnknownIssuer"],
    );
    // Without `sslrootcert`, the root certificate is `~/.postgresql/root.crt`.
    connects(
        &url("localhost", "sslmode=verify-full"),
        home_with_root.path(),
    );
    refused(
        &url("localhost", "sslmode=verify-full"),
        empty,
        &[
            "sslmode=verify-full",
            "sslrootcert=FILE",
            ".postgresql/root.crt",
        ],
    );
    // The key=value form reads the same.
    let key_values = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full \
         sslrootcert='{}'",
        server.port,
        roots.display()
    );
    connects(&key_values, empty);
}

/// A server that wants a client certificate (`cert` authentication) gets the one the URL
/// names (`sslcert`, `sslkey`) or the one at `~/.postgresql/postgresql.crt` and `.key`, as
/// libpq sends them. A key that others can read, a certificate missing or without its key
/// are refused before connecting; a connection without a certificate is refused by the
/// server, and the error says why.
#[test]
fn a_client_certificate_is_presented_as_libpq_presents_it() {
    if Schema::new().is_none() {
        return;
    }
    let ca = Ca::new("queuectl test CA");
    let another = Ca::new("another CA");
    let server = tls_server(&ca, "cert");
    let q = Queue::new();
    let (cert, key) = ca.issue("postgres");
    let (stranger, stranger_key) = another.issue("postgres");
    let cert_file = q.scratch("client.crt");
    std::fs::write(&cert_file, &cert).unwrap();
    let key_file = q.scratch("client.key");
    write_private(&key_file, &key);
    let stranger_file = q.scratch("stranger.crt");
    std::fs::write(&stranger_file, &stranger).unwrap();
    let stranger_key_file = q.scratch("stranger.key");
    write_private(&stranger_key_file, &stranger_key);
    let exposed_key = q.scratch("exposed.key");
    std::fs::write(&exposed_key, &key).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let dot = home.path().join(".postgresql");
    std::fs::create_dir(&dot).unwrap();
    std::fs::write(dot.join("postgresql.crt"), &cert).unwrap();
    write_private(&dot.join("postgresql.key"), &key);
    std::fs::write(dot.join("root.crt"), ca.pem()).unwrap();
    let url = |query: String| {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=require{query}",
            server.port
        )
    };
    let with = |cert: &std::path::Path, key: &std::path::Path| {
        url(format!(
            "&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ))
    };
    let connects = |url: &str, home: &std::path::Path| connects(&q, url, home);
    let refused = |url: &str, home: &std::path::Path, why: &[&str]| refused(&q, url, home, why);
    let empty = empty.path();
    refused(
        &url(String::new()),
        empty,
        &["requires a valid client certificate"],
    );
    connects(&with(&cert_file, &key_file), empty);
    // From home, with the server checked against the root there too.
    let full = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
        server.port
    );
    connects(&full, home.path());
    refused(
        &with(&stranger_file, &stranger_key_file),
        empty,
        &["TLS with the server could not be set up"],
    );
    refused(
        &with(&cert_file, &exposed_key),
        empty,
        &["can be read or written by others", "exposed.key"],
    );
    let missing = q.scratch("missing.crt");
    refused(
        &url(format!("&sslcert={}", missing.display())),
        empty,
        &["missing.crt does not exist"],
    );
    refused(
        &url(format!("&sslcert={}", cert_file.display())),
        empty,
        &[
            "has no private key",
            ".postgresql/postgresql.key",
            "sslkey=FILE",
        ],
    );
}
