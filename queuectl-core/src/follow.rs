//! Following a job's output as it is produced, without polling: the store wakes the follower
//! on every change, and each wait has a timeout after which it looks again anyway.

use std::collections::VecDeque;
use std::time::Duration;

use crate::error::{Result, StorageError};
use crate::job::{Attempt, AttemptOutcome, Job, JobId, JobState};
use crate::rules;
use crate::shell::kept_from;
use crate::storage::{RunningOutput, Storage};

/// What a [`Follow`] has seen happen, in order. The `Output` steps of one attempt, put
/// together, are its output as it was produced (or, once it ended, as its settlement kept it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowStep {
    /// An attempt started on `worker` (or was running when following began).
    Started {
        /// The attempt's number.
        attempt: u32,
        /// The worker running it.
        worker: String,
    },
    /// More output of the attempt, to show as it is.
    Output {
        /// The attempt's number.
        attempt: u32,
        /// The text.
        text: String,
    },
    /// Output of the attempt that went by unseen: the store no longer kept it when the
    /// follower looked (it keeps the last [`MAX_OUTPUT`](crate::MAX_OUTPUT) bytes of a running
    /// attempt's output, and its settlement only the tail the executor kept).
    Skipped {
        /// The attempt's number.
        attempt: u32,
        /// How many bytes.
        bytes: u64,
    },
    /// The attempt ended. Its record, without its output (the `Output` steps before had it).
    Ended(Box<Attempt>),
    /// Nothing follows: the job has ended, or, when following one attempt, that attempt has.
    Done {
        /// The job as the follower last saw it.
        job: Box<Job>,
        /// Whether the job completed (following one attempt: whether it succeeded).
        succeeded: bool,
    },
}

/// Follows a job's output as it is produced: an iterator of [`FollowStep`]s that blocks until
/// the next one, on changes of the store, and ends after [`FollowStep::Done`].
///
/// Following a job shows the attempt running (what it printed so far, then as it comes), then
/// every later attempt until the job has ended (`completed`, `dead` or `cancelled`); a job
/// waiting to run is waited for; a job that has ended shows its last attempt's output. The
/// output of a running attempt comes from what its worker records every so often
/// ([`Storage::record_output`]); when the attempt ends, the rest comes from the output its
/// settlement kept.
///
/// ```
/// use std::time::Duration;
/// use queuectl_core::{AttemptReport, FollowStep, MemoryStorage, NewJob, Storage, StorageExt};
/// use queuectl_core::{follow_job, now};
///
/// let store = MemoryStorage::new();
/// store.enqueue(NewJob::new("echo hi").id("j")?, now())?;
/// let lease = store.claim("w", 1, Duration::from_secs(30), now())?[0].lease.clone().unwrap();
/// let report = AttemptReport { output: Some("hi\n".into()), ..AttemptReport::default() };
/// store.complete(&lease, report, now())?;
/// let mut printed = String::new();
/// for step in follow_job(&store, &"j".parse()?)? {
///     match step? {
///         FollowStep::Output { text, .. } => printed.push_str(&text),
///         FollowStep::Done { succeeded, .. } => assert!(succeeded),
///         _ => {}
///     }
/// }
/// assert_eq!(printed, "hi\n");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Follow<'s> {
    store: &'s dyn Storage,
    id: JobId,
    /// The job's place in the store: another `seq` under the same id is another job.
    seq: u64,
    /// Follow only this attempt, then end.
    only: Option<u32>,
    poll: Duration,
    /// How many finished attempts of the history have been shown (or passed over).
    shown: usize,
    /// The running attempt being shown; in the history it comes right after the `shown` ones.
    current: Option<Current>,
    steps: VecDeque<FollowStep>,
    done: bool,
}

#[derive(Debug)]
struct Current {
    token: u64,
    number: u32,
    /// Where the output shown so far ends.
    shown_upto: u64,
}

/// How long a follower waits for a change before it looks again anyway.
const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// Follows job `id` until it has ended; see [`Follow`]. An unknown job is
/// [`StorageError::NotFound`](crate::StorageError::NotFound).
pub fn follow_job<'s>(store: &'s dyn Storage, id: &JobId) -> Result<Follow<'s>> {
    Ok(Follow::start(store, id, None)?.expect("following a job starts in any state"))
}

