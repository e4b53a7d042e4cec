//! Output capture: the job's standard output and error, read as they come, of which the last
//! `output_limit` bytes are kept.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, PipeReader, Read};
use std::thread;

use crate::executor::LiveOutput;

/// The read end of the job's output pipe and what has been read from it. It is read by the
/// attempt's own thread whenever it polls readable, so that a chatty job never blocks on a
/// full pipe.
pub(super) struct Output {
    /// `None` once every writer has closed the pipe (or reading it failed).
    pub(super) pipe: Option<PipeReader>,
    pub(super) tail: Tail,
    /// Where the output goes as it comes, for the pool to record while the attempt runs.
    live: Option<LiveOutput>,
}

/// The line a rendered output starts with when its beginning was dropped: these around the
/// number of bytes dropped.
const TRUNCATED: (&str, &str) = ("[... ", " bytes truncated]\n");

/// Where the output kept in `rendered` (made by [`Tail::render`]) starts in the whole output:
/// how many bytes were dropped before it, and the length of the line saying so (0 and 0 when
/// nothing was dropped).
pub(crate) fn kept_from(rendered: &str) -> (u64, usize) {
    let dropped = rendered.strip_prefix(TRUNCATED.0).and_then(|rest| {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let count = rest[..digits].parse::<u64>().ok()?;
        rest[digits..].starts_with(TRUNCATED.1).then(|| {
            let line = TRUNCATED.0.len() + digits + TRUNCATED.1.len();
            (count, line)
        })
    });
    dropped.unwrap_or((0, 0))
}

/// Size of the buffer the output is read into.
const READ_BUFFER: usize = 16 * 1024;

impl Output {
    pub(super) fn new(pipe: PipeReader, limit: usize, live: Option<&LiveOutput>) -> Self {
        if let Some(live) = live {
            live.set_limit(limit);
        }
        Self {
            pipe: Some(pipe),
            tail: Tail::new(limit),
            live: live.cloned(),
        }
    }

    /// Reads once from the pipe, which must have polled readable (or closed), so that the
    /// read does not block.
    pub(super) fn read(&mut self) {
        let Some(pipe) = &mut self.pipe else {
            return;
        };
        let mut buf = [0; READ_BUFFER];
        match pipe.read(&mut buf) {
            Ok(0) => self.pipe = None,
            Ok(n) => {
                self.tail.push(&buf[..n]);
                if let Some(live) = &self.live {
                    live.write(&buf[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                self.tail.note(format!("reading the output failed: {e}"));
                self.pipe = None;
            }
        }
    }

    /// Stops capturing. A process that escaped the group still holds the pipe: a thread
    /// reads and discards what it writes until it closes it, so that it does not get `EPIPE`
    /// or `SIGPIPE` for the attempt having ended.
    pub(super) fn abandon(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            // Should the thread not start, the pipe merely closes.
            let _ = thread::Builder::new()
                .name("queuectl-job-output".into())
                .spawn(move || io::copy(&mut pipe, &mut io::sink()));
        }
    }
}

/// The last `limit` bytes of a stream, and how many bytes before them were dropped.
#[derive(Debug)]
pub(super) struct Tail {
    limit: usize,
    bytes: VecDeque<u8>,
    dropped: u64,
    notes: Vec<String>,
}

impl Tail {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            bytes: VecDeque::new(),
            dropped: 0,
            notes: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        let skip = data.len().saturating_sub(self.limit);
        let data = &data[skip..];
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.limit);
        self.bytes.drain(..overflow);
        self.bytes.extend(data);
        self.dropped += (skip + overflow) as u64;
    }

    /// Adds a line about the capture itself, shown after the output.
    pub(super) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The kept bytes as lossy UTF-8, after a `[... N bytes truncated]` line if bytes were
    /// dropped, followed by the notes.
    pub(super) fn render(&self) -> String {
        let mut kept: Vec<u8> = self.bytes.iter().copied().collect();
        let mut dropped = self.dropped;
        if dropped > 0 {
            // The cut may have split a character: drop its orphaned continuation bytes rather
            // than render them as replacement characters.
            let orphans = kept
                .iter()
                .take(3)
                .take_while(|&&b| b & 0xc0 == 0x80)
                .count();
            kept.drain(..orphans);
            dropped += orphans as u64;
        }
        let mut out = String::new();
        if dropped > 0 {
            let _ = write!(out, "{}{dropped}{}", TRUNCATED.0, TRUNCATED.1);
        }
        out.push_str(&String::from_utf8_lossy(&kept));
        for note in &self.notes {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            let _ = writeln!(out, "[{note}]");
        }
        out
    }
}
