//! The attempt ledger: every attempt a pool holds a lease for, whether it runs, waits for an
//! executor, is parked, or was lost.
//!
//! The rule it keeps: **a job never runs twice at once in one pool.** When the store hands
//! out a job whose earlier attempt still runs here (that attempt's lease was lost: the store
//! presumed this pool dead), the earlier attempt is cancelled and its result will be
//! discarded, and the new attempt is *parked* until every lost attempt of the job has ended.

use std::collections::HashMap;
use std::time::Instant;

use crate::executor::{Canceller, LiveOutput, cancel_pair};
use crate::job::{Job, JobId, Lease};
use crate::storage::OutputChunk;

use super::runner::Assignment;

/// An attempt this pool holds a lease for.
#[derive(Debug)]
struct Held {
    lease: Lease,
    canceller: Canceller,
    /// Its output as the executor writes it.
    live: LiveOutput,
    /// The store reported the lease lost: the attempt is cancelled and its result dropped.
    lost: bool,
}

/// What to do with an attempt that just finished.
#[derive(Debug)]
pub(crate) enum Finish {
    /// Settle it with this lease.
    Settle(Lease),
    /// Its lease was lost: drop the result. The attempts parked behind it that may start
    /// now are returned.
    Lost(Vec<Assignment>),
    /// Not an attempt of this ledger (already settled or forgotten): ignore it.
    Unknown,
}

/// The pool's attempts, by lease token. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    held: HashMap<u64, Held>,
    /// The attempt (lease token) of each job whose lease this pool still holds.
    current: HashMap<JobId, u64>,
    /// Jobs with lost attempts still running here, and how many.
    lost: HashMap<JobId, usize>,
    /// Claimed again while a lost attempt of the same job still runs here.
    parked: Vec<Assignment>,
}

impl Ledger {
    /// Attempts held, lost ones that still run included.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no attempt is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Takes a claimed job. Returns the assignment to hand to an executor now, or `None` if
    /// it is parked; and the job whose earlier attempt here was found lost, if one was.
    pub(crate) fn claimed(&mut self, job: Job) -> (Option<Assignment>, Option<JobId>) {
        let Some(lease) = job.lease.clone() else {
            return (None, None);
        };
        let mut lost = None;
        if let Some(old) = self.current.insert(job.id.clone(), lease.token) {
            // The store handed out a job this pool is still running: the old lease was lost.
            lost = self.mark_lost(old).then(|| job.id.clone());
        }
        let (canceller, cancel) = cancel_pair();
        let live = LiveOutput::new();
        let behind_lost = self.lost.contains_key(&job.id);
        self.held.insert(
            lease.token,
            Held {
                lease,
                canceller,
                live: live.clone(),
                lost: false,
            },
        );
        let assignment = Assignment { job, cancel, live };
        if behind_lost {
            self.parked.push(assignment);
            (None, lost)
        } else {
            (Some(assignment), lost)
        }
    }

    /// The store reports the lease of `job` lost: cancels this pool's attempt of it. Returns
    /// whether there was one to lose, and the attempts that may start now (a lost attempt
    /// that was parked never started, so it ends at once).
    pub(crate) fn lose(&mut self, job: &JobId) -> (bool, Vec<Assignment>) {
        let Some(&token) = self.current.get(job) else {
            return (false, Vec::new());
        };
        if !self.mark_lost(token) {
            return (false, Vec::new());
        }
        let (lost_parked, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|a| a.token() == Some(token));
        self.parked = kept;
        let mut ready = Vec::new();
        for _ in lost_parked {
            if let Finish::Lost(more) = self.finished(token) {
                ready.extend(more);
            }
        }
        (true, ready)
    }

    fn mark_lost(&mut self, token: u64) -> bool {
        let Some(held) = self.held.get_mut(&token) else {
            return false;
        };
        if held.lost {
            return false;
        }
        held.lost = true;
        held.canceller.cancel();
        let job = held.lease.job_id.clone();
        if self.current.get(&job) == Some(&token) {
            self.current.remove(&job);
        }
        *self.lost.entry(job).or_default() += 1;
        true
    }

