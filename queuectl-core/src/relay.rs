//! Enqueues handed to a worker on the same machine.
//!
//! A one-shot `queuectl enqueue` on PostgreSQL pays for a new server process each run: the
//! connection, authentication, and the first use of every table it touches, several times the
//! cost of its one insert. A worker already holds open connections. While it runs, a worker
//! serves its queue's enqueues on a Unix socket (a [`Relay`]), in a directory that only its
//! user may open ([`socket_for`]); an enqueue that finds the socket hands its jobs over
//! ([`hand_over`]) and gets back what [`Storage::submit`] returned in the worker. One that finds
//! no socket, or whose jobs the worker declines, adds them itself, so nothing depends on a
//! worker running.
//!
//! A request is one JSON line, `{"key", "now", "jobs"}`, and is acted on only when it arrived
//! whole; the reply is one JSON line too. The key names the queue (the database and schema,
//! say): a relay declines a request for any other, so two queues whose keys share a socket name
//! cannot mix. The relay answers only after the store's `submit` returned, so a job it reports
//! added is committed; a worker that dies between the two leaves the outcome unknown, which
//! the caller is told ([`Handover::Unknown`]) and must not guess at. A declined request
//! changed nothing, as a failed `submit` changes nothing, except where the store's commit
//! itself failed: then, as for a direct `submit`, the jobs may have been added. Give the jobs
//! ids before handing them over, and adding them again after a refusal cannot add them twice.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};

use crate::job::{NewJob, Timestamp};
use crate::storage::{Enqueued, Storage};

/// The most jobs one request hands over. A larger batch costs far more than a connection of
/// its own, and a worker serves one request at a time.
pub const MAX_JOBS: usize = 1_000;
/// The longest a request may take to arrive whole once a caller has connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a caller waits for the relay's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest request line read: [`MAX_JOBS`] jobs with long commands fit.
const MAX_REQUEST_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
struct Request {
    key: String,
    #[serde(with = "time::serde::rfc3339")]
    now: Timestamp,
    jobs: Vec<NewJob>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    /// What `submit` returned: the jobs are committed.
    Done(Vec<Enqueued>),
    /// Not added here, with the reason.
    Declined(String),
}

/// The key of the queue in the schema `schema` of the PostgreSQL database at `url`.
pub fn database_key(url: &str, schema: &str) -> String {
    format!("postgresql\n{url}\n{schema}")
}

/// The socket of the relay for the queue `key`: in `$XDG_RUNTIME_DIR/queuectl`, or where that
/// is not set in `queuectl-UID` under the temporary directory ([`socket_in`]).
pub fn socket_for(key: &str) -> io::Result<PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("queuectl"),
        None => std::env::temp_dir().join(format!("queuectl-{}", nix::unistd::geteuid())),
    };
    socket_in(&dir, key)
}

/// The socket of the relay for the queue `key` in the directory `dir`, which is created
/// private to this user when missing. A directory that another user owns, or that others may
/// open, is refused, not used.
pub fn socket_in(dir: &Path, key: &str) -> io::Result<PathBuf> {
    private_dir(dir)?;
    Ok(dir.join(format!("{:08x}.sock", crc32fast::hash(key.as_bytes()))))
}

/// Makes `dir` if needed and checks that it is a directory only this user may open.
fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot create {}: {error}", dir.display()),
            )
        })?;
    let meta = fs::symlink_metadata(dir)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", dir.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    let problem = if !meta.is_dir() {
        Some("it is not a directory".to_owned())
    } else if meta.uid() != me {
        Some(format!(
            "it belongs to user {}, not to this one ({me})",
            meta.uid()
        ))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "others may open it (mode {:o}, 700 wanted)",
            meta.mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not used for the local relay: {problem}",
                dir.display()
            ),
        )),
        None => Ok(()),
    }
}

