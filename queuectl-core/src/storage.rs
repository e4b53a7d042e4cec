//! The `Storage` trait: the job state machine every backend implements.

use std::fmt::Debug;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::error::{Result, StorageError};
use crate::job::{Attempt, Job, JobId, JobState, Lease, NewJob, Timestamp};

/// What happened in an attempt, recorded on the job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptReport {
    /// Exit code, if the command exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    /// Captured output (already capped by the executor; stores keep at most
    /// [`MAX_OUTPUT`](crate::job::MAX_OUTPUT) bytes of its tail).
    pub output: Option<String>,
    /// Why it failed (`None` on success).
    pub error: Option<String>,
}

/// The end of an attempt, as reported to the store by the lease holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The attempt succeeded: the job becomes `completed`.
    Complete {
        /// The lease of the attempt.
        lease: Lease,
        /// What the attempt produced.
        report: AttemptReport,
    },
    /// The attempt failed: the job becomes `failed` until `retry_at`, or `dead` when it has
    /// used `max_retries` attempts.
    Fail {
        /// The lease of the attempt.
        lease: Lease,
        /// What the attempt produced.
        report: AttemptReport,
        /// When the job may run again (ignored when it dies).
        retry_at: Timestamp,
    },
    /// The attempt was abandoned before it finished (forced shutdown): the job goes back to
    /// `pending` and the attempt is not charged.
    Release {
        /// The lease of the attempt.
        lease: Lease,
    },
}

impl Settlement {
    /// The lease being settled.
    pub fn lease(&self) -> &Lease {
        match self {
            Settlement::Complete { lease, .. }
            | Settlement::Fail { lease, .. }
            | Settlement::Release { lease } => lease,
        }
    }
}

/// What [`Storage::submit`] did with one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The new job, or the existing one that holds the same unique key.
    pub job: Job,
    /// Whether `job` is an existing job (nothing was added).
    pub duplicate: bool,
}

/// What [`Storage::settle_and_claim_polling`] found and did.
#[derive(Debug)]
pub struct Polled {
    /// Per settlement, as [`Storage::settle`] returns them.
    pub settled: Vec<Result<Job>>,
    /// The jobs claimed (none when the worker was asked to stop).
    pub claimed: Vec<Job>,
    /// [`Storage::change_version`], read before the settlements were recorded, and the
    /// worker's registration (`None`: not registered); or why they could not be read.
    pub poll: Result<(u64, Option<WorkerInfo>)>,
}

/// What a worker asks for when it claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The worker's id (recorded in the leases).
    pub worker: String,
    /// At most this many jobs.
    pub max: usize,
    /// Each lease runs until `now + lease_for`.
    pub lease_for: Duration,
    /// Only jobs of these queues; empty means every queue.
    pub queues: Vec<String>,
}

impl ClaimRequest {
    /// Up to `max` jobs of any queue for `worker`.
    pub fn new(worker: impl Into<String>, max: usize, lease_for: Duration) -> Self {
        Self {
            worker: worker.into(),
            max,
            lease_for,
            queues: Vec::new(),
        }
    }

    /// Only jobs of `queues` (none: every queue).
    pub fn queues(mut self, queues: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// This request, or one for no job if `poll` found the worker asked to stop.
    pub fn unless_stopping(&self, poll: &Result<(u64, Option<WorkerInfo>)>) -> ClaimRequest {
        let stopping = matches!(poll, Ok((_, Some(w))) if w.stop_requested);
        ClaimRequest {
            max: if stopping { 0 } else { self.max },
            ..self.clone()
        }
    }

    /// Whether the request takes jobs of `queue`.
    pub fn takes(&self, queue: &str) -> bool {
        self.queues.is_empty() || self.queues.iter().any(|q| q == queue)
    }
}

/// A queue: its settings and how many of its jobs are in each state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Its name.
    pub name: String,
    /// Whether workers leave its jobs alone (running ones finish).
    pub paused: bool,
    /// At most this many of its jobs run at once across every worker (0: no limit).
    pub limit: u32,
    /// Its jobs per state.
    pub counts: StateCounts,
}

/// A finished attempt with its job, in [`Activity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedAttempt {
    /// The job's queue.
    pub queue: String,
    /// The job.
    pub job: JobId,
    /// The attempt.
    pub attempt: Attempt,
}

/// What happened since some instant, for statistics ([`crate::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// The attempts that finished since, oldest first.
    pub attempts: Vec<FinishedAttempt>,
    /// The jobs that ended `dead` or `cancelled` since (and are still in that state), each
    /// with its queue.
    pub ended: Vec<(String, JobState)>,
}

