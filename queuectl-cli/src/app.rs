//! Each subcommand: open the store, call the library, render.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use queuectl_core::pool::{PoolError, hostname, recover_abandoned};
use queuectl_core::{
    Attempt, ConfigError, FileOptions, FileStorage, Job, JobId, JobSpec, JobState, ListQuery,
    MemoryStorage, NewJob, SpecError, Storage, StorageError, now,
};
use serde::Serialize;

use crate::args::{Cli, Command, ConfigCommand, DlqCommand, WorkerCommand};
use crate::render;
use crate::worker;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The store refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A job description was refused.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A job description on standard input was refused.
    #[error("job on line {line} of standard input refused; nothing was enqueued")]
    Line {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: SpecError,
    },
    /// A setting was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The worker pool failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Writing to stdout failed.
    #[error("could not write to standard output")]
    Output(#[source] io::Error),
    /// Reading stdin failed.
    #[error("could not read standard input")]
    Input(#[source] io::Error),
    /// Installing signal handlers failed.
    #[error("could not install the signal handlers")]
    Signals(#[source] io::Error),
    /// There is no home directory to put the store in.
    #[error("no data directory for this user: pass --home DIR or set QUEUECTL_HOME")]
    NoHome,
    /// Another refusal, with its reason.
    #[error("{0}")]
    Refused(String),
}

impl CliError {
    /// Whether this is a write to a closed pipe (a reader like `head` went away): not an error.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

impl From<io::Error> for CliError {
    fn from(error: io::Error) -> Self {
        CliError::Output(error)
    }
}

/// The outcome of every command.
pub type Result<T = (), E = CliError> = std::result::Result<T, E>;

/// How a command opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// It may create the store (enqueue, worker start, config set).
    Create,
    /// It changes an existing store, and refuses when there is none.
    Change,
    /// It only reads: it never creates a store, and works on one it cannot write.
    Read,
}

fn access(command: &Command) -> Access {
    match command {
        Command::Enqueue { .. }
        | Command::Worker(WorkerCommand::Start { .. })
        | Command::Config(ConfigCommand::Set { .. }) => Access::Create,
        Command::Worker(WorkerCommand::Stop { .. })
        | Command::Dlq(DlqCommand::Retry { .. } | DlqCommand::Clear)
        | Command::Purge { .. } => Access::Change,
        Command::Status(_)
        | Command::List { .. }
        | Command::Show { .. }
        | Command::Dlq(DlqCommand::List(_))
        | Command::Config(ConfigCommand::Show(_) | ConfigCommand::Get { .. })
        | Command::Check(_) => Access::Read,
    }
}

/// Runs one parsed command line, writing data to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result {
    let home = match cli.home {
        Some(home) => home,
        None => default_home()?,
    };
    // Parse job input before touching the store: refused input changes nothing.
    let jobs = match &cli.command {
        Command::Enqueue { job, .. } => Some(parse_jobs(job)?),
        _ => None,
    };
    if let Command::Check(flag) = &cli.command {
        return check(&home, flag.json, out);
    }
    if let Command::Worker(WorkerCommand::Start {
        count,
        exit_when_idle,
        prefetch,
    }) = cli.command
    {
        return worker::start(
            open_for_work(&home)?,
            count.map(usize::from),
            exit_when_idle,
            prefetch as usize,
        );
    }
    let store = open(&home, access(&cli.command))?;
    match cli.command {
        Command::Enqueue { job, json } => {
            let created = store.enqueue_batch(jobs.unwrap_or_default(), now())?;
            if json && job != "-" {
                print_json(out, &created[0])
            } else if json {
                print_json(out, &created)
            } else {
                for job in &created {
                    writeln!(out, "{}", job.id)?;
                }
                Ok(())
            }
        }
        Command::Worker(WorkerCommand::Start { .. }) | Command::Check(_) => {
            unreachable!("handled above")
        }
        Command::Worker(WorkerCommand::Stop {
            timeout,
            no_wait,
            force,
        }) => worker::stop(&*store, timeout, no_wait, force),
        Command::Status(flag) => status(&*store, flag.json, out),
        Command::List { state, limit, json } => {
            recover(&*store)?;
            let query = ListQuery {
                state,
                offset: 0,
                limit,
            };
            let jobs = store.list(&query)?;
            if json {
                print_json(out, &jobs)
            } else {
                Ok(out.write_all(render::job_table(&jobs).as_bytes())?)
            }
        }
        Command::Show { id, json } => {
            let id = JobId::new(id).map_err(SpecError::from)?;
            recover(&*store)?;
            let job = store.get(&id)?;
            let attempts = store.attempts(&id)?;
            if json {
                print_json(
                    out,
                    &JobWithAttempts {
                        job,
                        history: attempts,
                    },
                )
            } else {
                let text = render::job_detail(&job, &attempts);
                Ok(out.write_all(text.as_bytes())?)
            }
        }
        Command::Dlq(command) => dlq(&*store, command, out),
        Command::Config(command) => config(&*store, command, out),
        Command::Purge { older_than } => {
            let older_than = match older_than {
                Some(older_than) => older_than,
                None => store.config()?.completed_retention().ok_or_else(|| {
                    CliError::Refused(
                        "completed-retention is 0 (keep forever): pass --older-than SECONDS".into(),
                    )
                })?,
            };
            // Past the earliest representable time nothing can have finished: purge nothing.
            let cutoff = time::Duration::try_from(older_than)
                .ok()
                .and_then(|d| now().checked_sub(d));
            let purged = match cutoff {
                Some(cutoff) => store.purge_completed(cutoff)?,
                None => 0,
            };
            writeln!(out, "{purged}")?;
            say!("purged {purged} completed job(s)");
            Ok(())
        }
    }
}

/// `show --json`: the job, and its attempts (as `history`: `attempts` is the job's count).
#[derive(Serialize)]
struct JobWithAttempts {
    #[serde(flatten)]
    job: Job,
    history: Vec<Attempt>,
}

fn default_home() -> Result<PathBuf> {
    dirs::data_dir()
        .map(|dir| dir.join("queuectl"))
        .ok_or(CliError::NoHome)
}

/// Opens the store for `worker start`, creating it if needed.
fn open_for_work(home: &Path) -> Result<Arc<FileStorage>> {
    let store = FileStorage::open(home)?;
    announce(&store);
    Ok(Arc::new(store))
}

fn announce(store: &FileStorage) {
    if let Some(import) = store.imported() {
        say!("note: {import}");
    }
}

/// Opens the store as the command needs it. A read finds an empty queue where there is no
/// store yet (and says so), and falls back to reading a store it cannot write.
fn open(home: &Path, access: Access) -> Result<Arc<dyn Storage>> {
    let options = FileOptions {
        create: access == Access::Create,
        ..FileOptions::default()
    };
    let opened = match FileStorage::open_with(home, options) {
        Err(StorageError::NoStore { path }) if access == Access::Read => {
            say!("note: there is no queue at {} yet", path.display());
            return Ok(Arc::new(MemoryStorage::new()));
        }
        Err(error) if access == Access::Read && error.is_permission_problem() => {
            FileStorage::open_with(home, FileOptions::read_only())
        }
        other => other,
    };
    let store = opened?;
    announce(&store);
    Ok(Arc::new(store))
}

/// `check`: SQLite's integrity check and the counters.
fn check(home: &Path, json: bool, out: &mut dyn Write) -> Result {
    let report = FileStorage::check(home)?;
    if json {
        #[derive(Serialize)]
        struct Check<'a> {
            path: &'a Path,
            ok: bool,
            problems: &'a [String],
        }
        print_json(
            out,
            &Check {
                path: &report.path,
                ok: report.is_ok(),
                problems: &report.problems,
            },
        )?;
    } else if report.is_ok() {
        writeln!(
            out,
            "ok: {} passed the integrity check",
            report.path.display()
        )?;
    } else {
        writeln!(out, "{} has problems:", report.path.display())?;
        for problem in &report.problems {
            writeln!(out, "  {problem}")?;
        }
    }
    if report.is_ok() {
        Ok(())
    } else {
        Err(CliError::Refused(format!(
            "the store at {} is damaged; restore it from a backup",
            home.display()
        )))
    }
}