/// A worker's service of its queue's enqueues on a Unix socket, until stopped (or dropped).
pub struct Relay {
    path: PathBuf,
    /// Dropped to stop the thread: its reading end then reports a hang-up.
    stop: Option<io::PipeWriter>,
    thread: Option<JoinHandle<()>>,
    /// Held while the relay runs: whoever holds it owns the socket's name.
    _lock: File,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("path", &self.path).finish()
    }
}

impl Relay {
    /// Serves enqueues for the queue `key` into `store` on the socket `path`, on a thread of
    /// its own. `Ok(None)` when another live relay already serves that socket. A socket left
    /// behind by a relay that died is replaced.
    pub fn start(store: Arc<dyn Storage>, path: &Path, key: &str) -> io::Result<Option<Self>> {
        let context = |what: &str, error: io::Error| {
            io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
        };
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|error| context("cannot open the lock of", error))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(error)) => {
                return Err(context("cannot lock the lock of", error));
            }
        }
        // The lock is ours: whatever socket is there was left by a relay that died.
        match fs::remove_file(path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(context("cannot remove the stale socket", error));
            }
            _ => {}
        }
        let listener =
            UnixListener::bind(path).map_err(|error| context("cannot listen on", error))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|error| context("cannot restrict", error))?;
        listener
            .set_nonblocking(true)
            .map_err(|error| context("cannot set up", error))?;
        let (stopped, stop) = io::pipe()?;
        let key = key.to_owned();
        let thread = std::thread::Builder::new()
            .name("queuectl-relay".into())
            .spawn(move || serve(&listener, &stopped, &*store, &key))?;
        Ok(Some(Self {
            path: path.to_owned(),
            stop: Some(stop),
            thread: Some(thread),
            _lock: lock,
        }))
    }

    /// The socket it serves on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving: the request being served is answered first; the socket is removed.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            // While the lock is still held, so that no newer relay's socket is removed.
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The relay's thread: answers one caller at a time until `stopped` hangs up.
fn serve(listener: &UnixListener, stopped: &io::PipeReader, store: &dyn Storage, key: &str) {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        match listener.accept() {
            // A failure with one caller (gone, too slow, not this user) is that caller's.
            Ok((stream, _)) => drop(answer(stream, store, key)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Reads one request from `stream`, acts on it, and writes the reply.
fn answer(stream: UnixStream, store: &dyn Storage, key: &str) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let peer = getsockopt(&stream, PeerCredentials).map_err(io::Error::from)?;
    if peer.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a caller of another user",
        ));
    }
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST_BYTES)).read_line(&mut line)?;
    if !line.ends_with('\n') {
        // Cut short: the caller gave up, or sent more than a request may hold.
        return Ok(());
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(error) => Reply::Declined(format!("the request could not be read: {error}")),
        Ok(request) if request.key != key => {
            Reply::Declined("this relay serves another queue".to_owned())
        }
        Ok(request) if request.jobs.len() > MAX_JOBS => Reply::Declined(format!(
            "{} jobs are more than the {MAX_JOBS} a request may hand over",
            request.jobs.len()
        )),
        Ok(request) => match store.submit(request.jobs, request.now) {
            Ok(entries) => Reply::Done(entries),
            Err(error) => Reply::Declined(error.to_string()),
        },
    };
    let mut reply = serde_json::to_string(&reply).map_err(io::Error::other)?;
    reply.push('\n');
    (&stream).write_all(reply.as_bytes())
}

/// What [`hand_over`] came to.
#[derive(Debug)]
pub enum Handover {
    /// The relay added the jobs (or found them duplicates), as [`Storage::submit`] returns.
    Done(Vec<Enqueued>),
    /// Nothing was handed over (no relay, or one that declined): add the jobs yourself. The
    /// reason, for diagnostics.
    NotHandedOver(String),
    /// The request went out whole but no answer came back: the jobs may or may not have been
    /// added.
    Unknown(io::Error),
}

