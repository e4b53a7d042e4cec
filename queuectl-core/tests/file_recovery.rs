//! What `FileStorage` recovers and what it refuses (the rule of `docs/file-format.md`), how it
//! poisons itself after a failed write, compaction, permissions and durability options.
//!
//! These tests edit store files directly, so they read the framing themselves:
//! `[u32 LE length][u32 LE crc32 of length bytes and body][JSON body]`.

use std::fs;
use std::io;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use queuectl_core::file::{Durability, FileOptions, IoPoint};
use queuectl_core::{
    AttemptReport, FileStorage, Job, JobId, JobState, ListQuery, NewJob, Storage, StorageError,
    StorageExt, Timestamp,
};
use time::macros::datetime;

const LEASE: Duration = Duration::from_secs(30);

fn at(secs: i64) -> Timestamp {
    datetime!(2026-01-01 00:00:00 UTC) + time::Duration::seconds(secs)
}

fn job(id: &str) -> NewJob {
    NewJob::new(format!("echo {id}")).id(id).unwrap()
}

fn id(s: &str) -> JobId {
    s.parse().unwrap()
}

fn all(store: &FileStorage) -> Vec<Job> {
    store.list(&ListQuery::all()).unwrap()
}

/// The byte ranges of the records of a store file.
fn records(bytes: &[u8]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        ranges.push(pos..pos + 8 + len);
        pos += 8 + len;
    }
    ranges
}

/// A store directory holding only `journal` (and `snapshot`, if given) with these bytes.
fn store_with(journal: &[u8], snapshot: Option<&[u8]>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("journal"), journal).unwrap();
    if let Some(snapshot) = snapshot {
        fs::write(dir.path().join("snapshot"), snapshot).unwrap();
    }
    dir
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    fs::read(dir.join(file)).unwrap()
}

fn assert_corrupt(result: Result<FileStorage, StorageError>, file: &str, offset: u64) {
    match result {
        Err(StorageError::Corrupt {
            path, offset: at, ..
        }) => {
            assert!(path.ends_with(file), "{path:?} is not the {file}");
            assert_eq!(at, offset, "offset of the damaged record");
        }
        other => panic!("expected the {file} to be corrupt at {offset}, got {other:?}"),
    }
}

#[test]
fn a_torn_last_record_cut_at_every_byte_opens_to_the_previous_state() {
    let src = tempfile::tempdir().unwrap();
    let store = FileStorage::open(src.path()).unwrap();
    store
        .enqueue_batch(vec![job("a"), job("b"), job("c")], at(0))
        .unwrap();
    let lease = store.claim("w", 1, LEASE, at(1)).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    store
        .complete(&lease, AttemptReport::default(), at(2))
        .unwrap();
    let before = all(&store);
    store.claim("w", 2, LEASE, at(3)).unwrap(); // the last record: two jobs change
    let after = all(&store);
    drop(store);

    let journal = read(src.path(), "journal");
    let last = records(&journal).pop().unwrap();
    assert_eq!(last.end, journal.len());
    for cut in last.clone() {
        let dir = store_with(&journal[..cut], None);
        let store = FileStorage::open(dir.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(all(&store), before, "cut at {cut}");
        let warnings = store.recovery_warnings();
        if cut == last.start {
            assert!(warnings.is_empty(), "a clean cut is not torn: {warnings:?}");
        } else {
            assert_eq!(warnings.len(), 1, "cut at {cut}");
            assert_eq!(warnings[0].offset, last.start as u64);
            assert_eq!(warnings[0].bytes, (cut - last.start) as u64);
            assert!(warnings[0].path.ends_with("journal"));
        }
        // Opening only reads; the first write cuts the torn bytes off before it appends (the
        // clean reopen below shows its record did not land after them).
        assert_eq!(read(dir.path(), "journal").len(), cut, "cut at {cut}");
        store.enqueue(job("next"), at(9)).unwrap();
        drop(store);
        let reopened = FileStorage::open(dir.path()).unwrap();
        assert!(reopened.recovery_warnings().is_empty());
        assert_eq!(all(&reopened).len(), before.len() + 1);
    }
    let whole = store_with(&journal, None);
    assert_eq!(all(&FileStorage::open(whole.path()).unwrap()), after);
}

#[test]
fn a_torn_tail_left_by_another_process_is_cut_off_before_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    store.enqueue(job("a"), at(0)).unwrap();
    // Another "process" dies halfway through appending its record.
    let scratch = tempfile::tempdir().unwrap();
    let other = FileStorage::open(scratch.path()).unwrap();
    other.enqueue(job("lost"), at(0)).unwrap();
    let extra = read(scratch.path(), "journal");
    let record = records(&extra).pop().unwrap();
    let half = &extra[record.start..record.start + record.len() / 2];
    let torn_at = read(dir.path(), "journal").len();
    let mut journal = fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("journal"))
        .unwrap();
    io::Write::write_all(&mut journal, half).unwrap();

    // The live handle reads past the tear without taking it for data or damage...
    assert_eq!(store.counts().unwrap().total(), 1);
    let warnings = store.recovery_warnings();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].offset, torn_at as u64);
    // ... and its next write replaces the torn bytes.
    store.enqueue(job("b"), at(1)).unwrap();
    let reopened = FileStorage::open(dir.path()).unwrap();
    assert!(reopened.recovery_warnings().is_empty());
    let ids: Vec<_> = all(&reopened).into_iter().map(|j| j.id).collect();
    assert_eq!(ids, [id("a"), id("b")]);
}

