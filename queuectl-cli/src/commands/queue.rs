//! `queue list|pause|resume|limit`: named queues and their settings.

use std::io::Write;

use queuectl_core::{QueueChange, QueueInfo, SpecError, Storage, check_queue_name};

use crate::args::{Command, QueueCommand, WorkerCommand};
use crate::error::Result;
use crate::render;

/// Refuses a command naming an invalid queue before any store is opened.
pub fn check_names(command: &Command) -> Result {
    let names: &[String] = match command {
        Command::Worker(WorkerCommand::Start { queues, .. }) => queues,
        Command::Queue(QueueCommand::Pause { names } | QueueCommand::Resume { names }) => names,
        Command::Queue(QueueCommand::Limit { name, .. }) => std::slice::from_ref(name),
        Command::List {
            queue: Some(name), ..
        } => std::slice::from_ref(name),
        _ => &[],
    };
    for name in names {
        check_queue_name(name).map_err(SpecError::from)?;
    }
    Ok(())
}

/// Runs one `queue` subcommand.
pub fn run(store: &dyn Storage, command: QueueCommand, out: &mut dyn Write) -> Result {
    let (names, change) = match command {
        QueueCommand::List(flag) => {
            let queues = store.queues()?;
            return if flag.json {
                render::print_json(out, &queues)
            } else {
                Ok(out.write_all(render::queue_table(&queues).as_bytes())?)
            };
        }
        QueueCommand::Pause { names } => (names, QueueChange::Pause),
        QueueCommand::Resume { names } => (names, QueueChange::Resume),
        QueueCommand::Limit { name, limit } => (vec![name], QueueChange::Limit(limit)),
    };
    let every = names.is_empty();
    let changed = store.change_queues((!every).then_some(&names[..]), change)?;
    for queue in &changed {
        writeln!(out, "{}", queue.name)?;
    }
    say!("{}", summary(&changed, change, every));
    Ok(())
}

fn summary(changed: &[QueueInfo], change: QueueChange, every: bool) -> String {
    let which = match (every, changed.len()) {
        (true, 0) => return "there are no queues yet: nothing changed".to_owned(),
        (true, n) => format!("all {n} queue(s)"),
        (false, _) => changed
            .iter()
            .map(|q| q.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    match change {
        QueueChange::Pause => {
            format!(
                "paused {which}: no worker starts their jobs; running ones finish, and ones \
                 claimed ahead (--prefetch) go back to the queue"
            )
        }
        QueueChange::Resume => format!("resumed {which}"),
        QueueChange::Limit(0) => format!("{which}: no limit"),
        QueueChange::Limit(n) => {
            format!("{which}: at most {n} job(s) at once, across every worker")
        }
    }
}
