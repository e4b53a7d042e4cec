//! `purge`: delete completed jobs that finished long enough ago.

use std::io::Write;
use std::time::Duration;

use queuectl_core::{Storage, now};

use crate::error::{CliError, Result};

/// Deletes completed jobs older than `older_than` (default: `completed-retention`).
pub fn run(store: &dyn Storage, older_than: Option<Duration>, out: &mut dyn Write) -> Result {
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