/// A change to queues' settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueChange {
    /// No worker claims its jobs until it is resumed.
    Pause,
    /// Workers claim its jobs again.
    Resume,
    /// At most this many of its jobs run at once across every worker (0: no limit).
    Limit(u32),
}

/// Output a running attempt produced, for [`Storage::record_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// The lease of the attempt.
    pub lease: Lease,
    /// Where `text` starts in the attempt's output, in bytes from its beginning: where what
    /// was recorded before ends, or later when the writer dropped output in between.
    pub offset: u64,
    /// The output.
    pub text: String,
}

/// A job and what its running attempt has recorded from some offset on, read together
/// ([`Storage::output_since`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningOutput {
    /// The job, without its output (`output` is `None`).
    pub job: Job,
    /// How many finished attempts its history holds: in [`Storage::attempts`], the running
    /// attempt (if any) comes right after them.
    pub finished: usize,
    /// Where `text` starts in the running attempt's output: the offset asked for, or later when
    /// the store no longer keeps the output in between.
    pub offset: u64,
    /// What the running attempt recorded from `offset` on; empty when the job is not
    /// `processing`.
    pub text: String,
}

/// Which jobs `list` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this queue.
    pub queue: Option<String>,
    /// Skip this many matching jobs.
    pub offset: usize,
    /// At most this many jobs.
    pub limit: Option<usize>,
    /// Newest first (reverse enqueue order) instead of oldest first.
    pub newest_first: bool,
}

impl ListQuery {
    /// Every job.
    pub fn all() -> Self {
        Self::default()
    }

    /// Jobs in `state`.
    pub fn state(state: JobState) -> Self {
        Self {
            state: Some(state),
            ..Self::default()
        }
    }
}

/// How many jobs are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    /// Waiting to run.
    pub pending: usize,
    /// Running.
    pub processing: usize,
    /// Done.
    pub completed: usize,
    /// Waiting out a backoff.
    pub failed: usize,
    /// In the dead letter queue.
    pub dead: usize,
    /// Cancelled.
    #[serde(default)]
    pub cancelled: usize,
}

impl StateCounts {
    /// The count for `state`.
    pub fn get(&self, state: JobState) -> usize {
        match state {
            JobState::Pending => self.pending,
            JobState::Processing => self.processing,
            JobState::Completed => self.completed,
            JobState::Failed => self.failed,
            JobState::Dead => self.dead,
            JobState::Cancelled => self.cancelled,
        }
    }

    /// The count for `state`, to change.
    pub fn get_mut(&mut self, state: JobState) -> &mut usize {
        match state {
            JobState::Pending => &mut self.pending,
            JobState::Processing => &mut self.processing,
            JobState::Completed => &mut self.completed,
            JobState::Failed => &mut self.failed,
            JobState::Dead => &mut self.dead,
            JobState::Cancelled => &mut self.cancelled,
        }
    }

    /// All jobs.
    pub fn total(&self) -> usize {
        self.pending + self.processing + self.completed + self.failed + self.dead + self.cancelled
    }
}

/// A worker process (or embedded pool) registered in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique id, chosen by the worker.
    pub id: String,
    /// Host it runs on.
    pub hostname: String,
    /// Its process id on that host.
    pub pid: u32,
    /// How many jobs it runs at once.
    pub concurrency: usize,
    /// When it registered.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: Timestamp,
    /// Its last heartbeat.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: Timestamp,
    /// Whether it has been asked to stop.
    pub stop_requested: bool,
    /// Whether the stop request asks it to kill its running jobs and hand them back
    /// (`worker stop --force`) instead of letting them finish. Records written before this
    /// field existed read as `false`.
    #[serde(default)]
    pub stop_forced: bool,
    /// What identifies its process beyond the pid, so that a process on the same host can
    /// tell for sure that it has died. Records written before this field existed read as
    /// unknown, and such a worker is judged by its lease alone.
    #[serde(default)]
    pub identity: ProcessIdentity,
    /// The queues it runs jobs of (empty: every queue).
    #[serde(default)]
    pub queues: Vec<String>,
}

