//! `check`: what the store's own checks find (on the embedded store SQLite's integrity check
//! and the job counts; on PostgreSQL the job counts).

use std::io::Write;
use std::path::PathBuf;

use queuectl_core::FileStorage;
use serde::Serialize;

use crate::error::{CliError, Result};
use crate::render;
use crate::store::{self, Access, Target};

/// What was checked, as `--json` names it.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Checked {
    /// The embedded store's database file.
    Path(PathBuf),
    /// The PostgreSQL database and schema, in words.
    Database(String),
}

/// Checks the store and lists what it found; a damaged store is an error.
pub fn run(target: &Target, json: bool, out: &mut dyn Write) -> Result {
    let (checked, problems) = match target {
        Target::Home(home) => {
            let report = FileStorage::check(home)?;
            (Checked::Path(report.path), report.problems)
        }
        Target::Database { url, schema } => {
            let store = store::pg(url, schema, false, Access::Read)?;
            let problems = store.check()?;
            (Checked::Database(store.database().to_owned()), problems)
        }
    };
    let place = match &checked {
        Checked::Path(path) => path.display().to_string(),
        Checked::Database(database) => database.clone(),
    };
    if json {
        #[derive(Serialize)]
        struct Check<'a> {
            /// What was checked, in words, under the same key on every store.
            store: &'a str,
            #[serde(flatten)]
            checked: &'a Checked,
            ok: bool,
            problems: &'a [String],
        }
        render::print_json(
            out,
            &Check {
                store: &place,
                checked: &checked,
                ok: problems.is_empty(),
                problems: &problems,
            },
        )?;
    } else if problems.is_empty() {
        let what = match checked {
            Checked::Path(_) => "the integrity check",
            Checked::Database(_) => "the check of its job counts",
        };
        writeln!(out, "ok: {place} passed {what}")?;
    } else {
        writeln!(out, "{place} has problems:")?;
        for problem in &problems {
            writeln!(out, "  {problem}")?;
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(CliError::Refused(match checked {
        Checked::Path(_) => format!("the store at {place} is damaged; restore it from a backup"),
        Checked::Database(_) => format!(
            "the queue in {place} is damaged: its job counts are off, so `status` shows wrong \
             numbers"
        ),
    }))
}
