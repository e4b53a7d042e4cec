//! `list`: jobs in enqueue order.

use std::io::Write;

use queuectl_core::{ListQuery, Storage};

use crate::error::Result;
use crate::{render, store};

/// Lists the jobs `query` selects.
pub fn run(store: &dyn Storage, query: ListQuery, json: bool, out: &mut dyn Write) -> Result {
    store::recover(store)?;
    let jobs = store.list(&query)?;
    if json {
        render::print_json(out, &jobs)
    } else {
        if jobs.is_empty() {
            say!("no jobs");
        }
        Ok(out.write_all(render::job_table(&jobs).as_bytes())?)
    }
}
