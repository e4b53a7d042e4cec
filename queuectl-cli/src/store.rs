//! Opening the store the way each command needs it, and the housekeeping read commands do.

use std::path::PathBuf;
use std::sync::Arc;

use queuectl_core::pool::{hostname, recover_abandoned};
use queuectl_core::{
    FileOptions, FileStorage, MemoryStorage, PgOptions, PgStorage, SchemaCheck, Storage,
    StorageError, now,
};

use crate::args::{Command, ConfigCommand, DlqCommand, QueueCommand, WorkerCommand};
use crate::error::{CliError, Result};

/// How a command opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// It may create the store (enqueue, worker start, config set).
    Create,
    /// It changes an existing store, and refuses when there is none.
    Change,
    /// It changes an existing store; where there is none it has nothing to change, and finds
    /// an empty queue as a read does (pausing every queue).
    ChangeIfAny,
    /// It only reads: it never creates a store, and works on one it cannot write.
    Read,
}

pub fn access(command: &Command) -> Access {
    match command {
        // Every queue: where there is no store there are no queues, and nothing to make.
        Command::Queue(QueueCommand::Pause { names } | QueueCommand::Resume { names })
            if names.is_empty() =>
        {
            Access::ChangeIfAny
        }
        Command::Enqueue { .. }
        | Command::Worker(WorkerCommand::Start { .. })
        | Command::Config(ConfigCommand::Set { .. })
        | Command::Dashboard {
            read_only: false, ..
        }
        | Command::Queue(
            QueueCommand::Pause { .. } | QueueCommand::Resume { .. } | QueueCommand::Limit { .. },
        ) => Access::Create,
        Command::Worker(WorkerCommand::Stop { .. })
        | Command::Dlq(DlqCommand::Retry { .. } | DlqCommand::Clear)
        | Command::Purge { .. }
        | Command::Cancel { .. }
        | Command::Remove { .. }
        | Command::Retry { .. } => Access::Change,
        Command::Status(_)
        | Command::List { .. }
        | Command::Show { .. }
        | Command::Dlq(DlqCommand::List(_))
        | Command::Queue(QueueCommand::List(_))
        | Command::Stats { .. }
        | Command::Dashboard {
            read_only: true, ..
        }
        | Command::Config(ConfigCommand::Show(_) | ConfigCommand::Get { .. })
        | Command::Check(_)
        | Command::Wait { .. }
        | Command::Logs { .. } => Access::Read,
        Command::Completions { .. } | Command::Man => Access::Read,
    }
}

pub fn default_home() -> Result<PathBuf> {
    dirs::data_dir()
        .map(|dir| dir.join("queuectl"))
        .ok_or(CliError::NoHome)
}

/// Where the queue is: the embedded store in a directory, or a PostgreSQL database.
#[derive(Debug, Clone)]
pub enum Target {
    /// `--home`, `QUEUECTL_HOME` or the platform data directory.
    Home(PathBuf),
    /// `--database-url` or `QUEUECTL_DATABASE_URL`.
    Database {
        /// The connection URL.
        url: String,
        /// The schema (`None`: the default).
        schema: Option<String>,
    },
}

/// The target the command line and environment name.
pub fn target(
    home: Option<PathBuf>,
    url: Option<String>,
    schema: Option<String>,
) -> Result<Target> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let url = url.filter(|u| !u.is_empty());
    // Flags that contradict each other are refused, not one of them ignored; a flag
    // overrides what the environment sets.
    if url.is_some() && home.is_some() {
        return Err(CliError::Refused(
            "--home names an embedded store and --database-url a PostgreSQL one: give one of \
             them"
                .to_owned(),
        ));
    }
    let url = match (url, &home) {
        (Some(url), _) => Some(url),
        (None, Some(_)) => None,
        (None, None) => env("QUEUECTL_DATABASE_URL"),
    };
    if let Some(url) = url {
        let schema = schema.or_else(|| env("QUEUECTL_DATABASE_SCHEMA"));
        return Ok(Target::Database { url, schema });
    }
    if schema.is_some() {
        return Err(CliError::Refused(
            "--database-schema needs a PostgreSQL database: pass --database-url or set \
             QUEUECTL_DATABASE_URL"
                .to_owned(),
        ));
    }
    let from_env = std::env::var_os("QUEUECTL_HOME").filter(|home| !home.is_empty());
    match home.or(from_env.map(Into::into)) {
        Some(home) => Ok(Target::Home(home)),
        None => Ok(Target::Home(default_home()?)),
    }
}

/// The key of the queue `target` names among the relays of this machine
/// ([`queuectl_core::relay`]): only PostgreSQL queues have relays, since the embedded store's
/// own enqueue costs no more than handing it over would.
pub fn relay_key(target: &Target) -> Option<String> {
    match target {
        Target::Database { url, schema } => {
            let schema = schema
                .clone()
                .unwrap_or_else(|| PgOptions::default().schema);
            Some(queuectl_core::relay::database_key(url, &schema))
        }
        Target::Home(_) => None,
    }
}

