//! What `FileStorage` refuses, and how it fails: directories that are not stores, stores of a
//! newer schema or another program, deleted or replaced databases, damaged files, a full disk;
//! and the permissions of what it creates.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use queuectl_core::{
    DatabaseFault, FileOptions, FileStorage, JobState, ListQuery, NewJob, Storage, StorageError,
    StorageExt, now,
};

/// Every file below `dir` with its contents, to show that nothing was touched.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::metadata(&path).unwrap();
        if meta.is_dir() {
            out.push((path.clone(), Vec::new(), meta.permissions().mode()));
            out.extend(snapshot(&path));
        } else {
            out.push((
                path.clone(),
                fs::read(&path).unwrap(),
                meta.permissions().mode(),
            ));
        }
    }
    out.sort();
    out
}

fn store_with_jobs(dir: &Path, n: usize) {
    let store = FileStorage::open(dir).unwrap();
    let batch = (0..n)
        .map(|i| NewJob::new(format!("echo job number {i} with some text")))
        .collect();
    store.enqueue_batch(batch, now()).unwrap();
    store.checkpoint().unwrap();
}

#[test]
fn an_unrelated_directory_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    fs::write(dir.path().join(".tmp-draft"), "also mine").unwrap();
    fs::create_dir(dir.path().join("photos")).unwrap();
    fs::write(dir.path().join("photos/cat.jpg"), "meow").unwrap();
    let before = snapshot(dir.path());
    for options in [
        FileOptions::default(),
        FileOptions::read_only(),
        FileOptions {
            create: false,
            ..FileOptions::default()
        },
    ] {
        let err = FileStorage::open_with(dir.path(), options).unwrap_err();
        assert!(
            matches!(&err, StorageError::NotAStore { path, .. } if path == dir.path()),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("not a queuectl store"), "{message}");
    }
    assert_eq!(snapshot(dir.path()), before, "nothing in it was touched");
    // A file where the directory should be, too.
    let file = dir.path().join("notes.txt");
    assert!(matches!(
        FileStorage::open(&file),
        Err(StorageError::NotAStore { .. })
    ));
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn leftovers_of_a_deleted_database_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("queuectl.db-wal"), "old frames").unwrap();
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("queuectl.db-wal"), "{err}");
    assert!(!dir.path().join("queuectl.db").exists());
}

#[test]
fn a_database_of_another_program_or_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queuectl.db");
    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .execute_batch("CREATE TABLE songs (title TEXT); INSERT INTO songs VALUES ('x');")
        .unwrap();
    drop(other);
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(matches!(err, StorageError::NotAStore { .. }), "{err}");
    assert!(err.to_string().contains("another program"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    drop(FileStorage::open(dir.path()).unwrap());
    let db = dir.path().join("queuectl.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StorageError::UnsupportedFormat { path, found: 99, .. } if path == &db),
        "{err}"
    );
}

#[test]
fn opening_without_create_never_creates_a_store() {
    let parent = tempfile::tempdir().unwrap();
    let absent = parent.path().join("nothing-here");
    for options in [
        FileOptions::read_only(),
        FileOptions {
            create: false,
            ..FileOptions::default()
        },
    ] {
        let err = FileStorage::open_with(&absent, options.clone()).unwrap_err();
        assert!(
            matches!(&err, StorageError::NoStore { path } if path == &absent),
            "{err}"
        );
        assert!(!absent.exists());
        let err = FileStorage::open_with(parent.path(), options).unwrap_err();
        assert!(matches!(err, StorageError::NoStore { .. }), "{err}");
        assert_eq!(fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}

#[test]
fn a_read_only_handle_reads_and_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    store_with_jobs(dir.path(), 3);
    let store = FileStorage::open_with(dir.path(), FileOptions::read_only()).unwrap();
    assert!(store.is_read_only());
    assert_eq!(store.counts().unwrap().pending, 3);
    assert_eq!(store.list(&ListQuery::all()).unwrap().len(), 3);
    let err = store.enqueue(NewJob::new("true"), now()).unwrap_err();
    assert!(matches!(err, StorageError::ReadOnly { .. }), "{err}");
    assert!(err.is_permission_problem());
    assert!(matches!(
        store.claim("w", 1, Duration::from_secs(1), now()),
        Err(StorageError::ReadOnly { .. })
    ));
}

#[test]
fn what_the_store_creates_is_private_whatever_the_umask() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a/b/store");
    // The umask is the process's: restored at once, before any assertion.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let opened = FileStorage::open(&dir);
    nix::sys::stat::umask(old);
    let store = opened.unwrap();
    store.enqueue(NewJob::new("true"), now()).unwrap();
    let mode = |name: &str| fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for file in [
        "queuectl.db",
        "queuectl.db-wal",
        "queuectl.db-shm",
        "queuectl.wake",
    ] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
}

#[test]
fn a_deleted_database_is_noticed_and_nothing_more_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("store");
    let store = FileStorage::open(&home).unwrap();
    store.enqueue(NewJob::new("true"), now()).unwrap();
    fs::remove_dir_all(&home).unwrap();
    let err = store.enqueue(NewJob::new("true"), now()).unwrap_err();
    assert!(matches!(err, StorageError::StoreMoved { .. }), "{err}");
    assert!(err.is_fatal());
    assert!(err.to_string().contains("deleted or replaced"), "{err}");
    assert!(matches!(
        store.counts(),
        Err(StorageError::StoreMoved { .. })
    ));
    assert!(!home.exists(), "nothing was recreated");
}

