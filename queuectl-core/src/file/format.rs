//! The on-disk format: framed, checksummed JSON records (documented in `docs/file-format.md`).
//!
//! A frame is `[u32 LE length][u32 LE crc32][length bytes of JSON]`, the checksum covering the
//! length bytes and the body. The first record of every file is a [`Record::Header`].

use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::RecoveryWarning;
use crate::error::{Result, StorageError};
use crate::state::{Change, QueueState};

/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes before each record body: length and checksum.
pub(super) const FRAME_HEADER: usize = 8;

/// Longest record body accepted: a larger length field is damage, not a record.
const MAX_RECORD: u32 = 1 << 30;

/// Changes per record in a snapshot (bounds the memory one record needs to decode).
const SNAPSHOT_CHUNK: usize = 1024;

/// Which file a header belongs to, so swapped or misnamed files are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum FileKind {
    Journal,
    Snapshot,
}

/// One record body. Externally tagged (`{"batch":[...]}`), which serde decodes in one pass.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Record {
    /// First record of every file.
    Header {
        format: u32,
        file: FileKind,
        generation: u64,
    },
    /// The changes of one operation (journal) or a chunk of the state (snapshot), applied all
    /// or nothing.
    Batch(Vec<Change>),
    /// Last record of a snapshot: how many changes it holds.
    End { changes: u64 },
}

impl Record {
    fn kind(&self) -> &'static str {
        match self {
            Record::Header { .. } => "header",
            Record::Batch(_) => "batch",
            Record::End { .. } => "end",
        }
    }
}

/// Reads just the format version of a header, whatever else a future version puts in it.
#[derive(Deserialize)]
struct FormatProbe {
    header: VersionProbe,
}

#[derive(Deserialize)]
struct VersionProbe {
    format: u32,
}

