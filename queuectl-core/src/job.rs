//! The job record, its states and the description of a job to enqueue.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A point in time, always UTC. Serialised as RFC 3339 (`2026-01-02T03:04:05.123Z`).
pub type Timestamp = OffsetDateTime;

/// The current time in UTC. Storage never calls this itself: callers pass `now` in.
pub fn now() -> Timestamp {
    OffsetDateTime::now_utc()
}

/// `at + duration`, or the latest representable instant when that would overflow: a lease
/// or a backoff that long never ends, which is what asking for it means.
pub fn later(at: Timestamp, duration: Duration) -> Timestamp {
    time::Duration::try_from(duration)
        .ok()
        .and_then(|d| at.checked_add(d))
        .unwrap_or_else(|| time::PrimitiveDateTime::MAX.assume_utc())
}

/// Longest command accepted, in bytes: Linux passes at most 128 KiB (with its NUL) in one
/// argument, and a job's command is one argument of `sh -c`, after what the executor puts in
/// front of it (under 1 KiB).
pub const MAX_COMMAND_LEN: usize = 130_000;

/// The shortest time limit a job may have (zero means none): one millisecond.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Longest job id (and queue name) accepted.
pub const MAX_ID_LEN: usize = 128;

/// The queue of a job enqueued without one.
pub const DEFAULT_QUEUE: &str = "default";

/// Longest unique key accepted, in bytes.
pub const MAX_UNIQUE_KEY_LEN: usize = 512;

/// Most dependencies one job may have.
pub const MAX_DEPENDENCIES: usize = 1_000;

/// Whether `name` is 1 to [`MAX_ID_LEN`] characters from `[A-Za-z0-9._-]`, not starting with
/// `.` or `-`: the rule for job ids and queue names.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ID_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.')
        && !name.starts_with('-')
}

/// Checks a queue name: the same characters as job ids.
pub fn check_queue_name(name: &str) -> Result<(), InvalidJob> {
    if is_safe_name(name) {
        Ok(())
    } else {
        Err(InvalidJob::Queue {
            name: name.to_owned(),
        })
    }
}

/// A job's identifier.
///
/// Ids are 1 to [`MAX_ID_LEN`] characters from `[A-Za-z0-9._-]` and do not start with `.` or
/// `-`, so an id can never name a path outside a store or be mistaken for a command-line flag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidJob> {
        let id = id.into();
        if !is_safe_name(&id) {
            return Err(InvalidJob::Id { id });
        }
        Ok(Self(id))
    }

    /// A fresh id that is unique across processes and machines with overwhelming probability:
    /// the time in microseconds followed by 48 random bits (ids sort roughly by creation time).
    pub fn generate() -> Self {
        let micros = (now().unix_timestamp_nanos() / 1_000) as u64;
        let random = random_u64() & 0xffff_ffff_ffff;
        Self(format!("{micros:014x}-{random:012x}"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for JobId {
    type Err = InvalidJob;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for JobId {
    type Error = InvalidJob;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

/// 64 bits from a per-process random seed and a counter: unique tokens and ids without a
/// global random number generator or an extra dependency.
pub(crate) fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let mut hasher = SEED.get_or_init(RandomState::new).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_i128(now().unix_timestamp_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to run (possibly not before its `run_at`).
    Pending,
    /// Claimed by a worker, which holds its lease.
    Processing,
    /// Finished successfully.
    Completed,
    /// The last attempt failed; the job waits out its backoff until `run_at`, then runs again.
    Failed,
    /// Failed `max_retries` times: in the dead letter queue.
    Dead,
    /// Cancelled by a user before it finished: never runs again unless retried.
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Processing,
        JobState::Completed,
        JobState::Failed,
        JobState::Dead,
        JobState::Cancelled,
    ];

    /// The lowercase name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Processing => "processing",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether a job in this state is finished: it will not run again unless retried.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Dead | JobState::Cancelled
        )
    }

    /// Whether a job in this state may be claimed once it is due.
    pub fn is_runnable(self) -> bool {
        matches!(self, JobState::Pending | JobState::Failed)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = InvalidJob;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| InvalidJob::State {
                state: s.to_owned(),
            })
    }
}

/// The proof that a worker owns a running job.
///
/// A claim issues a lease with a fresh random `token`. Completing, failing, releasing or
/// extending a job requires the current token: a worker whose lease expired and whose job was
/// handed to another worker gets [`crate::StorageError::LeaseLost`] instead of overwriting the
/// new owner's work (fencing).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The job the lease is on.
    pub job_id: JobId,
    /// The worker holding it.
    pub worker: String,
    /// Fencing token, unique per claim.
    pub token: u64,
    /// When the lease runs out unless extended by a heartbeat.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: Timestamp,
}

