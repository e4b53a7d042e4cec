//! Statistics over the recent history, per queue: what `queuectl stats` prints.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::job::{AttemptOutcome, JobState, Timestamp};
use crate::storage::Activity;

/// The spread of a set of durations, in seconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Half took at most this long.
    pub p50: f64,
    /// 95 % took at most this long.
    pub p95: f64,
    /// The longest.
    pub max: f64,
    /// How many there were.
    pub count: usize,
}

impl Spread {
    /// The spread of `samples` (seconds), `None` when there are none.
    pub fn of(mut samples: Vec<f64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).max(1) - 1];
        Some(Self {
            p50: rank(0.50),
            p95: rank(0.95),
            max: samples[samples.len() - 1],
            count: samples.len(),
        })
    }
}

/// One queue over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Jobs that completed (attempts that succeeded).
    pub completed: usize,
    /// Attempts that failed or were abandoned by their worker.
    pub failed_attempts: usize,
    /// Jobs that ended dead in the window and still are.
    pub dead: usize,
    /// Jobs that were cancelled in the window and still are.
    pub cancelled: usize,
    /// Completed jobs per minute over the window.
    pub per_minute: f64,
    /// From due (or from the end of the job's attempt before, when that was later: a job
    /// handed back) to started, over every attempt that finished in the window.
    pub wait: Option<Spread>,
    /// From started to finished, over attempts that succeeded or failed.
    pub run: Option<Spread>,
}

/// Per queue (by name), what `activity` says happened between `since` and `now`.
pub fn per_queue(activity: &Activity, since: Timestamp, now: Timestamp) -> Vec<QueueStats> {
    #[derive(Default)]
    struct Tally {
        completed: usize,
        failed_attempts: usize,
        dead: usize,
        cancelled: usize,
        wait: Vec<f64>,
        run: Vec<f64>,
    }
    let seconds = |d: time::Duration| d.as_seconds_f64().max(0.0);
    let mut queues: BTreeMap<&str, Tally> = BTreeMap::new();
    // When each job's previous attempt in the window ended: a job handed back keeps its due
    // time, and its next attempt waited only from the hand-back.
    let mut ended: std::collections::HashMap<&crate::JobId, Timestamp> =
        std::collections::HashMap::new();
    for finished in &activity.attempts {
        let attempt = &finished.attempt;
        let previous_end = ended.get(&finished.job).copied();
        if let Some(end) = attempt.finished_at {
            ended.insert(&finished.job, end);
        }
        let tally = queues.entry(&finished.queue).or_default();
        match attempt.outcome {
            AttemptOutcome::Succeeded => tally.completed += 1,
            AttemptOutcome::Failed | AttemptOutcome::Abandoned => tally.failed_attempts += 1,
            _ => {}
        }
        if let Some(due) = attempt.due_at {
            let waited_from = previous_end.map_or(due, |end| end.max(due));
            tally.wait.push(seconds(attempt.started_at - waited_from));
        }
        if let (Some(end), AttemptOutcome::Succeeded | AttemptOutcome::Failed) =
            (attempt.finished_at, attempt.outcome)
        {
            tally.run.push(seconds(end - attempt.started_at));
        }
    }
    for (queue, state) in &activity.ended {
        let tally = queues.entry(queue).or_default();
        match state {
            JobState::Dead => tally.dead += 1,
            JobState::Cancelled => tally.cancelled += 1,
            _ => {}
        }
    }
    let minutes = Duration::try_from(now - since)
        .unwrap_or_default()
        .as_secs_f64()
        / 60.0;
    queues
        .into_iter()
        .map(|(queue, t)| QueueStats {
            queue: queue.to_owned(),
            completed: t.completed,
            failed_attempts: t.failed_attempts,
            dead: t.dead,
            cancelled: t.cancelled,
            per_minute: if minutes > 0.0 {
                t.completed as f64 / minutes
            } else {
                0.0
            },
            wait: Spread::of(t.wait),
            run: Spread::of(t.run),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Attempt;
    use time::macros::datetime;

    fn at(secs: f64) -> Timestamp {
        datetime!(2026-01-01 00:00:00 UTC) + time::Duration::seconds_f64(secs)
    }

    fn attempt(outcome: AttemptOutcome, due: f64, start: f64, end: f64) -> Attempt {
        Attempt {
            number: 1,
            worker: "w".into(),
            started_at: at(start),
            finished_at: Some(at(end)),
            outcome,
            exit_code: None,
            signal: None,
            error: None,
            output: None,
            due_at: Some(at(due)),
        }
    }

    /// An attempt of a job of its own.
    fn finished(queue: &str, attempt: Attempt) -> crate::storage::FinishedAttempt {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        of_job(&format!("j{n}"), queue, attempt)
    }

    fn of_job(job: &str, queue: &str, attempt: Attempt) -> crate::storage::FinishedAttempt {
        crate::storage::FinishedAttempt {
            queue: queue.into(),
            job: crate::JobId::new(job).unwrap(),
            attempt,
        }
    }

    #[test]
    fn a_handed_back_job_waited_only_from_the_hand_back() {
        let released = attempt(AttemptOutcome::Released, 0.0, 1.0, 100.0);
        let next = attempt(AttemptOutcome::Succeeded, 0.0, 101.0, 102.0);
        let activity = Activity {
            attempts: vec![of_job("x", "a", released), of_job("x", "a", next)],
            ended: Vec::new(),
        };
        let wait = per_queue(&activity, at(0.0), at(200.0))[0].wait.unwrap();
        assert_eq!((wait.count, wait.max), (2, 1.0), "1 s each, not 101 s");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let spread = Spread::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((spread.p50, spread.p95, spread.max), (50.0, 95.0, 100.0));
        let one = Spread::of(vec![3.0]).unwrap();
        assert_eq!((one.p50, one.p95, one.max, one.count), (3.0, 3.0, 3.0, 1));
        assert_eq!(Spread::of(Vec::new()), None);
    }

    #[test]
    fn queues_are_tallied_apart() {
        let activity = Activity {
            attempts: vec![
                finished("a", attempt(AttemptOutcome::Succeeded, 0.0, 1.0, 3.0)),
                finished("a", attempt(AttemptOutcome::Failed, 0.0, 2.0, 2.5)),
                finished("a", attempt(AttemptOutcome::Abandoned, 4.0, 4.0, 30.0)),
                finished("b", attempt(AttemptOutcome::Succeeded, 5.0, 9.0, 10.0)),
                finished("b", attempt(AttemptOutcome::Cancelled, 5.0, 6.0, 7.0)),
            ],
            ended: vec![
                ("a".into(), JobState::Dead),
                ("c".into(), JobState::Cancelled),
            ],
        };
        let stats = per_queue(&activity, at(0.0), at(120.0));
        let names: Vec<_> = stats.iter().map(|s| s.queue.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let a = &stats[0];
        assert_eq!((a.completed, a.failed_attempts, a.dead), (1, 2, 1));
        assert_eq!(a.per_minute, 0.5);
        let wait = a.wait.unwrap();
        assert_eq!((wait.max, wait.count), (2.0, 3));
        let run = a.run.unwrap();
        assert_eq!(
            (run.p50, run.max, run.count),
            (0.5, 2.0, 2),
            "abandoned is not a run"
        );
        assert_eq!(stats[1].wait.unwrap().max, 4.0);
        assert_eq!((stats[2].cancelled, stats[2].wait), (1, None));
    }
}
