//! The dispatcher loop: *turn → finished? → wait until the next deadline*.
//!
//! A turn settles what finished, runs what is due (heartbeat, recovery, purge, the shutdown
//! timeout), looks for a stop request and claims for free slots. After every turn the loop
//! asks whether the pool has finished (a fatal error, or a stop with nothing left held);
//! otherwise it waits for the first of an outcome, a control message, a storage change and
//! the earliest deadline, so that nothing a turn started (a stop, say) waits for a tick.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};

use crate::backoff::BackoffPolicy;
use crate::error::StorageError;
use crate::executor::Canceller;
use crate::job::{JobId, JobState, Lease, now};
use crate::storage::{ClaimRequest, ListQuery, Storage, WorkerInfo};

use super::Control;
use super::builder::{Prefetch, Timings, WorkerPoolBuilder};
use super::events::{Event, EventSink, PoolError, StopReason, Summary, error_chain};
use super::ledger::Ledger;
use super::recovery::recover_abandoned;
use super::runner::{Assignment, Finished};
use super::settle::Settler;

/// The dispatcher's ends of the pool's channels.
pub(super) struct Channels {
    pub(super) jobs: Sender<Assignment>,
    /// The executors' end of `jobs`, to take back jobs no executor has started.
    pub(super) unstarted: Receiver<Assignment>,
    pub(super) outcomes: Receiver<Finished>,
    pub(super) control: Receiver<Control>,
    pub(super) wake: Receiver<()>,
    pub(super) arm: Sender<u64>,
    pub(super) waker_stop: Canceller,
    /// The settling thread, if the store writes concurrently.
    pub(super) settler: Option<Settler>,
}

pub(super) struct Stopping {
    pub(super) forced: bool,
    deadline: Option<Instant>,
}

pub(super) struct Dispatcher {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) backoff: Arc<dyn BackoffPolicy>,
    pub(super) id: String,
    info: WorkerInfo,
    workers: usize,
    prefetch: Prefetch,
    /// The most jobs ever claimed ahead (what the jobs channel holds beyond the threads).
    most_ahead: usize,
    /// How long attempts took lately (a moving average), for [`Prefetch::Auto`].
    pace: Option<Duration>,
    /// How long recording a turn's results and claiming took lately (a moving average), to
    /// tell whether the jobs waiting to start outlast it ([`settles_beside`]).
    turn_time: Option<Duration>,
    pub(super) lease: Duration,
    pub(super) heartbeat_every: Duration,
    recovery_every: Duration,
    retention: Option<Duration>,
    exit_when_idle: bool,
    shutdown_timeout: Option<Duration>,
    pub(super) timings: Timings,
    pub(super) jobs: Option<Sender<Assignment>>,
    unstarted: Receiver<Assignment>,
    pub(super) outcomes: Receiver<Finished>,
    control: Receiver<Control>,
    wake: Receiver<()>,
    arm: Sender<u64>,
    waker_stop: Canceller,
    /// Records large batches of results while the dispatcher claims (`Storage::writes_concurrently`).
    pub(super) settler: Option<Settler>,
    pub(super) events: EventSink,
    pub(super) ledger: Ledger,
    /// Outcomes received while waiting, settled by the next turn.
    pub(super) arrived: Vec<Finished>,
    /// When the first of `arrived` came (see [`Dispatcher::defers_turn`]).
    first_arrived: Option<Instant>,
    /// Results the store has not taken yet (it failed, or a stop just handed jobs back).
    pub(super) unsettled: Vec<Finished>,
    /// When to try `unsettled` again.
    pub(super) settle_at: Option<Instant>,
    /// Failed attempts in a row to record results.
    pub(super) settle_failures: u32,
    claim_failures: u32,
    claim_retry_at: Option<Instant>,
    pub(super) stopping: Option<Stopping>,
    pub(super) summary: Summary,
    pub(super) next_heartbeat: Instant,
    next_recovery: Instant,
    next_purge: Instant,
    /// When the new output of running attempts is recorded next (`None` while none runs).
    next_output: Option<Instant>,
    /// Out of work: when the next scheduled job is due.
    due_at: Option<Instant>,
    /// The store version when the dispatcher last looked.
    seen_version: Option<u64>,
    /// The store changed since the last look for a stop request.
    stop_check_due: bool,
    last_stop_check: Option<Instant>,
    /// The store version and time of the last look for lost leases.
    last_lease_check: Option<(u64, Instant)>,
    /// The waker reported a change of the store.
    woken: bool,
    /// When results were last settled.
    pub(super) last_settled: Instant,
    /// When jobs were last handed out.
    last_claimed: Instant,
    /// A busy pool goes quiet (and is armed) then.
    quiet_at: Option<Instant>,
    /// When to look for lost leases again, after a change seen while that was throttled.
    lease_check_at: Option<Instant>,
    /// The store's version as read before this turn's settlement, if there was one: the
    /// turn uses it instead of reading again (it is older than the settlement, so any change
    /// since, the settlement's own included, still wakes an armed waker).
    polled: Option<u64>,
    /// An error that ends the pool, found where it could not be returned.
    pub(super) fatal: Option<PoolError>,
}