    /// An attempt ended (its executor returned, or it never started).
    pub(crate) fn finished(&mut self, token: u64) -> Finish {
        let Some(held) = self.held.get(&token) else {
            return Finish::Unknown;
        };
        if !held.lost {
            return Finish::Settle(held.lease.clone());
        }
        let job = held.lease.job_id.clone();
        self.forget(token);
        if let Some(count) = self.lost.get_mut(&job) {
            *count -= 1;
            if *count == 0 {
                self.lost.remove(&job);
            }
        }
        if self.lost.contains_key(&job) {
            return Finish::Lost(Vec::new());
        }
        let (ready, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|a| a.job.id == job);
        self.parked = parked;
        Finish::Lost(ready)
    }

    /// Forgets a settled attempt.
    pub(crate) fn forget(&mut self, token: u64) {
        if let Some(held) = self.held.remove(&token)
            && self.current.get(&held.lease.job_id) == Some(&token)
        {
            self.current.remove(&held.lease.job_id);
        }
    }

    /// The leases to renew: every attempt not lost.
    pub(crate) fn leases(&self) -> Vec<Lease> {
        self.held
            .values()
            .filter(|h| !h.lost)
            .map(|h| h.lease.clone())
            .collect()
    }

    /// The output not recorded yet of the attempts not lost that wrote their first output at
    /// or before `since` (so an attempt that ends within a flush interval of its first output
    /// costs the store nothing more).
    pub(crate) fn unrecorded_output(&self, since: Instant) -> Vec<OutputChunk> {
        self.held
            .values()
            .filter(|h| !h.lost && h.live.first_write().is_some_and(|at| at <= since))
            .filter_map(|h| {
                let (offset, text) = h.live.unrecorded()?;
                Some(OutputChunk {
                    lease: h.lease.clone(),
                    offset,
                    text,
                })
            })
            .collect()
    }

    /// The store took `chunks`: their output is no longer held.
    pub(crate) fn output_recorded(&self, chunks: &[OutputChunk]) {
        for chunk in chunks {
            if let Some(held) = self.held.get(&chunk.lease.token) {
                held.live.recorded(chunk.offset + chunk.text.len() as u64);
            }
        }
    }

    /// Cancels every attempt (a forced stop).
    pub(crate) fn cancel_all(&mut self) {
        for held in self.held.values_mut() {
            held.canceller.cancel();
        }
    }

    /// Takes the parked attempts, which never started (a stop hands them back).
    pub(crate) fn take_parked(&mut self) -> Vec<Assignment> {
        std::mem::take(&mut self.parked)
    }

    /// Forgets everything: the pool is abandoning its attempts (their leases expire).
    pub(crate) fn clear(&mut self) {
        self.cancel_all();
        *self = Ledger::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;
    use crate::job::{NewJob, now};
    use crate::storage::{Storage, StorageExt};
    use std::time::Duration;

    /// A store with jobs `a` and `b`, and a way to claim (or claim again) a job.
    fn claim(store: &MemoryStorage, worker: &str) -> Job {
        let mut jobs = store
            .claim(worker, 1, Duration::from_secs(60), now())
            .unwrap();
        jobs.pop().expect("a job to claim")
    }

    fn store_with(ids: &[&str]) -> MemoryStorage {
        let store = MemoryStorage::new();
        for id in ids {
            store
                .enqueue(NewJob::new("x").id(*id).unwrap(), now())
                .unwrap();
        }
        store
    }

    fn token(job: &Job) -> u64 {
        job.lease.as_ref().unwrap().token
    }

    #[test]
    fn a_claimed_job_runs_and_settles_with_its_lease() {
        let store = store_with(&["a"]);
        let mut ledger = Ledger::default();
        let job = claim(&store, "w");
        let (run, lost) = ledger.claimed(job.clone());
        assert!(run.is_some() && lost.is_none());
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger.leases(), [job.lease.clone().unwrap()]);
        match ledger.finished(token(&job)) {
            Finish::Settle(lease) => assert_eq!(Some(lease), job.lease),
            other => panic!("{other:?}"),
        }
        ledger.forget(token(&job));
        assert!(ledger.is_empty());
        assert!(matches!(ledger.finished(token(&job)), Finish::Unknown));
    }

