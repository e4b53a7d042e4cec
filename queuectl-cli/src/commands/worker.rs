//! `worker start` and `worker stop`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use queuectl_core::pool::{hostname, recover_abandoned};
use queuectl_core::relay::{self, Relay};
use queuectl_core::{Event, Prefetch, ShellExecutor, StopReason, Storage, WorkerPool, now};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{CliError, Result};
use crate::progress::Progress;
use crate::render::{ts, visible};

/// Runs a pool of shell workers in the foreground until it is stopped.
pub fn start(
    store: Arc<dyn Storage>,
    count: Option<usize>,
    exit_when_idle: bool,
    prefetch: Prefetch,
    queues: Vec<String>,
    relay_key: Option<String>,
) -> Result {
    if std::process::id() == 1 {
        // Job processes a finished job leaves behind are handed to PID 1 when they exit; a
        // worker that is PID 1 (a container without an init) never collects them.
        say!(
            "warning: queuectl runs as PID 1; exited job processes will pile up as zombies. \
             Run it under an init (e.g. docker run --init, tini)."
        );
    }
    // Signals become stop requests: the first lets running jobs finish, a second kills them.
    // A hang-up (terminal closed, ssh dropped) is a stop request like SIGTERM, not a reason
    // to die with the jobs. Installed before the pool starts, so a failure leaves nothing
    // running.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(CliError::Signals)?;
    let signal_handle = signals.handle();
    let config = store.config()?;
    let executor = ShellExecutor::new().output_limit(config.output_limit());
    let relay_store = store.clone();
    let pool = WorkerPool::builder(store, Arc::new(executor))
        .config(&config)
        .workers(count.unwrap_or(config.worker_count()))
        .exit_when_idle(exit_when_idle)
        .prefetching(prefetch)
        .queues(queues.iter().cloned())
        .start()?;
    // Enqueues on this machine hand their jobs to this worker's open connections rather than
    // open their own, while it runs.
    let relay = relay_key.and_then(|key| start_relay(relay_store, &key));
    let stopper = pool.stopper();
    let signal_thread = std::thread::Builder::new()
        .name("queuectl-signals".into())
        .spawn(move || {
            for (n, signal) in signals.forever().enumerate() {
                let name = match signal {
                    SIGINT => "SIGINT",
                    SIGHUP => "SIGHUP",
                    _ => "SIGTERM",
                };
                say!("{} [signal] {name} received", ts(now()));
                if n == 0 {
                    stopper.graceful();
                } else {
                    stopper.forced();
                }
            }
        })
        .map_err(CliError::Signals)?;

    for event in pool.events().iter() {
        let stopped = event == Event::Stopped;
        if let Some(line) = describe(&event) {
            say!("{} {}", ts(now()), visible(&line));
        }
        if matches!(event, Event::Started { .. }) && !queues.is_empty() {
            say!("{} [queues] only jobs of {}", ts(now()), queues.join(", "));
        }
        if let (Event::Started { .. }, Some(relay)) = (&event, &relay) {
            say!(
                "{} [relay] enqueues on this machine go through this worker ({})",
                ts(now()),
                relay.path().display()
            );
        }
        if stopped {
            break;
        }
    }
    let result = pool.join();
    if let Some(relay) = relay {
        relay.stop();
    }
    signal_handle.close();
    // The thread ends as soon as the handle is closed.
    let _ = signal_thread.join();
    let summary = result?;
    say!(
        "{} [stopped] {} completed, {} failed, {} dead, {} handed back",
        ts(now()),
        summary.completed,
        summary.failed,
        summary.dead,
        summary.released
    );
    Ok(())
}

/// The relay of the queue `key` on this machine, unless another worker runs it.
fn start_relay(store: Arc<dyn Storage>, key: &str) -> Option<Relay> {
    let started = relay::socket_to_serve(&relay::runtime_dir(), key)
        .and_then(|path| Relay::start(store, &path, key));
    started.unwrap_or_else(|error| {
        say!("note: enqueues on this machine will connect to the database themselves: {error}");
        None
    })
}

