//! Settings persisted in the store, shared by every process that uses it.
//!
//! One table, [`SETTINGS`], says for every setting its key, meaning, default and valid range;
//! `get`, `set`, `config show`, the defaults and the check of a stored config are all driven
//! by it. A [`Config`] cannot hold an invalid value: its fields are private, [`Config::set`]
//! checks the range, and a stored config that is out of range fails to load with an error
//! naming the key (it never reaches a `Duration` conversion that would panic).
//!
//! The ranges that job descriptions share with the settings ([`RETRIES`], [`WORKERS`],
//! [`SECONDS`]) are public, so that `spec`, the worker pool and the command line apply the
//! same rule.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Exponential;

/// An inclusive range of numbers with what a valid value looks like, in words.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// The least valid value.
    pub min: f64,
    /// The greatest valid value.
    pub max: f64,
    /// Whether only whole numbers are valid.
    pub whole: bool,
    /// What a valid value looks like ("a whole number from 0 to 1000000").
    pub expected: &'static str,
    /// The least valid value other than 0 (0 when there is none): a time limit so short it
    /// could only be a mistake is refused rather than taken literally.
    pub least_nonzero: f64,
}

impl Range {
    /// Whether `value` is valid.
    pub fn contains(&self, value: f64) -> bool {
        value.is_finite()
            && (self.min..=self.max).contains(&value)
            && (!self.whole || value.fract() == 0.0)
            && (value == 0.0 || value >= self.least_nonzero)
    }

    /// Parses `text` as a valid value.
    fn parse(&self, text: &str) -> Option<f64> {
        let value = if self.whole {
            // "1e3" or "2.0" are not whole numbers as a user writes them.
            text.parse::<u64>().ok()? as f64
        } else {
            text.parse::<f64>().ok()?
        };
        self.contains(value).then_some(value)
    }
}

/// Failed attempts a job may have: `max-retries` and a job's `max_retries`.
pub const RETRIES: Range = Range {
    min: 0.0,
    max: 1_000_000.0,
    whole: true,
    expected: "a whole number from 0 to 1000000",
    least_nonzero: 0.0,
};

/// Jobs a worker runs at once: `worker-count`, `worker start --count` and the pool builder.
pub const WORKERS: Range = Range {
    min: 1.0,
    max: MAX_WORKERS as f64,
    whole: true,
    expected: "a whole number from 1 to 4096",
    least_nonzero: 0.0,
};

/// The most jobs a worker runs at once.
pub const MAX_WORKERS: usize = 4096;

/// A number of seconds in a job description or a time setting: 0 to one year.
pub const SECONDS: Range = Range {
    min: 0.0,
    max: 365.0 * 24.0 * 3600.0,
    whole: false,
    expected: "seconds from 0 to 31536000",
    least_nonzero: 0.0,
};

/// The largest `output-limit`: 16 MiB of output kept per job.
pub const MAX_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// The stored form: every setting by its kebab-case key. Missing keys take their defaults
/// (stores written by older versions), unknown keys are ignored (newer versions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
struct Fields {
    max_retries: u32,
    backoff_base: f64,
    backoff_cap: f64,
    worker_count: usize,
    job_timeout: f64,
    lease_timeout: f64,
    completed_retention: f64,
    output_limit: usize,
}

impl Default for Fields {
    fn default() -> Self {
        let mut fields = Fields {
            max_retries: 0,
            backoff_base: 0.0,
            backoff_cap: 0.0,
            worker_count: 0,
            job_timeout: 0.0,
            lease_timeout: 0.0,
            completed_retention: 0.0,
            output_limit: 0,
        };
        for setting in SETTINGS {
            (setting.write)(&mut fields, setting.default);
        }
        fields
    }
}

/// The queue's settings, persisted in the store. Always valid: see the [module docs](self).
///
/// Keys are kebab-case on the command line and in JSON. Changing a setting affects jobs
/// enqueued afterwards (`max-retries`, `job-timeout` are copied into each job when it is
/// enqueued) and workers started afterwards (the rest are read when a worker starts).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "Fields", into = "Fields")]
pub struct Config(Fields);

/// One setting: its key, meaning, default and valid range.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The kebab-case key.
    pub key: &'static str,
    /// What it does.
    pub description: &'static str,
    /// The value when none was set.
    pub default: f64,
    /// The valid values.
    pub range: Range,
    read: fn(&Fields) -> f64,
    write: fn(&mut Fields, f64),
}

