//! Settlement: finished attempts become settlements, recorded in one storage call per batch
//! (which also refills the freed slots), and the results become events. On a store that
//! writes concurrently, a large batch is recorded on the settling thread while the
//! dispatcher claims for the slots it frees ([`Storage::writes_concurrently`]).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::backoff::BackoffPolicy;
use crate::error::StorageError;
use crate::executor::Status;
use crate::job::{Job, JobId, JobState, Lease, Timestamp, later, now};
use crate::storage::{AttemptReport, ClaimRequest, Settlement, Storage};
use crossbeam_channel::{Receiver, Sender};

use super::dispatcher::Dispatcher;
use super::events::{Event, PoolError};
use super::ledger::Finish;
use super::runner::Finished;

/// The dispatcher's ends of the settling thread's channels.
#[derive(Debug, Clone)]
pub(super) struct Settler {
    pub(super) requests: Sender<(Vec<Settlement>, Timestamp)>,
    pub(super) results: Receiver<crate::Result<Vec<Result<Job, StorageError>>>>,
}

/// The settling thread: records each batch it is given and sends back the results, until the
/// dispatcher drops its end.
pub(super) fn settle_on_request(
    storage: &dyn Storage,
    requests: &Receiver<(Vec<Settlement>, Timestamp)>,
    results: &Sender<crate::Result<Vec<Result<Job, StorageError>>>>,
) {
    for (settlements, at) in requests {
        if results.send(storage.settle(settlements, at)).is_err() {
            return;
        }
    }
}

/// How an attempt ended, as the dispatcher reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    Completed,
    Released,
    Failed { retry_at: Timestamp },
}

/// The settlement of a finished attempt held under `lease`, and how it ended.
pub(super) fn settlement(
    backoff: &dyn BackoffPolicy,
    lease: Lease,
    done: &Finished,
    at: Timestamp,
) -> (Settlement, Ended) {
    let (report, status) = match &done.outcome {
        Ok(outcome) => (
            AttemptReport {
                exit_code: outcome.exit_code,
                signal: outcome.signal,
                output: (!outcome.output.is_empty()).then(|| outcome.output.clone()),
                error: outcome.error_message(),
            },
            Some(&outcome.status),
        ),
        Err(error) => (
            AttemptReport {
                exit_code: None,
                signal: None,
                output: None,
                error: Some(error.clone()),
            },
            None,
        ),
    };
    match status {
        Some(Status::Succeeded) => (Settlement::Complete { lease, report }, Ended::Completed),
        Some(Status::Cancelled) => (Settlement::Release { lease }, Ended::Released),
        Some(Status::Failed(_) | Status::TimedOut(_)) | None => {
            let delay = backoff.delay(&done.job.id, done.job.attempts);
            let retry_at = later(at, delay);
            let fail = Settlement::Fail {
                lease,
                report,
                retry_at,
            };
            (fail, Ended::Failed { retry_at })
        }
    }
}