/// What tells one process apart from every other, on a host and over time: a pid is only
/// unique within one PID namespace and one boot, and is reused once the process is reaped.
/// Each part is `None` where the system does not say (outside Linux, or without `/proc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): changes at every boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The inode of the process's PID namespace (`/proc/self/ns/pid`): containers sharing a
    /// host name but not a PID namespace see different pids for the same number.
    #[serde(default)]
    pub pid_namespace: Option<u64>,
    /// The process's start time in clock ticks after boot (field 22 of `/proc/PID/stat`): a
    /// reused pid has a later one.
    #[serde(default)]
    pub start_time: Option<u64>,
}

/// Persistent job storage: the queue's single state machine.
///
/// # Contract
/// - **Atomicity.** Every method is one atomic transition: other callers, in this process or
///   any other sharing the store, see all of it or none of it. Batch methods are all or
///   nothing unless they return a result per item.
/// - **Time.** `now` is an argument; an implementation never reads the clock to decide what
///   is due or expired, so behaviour is reproducible (a database backend may use its own
///   clock consistently instead, and says so).
/// - **Claiming** is the only way into `processing`. It picks due `pending`/`failed` jobs by
///   priority (high first), then due time (`run_at`), then enqueue order; charges one attempt;
///   and issues a lease with a fresh token. No job is ever held by two leases.
/// - **Fencing.** `settle` and `extend_leases` compare the lease token with the stored one; a
///   mismatch (or a job no longer `processing`) is [`StorageError::LeaseLost`] and changes
///   nothing.
/// - **Failure.** A failed attempt makes the job `dead` when `attempts >= max_retries`
///   (`max_retries` counts failed attempts in total; every job gets its first attempt),
///   otherwise `failed` with `run_at = retry_at`. A `failed` job is claimed like a `pending`
///   one once it is due.
/// - **Recovery.** A `processing` job whose lease expired goes back to `pending` (the attempt
///   stays charged, so a job that keeps killing its worker ends `dead`).
/// - **Durability.** When a mutating method returns `Ok`, the change survives a crash of the
///   process (durable backends) and is visible to every other caller.
/// - **Live output.** While an attempt runs, its lease holder may append what it prints
///   ([`Storage::record_output`]; fenced like a settlement). A store keeps the last
///   [`MAX_OUTPUT`](crate::job::MAX_OUTPUT) bytes of it, shows it as the running attempt's
///   output in [`Storage::attempts`] (never in `get` or `list`), and drops it when the attempt
///   ends: a settled attempt keeps the output its settlement reported, and the next attempt
///   starts with none.
/// - **Refusals** (duplicate id, unknown job, wrong state, lost lease, invalid setting) are
///   typed errors and change nothing.
pub trait Storage: Send + Sync + Debug {
    /// Adds jobs, all or nothing, and says per job what was done. Unset fields take the stored
    /// [`Config`]'s defaults; a missing id is generated. A duplicate id (in the store or within
    /// the batch) is [`StorageError::AlreadyExists`].
    ///
    /// A job with a `unique_key` that a `pending`, `processing` or `failed` job holds (or an
    /// earlier job of the batch) is not added: its entry is that job, marked `duplicate`.
    ///
    /// Every id in `after` must name a job in the store or earlier in the batch
    /// ([`StorageError::DependencyNotFound`]); one that is `dead` or `cancelled` is
    /// [`StorageError::DependencyFailed`]. The new job is `blocked` until all of them have
    /// completed.
    fn submit(&self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Enqueued>>;

    /// Claims up to `request.max` due jobs for `request.worker`, each leased until
    /// `now + request.lease_for`, from the queues the request takes that are not paused, and no
    /// more of a queue than its limit leaves room for (counting its `processing` jobs of every
    /// worker). Jobs `blocked` by a dependency are not claimed. The returned jobs are
    /// `processing`, with `attempts` already incremented and `lease` set.
    fn claim_jobs(&self, request: &ClaimRequest, now: Timestamp) -> Result<Vec<Job>>;

    /// Extends each still-valid lease to `now + lease_for`. Returns the ids of the jobs whose
    /// lease was lost (those must be abandoned by the caller).
    fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<Vec<JobId>>;

    /// Ends attempts. The outer error is a failure of the store (nothing was applied); the
    /// inner results say, per settlement, the job's new record or why it was refused.
    fn settle(&self, settlements: Vec<Settlement>, now: Timestamp) -> Result<Vec<Result<Job>>>;

    /// Settles attempts, then claims as `request` says: a worker refilling the slots it just
    /// freed makes one round trip (one fsync) instead of two. The results are those of
    /// [`Storage::settle`] and [`Storage::claim_jobs`].
    ///
    /// The built-in stores do both in one atomic step. This default makes separate calls and
    /// keeps the outer error's meaning (nothing was applied): it claims first, so a failing
    /// claim is returned before any settlement is recorded; should the settlements then fail,
    /// the jobs just claimed are released (uncharged) before the settlement error is returned.
    /// Jobs that cannot be released either keep their leases until they expire.
    fn settle_and_claim(
        &self,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<(Vec<Result<Job>>, Vec<Job>)> {
        let claimed = if request.max == 0 {
            Vec::new()
        } else {
            self.claim_jobs(request, now)?
        };
        match self.settle(settlements, now) {
            Ok(settled) => Ok((settled, claimed)),
            Err(error) => {
                let releases = claimed
                    .iter()
                    .filter_map(|job| job.lease.clone())
                    .map(|lease| Settlement::Release { lease })
                    .collect::<Vec<_>>();
                let count = releases.len();
                if count == 0 {
                    return Err(error);
                }
                match self.settle(releases, now) {
                    Ok(_) => Err(error),
                    // Both failed: say so, with the settlement error as the cause.
                    Err(release) => Err(StorageError::Backend {
                        op: format!(
                            "recording job results (the {count} job(s) claimed just before \
                             could not be handed back either and stay leased until their \
                             leases expire: {release})"
                        ),
                        source: Box::new(error),
                    }),
                }
            }
        }
    }

    /// Appends output that running attempts produced to what they recorded so far, all in one
    /// step. Each chunk's lease must be its job's current one: the ids of the jobs whose lease
    /// was lost are returned, and nothing is recorded for them. A chunk's part before the end
    /// of what its attempt recorded is skipped (it was recorded already); a chunk that starts
    /// after that end (the writer dropped output) replaces what was recorded. Only the last
    /// [`MAX_OUTPUT`](crate::job::MAX_OUTPUT) bytes are kept.
    fn record_output(&self, chunks: &[OutputChunk]) -> Result<Vec<JobId>>;

    /// The job, and what its running attempt recorded from byte `offset` of its output on,
    /// in one consistent read: a follower asks again from where the text it got ends. An
    /// unknown job is [`StorageError::NotFound`].
    fn output_since(&self, id: &JobId, offset: u64) -> Result<RunningOutput>;

    /// Returns every `processing` job whose lease expired at or before `now` to `pending`
    /// (or `dead` when its attempts are used up). Returns the recovered jobs.
    fn recover_expired(&self, now: Timestamp) -> Result<Vec<Job>>;

    /// Recovers, as if their leases had expired, all jobs leased by `worker` (known to be dead).
    fn recover_worker(&self, worker: &str, now: Timestamp) -> Result<Vec<Job>>;

    /// The job with this id, with the output of its last finished attempt (`None` while an
    /// attempt runs).
    fn get(&self, id: &JobId) -> Result<Job>;

    /// The job's attempts: the finished ones oldest first, then the running one (if it is
    /// `processing`) with the output it recorded so far ([`Storage::record_output`]; `None`
    /// before any). An unknown job is [`StorageError::NotFound`].
    fn attempts(&self, id: &JobId) -> Result<Vec<Attempt>>;

    /// Jobs matching `query`, in enqueue order (or its reverse), without their output (`output` is `None`:
    /// [`Storage::get`] and [`Storage::attempts`] have it), so listing stays cheap.
    fn list(&self, query: &ListQuery) -> Result<Vec<Job>>;

    /// How many jobs are in each state.
    fn counts(&self) -> Result<StateCounts>;

    /// Every queue that has jobs or settings, by name.
    fn queues(&self) -> Result<Vec<QueueInfo>>;

    /// The attempts that finished at or after `since` (oldest first, without their output) and
    /// the jobs that ended dead or cancelled then, as long as the store keeps them.
    fn activity(&self, since: Timestamp) -> Result<Activity>;

    /// Changes the settings of the queues `names` (`None`: every queue that has jobs or
    /// settings). A named queue need not have jobs yet: its settings wait for them. Returns the
    /// queues changed.
    fn change_queues(
        &self,
        names: Option<&[String]>,
        change: QueueChange,
    ) -> Result<Vec<QueueInfo>>;

    /// The earliest `run_at` later than `after` of a `pending` or `failed` job that is not
    /// blocked, if any: when work next becomes due. (Jobs already due that no claim took, as
    /// those of a paused or full queue, are not waited for by time: the change that frees them
    /// is a change of the store.)
    fn next_due(&self, after: Timestamp) -> Result<Option<Timestamp>>;

    /// Moves dead jobs back to `pending` with `attempts` reset to 0 (a full new set of
    /// retries). `ids: None` retries every dead job that can run again: of dead jobs sharing a
    /// unique key only the newest, and none whose key a waiting or running job holds. A named job that is not dead is
    /// [`StorageError::InvalidState`]; an unknown one [`StorageError::NotFound`]; either refuses
    /// the whole call.
    fn retry_dead(&self, ids: Option<&[JobId]>, now: Timestamp) -> Result<Vec<Job>>;

    /// Cancels jobs, all or nothing: a `pending` or `failed` job becomes `cancelled` at once; a
    /// `processing` one too, and its lease ends, so its worker's result is refused and the
    /// worker stops the attempt when it next looks (a change to the store makes it look). A
    /// finished job is [`StorageError::InvalidState`], an unknown one
    /// [`StorageError::NotFound`]; either refuses the whole call.
    fn cancel(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>>;

    /// Deletes jobs that are not running, with their history, all or nothing. A `processing`
    /// job is [`StorageError::InvalidState`] (cancel it first), an unknown one
    /// [`StorageError::NotFound`]. Jobs blocked waiting for a removed job are cancelled at
    /// `now`. Returns the ids deleted.
    fn remove(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<JobId>>;

    /// Runs finished jobs (`dead`, `cancelled` or `completed`) again: `pending` with a fresh set
    /// of attempts, all or nothing. Any other state is [`StorageError::InvalidState`].
    fn retry(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>>;

    /// Deletes every dead job (jobs blocked waiting for one are cancelled at `now`). Returns
    /// how many.
    fn clear_dead(&self, now: Timestamp) -> Result<usize>;

    /// Deletes completed jobs that finished before `finished_before` (a job blocked waiting for
    /// one counts it as completed). Returns how many.
    fn purge_completed(&self, finished_before: Timestamp) -> Result<usize>;

    /// The stored settings (defaults when none were set).
    fn config(&self) -> Result<Config>;

    /// Changes the settings atomically: `update` edits a copy of the current settings; if it
    /// returns `Err`, nothing is stored. A store may call `update` more than once (when it
    /// retries a transaction another process kept busy), so it must only edit its argument.
    fn update_config(
        &self,
        update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<Config>;

    /// Registers (or re-registers) a worker.
    fn register_worker(&self, worker: WorkerInfo) -> Result<()>;

    /// Records a heartbeat of `worker` at `now`. Returns whether it has been asked to stop.
    /// An unknown worker is [`StorageError::UnknownWorker`].
    fn worker_heartbeat(&self, worker: &str, now: Timestamp) -> Result<bool>;

    /// Removes a worker from the registry (unknown ids are ignored).
    fn deregister_worker(&self, worker: &str) -> Result<()>;

    /// Every registered worker, by id.
    fn workers(&self) -> Result<Vec<WorkerInfo>>;

    /// Asks every currently registered worker to stop. Returns how many were asked.
    fn request_stop(&self) -> Result<usize>;

    /// A number that changes whenever the store changes (in any process).
    fn change_version(&self) -> Result<u64>;

    /// [`Storage::change_version`] and `worker`'s registration (`None`: not registered),
    /// in one look: what a busy pool reads before it refills the slots of finished jobs (a
    /// stop request is part of the registration). A store whose every read is a round trip
    /// to a server reads both at once.
    fn poll_worker(&self, worker: &str) -> Result<(u64, Option<WorkerInfo>)> {
        let version = self.change_version()?;
        let registration = self.workers()?.into_iter().find(|w| w.id == worker);
        Ok((version, registration))
    }

    /// What a busy pool does when jobs finish: [`Storage::poll_worker`] for
    /// `request.worker`, then [`Storage::settle_and_claim`], claiming nothing when the
    /// registration asks the worker to stop. The version is read before the settlements are
    /// recorded (so any change after it, theirs included, still differs from it). A look
    /// whose answer cannot be had (an unreadable registration; in this default, any failed
    /// read) does not stop the settlement: [`Polled::poll`] says why, and the claim is made
    /// as asked. A store whose every call is a round trip to a server reads the registration
    /// in the first round trip of the settlement, in its transaction: there a failure of the
    /// database itself fails the whole call, as it would fail the settlement anyway.
    fn settle_and_claim_polling(
        &self,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Polled> {
        let poll = self.poll_worker(&request.worker);
        let (settled, claimed) =
            self.settle_and_claim(settlements, &request.unless_stopping(&poll), now)?;
        Ok(Polled {
            settled,
            claimed,
            poll,
        })
    }

    /// Blocks until [`Storage::change_version`] differs from `seen`, or `timeout` passes.
    /// Returns the current version. Must not busy-wait.
    fn wait_for_change(&self, seen: u64, timeout: Duration) -> Result<u64>;

    /// What a worker pool out of work waits with: blocks until the store may have changed in
    /// a way that gives the pool something to do since version `seen`, or `timeout` passes.
    /// Returns a version other than `seen` when it may have (the current one), `seen`
    /// otherwise.
    ///
    /// Any change will do: the default is [`Storage::wait_for_change`]. A store may leave
    /// out changes that give no worker anything to do (jobs claimed or finished in queues
    /// without a limit, leases extended, output recorded), so that idle workers do not wake
    /// each time a job finishes elsewhere; it must not leave out a job that waits to run
    /// (new, retried, due later, no longer blocked), room made in a limited queue others
    /// wait for, or a change of a queue, a worker's registration or the settings.
    fn wait_for_work(&self, seen: u64, timeout: Duration) -> Result<u64> {
        self.wait_for_change(seen, timeout)
    }

    /// Whether a settlement and a claim can run at once without one waiting for the other (a
    /// database server reached through a pool of connections; default `false`). A worker pool
    /// then records a large batch of results on a thread of its own while it claims for the
    /// slots they free, each in a transaction of its own, instead of both in one
    /// [`Storage::settle_and_claim_polling`]: the server works on both at once. A store that
    /// writes one transaction at a time (a file) would only make them wait for each other.
    fn writes_concurrently(&self) -> bool {
        false
    }

    /// Whether this handle refuses every change (opened read-only, or on files it cannot
    /// write): callers skip housekeeping writes such as recovery.
    fn is_read_only(&self) -> bool {
        false
    }
}

/// Conveniences over [`Storage`], implemented for every store.
pub trait StorageExt: Storage {
    /// Adds jobs as [`Storage::submit`] does; returns each new job (or the existing one holding
    /// its unique key).
    fn enqueue_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Job>> {
        Ok(self
            .submit(jobs, now)?
            .into_iter()
            .map(|entry| entry.job)
            .collect())
    }

    /// Adds one job (or returns the existing one holding its unique key).
    fn enqueue(&self, job: NewJob, now: Timestamp) -> Result<Job> {
        let mut jobs = self.enqueue_batch(vec![job], now)?;
        Ok(jobs.pop().expect("submit returns one entry per input"))
    }

    /// Claims up to `max` due jobs of any queue for `worker` (see [`Storage::claim_jobs`]).
    fn claim(
        &self,
        worker: &str,
        max: usize,
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<Vec<Job>> {
        self.claim_jobs(&ClaimRequest::new(worker, max, lease_for), now)
    }

    /// Marks the leased job `completed`.
    fn complete(&self, lease: &Lease, report: AttemptReport, now: Timestamp) -> Result<Job> {
        self.settle_one(
            Settlement::Complete {
                lease: lease.clone(),
                report,
            },
            now,
        )
    }

    /// Marks the leased job `failed` until `retry_at`, or `dead`.
    fn fail(
        &self,
        lease: &Lease,
        report: AttemptReport,
        retry_at: Timestamp,
        now: Timestamp,
    ) -> Result<Job> {
        self.settle_one(
            Settlement::Fail {
                lease: lease.clone(),
                report,
                retry_at,
            },
            now,
        )
    }

    /// Hands the leased job back without charging the attempt.
    fn release(&self, lease: &Lease, now: Timestamp) -> Result<Job> {
        self.settle_one(
            Settlement::Release {
                lease: lease.clone(),
            },
            now,
        )
    }

    /// Settles one attempt.
    fn settle_one(&self, settlement: Settlement, now: Timestamp) -> Result<Job> {
        self.settle(vec![settlement], now)?
            .pop()
            .expect("settle returns one result per settlement")
    }

    /// Extends one lease; [`StorageError::LeaseLost`] if it was lost.
    fn heartbeat(&self, lease: &Lease, lease_for: Duration, now: Timestamp) -> Result<()> {
        let lost = self.extend_leases(std::slice::from_ref(lease), lease_for, now)?;
        if lost.is_empty() {
            Ok(())
        } else {
            Err(StorageError::LeaseLost {
                id: lease.job_id.clone(),
            })
        }
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}