impl PartialEq for Setting {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Setting {
    /// The default, formatted as `config set` accepts it.
    pub fn default_value(&self) -> String {
        format_value(self.default)
    }
}

const YEAR: f64 = 365.0 * 24.0 * 3600.0;

/// Every setting, in display order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "max-retries",
        description: "failed attempts after which a job moves to the dead letter queue",
        default: 3.0,
        range: RETRIES,
        read: |f| f64::from(f.max_retries),
        write: |f, v| f.max_retries = v as u32,
    },
    Setting {
        key: "backoff-base",
        description: "retry wait after attempt n is backoff-base ^ n seconds",
        default: 2.0,
        range: Range {
            min: 1.0,
            max: 3600.0,
            whole: false,
            expected: "a number from 1 to 3600",
            least_nonzero: 0.0,
        },
        read: |f| f.backoff_base,
        write: |f, v| f.backoff_base = v,
    },
    Setting {
        key: "backoff-cap",
        description: "longest retry wait, in seconds",
        default: 3600.0,
        range: SECONDS,
        read: |f| f.backoff_cap,
        write: |f, v| f.backoff_cap = v,
    },
    Setting {
        key: "worker-count",
        description: "workers started by `worker start` without --count",
        default: 1.0,
        range: WORKERS,
        read: |f| f.worker_count as f64,
        write: |f, v| f.worker_count = v as usize,
    },
    Setting {
        key: "job-timeout",
        description: "seconds one attempt may run before it is killed (0: no limit)",
        default: 30.0,
        range: Range {
            expected: "seconds: 0 (no limit), or from 0.001 to 31536000",
            least_nonzero: 0.001,
            ..SECONDS
        },
        read: |f| f.job_timeout,
        write: |f, v| f.job_timeout = v,
    },
    Setting {
        key: "lease-timeout",
        description: "seconds a silent worker keeps its jobs before they are recovered",
        default: 30.0,
        range: Range {
            min: 0.1,
            max: 24.0 * 3600.0,
            whole: false,
            expected: "seconds from 0.1 to 86400",
            least_nonzero: 0.0,
        },
        read: |f| f.lease_timeout,
        write: |f, v| f.lease_timeout = v,
    },
    Setting {
        key: "completed-retention",
        description: "seconds completed jobs are kept before purging (0: forever)",
        default: 7.0 * 24.0 * 3600.0,
        range: Range {
            min: 0.0,
            max: 100.0 * YEAR,
            whole: false,
            expected: "seconds from 0 (keep forever) to 3153600000",
            least_nonzero: 0.0,
        },
        read: |f| f.completed_retention,
        write: |f, v| f.completed_retention = v,
    },
    Setting {
        key: "output-limit",
        description: "bytes of each job's output that are kept",
        default: 64.0 * 1024.0,
        range: Range {
            min: 0.0,
            max: MAX_OUTPUT_LIMIT as f64,
            whole: true,
            expected: "bytes from 0 to 16777216",
            least_nonzero: 0.0,
        },
        read: |f| f.output_limit as f64,
        write: |f, v| f.output_limit = v as usize,
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

fn setting(key: &str) -> Result<&'static Setting, ConfigError> {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .ok_or_else(|| ConfigError::UnknownKey {
            key: key.to_owned(),
        })
}

/// A value as `config set` accepts it: whole numbers without a fraction.
fn format_value(value: f64) -> String {
    value.to_string()
}

impl TryFrom<Fields> for Config {
    type Error = ConfigError;

    /// Checks stored settings: the first one out of range is the error.
    fn try_from(fields: Fields) -> Result<Self, ConfigError> {
        for setting in SETTINGS {
            let value = (setting.read)(&fields);
            if !setting.range.contains(value) {
                return Err(ConfigError::InvalidValue {
                    key: setting.key.to_owned(),
                    value: format_value(value),
                    reason: format!("expected {}", setting.range.expected),
                });
            }
        }
        Ok(Config(fields))
    }
}

impl From<Config> for Fields {
    fn from(config: Config) -> Self {
        config.0
    }
}

impl Config {
    /// The value of `key`, formatted as `config set` accepts it.
    pub fn get(&self, key: &str) -> Result<String, ConfigError> {
        Ok(format_value((setting(key)?.read)(&self.0)))
    }

    /// Whether `config set KEY VALUE` would be accepted, whatever the settings are: a key and
    /// value are checked on their own, so a command can refuse them before it opens a store.
    pub fn check(key: &str, value: &str) -> Result<(), ConfigError> {
        Config::default().set(key, value)
    }

