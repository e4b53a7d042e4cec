//! Which directories a store may use: an absent or empty one, or one that already holds a
//! queuectl store. Anything else is refused before a single file in it is touched.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::legacy;
use super::schema::DB_FILE;
use crate::error::{Result, StorageError};

/// What a store directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Home {
    /// Nothing at that path.
    Absent,
    /// An empty directory.
    Empty,
    /// A directory with our database file in it.
    Store,
    /// A store in the journal format of version 1, to be imported.
    Legacy,
}

/// Names SQLite puts beside the database; without the database itself they are leftovers of a
/// store someone deleted, and a new database must not pick them up.
const DB_SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Looks at `dir` without changing anything in it.
pub(super) fn classify(dir: &Path) -> Result<Home> {
    let not_a_store = |reason: String| StorageError::NotAStore {
        path: dir.to_owned(),
        reason,
    };
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Home::Absent),
        Err(source) => {
            return Err(StorageError::Io {
                op: "look at",
                path: dir.to_owned(),
                source,
            });
        }
        Ok(meta) if !meta.is_dir() => return Err(not_a_store("it is not a directory".into())),
        Ok(_) => {}
    }
    let db = dir.join(DB_FILE);
    match fs::symlink_metadata(&db) {
        Ok(meta) if meta.file_type().is_file() => return Ok(Home::Store),
        Ok(_) => return Err(not_a_store(format!("{DB_FILE} is not a regular file"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StorageError::Io {
                op: "look at",
                path: db,
                source,
            });
        }
    }
    let entries = fs::read_dir(dir).map_err(|source| StorageError::Io {
        op: "list",
        path: dir.to_owned(),
        source,
    })?;
    let mut legacy_files = false;
    // The lock and temporary files of a version 1 store count only beside its data.
    let mut legacy_leftover = None;
    for entry in entries {
        let entry = entry.map_err(|source| StorageError::Io {
            op: "list",
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == DB_FILE {
            // Created by another process since we looked.
            return Ok(Home::Store);
        }
        if name == super::watch::WAKE_FILE || name == super::watch::WORK_FILE {
            // Ours, and holds nothing, if it is a plain file.
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                return Err(not_a_store(format!("{name} is not a regular file")));
            }
        } else if let Some(data) = legacy::is_store_file(&name) {
            if data {
                if !legacy::is_v1_file(&entry.path()) {
                    return Err(not_a_store(format!(
                        "it holds other files, such as {name:?}"
                    )));
                }
                legacy_files = true;
            } else {
                legacy_leftover.get_or_insert_with(|| name.to_string());
            }
        } else if DB_SIDE_FILES
            .iter()
            .any(|suffix| name.strip_suffix(suffix) == Some(DB_FILE))
        {
            if db.exists() {
                return Ok(Home::Store);
            }
            return Err(not_a_store(format!(
                "it holds {name} but no {DB_FILE} (the leftover of a deleted store; remove it \
                 only if no process uses it)"
            )));
        } else {
            return Err(not_a_store(format!(
                "it holds other files, such as {name:?}"
            )));
        }
    }
    match (legacy_files, legacy_leftover) {
        (true, _) => Ok(Home::Legacy),
        (false, Some(name)) => Err(not_a_store(format!(
            "it holds other files, such as {name:?}"
        ))),
        (false, None) => Ok(Home::Empty),
    }
}

/// Creates `dir` (and any missing parents) with mode 0700, whatever the umask. Returns
/// `false`, changing nothing, when `dir` appeared meanwhile (created by someone else).
pub(super) fn create_dir(dir: &Path) -> Result<bool> {
    let io_error = |source| StorageError::Io {
        op: "create the store directory",
        path: dir.to_owned(),
        source,
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error)?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_error(e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error)?;
    Ok(true)
}

/// Creates an empty database file with mode 0600 (SQLite gives its `-wal` and `-shm` files the
/// mode of the database), unless it exists. SQLite has not opened it yet, so no lock can be
/// disturbed.
pub(super) fn create_db_file(path: &Path) -> Result<()> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(file) => {
            drop(file);
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
                StorageError::Io {
                    op: "set the permissions of",
                    path: path.to_owned(),
                    source,
                }
            })
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StorageError::Io {
            op: "create",
            path: path.to_owned(),
            source,
        }),
    }
}