/// A job as stored.
///
/// `id`, `command`, `state`, `attempts`, `max_retries`, `created_at` and `updated_at` are the
/// public contract of the JSON form; the other fields are additions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Unique id.
    pub id: JobId,
    /// The shell command (or, for in-process executors, the task name and argument).
    pub command: String,
    /// Current state.
    pub state: JobState,
    /// Attempts started so far (a claim counts one; a release gives it back).
    pub attempts: u32,
    /// The job goes to the dead letter queue when an attempt fails and `attempts` has reached
    /// this number: `max_retries` counts total failed attempts, and a job always gets its first.
    pub max_retries: u32,
    /// When it was enqueued.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    /// When its record last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
    /// Higher runs first among due jobs.
    pub priority: i32,
    /// Not run before this instant (for a `failed` job: when its backoff ends).
    #[serde(with = "time::serde::rfc3339")]
    pub run_at: Timestamp,
    /// Longest an attempt may run, in seconds (`null`: no limit).
    #[serde(with = "opt_secs", default)]
    pub timeout: Option<Duration>,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The exit code of the last attempt, if it exited.
    pub exit_code: Option<i32>,
    /// The captured output (stdout and stderr interleaved as written, tail kept) of the last
    /// attempt.
    pub output: Option<String>,
    /// When the last attempt started.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<Timestamp>,
    /// When the last attempt finished.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<Timestamp>,
    /// The lease, while `processing`.
    pub lease: Option<Lease>,
    /// Enqueue order within the store (ties in priority and due time run in this order). An
    /// order, not a count: on PostgreSQL an enqueue that was refused, or rolled back, still
    /// takes its numbers from the sequence, so the seqs of the jobs stored may have gaps
    /// where the embedded store's have none.
    pub seq: u64,
    /// Attempts started over the job's whole life: unlike `attempts`, `retry` does not reset
    /// it, so each attempt in the history has its own number.
    #[serde(default)]
    pub runs: u32,
    /// The queue it belongs to.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// While a job with this key is `pending`, `processing` or `failed`, enqueueing another
    /// with the same key adds nothing.
    #[serde(default)]
    pub unique_key: Option<String>,
    /// The jobs that must complete before this one runs.
    #[serde(default)]
    pub after: Vec<JobId>,
    /// Whether it still waits for one of `after` to complete (it is not claimed meanwhile).
    #[serde(default)]
    pub blocked: bool,
}

fn default_queue() -> String {
    DEFAULT_QUEUE.to_owned()
}

impl Job {
    /// Whether the job may be claimed at `now` (its queue's pause and limit aside).
    pub fn is_due(&self, now: Timestamp) -> bool {
        self.waits_to_run() && self.run_at <= now
    }

    /// Whether the job waits for its due time to run: runnable and not waiting for a
    /// dependency.
    pub fn waits_to_run(&self) -> bool {
        self.state.is_runnable() && !self.blocked
    }