    #[test]
    fn a_job_claimed_again_while_it_runs_here_is_parked_until_the_lost_attempt_ends() {
        let store = store_with(&["a"]);
        let mut ledger = Ledger::default();
        let first = claim(&store, "w");
        let (run, _) = ledger.claimed(first.clone());
        let first_run = run.unwrap();
        // The store presumes us dead and hands the job out again, to us.
        store.recover_worker("w", now()).unwrap();
        let second = claim(&store, "w");
        let (run, lost) = ledger.claimed(second.clone());
        assert!(run.is_none(), "parked behind the lost attempt");
        assert_eq!(lost.map(|j| j.to_string()), Some("a".into()));
        assert!(
            first_run.cancel.is_cancelled(),
            "the lost attempt is cancelled"
        );
        assert_eq!(ledger.leases(), [second.lease.clone().unwrap()]);

        // The lost attempt ends: its result is dropped and the parked one may start.
        match ledger.finished(token(&first)) {
            Finish::Lost(ready) => {
                assert_eq!(ready.len(), 1);
                assert_eq!(ready[0].token(), Some(token(&second)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(ledger.finished(token(&second)), Finish::Settle(_)));
    }

    #[test]
    fn losing_a_parked_attempt_ends_it_and_what_waited_behind_it() {
        let store = store_with(&["a"]);
        let mut ledger = Ledger::default();
        let first = claim(&store, "w");
        ledger.claimed(first.clone());
        store.recover_worker("w", now()).unwrap();
        let second = claim(&store, "w");
        assert!(ledger.claimed(second.clone()).0.is_none());
        // The parked attempt is lost too: it never started, so it ends at once; the first
        // still runs.
        let (lost, ready) = ledger.lose(&second.id);
        assert!(lost && ready.is_empty());
        assert_eq!(ledger.len(), 1);
        assert!(ledger.leases().is_empty());
        assert!(matches!(ledger.finished(token(&first)), Finish::Lost(r) if r.is_empty()));
        assert!(ledger.is_empty());
        let (lost_again, ready) = ledger.lose(&second.id);
        assert!(!lost_again && ready.is_empty());
    }

    #[test]
    fn new_output_is_taken_from_running_attempts_once_their_first_output_is_old_enough() {
        let store = store_with(&["a", "b", "c"]);
        let mut ledger = Ledger::default();
        let a = ledger.claimed(claim(&store, "w")).0.unwrap();
        let b = ledger.claimed(claim(&store, "w")).0.unwrap();
        let _silent = ledger.claimed(claim(&store, "w")).0.unwrap();
        let before = Instant::now();
        a.live.write(b"a1");
        b.live.write(b"b1");
        assert!(
            ledger.unrecorded_output(before).is_empty(),
            "output newer than the interval waits"
        );
        let mut chunks = ledger.unrecorded_output(Instant::now());
        chunks.sort_by(|x, y| x.text.cmp(&y.text));
        let taken: Vec<_> = chunks
            .iter()
            .map(|c| (c.lease.job_id.as_str(), c.offset, c.text.as_str()))
            .collect();
        assert_eq!(taken, [("a", 0, "a1"), ("b", 0, "b1")]);
        assert_eq!(chunks[0].lease, a.job.lease.clone().unwrap());
        ledger.output_recorded(&chunks);
        assert!(ledger.unrecorded_output(Instant::now()).is_empty());
        a.live.write(b"a2");
        b.live.write(b"b2");
        ledger.lose(&b.job.id);
        let chunks = ledger.unrecorded_output(Instant::now());
        assert_eq!(chunks.len(), 1, "a lost attempt records nothing");
        assert_eq!((chunks[0].offset, chunks[0].text.as_str()), (2, "a2"));
    }

    #[test]
    fn cancel_all_and_clear_fire_every_cancel_signal() {
        let store = store_with(&["a", "b"]);
        let mut ledger = Ledger::default();
        let a = ledger.claimed(claim(&store, "w")).0.unwrap();
        let b = ledger.claimed(claim(&store, "w")).0.unwrap();
        ledger.cancel_all();
        assert!(a.cancel.is_cancelled() && b.cancel.is_cancelled());
        ledger.clear();
        assert!(ledger.is_empty() && ledger.take_parked().is_empty());
    }
}
