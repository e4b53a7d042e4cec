//! The `queuectl` command line: parses arguments, calls `queuectl-core`, renders the results.
//!
//! Exit codes: 0 success, 1 refused or failed (with one `error:` line on stderr and its
//! causes), 2 usage error. Data goes to stdout, diagnostics to stderr; a closed stdout
//! (`queuectl list | head -1`) is not an error.

/// Writes a diagnostic line to stderr. Unlike `eprintln!`, a closed stderr (`2>&1 | head`)
/// drops the line instead of panicking: diagnostics never make a command fail.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod commands;
mod dashboard;
mod error;
mod progress;
mod render;
mod store;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

pub use args::Cli;
pub use error::CliError;

/// Runs the command line of this process and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Help and version go to stdout with status 0; usage errors to stderr with 2.
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = commands::run(cli, &mut out).and_then(|()| out.flush().map_err(CliError::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => {
            let mut stderr = io::stderr().lock();
            let _ = writeln!(stderr, "error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                let _ = writeln!(stderr, "caused by: {cause}");
                source = cause.source();
            }
            ExitCode::from(error.exit_code())
        }
    }
}