#[test]
fn an_idle_waiter_notices_the_deletion_without_waiting_for_its_poll() {
    const HOUR: Duration = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("store");
    drop(FileStorage::open(&home).unwrap());
    let options = FileOptions {
        poll_interval: HOUR,
        ..FileOptions::default()
    };
    let store = FileStorage::open_with(&home, options).unwrap();
    let seen = store.change_version().unwrap();
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        let _ = tx.send(store.wait_for_change(seen, HOUR));
    });
    ready.recv().unwrap();
    fs::remove_dir_all(&home).unwrap();
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the waiter noticed the deletion");
    assert!(
        matches!(result, Err(StorageError::StoreMoved { .. })),
        "{result:?}"
    );
}

#[test]
fn a_replaced_database_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    store.enqueue(NewJob::new("true"), now()).unwrap();
    store.checkpoint().unwrap();
    let db = dir.path().join("queuectl.db");
    let copy = dir.path().join("copy");
    fs::copy(&db, &copy).unwrap();
    fs::rename(&copy, &db).unwrap();
    let err = store.enqueue(NewJob::new("true"), now()).unwrap_err();
    assert!(matches!(err, StorageError::StoreMoved { .. }), "{err}");
}

/// Asserts that `result` is a corruption error naming the database file.
fn assert_corrupt<T: std::fmt::Debug>(result: Result<T, StorageError>, db: &Path) {
    let err = result.unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&db.display().to_string()), "{message}");
    assert!(
        matches!(
            err,
            StorageError::Database {
                fault: DatabaseFault::Corrupt,
                ..
            } | StorageError::Corrupt { .. }
        ),
        "{err:?}"
    );
    assert!(message.contains("corrupt"), "{message}");
}

/// Opens and reads every job, as a command would.
fn open_and_read(dir: &Path) -> Result<usize, StorageError> {
    let store = FileStorage::open(dir)?;
    Ok(store.list(&ListQuery::all())?.len())
}

#[test]
fn damaged_files_give_a_clear_error_naming_the_file_and_check_reports_them() {
    for damage in ["truncated", "header", "page"] {
        let dir = tempfile::tempdir().unwrap();
        store_with_jobs(dir.path(), 2000);
        let db = dir.path().join("queuectl.db");
        let mut bytes = fs::read(&db).unwrap();
        assert!(bytes.len() > 64 * 1024, "the store spans many pages");
        match damage {
            "truncated" => bytes.truncate(bytes.len() / 2),
            "header" => bytes[..100].fill(0x5a),
            _ => {
                // A page in the middle of the jobs table's b-tree.
                let page = 4096 * (bytes.len() / 4096 / 2);
                bytes[page..page + 4096].fill(0xa5);
            }
        }
        fs::write(&db, &bytes).unwrap();
        assert_corrupt(open_and_read(dir.path()), &db);
        let report = FileStorage::check(dir.path()).unwrap();
        assert!(!report.is_ok(), "{damage}: check found nothing");
        println!("{damage}: {:?}", report.problems);
    }
}

