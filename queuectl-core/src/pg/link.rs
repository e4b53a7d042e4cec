//! One connection to the server, and statements sent to it together.
//!
//! A [`Link`] is a `tokio-postgres` client and the task that drives its socket, on a
//! single-thread runtime of its own that runs only while a call waits on it: the store stays
//! synchronous, as the thread-based pool wants. What it adds over the `postgres` crate's
//! synchronous client is [`Link::pipeline`]: several statements written in one go and their
//! answers read in one go, one round trip for all of them. A claim and a settlement are a
//! dozen statements; sent one at a time they cost a dozen round trips, which on a loaded
//! machine take longer than the statements themselves.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, Row, Statement};

use super::tls::Connector;

/// How long closing a connection waits for its goodbye to the server to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A statement's parameter.
pub(super) type Param<'p> = &'p (dyn ToSql + Sync);

/// A connection: its client, and the task that reads and writes its socket.
pub(super) struct Link {
    runtime: tokio::runtime::Runtime,
    /// Taken when the link closes (dropping the client is what ends the connection).
    client: Option<Client>,
    driver: Option<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>>,
    /// How many round trips the link waited for since it connected (for tests that keep
    /// the count of a hot path down).
    round_trips: AtomicU64,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error(transparent)]
    Db(tokio_postgres::Error),
    #[error("could not start the connection's event loop: {0}")]
    Runtime(std::io::Error),
    /// The server accepted the connection but did not finish its start-up in time.
    #[error("the server did not finish starting the connection within {0:?}")]
    TimedOut(Duration),
}

/// One statement of a [`Link::pipeline`].
pub(super) enum Step<'s> {
    /// A prepared statement, its rows wanted.
    Query(&'s Statement, Vec<Param<'s>>),
    /// A prepared statement, the number of rows it changed wanted.
    Execute(&'s Statement, Vec<Param<'s>>),
    /// Statements without parameters in the simple protocol (`BEGIN`, `COMMIT`, `SET`).
    Simple(&'s str),
    /// A statement without parameters, not prepared, its rows wanted (one round trip with
    /// the others, where preparing it would cost one of its own).
    Unprepared(&'s str),
    /// A statement not prepared, with its parameters and their types, its rows wanted: the
    /// types given, the server needs not be asked for them first.
    Typed(&'s str, Vec<(Param<'s>, Type)>),
}

/// The answer to one [`Step`].
#[derive(Debug)]
pub(super) enum Answer {
    Rows(Vec<Row>),
    Count(u64),
    Done,
    /// Of [`Link::prepare_with`]'s statements.
    Prepared(Statement),
}

/// A step's answer, or why it failed.
pub(super) type Answered = Result<Answer, tokio_postgres::Error>;

type Pending<'f> = Pin<Box<dyn Future<Output = Answered> + 'f>>;

