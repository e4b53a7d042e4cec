//! `check`: SQLite's integrity check and the job counters.

use std::io::Write;
use std::path::Path;

use queuectl_core::FileStorage;
use serde::Serialize;

use crate::error::{CliError, Result};
use crate::render;

/// Checks the store in `home` and lists what it found; a damaged store is an error.
pub fn run(home: &Path, json: bool, out: &mut dyn Write) -> Result {
    let report = FileStorage::check(home)?;
    if json {
        #[derive(Serialize)]
        struct Check<'a> {
            path: &'a Path,
            ok: bool,
            problems: &'a [String],
        }
        render::print_json(
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
