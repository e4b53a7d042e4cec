//! The JSON description of a job, as `queuectl enqueue` accepts it.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{RETRIES, SECONDS};
use crate::job::{InvalidJob, JobId, NewJob, Timestamp};

/// A job as written by a user: `{"id": "job1", "command": "echo hi", "priority": 5}`.
///
/// Fields: `command` (required), `id`, `max_retries`, `priority`, `run_at` (RFC 3339) or
/// `delay` (seconds), `timeout` (seconds, 0 for none), `queue`, `unique_key`, `after` (an id
/// or a list of ids). Unknown fields are refused, so a typo never silently drops a setting.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique id; generated when missing.
    pub id: Option<String>,
    /// The shell command.
    pub command: Option<String>,
    /// Failed attempts before the job is dead (default: the `max-retries` setting).
    pub max_retries: Option<u32>,
    /// Higher runs first (default 0).
    pub priority: Option<i32>,
    /// Not before this instant.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub run_at: Option<Timestamp>,
    /// Not before this many seconds from now.
    pub delay: Option<f64>,
    /// Per-attempt time limit in seconds; 0 means none (default: the `job-timeout` setting).
    pub timeout: Option<f64>,
    /// The queue (default `default`).
    pub queue: Option<String>,
    /// No second job with this key while one is pending, processing or failed.
    pub unique_key: Option<String>,
    /// The job(s) that must complete first.
    pub after: Option<OneOrMany>,
}

/// One id, or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"a"`.
    One(String),
    /// `["a", "b"]`.
    Many(Vec<String>),
}

/// Why a job description was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not valid JSON, a wrong type, or an unknown field.
    #[error("invalid job JSON")]
    Json(#[source] serde_json::Error),
    /// Valid JSON, but not an object.
    #[error("a job must be a JSON object like {{\"command\": \"echo hi\"}}, not {found}")]
    NotAnObject {
        /// What was given instead: "an array", "a string", …
        found: &'static str,
    },
    /// The JSON was valid but the job is not.
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
    /// `command` is missing.
    #[error("the job has no \"command\"")]
    MissingCommand,
    /// Both `run_at` and `delay` were given.
    #[error("give either \"run_at\" or \"delay\", not both")]
    RunAtAndDelay,
    /// A number of seconds that is negative, not finite or absurdly large.
    #[error("invalid \"{field}\": {value} (expected {})", SECONDS.expected)]
    Seconds {
        /// The field.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A time limit above zero but too short to mean anything.
    #[error(
        "invalid \"{field}\": {value} seconds is too short to be a limit (use at least 0.001, or 0 for none)"
    )]
    TooShort {
        /// The field.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A `run_at` that is not between the years 0000 and 9999 in UTC, where RFC 3339 (the form
    /// jobs are shown in) cannot write it.
    #[error("invalid \"run_at\": {value} is not between the years 0000 and 9999 in UTC")]
    RunAtRange {
        /// The time given, as written.
        value: String,
    },
    /// A `max_retries` beyond the range `config set max-retries` accepts.
    #[error("invalid \"max_retries\": {value} (expected {})", RETRIES.expected)]
    Retries {
        /// The value given.
        value: u32,
    },
}

/// The shortest time limit a job may ask for: one millisecond.
pub const MIN_TIMEOUT_SECS: f64 = 0.001;

fn seconds(field: &'static str, value: f64) -> Result<Duration, SpecError> {
    if SECONDS.contains(value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(SpecError::Seconds { field, value })
    }
}