/// Returns jobs abandoned by dead workers to the queue before showing anything, so that what is
/// shown is true even when no worker is running to do it.
fn recover(store: &dyn Storage) -> Result<()> {
    if store.is_read_only() {
        return Ok(());
    }
    let config = store.config()?;
    recover_abandoned(store, &hostname(), config.lease_duration() * 3, now())?;
    Ok(())
}

fn print_json(out: &mut dyn Write, value: &impl Serialize) -> Result {
    serde_json::to_writer_pretty(&mut *out, value).map_err(|e| CliError::Output(e.into()))?;
    writeln!(out)?;
    Ok(())
}

/// The jobs of `enqueue ARG`: one JSON object, or JSON lines on stdin for "-".
fn parse_jobs(arg: &str) -> Result<Vec<NewJob>> {
    let at = now();
    if arg != "-" {
        return Ok(vec![JobSpec::parse(arg)?.into_new_job(at)?]);
    }
    let mut jobs = Vec::new();
    for (n, line) in io::stdin().lock().lines().enumerate() {
        let line = line.map_err(CliError::Input)?;
        if line.trim().is_empty() {
            continue;
        }
        let job = JobSpec::parse(&line)
            .and_then(|spec| spec.into_new_job(at))
            .map_err(|source| CliError::Line {
                line: n + 1,
                source,
            })?;
        jobs.push(job);
    }
    Ok(jobs)
}

