//! `list`: jobs in enqueue order.

use std::io::Write;

use queuectl_core::{JobState, ListQuery, Storage};

use crate::error::Result;
use crate::{render, store};

/// Lists the jobs `state` and `limit` select.
pub fn run(
    store: &dyn Storage,
    state: Option<JobState>,
    limit: Option<usize>,
    json: bool,
    out: &mut dyn Write,
) -> Result {
    store::recover(store)?;
    let query = ListQuery {
        state,
        offset: 0,
        limit,
    };
    let jobs = store.list(&query)?;
    if json {
        render::print_json(out, &jobs)
    } else {
        Ok(out.write_all(render::job_table(&jobs).as_bytes())?)
    }
}