    /// Whether the job holds its unique key: while it may still run.
    pub fn holds_unique_key(&self) -> bool {
        self.unique_key.is_some() && !self.state.is_finished()
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// Still running: the job is `processing` under this attempt's lease.
    Running,
    /// It succeeded.
    Succeeded,
    /// It failed (the job waits out its backoff, or is dead).
    Failed,
    /// Its worker vanished (the lease expired, or the worker was found dead): it counts as a
    /// used attempt.
    Abandoned,
    /// A forced shutdown handed the job back before the attempt finished: it is not charged.
    Released,
    /// The job was cancelled while the attempt ran; its processes were stopped.
    Cancelled,
}

impl AttemptOutcome {
    /// Every outcome.
    pub const ALL: [AttemptOutcome; 6] = [
        AttemptOutcome::Running,
        AttemptOutcome::Succeeded,
        AttemptOutcome::Failed,
        AttemptOutcome::Abandoned,
        AttemptOutcome::Released,
        AttemptOutcome::Cancelled,
    ];

    /// The lowercase name used in JSON and in the stores.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Running => "running",
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Abandoned => "abandoned",
            AttemptOutcome::Released => "released",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for AttemptOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AttemptOutcome::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == s)
            .ok_or_else(|| format!("unknown attempt outcome {s:?}"))
    }
}

/// One attempt at running a job, as the store's history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Which attempt of the job this was (1 for the first), counted over its whole life, across
    /// retries. A released attempt is not charged, so the next one has the same number.
    pub number: u32,
    /// The worker that ran it.
    pub worker: String,
    /// When it was claimed.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: Timestamp,
    /// When it ended (`None` while running).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<Timestamp>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, when one did.
    pub signal: Option<i32>,
    /// Why it failed or was abandoned.
    pub error: Option<String>,
    /// The tail of its output (at most [`MAX_OUTPUT`] bytes).
    pub output: Option<String>,
    /// When the job was due as this attempt was claimed: the wait for a worker is
    /// `started_at - due_at` (`None` in records from before it was kept).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub due_at: Option<Timestamp>,
}

/// The most output kept per attempt, whatever the `output-limit` setting says: 16 MiB.
pub const MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// `text` cut to its last `limit` bytes, at a character boundary.
pub(crate) fn tail(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut start = text.len() - limit;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text.drain(..start);
    }
    text
}

/// Serde for `Option<Duration>` as fractional seconds.
mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let secs = Option::<f64>::deserialize(d)?;
        secs.map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|e| serde::de::Error::custom(format!("invalid timeout {s}: {e}")))
        })
        .transpose()
    }
}

/// A job to enqueue. Unset fields take the store's configured defaults.
///
/// Its serde form (used to hand jobs to a worker, [`crate::relay`]) keeps every field exactly:
/// `run_at` in RFC 3339, `timeout` in seconds and nanoseconds. A field it does not know is
/// refused, not dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// Id; `None` generates one.
    pub id: Option<JobId>,
    /// Command to run; must not be empty.
    pub command: String,
    /// Failed attempts before the job is dead; `None` uses the `max-retries` setting.
    pub max_retries: Option<u32>,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this instant; `None` means now.
    #[serde(with = "time::serde::rfc3339::option")]
    pub run_at: Option<Timestamp>,
    /// Per-attempt time limit; `None` uses the `job-timeout` setting, zero means no limit.
    pub timeout: Option<Duration>,
    /// The queue; `None` is [`DEFAULT_QUEUE`].
    pub queue: Option<String>,
    /// See [`Job::unique_key`].
    pub unique_key: Option<String>,
    /// Jobs (already enqueued, or earlier in the same batch) that must complete first.
    pub after: Vec<JobId>,
}

