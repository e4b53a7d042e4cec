//! Enqueues handed to a worker on the same machine.
//!
//! A one-shot `queuectl enqueue` on PostgreSQL pays for a new server process each run: the
//! connection, authentication, and the first use of every table it touches, several times the
//! cost of its one insert. A worker already holds open connections. While it runs, a worker
//! serves its queue's enqueues on a Unix socket (a [`Relay`]), in a directory that only its
//! user may open ([`socket_to_serve`]); an enqueue that finds the socket
//! ([`socket_to_call`]) hands its jobs over ([`hand_over`]) and gets back what
//! [`Storage::submit`] returned in the worker. One that finds no socket, or whose jobs the
//! worker declines, adds them itself, so nothing depends on a worker running.
//!
//! A request is one JSON line, `{"protocol", "key", "jobs"}`, and is acted on only when it
//! arrived whole; the reply is one JSON line too. The key names the queue (the database and
//! schema, say): a relay declines a request for any other, so two queues whose keys share a
//! socket name cannot mix, and a request of another protocol version, or with fields it does
//! not know, so that no field is dropped on the way.
//!
//! What a reply means:
//! - done: `submit` returned, so the jobs it reports added are committed;
//! - declined: the store refused the jobs (a taken id, say) or the relay would not take them,
//!   and nothing changed;
//! - failed: the store failed (the database could not be reached, say), and as for a direct
//!   `submit` that fails, the jobs may have been added if it was the commit that failed. Jobs
//!   given ids before they were handed over cannot then be added twice by adding them again.
//!
//! A worker that dies after it read a request and before it answered leaves the outcome
//! unknown, which the caller is told ([`Handover::Unknown`]) and must not guess at. A stopping
//! relay first removes its socket, so that no new caller reaches it, then answers the callers
//! already waiting, as it answers those it is serving.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket,
    sockopt::PeerCredentials,
};
use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::job::{NewJob, now};
use crate::storage::{Enqueued, Storage};

/// The most jobs one request hands over. For a larger batch a connection of its own is a
/// small part of the cost.
pub const MAX_JOBS: usize = 1_000;
/// The version of the request and reply lines.
const PROTOCOL: u32 = 1;
/// The longest a caller may take to send its whole request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a relay working on a request tells its caller it is still at it.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The longest a caller waits without a word from the relay (its answer, or a heartbeat)
/// before it takes the worker for stuck or gone.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a caller waits for the answer in all, heartbeats or not (a database link that
/// stalled holds the worker's statement for as long as TCP takes to give up).
const REPLY_LIMIT: Duration = Duration::from_secs(60);
/// The longest a stopping relay waits for the answers of the callers it is serving.
const STOP_PATIENCE: Duration = Duration::from_secs(10);
/// The longest request line a relay reads; a caller with a longer one adds its jobs itself.
/// With [`MAX_CALLERS`] callers at once, the most the relay holds of requests is 256 MiB.
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Callers served at once; more are declined at once, and add their jobs themselves.
const MAX_CALLERS: usize = 16;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    protocol: u32,
    key: String,
    jobs: Vec<NewJob>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    /// What `submit` returned: the jobs are committed.
    Done(Vec<Enqueued>),
    /// `submit` returned, but what it returned could not be written as JSON.
    DoneUnshown(String),
    /// Not added, nothing changed, with the reason.
    Declined(String),
    /// The store failed, with the reason.
    Failed(String),
}

/// The key of the queue in the schema `schema` of the PostgreSQL database at `url`.
pub fn database_key(url: &str, schema: &str) -> String {
    format!("postgresql\n{url}\n{schema}")
}

/// Where this user's relays put their sockets: `$XDG_RUNTIME_DIR/queuectl`, or where that is
/// not set (or not an absolute path, which the XDG rules say to ignore) `queuectl-UID` under
/// the temporary directory.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| Path::new(dir).is_absolute()) {
        Some(dir) => PathBuf::from(dir).join("queuectl"),
        None => std::env::temp_dir().join(format!("queuectl-{}", nix::unistd::geteuid())),
    }
}

