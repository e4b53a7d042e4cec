//! `stats [--since DURATION]`: what each queue did lately.

use std::io::Write;
use std::time::Duration;

use queuectl_core::stats::{QueueStats, Spread};
use queuectl_core::{Storage, now};
use serde::Serialize;

use crate::error::Result;
use crate::render;

/// What `stats --json` prints.
#[derive(Serialize)]
struct Report {
    /// The window's start and end.
    #[serde(with = "time::serde::rfc3339")]
    since: queuectl_core::Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    until: queuectl_core::Timestamp,
    queues: Vec<QueueStats>,
}

/// Prints the statistics of the last `window`.
pub fn run(store: &dyn Storage, window: Duration, json: bool, out: &mut dyn Write) -> Result {
    let until = now();
    let since = until - window;
    let queues = queuectl_core::stats::per_queue(&store.activity(since)?, since, until);
    if json {
        return render::print_json(
            out,
            &Report {
                since,
                until,
                queues,
            },
        );
    }
    if queues.is_empty() {
        writeln!(out, "nothing finished since {}", render::ts(since))?;
        return Ok(());
    }
    let mut rows = vec![
        [
            "QUEUE",
            "DONE",
            "FAILED",
            "DEAD",
            "CANCELLED",
            "PER MIN",
            "WAIT p50/p95/max",
            "RUN p50/p95/max",
        ]
        .map(str::to_owned),
    ];
    for q in &queues {
        rows.push([
            q.queue.clone(),
            q.completed.to_string(),
            q.failed_attempts.to_string(),
            q.dead.to_string(),
            q.cancelled.to_string(),
            format!("{:.2}", q.per_minute),
            spread(q.wait),
            spread(q.run),
        ]);
    }
    writeln!(
        out,
        "since {} ({})",
        render::ts(since),
        humantime::format_duration(window)
    )?;
    Ok(out.write_all(render::table(&rows).as_bytes())?)
}

fn spread(spread: Option<Spread>) -> String {
    match spread {
        Some(s) => format!("{}/{}/{}", secs(s.p50), secs(s.p95), secs(s.max)),
        None => "-".to_owned(),
    }
}

/// Seconds, short: 0.004s, 1.25s, 93s, 2h05m.
fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.3}s").replace(".000s", "s")
    } else if s < 3600.0 {
        format!("{s:.0}s")
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}