/// Connects to PostgreSQL; `waits` for a process that waits for changes (a worker, `wait`,
/// `logs --follow`, the dashboard), which listens for notifications. A one-shot command
/// neither listens nor keeps more than one connection. One that may create the queue's schema
/// checks it with its first operation, which saves a round trip per run; the others check it
/// on connect, where a missing schema is found before anything is shown or changed (and
/// nothing is created).
pub fn pg(
    url: &str,
    schema: &Option<String>,
    waits: bool,
    access: Access,
) -> std::result::Result<PgStorage, StorageError> {
    let mut options = PgOptions {
        create: access == Access::Create,
        ..PgOptions::default()
    };
    if !waits {
        options.listen = false;
        options.pool_size = 1;
        if access == Access::Create {
            options.schema_check = SchemaCheck::WithFirstUse;
        }
    }
    if let Some(schema) = schema {
        options.schema = schema.clone();
    }
    PgStorage::connect(url, options)
}

/// What a worker says when its clock is off from the database server's by more than a second.
pub fn clock_warning(offset: time::Duration) -> Option<String> {
    (offset.abs() > time::Duration::SECOND).then(|| {
        let (ahead, secs) = if offset.is_negative() {
            ("ahead of", -offset.as_seconds_f64())
        } else {
            ("behind", offset.as_seconds_f64())
        };
        format!(
            "warning: this machine's clock is {secs:.1} s {ahead} the database server's; \
             workers decide due times and lease expiry by their own clocks, so keep every \
             machine's clock synchronised (NTP)"
        )
    })
}

/// Opens the store for `worker start`, creating it if needed.
pub fn open_for_work(target: &Target) -> Result<Arc<dyn Storage>> {
    match target {
        Target::Database { url, schema } => {
            let store = pg(url, schema, true, Access::Create)?;
            if let Some(warning) = clock_warning(store.clock_offset()?) {
                say!("{warning}");
            }
            Ok(Arc::new(store))
        }
        Target::Home(home) => {
            let store = FileStorage::open(home)?;
            announce(&store);
            Ok(Arc::new(store))
        }
    }
}

fn announce(store: &FileStorage) {
    if let Some(import) = store.imported() {
        say!("note: {import}");
    }
}

/// Opens the store as the command needs it. A read, and a change of every queue, find an
/// empty queue where there is no store yet (and say so); a read falls back to reading a store
/// it cannot write.
pub fn open(target: &Target, access: Access, waits: bool) -> Result<Arc<dyn Storage>> {
    let opened: std::result::Result<Arc<dyn Storage>, StorageError> = match target {
        Target::Database { url, schema } => {
            pg(url, schema, waits, access).map(|store| Arc::new(store) as Arc<dyn Storage>)
        }
        Target::Home(home) => open_home(home, access).map(|store| {
            announce(&store);
            Arc::new(store) as Arc<dyn Storage>
        }),
    };
    match opened {
        Err(StorageError::NoStore { path })
            if matches!(access, Access::Read | Access::ChangeIfAny) =>
        {
            say!("note: there is no queue at {} yet", path.display());
            Ok(Arc::new(MemoryStorage::new()))
        }
        other => Ok(other?),
    }
}

fn open_home(
    home: &std::path::Path,
    access: Access,
) -> std::result::Result<FileStorage, StorageError> {
    let options = FileOptions {
        create: access == Access::Create,
        ..FileOptions::default()
    };
    match FileStorage::open_with(home, options) {
        Err(error) if access == Access::Read && error.is_permission_problem() => {
            FileStorage::open_with(home, FileOptions::read_only())
        }
        other => other,
    }
}

/// Returns jobs abandoned by dead workers to the queue before showing anything, so that what is
/// shown is true even when no worker is running to do it.
pub fn recover(store: &dyn Storage) -> Result<()> {
    if store.is_read_only() {
        return Ok(());
    }
    let config = store.config()?;
    match recover_abandoned(store, &hostname(), config.lease_duration() * 3, now()) {
        // A database user allowed to read the queue but not to change it (or a read-only
        // replica): what is shown may still count the jobs of a dead worker as running.
        Err(error) if error.is_permission_problem() => {
            say!("note: jobs of workers that died were not looked for: {error}");
            Ok(())
        }
        other => other.map(drop).map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::clock_warning;

    #[test]
    fn a_clock_off_by_more_than_a_second_is_said() {
        assert_eq!(clock_warning(time::Duration::milliseconds(900)), None);
        assert_eq!(clock_warning(time::Duration::milliseconds(-999)), None);
        let behind = clock_warning(time::Duration::seconds_f64(2.5)).unwrap();
        assert!(behind.contains("2.5 s behind"), "{behind}");
        let ahead = clock_warning(time::Duration::seconds(-3)).unwrap();
        assert!(ahead.contains("3.0 s ahead of"), "{ahead}");
    }
}
