//! The reader of the journal format of version 1 (a `snapshot` and a `journal` of framed,
//! checksummed JSON records), kept only to import such a store into the database once.
//!
//! A frame is `[u32 LE length][u32 LE crc32 of length and body][length bytes of JSON]`; the
//! first record of each file is a header naming the file's kind and generation. The journal
//! replays on top of the snapshot of its generation; a journal older than the snapshot is
//! stale (a compaction stopped between its two renames) and adds nothing. A torn last journal
//! record is the remains of an append that never returned, and is dropped; any other damage is
//! corruption.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::Config;
use crate::error::{Result, StorageError};
use crate::job::{Job, JobId};
use crate::storage::WorkerInfo;

/// The only format version there was.
const FORMAT_VERSION: u32 = 1;
const JOURNAL: &str = "journal";
const SNAPSHOT: &str = "snapshot";
const LOCK: &str = "lock";
const TEMP_PREFIX: &str = ".tmp-";
/// Where the old files go once their contents are in the database.
pub(super) const MOVED_ASIDE: &str = "imported-v1";
/// Longest record body the format allowed.
const MAX_RECORD: u32 = 1 << 30;
const FRAME_HEADER: usize = 8;

/// Whether `name` in a store directory belongs to a version 1 store: `Some(true)` for the
/// files holding its data, `Some(false)` for its lock, temporary files and the directory the
/// import moves them to, `None` for anything else.
pub(super) fn is_store_file(name: &str) -> Option<bool> {
    match name {
        JOURNAL | SNAPSHOT => Some(true),
        LOCK | MOVED_ASIDE => Some(false),
        _ if name.starts_with(TEMP_PREFIX) => Some(false),
        _ => None,
    }
}

/// Whether `dir` still holds the data files of a version 1 store.
pub(super) fn has_data(dir: &Path) -> bool {
    dir.join(JOURNAL).exists() || dir.join(SNAPSHOT).exists()
}

/// Whether `path` is a regular file that starts with a version 1 header (of any version
/// number, so a newer one is refused by the reader with its number, not taken for a stranger).
pub(super) fn is_v1_file(path: &Path) -> bool {
    use std::io::Read;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let mut start = vec![0u8; 4096];
    let read = File::open(path).and_then(|mut f| f.read(&mut start));
    let Ok(n) = read else { return false };
    match read_frame(&start[..n]) {
        Frame::Record { body, .. } => serde_json::from_slice::<FormatProbe>(body).is_ok(),
        // A header longer than what was read: judge by its start.
        Frame::Torn(_) => start[FRAME_HEADER.min(n)..n].starts_with(b"{\"header\""),
        _ => false,
    }
}

/// What identifies the data files in `dir`: their sizes and modification times. Recorded by
/// the import, compared before moving files aside later.
pub(super) fn fingerprint(dir: &Path) -> Result<String> {
    let mut parts = Vec::new();
    for name in [SNAPSHOT, JOURNAL] {
        let path = dir.join(name);
        match fs::metadata(&path) {
            Ok(meta) => {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                parts.push(format!("{name} {} bytes @{modified}", meta.len()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::Io {
                    op: "look at",
                    path,
                    source,
                });
            }
        }
    }
    Ok(format!("journal format 1: {}", parts.join(", ")))
}

/// Everything a version 1 store held.
#[derive(Debug, Default)]
pub(super) struct LegacyStore {
    /// Jobs in enqueue order (by their sequence number).
    pub jobs: Vec<Job>,
    /// The settings.
    pub config: Config,
    /// Registered workers.
    pub workers: Vec<WorkerInfo>,
    /// A torn last record that was dropped, in words.
    pub dropped_tail: Option<String>,
    /// The files read, as [`fingerprint`] describes them.
    pub fingerprint: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    Put { job: Job },
    Remove { id: JobId },
    Config { config: Config },
    PutWorker { worker: WorkerInfo },
    RemoveWorker { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FileKind {
    Journal,
    Snapshot,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Header {
        format: u32,
        file: FileKind,
        generation: u64,
    },
    Batch(Vec<Change>),
    End {
        changes: u64,
    },
}

#[derive(Deserialize)]
struct FormatProbe {
    header: VersionProbe,
}

#[derive(Deserialize)]
struct VersionProbe {
    format: u32,
}

/// The state being rebuilt.
#[derive(Default)]
struct Replay {
    jobs: BTreeMap<JobId, Job>,
    config: Config,
    workers: BTreeMap<String, WorkerInfo>,
}

impl Replay {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Put { job } => {
                self.jobs.insert(job.id.clone(), job);
            }
            Change::Remove { id } => {
                self.jobs.remove(&id);
            }
            Change::Config { config } => self.config = config,
            Change::PutWorker { worker } => {
                self.workers.insert(worker.id.clone(), worker);
            }
            Change::RemoveWorker { id } => {
                self.workers.remove(&id);
            }
        }
    }
}

fn corrupt(path: &Path, offset: usize, reason: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt {
        path: path.to_owned(),
        reason: format!("{reason} (at byte offset {offset})"),
    }
}

/// What the bytes at a record boundary hold.
enum Frame<'a> {
    End,
    Record {
        body: &'a [u8],
        next: usize,
    },
    /// Damage an interrupted append explains: a prefix of one record, then maybe zero fill.
    Torn(String),
    Corrupt(String),
}