impl Dispatcher {
    pub(super) fn new(
        builder: &WorkerPoolBuilder,
        id: String,
        info: WorkerInfo,
        events: EventSink,
        channels: Channels,
    ) -> Self {
        let lease = builder.lease;
        let start = Instant::now();
        Self {
            storage: builder.storage.clone(),
            backoff: builder.backoff.clone(),
            id,
            info,
            workers: builder.workers,
            prefetch: builder.prefetch,
            most_ahead: builder.max_prefetch(),
            pace: None,
            turn_time: None,
            lease,
            heartbeat_every: builder.heartbeat.unwrap_or(lease / 3),
            recovery_every: builder
                .recovery
                .unwrap_or_else(|| (lease / 2).min(Duration::from_secs(1))),
            retention: builder.retention,
            exit_when_idle: builder.exit_when_idle,
            shutdown_timeout: builder.shutdown_timeout,
            timings: builder.timings,
            jobs: Some(channels.jobs),
            unstarted: channels.unstarted,
            outcomes: channels.outcomes,
            control: channels.control,
            wake: channels.wake,
            arm: channels.arm,
            waker_stop: channels.waker_stop,
            settler: channels.settler,
            events,
            ledger: Ledger::default(),
            arrived: Vec::new(),
            first_arrived: None,
            unsettled: Vec::new(),
            settle_at: None,
            settle_failures: 0,
            claim_failures: 0,
            claim_retry_at: None,
            stopping: None,
            summary: Summary::default(),
            next_heartbeat: start + builder.heartbeat.unwrap_or(lease / 3),
            next_recovery: start,
            next_purge: start,
            next_output: None,
            due_at: None,
            seen_version: None,
            stop_check_due: false,
            last_stop_check: None,
            last_lease_check: None,
            woken: false,
            last_settled: start,
            last_claimed: start,
            quiet_at: None,
            lease_check_at: None,
            polled: None,
            fatal: None,
        }
    }

    pub(super) fn emit(&self, make: impl FnOnce() -> Event) {
        self.events.emit(make);
    }

    pub(super) fn storage_error(&self, op: &'static str, error: &StorageError) {
        self.emit(|| Event::StorageError {
            op,
            error: error_chain(error),
        });
    }

    /// Runs the pool until it has finished.
    pub(super) fn run(&mut self) -> Result<Summary, PoolError> {
        self.emit(|| Event::Started {
            worker: self.id.clone(),
            threads: self.workers,
        });
        loop {
            self.turn();
            if let Some(end) = self.end() {
                return end;
            }
            self.schedule_output();
            let until = self.next_deadline();
            self.wait(until);
        }
    }

    /// One turn: see the [module docs](self).
    fn turn(&mut self) {
        if self.defers_turn(Instant::now()) {
            return;
        }
        self.first_arrived = None;
        self.settle_finished();
        if self.fatal.is_some() {
            return;
        }
        let now_instant = Instant::now();
        self.hand_back_waiting(now_instant);
        if let Some(stopping) = &self.stopping
            && !stopping.forced
            && stopping.deadline.is_some_and(|d| now_instant >= d)
        {
            self.begin_stop(true, StopReason::ShutdownTimeout);
        }
        if now_instant >= self.next_heartbeat {
            self.heartbeat();
            self.next_heartbeat = now_instant + self.heartbeat_every;
        }
        if now_instant >= self.next_recovery {
            self.recover();
            self.next_recovery = now_instant + self.recovery_every;
        }
        if now_instant >= self.next_purge {
            self.purge();
            self.next_purge = now_instant + self.timings.purge_every;
        }
        if self.next_output.is_some_and(|at| now_instant >= at) {
            self.record_output(now_instant);
        }
        // One read of the version per turn, before looking for a stop request and for work:
        // any change after it wakes the pool. A turn that settled has read it already.
        let version = match self.polled.take() {
            Some(version) => Some(version),
            None => self.storage.change_version().ok(),
        };
        let throttled = !std::mem::take(&mut self.woken);
        self.poll_stop_request(version, throttled);
        // Here, after the turn's settlements, no attempt is between being reported finished
        // and being settled, so one found lost now is accounted for exactly once.
        self.poll_leases(version);
        self.due_at = None;
        self.quiet_at = None;
        if let Some(stopping) = &self.stopping {
            // A stopping pool claims nothing: a retry of a failed claim must not stay due.
            self.claim_retry_at = None;
            // A graceful stop may still be made forced by a stop request in storage
            // (`worker stop --force`).
            if !stopping.forced {
                self.arm_if_quiet(version);
            }
            return;
        }
        if self.claim_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let (asked, claimed) = self.claim();
        if self.claim_retry_at.is_some() {
            return;
        }
        if claimed == asked {
            self.arm_if_quiet(version);
            return;
        }
        // Out of work: have the waker report the next change of the store. (A busy pool is
        // not armed, so its own writes do not wake it; it looks for a stop request before
        // refilling slots instead.)
        if let Some(version) = version {
            // Full means an arming is pending; the waker takes the newest one.
            let _ = self.arm.try_send(version);
        }
        if self.exit_when_idle && self.ledger.is_empty() && claimed == 0 {
            // Nothing runs and nothing is due. Jobs waiting for a retry keep the pool; jobs
            // scheduled for later do not.
            match self.storage.counts() {
                Ok(counts) if counts.failed == 0 => {
                    self.begin_stop(false, StopReason::Idle);
                    return;
                }
                Ok(_) => {}
                Err(error) => self.storage_error("counting jobs", &error),
            }
        }
        match self.storage.next_due(now()) {
            Ok(Some(due)) => {
                let until_due = (due - now()).max(time::Duration::ZERO);
                let until_due = Duration::try_from(until_due).unwrap_or_default();
                self.due_at = Instant::now().checked_add(until_due);
            }
            Ok(None) => {}
            Err(error) => self.storage_error("looking for due jobs", &error),
        }
    }

    /// A busy pool is not armed while results keep coming (its own writes would wake it
    /// for nothing; it looks for a stop request before refilling slots instead). Once no
    /// result has come for [`Timings::stop_check_every`] (long jobs), it is armed, so that
    /// a stop request recorded in storage wakes it.
    fn arm_if_quiet(&mut self, version: Option<u64>) {
        let quiet_from = self.last_settled + self.timings.stop_check_every;
        if Instant::now() < quiet_from {
            self.quiet_at = Some(quiet_from);
        } else if let Some(version) = version {
            self.quiet_at = None;
            let _ = self.arm.try_send(version);
        }
    }