/// Follows attempt `number` of job `id` until it ends; `None` when it is not the attempt
/// running now.
pub fn follow_attempt<'s>(
    store: &'s dyn Storage,
    id: &JobId,
    number: u32,
) -> Result<Option<Follow<'s>>> {
    Follow::start(store, id, Some(number))
}

impl<'s> Follow<'s> {
    fn start(store: &'s dyn Storage, id: &JobId, only: Option<u32>) -> Result<Option<Self>> {
        let first = store.output_since(id, 0)?;
        let mut follow = Self {
            store,
            id: id.clone(),
            seq: first.job.seq,
            only,
            poll: DEFAULT_POLL,
            shown: first.finished,
            current: None,
            steps: VecDeque::new(),
            done: false,
        };
        match first.job.state {
            JobState::Processing if only.is_none_or(|n| n == first.job.runs) => {
                follow.begin(first);
            }
            _ if only.is_some() => return Ok(None),
            // Its last attempt is shown by the first look.
            state if state.is_finished() => follow.shown = first.finished.saturating_sub(1),
            // Waiting to run: from its next attempt on.
            _ => {}
        }
        Ok(Some(follow))
    }

    /// The longest wait for a change before looking again anyway (default 1 s).
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// Starts showing the running attempt `seen` (read from offset 0) shows.
    fn begin(&mut self, seen: RunningOutput) {
        let Some(lease) = seen.job.lease else { return };
        self.current = Some(Current {
            token: lease.token,
            number: seen.job.runs,
            shown_upto: 0,
        });
        self.steps.push_back(FollowStep::Started {
            attempt: seen.job.runs,
            worker: lease.worker,
        });
        self.more(seen.offset, seen.text);
    }

    /// Shows more output of the current attempt: `text`, which starts at `offset`.
    fn more(&mut self, offset: u64, text: String) {
        let Some(current) = &mut self.current else {
            return;
        };
        let attempt = current.number;
        if offset > current.shown_upto {
            self.steps.push_back(FollowStep::Skipped {
                attempt,
                bytes: offset - current.shown_upto,
            });
        }
        current.shown_upto = current.shown_upto.max(offset + text.len() as u64);
        if !text.is_empty() {
            self.steps.push_back(FollowStep::Output { attempt, text });
        }
    }

    /// Shows a finished attempt: the rest of its output after `shown_upto` bytes of it were
    /// shown while it ran (all of it when none were), then its end.
    fn finish(&mut self, attempt: &Attempt, shown_upto: Option<u64>) {
        let number = attempt.number;
        let output = attempt.output.as_deref().unwrap_or("");
        let mut push = |step| self.steps.push_back(step);
        if shown_upto.is_none() {
            push(FollowStep::Started {
                attempt: number,
                worker: attempt.worker.clone(),
            });
        }
        let rest = match shown_upto {
            None | Some(0) => output,
            Some(shown) => {
                // The kept output is the tail of what was produced, after a line saying how
                // much of it was dropped.
                let (dropped, line) = kept_from(output);
                let kept = &output[line..];
                if shown < dropped {
                    push(FollowStep::Skipped {
                        attempt: number,
                        bytes: dropped - shown,
                    });
                }
                rules::keep_from(kept, dropped, shown)
            }
        };
        if !rest.is_empty() {
            push(FollowStep::Output {
                attempt: number,
                text: rest.to_owned(),
            });
        }
        push(FollowStep::Ended(Box::new(Attempt {
            output: None,
            ..attempt.clone()
        })));
    }

    fn end(&mut self, job: Job, succeeded: bool) {
        self.steps.push_back(FollowStep::Done {
            job: Box::new(job),
            succeeded,
        });
        self.done = true;
    }