fn checksum(len: u32, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Whether `bytes` can be the start of a record body: JSON text (no control bytes), then
/// possibly zero fill. A following frame header has a control byte in its length field.
fn is_body_prefix(bytes: &[u8]) -> bool {
    match bytes.iter().position(|&b| b < 0x20) {
        Some(i) => all_zero(&bytes[i..]),
        None => true,
    }
}

fn read_frame(buf: &[u8]) -> Frame<'_> {
    if buf.is_empty() {
        return Frame::End;
    }
    if buf.len() < FRAME_HEADER {
        return Frame::Torn(format!("record header cut off after {} bytes", buf.len()));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let (len, crc) = (word(0), word(4));
    if len == 0 || len > MAX_RECORD {
        return if all_zero(buf) {
            Frame::Torn("zero-filled tail".to_owned())
        } else {
            Frame::Corrupt(format!("impossible record length {len}"))
        };
    }
    let end = FRAME_HEADER + len as usize;
    if end > buf.len() {
        return if is_body_prefix(&buf[FRAME_HEADER..]) {
            Frame::Torn(format!("record of {len} bytes cut off"))
        } else {
            Frame::Corrupt(format!("record length {len} runs past the end of the file"))
        };
    }
    let body = &buf[FRAME_HEADER..end];
    if checksum(len, body) != crc {
        return if all_zero(&buf[end..]) {
            Frame::Torn("checksum mismatch in the last record".to_owned())
        } else {
            Frame::Corrupt("checksum mismatch".to_owned())
        };
    }
    Frame::Record { body, next: end }
}

/// A file's records with their offsets, and the torn tail dropped (in words).
type Records = (Vec<(usize, Record)>, Option<String>);

/// The records of a file: `(offset, record)` in order, and the torn tail (if `tolerate_torn`).
fn records(bytes: &[u8], path: &Path, tolerate_torn: bool) -> Result<Records> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        match read_frame(&bytes[pos..]) {
            Frame::End => return Ok((out, None)),
            Frame::Record { body, next } => {
                let record = serde_json::from_slice(body)
                    .map_err(|e| corrupt(path, pos, format!("undecodable record: {e}")))?;
                out.push((pos, record));
                pos += next;
            }
            Frame::Torn(reason) if tolerate_torn && pos > 0 => {
                return Ok((out, Some(format!("{reason} at byte offset {pos}"))));
            }
            Frame::Torn(reason) | Frame::Corrupt(reason) => return Err(corrupt(path, pos, reason)),
        }
    }
}