    /// Whether the pool has finished, and how.
    fn end(&mut self) -> Option<Result<Summary, PoolError>> {
        if let Some(error) = self.fatal.take() {
            self.abandon(&error);
            return Some(Err(error));
        }
        let done = self.stopping.is_some()
            && self.ledger.is_empty()
            && self.unsettled.is_empty()
            && self.arrived.is_empty();
        done.then_some(Ok(self.summary))
    }

    /// The earliest instant something is due.
    fn next_deadline(&self) -> Instant {
        let stop_check = self
            .stop_check_due
            .then(|| {
                self.last_stop_check
                    .map(|t| t + self.timings.stop_check_every)
            })
            .flatten();
        [
            Some(self.next_heartbeat),
            Some(self.next_recovery),
            Some(self.next_purge),
            self.next_output,
            self.due_at,
            self.quiet_at,
            self.lease_check_at,
            self.claim_retry_at,
            self.settle_at,
            self.hand_back_at(),
            self.first_arrived
                .map(|first| first + self.timings.settle_delay),
            stop_check,
            self.stopping.as_ref().and_then(|s| s.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(Instant::now)
    }

    /// Blocks until an outcome, a control message, a storage change or `until`. Outcomes are
    /// left in their channel for the next turn to settle together.
    fn wait(&mut self, until: Instant) {
        let timeout = until.saturating_duration_since(Instant::now());
        select! {
            recv(self.outcomes) -> finished => match finished {
                Ok(finished) => self.arrived.push(finished),
                Err(_) => self.executors_gone(),
            },
            recv(self.control) -> control => match control {
                Ok(Control::Graceful) => self.begin_stop(false, StopReason::Requested),
                Ok(Control::Forced) => self.begin_stop(true, StopReason::Requested),
                Err(_) => {
                    // The WorkerPool and every Stopper were dropped: nobody can stop the pool
                    // any more, so stop now, gracefully.
                    self.control = crossbeam_channel::never();
                    self.begin_stop(false, StopReason::HandleDropped);
                }
            },
            recv(self.wake) -> woken => match woken {
                Ok(()) => self.woken = true,
                // The waker thread ended: no more wake-ups (ticks still come).
                Err(_) => self.wake = crossbeam_channel::never(),
            },
            default(timeout) => {}
        }
    }

    /// Every executor thread has ended (the outcomes channel closed): never wait on it again.
    /// Nothing can run any more, and results of attempts still out will never come: the
    /// pool ends (their leases expire and the jobs run again elsewhere).
    fn executors_gone(&mut self) {
        self.outcomes = crossbeam_channel::never();
        self.fatal.get_or_insert(PoolError::ExecutorsGone {
            running: self.ledger.len(),
        });
    }

    fn note_version(&mut self, version: u64) {
        if self.seen_version != Some(version) {
            self.seen_version = Some(version);
            self.stop_check_due = true;
        }
    }

    /// Looks for a stop request in storage if the store changed since the last look (when
    /// `throttled`, at most every [`Timings::stop_check_every`]): an idle pool notices
    /// `worker stop` when the write wakes it, a busy one before it refills the slots of
    /// finished jobs. `version` is the store version just read, if any.
    pub(super) fn poll_stop_request(&mut self, version: Option<u64>, throttled: bool) {
        if self.stopping.as_ref().is_some_and(|s| s.forced) {
            // Nothing more to look for: a look left due must not stay a deadline.
            self.stop_check_due = false;
            return;
        }
        if let Some(version) = version {
            self.note_version(version);
        }
        let due = !throttled
            || self
                .last_stop_check
                .is_none_or(|t| Instant::now() >= t + self.timings.stop_check_every);
        if self.stop_check_due && due {
            self.check_stop_request();
        }
    }

    fn check_stop_request(&mut self) {
        self.stop_check_due = false;
        self.last_stop_check = Some(Instant::now());
        match self.storage.workers() {
            Ok(workers) => {
                let me = workers.into_iter().find(|w| w.id == self.id);
                self.stop_if_asked(me);
            }
            Err(error) => self.storage_error("looking for a stop request", &error),
        }
    }

    /// What the look for a stop request made with a settlement found
    /// ([`Storage::settle_and_claim_polling`]): the store's version before the settlement,
    /// and this pool's registration.
    pub(super) fn polled_before_refill(&mut self, version: u64, me: Option<WorkerInfo>) {
        self.polled = Some(version);
        self.note_version(version);
        self.stop_check_due = false;
        self.last_stop_check = Some(Instant::now());
        self.stop_if_asked(me);
    }

    fn stop_if_asked(&mut self, me: Option<WorkerInfo>) {
        if let Some(me) = me.filter(|me| me.stop_requested) {
            self.begin_stop(me.stop_forced, StopReason::StopRequest);
        }
    }

    /// Looks for lost leases when the store changed since the last look, at most every
    /// [`Timings::stop_check_every`].
    fn poll_leases(&mut self, version: Option<u64>) {
        // Due again only from what this look finds: with the version unread (a failing
        // store) the next turn looks, instead of a deadline left in the past.
        self.lease_check_at = None;
        let Some(version) = version else { return };
        match self.last_lease_check {
            Some((seen, _)) if seen == version => {}
            // Looked too recently: look again once the throttle allows. (The change that
            // made this one due is already seen, so no later change may come to wake the
            // pool for it.)
            Some((_, at)) if Instant::now() < at + self.timings.stop_check_every => {
                self.lease_check_at = Some(at + self.timings.stop_check_every);
            }
            _ => {
                self.last_lease_check = Some((version, Instant::now()));
                self.check_leases();
                self.check_paused();
            }
        }
    }

    /// Hands back the jobs claimed ahead (`prefetch`) that no executor has started, of queues
    /// paused since they were claimed: a paused queue starts nothing new. They go back to the
    /// queue uncharged, with the next settlement; the others keep their place.
    fn check_paused(&mut self) {
        if self.unstarted.is_empty() {
            return;
        }
        let paused: std::collections::HashSet<String> = match self.storage.queues() {
            Ok(queues) => queues
                .into_iter()
                .filter(|q| q.paused)
                .map(|q| q.name)
                .collect(),
            Err(error) => return self.storage_error("looking for paused queues", &error),
        };
        if paused.is_empty() {
            return;
        }
        let mut handed_back = Vec::new();
        for assignment in self.unstarted.try_iter().collect::<Vec<_>>() {
            if paused.contains(&assignment.job.queue) {
                handed_back.push(Finished::unstarted(assignment.job));
            } else {
                self.start(assignment);
            }
        }
        if !handed_back.is_empty() {
            self.unsettled.extend(handed_back);
            self.settle_at = Some(Instant::now());
        }
    }

    /// Stops the attempts whose lease the store no longer holds (the job was cancelled, or
    /// recovered by another worker) as soon as a change to the store is seen, instead of at
    /// the next heartbeat.
    fn check_leases(&mut self) {
        let leases = self.ledger.leases();
        if leases.is_empty() {
            return;
        }
        let held = match self.storage.list(&ListQuery::state(JobState::Processing)) {
            Ok(jobs) => jobs,
            Err(error) => return self.storage_error("checking leases", &error),
        };
        let lost: Vec<JobId> = leases
            .iter()
            .filter(|lease| {
                !held.iter().any(|job| {
                    job.id == lease.job_id
                        && job.lease.as_ref().is_some_and(|l| l.token == lease.token)
                })
            })
            .map(|lease| lease.job_id.clone())
            .collect();
        for id in lost {
            self.lose(&id);
        }
    }

    /// Starts a stop, or makes a graceful one forced. A second graceful request changes
    /// nothing.
    pub(super) fn begin_stop(&mut self, forced: bool, reason: StopReason) {
        if self.stopping.as_ref().is_some_and(|s| s.forced || !forced) {
            return;
        }
        self.stopping = Some(Stopping {
            forced,
            deadline: if forced {
                None
            } else {
                self.shutdown_timeout
                    .and_then(|t| Instant::now().checked_add(t))
            },
        });
        if forced {
            self.ledger.cancel_all();
        }
        // Jobs no executor has started go back to the queue, uncharged: queued for the next
        // settlement (never settled from here, which may run inside a settlement).
        let unstarted: Vec<Finished> = self
            .unstarted
            .try_iter()
            .chain(self.ledger.take_parked())
            .map(|a| Finished::unstarted(a.job))
            .collect();
        if !unstarted.is_empty() {
            self.unsettled.extend(unstarted);
            self.settle_at = Some(Instant::now());
        }
        self.emit(|| Event::Stopping { forced, reason });
    }

    /// Whether this turn waits for more results ([`Timings::settle_delay`]): some have come,
    /// every thread has a job claimed ahead waiting for it, fewer than half of what the pool
    /// holds have finished, the first of them came less than the delay ago, and nothing else
    /// is due (no stop, wake-up, retry or deadline).
    pub(super) fn defers_turn(&mut self, at: Instant) -> bool {
        self.arrived.extend(self.outcomes.try_iter());
        if self.arrived.is_empty() {
            return false;
        }
        let first = *self.first_arrived.get_or_insert(at);
        let delay = self.timings.settle_delay;
        !delay.is_zero()
            && at < first + delay
            && self.stopping.is_none()
            && !self.woken
            && self.unsettled.is_empty()
            && self.unstarted.len() >= self.workers
            && self.arrived.len() * 2 < self.ledger.len()
            && self.next_deadline() > at
    }

    /// Jobs handed out at most: executor threads plus those claimed ahead of them.
    pub(super) fn capacity(&self) -> usize {
        let ahead = match self.prefetch {
            Prefetch::Fixed(jobs) => jobs,
            Prefetch::Auto => auto_prefetch(
                self.workers,
                self.pace,
                self.timings.prefetch_window,
                self.most_ahead,
            ),
        };
        self.workers + ahead
    }

    /// Takes the time an attempt ran into the pace of recent attempts.
    pub(super) fn note_run_time(&mut self, took: Duration) {
        self.pace = Some(moving_average(self.pace, took));
    }

    /// [`settles_beside`] for the jobs waiting to start now.
    pub(super) fn settles_beside(&self) -> bool {
        settles_beside(
            self.unstarted.len(),
            self.workers,
            self.pace,
            self.turn_time,
        )
    }

    /// Takes the time a turn's settlement and claim took into [`Dispatcher::turn_time`].
    pub(super) fn note_turn_time(&mut self, took: Duration) {
        self.turn_time = Some(moving_average(self.turn_time, took));
    }

    /// With [`Prefetch::Auto`], hands back the jobs claimed ahead that wait behind running
    /// ones once neither has an attempt finished nor a job been claimed for
    /// [`Timings::prefetch_window`]: the running attempts are longer than the pace said, and
    /// the jobs waiting behind them may run elsewhere. Jobs that threads free of work are
    /// about to take stay. The pace is forgotten: nothing more is claimed ahead until an
    /// attempt has finished again (and then as its time says).
    fn hand_back_waiting(&mut self, at: Instant) {
        let Some(since) = self.hand_back_at() else {
            return;
        };
        if at < since {
            return;
        }
        // Held and not waiting: running, or finished with results the store has yet to take.
        let waiting: Vec<Assignment> = self.unstarted.try_iter().collect();
        let running = self
            .ledger
            .len()
            .saturating_sub(waiting.len() + self.unsettled.len());
        let free_threads = self.workers.saturating_sub(running);
        let mut handed_back = Vec::new();
        for (i, assignment) in waiting.into_iter().enumerate() {
            if i < free_threads {
                // Handed out again: its wait counts from now, so this look is not due again
                // at once (the dispatcher would spin until a thread took it).
                self.last_claimed = at;
                self.start(assignment);
            } else {
                handed_back.push(Finished::unstarted(assignment.job));
            }
        }
        if !handed_back.is_empty() {
            self.pace = None;
            self.unsettled.extend(handed_back);
            self.settle_at = Some(at);
        }
    }

    /// When [`Dispatcher::hand_back_waiting`] is due, if jobs claimed ahead may wait.
    fn hand_back_at(&self) -> Option<Instant> {
        (self.prefetch == Prefetch::Auto && !self.unstarted.is_empty())
            .then(|| self.last_settled.max(self.last_claimed) + self.timings.prefetch_window)
    }

    /// Claims jobs for free slots and hands them to executors. Returns how many it asked for
    /// and how many it got.
    fn claim(&mut self) -> (usize, usize) {
        let free = self.capacity().saturating_sub(self.ledger.len());
        if free == 0 {
            // Nothing to claim: a retry due after a failed claim is moot (the slots were
            // filled beside settlements meanwhile), and must not stay due, or every turn
            // would return at once to try it.
            self.claim_retry_at = None;
            return (0, 0);
        }
        match self.storage.claim_jobs(&self.claim_request(free), now()) {
            Ok(claimed) => {
                self.claim_succeeded();
                let count = claimed.len();
                self.hand_out(claimed);
                (free, count)
            }
            Err(error) => {
                self.claim_failed(error);
                (free, 0)
            }
        }
    }

    /// Notes a claim that succeeded: the next one is not held back.
    pub(super) fn claim_succeeded(&mut self) {
        self.claim_failures = 0;
        self.claim_retry_at = None;
    }

    /// Notes a claim that failed. Claims back off (doubling up to the maximum) instead of
    /// retrying at once: a failing store must not make the dispatcher spin.
    pub(super) fn claim_failed(&mut self, error: StorageError) {
        let backoff = self
            .timings
            .settle_retry
            .saturating_mul(1 << self.claim_failures.min(5))
            .min(self.timings.claim_backoff_max);
        self.claim_failures = self.claim_failures.saturating_add(1);
        self.claim_retry_at = Instant::now().checked_add(backoff);
        self.tolerate("claiming jobs", error);
    }

    /// A claim of up to `max` jobs of the queues this pool runs.
    pub(super) fn claim_request(&self, max: usize) -> ClaimRequest {
        ClaimRequest {
            worker: self.id.clone(),
            max,
            lease_for: self.lease,
            queues: self.info.queues.clone(),
        }
    }

    /// Gives claimed jobs to the executors (or parks them behind a lost attempt of the same
    /// job that is still running here).
    pub(super) fn hand_out(&mut self, claimed: Vec<crate::Job>) {
        if !claimed.is_empty() {
            self.last_claimed = Instant::now();
        }
        for job in claimed {
            self.emit(|| Event::Claimed {
                job: job.id.clone(),
                attempt: job.attempts,
                command: job.command.clone(),
            });
            let (run, lost) = self.ledger.claimed(job);
            if let Some(job) = lost {
                self.emit(|| Event::LeaseLost { job });
            }
            if let Some(assignment) = run {
                self.start(assignment);
            }
        }
    }

    /// Queues an assignment for the executors. Cannot block: the channel holds `capacity`
    /// jobs and the ledger never holds more attempts that have not finished (a claim beside
    /// a settlement that then fails leaves the ledger holding the batch's finished attempts
    /// too, for a while); cannot fail: `self.unstarted` keeps it open.
    pub(super) fn start(&self, assignment: Assignment) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(assignment);
        }
    }

