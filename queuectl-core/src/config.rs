//! Settings persisted in the store, shared by every process that uses it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Exponential;

/// The queue's settings, persisted in the store.
///
/// Keys are kebab-case on the command line and in JSON. Changing a setting affects jobs
/// enqueued afterwards (`max-retries`, `job-timeout` are copied into each job when it is
/// enqueued) and workers started afterwards (the rest are read when a worker starts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Config {
    /// Failed attempts after which a job is dead.
    pub max_retries: u32,
    /// Base of the exponential backoff, in seconds: the wait after attempt n is `base ^ n`.
    pub backoff_base: f64,
    /// Longest backoff wait, in seconds.
    pub backoff_cap: f64,
    /// Worker threads for `worker start` without `--count`.
    pub worker_count: usize,
    /// Time limit of one attempt, in seconds; 0 means none.
    pub job_timeout: f64,
    /// How long a claim is valid without a heartbeat, in seconds. A worker that dies has its
    /// jobs recovered at most this long (plus one recovery tick) after its last heartbeat.
    pub lease_timeout: f64,
    /// How long completed jobs are kept, in seconds; 0 keeps them forever.
    pub completed_retention: f64,
    /// Bytes of a job's output kept (the tail).
    pub output_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_retries: 3,
            backoff_base: 2.0,
            backoff_cap: 3600.0,
            worker_count: 1,
            job_timeout: 30.0,
            lease_timeout: 30.0,
            completed_retention: 7.0 * 24.0 * 3600.0,
            output_limit: 64 * 1024,
        }
    }
}

/// One setting's name and meaning, for `config show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The kebab-case key.
    pub key: &'static str,
    /// What it does.
    pub description: &'static str,
}

/// Every setting, in display order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "max-retries",
        description: "failed attempts after which a job moves to the dead letter queue",
    },
    Setting {
        key: "backoff-base",
        description: "retry wait after attempt n is backoff-base ^ n seconds",
    },
    Setting {
        key: "backoff-cap",
        description: "longest retry wait, in seconds",
    },
    Setting {
        key: "worker-count",
        description: "workers started by `worker start` without --count",
    },
    Setting {
        key: "job-timeout",
        description: "seconds one attempt may run before it is killed (0: no limit)",
    },
    Setting {
        key: "lease-timeout",
        description: "seconds a silent worker keeps its jobs before they are recovered",
    },
    Setting {
        key: "completed-retention",
        description: "seconds completed jobs are kept before purging (0: forever)",
    },
    Setting {
        key: "output-limit",
        description: "bytes of each job's output that are kept",
    },
];

/// A setting that cannot be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No such key.
    #[error("unknown config key {key:?} (known keys: {})", known_keys())]
    UnknownKey {
        /// The key given.
        key: String,
    },
    /// The value does not parse or is out of range.
    #[error("invalid value {value:?} for {key}: {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What a valid value looks like.
        reason: String,
    },
}