/// The socket a relay for the queue `key` serves on in `dir` ([`runtime_dir`]). `dir` is
/// created, private to this user, when missing; its parent must exist and belong to this user
/// or to root. A directory another user owns, or that others may open, is refused, not used.
pub fn socket_to_serve(dir: &Path, key: &str) -> io::Result<PathBuf> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let parent_meta = fs::metadata(parent)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", parent.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    if parent_meta.uid() != me && parent_meta.uid() != 0 {
        return Err(refused(
            dir,
            &format!(
                "{} belongs to user {}, not to this one ({me})",
                parent.display(),
                parent_meta.uid()
            ),
        ));
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io::Error::new(
                error.kind(),
                format!("cannot create {}: {error}", dir.display()),
            ));
        }
        _ => {}
    }
    check_private(dir)?;
    Ok(socket_in(dir, key))
}

/// The socket of a relay for the queue `key` in `dir`, if there is one in a directory private
/// to this user (nothing is created).
pub fn socket_to_call(dir: &Path, key: &str) -> Option<PathBuf> {
    check_private(dir).ok()?;
    let socket = socket_in(dir, key);
    socket.exists().then_some(socket)
}

fn socket_in(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{:08x}.sock", crc32fast::hash(key.as_bytes())))
}

fn refused(dir: &Path, problem: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is not used for the local relay: {problem}",
            dir.display()
        ),
    )
}