    /// Renews the leases of this pool's attempts and its registration; obeys a stored stop.
    /// An attempt whose lease was lost is cancelled at once: its job belongs to someone else.
    fn heartbeat(&mut self) {
        let at = now();
        self.renew_leases_except(&[], &[]);
        match self.storage.worker_heartbeat(&self.id, at) {
            Ok(true) => self.check_stop_request(),
            Ok(false) => {}
            Err(StorageError::UnknownWorker { .. }) => {
                // Someone deregistered us (presumed dead): register again.
                let info = WorkerInfo {
                    started_at: at,
                    last_seen: at,
                    ..self.info.clone()
                };
                if let Err(error) = self.storage.register_worker(info) {
                    self.tolerate("registering", error);
                }
            }
            Err(error) => self.tolerate("heartbeating", error),
        }
    }

    /// Renews the leases of this pool's attempts but those of the lease tokens `except` (a
    /// batch being settled, whose rows its settlement holds), and the leases `also` of jobs
    /// claimed and not handed out yet. An attempt whose lease was lost is cancelled at once;
    /// the jobs of `also` whose lease was lost are returned.
    pub(super) fn renew_leases_except(&mut self, except: &[u64], also: &[Lease]) -> Vec<JobId> {
        let mut leases: Vec<_> = self
            .ledger
            .leases()
            .into_iter()
            .filter(|lease| !except.contains(&lease.token))
            .collect();
        leases.extend_from_slice(also);
        if leases.is_empty() {
            return Vec::new();
        }
        let mut lost_also = Vec::new();
        match self.storage.extend_leases(&leases, self.lease, now()) {
            Ok(lost) => {
                for id in lost {
                    if also.iter().any(|lease| lease.job_id == id) {
                        lost_also.push(id);
                    } else {
                        self.lose(&id);
                    }
                }
            }
            Err(error) => self.tolerate("renewing leases", error),
        }
        lost_also
    }

