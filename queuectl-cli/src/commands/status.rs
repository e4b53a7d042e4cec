//! `status`: jobs per state, live workers, settings.

use std::io::Write;

use queuectl_core::Storage;
use serde::Serialize;

use crate::error::Result;
use crate::{render, store};

/// What `status --json` prints.
#[derive(Serialize)]
struct StatusReport {
    counts: queuectl_core::StateCounts,
    total: usize,
    /// Every queue with jobs or settings.
    queues: Vec<queuectl_core::QueueInfo>,
    /// Jobs the live workers run at once, all processes together (what `--count` counts).
    worker_slots: usize,
    /// Worker processes.
    worker_processes: usize,
    workers: Vec<queuectl_core::WorkerInfo>,
    config: queuectl_core::Config,
}

/// Prints the status report.
pub fn run(store: &dyn Storage, json: bool, out: &mut dyn Write) -> Result {
    store::recover(store)?;
    let counts = store.counts()?;
    let workers = store.workers()?;
    let report = StatusReport {
        counts,
        total: counts.total(),
        queues: store.queues()?,
        worker_slots: workers.iter().map(|w| w.concurrency).sum(),
        worker_processes: workers.len(),
        workers,
        config: store.config()?,
    };
    if json {
        render::print_json(out, &report)
    } else {
        let text = render::status(
            &report.counts,
            &report.queues,
            &report.workers,
            &report.config,
        );
        Ok(out.write_all(text.as_bytes())?)
    }
}