/// Checks that `dir` is a directory only this user may open.
fn check_private(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", dir.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() {
        Err(refused(dir, "it is not a directory"))
    } else if meta.uid() != me {
        Err(refused(
            dir,
            &format!("it belongs to user {}, not to this one ({me})", meta.uid()),
        ))
    } else if meta.mode() & 0o077 != 0 {
        Err(refused(
            dir,
            &format!(
                "others may open it (mode {:o}, 700 wanted)",
                meta.mode() & 0o777
            ),
        ))
    } else {
        Ok(())
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

/// What the relay's threads share.
struct Shared {
    store: Arc<dyn Storage>,
    key: String,
    /// Callers being served, and its change told.
    callers: parking_lot::Mutex<usize>,
    caller_left: parking_lot::Condvar,
}

impl Shared {
    /// Counts a new caller in, unless [`MAX_CALLERS`] are being served.
    fn arrive(&self) -> bool {
        let mut callers = self.callers.lock();
        if *callers >= MAX_CALLERS {
            return false;
        }
        *callers += 1;
        true
    }

    /// Counts a caller out.
    fn leave(&self) {
        *self.callers.lock() -= 1;
        self.caller_left.notify_all();
    }

    /// Waits until no caller is being served, or `patience` has passed.
    fn wait_for_callers(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        let mut callers = self.callers.lock();
        while *callers > 0 {
            if self
                .caller_left
                .wait_until(&mut callers, deadline)
                .timed_out()
            {
                return;
            }
        }
    }
}

impl Relay {
    /// Serves enqueues for the queue `key` into `store` on the socket `path`
    /// ([`socket_to_serve`]), on threads of its own. `Ok(None)` when another live relay already
    /// serves that socket. A socket left behind by a relay that died is replaced.
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
        let bound = fs::symlink_metadata(path).map_err(|error| context("cannot read", error))?;
        let identity = (bound.dev(), bound.ino());
        listener
            .set_nonblocking(true)
            .map_err(|error| context("cannot set up", error))?;
        let (stopped, stop) = io::pipe()?;
        let shared = Arc::new(Shared {
            store,
            key: key.to_owned(),
            callers: parking_lot::Mutex::new(0),
            caller_left: parking_lot::Condvar::new(),
        });
        let socket = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("queuectl-relay".into())
            .spawn(move || serve(&listener, &stopped, &socket, identity, &shared))?;
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

    /// Stops serving: the socket is removed, and the callers already connected are answered
    /// first (waiting for them 10 s at most).
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The relay's accepting thread: a thread per caller, until `stopped` hangs up. Then the
/// socket is removed, if it is still the one bound (`identity`: its device and inode; a
/// cleaner of old files may have removed it and a newer relay bound its own), the callers
/// already waiting are taken, and their answers are waited for, [`STOP_PATIENCE`] at most.
fn serve(
    listener: &UnixListener,
    stopped: &io::PipeReader,
    path: &Path,
    identity: (u64, u64),
    shared: &Arc<Shared>,
) {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        if fds[1].any().unwrap_or(true) {
            break;
        }
        take_callers(listener, shared);
    }
    if fs::symlink_metadata(path).is_ok_and(|meta| (meta.dev(), meta.ino()) == identity) {
        let _ = fs::remove_file(path);
    }
    take_callers(listener, shared);
    // A caller whose answer waits on a database that stalled is left to find the worker gone
    // (its answer is unknown to it, as it is to the worker).
    shared.wait_for_callers(STOP_PATIENCE);
}

/// Accepts every caller waiting on `listener`, each answered on a thread of its own (counted
/// in [`Shared::callers`], which is what a stop waits on).
fn take_callers(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of file descriptors or memory, say: the callers wait, or add their jobs
                // themselves once their wait is over.
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        };
        if !shared.arrive() {
            decline(
                &stream,
                &format!("the worker serves {MAX_CALLERS} callers already"),
            );
            continue;
        }
        let caller = shared.clone();
        let declined = match stream.try_clone() {
            Ok(clone) => clone,
            Err(error) => {
                shared.leave();
                decline(
                    &stream,
                    &format!("the worker cannot serve the request: {error}"),
                );
                continue;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("queuectl-relay-caller".into())
            .spawn(move || {
                // A failure with one caller (gone, too slow, not this user) is that caller's.
                let _ = answer(&stream, &caller);
                caller.leave();
            });
        match spawned {
            Ok(_) => {}
            Err(error) => {
                shared.leave();
                decline(
                    &declined,
                    &format!("the worker cannot serve the request: {error}"),
                );
            }
        }
    }
}

/// Answers `stream` that nothing is added, if it can (the caller then adds its jobs itself).
fn decline(stream: &UnixStream, reason: &str) {
    let _ = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .and_then(|()| send(stream, &Reply::Declined(reason.to_owned())));
}

/// Reads one request from `stream`, acts on it, and writes the reply.
fn answer(stream: &UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let peer = match getsockopt(stream, PeerCredentials) {
        Ok(peer) => peer,
        Err(error) => {
            decline(
                stream,
                &format!("the caller's user could not be read: {error}"),
            );
            return Ok(());
        }
    };
    if peer.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a caller of another user",
        ));
    }
    let line = match read_request(stream)? {
        Ok(line) => line,
        Err(reason) => {
            decline(stream, &reason);
            return Ok(());
        }
    };
    let reply = match serde_json::from_slice::<Request>(&line) {
        Err(error) => Reply::Declined(format!("the request could not be read: {error}")),
        Ok(request) if request.protocol != PROTOCOL => Reply::Declined(format!(
            "the request is of protocol {}, this worker's {PROTOCOL}",
            request.protocol
        )),
        Ok(request) if request.key != shared.key => {
            Reply::Declined("this relay serves another queue".to_owned())
        }
        Ok(request) if request.jobs.len() > MAX_JOBS => Reply::Declined(format!(
            "{} jobs are more than the {MAX_JOBS} a request may hand over",
            request.jobs.len()
        )),
        // A caller that gave up waiting (this worker was stopped with SIGSTOP, say) was told
        // the outcome is unknown and may look and add the jobs again: leave them to it.
        Ok(_) if caller_gone(stream) => return Ok(()),
        Ok(request) => submit_beating(stream, shared, request.jobs),
    };
    match send(stream, &reply) {
        Err(error) if error.kind() == io::ErrorKind::InvalidData => send(
            stream,
            &Reply::DoneUnshown(format!(
                "the jobs added could not be written as JSON: {error}"
            )),
        ),
        other => other,
    }
}

/// Whether the caller on `stream` has hung up (its request read, it has nothing more to send,
/// so a look at what comes next finds the end of the stream, or an error).
fn caller_gone(stream: &UnixStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    match recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(0) => true,
        Ok(_) => false,
        Err(nix::errno::Errno::EAGAIN) => false,
        Err(_) => true,
    }
}

/// Adds `jobs` to the store, writing a space to the caller every [`HEARTBEAT`] meanwhile so
/// that it waits as long as the store takes (a lock held elsewhere, say), and no longer than
/// [`SILENCE_TIMEOUT`] for a worker that is stuck.
fn submit_beating(stream: &UnixStream, shared: &Shared, jobs: Vec<NewJob>) -> Reply {
    let finished = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let beating = scope.spawn(|| {
            loop {
                std::thread::park_timeout(HEARTBEAT);
                if finished.load(Ordering::SeqCst) || (&*stream).write_all(b" ").is_err() {
                    return;
                }
            }
        });
        // The job's creation time is taken here, where a direct enqueue takes it: after its
        // connection is ready, before its transaction.
        let submitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.store.submit(jobs, now())
        }));
        let reply = match submitted {
            Ok(Ok(entries)) => Reply::Done(entries),
            Ok(Err(error)) if is_refusal(&error) => Reply::Declined(error.to_string()),
            Ok(Err(error)) => Reply::Failed(error.to_string()),
            Err(_) => Reply::Failed("the worker failed while adding the jobs".to_owned()),
        };
        finished.store(true, Ordering::SeqCst);
        beating.thread().unpark();
        reply
    })
}