impl Link {
    /// Opens a connection as `config` says, over TLS when `connector` is for TLS.
    pub(super) fn connect(config: &Config, connector: &Connector) -> Result<Self, ConnectError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ConnectError::Runtime)?;
        // `connect_timeout` bounds the TCP connect only; a server (or a link) that accepts it
        // and then says nothing would hold the pool's connecting thread for good.
        let limit = config.get_connect_timeout().copied();
        let (client, driver) = runtime.block_on(async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, connector.connect_async(config))
                    .await
                    .map_err(|_| ConnectError::TimedOut(limit))?,
                None => connector.connect_async(config).await,
            }
            .map_err(ConnectError::Db)
        })?;
        let driver = runtime.spawn(driver);
        Ok(Self {
            runtime,
            client: Some(client),
            driver: Some(driver),
            round_trips: AtomicU64::new(0),
        })
    }

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a link's client is there until it closes")
    }

    /// How many round trips the link waited for since it connected.
    #[cfg(test)]
    pub(super) fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Waits for `future`, one round trip.
    fn wait<T>(&self, future: impl Future<Output = T>) -> T {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.runtime.block_on(future)
    }

    /// Whether the connection is gone (the server closed it, or the network failed).
    pub(super) fn is_closed(&self) -> bool {
        self.client().is_closed()
    }

    /// Prepares every statement of `sqls` in one round trip.
    pub(super) fn prepare_all(
        &self,
        sqls: &[String],
    ) -> Result<Vec<Statement>, tokio_postgres::Error> {
        let client = self.client();
        let pending: Vec<Pin<Box<dyn Future<Output = _>>>> = sqls
            .iter()
            .map(|sql| -> Pin<Box<dyn Future<Output = _>>> { Box::pin(client.prepare(sql)) })
            .collect();
        self.wait(join_in_order(pending)).into_iter().collect()
    }

    /// Runs a simple-protocol statement (one round trip).
    pub(super) fn simple(
        &self,
        sql: &str,
    ) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
        self.wait(self.client().simple_query(sql))
    }

    /// Sends every step at once and waits for all the answers: one round trip. The answers
    /// come in the order of the steps, each its step's rows or error (a failure aborts the
    /// transaction, so the steps after it fail too, saying only that).
    pub(super) fn pipeline(&self, steps: Vec<Step<'_>>) -> Vec<Answered> {
        self.wait(join_in_order(self.pending(steps)))
    }

    /// [`Link::prepare_all`] of `sqls` and [`Link::pipeline`] of `steps` (which do not
    /// use them), in one round trip: statements a transaction will need are prepared with the
    /// first ones it runs.
    pub(super) fn prepare_with(
        &self,
        sqls: &[String],
        steps: Vec<Step<'_>>,
    ) -> (Result<Vec<Statement>, tokio_postgres::Error>, Vec<Answered>) {
        let client = self.client();
        let mut pending: Vec<Pending> = sqls
            .iter()
            .map(|sql| -> Pending {
                Box::pin(async move { client.prepare(sql).await.map(Answer::Prepared) })
            })
            .collect();
        pending.extend(self.pending(steps));
        let mut answers = self.wait(join_in_order(pending));
        let steps = answers.split_off(sqls.len());
        let statements = answers
            .into_iter()
            .map(|answer| match answer? {
                Answer::Prepared(statement) => Ok(statement),
                other => unreachable!("a prepare answers with its statement, not {other:?}"),
            })
            .collect();
        (statements, steps)
    }

    /// The futures that send `steps` and read their answers.
    fn pending<'f>(&'f self, steps: Vec<Step<'f>>) -> Vec<Pending<'f>> {
        let client = self.client();
        steps
            .into_iter()
            .map(|step| -> Pending {
                match step {
                    Step::Query(statement, params) => {
                        Box::pin(
                            async move { client.query(statement, &params).await.map(Answer::Rows) },
                        )
                    }
                    Step::Execute(statement, params) => Box::pin(async move {
                        client.execute(statement, &params).await.map(Answer::Count)
                    }),
                    Step::Simple(sql) => {
                        Box::pin(
                            async move { client.batch_execute(sql).await.map(|()| Answer::Done) },
                        )
                    }
                    Step::Unprepared(sql) => {
                        Box::pin(
                            async move { client.query_typed(sql, &[]).await.map(Answer::Rows) },
                        )
                    }
                    Step::Typed(sql, params) => {
                        Box::pin(
                            async move { client.query_typed(sql, &params).await.map(Answer::Rows) },
                        )
                    }
                }
            })
            .collect()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the client has the driver say goodbye to the server and end; give it the
        // chance to, so that the server does not log a connection lost.
        drop(self.client.take());
        if let Some(driver) = self.driver.take() {
            // Whatever ended the connection also failed the calls that were waiting on it,
            // which reported it; at close there is nobody left to tell.
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(CLOSE_WAIT, driver).await });
        }
    }
}

/// Runs `futures` to completion, polling them in their order, so that each sends its request
/// before the next does: the requests go out in order, in one write.
async fn join_in_order<'f, T>(futures: Vec<Pin<Box<dyn Future<Output = T> + 'f>>>) -> Vec<T> {
    let mut futures: Vec<Option<Pin<Box<dyn Future<Output = T> + 'f>>>> =
        futures.into_iter().map(Some).collect();
    let mut results: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, result) in futures.iter_mut().zip(results.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *result = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if all { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every future completed"))
        .collect()
}