fn known_keys() -> String {
    SETTINGS
        .iter()
        .map(|s| s.key)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Config {
    /// The value of `key`, formatted as `config set` accepts it.
    pub fn get(&self, key: &str) -> Result<String, ConfigError> {
        Ok(match key {
            "max-retries" => self.max_retries.to_string(),
            "backoff-base" => self.backoff_base.to_string(),
            "backoff-cap" => self.backoff_cap.to_string(),
            "worker-count" => self.worker_count.to_string(),
            "job-timeout" => self.job_timeout.to_string(),
            "lease-timeout" => self.lease_timeout.to_string(),
            "completed-retention" => self.completed_retention.to_string(),
            "output-limit" => self.output_limit.to_string(),
            _ => return Err(unknown(key)),
        })
    }

    /// Parses and validates `value`, then sets `key`. On error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let value = value.trim();
        let invalid = |reason: &str| ConfigError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        match key {
            "max-retries" => {
                self.max_retries = parse_int(value, 0, 1_000_000)
                    .ok_or_else(|| invalid("expected a whole number from 0 to 1000000"))?
                    as u32;
            }
            "backoff-base" => {
                self.backoff_base = parse_secs(value, 1.0, 3600.0)
                    .ok_or_else(|| invalid("expected a number from 1 to 3600"))?;
            }
            "backoff-cap" => {
                self.backoff_cap = parse_secs(value, 0.0, 365.0 * 24.0 * 3600.0)
                    .ok_or_else(|| invalid("expected seconds from 0 to 31536000"))?;
            }
            "worker-count" => {
                self.worker_count = parse_int(value, 1, 1024)
                    .ok_or_else(|| invalid("expected a whole number from 1 to 1024"))?
                    as usize;
            }
            "job-timeout" => {
                self.job_timeout = parse_secs(value, 0.0, 365.0 * 24.0 * 3600.0)
                    .ok_or_else(|| invalid("expected seconds from 0 (no limit) to 31536000"))?;
            }
            "lease-timeout" => {
                self.lease_timeout = parse_secs(value, 0.1, 24.0 * 3600.0)
                    .ok_or_else(|| invalid("expected seconds from 0.1 to 86400"))?;
            }
            "completed-retention" => {
                self.completed_retention = parse_secs(value, 0.0, 100.0 * 365.0 * 24.0 * 3600.0)
                    .ok_or_else(|| invalid("expected seconds, 0 to keep forever"))?;
            }
            "output-limit" => {
                self.output_limit = parse_int(value, 0, 64 * 1024 * 1024)
                    .ok_or_else(|| invalid("expected bytes from 0 to 67108864"))?
                    as usize;
            }
            _ => return Err(unknown(key)),
        }
        Ok(())
    }

    /// Every setting with its current value, in display order.
    pub fn entries(&self) -> Vec<(Setting, String)> {
        SETTINGS
            .iter()
            .map(|s| (*s, self.get(s.key).expect("every listed key is known")))
            .collect()
    }

    /// The backoff policy these settings describe.
    pub fn backoff(&self) -> Exponential {
        Exponential::new(self.backoff_base, Duration::from_secs_f64(self.backoff_cap))
    }

    /// The per-attempt time limit, `None` when unlimited.
    pub fn job_timeout(&self) -> Option<Duration> {
        (self.job_timeout > 0.0).then(|| Duration::from_secs_f64(self.job_timeout))
    }

    /// How long a lease lasts between heartbeats.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs_f64(self.lease_timeout)
    }

    /// How long completed jobs are kept, `None` when forever.
    pub fn completed_retention(&self) -> Option<Duration> {
        (self.completed_retention > 0.0).then(|| Duration::from_secs_f64(self.completed_retention))
    }
}

fn unknown(key: &str) -> ConfigError {
    ConfigError::UnknownKey {
        key: key.to_owned(),
    }
}

fn parse_int(value: &str, min: u64, max: u64) -> Option<u64> {
    value
        .parse::<u64>()
        .ok()
        .filter(|v| (min..=max).contains(v))
}

fn parse_secs(value: &str, min: f64, max: f64) -> Option<f64> {
    value
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && (min..=max).contains(v))
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (setting, value) in self.entries() {
            writeln!(f, "{} = {}", setting.key, value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_round_trips_through_get_and_set() {
        let mut config = Config::default();
        for setting in SETTINGS {
            let value = config.get(setting.key).unwrap();
            config.set(setting.key, &value).unwrap();
        }
        assert_eq!(config, Config::default());
    }

    #[test]
    fn set_validates_and_changes_nothing_on_error() {
        let mut config = Config::default();
        for (key, value) in [
            ("max-retries", "-1"),
            ("max-retries", "three"),
            ("backoff-base", "0.5"),
            ("backoff-base", "NaN"),
            ("worker-count", "0"),
            ("job-timeout", "-3"),
            ("lease-timeout", "0"),
            ("output-limit", "1e3"),
        ] {
            let err = config.set(key, value).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidValue { .. }),
                "{key}={value}"
            );
        }
        assert_eq!(config, Config::default());
        assert!(matches!(
            config.set("max_retries", "3"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn set_changes_the_value() {
        let mut config = Config::default();
        config.set("max-retries", "5").unwrap();
        config.set("backoff-base", "3").unwrap();
        config.set("job-timeout", "0").unwrap();
        assert_eq!(config.max_retries, 5);
        assert_eq!(config.get("backoff-base").unwrap(), "3");
        assert_eq!(config.job_timeout(), None);
    }

    #[test]
    fn serialises_with_kebab_keys_and_fills_missing_ones() {
        let json = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(json["max-retries"], 3);
        let partial: Config = serde_json::from_str(r#"{"max-retries": 7}"#).unwrap();
        assert_eq!(partial.max_retries, 7);
        assert_eq!(partial.worker_count, 1);
    }
}