/// Whether `error` says the store refused the jobs for what they are, having changed nothing
/// (not that it failed).
fn is_refusal(error: &StorageError) -> bool {
    matches!(
        error,
        StorageError::AlreadyExists { .. }
            | StorageError::NotFound { .. }
            | StorageError::InvalidState { .. }
            | StorageError::InvalidJob(_)
            | StorageError::DependencyNotFound { .. }
            | StorageError::DependencyFailed { .. }
            | StorageError::UniqueKeyTaken { .. }
            | StorageError::Config(_)
    )
}

/// The request line, read within [`REQUEST_TIMEOUT`] of now; `Err` with the reason when it
/// did not come whole in time or is longer than [`MAX_REQUEST_BYTES`].
fn read_request(stream: &UnixStream) -> io::Result<Result<Vec<u8>, String>> {
    let late = || {
        Err(format!(
            "the request did not come whole within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))
    };
    let long = || {
        Err(format!(
            "the request is longer than {MAX_REQUEST_BYTES} bytes"
        ))
    };
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(late());
        }
        stream.set_read_timeout(Some(left))?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(0) => {
                return Ok(Err(
                    "the caller left before its request was whole".to_owned()
                ));
            }
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if timed_out(&error) => {
                return Ok(late());
            }
            Err(error) => return Err(error),
        };
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            return Ok(if line.len() <= MAX_REQUEST_BYTES {
                Ok(line)
            } else {
                long()
            });
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() > MAX_REQUEST_BYTES {
            return Ok(long());
        }
    }
}

/// Whether a read with a time limit ran out of time.
fn timed_out(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes `reply` as one line; `InvalidData` when it cannot be written as JSON.
fn send(stream: &UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    line.push(b'\n');
    (&*stream).write_all(&line)
}

/// What [`hand_over`] came to.
#[derive(Debug)]
pub enum Handover {
    /// The relay added the jobs (or found them duplicates), as [`Storage::submit`] returns.
    Done(Vec<Enqueued>),
    /// The relay added the jobs, but could not say how (the reason).
    DoneUnshown(String),
    /// Nothing was handed over, or the relay declined the jobs, and nothing changed: add them
    /// yourself. The reason, for diagnostics.
    NotHandedOver(String),
    /// The relay's store failed (the reason): add the jobs yourself, with the same ids, since
    /// the jobs may have been added if it was the commit that failed.
    Failed(String),
    /// The request went out whole but no answer came back: the jobs may or may not have been
    /// added.
    Unknown(String),
}

/// Hands `jobs` for the queue `key` to the relay on the socket `path` ([`socket_to_call`]).
pub fn hand_over(path: &Path, key: &str, jobs: &[NewJob]) -> Handover {
    if jobs.len() > MAX_JOBS {
        return Handover::NotHandedOver(format!("more than {MAX_JOBS} jobs"));
    }
    let request = Request {
        protocol: PROTOCOL,
        key: key.to_owned(),
        jobs: jobs.to_vec(),
    };
    let mut line = match serde_json::to_vec(&request) {
        Ok(line) if line.len() <= MAX_REQUEST_BYTES => line,
        Ok(_) => return Handover::NotHandedOver("the request is too long".to_owned()),
        Err(error) => {
            return Handover::NotHandedOver(format!("the jobs cannot be written as JSON: {error}"));
        }
    };
    line.push(b'\n');
    let stream = match connect_now(path) {
        Ok(stream) => stream,
        Err(error) => {
            return Handover::NotHandedOver(format!("no relay at {}: {error}", path.display()));
        }
    };
    let sent = stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| (&stream).write_all(&line));
    if let Err(error) = sent {
        // The relay acts only on a whole line, and this one did not get out whole.
        return Handover::NotHandedOver(format!("the relay did not take the request: {error}"));
    }
    match read_reply(&stream) {
        Ok(reply) => match serde_json::from_slice(&reply) {
            Ok(Reply::Done(entries)) => Handover::Done(entries),
            Ok(Reply::DoneUnshown(reason)) => Handover::DoneUnshown(reason),
            Ok(Reply::Declined(reason)) => Handover::NotHandedOver(reason),
            Ok(Reply::Failed(reason)) => Handover::Failed(reason),
            Err(error) => Handover::Unknown(format!("its answer could not be read: {error}")),
        },
        Err(reason) => Handover::Unknown(reason),
    }
}