impl Dispatcher {
    /// Settles whatever executors have finished, and what the store has not taken yet once
    /// it is time to try again, in one storage call.
    pub(super) fn settle_finished(&mut self) {
        let mut finished = std::mem::take(&mut self.arrived);
        finished.extend(self.outcomes.try_iter());
        let retry_due = self.settle_at.is_some_and(|at| Instant::now() >= at);
        if finished.is_empty() && !retry_due {
            return;
        }
        for done in &finished {
            // A stopped attempt (or one handed back unstarted) says nothing of the pace.
            if let Ok(outcome) = &done.outcome
                && outcome.status != Status::Cancelled
            {
                self.note_run_time(outcome.duration);
            }
        }
        let earlier = std::mem::take(&mut self.unsettled);
        let mut batch: Vec<(Lease, Finished)> = Vec::new();
        for done in earlier.into_iter().chain(finished) {
            let Some(token) = done.token() else { continue };
            match self.ledger.finished(token) {
                Finish::Settle(lease) => batch.push((lease, done)),
                Finish::Lost(ready) => {
                    // Already reported; the job belongs to someone else now.
                    self.summary.lost += 1;
                    for assignment in ready {
                        self.start(assignment);
                    }
                }
                Finish::Unknown => {}
            }
        }
        self.settle_at = None;
        if batch.is_empty() {
            return;
        }
        self.last_settled = Instant::now();
        let busy = self.ledger.len().saturating_sub(batch.len());
        let want = if self.stopping.is_none() {
            self.capacity().saturating_sub(busy)
        } else {
            0
        };
        let at = now();
        let (settlements, ends): (Vec<Settlement>, Vec<Ended>) = batch
            .iter()
            .map(|(lease, done)| settlement(&*self.backoff, lease.clone(), done, at))
            .unzip();
        let request = self.claim_request(want);
        // Unless a forced stop is under way, look for a stop request before refilling the
        // slots this batch frees: the store does, in the same call.
        let polling = !self.stopping.as_ref().is_some_and(|s| s.forced);
        let beside_from = self.timings.settle_beside_claim_from;
        let began = Instant::now();
        // After a failed settlement, turns are one transaction again until one succeeds: a
        // store that cannot take results gets no more jobs claimed beside them.
        if polling
            && batch.len() >= beside_from
            && want >= beside_from
            && self.settle_failures == 0
            && self.settles_beside()
            && let Some(settler) = self.settler.clone()
        {
            self.settle_beside_claim(&settler, batch, ends, settlements, &request, at);
            self.note_turn_time(began.elapsed());
            return;
        }
        let settled = if polling {
            self.storage
                .settle_and_claim_polling(settlements, &request, at)
                .map(|polled| (polled.settled, polled.claimed, Some(polled.poll)))
        } else {
            self.storage
                .settle_and_claim(settlements, &request, at)
                .map(|(settled, claimed)| (settled, claimed, None))
        };
        let (results, claimed, polled) = match settled {
            Ok(settled) => {
                if want > 0 {
                    // The claim beside the settlement went through.
                    self.claim_succeeded();
                    self.note_turn_time(began.elapsed());
                }
                settled
            }
            Err(error) => {
                self.settle_failed(batch.into_iter().map(|(_, done)| done).collect(), error);
                return;
            }
        };
        self.record_results(batch, ends, results);
        self.hand_out(claimed);
        self.after_poll(polled);
    }