fn checksum(len: u32, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// Appends `record`, framed, to `out`.
pub(super) fn encode(record: &Record, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    serde_json::to_writer(&mut *out, record)?;
    let len = u32::try_from(out.len() - start - FRAME_HEADER)
        .ok()
        .filter(|&len| len <= MAX_RECORD)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record exceeds 1 GiB"))?;
    let crc = checksum(len, &out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The framed header record of a `file` of `generation`.
pub(super) fn header(file: FileKind, generation: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(
        &Record::Header {
            format: FORMAT_VERSION,
            file,
            generation,
        },
        &mut out,
    )?;
    Ok(out)
}

/// What the bytes at a record boundary hold.
enum Frame<'a> {
    /// No bytes left: a clean end.
    End,
    /// A record whose checksum matches; `next` is its framed length.
    Record { body: &'a [u8], next: usize },
    /// A bad frame that can only be an interrupted append: nothing but (a prefix of) this one
    /// record, possibly followed by zero fill, runs to the end of the file.
    Torn(String),
    /// A bad frame that an interrupted append cannot explain.
    Corrupt(String),
}

/// Decodes the frame at the start of `buf` (which runs to the end of the file).
///
/// The torn/corrupt distinction is the recovery rule of `docs/file-format.md`: an append writes
/// one whole frame at the end of the file, so an interrupted one leaves a prefix of it. A prefix
/// of a body contains no byte below 0x20 (compact JSON escapes control characters), while a
/// following frame header does (the high byte of its length is below 0x20 for any frame under
/// 512 MiB), so a damaged length field that claims to run
/// over later records is caught instead of swallowing them as a "tail".
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
        let present = &buf[FRAME_HEADER..];
        return if is_body_prefix(present) {
            Frame::Torn(format!(
                "record of {len} bytes cut off after {} bytes",
                present.len()
            ))
        } else {
            Frame::Corrupt(format!(
                "record length {len} runs past the end of the file over other data"
            ))
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

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Whether `bytes` can be the start of a record body: JSON text, then possibly zero fill.
fn is_body_prefix(bytes: &[u8]) -> bool {
    match bytes.iter().position(|&b| b < 0x20) {
        Some(i) => all_zero(&bytes[i..]),
        None => true,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.to_owned(),
        offset,
        reason: reason.into(),
    }
}

fn decode(body: &[u8], path: &Path, offset: u64) -> Result<Record> {
    serde_json::from_slice(body)
        .map_err(|e| corrupt(path, offset, format!("undecodable record: {e}")))
}

/// Reads the header at the start of `bytes`: the file's generation and where its records start.
pub(super) fn read_header(bytes: &[u8], path: &Path, expected: FileKind) -> Result<(u64, usize)> {
    let (body, next) = match read_frame(bytes) {
        Frame::Record { body, next } => (body, next),
        Frame::End => return Err(corrupt(path, 0, "empty file, expected a header")),
        Frame::Torn(reason) | Frame::Corrupt(reason) => return Err(corrupt(path, 0, reason)),
    };
    let probe: FormatProbe = serde_json::from_slice(body)
        .map_err(|e| corrupt(path, 0, format!("not a queuectl store header: {e}")))?;
    if probe.header.format != FORMAT_VERSION {
        return Err(StorageError::UnsupportedFormat {
            path: path.to_owned(),
            found: probe.header.format,
            supported: FORMAT_VERSION,
        });
    }
    match decode(body, path, 0)? {
        Record::Header {
            file, generation, ..
        } if file == expected => Ok((generation, next)),
        other => Err(corrupt(
            path,
            0,
            format!(
                "expected a {expected:?} header, found a {} record",
                other.kind()
            ),
        )),
    }
}

/// Why a run of whole frames stopped.
enum Stop {
    End,
    Torn(String),
    Corrupt(String),
}

/// The whole, checksummed frames at the start of `bytes` (offset and body), where they stop,
/// and why.
fn frames(bytes: &[u8]) -> (Vec<(usize, &[u8])>, usize, Stop) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let stop = match read_frame(&bytes[pos..]) {
            Frame::Record { body, next } => {
                frames.push((pos, body));
                pos += next;
                continue;
            }
            Frame::End => Stop::End,
            Frame::Torn(reason) => Stop::Torn(reason),
            Frame::Corrupt(reason) => Stop::Corrupt(reason),
        };
        return (frames, pos, stop);
    }
}

/// Below this many bytes, records are decoded on the calling thread.
const PARALLEL_DECODE_BYTES: usize = 1 << 20;

/// Decodes `frames` (offsets relative to `base`), in order. Large runs (opening a store) are
/// split over threads: decoding JSON is most of the cost of opening, and records are
/// independent; only applying them must be sequential.
fn decode_all(frames: &[(usize, &[u8])], base: u64, path: &Path) -> Result<Vec<Record>> {
    let decode_part = |part: &[(usize, &[u8])]| -> Result<Vec<Record>> {
        part.iter()
            .map(|&(pos, body)| decode(body, path, base + pos as u64))
            .collect()
    };
    let bytes: usize = frames.iter().map(|(_, body)| body.len()).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if bytes < PARALLEL_DECODE_BYTES || threads < 2 || frames.len() < 2 {
        return decode_part(frames);
    }
    let chunk = frames.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = frames
            .chunks(chunk)
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("queuectl-decode".into())
                    .spawn_scoped(scope, move || decode_part(part));
                // No thread to be had: decode this part here.
                spawned.map_err(|_| part)
            })
            .collect();
        let mut records = Vec::with_capacity(frames.len());
        for part in parts {
            let decoded = match part {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(part) => decode_part(part),
            };
            records.extend(decoded?);
        }
        Ok(records)
    })
}

/// How far a journal replay got.
pub(super) struct Replay {
    /// File offset just past the last whole record.
    pub end: u64,
    /// The torn record dropped at the end, if any.
    pub torn: Option<RecoveryWarning>,
}

/// Applies the journal records in `bytes`, read from `path` at file offset `base`, to `state`.
///
/// Each record is decoded whole before any of its changes is applied, so an operation is
/// replayed all or nothing.
pub(super) fn replay_journal(
    bytes: &[u8],
    base: u64,
    path: &Path,
    state: &mut QueueState,
) -> Result<Replay> {
    let (frames, stop_pos, stop) = frames(bytes);
    let records = decode_all(&frames, base, path)?;
    let end = base + stop_pos as u64;
    let torn = match stop {
        Stop::End => None,
        Stop::Torn(reason) => Some(RecoveryWarning {
            path: path.to_owned(),
            offset: end,
            bytes: (bytes.len() - stop_pos) as u64,
            reason,
        }),
        Stop::Corrupt(reason) => return Err(corrupt(path, end, reason)),
    };
    for (&(pos, _), record) in frames.iter().zip(records) {
        match record {
            Record::Batch(changes) => changes.into_iter().for_each(|c| state.apply(c)),
            other => {
                let reason = format!("unexpected {} record in a journal", other.kind());
                return Err(corrupt(path, base + pos as u64, reason));
            }
        }
    }
    Ok(Replay { end, torn })
}

