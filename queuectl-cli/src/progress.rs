//! Progress on stderr for operations that take long, drawn only when stderr is a terminal:
//! a pipe or a log file gets nothing but the usual diagnostics.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar (with a known total) or a spinner, hidden when stderr is not a terminal. Cleared
/// when dropped.
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar counting to `total`, labelled `what`.
    pub fn bar(total: u64, what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), target());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Self::start(bar, what)
    }

    /// A spinner with a running count, labelled `what`.
    pub fn counter(what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, target());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} ({elapsed})")
                .expect("a valid template"),
        );
        Self::start(bar, what)
    }

    fn start(bar: ProgressBar, what: &str) -> Self {
        bar.set_message(what.to_owned());
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Self(bar)
    }

    /// Sets how far it got.
    pub fn set(&self, position: u64) {
        self.0.set_position(position);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}