#[test]
fn a_flipped_byte_in_a_middle_record_is_corrupt_naming_the_file_and_offset() {
    let src = tempfile::tempdir().unwrap();
    let store = FileStorage::open(src.path()).unwrap();
    for name in ["a", "b", "c", "d"] {
        store.enqueue(job(name), at(0)).unwrap();
    }
    drop(store);
    let journal = read(src.path(), "journal");
    let ranges = records(&journal);
    assert_eq!(ranges.len(), 5, "header and four operations");
    let middle = ranges[2].clone();
    for i in middle.clone() {
        let mut damaged = journal.clone();
        damaged[i] ^= 0x5a;
        let dir = store_with(&damaged, None);
        assert_corrupt(
            FileStorage::open(dir.path()),
            "journal",
            middle.start as u64,
        );
        // Refused, not repaired: the file is untouched.
        assert_eq!(read(dir.path(), "journal"), damaged);
    }
    let mut damaged = journal.clone();
    damaged[3] ^= 1; // the header
    assert_corrupt(
        FileStorage::open(store_with(&damaged, None).path()),
        "journal",
        0,
    );
    let err = FileStorage::open(store_with(&journal[..ranges[2].end - 1], None).path())
        .map(|s| s.recovery_warnings());
    assert!(
        err.is_ok_and(|w| w.len() == 1),
        "only the last record may be torn"
    );
}

#[test]
fn any_damage_to_the_snapshot_is_corrupt() {
    let src = tempfile::tempdir().unwrap();
    let store = FileStorage::open(src.path()).unwrap();
    let batch = (0..10).map(|i| job(&format!("j{i}"))).collect();
    store.enqueue_batch(batch, at(0)).unwrap();
    store.compact().unwrap();
    store.enqueue(job("after"), at(1)).unwrap();
    drop(store);
    let journal = read(src.path(), "journal");
    let snapshot = read(src.path(), "snapshot");
    let ranges = records(&snapshot);
    assert!(ranges.len() >= 3, "header, batches, end");
    let intact = store_with(&journal, Some(&snapshot));
    assert_eq!(all(&FileStorage::open(intact.path()).unwrap()).len(), 11);

    let second = ranges[1].clone();
    let mut flipped = snapshot.clone();
    flipped[second.start + 20] ^= 0x01;
    let dir = store_with(&journal, Some(&flipped));
    assert_corrupt(
        FileStorage::open(dir.path()),
        "snapshot",
        second.start as u64,
    );
    // A cut snapshot is refused too: snapshots are published whole, never torn.
    let end = ranges.last().unwrap().clone();
    for cut in [end.start, end.end - 1, second.end - 1] {
        let dir = store_with(&journal, Some(&snapshot[..cut]));
        assert!(
            matches!(
                FileStorage::open(dir.path()),
                Err(StorageError::Corrupt { .. })
            ),
            "snapshot cut at {cut}"
        );
    }
    // A journal without its snapshot (generation 1 needs one) is refused.
    assert_corrupt(
        FileStorage::open(store_with(&journal, None).path()),
        "journal",
        0,
    );
}