#[derive(Serialize)]
struct StatusReport {
    counts: queuectl_core::StateCounts,
    total: usize,
    workers: Vec<queuectl_core::WorkerInfo>,
    config: queuectl_core::Config,
}

fn status(store: &dyn Storage, json: bool, out: &mut dyn Write) -> Result {
    recover(store)?;
    let counts = store.counts()?;
    let report = StatusReport {
        counts,
        total: counts.total(),
        workers: store.workers()?,
        config: store.config()?,
    };
    if json {
        print_json(out, &report)
    } else {
        let text = render::status(&report.counts, &report.workers, &report.config);
        Ok(out.write_all(text.as_bytes())?)
    }
}

fn dlq(store: &dyn Storage, command: DlqCommand, out: &mut dyn Write) -> Result {
    match command {
        DlqCommand::List(flag) => {
            let dead = store.list(&ListQuery::state(JobState::Dead))?;
            if flag.json {
                print_json(out, &dead)
            } else {
                Ok(out.write_all(render::job_table(&dead).as_bytes())?)
            }
        }
        DlqCommand::Retry { ids, all } => {
            let retried = if all {
                store.retry_dead(None, now())?
            } else {
                let ids = ids
                    .into_iter()
                    .map(JobId::new)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(SpecError::from)?;
                store.retry_dead(Some(&ids), now())?
            };
            for job in &retried {
                writeln!(out, "{}", job.id)?;
            }
            say!("moved {} job(s) back to pending", retried.len());
            Ok(())
        }
        DlqCommand::Clear => {
            let cleared = store.clear_dead()?;
            writeln!(out, "{cleared}")?;
            say!("deleted {cleared} dead job(s)");
            Ok(())
        }
    }
}

fn config(store: &dyn Storage, command: ConfigCommand, out: &mut dyn Write) -> Result {
    match command {
        ConfigCommand::Show(flag) => {
            let config = store.config()?;
            if flag.json {
                print_json(out, &config)
            } else {
                Ok(out.write_all(render::config(&config).as_bytes())?)
            }
        }
        ConfigCommand::Get { key } => {
            let value = store.config()?.get(&key)?;
            writeln!(out, "{value}")?;
            Ok(())
        }
        ConfigCommand::Set { key, value } => {
            let config = store.update_config(&mut |c| c.set(&key, &value))?;
            say!("{key} = {}", config.get(&key)?);
            Ok(())
        }
    }
}