    /// Looks at the store once and queues what happened since the last look. Returns whether
    /// to look again at once (an attempt started whose output was read from the wrong offset).
    fn look(&mut self) -> Result<bool> {
        let offset = self.current.as_ref().map_or(0, |c| c.shown_upto);
        let seen = self.store.output_since(&self.id, offset)?;
        if seen.job.seq != self.seq {
            // Removed, and a new job took its id: the one followed is gone.
            return Err(StorageError::NotFound {
                id: self.id.clone(),
            });
        }
        if seen.finished > self.shown {
            // Only the attempts this look saw end: the history may have grown since.
            let history = self.store.attempts(&self.id)?;
            let ended = history.get(self.shown..seen.finished).unwrap_or_default();
            for attempt in ended {
                let shown_upto = self.current.take().map(|c| c.shown_upto);
                self.finish(attempt, shown_upto);
                self.shown += 1;
                if self.only.is_some() {
                    let succeeded = attempt.outcome == AttemptOutcome::Succeeded;
                    self.end(seen.job, succeeded);
                    return Ok(false);
                }
            }
        }
        if seen.job.state == JobState::Processing && seen.finished == self.shown {
            let token = seen.job.lease.as_ref().map(|l| l.token);
            match &self.current {
                Some(current) if Some(current.token) == token => {
                    self.more(seen.offset, seen.text);
                }
                _ if offset == 0 => self.begin(seen),
                // A new attempt, read from where the one before it ended: read it again.
                _ => return Ok(true),
            }
        } else if seen.job.state.is_finished() && seen.finished == self.shown {
            let succeeded = seen.job.state == JobState::Completed;
            self.end(seen.job, succeeded);
        }
        Ok(false)
    }

    /// Looks, then waits for a change unless something happened.
    fn step(&mut self) -> Result<()> {
        // The version first: a change after it ends the wait at once.
        let seen = self.store.change_version()?;
        if self.look()? || !self.steps.is_empty() || self.done {
            return Ok(());
        }
        self.store.wait_for_change(seen, self.poll)?;
        Ok(())
    }
}

