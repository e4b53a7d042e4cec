//! Human-readable output: tables and details. JSON output is serde's.

use std::fmt::Write;

use queuectl_core::{Attempt, Config, Job, QueueInfo, StateCounts, Timestamp, WorkerInfo};
use serde::Serialize;

use crate::error::{CliError, Result};
use time::format_description::well_known::Rfc3339;

/// A timestamp to the second, e.g. `2026-11-29T04:13:29Z`.
pub fn ts(at: Timestamp) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// `text` with every control character but newline shown as an escape (`\x1b`, `\u{9b}`), so
/// job text cannot move the cursor, clear the screen or retitle the terminal of whoever looks
/// at it. JSON output keeps the bytes; this is only for what people read.
pub fn visible(text: &str) -> String {
    escape(text, true)
}

/// [`visible`] for one-line fields: a newline is escaped too, so a command cannot fake the
/// lines after it.
pub fn one_line(text: &str) -> String {
    escape(text, false)
}

/// Whether `c` reorders the text around it (bidirectional overrides and isolates).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(text: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' if keep_newlines => out.push('\n'),
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn cut(text: &str, width: usize) -> String {
    let one_line = text.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= width {
        one_line
    } else {
        let kept: String = one_line.chars().take(width.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

/// One row per job; nothing for no jobs (the caller says so on stderr: stdout carries data).
pub fn job_table(jobs: &[Job]) -> String {
    if jobs.is_empty() {
        return String::new();
    }
    let mut rows = vec![[
        "ID".to_owned(),
        "QUEUE".to_owned(),
        "STATE".to_owned(),
        "ATTEMPTS".to_owned(),
        "PRIORITY".to_owned(),
        "UPDATED".to_owned(),
        "COMMAND".to_owned(),
    ]];
    for job in jobs {
        let state = if job.blocked {
            format!("{} (after)", job.state)
        } else {
            job.state.to_string()
        };
        rows.push([
            job.id.to_string(),
            job.queue.clone(),
            state,
            format!("{}/{}", job.attempts, job.max_retries),
            job.priority.to_string(),
            ts(job.updated_at),
            cut(&one_line(&job.command), 60),
        ]);
    }
    table(&rows)
}

/// One row per queue.
pub fn queue_table(queues: &[QueueInfo]) -> String {
    if queues.is_empty() {
        return "no queues\n".to_owned();
    }
    let mut rows = vec![
        [
            "QUEUE", "STATE", "LIMIT", "PENDING", "RUNNING", "FAILED", "DEAD", "DONE",
        ]
        .map(str::to_owned),
    ];
    for queue in queues {
        let c = &queue.counts;
        rows.push([
            queue.name.clone(),
            if queue.paused { "paused" } else { "running" }.to_owned(),
            if queue.limit == 0 {
                "-".to_owned()
            } else {
                queue.limit.to_string()
            },
            c.pending.to_string(),
            c.processing.to_string(),
            c.failed.to_string(),
            c.dead.to_string(),
            c.completed.to_string(),
        ]);
    }
    table(&rows)
}

/// Rows as left-aligned columns two spaces apart (the last column unpadded).
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Every field of one job, then its attempts.
pub fn job_detail(job: &Job, attempts: &[Attempt]) -> String {
    let mut text = String::new();
    let mut field = |name: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(text, "{name:<12} {value}");
    };
    field("id", &job.id);
    field("command", &one_line(&job.command));
    field("state", &job.state);
    field(
        "attempts",
        &format!("{} of {}", job.attempts, job.max_retries),
    );
    field("queue", &job.queue);
    field("priority", &job.priority);
    if let Some(key) = &job.unique_key {
        field("unique key", &one_line(key));
    }
    if !job.after.is_empty() {
        let ids: Vec<&str> = job.after.iter().map(|id| id.as_str()).collect();
        let waiting = if job.blocked { " (waiting)" } else { "" };
        field("after", &format!("{}{waiting}", ids.join(", ")));
    }
    field("created", &ts(job.created_at));
    field("updated", &ts(job.updated_at));
    field("run at", &ts(job.run_at));
    let timeout = job
        .timeout
        .map(|t| format!("{}s", t.as_secs_f64()))
        .unwrap_or_else(|| "none".into());
    field("timeout", &timeout);
    if let Some(at) = job.started_at {
        field("started", &ts(at));
    }
    if let Some(at) = job.finished_at {
        field("finished", &ts(at));
    }
    if let Some(lease) = &job.lease {
        field(
            "worker",
            &format!(
                "{} (lease until {})",
                one_line(&lease.worker),
                ts(lease.expires_at)
            ),
        );
    }
    if let Some(code) = job.exit_code {
        field("exit code", &code);
    }
    if let Some(error) = &job.last_error {
        field("last error", &one_line(error));
    }
    if let Some(output) = &job.output {
        let _ = writeln!(text, "output:");
        for line in visible(output).lines() {
            let _ = writeln!(text, "  {line}");
        }
    }
    if !attempts.is_empty() {
        let _ = writeln!(text, "attempts:");
    }
    for attempt in attempts {
        let mut line = format!(
            "  #{:<3} {:<9} {} on {}",
            attempt.number,
            attempt.outcome,
            ts(attempt.started_at),
            one_line(&attempt.worker)
        );
        if let Some(at) = attempt.finished_at {
            let took = (at - attempt.started_at).as_seconds_f64();
            let _ = write!(line, ", {took:.3}s");
        }
        if let Some(code) = attempt.exit_code {
            let _ = write!(line, ", exit {code}");
        }
        if let Some(signal) = attempt.signal {
            let _ = write!(line, ", signal {signal}");
        }
        if let Some(error) = &attempt.error {
            let _ = write!(line, ": {}", cut(&one_line(error), 100));
        }
        let _ = writeln!(text, "{line}");
    }
    text
}

/// Counts, queues, workers and settings.
pub fn status(
    counts: &StateCounts,
    queues: &[QueueInfo],
    workers: &[WorkerInfo],
    config: &Config,
) -> String {
    let mut text = String::from("Jobs\n");
    for state in queuectl_core::JobState::ALL {
        let _ = writeln!(text, "  {:<12} {}", state.as_str(), counts.get(state));
    }
    let _ = writeln!(text, "  {:<12} {}", "total", counts.total());
    let only_default = queues.len() == 1
        && queues[0].name == queuectl_core::DEFAULT_QUEUE
        && !queues[0].paused
        && queues[0].limit == 0;
    if !queues.is_empty() && !only_default {
        text.push_str("\nQueues\n");
        for line in queue_table(queues).lines() {
            let _ = writeln!(text, "  {line}");
        }
    }
    let slots: usize = workers.iter().map(|w| w.concurrency).sum();
    let _ = writeln!(
        text,
        "\nWorkers: {slots} (running up to {slots} job(s) at once) in {} process(es)",
        workers.len()
    );
    for worker in workers {
        let stopping = if worker.stop_requested {
            "  (stopping)"
        } else {
            ""
        };
        let queues = if worker.queues.is_empty() {
            String::new()
        } else {
            format!(", queues {}", worker.queues.join(", "))
        };
        let _ = writeln!(
            text,
            "  {}  pid {} on {}, {} at once{queues}, since {}, seen {}{stopping}",
            one_line(&worker.id),
            worker.pid,
            one_line(&worker.hostname),
            worker.concurrency,
            ts(worker.started_at),
            ts(worker.last_seen),
        );
    }
    text.push_str("\nConfiguration\n");
    text.push_str(&self::config(config));
    text
}

/// Every setting and its value.
pub fn config(config: &Config) -> String {
    let mut text = String::new();
    for (setting, value) in config.entries() {
        let _ = writeln!(
            text,
            "  {:<20} {:<10} {}",
            setting.key, value, setting.description
        );
    }
    text
}

/// Writes `value` as pretty JSON and a newline: all a `--json` command prints.
pub fn print_json(out: &mut dyn std::io::Write, value: &impl Serialize) -> Result {
    serde_json::to_writer_pretty(&mut *out, value).map_err(|e| CliError::Output(e.into()))?;
    writeln!(out)?;
    Ok(())
}