/// Checks the header (the first record) and returns the file's generation.
fn header(bytes: &[u8], records: &[(usize, Record)], path: &Path, kind: FileKind) -> Result<u64> {
    let first = match read_frame(bytes) {
        Frame::Record { body, .. } => body,
        _ => return Err(corrupt(path, 0, "no header")),
    };
    let probe: FormatProbe = serde_json::from_slice(first)
        .map_err(|e| corrupt(path, 0, format!("not a queuectl store header: {e}")))?;
    if probe.header.format != FORMAT_VERSION {
        return Err(StorageError::UnsupportedFormat {
            path: path.to_owned(),
            found: probe.header.format,
            supported: FORMAT_VERSION,
        });
    }
    match records.first() {
        Some((
            _,
            Record::Header {
                format: FORMAT_VERSION,
                file,
                generation,
            },
        )) if *file == kind => Ok(*generation),
        _ => Err(corrupt(path, 0, format!("expected a {kind:?} header"))),
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the version 1 store in `dir`.
pub(super) fn read_store(dir: &Path) -> Result<LegacyStore> {
    let fingerprint = fingerprint(dir)?;
    let mut state = Replay::default();
    let snapshot_path = dir.join(SNAPSHOT);
    let mut generation = 0;
    if let Some(bytes) = read(&snapshot_path)? {
        let (records, _) = records(&bytes, &snapshot_path, false)?;
        generation = header(&bytes, &records, &snapshot_path, FileKind::Snapshot)?;
        let mut count = 0;
        let mut ended = false;
        for (offset, record) in records.into_iter().skip(1) {
            match record {
                Record::Batch(changes) if !ended => {
                    count += changes.len() as u64;
                    changes.into_iter().for_each(|c| state.apply(c));
                }
                Record::End { changes } if !ended && changes == count => ended = true,
                _ => return Err(corrupt(&snapshot_path, offset, "unexpected record")),
            }
        }
        if !ended {
            return Err(corrupt(&snapshot_path, bytes.len(), "no end record"));
        }
    }
    let journal_path = dir.join(JOURNAL);
    let mut dropped_tail = None;
    if let Some(bytes) = read(&journal_path)? {
        let (records, torn) = records(&bytes, &journal_path, true)?;
        let journal_generation = header(&bytes, &records, &journal_path, FileKind::Journal)?;
        if journal_generation > generation {
            return Err(corrupt(
                &journal_path,
                0,
                format!("journal generation {journal_generation} is newer than the snapshot's"),
            ));
        }
        if journal_generation == generation {
            for (offset, record) in records.into_iter().skip(1) {
                match record {
                    Record::Batch(changes) => changes.into_iter().for_each(|c| state.apply(c)),
                    _ => return Err(corrupt(&journal_path, offset, "unexpected record")),
                }
            }
            dropped_tail = torn;
        }
    }
    let mut jobs: Vec<Job> = state.jobs.into_values().collect();
    jobs.sort_by_key(|job| job.seq);
    Ok(LegacyStore {
        jobs,
        config: state.config,
        workers: state.workers.into_values().collect(),
        dropped_tail,
        fingerprint,
    })
}

/// Holds the version 1 store's lock, so a worker of the old version still running on it cannot
/// append while its contents are imported.
pub(super) fn lock(dir: &Path) -> Result<Option<File>> {
    let path = dir.join(LOCK);
    match File::options().read(true).write(true).open(&path) {
        Ok(file) => {
            file.lock().map_err(|source| StorageError::Io {
                op: "lock",
                path: path.clone(),
                source,
            })?;
            Ok(Some(file))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io {
            op: "open",
            path,
            source,
        }),
    }
}

/// Moves the version 1 files into [`MOVED_ASIDE`] (after their import committed), and returns
/// where they went.
pub(super) fn move_aside(dir: &Path) -> Result<PathBuf> {
    let target = dir.join(MOVED_ASIDE);
    let io_error = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| StorageError::Io { op, path, source }
    };
    match fs::create_dir(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create", &target)(e)),
    }
    for name in [SNAPSHOT, JOURNAL, LOCK] {
        let from = dir.join(name);
        if from.exists() {
            // Never over an earlier file moved there: the first free name.
            let mut to = target.join(name);
            let mut n = 1;
            while to.exists() {
                to = target.join(format!("{name}.{n}"));
                n += 1;
            }
            fs::rename(&from, &to).map_err(io_error("move aside", &from))?;
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync", dir))?;
    Ok(target)
}
