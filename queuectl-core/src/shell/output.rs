//! Output capture: the job's standard output and error, read as they come, of which the last
//! `output_limit` bytes (of text) are kept.

use std::fmt::Write as _;
use std::io::{self, PipeReader, Read};
use std::thread;

use crate::executor::{LiveOutput, Utf8Stream};

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

/// The last `limit` bytes of a stream's text (decoded as [`Utf8Stream`] does, as live output
/// is), and how many bytes of text before them were dropped.
#[derive(Debug)]
pub(super) struct Tail {
    limit: usize,
    decoder: Utf8Stream,
    text: String,
    dropped: u64,
    notes: Vec<String>,
}

impl Tail {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            decoder: Utf8Stream::default(),
            text: String::new(),
            dropped: 0,
            notes: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        self.decoder.decode(data, &mut self.text);
        // Dropped in bulk, not at every read: moving what is kept costs as much as keeping it.
        if self.text.len() > self.limit.saturating_mul(2).max(2 * READ_BUFFER) {
            self.trim();
        }
    }

    /// Drops what is beyond the limit (forward to a character boundary, as live output does).
    fn trim(&mut self) {
        let before = self.text.len();
        if before > self.limit {
            self.text = crate::job::tail(std::mem::take(&mut self.text), self.limit);
            self.dropped += (before - self.text.len()) as u64;
        }
    }

    /// Adds a line about the capture itself, shown after the output.
    pub(super) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The kept text, after a `[... N bytes truncated]` line if some was dropped (a
    /// character the cut split is dropped whole), followed by the notes.
    pub(super) fn render(&mut self) -> String {
        self.trim();
        let mut out = String::new();
        if self.dropped > 0 {
            let _ = write!(out, "{}{}{}", TRUNCATED.0, self.dropped, TRUNCATED.1);
        }
        out.push_str(&self.text);
        if self.decoder.cut_short() {
            // The output ended inside a character.
            out.push(char::REPLACEMENT_CHARACTER);
        }
        for note in &self.notes {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            let _ = writeln!(out, "[{note}]");
        }
        out
    }
}