    /// Records running attempts' new output every [`Timings::live_output_every`] while any
    /// attempt is held.
    fn schedule_output(&mut self) {
        if self.ledger.is_empty() {
            self.next_output = None;
        } else if self.next_output.is_none() {
            self.next_output = Instant::now().checked_add(self.timings.live_output_every);
        }
    }

    /// Records the new output of every running attempt whose first output is at least one
    /// interval old, in one call. A lost lease stops its attempt; a failure is reported and
    /// the output stays for the next time (the attempts run on).
    fn record_output(&mut self, now_instant: Instant) {
        self.next_output = None;
        let since = now_instant
            .checked_sub(self.timings.live_output_every)
            .unwrap_or(now_instant);
        let chunks = self.ledger.unrecorded_output(since);
        if chunks.is_empty() {
            return;
        }
        match self.storage.record_output(&chunks) {
            Ok(lost) => {
                self.ledger.output_recorded(&chunks);
                for id in lost {
                    self.lose(&id);
                }
            }
            Err(error) => self.tolerate("recording live output", error),
        }
    }

    /// Cancels this pool's attempt of `job`, whose lease the store reports lost.
    fn lose(&mut self, job: &JobId) {
        let held = self.ledger.len();
        let (lost, ready) = self.ledger.lose(job);
        // A lost attempt that was parked never started: it has ended already.
        self.summary.lost += held - self.ledger.len();
        if lost {
            let job = job.clone();
            self.emit(|| Event::LeaseLost { job });
        }
        for assignment in ready {
            self.start(assignment);
        }
    }