/// The relay's answer line, heartbeats before it included; `Err` with the reason when it did
/// not come: the relay closed without it, went [`SILENCE_TIMEOUT`] without a word, or took
/// longer than [`REPLY_LIMIT`] in all. Read up to the end of the line and no further: a relay
/// that declined before reading the request closes with it unread, and a read past the
/// answer would then fail.
fn read_reply(stream: &UnixStream) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + REPLY_LIMIT;
    let mut reply = Vec::new();
    let mut reader = io::BufReader::new(stream);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {} s", REPLY_LIMIT.as_secs()));
        }
        stream
            .set_read_timeout(Some(left.min(SILENCE_TIMEOUT)))
            .map_err(|error| format!("its answer could not be awaited: {error}"))?;
        let available = match reader.fill_buf() {
            Ok([]) => return Err("it closed the connection without answering".to_owned()),
            Ok(available) => available,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if timed_out(&error) => {
                return Err(match left <= SILENCE_TIMEOUT {
                    true => format!("no answer within {} s", REPLY_LIMIT.as_secs()),
                    false => format!("no word from it for {} s", SILENCE_TIMEOUT.as_secs()),
                });
            }
            Err(error) => return Err(format!("its answer did not come: {error}")),
        };
        match available.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reply.extend_from_slice(&available[..=end]);
                return Ok(reply);
            }
            None => {
                let n = available.len();
                reply.extend_from_slice(available);
                reader.consume(n);
            }
        }
    }
}

/// Adds `jobs` to `store` after a [`Handover::Failed`] for them, begun at `since`. The relay's
/// commit may have taken effect all the same: then the jobs are there already under the ids
/// they were handed over with, created since `since` with the same commands, and they are
/// returned as the relay's `submit` would have returned them, rather than refused as taken
/// (or, for a unique key, as duplicates of themselves).
pub fn submit_after_failure(
    store: &dyn Storage,
    jobs: Vec<NewJob>,
    since: crate::job::Timestamp,
) -> crate::Result<Vec<Enqueued>> {
    let ours = |job: &NewJob, found: &crate::job::Job| {
        job.id.as_ref() == Some(&found.id)
            && found.command == job.command
            && found.created_at >= since
    };
    match store.submit(jobs.clone(), now()) {
        Ok(mut entries) => {
            for (job, entry) in jobs.iter().zip(&mut entries) {
                if entry.duplicate && ours(job, &entry.job) {
                    entry.duplicate = false;
                }
            }
            Ok(entries)
        }
        Err(StorageError::AlreadyExists { id }) => {
            let found: Vec<Option<crate::job::Job>> = jobs
                .iter()
                .map(|job| {
                    let stored = job.id.as_ref().and_then(|id| store.get(id).ok());
                    stored.filter(|stored| ours(job, stored))
                })
                .collect();
            // The batch is all or nothing: if none of it is there, the id was taken before.
            // If some is, the others were duplicates by unique key in the relay's commit (of
            // a job there before, or of one earlier in the batch), and only those can be.
            let rest: Vec<NewJob> = jobs
                .iter()
                .zip(&found)
                .filter(|(_, found)| found.is_none())
                .map(|(job, _)| job.clone())
                .collect();
            if found.iter().all(Option::is_none) || rest.iter().any(|j| j.unique_key.is_none()) {
                return Err(StorageError::AlreadyExists { id });
            }
            // What they are duplicates of: adding them again finds it.
            let mut again = match rest.is_empty() {
                true => Vec::new(),
                false => store.submit(rest, now())?,
            }
            .into_iter();
            Ok(found
                .into_iter()
                .map(|found| match found {
                    Some(job) => Enqueued {
                        job,
                        duplicate: false,
                    },
                    None => again.next().expect("an entry for each job submitted"),
                })
                .collect())
        }
        Err(error) => Err(error),
    }
}

