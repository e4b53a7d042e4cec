//! One module per command; [`run`] opens the store as the command needs it and dispatches.

mod check;
mod config;
mod control;
mod dlq;
mod enqueue;
mod list;
mod logs;
mod purge;
mod queue;
mod show;
mod stats;
mod status;
pub mod worker;

use std::io::Write;

use clap::CommandFactory;

use queuectl_core::ListQuery;

use crate::args::{Cli, Command, ConfigCommand, WorkerCommand};
use crate::error::Result;
use crate::store;

/// Runs one parsed command line, writing data to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result {
    // These describe the command line itself: no store is looked at.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "queuectl", out);
            return Ok(());
        }
        Command::Man => {
            return Ok(clap_mangen::Man::new(Cli::command()).render(out)?);
        }
        _ => {}
    }
    let target = store::target(cli.home, cli.database_url, cli.database_schema)?;
    // Parse job input before touching the store: refused input changes nothing.
    let mut jobs = match &cli.command {
        Command::Enqueue { job, .. } => Some(enqueue::parse(job)?),
        _ => None,
    };
    queue::check_names(&cli.command)?;
    if let Command::Config(ConfigCommand::Set { key, value }) = &cli.command {
        queuectl_core::Config::check(key, value)?;
    }
    if let (Command::Enqueue { job, json }, Some(batch)) = (&cli.command, &mut jobs)
        && let Some(entries) = enqueue::hand_over(&target, batch)?
    {
        return enqueue::print(&entries, job == "-", *json, out);
    }
    let access = store::access(&cli.command);
    match cli.command {
        Command::Check(flag) => check::run(&target, flag.json, out),
        Command::Worker(WorkerCommand::Start {
            count,
            exit_when_idle,
            prefetch,
            queues,
        }) => worker::start(
            store::open_for_work(&target)?,
            count.map(usize::from),
            exit_when_idle,
            prefetch,
            queues,
            store::relay_key(&target),
        ),
        command => {
            let waits = matches!(
                command,
                Command::Wait { .. } | Command::Logs { .. } | Command::Dashboard { .. }
            ) || matches!(command, Command::Worker(WorkerCommand::Stop { .. }));
            let shared = store::open(&target, access, waits)?;
            let store = &*shared;
            match command {
                Command::Enqueue { job, json } => {
                    let entries = enqueue::submit(store, jobs.unwrap_or_default())?;
                    enqueue::print(&entries, job == "-", json, out)
                }
                Command::Worker(WorkerCommand::Stop {
                    timeout,
                    no_wait,
                    force,
                }) => worker::stop(store, timeout, no_wait, force),
                Command::Status(flag) => status::run(store, flag.json, out),
                Command::List {
                    state,
                    queue,
                    limit,
                    offset,
                    newest,
                    json,
                } => {
                    let query = ListQuery {
                        state,
                        queue,
                        offset,
                        limit,
                        newest_first: newest,
                    };
                    list::run(store, query, json, out)
                }
                Command::Show { id, json } => show::run(store, id, json, out),
                Command::Dlq(command) => dlq::run(store, command, out),
                Command::Queue(command) => queue::run(store, command, out),
                Command::Stats { since, json } => stats::run(store, since, json, out),
                Command::Dashboard {
                    bind,
                    token,
                    read_only,
                } => crate::dashboard::serve(
                    shared.clone(),
                    crate::dashboard::Options {
                        bind,
                        token,
                        read_only,
                    },
                    out,
                ),
                Command::Config(command) => config::run(store, command, out),
                Command::Purge { older_than } => purge::run(store, older_than, out),
                Command::Cancel { ids } => control::cancel(store, &ids, out),
                Command::Wait { ids, timeout } => control::wait(store, &ids, timeout, out),
                Command::Logs {
                    id,
                    attempt,
                    follow: false,
                } => logs::run(store, &id, attempt, out),
                Command::Logs {
                    id,
                    attempt,
                    follow: true,
                } => logs::follow(store, &id, attempt, out),
                Command::Remove { ids } => control::remove(store, &ids, out),
                Command::Retry { ids } => control::retry(store, &ids, out),
                Command::Check(_)
                | Command::Completions { .. }
                | Command::Man
                | Command::Worker(WorkerCommand::Start { .. }) => {
                    unreachable!("handled above")
                }
            }
        }
    }
}