#[test]
fn a_full_disk_fails_cleanly_and_the_store_works_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(mount)
        .status();
    if !matches!(mounted, Ok(status) if status.success()) {
        println!("skipped: cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mount);
    let home = mount.join("store");
    let filler = mount.join("filler");
    fs::write(&filler, vec![0u8; 512 * 1024]).unwrap();
    let store = FileStorage::open(&home).unwrap();
    let mut acknowledged = Vec::new();
    let err = loop {
        let job = NewJob::new(format!("echo {}", "x".repeat(8000)));
        match store.enqueue(job, now()) {
            Ok(job) => acknowledged.push(job.id),
            Err(err) => break err,
        }
        assert!(acknowledged.len() < 10_000, "the disk never filled");
    };
    assert!(
        matches!(
            err,
            StorageError::Database {
                fault: DatabaseFault::DiskFull,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("disk is full"), "{err}");
    println!("disk full after {} jobs: {err}", acknowledged.len());
    // Every acknowledged job is there; the refused one is not.
    let listed: Vec<_> = store
        .list(&ListQuery::all())
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(listed, acknowledged);
    fs::remove_file(&filler).unwrap();
    store.enqueue(NewJob::new("true"), now()).unwrap();
    assert_eq!(
        store.counts().unwrap().get(JobState::Pending),
        acknowledged.len() + 1
    );
    drop(store);
    assert!(FileStorage::check(&home).unwrap().is_ok());
}

#[test]
fn processes_creating_one_store_at_once_all_succeed() {
    for _ in 0..20 {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("new");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let (home, barrier) = (home.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    FileStorage::open(&home).map(drop)
                })
            })
            .collect();
        for opener in openers {
            opener.join().unwrap().unwrap();
        }
    }
}

#[test]
fn deleting_jobs_gives_their_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path()).unwrap();
    let batch = (0..500)
        .map(|i| NewJob::new(format!("echo {i} {}", "x".repeat(20_000))).max_retries(1))
        .collect();
    store.enqueue_batch(batch, now()).unwrap();
    for job in store
        .claim("w", 500, Duration::from_secs(30), now())
        .unwrap()
    {
        store
            .fail(
                job.lease.as_ref().unwrap(),
                Default::default(),
                now(),
                now(),
            )
            .unwrap();
    }
    store.checkpoint().unwrap();
    let db = dir.path().join("queuectl.db");
    let before = fs::metadata(&db).unwrap().len();
    assert_eq!(store.clear_dead(now()).unwrap(), 500);
    store.checkpoint().unwrap();
    let after = fs::metadata(&db).unwrap().len();
    assert!(after * 4 < before, "{before} bytes before, {after} after");
}

#[test]
fn a_planted_wake_file_link_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("store");
    fs::create_dir(&home).unwrap();
    let victim = dir.path().join("victim.sh");
    fs::write(&victim, "#!/bin/sh\necho precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, home.join("queuectl.wake")).unwrap();
    let err = FileStorage::open(&home).unwrap_err();
    assert!(err.to_string().contains("queuectl.wake"), "{err}");
    // Also when the link appears in an existing store.
    fs::remove_file(home.join("queuectl.wake")).unwrap();
    drop(FileStorage::open(&home).unwrap());
    fs::remove_file(home.join("queuectl.wake")).unwrap();
    std::os::unix::fs::symlink(&victim, home.join("queuectl.wake")).unwrap();
    let err = FileStorage::open(&home).unwrap_err();
    assert!(err.to_string().contains("queuectl.wake"), "{err}");
    assert_eq!(
        fs::read_to_string(&victim).unwrap(),
        "#!/bin/sh\necho precious\n"
    );
}