/// One line of worker output.
fn describe(event: &Event) -> Option<String> {
    Some(match event {
        Event::Started { worker, threads } => {
            format!("[started] worker {worker} running up to {threads} job(s) at once")
        }
        // Said when it runs: a job claimed ahead (`--prefetch`) may wait for a free slot.
        Event::Claimed { .. } => return None,
        Event::Running {
            job,
            attempt,
            command,
        } => format!("[running] job {job} (attempt {attempt}): {command}"),
        Event::Completed { job, duration, .. } => {
            format!("[completed] job {job} in {:.3}s", duration.as_secs_f64())
        }
        Event::Failed {
            job,
            attempt,
            error,
            retry_in,
        } => format!(
            "[retry] job {job} attempt {attempt} failed: {error}; retrying in {:.1}s",
            retry_in.as_secs_f64()
        ),
        Event::Dead {
            job,
            attempt,
            error,
        } => format!("[dead] job {job} failed for good after {attempt} attempt(s): {error}"),
        Event::Released { job } => format!("[released] job {job} handed back to the queue"),
        Event::LeaseLost { job } => {
            format!("[lost] job {job}: lease lost, its result was discarded")
        }
        Event::Recovered { job, state } => {
            format!("[recovered] job {job} abandoned by a dead worker is {state} again")
        }
        Event::Purged { count } => format!("[purged] {count} old completed job(s)"),
        Event::Stopping {
            forced: false,
            reason: StopReason::Idle,
        } => "[stopping] nothing left to run".to_owned(),
        Event::Stopping {
            forced: false,
            reason,
        } => format!(
            "[stopping] ({reason}) claiming no more jobs; waiting for running ones \
             (Ctrl+C again to kill them)"
        ),
        // The pool gives up on its jobs: nothing is handed back, the jobs wait for their
        // leases.
        Event::Stopping {
            forced: true,
            reason: reason @ (StopReason::StorageFailure | StopReason::ExecutorsGone),
        } => format!(
            "[stopping] ({reason}) killing running jobs; their results cannot be recorded, so \
             they run again elsewhere once their leases run out"
        ),
        Event::Stopping {
            forced: true,
            reason,
        } => {
            format!("[stopping] ({reason}) killing running jobs and handing them back")
        }
        Event::StorageError { op, error } => format!("[error] {op}: {error}"),
        Event::Stopped => "[stopped] worker exited".to_owned(),
    })
}

/// Asks every registered worker to stop and waits until they have deregistered. With
/// `force`, the workers kill their running jobs and hand them back instead of letting them
/// finish.
pub fn stop(store: &dyn Storage, timeout: Duration, no_wait: bool, force: bool) -> Result {
    let config = store.config()?;
    let stale_after = config.lease_duration() * 3;
    // Workers that died without deregistering would never answer: clear them out first.
    recover_abandoned(store, &hostname(), stale_after, now())?;
    let asked = store.request_stop()?;
    if asked == 0 {
        say!("no workers are running");
        return Ok(());
    }
    let asked_now: Vec<_> = store
        .workers()?
        .into_iter()
        .filter(|w| w.stop_requested)
        .collect();
    let waiting: HashSet<String> = asked_now.iter().map(|w| w.id.clone()).collect();
    if force {
        // Re-recorded with the force flag. A worker that deregistered in between comes back
        // as a record without a process, which the next recovery pass removes.
        for worker in asked_now {
            store.register_worker(queuectl_core::WorkerInfo {
                stop_forced: true,
                ..worker
            })?;
        }
        say!(
            "asked {asked} worker(s) to stop now; they kill their running jobs and hand them back"
        );
    } else {
        say!("asked {asked} worker(s) to stop; they finish their running jobs first");
    }
    if no_wait {
        return Ok(());
    }
    // `--timeout` is at most a year, which an `Instant` always holds.
    let deadline = Instant::now() + timeout;
    let progress = Progress::bar(waiting.len() as u64, "workers stopped:");
    loop {
        let version = store.change_version()?;
        recover_abandoned(store, &hostname(), stale_after, now())?;
        let left: Vec<String> = store
            .workers()?
            .into_iter()
            .filter(|w| waiting.contains(&w.id))
            .map(|w| w.id)
            .collect();
        progress.set((waiting.len() - left.len()) as u64);
        if left.is_empty() {
            drop(progress);
            say!("all workers stopped");
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let hint = if force {
                "their jobs may be stuck in the kernel; they stop when those end"
            } else {
                "they are still finishing their running jobs; `queuectl worker stop --force` \
                 kills those jobs and hands them back to the queue"
            };
            return Err(CliError::Refused(format!(
                "{} worker(s) still running after {:.0}s: {} ({hint})",
                left.len(),
                timeout.as_secs_f64(),
                left.join(", ")
            )));
        }
        // Wakes on any change (a worker deregistering); the cap re-checks for dead workers.
        store.wait_for_change(version, remaining.min(Duration::from_secs(1)))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop on a storage failure does not claim to hand jobs back: it cannot.
    #[test]
    fn a_stop_on_a_storage_failure_says_the_jobs_wait_for_their_leases() {
        let said = |reason| {
            describe(&Event::Stopping {
                forced: true,
                reason,
            })
            .unwrap()
        };
        for reason in [StopReason::StorageFailure, StopReason::ExecutorsGone] {
            let failure = said(reason);
            assert!(
                failure.contains("leases run out") && !failure.contains("handing them back"),
                "{failure}"
            );
        }
        assert!(said(StopReason::Requested).contains("handing them back"));
    }
}
