//! Waking waiters when another process changes the queue: `LISTEN` on a connection of its own.
//!
//! Every transaction that changes something sends a notification on one of the schema's two
//! channels (`pg_notify`, delivered by PostgreSQL when it commits): the work channel for
//! changes that may give a worker something to do, the quiet one for the rest
//! (`rows::Channels`). One thread per store handle keeps a dedicated connection (never one of
//! the pool's, which a transaction-mode pooler would share) listening on both, and counts
//! notifications in two generation numbers, one for each channel heard and one for the work
//! channel; waiters read one before they look at the change counter, so a notification that
//! comes between their look and their wait still ends the wait. A notification is a hint: waiters
//! look again at least every `poll_interval`, so a lost one (the connection broke and is being
//! made again) costs latency, not correctness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config};

use super::rows::Channels;
use super::tls::Connector;

use crate::generation::Generation;

/// How long the thread waits for a notification before it checks that its connection is
/// still there (a silent network can otherwise hide a dead connection for hours).
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// The longest pause between attempts to connect again.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// The listening thread of one store handle, or nothing in poll-only mode.
pub(super) struct Listener {
    shared: Arc<Shared>,
    running: Option<Running>,
}

/// Which notifications a waiter counts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Heard {
    /// On either channel: any change.
    Any,
    /// On the work channel: changes that may give a worker something to do.
    Work,
}

#[derive(Default)]
struct Shared {
    /// Notifications on any channel.
    heard: Generation,
    /// Notifications on the work channel ([`Channels`]).
    heard_work: Generation,
    stop: AtomicBool,
}

struct Running {
    thread: JoinHandle<()>,
    /// The channel only this handle listens on: a notification there stops the thread.
    stop_channel: String,
}

impl Shared {
    fn of(&self, heard: Heard) -> &Generation {
        match heard {
            Heard::Any => &self.heard,
            Heard::Work => &self.heard_work,
        }
    }
}

impl Listener {
    /// A listener that never hears anything: waiters poll.
    pub(super) fn poll_only() -> Self {
        Self {
            shared: Arc::default(),
            running: None,
        }
    }

    /// Starts connecting, on the listening thread, and listening on `channels`, while the
    /// caller does what else it has to ([`Starting::listening`] waits for it). The store
    /// opens its first pooled connection meanwhile: a server's start of the two new
    /// processes goes on at once.
    pub(super) fn start(config: &Config, connector: &Connector, channels: &Channels) -> Starting {
        let listener = Self::poll_only();
        let stop_channel = format!(
            "queuectl_stop_{}_{:016x}",
            std::process::id(),
            crate::job::random_u64()
        );
        let work = channels.work.clone();
        let channels = [work.clone(), channels.quiet.clone(), stop_channel.clone()];
        let shared = listener.shared.clone();
        let config = config.clone();
        let connector = connector.clone();
        // A rendezvous: once the store gave up waiting (it failed to open), the thread's
        // word finds nobody, and it ends.
        let (started, outcome) = crossbeam_channel::bounded(0);
        let thread = std::thread::Builder::new()
            .name("queuectl-pg-listen".into())
            .spawn(move || {
                let client = match listen(&config, &connector, &channels) {
                    Ok(client) => client,
                    Err(error) => {
                        let _ = started.send(Err(error));
                        return;
                    }
                };
                // Nobody waits any more: the store failed to open.
                if started.send(Ok(())).is_err() {
                    return;
                }
                run(client, &config, &connector, &channels, &work, &shared)
            })
            .expect("spawn the listening thread");
        Starting {
            listener: Self {
                running: Some(Running {
                    thread,
                    stop_channel,
                }),
                ..listener
            },
            outcome,
        }
    }

    /// The number of notifications of the kind `heard` heard so far.
    pub(super) fn generation(&self, heard: Heard) -> u64 {
        self.shared.of(heard).get()
    }

    /// Blocks until [`Listener::generation`] differs from `seen`, or `timeout` passes
    /// (poll-only: until `timeout` passes).
    pub(super) fn wait(&self, heard: Heard, seen: u64, timeout: Duration) {
        self.shared.of(heard).wait(seen, timeout);
    }

    /// Stops the thread: `notify` sends a notification on the channel it names. When that
    /// fails the thread is left to end at its next idle check.
    pub(super) fn stop(&mut self, notify: impl FnOnce(&str) -> bool) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(Running {
            thread,
            stop_channel,
        }) = self.running.take()
            && notify(&stop_channel)
        {
            let _ = thread.join();
        }
    }
}

/// A [`Listener`] connecting.
pub(super) struct Starting {
    listener: Listener,
    outcome: crossbeam_channel::Receiver<Result<(), postgres::Error>>,
}

impl Starting {
    /// The listener, once it listens: no change committed after this returns goes unheard.
    pub(super) fn listening(mut self) -> Result<Listener, postgres::Error> {
        match self.outcome.recv() {
            Ok(Ok(())) => Ok(self.listener),
            Ok(Err(error)) => Err(error),
            // Only a panic ends the thread without a word: pass it on.
            Err(_) => {
                if let Some(running) = self.listener.running.take()
                    && let Err(panic) = running.thread.join()
                {
                    std::panic::resume_unwind(panic);
                }
                panic!("the listening thread ended without saying whether it listens")
            }
        }
    }
}

/// A new connection listening on `channels`.
fn listen(
    config: &Config,
    connector: &Connector,
    channels: &[String],
) -> Result<Client, postgres::Error> {
    let mut client = connector.connect(config)?;
    let sql: String = channels
        .iter()
        .map(|channel| format!("LISTEN \"{channel}\";"))
        .collect();
    client.batch_execute(&sql)?;
    Ok(client)
}

/// The thread: counts notifications until stopped; connects again when the connection breaks
/// (waiters poll meanwhile, and look again once it is back).
fn run(
    mut client: Client,
    config: &Config,
    connector: &Connector,
    channels: &[String],
    work: &str,
    shared: &Shared,
) {
    loop {
        let mut broken = false;
        {
            let mut notifications = client.notifications();
            let mut heard = notifications.timeout_iter(IDLE_CHECK);
            loop {
                match heard.next() {
                    Ok(Some(notification)) => {
                        if notification.channel() == work {
                            shared.heard_work.bump();
                        }
                        shared.heard.bump();
                    }
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if broken || client.is_closed() || client.batch_execute("").is_err() {
            // Whatever was committed meanwhile went unheard: waiters look again.
            shared.heard.bump();
            shared.heard_work.bump();
            let mut pause = Duration::from_millis(50);
            client = loop {
                std::thread::sleep(pause);
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                match listen(config, connector, channels) {
                    Ok(client) => break client,
                    Err(_) => pause = (pause * 2).min(MAX_RECONNECT_PAUSE),
                }
            };
            shared.heard.bump();
            shared.heard_work.bump();
        }
    }
}
