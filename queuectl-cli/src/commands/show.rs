//! `show ID`: one job in full, with its attempts.

use std::io::Write;

use queuectl_core::{Attempt, Job, JobId, SpecError, Storage};
use serde::Serialize;

use crate::error::Result;
use crate::{render, store};

/// `show --json`: the job, and its attempts (as `history`: `attempts` is the job's count).
#[derive(Serialize)]
struct JobWithAttempts {
    #[serde(flatten)]
    job: Job,
    history: Vec<Attempt>,
}

/// Shows the job `id`.
pub fn run(store: &dyn Storage, id: String, json: bool, out: &mut dyn Write) -> Result {
    let id = JobId::new(id).map_err(SpecError::from)?;
    store::recover(store)?;
    let job = store.get(&id)?;
    let attempts = store.attempts(&id)?;
    if json {
        render::print_json(
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