/// A connection to `path` that fails at once, rather than waiting, when the relay has more
/// callers waiting than its socket queues.
fn connect_now(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Handover, Relay, hand_over, socket_to_call, socket_to_serve};
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
        let socket = socket_to_serve(&dir.path().join("queuectl"), KEY).unwrap();
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

    fn count(store: &MemoryStorage) -> usize {
        store.list(&Default::default()).unwrap().len()
    }

    /// A stand-in for a relay, serving one caller: it reads the whole request, then `then`
    /// does with the connection what the test needs.
    fn fake_relay(
        then: impl FnOnce(&UnixStream) + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_to_serve(&dir.path().join("queuectl"), KEY).unwrap();
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert!(line.ends_with('\n'));
            then(&stream);
        });
        (dir, socket, server)
    }

    /// A request line of protocol `protocol` for one job.
    fn request_line(protocol: u32, job: impl serde::Serialize) -> String {
        let request = serde_json::json!({ "protocol": protocol, "key": KEY, "jobs": [job] });
        format!("{request}\n")
    }

    /// Sends `line` on a connection of its own to `path` and returns the reply line.
    fn raw_request(path: &std::path::Path, line: &str) -> String {
        let stream = UnixStream::connect(path).unwrap();
        (&stream).write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply).unwrap();
        reply
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
        let before = now();
        let entries = done(hand_over(relay.path(), KEY, &[full.clone(), later]));
        let after = now();
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
        assert!((before..=after).contains(&stored.created_at));
        let later = store.get(&JobId::new("later").unwrap()).unwrap();
        assert_eq!(later.after, [JobId::new("full").unwrap()]);
        assert!(later.blocked);

        // A duplicate by unique key comes back as the job holding the key.
        let mut again = job("again", "echo again");
        again.unique_key = Some("k".to_owned());
        let entries = done(hand_over(relay.path(), KEY, &[again]));
        assert!(entries[0].duplicate);
        assert_eq!(entries[0].job.id.as_str(), "full");
    }

    #[test]
    fn a_request_the_store_refuses_or_for_another_queue_is_declined_and_changes_nothing() {
        let (_dir, store, relay) = relay();
        done(hand_over(relay.path(), KEY, &[job("taken", "true")]));
        let before = store.list(&Default::default()).unwrap();
        let refused = hand_over(
            relay.path(),
            KEY,
            &[job("fresh", "true"), job("taken", "true")],
        );
        assert!(
            matches!(&refused, Handover::NotHandedOver(why) if why.contains("taken")),
            "{refused:?}"
        );
        let other = hand_over(relay.path(), "another queue", &[job("x", "true")]);
        assert!(
            matches!(&other, Handover::NotHandedOver(why) if why.contains("another queue")),
            "{other:?}"
        );
        // Another version of the protocol, or a field this relay does not know, would lose
        // something on the way.
        let newer = raw_request(relay.path(), &request_line(2, job("y", "true")));
        assert!(
            newer.contains("declined") && newer.contains("protocol 2"),
            "{newer}"
        );
        let mut coloured = serde_json::to_value(job("z", "true")).unwrap();
        coloured["colour"] = 1.into();
        let unknown = raw_request(relay.path(), &request_line(1, coloured));
        assert!(
            unknown.contains("declined") && unknown.contains("colour"),
            "{unknown}"
        );
        assert_eq!(store.list(&Default::default()).unwrap(), before);
    }

    #[test]
    fn a_request_too_long_for_a_relay_is_not_sent() {
        let (_dir, store, relay) = relay();
        let long = "x".repeat(100_000);
        let jobs: Vec<NewJob> = (0..200)
            .map(|i| job(&format!("j{i}"), &format!("echo {long}")))
            .collect();
        let sent = hand_over(relay.path(), KEY, &jobs);
        assert!(
            matches!(&sent, Handover::NotHandedOver(why) if why.contains("too long")),
            "{sent:?}"
        );
        assert_eq!(count(&store), 0);
    }

    #[test]
    fn without_a_live_relay_nothing_is_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("queuectl");
        assert_eq!(socket_to_call(&runtime, KEY), None, "nothing there yet");
        assert!(!runtime.exists(), "looking creates nothing");
        let socket = socket_to_serve(&runtime, KEY).unwrap();
        assert_eq!(socket_to_call(&runtime, KEY), None, "no socket yet");
        let none = hand_over(&socket, KEY, &[job("a", "true")]);
        assert!(matches!(none, Handover::NotHandedOver(_)), "{none:?}");
        // The socket a dead relay left behind.
        drop(UnixListener::bind(&socket).unwrap());
        assert_eq!(socket_to_call(&runtime, KEY), Some(socket.clone()));
        let stale = hand_over(&socket, KEY, &[job("a", "true")]);
        assert!(matches!(stale, Handover::NotHandedOver(_)), "{stale:?}");
        // A new relay takes its place.
        let store = Arc::new(MemoryStorage::new());
        let relay = Relay::start(store.clone(), &socket, KEY).unwrap().unwrap();
        done(hand_over(&socket, KEY, &[job("a", "true")]));
        relay.stop();
        assert!(!socket.exists(), "a stopped relay removes its socket");
        assert_eq!(count(&store), 1);
    }

    #[test]
    fn a_second_relay_on_the_socket_stands_aside_while_the_first_runs() {
        let (_dir, first_store, first) = relay();
        let second_store = Arc::new(MemoryStorage::new());
        let second = Relay::start(second_store.clone(), first.path(), KEY).unwrap();
        assert!(second.is_none(), "two relays on one socket");
        done(hand_over(first.path(), KEY, &[job("a", "true")]));
        assert_eq!(count(&first_store), 1);
        let path = first.path().to_owned();
        first.stop();
        let second = Relay::start(second_store.clone(), &path, KEY).unwrap();
        assert!(
            second.is_some(),
            "the socket is free once the first stopped"
        );
        done(hand_over(&path, KEY, &[job("b", "true")]));
        assert_eq!(count(&second_store), 1);
    }

    /// A caller that is slow to send its request holds up only itself: another is answered
    /// meanwhile, and the slow one after it, once its request is whole (a relay serving one
    /// caller at a time would first wait out the slow one's time limit and cut it off).
    #[test]
    fn a_slow_caller_holds_up_no_one_else() {
        let (_dir, store, relay) = relay();
        let slow = UnixStream::connect(relay.path()).unwrap();
        let request = request_line(1, job("slow", "true"));
        let (first, rest) = request.split_at(10);
        (&slow).write_all(first.as_bytes()).unwrap();
        done(hand_over(relay.path(), KEY, &[job("quick", "true")]));
        (&slow).write_all(rest.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&slow).read_line(&mut reply).unwrap();
        assert!(reply.starts_with("{\"done\""), "{reply}");
        assert_eq!(count(&store), 2);
    }

    /// A caller connected when the relay is asked to stop is still answered, and the stop
    /// waits for it.
    #[test]
    fn a_stopping_relay_answers_the_callers_already_connected() {
        let (_dir, store, relay) = relay();
        let path = relay.path().to_owned();
        let caller = UnixStream::connect(&path).unwrap();
        let request = request_line(1, job("late", "true"));
        let (first, rest) = request.split_at(10);
        (&caller).write_all(first.as_bytes()).unwrap();
        let stopping = std::thread::spawn(move || relay.stop());
        let asked = std::time::Instant::now();
        while path.exists() {
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "the socket stays"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!stopping.is_finished(), "the stop waits for the caller");
        (&caller).write_all(rest.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&caller).read_line(&mut reply).unwrap();
        stopping.join().unwrap();
        assert!(reply.starts_with("{\"done\""), "{reply}");
        assert_eq!(count(&store), 1);
    }

    #[test]
    fn a_relay_gone_before_it_answers_leaves_the_outcome_unknown() {
        // Takes the whole request, then dies without a word.
        let (_dir, socket, server) = fake_relay(|_| {});
        let unknown = hand_over(&socket, KEY, &[job("a", "true")]);
        server.join().unwrap();
        assert!(matches!(unknown, Handover::Unknown(_)), "{unknown:?}");
    }

    #[test]
    fn a_directory_others_may_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("made");
        socket_to_serve(&made, KEY).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "made private");
        let deeper = dir.path().join("missing").join("queuectl");
        assert!(
            socket_to_serve(&deeper, KEY).is_err(),
            "parents are not made"
        );
        assert!(!deeper.parent().unwrap().exists());
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let refused = socket_to_serve(&open, KEY).unwrap_err();
        assert!(
            refused.to_string().contains("others may open it"),
            "{refused}"
        );
        std::fs::write(socket_to_call_path(&open), "").unwrap();
        assert_eq!(
            socket_to_call(&open, KEY),
            None,
            "not called in a shared directory"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let refused = socket_to_serve(&file, KEY).unwrap_err();
        assert!(refused.to_string().contains("file"), "{refused}");
    }

    /// What a caller reads: spaces while the relay works (heartbeats), then the answer.
    #[test]
    fn heartbeats_before_the_answer_are_waited_through() {
        let (_dir, socket, server) = fake_relay(|mut stream| {
            for _ in 0..3 {
                stream.write_all(b" ").unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            stream.write_all(b"{\"declined\":\"busy\"}\n").unwrap();
        });
        let declined = hand_over(&socket, KEY, &[job("a", "true")]);
        server.join().unwrap();
        assert!(
            matches!(&declined, Handover::NotHandedOver(why) if why == "busy"),
            "{declined:?}"
        );
    }

    /// A caller that hung up after its request is not served: it was told the outcome is
    /// unknown and may add the jobs again itself.
    #[test]
    fn a_caller_that_hung_up_is_seen_gone() {
        let (caller, relay_end) = UnixStream::pair().unwrap();
        (&caller).write_all(b"{}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&relay_end).read_line(&mut line).unwrap();
        assert!(!super::caller_gone(&relay_end), "still there");
        drop(caller);
        assert!(super::caller_gone(&relay_end), "gone");
    }

    /// After the relay's store failed, its commit may still have taken effect: the jobs
    /// found under their ids, made since the handover with the same commands, are the ones
    /// handed over; a job that was there before is refused as taken.
    #[test]
    fn jobs_added_by_a_failed_relay_after_all_are_not_refused_as_taken() {
        let store = MemoryStorage::new();
        let earlier = job("earlier", "echo earlier");
        store.submit(vec![earlier.clone()], now()).unwrap();
        let since = now();
        let mut keyed = job("keyed", "echo keyed");
        keyed.unique_key = Some("k".to_owned());
        let handed = vec![job("plain", "echo plain"), keyed];
        // The relay's commit took effect, though it said it failed.
        store.submit(handed.clone(), now()).unwrap();
        let entries = super::submit_after_failure(&store, handed.clone(), since).unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.job.id.as_str()).collect();
        assert_eq!(ids, ["plain", "keyed"]);
        assert!(entries.iter().all(|e| !e.duplicate), "{entries:?}");
        assert_eq!(count(&store), 3, "nothing added twice");
        // The job with the key alone: found as its own duplicate, which it is not.
        let entries = super::submit_after_failure(&store, handed[1..].to_vec(), since).unwrap();
        assert!(!entries[0].duplicate);
        // A job that was there before the handover is taken, as ever.
        let taken = super::submit_after_failure(&store, vec![earlier], since).unwrap_err();
        assert!(
            matches!(taken, crate::StorageError::AlreadyExists { .. }),
            "{taken}"
        );
        let other = super::submit_after_failure(&store, vec![job("plain", "echo other")], since)
            .unwrap_err();
        assert!(
            matches!(other, crate::StorageError::AlreadyExists { .. }),
            "{other}"
        );
        assert_eq!(count(&store), 3);
        // Jobs the relay did not add are added now.
        let fresh = super::submit_after_failure(&store, vec![job("fresh", "true")], since).unwrap();
        assert_eq!(fresh[0].job.id.as_str(), "fresh");
        assert_eq!(count(&store), 4);
        // A batch whose job with a key was a duplicate (of "keyed") in the relay's commit: that
        // one is not under its own id, and is found again as the duplicate it was.
        let since = now();
        let mut dup = job("dup", "echo dup");
        dup.unique_key = Some("k".to_owned());
        let batch = vec![job("plain2", "echo plain2"), dup];
        store.submit(batch.clone(), now()).unwrap();
        let entries = super::submit_after_failure(&store, batch, since).unwrap();
        let found: Vec<(&str, bool)> = entries
            .iter()
            .map(|e| (e.job.id.as_str(), e.duplicate))
            .collect();
        assert_eq!(found, [("plain2", false), ("keyed", true)]);
        assert_eq!(count(&store), 5);
    }

    fn socket_to_call_path(dir: &std::path::Path) -> std::path::PathBuf {
        super::socket_in(dir, KEY)
    }
}