#[test]
fn a_newer_format_is_refused() {
    let body = br#"{"header":{"format":2,"file":"journal","generation":0}}"#;
    let len = (body.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(body);
    let journal = [&len[..], &crc.finalize().to_le_bytes(), body].concat();
    let dir = store_with(&journal, None);
    match FileStorage::open(dir.path()) {
        Err(StorageError::UnsupportedFormat {
            found, supported, ..
        }) => assert_eq!((found, supported), (2, 1)),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

/// Options whose fault hook fails the `nth` (1-based) call at `point`.
fn failing(point: IoPoint, nth: usize) -> FileOptions {
    let calls = AtomicUsize::new(0);
    FileOptions {
        fault_hook: Some(Arc::new(move |p| {
            if p == point && calls.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                Err(io::Error::other("injected failure"))
            } else {
                Ok(())
            }
        })),
        ..FileOptions::default()
    }
}

fn assert_poisoned<T: std::fmt::Debug>(result: Result<T, StorageError>) {
    assert!(
        matches!(result, Err(StorageError::Poisoned { .. })),
        "expected Poisoned, got {result:?}"
    );
}

#[test]
fn a_failed_fsync_poisons_the_handle_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open_with(dir.path(), failing(IoPoint::SyncJournal, 3)).unwrap();
    store.enqueue(job("a"), at(0)).unwrap();
    store.enqueue(job("b"), at(0)).unwrap();
    match store.enqueue(job("c"), at(0)) {
        Err(StorageError::Io { op, path, .. }) => {
            assert_eq!(op, "fsync");
            assert!(path.ends_with("journal"));
        }
        other => panic!("expected the fsync to fail, got {other:?}"),
    }
    assert_poisoned(store.enqueue(job("d"), at(0)));
    assert_poisoned(store.claim("w", 1, LEASE, at(0)));
    assert_poisoned(store.update_config(&mut |c| c.set("max-retries", "5")));
    assert_poisoned(store.compact());
    assert_poisoned(store.sync());
    // Reads still work, from what is on disk.
    assert_eq!(store.get(&id("a")).unwrap().state, JobState::Pending);

    let reopened = FileStorage::open(dir.path()).unwrap();
    assert!(reopened.get(&id("b")).is_ok());
    // The enqueue that reported failure left nothing behind for anyone to act on.
    for failed in ["c", "d"] {
        assert!(
            matches!(
                reopened.get(&id(failed)),
                Err(StorageError::NotFound { .. })
            ),
            "{failed} was stored although its enqueue failed"
        );
    }
    reopened.enqueue(job("e"), at(1)).unwrap();
}

#[test]
fn a_failed_append_poisons_and_the_handle_forgets_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open_with(dir.path(), failing(IoPoint::AppendJournal, 2)).unwrap();
    store.enqueue(job("a"), at(0)).unwrap();
    let err = store.claim("w", 1, LEASE, at(1)).unwrap_err();
    assert!(
        matches!(
            &err,
            StorageError::Io {
                op: "append to",
                ..
            }
        ),
        "{err:?}"
    );
    // The replica had already applied the claim; it is rebuilt from disk, where it is not.
    assert_eq!(store.get(&id("a")).unwrap().state, JobState::Pending);
    assert_poisoned(store.enqueue(job("b"), at(0)));
    let reopened = FileStorage::open(dir.path()).unwrap();
    assert_eq!(reopened.claim("w", 1, LEASE, at(1)).unwrap().len(), 1);
}