#[test]
fn files_that_only_look_like_an_old_store_are_refused_untouched() {
    for files in [
        &[("journal", "dear diary")][..],
        &[("lock", "")],
        &[("imported-v1", "")],
        &[(".tmp-notes", "draft")],
    ] {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            if *name == "imported-v1" {
                fs::create_dir(dir.path().join(name)).unwrap();
                fs::write(dir.path().join(name).join("passwords"), "hunter2").unwrap();
            } else {
                fs::write(dir.path().join(name), text).unwrap();
            }
        }
        let before = snapshot(dir.path());
        for options in [FileOptions::default(), FileOptions::read_only()] {
            let err = FileStorage::open_with(dir.path(), options).unwrap_err();
            assert!(
                matches!(err, StorageError::NotAStore { .. }),
                "{files:?}: {err}"
            );
        }
        assert_eq!(snapshot(dir.path()), before, "{files:?}");
    }
}

#[test]
fn a_foreign_database_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("queuectl.db")).unwrap();
    conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 7;")
        .unwrap();
    drop(conn);
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("another program"), "{err}");
    assert!(!dir.path().join("queuectl.wake").exists());
}

#[test]
fn journal_files_written_after_the_import_are_not_dropped() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/file-v1");
    let dir = tempfile::tempdir().unwrap();
    for file in ["snapshot", "journal"] {
        fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    drop(FileStorage::open(dir.path()).unwrap());
    // An old worker still running writes its journal again.
    let mut late = fs::read(fixture.join("journal")).unwrap();
    late.extend_from_slice(b"");
    fs::write(dir.path().join("journal"), &late).unwrap();
    fs::copy(fixture.join("snapshot"), dir.path().join("snapshot")).unwrap();
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(matches!(err, StorageError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("earlier version"), "{err}");
    assert!(dir.path().join("journal").exists(), "left where it was");
    assert_eq!(
        fs::read(dir.path().join("imported-v1/journal")).unwrap(),
        fs::read(fixture.join("journal")).unwrap(),
        "the backup of the imported journal is intact"
    );
}

#[test]
fn a_reader_without_write_access_refuses_to_go_on_once_the_store_changed() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("store");
    store_with_jobs(&home, 1);
    let setup = "mount --bind \"$H\" \"$H\" && mount -o remount,ro,bind \"$H\"";
    let probe = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", setup])
        .env("H", &home)
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        println!("skipped: this machine cannot make a read-only bind mount");
        return;
    }
    // A reader in a private mount namespace, where the store is read-only: it counts, is
    // told to go on, counts again.
    let script = format!(
        "{setup} && exec {} reader \"$H\"",
        env!("CARGO_BIN_EXE_queuectl-store-helper")
    );
    let mut reader = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("H", &home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(reader.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "count 1");
    let writer = FileStorage::open(&home).unwrap();
    for _ in 0..50 {
        writer.enqueue(NewJob::new("true"), now()).unwrap();
    }
    // The writer stays open: its changes are in the WAL, which the reader cannot see.
    std::io::Write::write_all(reader.stdin.as_mut().unwrap(), b"again\n").unwrap();
    let second = lines.next().unwrap().unwrap();
    assert!(
        second.contains("changed while it was read without write access"),
        "the reader went on with what it saw before: {second}"
    );
    reader.wait().unwrap();
    drop(writer);
}

#[test]
fn a_zero_poll_interval_does_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileOptions {
        poll_interval: Duration::ZERO,
        ..FileOptions::default()
    };
    let store = FileStorage::open_with(dir.path(), options).unwrap();
    let seen = store.change_version().unwrap();
    let cpu = || {
        let usage =
            nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD).unwrap();
        let micros = |t: nix::sys::time::TimeVal| {
            Duration::from_micros((t.tv_sec() * 1_000_000 + t.tv_usec()) as u64)
        };
        micros(usage.user_time()) + micros(usage.system_time())
    };
    let before = cpu();
    store
        .wait_for_change(seen, Duration::from_millis(500))
        .unwrap();
    let used = cpu() - before;
    // A spinning wait uses the whole half second; a sleeping one a few milliseconds.
    assert!(used < Duration::from_millis(250), "used {used:?} of CPU");
}