impl NewJob {
    /// A job running `command`, with defaults for everything else.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            id: None,
            command: command.into(),
            max_retries: None,
            priority: 0,
            run_at: None,
            timeout: None,
            queue: None,
            unique_key: None,
            after: Vec::new(),
        }
    }

    /// Sets the id (validated).
    pub fn id(mut self, id: impl Into<String>) -> Result<Self, InvalidJob> {
        self.id = Some(JobId::new(id)?);
        Ok(self)
    }

    /// Sets the number of failed attempts after which the job is dead.
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = Some(max_retries);
        self
    }

    /// Sets the priority (higher first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Runs the job no earlier than `at`.
    pub fn run_at(mut self, at: Timestamp) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Limits each attempt to `timeout` (zero: no limit, whatever the setting says).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Puts the job in queue `name`.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queue = Some(name.into());
        self
    }

    /// Makes the job unique by `key` (see [`Job::unique_key`]).
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Runs the job only once every job of `ids` has completed.
    pub fn after(mut self, ids: impl IntoIterator<Item = JobId>) -> Self {
        self.after.extend(ids);
        self
    }

    /// The queue the job goes to.
    pub fn queue_name(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }

    /// Checks what can be checked without the store.
    pub fn validate(&self) -> Result<(), InvalidJob> {
        check_queue_name(self.queue_name())?;
        if let Some(key) = &self.unique_key
            && (key.is_empty() || key.len() > MAX_UNIQUE_KEY_LEN || key.contains('\0'))
        {
            return Err(InvalidJob::UniqueKey);
        }
        if self.after.len() > MAX_DEPENDENCIES {
            return Err(InvalidJob::TooManyDependencies {
                count: self.after.len(),
            });
        }
        if let Some(id) = self.id.as_ref().filter(|id| self.after.contains(id)) {
            return Err(InvalidJob::OwnDependency { id: id.clone() });
        }
        if self.command.trim().is_empty() {
            return Err(InvalidJob::EmptyCommand);
        }
        if self.command.contains('\0') {
            return Err(InvalidJob::NulInCommand);
        }
        if self
            .timeout
            .is_some_and(|t| !t.is_zero() && t < MIN_TIMEOUT)
        {
            return Err(InvalidJob::TimeoutTooShort);
        }
        if self.command.len() > MAX_COMMAND_LEN {
            return Err(InvalidJob::CommandTooLong {
                len: self.command.len(),
            });
        }
        Ok(())
    }
}