    /// Reports a storage error the pool can work around (the operation is retried later);
    /// a poisoned store ends the pool.
    pub(super) fn tolerate(&mut self, op: &'static str, error: StorageError) {
        self.storage_error(op, &error);
        if error.is_fatal() {
            self.fatal
                .get_or_insert(PoolError::Storage { op, source: error });
        }
    }

    fn recover(&mut self) {
        match recover_abandoned(&*self.storage, &self.info.hostname, self.lease * 3, now()) {
            Ok(jobs) => {
                for job in jobs {
                    self.emit(|| Event::Recovered {
                        job: job.id,
                        state: job.state,
                    });
                }
            }
            Err(error) => self.storage_error("recovering abandoned jobs", &error),
        }
    }

    fn purge(&mut self) {
        let Some(retention) = self.retention else {
            return;
        };
        let Some(cutoff) =
            now().checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
        else {
            return;
        };
        match self.storage.purge_completed(cutoff) {
            Ok(0) => {}
            Ok(count) => self.emit(|| Event::Purged { count }),
            Err(error) => self.storage_error("purging completed jobs", &error),
        }
    }

    /// Ends the pool after a fatal error: kills running attempts and forgets them (their
    /// leases expire and the jobs run again elsewhere).
    fn abandon(&mut self, error: &PoolError) {
        let reason = match error {
            PoolError::ExecutorsGone { .. } => StopReason::ExecutorsGone,
            _ => StopReason::StorageFailure,
        };
        self.begin_stop(true, reason);
        self.ledger.clear();
        self.unsettled.clear();
    }

    /// Closes the pool: stops executor threads and the waker, deregisters, emits `Stopped`.
    pub(super) fn finish(&mut self) {
        // Closing the jobs channel ends the executor threads.
        self.jobs = None;
        self.waker_stop.cancel();
        // Deregistering changes the store, which also ends a wait of the waker in progress.
        if let Err(error) = self.storage.deregister_worker(&self.id) {
            self.storage_error("deregistering", &error);
        }
        self.emit(|| Event::Stopped);
    }
}

/// A moving average that follows a change within a few samples.
fn moving_average(average: Option<Duration>, sample: Duration) -> Duration {
    match average {
        Some(average) => average.mul_f64(0.75).saturating_add(sample.mul_f64(0.25)),
        None => sample,
    }
}

/// Whether a turn's results are better recorded on the settling thread, in a transaction
/// of their own beside the claim's, than with the claim in one: when the `unstarted` jobs
/// (at one attempt per `pace` on `workers` threads) would run out before a turn that took
/// `turn` ends, so that threads would wait for the claim. Otherwise the threads have work
/// meanwhile, and one transaction costs the store (and the machine it shares with the
/// jobs) less than two: a shell drain with jobs claimed ahead. With either time unknown,
/// the threads are taken to be waiting (jobs that take no time, a first turn).
pub(super) fn settles_beside(
    unstarted: usize,
    workers: usize,
    pace: Option<Duration>,
    turn: Option<Duration>,
) -> bool {
    let (Some(pace), Some(turn)) = (pace, turn) else {
        return true;
    };
    let lasts = pace.mul_f64(unstarted as f64 / workers.max(1) as f64);
    lasts < turn
}

