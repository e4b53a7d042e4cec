//! How long a failed job waits before its next attempt.

use std::fmt::Debug;
use std::time::Duration;

use crate::job::JobId;

/// Chooses the delay before the next attempt of a job that failed.
///
/// # Contract
/// `delay(job, attempts)` is called after an attempt failed, with `attempts` the number of
/// attempts made so far (1 after the first). It must be a pure function of its arguments: the
/// same job and attempt always get the same delay, so retries are reproducible. It must not
/// panic or overflow for any `attempts`.
pub trait BackoffPolicy: Send + Sync + Debug {
    /// The delay after `attempts` failed attempts of `job`.
    fn delay(&self, job: &JobId, attempts: u32) -> Duration;
}

/// `base ^ attempts` seconds, capped, with optional deterministic jitter.
///
/// With base 2: 2 s after the first failure, then 4 s, 8 s, … up to `cap`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exponential {
    /// The base of the power, in seconds; at least 1.
    pub base: f64,
    /// The longest delay.
    pub cap: Duration,
    /// Fraction of the delay (0.0 to 1.0) that may be added as jitter, derived from the job id
    /// and attempt so that jobs failing together do not retry together.
    pub jitter: f64,
}

impl Exponential {
    /// `base ^ attempts` seconds, capped at `cap`, no jitter.
    pub fn new(base: f64, cap: Duration) -> Self {
        Self {
            base: if base.is_finite() { base.max(1.0) } else { 1.0 },
            cap,
            jitter: 0.0,
        }
    }

    /// Adds up to `fraction` of the delay as jitter (clamped to 0.0..=1.0).
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }
}

impl BackoffPolicy for Exponential {
    fn delay(&self, job: &JobId, attempts: u32) -> Duration {
        let cap = self.cap.as_secs_f64();
        // powi saturates to +inf rather than overflowing; min() then clamps to the cap.
        let exponent = i32::try_from(attempts).unwrap_or(i32::MAX);
        let mut secs = self.base.powi(exponent).min(cap);
        if self.jitter > 0.0 {
            let unit = (jitter_hash(job, attempts) >> 11) as f64 / (1u64 << 53) as f64;
            secs = (secs + secs * self.jitter * unit).min(cap);
        }
        Duration::try_from_secs_f64(secs).unwrap_or(self.cap)
    }
}

/// The same delay after every failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed(pub Duration);

impl BackoffPolicy for Fixed {
    fn delay(&self, _job: &JobId, _attempts: u32) -> Duration {
        self.0
    }
}

/// FNV-1a over the id and attempt: stable across processes and releases.
fn jitter_hash(job: &JobId, attempts: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in job.as_str().bytes().chain(attempts.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> JobId {
        JobId::new("job").unwrap()
    }

    #[test]
    fn exponential_is_base_to_the_attempts() {
        let policy = Exponential::new(2.0, Duration::from_secs(3600));
        let table = [(1, 2), (2, 4), (3, 8), (4, 16), (10, 1024)];
        for (attempts, secs) in table {
            assert_eq!(
                policy.delay(&id(), attempts),
                Duration::from_secs(secs),
                "attempt {attempts}"
            );
        }
        let base3 = Exponential::new(3.0, Duration::from_secs(3600));
        assert_eq!(base3.delay(&id(), 2), Duration::from_secs(9));
    }

    #[test]
    fn exponential_saturates_at_the_cap_without_overflow() {
        let cap = Duration::from_secs(600);
        let policy = Exponential::new(2.0, cap);
        assert_eq!(policy.delay(&id(), 9), Duration::from_secs(512));
        for attempts in [10, 11, 64, 1000, u32::MAX] {
            assert_eq!(policy.delay(&id(), attempts), cap, "attempt {attempts}");
        }
    }

    #[test]
    fn base_below_one_is_treated_as_one() {
        let policy = Exponential::new(0.5, Duration::from_secs(60));
        assert_eq!(policy.delay(&id(), 5), Duration::from_secs(1));
        let nan = Exponential::new(f64::NAN, Duration::from_secs(60));
        assert_eq!(nan.delay(&id(), 5), Duration::from_secs(1));
    }

    #[test]
    fn jitter_is_deterministic_bounded_and_varies_by_job() {
        let policy = Exponential::new(2.0, Duration::from_secs(3600)).with_jitter(0.5);
        let a = JobId::new("a").unwrap();
        let b = JobId::new("b").unwrap();
        let da = policy.delay(&a, 3);
        assert_eq!(da, policy.delay(&a, 3));
        assert!(
            da >= Duration::from_secs(8) && da <= Duration::from_secs(12),
            "{da:?}"
        );
        let spread: std::collections::HashSet<_> = (0..20)
            .map(|i| policy.delay(&JobId::new(format!("job{i}")).unwrap(), 3))
            .collect();
        assert!(spread.len() > 10, "jitter should spread jobs: {spread:?}");
        assert_ne!(da, policy.delay(&b, 3));
    }

    #[test]
    fn fixed_is_constant() {
        let policy = Fixed(Duration::from_millis(250));
        assert_eq!(policy.delay(&id(), 1), Duration::from_millis(250));
        assert_eq!(policy.delay(&id(), 99), Duration::from_millis(250));
    }
}