impl Iterator for Follow<'_> {
    type Item = Result<FollowStep>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(step) = self.steps.pop_front() {
                return Some(Ok(step));
            }
            if self.done {
                return None;
            }
            if let Err(error) = self.step() {
                self.done = true;
                return Some(Err(error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crossbeam_channel::Receiver;

    use super::*;
    use crate::job::{Lease, NewJob, now};
    use crate::storage::{AttemptReport, OutputChunk, StorageExt};
    use crate::{MemoryStorage, StorageError};

    const LONG: Duration = Duration::from_secs(10);

    fn id() -> JobId {
        "j".parse().unwrap()
    }

    /// The steps of a follower of job `j` (of its attempt `only`), on a thread, as they come.
    fn follower(store: &Arc<MemoryStorage>, only: Option<u32>) -> Receiver<FollowStep> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let store = store.clone();
        let (started_tx, started) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let follow = match only {
                None => follow_job(&*store, &id()).unwrap(),
                Some(n) => follow_attempt(&*store, &id(), n).unwrap().unwrap(),
            };
            started_tx.send(()).unwrap();
            for step in follow {
                if tx.send(step.unwrap()).is_err() {
                    return;
                }
            }
        });
        started.recv_timeout(LONG).expect("the follower started");
        rx
    }

    fn next(steps: &Receiver<FollowStep>) -> FollowStep {
        steps.recv_timeout(LONG).expect("a step")
    }

    fn output(attempt: u32, text: &str) -> FollowStep {
        FollowStep::Output {
            attempt,
            text: text.to_owned(),
        }
    }

    fn claim(store: &MemoryStorage) -> Lease {
        let job = store.claim("w", 1, LONG, now()).unwrap().remove(0);
        job.lease.unwrap()
    }

    fn print(store: &MemoryStorage, lease: &Lease, offset: u64, text: &str) {
        let chunk = OutputChunk {
            lease: lease.clone(),
            offset,
            text: text.to_owned(),
        };
        assert!(store.record_output(&[chunk]).unwrap().is_empty());
    }

    fn report(output: &str) -> AttemptReport {
        AttemptReport {
            output: Some(output.to_owned()),
            ..AttemptReport::default()
        }
    }

    fn ended(step: FollowStep) -> AttemptOutcome {
        match step {
            FollowStep::Ended(attempt) => {
                assert_eq!(attempt.output, None);
                attempt.outcome
            }
            other => panic!("expected an end, got {other:?}"),
        }
    }

    fn done(step: FollowStep) -> (JobState, bool) {
        match step {
            FollowStep::Done { job, succeeded } => (job.state, succeeded),
            other => panic!("expected the end, got {other:?}"),
        }
    }

    fn store_with_job(max_retries: u32) -> Arc<MemoryStorage> {
        let store = Arc::new(MemoryStorage::new());
        let job = NewJob::new("x").id("j").unwrap().max_retries(max_retries);
        store.enqueue(job, now()).unwrap();
        store
    }

    /// A job removed while followed, and a new one enqueued with its id: the follower ends
    /// with "not found" instead of waiting for attempts of the old one.
    #[test]
    fn a_job_replaced_under_its_id_ends_the_follower() {
        let store = store_with_job(3);
        let lease = claim(&store);
        store.fail(&lease, report("one\n"), now(), now()).unwrap();
        let lease = claim(&store);
        store.fail(&lease, report("two\n"), now(), now()).unwrap();
        let (tx, ended) = crossbeam_channel::bounded(1);
        let (started_tx, started) = crossbeam_channel::bounded(1);
        let (go_tx, go) = crossbeam_channel::bounded(1);
        let following = store.clone();
        std::thread::spawn(move || {
            let mut follow = follow_job(&*following, &id()).unwrap();
            started_tx.send(()).unwrap();
            // Its next look comes after both changes: it sees the new job, not a gap.
            go.recv_timeout(LONG).unwrap();
            let _ = tx.send(follow.find_map(|step| step.err()));
        });
        started.recv_timeout(LONG).expect("the follower started");
        store.remove(&[id()], now()).unwrap();
        store
            .enqueue(NewJob::new("true").id("j").unwrap(), now())
            .unwrap();
        go_tx.send(()).unwrap();
        let ended = ended.recv_timeout(LONG).expect("the follower ended");
        assert!(
            matches!(ended, Some(StorageError::NotFound { .. })),
            "{ended:?}"
        );
    }

    #[test]
    fn a_running_attempt_is_shown_as_it_is_recorded_then_the_rest_of_its_output() {
        let store = store_with_job(3);
        let lease = claim(&store);
        print(&store, &lease, 0, "one\n");
        let steps = follower(&store, None);
        assert_eq!(
            next(&steps),
            FollowStep::Started {
                attempt: 1,
                worker: "w".into()
            }
        );
        assert_eq!(next(&steps), output(1, "one\n"));
        print(&store, &lease, 4, "two\n");
        assert_eq!(next(&steps), output(1, "two\n"));
        store
            .complete(&lease, report("one\ntwo\nthree\n"), now())
            .unwrap();
        assert_eq!(next(&steps), output(1, "three\n"));
        assert_eq!(ended(next(&steps)), AttemptOutcome::Succeeded);
        assert_eq!(done(next(&steps)), (JobState::Completed, true));
        assert!(steps.recv_timeout(LONG).is_err(), "nothing after the end");
    }

    #[test]
    fn a_waiting_job_is_followed_through_every_attempt_until_it_ends() {
        let store = store_with_job(2);
        let steps = follower(&store, None);
        let lease = claim(&store);
        assert!(matches!(
            next(&steps),
            FollowStep::Started { attempt: 1, .. }
        ));
        print(&store, &lease, 0, "first\n");
        assert_eq!(next(&steps), output(1, "first\n"));
        store
            .fail(&lease, report("first\nboom\n"), now(), now())
            .unwrap();
        assert_eq!(next(&steps), output(1, "boom\n"));
        assert_eq!(ended(next(&steps)), AttemptOutcome::Failed);
        let lease = claim(&store);
        assert!(matches!(
            next(&steps),
            FollowStep::Started { attempt: 2, .. }
        ));
        store.fail(&lease, report("again\n"), now(), now()).unwrap();
        // Nothing was shown live: all of its output at its end.
        assert_eq!(next(&steps), output(2, "again\n"));
        assert_eq!(ended(next(&steps)), AttemptOutcome::Failed);
        assert_eq!(done(next(&steps)), (JobState::Dead, false));
    }

    #[test]
    fn an_attempt_that_ran_between_two_looks_is_shown_whole() {
        let store = store_with_job(3);
        let mut follow = follow_job(&*store, &id()).unwrap();
        let lease = claim(&store);
        print(&store, &lease, 0, "unseen\n");
        store
            .complete(&lease, report("all of it\n"), now())
            .unwrap();
        let steps: Vec<_> = follow.by_ref().map(Result::unwrap).collect();
        assert_eq!(steps.len(), 4, "{steps:?}");
        assert!(matches!(steps[0], FollowStep::Started { attempt: 1, .. }));
        assert_eq!(steps[1], output(1, "all of it\n"));
        assert_eq!(ended(steps[2].clone()), AttemptOutcome::Succeeded);
        assert_eq!(done(steps[3].clone()), (JobState::Completed, true));
    }

    #[test]
    fn a_job_that_has_ended_shows_its_last_attempt() {
        let store = store_with_job(3);
        let lease = claim(&store);
        store.fail(&lease, report("one\n"), now(), now()).unwrap();
        let lease = claim(&store);
        store.complete(&lease, report("two\n"), now()).unwrap();
        let steps: Vec<_> = follow_job(&*store, &id())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(steps[1], output(2, "two\n"));
        assert_eq!(done(steps[3].clone()), (JobState::Completed, true));
        assert!(follow_attempt(&*store, &id(), 2).unwrap().is_none());
        // One that never ran has nothing to show.
        store
            .enqueue(NewJob::new("x").id("never").unwrap(), now())
            .unwrap();
        let never = "never".parse().unwrap();
        store.cancel(std::slice::from_ref(&never), now()).unwrap();
        let steps: Vec<_> = follow_job(&*store, &never)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(steps.len(), 1);
        assert_eq!(done(steps[0].clone()), (JobState::Cancelled, false));
        assert!(matches!(
            follow_job(&*store, &"nobody".parse().unwrap()),
            Err(StorageError::NotFound { .. })
        ));
    }

    #[test]
    fn one_attempt_is_followed_until_it_ends_whatever_the_job_does_next() {
        let store = store_with_job(3);
        assert!(
            follow_attempt(&*store, &id(), 1).unwrap().is_none(),
            "pending"
        );
        let lease = claim(&store);
        assert!(follow_attempt(&*store, &id(), 2).unwrap().is_none());
        let steps = follower(&store, Some(1));
        assert!(matches!(
            next(&steps),
            FollowStep::Started { attempt: 1, .. }
        ));
        store.fail(&lease, report("no\n"), now(), now()).unwrap();
        assert_eq!(next(&steps), output(1, "no\n"));
        assert_eq!(ended(next(&steps)), AttemptOutcome::Failed);
        assert_eq!(done(next(&steps)), (JobState::Failed, false));
    }

    #[test]
    fn output_that_went_by_unseen_is_counted() {
        let store = store_with_job(3);
        let lease = claim(&store);
        print(&store, &lease, 0, "abcd");
        let steps = follower(&store, None);
        next(&steps);
        assert_eq!(next(&steps), output(1, "abcd"));
        // The worker dropped 6 bytes it could not record in time.
        print(&store, &lease, 10, "klmn");
        assert_eq!(
            next(&steps),
            FollowStep::Skipped {
                attempt: 1,
                bytes: 6
            }
        );
        assert_eq!(next(&steps), output(1, "klmn"));
        // The executor kept the last 6 bytes of 20: the rest is what comes after the 14 shown.
        store
            .complete(&lease, report("[... 14 bytes truncated]\nopqrst"), now())
            .unwrap();
        assert_eq!(next(&steps), output(1, "opqrst"));
        assert_eq!(ended(next(&steps)), AttemptOutcome::Succeeded);
        done(next(&steps));

        store
            .enqueue(NewJob::new("x").id("k").unwrap(), now())
            .unwrap();
        let k: JobId = "k".parse().unwrap();
        let lease = claim(&store);
        print(&store, &lease, 0, "ab");
        // The executor kept the last 4 bytes of 8, and 2 were shown: 2 went by unseen.
        let mut follow = follow_job(&*store, &k).unwrap();
        assert!(matches!(
            follow.next().unwrap().unwrap(),
            FollowStep::Started { attempt: 1, .. }
        ));
        assert_eq!(follow.next().unwrap().unwrap(), output(1, "ab"));
        store
            .complete(&lease, report("[... 4 bytes truncated]\nefgh"), now())
            .unwrap();
        assert_eq!(
            follow.next().unwrap().unwrap(),
            FollowStep::Skipped {
                attempt: 1,
                bytes: 2
            }
        );
        assert_eq!(follow.next().unwrap().unwrap(), output(1, "efgh"));
    }
}