/// A job description that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidJob {
    /// The id has characters outside `[A-Za-z0-9._-]`, is empty, too long, or starts with `.`/`-`.
    #[error(
        "invalid job id {id:?}: use 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 . _ - (not starting with . or -)"
    )]
    Id {
        /// The rejected id.
        id: String,
    },
    /// The command is empty or blank.
    #[error("the job's command is empty")]
    EmptyCommand,
    /// The command contains a NUL byte, which no shell can receive.
    #[error("the job's command contains a NUL byte")]
    NulInCommand,
    /// A time limit above zero but under [`MIN_TIMEOUT`]: it could only be a mistake.
    #[error("the job's timeout is too short to be a limit (use at least 1 ms, or 0 for none)")]
    TimeoutTooShort,
    /// The command is longer than the system lets one argument be, so no shell could run it.
    #[error(
        "the job's command is {len} bytes long; a command may have at most {MAX_COMMAND_LEN} (put a longer script in a file and run that)"
    )]
    CommandTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The queue name has characters outside `[A-Za-z0-9._-]`, is empty, too long, or starts
    /// with `.`/`-`.
    #[error(
        "invalid queue name {name:?}: use 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 . _ - (not starting with . or -)"
    )]
    Queue {
        /// The rejected name.
        name: String,
    },
    /// The unique key is empty, too long, or holds a NUL byte.
    #[error("invalid unique key: use 1 to {MAX_UNIQUE_KEY_LEN} bytes without NUL")]
    UniqueKey,
    /// More dependencies than [`MAX_DEPENDENCIES`].
    #[error("the job names {count} dependencies; at most {MAX_DEPENDENCIES} are allowed")]
    TooManyDependencies {
        /// How many it named.
        count: usize,
    },
    /// The job names itself among its dependencies: it could never run.
    #[error("job {id} cannot run after itself")]
    OwnDependency {
        /// Its id.
        id: JobId,
    },
    /// Not one of the state names.
    #[error(
        "unknown job state {state:?}: expected pending, processing, completed, failed, dead or cancelled"
    )]
    State {
        /// The rejected name.
        state: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_restricted_to_a_safe_set() {
        for good in ["a", "job1", "A.b_c-9", &"x".repeat(MAX_ID_LEN)] {
            assert!(JobId::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "-rf",
            "a b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(
                matches!(JobId::new(bad), Err(InvalidJob::Id { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| JobId::generate()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            JobId::new(id.as_str()).unwrap();
        }
    }

    #[test]
    fn contract_fields_serialise_with_their_names_and_utc_times() {
        let at = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        let job = Job {
            id: JobId::new("job1").unwrap(),
            command: "echo hi".into(),
            state: JobState::Pending,
            attempts: 0,
            max_retries: 3,
            created_at: at,
            updated_at: at,
            priority: 0,
            run_at: at,
            timeout: Some(Duration::from_millis(1500)),
            last_error: None,
            exit_code: None,
            output: None,
            started_at: None,
            finished_at: None,
            lease: None,
            seq: 1,
            runs: 0,
            queue: DEFAULT_QUEUE.into(),
            unique_key: None,
            after: Vec::new(),
            blocked: false,
        };
        let value = serde_json::to_value(&job).unwrap();
        assert_eq!(value["id"], "job1");
        assert_eq!(value["command"], "echo hi");
        assert_eq!(value["state"], "pending");
        assert_eq!(value["attempts"], 0);
        assert_eq!(value["max_retries"], 3);
        assert_eq!(value["created_at"], "2026-01-02T03:04:05Z");
        assert_eq!(value["updated_at"], "2026-01-02T03:04:05Z");
        assert_eq!(value["timeout"], 1.5);
        let back: Job = serde_json::from_value(value).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn states_parse_from_their_names_only() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
        }
        assert!("running".parse::<JobState>().is_err());
    }

    #[test]
    fn blank_commands_are_refused() {
        assert_eq!(NewJob::new("  ").validate(), Err(InvalidJob::EmptyCommand));
        assert_eq!(
            NewJob::new("a\0b").validate(),
            Err(InvalidJob::NulInCommand)
        );
        assert!(NewJob::new("true").validate().is_ok());
        let tiny = NewJob::new("true").timeout(Duration::from_nanos(500));
        assert_eq!(tiny.validate(), Err(InvalidJob::TimeoutTooShort));
        assert!(
            NewJob::new("true")
                .timeout(Duration::ZERO)
                .validate()
                .is_ok()
        );
        assert!(NewJob::new("true").timeout(MIN_TIMEOUT).validate().is_ok());
    }

    #[test]
    fn queues_keys_and_dependencies_are_checked() {
        assert!(NewJob::new("true").queue("mail.v2_x-1").validate().is_ok());
        for bad in ["", "a b", "-x", "../q", "é"] {
            assert_eq!(
                NewJob::new("true").queue(bad).validate(),
                Err(InvalidJob::Queue { name: bad.into() })
            );
        }
        assert_eq!(
            NewJob::new("true").unique_key("").validate(),
            Err(InvalidJob::UniqueKey)
        );
        let long = "k".repeat(MAX_UNIQUE_KEY_LEN + 1);
        assert_eq!(
            NewJob::new("true").unique_key(long).validate(),
            Err(InvalidJob::UniqueKey)
        );
        let me = JobId::new("me").unwrap();
        let own = NewJob::new("true").id("me").unwrap().after([me.clone()]);
        assert_eq!(own.validate(), Err(InvalidJob::OwnDependency { id: me }));
        let many = (0..=MAX_DEPENDENCIES).map(|i| JobId::new(format!("j{i}")).unwrap());
        assert!(matches!(
            NewJob::new("true").after(many).validate(),
            Err(InvalidJob::TooManyDependencies { .. })
        ));
    }
}