/// Loads a whole snapshot into `state`; returns its generation. A snapshot is only ever
/// published complete (temp file, fsync, rename), so any damage is corruption.
pub(super) fn load_snapshot(bytes: &[u8], path: &Path, state: &mut QueueState) -> Result<u64> {
    let (generation, start) = read_header(bytes, path, FileKind::Snapshot)?;
    let (frames, stop_pos, stop) = frames(&bytes[start..]);
    let base = start as u64;
    let records = decode_all(&frames, base, path)?;
    let end = base + stop_pos as u64;
    if let Stop::Torn(reason) | Stop::Corrupt(reason) = stop {
        return Err(corrupt(path, end, reason));
    }
    let last = records.len().checked_sub(1);
    let mut count = 0u64;
    for (i, (&(pos, _), record)) in frames.iter().zip(records).enumerate() {
        let offset = base + pos as u64;
        match record {
            Record::Batch(changes) if Some(i) != last => {
                count += changes.len() as u64;
                changes.into_iter().for_each(|c| state.apply(c));
            }
            Record::End { changes } if Some(i) == last => {
                if changes != count {
                    let reason = format!("end record counts {changes} changes, found {count}");
                    return Err(corrupt(path, offset, reason));
                }
                return Ok(generation);
            }
            Record::Batch(_) => break,
            other => {
                let reason = format!("unexpected {} record in a snapshot", other.kind());
                return Err(corrupt(path, offset, reason));
            }
        }
    }
    Err(corrupt(path, end, "snapshot ends without its end record"))
}

/// Writes a complete snapshot of `changes` for `generation`; returns the bytes written.
pub(super) fn write_snapshot(
    out: &mut impl Write,
    generation: u64,
    changes: Vec<Change>,
) -> io::Result<u64> {
    let total = changes.len() as u64;
    let mut buf = header(FileKind::Snapshot, generation)?;
    let mut written = 0u64;
    let mut changes = changes.into_iter().peekable();
    while changes.peek().is_some() {
        let chunk = changes.by_ref().take(SNAPSHOT_CHUNK).collect();
        encode(&Record::Batch(chunk), &mut buf)?;
        out.write_all(&buf)?;
        written += buf.len() as u64;
        buf.clear();
    }
    encode(&Record::End { changes: total }, &mut buf)?;
    out.write_all(&buf)?;
    Ok(written + buf.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(record: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        encode(record, &mut out).unwrap();
        out
    }

    #[test]
    fn frames_round_trip_and_every_cut_of_the_last_is_torn() {
        let a = framed(&Record::End { changes: 1 });
        let b = framed(&Record::End { changes: 2 });
        let file = [a.clone(), b.clone()].concat();
        assert!(matches!(read_frame(&file), Frame::Record { next, .. } if next == a.len()));
        for cut in a.len() + 1..file.len() {
            assert!(
                matches!(read_frame(&file[a.len()..cut]), Frame::Torn(_)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn any_flipped_byte_before_more_data_is_corrupt() {
        let a = framed(&Record::End { changes: 1 });
        let b = framed(&Record::End { changes: 2 });
        for i in 0..a.len() {
            let mut file = [a.clone(), b.clone()].concat();
            file[i] ^= 0x40;
            assert!(
                matches!(read_frame(&file), Frame::Corrupt(_)),
                "flipped byte {i}"
            );
        }
    }

    #[test]
    fn zero_fill_after_the_last_record_is_torn() {
        let a = framed(&Record::End { changes: 1 });
        let file = [a.clone(), vec![0; 300]].concat();
        assert!(matches!(read_frame(&file[a.len()..]), Frame::Torn(_)));
    }
}
