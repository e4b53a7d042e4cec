//! Dead-worker detection and recovery of the jobs dead workers abandoned.
//!
//! A worker is judged dead by a process on the same host only when it can be sure: the host
//! name matches, the boot id and the PID namespace recorded at registration are this process's
//! own, and the recorded pid is gone, a zombie, or now belongs to a process that started later
//! (the pid was reused). In every other case (another host, another container sharing the host
//! name, a record without identity) the worker's lease decides: its jobs return to the queue
//! when their leases expire.

use std::time::Duration;

use crate::job::{Job, Timestamp};
use crate::storage::{ProcessIdentity, Storage, WorkerInfo};

/// The host name, for worker ids and dead-worker detection.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl ProcessIdentity {
    /// The identity of the calling process.
    pub fn current() -> Self {
        Self::of(std::process::id())
    }

    /// The identity of process `pid` as this process sees it (its start time is `None` when
    /// there is no such process).
    pub fn of(pid: u32) -> Self {
        Self {
            boot_id: boot_id(),
            pid_namespace: pid_namespace(),
            start_time: stat(pid).map(|s| s.start_time),
        }
    }
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// The inode of this process's PID namespace.
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// The state letter: `R`, `S`, `Z` (zombie), `X` (dead), …
    state: char,
    /// Clock ticks after boot when it started.
    start_time: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted after the last `)`.
fn parse_stat(line: &str) -> Option<Stat> {
    let (_, rest) = line.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; field 22 the start time.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// Whether `worker` is certainly dead, as seen from a process with identity `here` on host
/// `host`: the host name, boot id and PID namespace match ours, and its pid is gone, a
/// zombie, or held by a process that started later. Otherwise its lease decides.
pub fn is_dead(worker: &WorkerInfo, host: &str, here: &ProcessIdentity) -> bool {
    fn known<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
        a.is_some() && a == b
    }
    let same_host = worker.hostname == host
        && known(&worker.identity.boot_id, &here.boot_id)
        && known(&worker.identity.pid_namespace, &here.pid_namespace);
    if !same_host || worker.identity.start_time.is_none() {
        return false;
    }
    match stat(worker.pid) {
        None => {
            // No such process, as long as `/proc` can be read at all.
            stat(std::process::id()).is_some()
        }
        Some(Stat { state, start_time }) => {
            matches!(state, 'Z' | 'X') || Some(start_time) != worker.identity.start_time
        }
    }
}

/// Returns to the queue every job abandoned by a dead worker: leases that expired, and the jobs
/// of workers judged dead by [`is_dead`] (no need to wait for their leases). Workers silent for
/// longer than `stale_after` are deregistered, but their jobs keep their leases until they
/// expire: a silent worker may be alive with a longer lease than ours.
pub fn recover_abandoned(
    storage: &dyn Storage,
    hostname: &str,
    stale_after: Duration,
    at: Timestamp,
) -> crate::Result<Vec<Job>> {
    let here = ProcessIdentity::current();
    let mut recovered = Vec::new();
    for worker in storage.workers()? {
        if worker.identity == here && worker.pid == std::process::id() {
            continue;
        }
        if is_dead(&worker, hostname, &here) {
            recovered.extend(storage.recover_worker(&worker.id, at)?);
            storage.deregister_worker(&worker.id)?;
        } else if at - worker.last_seen > stale_after {
            storage.deregister_worker(&worker.id)?;
        }
    }
    recovered.extend(storage.recover_expired(at)?);
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::now;

    fn worker(pid: u32, identity: ProcessIdentity) -> WorkerInfo {
        WorkerInfo {
            id: "w".into(),
            hostname: hostname(),
            pid,
            concurrency: 1,
            started_at: now(),
            last_seen: now(),
            stop_requested: false,
            stop_forced: false,
            identity,
            queues: Vec::new(),
        }
    }

    #[test]
    fn stat_lines_are_parsed_after_the_command_name() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("12 (x) Z 1"), None);
    }

    #[test]
    fn this_process_is_alive_and_its_identity_is_complete() {
        let here = ProcessIdentity::current();
        assert!(here.boot_id.is_some() && here.pid_namespace.is_some());
        assert!(here.start_time.is_some());
        assert!(!is_dead(
            &worker(std::process::id(), here.clone()),
            &hostname(),
            &here
        ));
    }

    #[test]
    fn a_reaped_process_is_dead_but_only_with_a_full_matching_identity() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let identity = ProcessIdentity::of(child.id());
        assert!(identity.start_time.is_some());
        child.wait().unwrap();
        let here = ProcessIdentity::current();
        let dead = worker(child.id(), identity.clone());
        assert!(is_dead(&dead, &hostname(), &here));

        // Another PID namespace, another boot, another host, or no identity: the lease decides.
        let other_ns = ProcessIdentity {
            pid_namespace: identity.pid_namespace.map(|n| n + 1),
            ..identity.clone()
        };
        let other_boot = ProcessIdentity {
            boot_id: Some("another-boot".into()),
            ..identity.clone()
        };
        for identity in [other_ns, other_boot, ProcessIdentity::default()] {
            assert!(!is_dead(&worker(child.id(), identity), &hostname(), &here));
        }
        assert!(!is_dead(&dead, "another-host", &here));
    }

    #[test]
    fn a_zombie_is_dead_and_a_reused_pid_is_not_the_worker() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let identity = ProcessIdentity::of(child.id());
        let here = ProcessIdentity::current();
        let alive = worker(child.id(), identity.clone());
        assert!(!is_dead(&alive, &hostname(), &here));

        // A pid that another, later process holds now.
        let reused = ProcessIdentity {
            start_time: identity.start_time.map(|t| t.saturating_sub(1)),
            ..identity.clone()
        };
        assert!(is_dead(&worker(child.id(), reused), &hostname(), &here));

        // Killed but not reaped: a zombie.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        nix::sys::wait::waitid(
            nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(child.id() as i32)),
            nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
        )
        .unwrap();
        assert_eq!(stat(child.id()).map(|s| s.state), Some('Z'));
        assert!(is_dead(&alive, &hostname(), &here));
        child.wait().unwrap();
    }
}