    /// Records `settlements` (of `batch`) on the settling thread while this one polls and
    /// claims for `request`, each in a transaction of its own, so either may fail alone: the
    /// results are then tried again later, the claim backs off.
    ///
    /// The jobs claimed are handed out as soon as the claim returns, and while the settlement
    /// takes longer than half a heartbeat past the one due (it may wait for a lock) the
    /// leases of everything else held are renewed: claimed jobs never wait unleased behind
    /// it. Only a job of the batch itself, claimed again (its settlement retried it at once),
    /// waits for the results to be taken off the ledger, so that it meets no earlier attempt
    /// of its own there; its new lease is renewed meanwhile too.
    fn settle_beside_claim(
        &mut self,
        settler: &Settler,
        batch: Vec<(Lease, Finished)>,
        ends: Vec<Ended>,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        at: Timestamp,
    ) {
        // The settling thread ends only once the dispatcher drops its end, or with a panic
        // of the store, which the dispatcher then takes up as it would its own.
        settler
            .requests
            .send((settlements, at))
            .expect("the settling thread runs while the dispatcher does");
        let mut again = Vec::new();
        let mut poll = None;
        match self
            .storage
            .settle_and_claim_polling(Vec::new(), request, at)
        {
            Ok(polled) => {
                self.claim_succeeded();
                let in_batch: HashSet<&JobId> =
                    batch.iter().map(|(lease, _)| &lease.job_id).collect();
                let (held_back, ready): (Vec<Job>, Vec<Job>) = polled
                    .claimed
                    .into_iter()
                    .partition(|job| in_batch.contains(&job.id));
                again = held_back;
                self.hand_out(ready);
                poll = Some(polled.poll);
            }
            Err(error) => self.claim_failed(error),
        }
        let settling: Vec<u64> = batch.iter().filter_map(|(_, done)| done.token()).collect();
        // Half an interval after the heartbeat due: a settlement that answers by then goes
        // without (the turn's own heartbeat follows), and no lease goes longer than one and a
        // half intervals unrenewed.
        let mut renew_at = self.next_heartbeat.max(Instant::now()) + self.heartbeat_every / 2;
        let settled = loop {
            match settler.results.recv_deadline(renew_at) {
                Ok(settled) => break settled,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let waiting: Vec<Lease> =
                        again.iter().filter_map(|job| job.lease.clone()).collect();
                    let lost = self.renew_leases_except(&settling, &waiting);
                    // Those are someone else's now: not to be started here (as a parked
                    // attempt whose lease is lost, they count as lost).
                    again.retain(|job| !lost.contains(&job.id));
                    for job in lost {
                        self.summary.lost += 1;
                        self.emit(|| Event::LeaseLost { job });
                    }
                    renew_at = Instant::now() + self.heartbeat_every;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    panic!("the settling thread ended without answering")
                }
            }
        };
        match settled {
            Ok(results) => self.record_results(batch, ends, results),
            Err(error) => {
                self.settle_failed(batch.into_iter().map(|(_, done)| done).collect(), error);
            }
        }
        self.hand_out(again);
        self.after_poll(poll);
    }

    /// Takes the recorded results of `batch` off the ledger and reports them.
    fn record_results(
        &mut self,
        batch: Vec<(Lease, Finished)>,
        ends: Vec<Ended>,
        results: Vec<crate::Result<Job>>,
    ) {
        self.settle_failures = 0;
        for (((_, done), end), result) in batch.into_iter().zip(ends).zip(results) {
            if let Some(token) = done.token() {
                self.ledger.forget(token);
            }
            self.report(end, &done, result);
        }
    }

    /// Acts on the stop request and version read before the slots were refilled, if read.
    fn after_poll(&mut self, polled: Option<crate::Result<(u64, Option<crate::WorkerInfo>)>>) {
        match polled {
            Some(Ok((version, me))) => self.polled_before_refill(version, me),
            Some(Err(error)) => self.storage_error("looking for a stop request", &error),
            None => {}
        }
    }

    fn settle_failed(&mut self, batch: Vec<Finished>, error: StorageError) {
        self.storage_error("recording job results", &error);
        self.settle_failures += 1;
        let poisoned = error.is_fatal();
        if poisoned || self.settle_failures >= self.timings.settle_attempts {
            // Results cannot be recorded: stop. The leases expire and the jobs run again
            // elsewhere.
            for done in &batch {
                if let Some(token) = done.token() {
                    self.ledger.forget(token);
                }
            }
            self.fatal.get_or_insert(PoolError::Storage {
                op: "recording job results",
                source: error,
            });
        } else {
            // Keep anything queued meanwhile (jobs handed back by a stop).
            self.unsettled.extend(batch);
            self.settle_at = Instant::now().checked_add(self.timings.settle_retry);
        }
    }

    fn report(&mut self, end: Ended, done: &Finished, result: crate::Result<Job>) {
        let job = done.job.id.clone();
        let attempt = done.job.attempts;
        let job_after = match result {
            Ok(job_after) => job_after,
            Err(StorageError::LeaseLost { .. }) => {
                self.summary.lost += 1;
                self.emit(|| Event::LeaseLost { job });
                return;
            }
            Err(error) => {
                self.storage_error("recording a job result", &error);
                return;
            }
        };
        let error = job_after.last_error.clone().unwrap_or_default();
        match (end, job_after.state) {
            (Ended::Completed, _) => {
                self.summary.completed += 1;
                let duration = done
                    .outcome
                    .as_ref()
                    .map(|o| o.duration)
                    .unwrap_or_default();
                self.emit(|| Event::Completed {
                    job,
                    attempt,
                    duration,
                });
            }
            (Ended::Released, _) => {
                self.summary.released += 1;
                self.emit(|| Event::Released { job });
            }
            (Ended::Failed { .. }, JobState::Dead) => {
                self.summary.dead += 1;
                self.emit(|| Event::Dead {
                    job,
                    attempt,
                    error,
                });
            }
            (Ended::Failed { retry_at }, _) => {
                self.summary.failed += 1;
                let retry_in =
                    Duration::try_from(retry_at - job_after.updated_at).unwrap_or_default();
                self.emit(|| Event::Failed {
                    job,
                    attempt,
                    error,
                    retry_in,
                });
            }
        }
    }
}
