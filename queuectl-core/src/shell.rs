//! `ShellExecutor`: runs a job's command with `sh -c`.

use crate::executor::{CancelSignal, Executor, ExecutorError, Outcome};
use crate::job::Job;

/// Runs each job's command with `sh -c`; exit code 0 is success.
#[derive(Debug, Clone, Default)]
pub struct ShellExecutor {}

impl Executor for ShellExecutor {
    fn execute(&self, _job: &Job, _cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        Ok(Outcome::failed("not yet", std::time::Duration::ZERO))
    }
}