/// Hands `jobs` for the queue `key` to the relay on the socket `path`, if one is there.
pub fn hand_over(path: &Path, key: &str, jobs: &[NewJob], now: Timestamp) -> Handover {
    if jobs.len() > MAX_JOBS {
        return Handover::NotHandedOver(format!("more than {MAX_JOBS} jobs"));
    }
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error) => {
            return Handover::NotHandedOver(format!("no relay at {}: {error}", path.display()));
        }
    };
    let request = Request {
        key: key.to_owned(),
        now,
        jobs: jobs.to_vec(),
    };
    let mut line = serde_json::to_string(&request).expect("a request serialises");
    line.push('\n');
    let sent = stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| (&stream).write_all(line.as_bytes()));
    if let Err(error) = sent {
        // The relay acts only on a whole line, and this one did not get out whole.
        return Handover::NotHandedOver(format!("the relay did not take the request: {error}"));
    }
    let mut reply = String::new();
    let read = stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| BufReader::new(&stream).read_line(&mut reply));
    match read {
        Ok(_) if reply.ends_with('\n') => match serde_json::from_str(&reply) {
            Ok(Reply::Done(entries)) => Handover::Done(entries),
            Ok(Reply::Declined(reason)) => Handover::NotHandedOver(reason),
            Err(error) => Handover::Unknown(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the relay's answer could not be read: {error}"),
            )),
        },
        Ok(_) => Handover::Unknown(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the relay closed the connection without answering",
        )),
        Err(error) => Handover::Unknown(error),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Handover, Relay, hand_over, socket_in};
    use crate::job::{JobId, NewJob, now};
    use crate::memory::MemoryStorage;
    use crate::storage::Storage;

    const KEY: &str = "test queue";

    fn job(id: &str, command: &str) -> NewJob {
        let mut job = NewJob::new(command);
        job.id = Some(JobId::new(id).unwrap());
        job
    }

    /// A relay over a fresh memory store, on a socket in a fresh directory.
    fn relay() -> (tempfile::TempDir, Arc<MemoryStorage>, Relay) {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir.path().join("queuectl"), KEY).unwrap();
        let store = Arc::new(MemoryStorage::new());
        let relay = Relay::start(store.clone(), &socket, KEY)
            .unwrap()
            .expect("no other relay");
        (dir, store, relay)
    }

    fn done(handover: Handover) -> Vec<crate::storage::Enqueued> {
        match handover {
            Handover::Done(entries) => entries,
            other => panic!("not handed over: {other:?}"),
        }
    }

    #[test]
    fn handed_over_jobs_are_added_by_the_relays_store_as_given() {
        let (_dir, store, relay) = relay();
        let mut full = job("full", "echo full");
        full.priority = 7;
        full.max_retries = Some(9);
        full.queue = Some("mail".to_owned());
        full.unique_key = Some("k".to_owned());
        full.timeout = Some(Duration::new(1, 500_000_001));
        full.run_at = Some(now() + Duration::from_nanos(3_600_000_000_123));
        let mut later = job("later", "echo later");
        later.after = vec![JobId::new("full").unwrap()];
        let at = now();
        let entries = done(hand_over(relay.path(), KEY, &[full.clone(), later], at));
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| !e.duplicate));
        let stored = store.get(&JobId::new("full").unwrap()).unwrap();
        assert_eq!(entries[0].job, stored, "the reply is the stored job");
        assert_eq!(stored.command, "echo full");
        assert_eq!(stored.priority, 7);
        assert_eq!(stored.max_retries, 9);
        assert_eq!(stored.queue, "mail");
        assert_eq!(stored.unique_key.as_deref(), Some("k"));
        assert_eq!(stored.timeout, full.timeout);
        assert_eq!(Some(stored.run_at), full.run_at);
        assert_eq!(stored.created_at, at, "the caller's time is the job's");
        let later = store.get(&JobId::new("later").unwrap()).unwrap();
        assert_eq!(later.after, [JobId::new("full").unwrap()]);
        assert!(later.blocked);

        // A duplicate by unique key comes back as the job holding the key.
        let mut again = job("again", "echo again");
        again.unique_key = Some("k".to_owned());
        let entries = done(hand_over(relay.path(), KEY, &[again], now()));
        assert!(entries[0].duplicate);
        assert_eq!(entries[0].job.id.as_str(), "full");
    }

    #[test]
    fn a_request_the_store_refuses_or_for_another_queue_is_declined_and_changes_nothing() {
        let (_dir, store, relay) = relay();
        done(hand_over(relay.path(), KEY, &[job("taken", "true")], now()));
        let before = store.list(&Default::default()).unwrap();
        let refused = hand_over(
            relay.path(),
            KEY,
            &[job("fresh", "true"), job("taken", "true")],
            now(),
        );
        assert!(
            matches!(&refused, Handover::NotHandedOver(why) if why.contains("taken")),
            "{refused:?}"
        );
        let other = hand_over(relay.path(), "another queue", &[job("x", "true")], now());
        assert!(
            matches!(&other, Handover::NotHandedOver(why) if why.contains("another queue")),
            "{other:?}"
        );
        assert_eq!(store.list(&Default::default()).unwrap(), before);
    }

    #[test]
    fn without_a_live_relay_nothing_is_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir.path().join("queuectl"), KEY).unwrap();
        let none = hand_over(&socket, KEY, &[job("a", "true")], now());
        assert!(matches!(none, Handover::NotHandedOver(_)), "{none:?}");
        // The socket a dead relay left behind.
        drop(UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let stale = hand_over(&socket, KEY, &[job("a", "true")], now());
        assert!(matches!(stale, Handover::NotHandedOver(_)), "{stale:?}");
        // A new relay takes its place.
        let store = Arc::new(MemoryStorage::new());
        let relay = Relay::start(store.clone(), &socket, KEY).unwrap().unwrap();
        done(hand_over(&socket, KEY, &[job("a", "true")], now()));
        relay.stop();
        assert!(!socket.exists(), "a stopped relay removes its socket");
        assert_eq!(store.list(&Default::default()).unwrap().len(), 1);
    }

    #[test]
    fn a_second_relay_on_the_socket_stands_aside_while_the_first_runs() {
        let (_dir, first_store, first) = relay();
        let second_store = Arc::new(MemoryStorage::new());
        let second = Relay::start(second_store.clone(), first.path(), KEY).unwrap();
        assert!(second.is_none(), "two relays on one socket");
        done(hand_over(first.path(), KEY, &[job("a", "true")], now()));
        assert_eq!(first_store.list(&Default::default()).unwrap().len(), 1);
        let path = first.path().to_owned();
        first.stop();
        let second = Relay::start(second_store.clone(), &path, KEY).unwrap();
        assert!(
            second.is_some(),
            "the socket is free once the first stopped"
        );
        done(hand_over(&path, KEY, &[job("b", "true")], now()));
        assert_eq!(second_store.list(&Default::default()).unwrap().len(), 1);
    }

    #[test]
    fn a_relay_gone_before_it_answers_leaves_the_outcome_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir.path().join("queuectl"), KEY).unwrap();
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            // Took the whole request, then died without a word.
            assert!(line.ends_with('\n'));
        });
        let unknown = hand_over(&socket, KEY, &[job("a", "true")], now());
        server.join().unwrap();
        assert!(matches!(unknown, Handover::Unknown(_)), "{unknown:?}");
    }

    #[test]
    fn a_directory_others_may_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("made");
        socket_in(&made, KEY).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "made private");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let refused = socket_in(&open, KEY).unwrap_err();
        assert!(
            refused.to_string().contains("others may open it"),
            "{refused}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let refused = socket_in(&file, KEY).unwrap_err();
        assert!(refused.to_string().contains("file"), "{refused}");
    }
}