/// How many jobs [`Prefetch::Auto`] claims ahead of `workers` threads: as many as they would
/// start within `window` at one attempt per `pace`, at most `most`
/// ([`WorkerPoolBuilder::max_prefetch`]); none before an attempt has finished (`pace`
/// unknown).
pub(super) fn auto_prefetch(
    workers: usize,
    pace: Option<Duration>,
    window: Duration,
    most: usize,
) -> usize {
    let Some(pace) = pace else { return 0 };
    if window.is_zero() {
        return 0;
    }
    if pace.is_zero() {
        return most;
    }
    // Saturating float-to-int conversion: a tiny pace gives `most`.
    let within = (window.as_secs_f64() * workers as f64 / pace.as_secs_f64()) as usize;
    within.min(most)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;
    use crate::executor::{FnExecutor, cancel_pair};

    fn dispatcher() -> (Dispatcher, crossbeam_channel::Sender<Finished>) {
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let builder = WorkerPoolBuilder::new(store, Arc::new(FnExecutor::new(|_| Ok(()))));
        let (jobs, unstarted) = crossbeam_channel::bounded(8);
        let (outcomes_tx, outcomes) = crossbeam_channel::unbounded();
        let (_control_tx, control) = crossbeam_channel::unbounded();
        let (_wake_tx, wake) = crossbeam_channel::bounded(1);
        let (arm, _arm_rx) = crossbeam_channel::bounded(1);
        let (waker_stop, _) = cancel_pair();
        let (events, _, _) = EventSink::new(0);
        let info = WorkerInfo {
            id: "w".into(),
            hostname: "h".into(),
            pid: 1,
            concurrency: 1,
            started_at: now(),
            last_seen: now(),
            stop_requested: false,
            stop_forced: false,
            identity: Default::default(),
            queues: Vec::new(),
        };
        let channels = Channels {
            jobs,
            unstarted,
            outcomes,
            control,
            wake,
            arm,
            waker_stop,
            settler: None,
        };
        std::mem::forget(_control_tx);
        std::mem::forget(_wake_tx);
        std::mem::forget(_arm_rx);
        (
            Dispatcher::new(&builder, "w".into(), info, events, channels),
            outcomes_tx,
        )
    }

    /// An attempt's output is first recorded one interval after its first output, so an
    /// attempt that ends sooner costs the store nothing; then whatever is new each time.
    #[test]
    fn output_is_recorded_from_one_interval_after_the_first_output_on() {
        use crate::storage::StorageExt;
        let (mut dispatcher, _outcomes) = dispatcher();
        let id: JobId = "j".parse().unwrap();
        dispatcher
            .storage
            .enqueue(crate::NewJob::new("x").id("j").unwrap(), now())
            .unwrap();
        assert_eq!(dispatcher.claim(), (1, 1));
        let assignment = dispatcher.unstarted.try_recv().unwrap();
        let output = |d: &Dispatcher| d.storage.attempts(&id).unwrap().pop().unwrap().output;
        assignment.live.write(b"one\n");
        let written = Instant::now();
        let every = dispatcher.timings.live_output_every;
        dispatcher.record_output(written);
        assert_eq!(output(&dispatcher), None, "too soon after the first output");
        dispatcher.record_output(written + every);
        assert_eq!(output(&dispatcher).as_deref(), Some("one\n"));
        assignment.live.write(b"two\n");
        dispatcher.record_output(written + every * 2);
        assert_eq!(output(&dispatcher).as_deref(), Some("one\ntwo\n"));
    }

    /// A closed outcomes channel is noticed once and then never waited on again: a wait
    /// after it runs to its deadline instead of returning at once, forever.
    #[test]
    fn a_closed_outcomes_channel_does_not_make_the_dispatcher_spin() {
        let (mut dispatcher, outcomes) = dispatcher();
        drop(outcomes);
        dispatcher.wait(Instant::now() + Duration::from_secs(3600));
        assert!(
            matches!(
                dispatcher.fatal,
                Some(PoolError::ExecutorsGone { running: 0 })
            ),
            "the pool ends when no executor is left"
        );
        let until = Instant::now() + Duration::from_millis(20);
        dispatcher.wait(until);
        assert!(Instant::now() >= until, "the second wait returned early");
    }

    #[test]
    fn automatic_prefetch_fills_the_window_at_the_pace_up_to_its_most() {
        let ms = Duration::from_millis;
        let window = ms(50);
        let most = 2 * crate::AUTO_PREFETCH_PER_THREAD;
        let auto = |workers, pace| auto_prefetch(workers, pace, window, most);
        assert_eq!(auto(2, None), 0, "no pace known yet");
        assert_eq!(auto(2, Some(ms(10))), 10);
        assert_eq!(auto(1, Some(ms(30))), 1);
        assert_eq!(auto(2, Some(ms(101))), 0, "longer than the window");
        assert_eq!(auto(2, Some(ms(1))), most);
        assert_eq!(auto(2, Some(Duration::ZERO)), most);
        assert_eq!(auto(2, Some(Duration::from_nanos(1))), most);
        assert_eq!(
            auto_prefetch(2, Some(Duration::ZERO), Duration::ZERO, most),
            0,
            "no window"
        );
    }

    /// Results go beside the claim only while the jobs waiting to start would run out before
    /// a turn ends; with either time unknown they go beside, as jobs that take no time want.
    #[test]
    fn results_go_beside_the_claim_only_when_threads_would_wait_for_it() {
        let ms = Duration::from_millis;
        assert!(
            settles_beside(40, 2, None, Some(ms(3))),
            "no pace known yet"
        );
        assert!(
            settles_beside(40, 2, Some(ms(1)), None),
            "no turn taken yet"
        );
        // 40 jobs of 1 ms on 2 threads last 20 ms: a 3 ms turn ends well before.
        assert!(!settles_beside(40, 2, Some(ms(1)), Some(ms(3))));
        assert!(
            !settles_beside(6, 2, Some(ms(1)), Some(ms(3))),
            "they last 3 ms"
        );
        assert!(
            settles_beside(5, 2, Some(ms(1)), Some(ms(3))),
            "they last 2.5 ms"
        );
        assert!(
            settles_beside(0, 2, Some(ms(1)), Some(ms(3))),
            "nothing waits"
        );
        // Jobs that take no time are run before any turn ends.
        assert!(settles_beside(200, 2, Some(Duration::ZERO), Some(ms(1))));
        assert!(
            settles_beside(200, 0, Some(ms(1)), Some(ms(300))),
            "no thread"
        );
    }

    /// A job claimed for a free thread and not yet taken by it is never handed back, however
    /// long ago anything was settled or claimed: only jobs waiting behind running ones go.
    #[test]
    fn a_job_claimed_for_a_free_thread_is_not_handed_back() {
        let (mut dispatcher, _outcomes) = holding_one();
        dispatcher.prefetch = Prefetch::Auto;
        let later = Instant::now() + dispatcher.timings.prefetch_window * 10;
        dispatcher.hand_back_waiting(later);
        assert!(dispatcher.unsettled.is_empty(), "handed back");
        assert_eq!(dispatcher.unstarted.len(), 1, "still there for the thread");
        assert!(
            dispatcher.hand_back_at().is_some_and(|at| at > later),
            "the look stays due: the dispatcher would spin until a thread takes the job"
        );
    }

    /// A turn waits for more results only while every thread has a job waiting for it, fewer
    /// than half of what is held have finished, the first result is younger than the delay,
    /// and nothing else wants the dispatcher.
    #[test]
    fn results_wait_for_company_only_while_every_thread_has_its_next_job() {
        use crate::storage::StorageExt;
        let (mut dispatcher, outcomes) = dispatcher();
        dispatcher.prefetch = Prefetch::Fixed(3);
        let far = Instant::now() + Duration::from_secs(3600);
        (dispatcher.next_recovery, dispatcher.next_purge) = (far, far);
        let batch = (0..4)
            .map(|i| crate::NewJob::new(format!("j{i}")))
            .collect();
        dispatcher.storage.enqueue_batch(batch, now()).unwrap();
        assert_eq!(dispatcher.claim(), (4, 4));
        // The one thread takes its first job and finishes it; three wait for it.
        let first = dispatcher.unstarted.try_recv().unwrap();
        let done = |assignment: Assignment| Finished {
            job: assignment.job,
            outcome: Ok(crate::Outcome::succeeded(Duration::from_millis(1))),
        };
        outcomes.send(done(first)).unwrap();
        let at = Instant::now();
        let delay = dispatcher.timings.settle_delay;
        assert!(dispatcher.defers_turn(at), "one result of four held");
        assert!(!dispatcher.defers_turn(at + delay), "the delay is over");
        dispatcher.first_arrived = None;
        dispatcher.woken = true;
        assert!(
            !dispatcher.defers_turn(at),
            "woken by a change of the store"
        );
        dispatcher.woken = false;
        dispatcher.first_arrived = None;
        assert!(dispatcher.defers_turn(at));
        // The thread takes its next job: two wait, two of four have finished.
        let second = dispatcher.unstarted.try_recv().unwrap();
        outcomes.send(done(second)).unwrap();
        assert!(
            !dispatcher.defers_turn(at),
            "half of what is held has finished"
        );
        dispatcher.timings.settle_delay = Duration::ZERO;
        dispatcher.arrived.pop();
        dispatcher.first_arrived = None;
        assert!(
            !dispatcher.defers_turn(at),
            "a delay of zero records at once"
        );
        dispatcher.timings.settle_delay = delay;
        dispatcher.first_arrived = None;
        assert!(dispatcher.defers_turn(at));
        // The jobs waiting for the thread are gone (it took them, say): none is left.
        let _taken: Vec<Assignment> = dispatcher.unstarted.try_iter().collect();
        dispatcher.first_arrived = None;
        assert!(!dispatcher.defers_turn(at), "no job waits for the thread");
    }

    /// A dispatcher of one thread holding one claimed job ("j"), still in the channel.
    fn holding_one() -> (Dispatcher, crossbeam_channel::Sender<Finished>) {
        use crate::storage::StorageExt;
        let (mut dispatcher, outcomes) = dispatcher();
        dispatcher
            .storage
            .enqueue(crate::NewJob::new("x").id("j").unwrap(), now())
            .unwrap();
        assert_eq!(dispatcher.claim(), (1, 1));
        (dispatcher, outcomes)
    }

    /// [`holding_one`] with its job taken by its thread (it runs), stopping.
    fn stopping_with_one_running(
        forced: bool,
    ) -> (Dispatcher, crossbeam_channel::Sender<Finished>) {
        let (mut dispatcher, outcomes) = holding_one();
        dispatcher.unstarted.try_recv().unwrap();
        dispatcher.begin_stop(forced, StopReason::Requested);
        (dispatcher, outcomes)
    }

    /// Whether the dispatcher's next deadline is still ahead (one in the past makes every
    /// wait return at once: a spin).
    fn no_deadline_past(dispatcher: &Dispatcher) -> bool {
        dispatcher.next_deadline() > Instant::now()
    }

    /// A claim retry that came due while the slots were full (filled beside settlements)
    /// does not stay due: the dispatcher would otherwise return from every wait at once.
    #[test]
    fn a_due_claim_retry_with_full_slots_leaves_no_deadline_in_the_past() {
        let (mut dispatcher, _outcomes) = holding_one();
        dispatcher.claim_retry_at = Some(Instant::now() - Duration::from_secs(1));
        dispatcher.turn();
        assert!(no_deadline_past(&dispatcher));
    }

    /// A graceful stop with a claim retry due leaves no deadline in the past while its
    /// running jobs finish.
    #[test]
    fn a_stop_with_a_due_claim_retry_leaves_no_deadline_in_the_past() {
        let (mut dispatcher, _outcomes) = stopping_with_one_running(false);
        dispatcher.claim_retry_at = Some(Instant::now() - Duration::from_secs(1));
        dispatcher.turn();
        assert!(dispatcher.end().is_none(), "a job still runs");
        assert!(no_deadline_past(&dispatcher));
    }

    /// A forced stop with a look for a stop request left due leaves no deadline in the past
    /// while its cancelled jobs end.
    #[test]
    fn a_forced_stop_with_a_stop_check_due_leaves_no_deadline_in_the_past() {
        let (mut dispatcher, _outcomes) = stopping_with_one_running(true);
        dispatcher.stop_check_due = true;
        dispatcher.last_stop_check = Some(Instant::now() - Duration::from_secs(1));
        dispatcher.turn();
        assert!(dispatcher.end().is_none(), "a job still runs");
        assert!(no_deadline_past(&dispatcher));
    }
}
