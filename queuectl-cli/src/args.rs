//! The command line, as clap parses it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use queuectl_core::config::MAX_WORKERS;
use queuectl_core::{JobState, Prefetch};

/// A background job queue: enqueue shell commands, run them on workers, retry failures with
/// exponential backoff, and keep the ones that never succeed in a dead letter queue.
#[derive(Debug, Parser)]
#[command(name = "queuectl", version, propagate_version = true)]
pub struct Cli {
    /// The queue's data directory, or $QUEUECTL_HOME (set but empty counts as unset)
    /// [default: the platform data directory, e.g. ~/.local/share/queuectl].
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// A PostgreSQL database to keep the queue in instead of the embedded store, so that
    /// workers on many machines share it (postgres://user@host/db), or $QUEUECTL_DATABASE_URL.
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// The PostgreSQL schema of the queue (with --database-url), or
    /// $QUEUECTL_DATABASE_SCHEMA [default: queuectl].
    #[arg(long, global = true, value_name = "NAME")]
    pub database_schema: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a job: queuectl enqueue '{"id":"job1","command":"echo hi"}'.
    ///
    /// Fields: command (required), id, max_retries, priority (higher first), run_at (RFC 3339)
    /// or delay (seconds), timeout (seconds, 0 for none), queue (default "default"),
    /// unique_key (nothing is added while a job with the same key is pending, processing or
    /// failed: its id is printed instead), after (an id or a list of ids of jobs that must
    /// complete first). Prints the job's id. With "-", reads one JSON job per line from
    /// standard input and adds all of them or none. On PostgreSQL, a worker running on this
    /// machine for the same queue adds the jobs on its open connections (faster than a
    /// connection of the enqueue's own).
    Enqueue {
        /// The job as a JSON object, or "-" for JSON lines on standard input.
        job: String,
        /// Print the stored job(s) as JSON instead of the id(s).
        #[arg(long)]
        json: bool,
    },
    /// Run or stop workers.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Show how many jobs are in each state, the live workers and the settings.
    Status(JsonFlag),
    /// List jobs, oldest first (--newest: newest first).
    List {
        /// Only jobs in this state.
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// Only jobs of this queue.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
        /// At most this many jobs.
        #[arg(long)]
        limit: Option<usize>,
        /// Skip this many jobs first (with --limit: page through the list).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Newest first.
        #[arg(long)]
        newest: bool,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one job in full, with its last error and output.
    Show {
        /// The job's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel jobs: a waiting one at once; a running one has its command (its whole process
    /// group) stopped by its worker, and ends cancelled, not retried.
    Cancel {
        /// The jobs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print the output of a job's last finished attempt (or of attempt N).
    ///
    /// The bytes as they were, into a pipe or file; with control characters shown escaped
    /// on a terminal.
    ///
    /// With --follow: the output of the running attempt so far, then more as it is produced
    /// (a new line shows within about a second, from a worker in any process), through every
    /// later attempt until the job has ended; a job waiting to run is waited for. Exits 0 when
    /// the job completed, 1 otherwise (and with --attempt N, which must be the running
    /// attempt: 0 when that attempt succeeded, 1 otherwise).
    Logs {
        /// The job.
        id: String,
        /// This attempt instead of the last one.
        #[arg(long, value_name = "N")]
        attempt: Option<u32>,
        /// Keep printing the output as it is produced until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Wait until every job is finished.
    ///
    /// Exits 0 when all of them completed, 1 when any did not (it names them), and 124 when
    /// the timeout passed first.
    Wait {
        /// The jobs.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Give up after this many seconds [default: wait as long as it takes].
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        timeout: Option<Duration>,
    },
    /// Delete jobs that are not running, with their history.
    Remove {
        /// The jobs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Run finished jobs (dead, cancelled or completed) again, with a fresh set of attempts.
    Retry {
        /// The jobs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// What the queues did lately, per queue: jobs completed, failed attempts, dead and
    /// cancelled jobs, throughput, and how long jobs waited for a worker and ran (p50, p95,
    /// max), from the attempt history.
    Stats {
        /// The window: "90s", "15m", "1h", "2d", or a number of seconds.
        #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_window)]
        since: Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a web dashboard (and Prometheus metrics on /metrics) until Ctrl+C.
    ///
    /// Prints the address to open. Listens on loopback unless told otherwise; any other
    /// address needs a token, generated and printed when none is given.
    Dashboard {
        /// Where to listen (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:7878", value_name = "ADDR")]
        bind: std::net::SocketAddr,
        /// The token every request must carry (at least 16 characters).
        #[arg(long, env = "QUEUECTL_DASHBOARD_TOKEN", value_name = "TOKEN")]
        token: Option<String>,
        /// Show everything, change nothing: no action is offered or accepted.
        #[arg(long)]
        read_only: bool,
    },
    /// Queues: list them, pause and resume them, limit how many of their jobs run at once.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// The dead letter queue: jobs that failed max-retries times.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Read and change settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script: queuectl completions bash > ~/.local/share/bash-completion/completions/queuectl
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): queuectl man | man -l -
    Man,
    /// Check the store for damage: its job counts, and on the embedded store SQLite's
    /// integrity check.
    ///
    /// Exits 0 when the store is sound, 1 when it is damaged (the problems are listed).
    Check(JsonFlag),
    /// Delete completed jobs that finished long enough ago.
    Purge {
        /// Delete those that finished more than this many seconds ago [default: the
        /// completed-retention setting].
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        older_than: Option<Duration>,
    },
}

/// `worker` subcommands.
#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Run workers in the foreground until Ctrl+C, SIGTERM, SIGHUP or `queuectl worker stop`.
    ///
    /// The first signal stops claiming and lets running jobs finish; a second one kills them
    /// and hands them back to the queue. On PostgreSQL, a worker also adds the jobs of the
    /// `queuectl enqueue`s run on its machine for its queue, over a Unix socket private to its
    /// user (one worker per queue and machine does).
    Start {
        /// How many jobs run at once [default: the worker-count setting].
        #[arg(long, short = 'c', value_parser = clap::value_parser!(u16).range(1..=MAX_WORKERS as i64))]
        count: Option<u16>,
        /// Exit once no job is running, due, or waiting for its retry, instead of waiting for
        /// more (jobs scheduled for later stay queued).
        #[arg(long)]
        exit_when_idle: bool,
        /// Jobs claimed ahead of free workers: a number, or "auto": as many as the workers
        /// start within 50 ms at the pace of the last jobs (at most 8 per worker), so short
        /// jobs are claimed several at a time and jobs longer than that one per free worker.
        /// Jobs claimed ahead wait for this process even if another worker is idle, and count
        /// as running under their queue's limit.
        #[arg(long, default_value = "auto", value_name = "N|auto")]
        prefetch: Prefetch,
        /// Run only jobs of this queue (repeat for several) [default: every queue].
        #[arg(long = "queue", value_name = "NAME")]
        queues: Vec<String>,
    },
    /// Ask every running worker on this queue to finish its jobs and exit, and wait for it.
    Stop {
        /// Give up waiting after this many seconds.
        #[arg(long, default_value = "120", value_name = "SECONDS", value_parser = parse_seconds)]
        timeout: Duration,
        /// Return at once instead of waiting for the workers to exit.
        #[arg(long)]
        no_wait: bool,
        /// Kill the running jobs and hand them back to the queue (uncharged) instead of
        /// letting them finish.
        #[arg(long)]
        force: bool,
    },
}

/// `queue` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Every queue with jobs or settings: its state, limit and jobs per state.
    List(JsonFlag),
    /// Stop workers (in every process) from starting jobs of these queues; running jobs
    /// finish. The pause lasts until `queue resume`, across restarts.
    Pause {
        /// The queues [default: every queue that has jobs or settings].
        names: Vec<String>,
    },
    /// Let workers start jobs of these queues again.
    Resume {
        /// The queues [default: every queue that has jobs or settings].
        names: Vec<String>,
    },
    /// Run at most N jobs of a queue at once, counting every worker process (0: no limit).
    Limit {
        /// The queue.
        name: String,
        /// The most of its jobs running at once; 0 removes the limit.
        limit: u32,
    },
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead jobs.
    List(JsonFlag),
    /// Move dead jobs back to pending, with a fresh set of retries.
    Retry {
        /// The jobs to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Retry every dead job.
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead job.
    Clear,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show every setting with its value.
    #[command(visible_alias = "list")]
    Show(JsonFlag),
    /// Print one setting's value.
    Get {
        /// The setting, e.g. max-retries.
        key: String,
        /// Print `{"key": …, "value": …}` with the value as a JSON number.
        #[arg(long)]
        json: bool,
    },
    /// Change a setting.
    Set {
        /// The setting, e.g. max-retries.
        key: String,
        /// Its new value.
        // A negative number is a value to refuse with a reason, not an unknown flag.
        #[arg(allow_negative_numbers = true)]
        value: String,
    },
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Seconds as a duration: a number from 0 to one year.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=YEAR).contains(&secs) => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(format!("expected seconds from 0 to {YEAR}, not {s:?}")),
    }
}

/// A window for `stats`: a duration like "15m" or "2h 30m", or seconds; at most ten years.
fn parse_window(s: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let parsed = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::try_from_secs_f64(secs).ok(),
        Ok(_) => None,
        Err(_) => humantime::parse_duration(s).ok(),
    };
    match parsed {
        Some(window) if !window.is_zero() && window <= MAX => Ok(window),
        _ => Err(format!(
            "expected a duration like 90s, 15m, 1h or 2d (up to 10 years), not {s:?}"
        )),
    }
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse()
        .map_err(|e: queuectl_core::InvalidJob| e.to_string())
}