    /// Parses and validates `value`, then sets `key`. On error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let setting = setting(key)?;
        let text = value.trim();
        let parsed = setting
            .range
            .parse(text)
            .ok_or_else(|| ConfigError::InvalidValue {
                key: key.to_owned(),
                value: text.to_owned(),
                reason: format!("expected {}", setting.range.expected),
            })?;
        (setting.write)(&mut self.0, parsed);
        Ok(())
    }

    /// Every setting with its current value, in display order.
    pub fn entries(&self) -> Vec<(Setting, String)> {
        SETTINGS
            .iter()
            .map(|s| (*s, format_value((s.read)(&self.0))))
            .collect()
    }

    /// Failed attempts after which a job is dead.
    pub fn max_retries(&self) -> u32 {
        self.0.max_retries
    }

    /// Base of the exponential backoff, in seconds: the wait after attempt n is `base ^ n`.
    pub fn backoff_base(&self) -> f64 {
        self.0.backoff_base
    }

    /// Longest backoff wait.
    pub fn backoff_cap(&self) -> Duration {
        Duration::from_secs_f64(self.0.backoff_cap)
    }

    /// Worker threads for `worker start` without `--count`.
    pub fn worker_count(&self) -> usize {
        self.0.worker_count
    }

    /// Bytes of a job's output kept (the tail).
    pub fn output_limit(&self) -> usize {
        self.0.output_limit
    }

    /// The backoff policy these settings describe.
    pub fn backoff(&self) -> Exponential {
        Exponential::new(self.0.backoff_base, self.backoff_cap())
    }

    /// The per-attempt time limit, `None` when unlimited.
    pub fn job_timeout(&self) -> Option<Duration> {
        (self.0.job_timeout > 0.0).then(|| Duration::from_secs_f64(self.0.job_timeout))
    }

    /// How long a claim is valid without a heartbeat. A worker that dies has its jobs
    /// recovered at most this long (plus one recovery tick) after its last heartbeat.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs_f64(self.0.lease_timeout)
    }

    /// How long completed jobs are kept, `None` when forever.
    pub fn completed_retention(&self) -> Option<Duration> {
        (self.0.completed_retention > 0.0)
            .then(|| Duration::from_secs_f64(self.0.completed_retention))
    }
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
            assert_eq!(value, setting.default_value());
            config.set(setting.key, &value).unwrap();
        }
        assert_eq!(config, Config::default());
    }

    #[test]
    fn every_default_and_both_ends_of_every_range_are_valid() {
        for setting in SETTINGS {
            for value in [setting.default, setting.range.min, setting.range.max] {
                let mut config = Config::default();
                config.set(setting.key, &format_value(value)).unwrap();
                assert_eq!(config.get(setting.key).unwrap(), format_value(value));
            }
        }
    }

    #[test]
    fn set_validates_and_changes_nothing_on_error() {
        let mut config = Config::default();
        for (key, value) in [
            ("max-retries", "-1"),
            ("max-retries", "three"),
            ("max-retries", "1000001"),
            ("backoff-base", "0.5"),
            ("backoff-base", "NaN"),
            ("worker-count", "0"),
            ("worker-count", "4097"),
            ("job-timeout", "-3"),
            ("job-timeout", "0.0000001"),
            ("lease-timeout", "0"),
            ("lease-timeout", "-1"),
            ("output-limit", "1e3"),
            ("output-limit", "16777217"),
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
    fn output_limit_is_capped_at_16_mib() {
        let mut config = Config::default();
        config.set("output-limit", "16777216").unwrap();
        assert_eq!(config.output_limit(), 16 * 1024 * 1024);
        let err = config.set("output-limit", "67108864").unwrap_err();
        assert!(err.to_string().contains("16777216"), "{err}");
    }

    #[test]
    fn set_changes_the_value() {
        let mut config = Config::default();
        config.set("max-retries", "5").unwrap();
        config.set("backoff-base", "3").unwrap();
        config.set("job-timeout", "0").unwrap();
        assert_eq!(config.max_retries(), 5);
        assert_eq!(config.get("backoff-base").unwrap(), "3");
        assert_eq!(config.job_timeout(), None);
    }

    #[test]
    fn serialises_with_kebab_keys_and_fills_missing_ones() {
        let json = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(json["max-retries"], 3);
        assert_eq!(json["lease-timeout"], 30.0);
        let partial: Config = serde_json::from_str(r#"{"max-retries": 7}"#).unwrap();
        assert_eq!(partial.max_retries(), 7);
        assert_eq!(partial.worker_count(), 1);
        let back: Config = serde_json::from_value(json).unwrap();
        assert_eq!(back, Config::default());
    }

    /// A stored config is checked when it is read: an out-of-range value is an error naming
    /// the key, never a config whose durations panic later.
    #[test]
    fn a_stored_config_out_of_range_is_refused_when_read() {
        for (json, key) in [
            (r#"{"lease-timeout": -1.0}"#, "lease-timeout"),
            (r#"{"backoff-cap": 1e300}"#, "backoff-cap"),
            (r#"{"job-timeout": -0.5}"#, "job-timeout"),
            (r#"{"completed-retention": -7}"#, "completed-retention"),
            (r#"{"worker-count": 0}"#, "worker-count"),
            (r#"{"output-limit": 67108864}"#, "output-limit"),
        ] {
            let err = serde_json::from_str::<Config>(json).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(key) && text.contains("expected"),
                "{json}: {text}"
            );
        }
    }
}