impl JobSpec {
    /// Parses one JSON object.
    pub fn parse(json: &str) -> Result<Self, SpecError> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(SpecError::Json)?;
        let found = match &value {
            // Decoded again from the text, not from `value`: a map keeps only the last of two
            // equal keys, where the struct refuses the duplicate.
            serde_json::Value::Object(_) => {
                return serde_json::from_str(json).map_err(SpecError::Json);
            }
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Null => "null",
        };
        Err(SpecError::NotAnObject { found })
    }

    /// Validates the spec and turns it into a [`NewJob`], resolving `delay` against `now`.
    /// A `timeout` of 0 means no limit, overriding the configured default.
    pub fn into_new_job(self, now: Timestamp) -> Result<NewJob, SpecError> {
        let command = self.command.ok_or(SpecError::MissingCommand)?;
        let mut job = NewJob::new(command);
        job.validate()?;
        if let Some(id) = self.id {
            job.id = Some(JobId::new(id)?);
        }
        job.max_retries = match self.max_retries {
            Some(value) if !RETRIES.contains(f64::from(value)) => {
                return Err(SpecError::Retries { value });
            }
            retries => retries,
        };
        job.priority = self.priority.unwrap_or(0);
        job.run_at = match (self.run_at, self.delay) {
            (Some(_), Some(_)) => return Err(SpecError::RunAtAndDelay),
            // Stored in UTC whatever offset it was written with.
            (Some(at), None) => Some(
                at.checked_to_offset(time::UtcOffset::UTC)
                    .filter(|utc| (0..=9999).contains(&utc.year()))
                    .ok_or_else(|| SpecError::RunAtRange {
                        value: at
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_else(|_| at.to_string()),
                    })?,
            ),
            (None, Some(delay)) => Some(now + seconds("delay", delay)?),
            (None, None) => None,
        };
        job.timeout = match self.timeout {
            // So short it could only be a mistake, and it would read as "no limit".
            Some(value) if value > 0.0 && value < MIN_TIMEOUT_SECS => {
                return Err(SpecError::TooShort {
                    field: "timeout",
                    value,
                });
            }
            timeout => timeout.map(|t| seconds("timeout", t)).transpose()?,
        };
        job.queue = self.queue;
        job.unique_key = self.unique_key;
        job.after = match self.after {
            None => Vec::new(),
            Some(OneOrMany::One(id)) => vec![JobId::new(id)?],
            Some(OneOrMany::Many(ids)) => {
                ids.into_iter().map(JobId::new).collect::<Result<_, _>>()?
            }
        };
        job.validate()?;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn queuectl_chain(err: &SpecError) -> String {
        crate::pool::error_chain(err)
    }

    fn parse(json: &str) -> Result<NewJob, SpecError> {
        JobSpec::parse(json)?.into_new_job(datetime!(2026-01-01 0:00 UTC))
    }

    #[test]
    fn queue_key_and_dependencies_are_read_and_checked() {
        let job =
            parse(r#"{"command":"x","queue":"mail","unique_key":"user-7","after":["a","b"]}"#)
                .unwrap();
        assert_eq!(job.queue_name(), "mail");
        assert_eq!(job.unique_key.as_deref(), Some("user-7"));
        assert_eq!(job.after.len(), 2);
        let one = parse(r#"{"command":"x","after":"a"}"#).unwrap();
        assert_eq!(one.after, [JobId::new("a").unwrap()]);
        assert!(matches!(
            parse(r#"{"command":"x","queue":"no spaces"}"#),
            Err(SpecError::Invalid(InvalidJob::Queue { .. }))
        ));
        assert!(matches!(
            parse(r#"{"command":"x","after":["../x"]}"#),
            Err(SpecError::Invalid(InvalidJob::Id { .. }))
        ));
        assert!(matches!(
            parse(r#"{"id":"a","command":"x","after":"a"}"#),
            Err(SpecError::Invalid(InvalidJob::OwnDependency { .. }))
        ));
    }

    #[test]
    fn full_spec_becomes_a_new_job() {
        let job = parse(
            r#"{"id":"a1","command":"echo hi","max_retries":5,"priority":-2,"delay":1.5,"timeout":10}"#,
        )
        .unwrap();
        assert_eq!(job.id.unwrap().as_str(), "a1");
        assert_eq!(job.command, "echo hi");
        assert_eq!(job.max_retries, Some(5));
        assert_eq!(job.priority, -2);
        assert_eq!(job.run_at, Some(datetime!(2026-01-01 0:00:01.5 UTC)));
        assert_eq!(job.timeout, Some(Duration::from_secs(10)));
        let at = parse(r#"{"command":"x","run_at":"2026-02-03T04:05:06Z"}"#).unwrap();
        assert_eq!(at.run_at, Some(datetime!(2026-02-03 4:05:06 UTC)));
        let offset = parse(r#"{"command":"x","run_at":"2026-02-03T06:05:06+02:00"}"#).unwrap();
        let utc = offset.run_at.unwrap();
        assert_eq!(utc, datetime!(2026-02-03 4:05:06 UTC));
        assert_eq!(utc.offset(), time::UtcOffset::UTC);
        assert_eq!(
            parse(r#"{"command":"x","timeout":0}"#).unwrap().timeout,
            Some(Duration::ZERO)
        );
        let most = parse(r#"{"command":"x","max_retries":1000000}"#).unwrap();
        assert_eq!(most.max_retries, Some(1_000_000));
    }

    /// A job description and `config set` accept the same retries.
    #[test]
    fn max_retries_follows_the_config_rule() {
        for value in [0u32, 1, 999_999, 1_000_000, 1_000_001, u32::MAX] {
            let job = parse(&format!(r#"{{"command":"x","max_retries":{value}}}"#));
            let set = crate::Config::default().set("max-retries", &value.to_string());
            assert_eq!(job.is_ok(), set.is_ok(), "max_retries {value}");
        }
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let cases = [
            ("not json", "invalid job JSON"),
            ("[1]", "not an array"),
            (
                r#"["x","echo hi",null,null,null,null,null]"#,
                "not an array",
            ),
            ("\"echo hi\"", "not a string"),
            (r#"{"id":"a"}"#, "no \"command\""),
            (r#"{"command":""}"#, "empty"),
            (r#"{"command":"x","id":"../x"}"#, "invalid job id"),
            (
                r#"{"command":"x","colour":"red"}"#,
                "unknown field `colour`",
            ),
            (r#"{"command":"x","max_retries":-1}"#, "invalid job JSON"),
            (
                r#"{"command":"x","max_retries":1000001}"#,
                "invalid \"max_retries\": 1000001 (expected a whole number from 0 to 1000000)",
            ),
            (r#"{"command":"x","priority":"high"}"#, "invalid job JSON"),
            (r#"{"command":"x","run_at":"tomorrow"}"#, "invalid job JSON"),
            (r#"{"command":"x","delay":-1}"#, "invalid \"delay\""),
            (r#"{"command":"x","timeout":1e99}"#, "invalid \"timeout\""),
            (
                r#"{"command":"x","delay":31536001}"#,
                "expected seconds from 0 to 31536000",
            ),
            (
                r#"{"command":"x","delay":1,"run_at":"2026-01-01T00:00:00Z"}"#,
                "not both",
            ),
            // In UTC the year 10000, and the year -1: no RFC 3339 time shows them.
            (
                r#"{"command":"x","run_at":"9999-12-31T23:30:00-01:00"}"#,
                "invalid \"run_at\": 9999-12-31T23:30:00-01:00 is not between the years 0000 and 9999",
            ),
            (
                r#"{"command":"x","run_at":"0000-01-01T00:30:00+01:00"}"#,
                "invalid \"run_at\": 0000-01-01T00:30:00+01:00 is not between",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(json).unwrap_err();
            let text = queuectl_chain(&err);
            assert!(text.contains(expected), "{json}: {text}");
        }
    }
}