#[test]
fn a_failed_compaction_poisons_and_loses_nothing() {
    // A compaction publishes two files (snapshot, then journal), each through these points;
    // `WriteFile` is called twice per file (create, write). A failure in the second file's
    // steps leaves the new snapshot in place with a stale journal.
    for (point, calls) in [
        (IoPoint::WriteFile, 4),
        (IoPoint::SyncFile, 2),
        (IoPoint::Rename, 2),
        (IoPoint::SyncDir, 2),
    ] {
        for nth in 1..=calls {
            let dir = tempfile::tempdir().unwrap();
            FileStorage::open(dir.path()).unwrap(); // create the store first
            let store = FileStorage::open_with(dir.path(), failing(point, nth)).unwrap();
            let bystander = FileStorage::open(dir.path()).unwrap();
            store.enqueue(job("a"), at(0)).unwrap();
            let err = store.compact().unwrap_err();
            assert!(
                matches!(err, StorageError::Io { .. }),
                "{point:?} #{nth}: {err:?}"
            );
            assert_poisoned(store.enqueue(job("b"), at(0)));
            // A handle opened before the failure keeps writing where every reader will look.
            bystander.enqueue(job("c"), at(0)).unwrap();
            let reopened = FileStorage::open(dir.path()).unwrap();
            let ids: Vec<_> = all(&reopened).into_iter().map(|j| j.id).collect();
            assert_eq!(ids, [id("a"), id("c")], "{point:?} #{nth}");
            assert!(
                !fs::read_dir(dir.path())
                    .unwrap()
                    .any(|e| { e.unwrap().file_name().to_string_lossy().starts_with(".tmp") })
            );
        }
    }
}

#[test]
fn compaction_bounds_the_journal_and_other_handles_follow_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileOptions {
        compact_min_bytes: 8 << 10,
        ..FileOptions::default()
    };
    let store = FileStorage::open_with(dir.path(), options.clone()).unwrap();
    let follower = FileStorage::open(dir.path()).unwrap();
    for i in 0..300 {
        let name = format!("j{i}");
        store.enqueue(job(&name), at(i)).unwrap();
        let claimed = store.claim("w", 1, LEASE, at(i)).unwrap();
        store
            .complete(
                claimed[0].lease.as_ref().unwrap(),
                AttemptReport::default(),
                at(i),
            )
            .unwrap();
        if i % 50 == 0 {
            store.purge_completed(at(i)).unwrap();
        }
        if i % 7 == 0 {
            assert_eq!(follower.list(&ListQuery::all()).unwrap(), all(&store));
        }
    }
    let journal = fs::metadata(dir.path().join("journal")).unwrap().len();
    let snapshot = fs::metadata(dir.path().join("snapshot")).unwrap().len();
    assert!(
        journal <= (2 * snapshot).max(8 << 10) + 4096,
        "journal {journal} bytes, snapshot {snapshot}"
    );
    assert_eq!(follower.list(&ListQuery::all()).unwrap(), all(&store));
    let reopened = FileStorage::open(dir.path()).unwrap();
    assert_eq!(all(&reopened), all(&store));
    assert_eq!(reopened.counts().unwrap().completed, 50, "j250 to j299");
}

#[test]
fn store_files_are_private_and_crash_leftovers_are_removed() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a").join("store");
    let store = FileStorage::open(&dir).unwrap();
    store.enqueue(job("a"), at(0)).unwrap();
    store.compact().unwrap();
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for file in ["journal", "snapshot", "lock"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    drop(store);
    fs::write(dir.join(".tmp-snapshot-leftover"), b"half a snapshot").unwrap();
    let store = FileStorage::open(&dir).unwrap();
    assert!(!dir.join(".tmp-snapshot-leftover").exists());
    assert_eq!(store.counts().unwrap().total(), 1);
}

#[test]
fn batch_durability_writes_at_once_and_syncs_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let syncs = Arc::new(AtomicUsize::new(0));
    let counted = syncs.clone();
    let options = FileOptions {
        durability: Durability::Batch {
            interval: Duration::from_secs(3600),
        },
        fault_hook: Some(Arc::new(move |point| {
            if point == IoPoint::SyncJournal {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })),
        ..FileOptions::default()
    };
    let store = FileStorage::open_with(dir.path(), options).unwrap();
    let other = FileStorage::open(dir.path()).unwrap();
    for name in ["a", "b", "c"] {
        store.enqueue(job(name), at(0)).unwrap();
    }
    assert_eq!(
        syncs.load(Ordering::SeqCst),
        0,
        "no fsync within the interval"
    );
    assert_eq!(other.counts().unwrap().pending, 3, "written at once");
    store.sync().unwrap();
    assert_eq!(syncs.load(Ordering::SeqCst), 1);
    store.sync().unwrap();
    assert_eq!(syncs.load(Ordering::SeqCst), 1, "nothing left to sync");
}
