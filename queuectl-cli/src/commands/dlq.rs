//! `dlq list|retry|clear`: the dead letter queue.

use std::io::Write;

use queuectl_core::{JobId, JobState, ListQuery, SpecError, Storage, now};

use crate::args::DlqCommand;
use crate::error::Result;
use crate::render;

/// Runs one `dlq` subcommand.
pub fn run(store: &dyn Storage, command: DlqCommand, out: &mut dyn Write) -> Result {
    match command {
        DlqCommand::List(flag) => {
            let dead = store.list(&ListQuery::state(JobState::Dead))?;
            if flag.json {
                render::print_json(out, &dead)
            } else {
                if dead.is_empty() {
                    say!("the dead letter queue is empty");
                }
                Ok(out.write_all(render::job_table(&dead).as_bytes())?)
            }
        }
        DlqCommand::Retry { ids, all } => {
            let retried = if all {
                let before: std::collections::HashSet<JobId> = store
                    .list(&ListQuery::state(JobState::Dead))?
                    .into_iter()
                    .map(|job| job.id)
                    .collect();
                let retried = store.retry_dead(None, now())?;
                // What `--all` leaves behind on purpose: a unique key goes to one job only.
                // (Jobs that died meanwhile, this command's own retries among them, were not
                // left behind: they were not dead when it looked.)
                let ran: std::collections::HashSet<&JobId> =
                    retried.iter().map(|job| &job.id).collect();
                for job in store.list(&ListQuery::state(JobState::Dead))? {
                    if !before.contains(&job.id) || ran.contains(&job.id) {
                        continue;
                    }
                    if let Some(key) = &job.unique_key {
                        say!(
                            "note: job {} stays dead: another job holds its unique key {key:?} \
                             (one job at a time may; `queuectl remove {}` deletes it)",
                            job.id,
                            job.id
                        );
                    }
                }
                retried
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
            let cleared = store.clear_dead(now())?;
            writeln!(out, "{cleared}")?;
            say!("deleted {cleared} dead job(s)");
            Ok(())
        }
    }
}
