//! The builder: every setting of a consumer, validated once in [`ConsumerBuilder::build`].

use std::sync::Arc;
use std::time::Duration;

use lapin::ExchangeKind;
use sqlx::PgPool;

use crate::broker::{BrokerUrls, UrlError};
use crate::config::Config;
use crate::consumer::Consumer;
use crate::handler::{Handler, PlainHandler};
use crate::metrics::Metrics;
use crate::process::{AfterCommit, Process, WithInbox, WithoutInbox};
use crate::{Error, RetryPolicy};

type MakeProcess = Box<dyn FnOnce(ProcessContext) -> Arc<dyn Process> + Send>;

struct ProcessContext {
    pool: PgPool,
    consumer: String,
    timeout: Option<Duration>,
    after_commit: Option<AfterCommit>,
    metrics: Metrics,
}

/// Builds a [`Consumer`]. Start with [`Consumer::builder`].
pub struct ConsumerBuilder {
    name: String,
    amqp_urls: Option<AmqpUrls>,
    pool: Option<PgPool>,
    queue: Option<String>,
    exchanges: Vec<(String, ExchangeKind)>,
    bindings: Vec<(String, String)>,
    quorum: bool,
    single_active_consumer: bool,
    prefetch: u16,
    concurrency: usize,
    batch_size: usize,
    ordered: bool,
    retry: RetryPolicy,
    dead_letter_queue: bool,
    delay_prefix: Option<String>,
    inbox_retention: Duration,
    purge_interval: Duration,
    purge_batch: i64,
    shutdown_grace: Duration,
    handler_timeout: Option<Duration>,
    after_commit: Option<AfterCommit>,
    make_process: Option<(MakeProcess, bool)>,
}

impl ConsumerBuilder {
    pub(crate) fn new(name: String) -> Self {
        ConsumerBuilder {
            name,
            amqp_urls: None,
            pool: None,
            queue: None,
            exchanges: Vec::new(),
            bindings: Vec::new(),
            quorum: false,
            single_active_consumer: false,
            prefetch: 200,
            concurrency: 8,
            batch_size: 1,
            ordered: false,
            retry: RetryPolicy::default(),
            dead_letter_queue: false,
            delay_prefix: None,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(60),
            purge_batch: 5_000,
            shutdown_grace: Duration::from_secs(30),
            handler_timeout: None,
            after_commit: None,
            make_process: None,
        }
    }

    /// The broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f` (this or
    /// [`amqp_urls`](Self::amqp_urls) is required). A comma-separated list names the nodes of
    /// a cluster, as [`amqp_urls`](Self::amqp_urls) does, so an `AMQP_URL` variable holding
    /// `amqp://…@node1:5672/%2f,amqp://…@node2:5672/%2f` can be passed straight through.
    pub fn amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_urls = Some(AmqpUrls::List(url.into()));
        self
    }

    /// The nodes of a RabbitMQ cluster, each one URL (not split on commas), e.g.
    /// `amqp_urls(["amqp://u:p@node1:5672/%2f", "amqp://u:p@node2:5672/%2f"])`. The consumer
    /// connects to the first that answers and, when the connection is lost, to the next (round
    /// robin, backing off once every node has failed). Unacked deliveries of the lost
    /// connection are redelivered by the broker and skipped by the inbox if they had committed.
    pub fn amqp_urls<I>(mut self, urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let urls = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.amqp_urls = Some(AmqpUrls::Each(urls));
        self
    }

    /// The database holding the inbox and the compensation log (required). Give it at least
    /// as many connections as the consumer's concurrency.
    pub fn database(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The queue to consume (default: the consumer's name). Declared durable if missing.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Declares a durable exchange of this kind before binding (for exchanges no one else
    /// declares).
    pub fn declare_exchange(mut self, exchange: impl Into<String>, kind: ExchangeKind) -> Self {
        self.exchanges.push((exchange.into(), kind));
        self
    }

    /// Binds the queue to `exchange` with `routing_key` (repeat for several). The exchange must
    /// exist or be declared with [`ConsumerBuilder::declare_exchange`].
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// Declare the queue (and the delay queues) as quorum queues: replicated over a RabbitMQ
    /// cluster, and dead-lettered at-least-once between delay levels.
    pub fn quorum(mut self, quorum: bool) -> Self {
        self.quorum = quorum;
        self
    }

    /// Declare the queue with `x-single-active-consumer`: of several instances only one
    /// receives at a time, which per-key order across instances needs.
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// Unacked messages the broker may send ahead (default 200; at least 1).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Handlers running at once (default 8; at least 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Messages per transaction (default 1: each message its own transaction; at most the
    /// prefetch). Above 1, each of the `concurrency` workers takes the deliveries already
    /// waiting, up to this many, and runs their handlers in one transaction with one inbox
    /// statement and one commit: under a backlog the database commits once per batch instead of
    /// once per message, and a lone message never waits for company. The handlers of a batch
    /// share its transaction, so a handler must not change session state for the others (`SET
    /// LOCAL`, say). If any handler fails, nothing of the batch commits and each message runs
    /// again alone, as without batching: retries and dead letters stay per message, and a
    /// handler's effects outside the database may run twice. Ordered messages (see
    /// [`ordered`](Self::ordered)) are never batched. Needs the inbox ([`handler`](Self::handler)).
    pub fn batch_size(mut self, messages: usize) -> Self {
        self.batch_size = messages;
        self
    }

    /// Ordered mode: messages with the same ordering key run one at a time in delivery order,
    /// other keys concurrently; a failing message is retried in place so later messages of
    /// its key wait for it. Messages without a key run unordered.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// The retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Also publish every dead letter to the durable queue `<queue>.dead` (the compensation
    /// log row is written either way).
    pub fn dead_letter_queue(mut self, on: bool) -> Self {
        self.dead_letter_queue = on;
        self
    }

    /// Name prefix of the shared delay exchanges and queues (default `consumer_lib.delay`, or
    /// `consumer_lib.delay_quorum` with quorum queues).
    pub fn delay_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.delay_prefix = Some(prefix.into());
        self
    }

    /// How long inbox rows are kept (default 7 days). Must cover the retry horizon and any
    /// time a duplicate may still arrive, e.g. a producer republishing by hand.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// How often old inbox rows are purged (default 60 s).
    pub fn purge_interval(mut self, every: Duration) -> Self {
        self.purge_interval = every;
        self
    }

    /// Rows deleted per purge statement (default 5000).
    pub fn purge_batch(mut self, rows: i64) -> Self {
        self.purge_batch = rows;
        self
    }

    /// How long shutdown waits for running handlers before closing anyway (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Fail (and retry) a handler that runs longer than this (default: no limit).
    pub fn handler_timeout(mut self, limit: Duration) -> Self {
        self.handler_timeout = Some(limit);
        self
    }

    /// Runs `hook(message_id)` after a message's transaction committed and before its ack,
    /// e.g. to refresh a cache. Only with an inbox handler.
    pub fn after_commit(mut self, hook: impl Fn(i64) + Send + Sync + 'static) -> Self {
        self.after_commit = Some(Arc::new(hook));
        self
    }

    /// The handler, run inside a transaction with the inbox row: effects exactly once.
    pub fn handler<H: Handler>(mut self, handler: H) -> Self {
        let make: MakeProcess = Box::new(move |ctx: ProcessContext| {
            Arc::new(WithInbox {
                handler,
                pool: ctx.pool,
                consumer: ctx.consumer,
                timeout: ctx.timeout,
                after_commit: ctx.after_commit,
                metrics: ctx.metrics,
            }) as Arc<dyn Process>
        });
        self.make_process = Some((make, true));
        self
    }

    /// Opts out of the inbox: the handler gets no transaction and a redelivered message runs
    /// it again (plain at-least-once). For handlers that write no database of their own.
    pub fn handler_without_inbox<H: PlainHandler>(mut self, handler: H) -> Self {
        let make: MakeProcess = Box::new(move |ctx: ProcessContext| {
            Arc::new(WithoutInbox {
                handler,
                timeout: ctx.timeout,
                metrics: ctx.metrics,
            }) as Arc<dyn Process>
        });
        self.make_process = Some((make, false));
        self
    }

    /// Checks every setting and returns the consumer; nothing touches the broker or database
    /// until [`Consumer::run`].
    pub fn build(self) -> Result<Consumer, Error> {
        check_name("name", &self.name)?;
        let queue = self.queue.unwrap_or_else(|| self.name.clone());
        check_name("queue", &queue)?;
        let amqp_urls = match self.amqp_urls {
            None => return Err(Error::config("amqp_url", "is required")),
            Some(AmqpUrls::List(list)) => {
                BrokerUrls::parse(&list).map_err(url_error("amqp_url"))?
            }
            Some(AmqpUrls::Each(urls)) => BrokerUrls::new(urls).map_err(url_error("amqp_urls"))?,
        };
        let pool = self
            .pool
            .ok_or_else(|| Error::config("database", "is required (inbox and compensation log)"))?;
        let (make_process, uses_inbox) = self.make_process.ok_or_else(|| {
            Error::config(
                "handler",
                "set one with handler() or handler_without_inbox()",
            )
        })?;
        if self.prefetch == 0 {
            return Err(Error::config("prefetch", "must be at least 1"));
        }
        if self.concurrency == 0 {
            return Err(Error::config("concurrency", "must be at least 1"));
        }
        if self.batch_size == 0 || self.batch_size > usize::from(self.prefetch) {
            return Err(Error::config(
                "batch_size",
                format!("must be between 1 and the prefetch ({})", self.prefetch),
            ));
        }
        if self.batch_size > 1 && !uses_inbox {
            return Err(Error::config(
                "batch_size",
                "batching shares the inbox transaction; handler_without_inbox has none",
            ));
        }
        if self.purge_batch < 1 {
            return Err(Error::config("purge_batch", "must be at least 1"));
        }
        if self.purge_interval.is_zero() {
            return Err(Error::config("purge_interval", "must be longer than zero"));
        }
        self.retry.validate()?;
        let horizon = self.retry.horizon();
        if self.inbox_retention < horizon {
            return Err(Error::config(
                "inbox_retention",
                format!(
                    "{:?} is shorter than the retry horizon {horizon:?}: a late retry could run twice",
                    self.inbox_retention
                ),
            ));
        }
        for (exchange, key) in &self.bindings {
            if exchange.is_empty() {
                return Err(Error::config("bind", "cannot bind to the default exchange"));
            }
            if exchange.len() > 255 || key.len() > 255 {
                return Err(Error::config(
                    "bind",
                    "exchange and routing key are at most 255 bytes",
                ));
            }
        }
        for (exchange, _) in &self.exchanges {
            if exchange.is_empty() || exchange.len() > 255 {
                return Err(Error::config(
                    "declare_exchange",
                    "name must be 1 to 255 bytes",
                ));
            }
        }
        let delay_prefix = self.delay_prefix.unwrap_or_else(|| {
            if self.quorum {
                "consumer_lib.delay_quorum".to_owned()
            } else {
                "consumer_lib.delay".to_owned()
            }
        });
        check_name("delay_prefix", &delay_prefix)?;
        if self.after_commit.is_some() && !uses_inbox {
            return Err(Error::config(
                "after_commit",
                "needs an inbox handler (there is no commit without one)",
            ));
        }
        let metrics = Metrics::new(&self.name);
        let process = make_process(ProcessContext {
            pool: pool.clone(),
            consumer: self.name.clone(),
            timeout: self.handler_timeout,
            after_commit: self.after_commit,
            metrics: metrics.clone(),
        });
        let config = Config {
            name: self.name,
            amqp_urls,
            queue,
            exchanges: self.exchanges,
            bindings: self.bindings,
            quorum: self.quorum,
            single_active_consumer: self.single_active_consumer,
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            batch_size: self.batch_size,
            ordered: self.ordered,
            retry: self.retry,
            dead_letter_queue: self.dead_letter_queue,
            delay_prefix,
            inbox_retention: self.inbox_retention,
            purge_interval: self.purge_interval,
            purge_batch: self.purge_batch,
            shutdown_grace: self.shutdown_grace,
            uses_inbox,
        };
        Ok(Consumer::new(config, pool, process, metrics))
    }
}

/// How the broker addresses were given: one string (split on commas) or one URL per item.
enum AmqpUrls {
    List(String),
    Each(Vec<String>),
}

fn url_error(field: &'static str) -> impl FnOnce(UrlError) -> Error {
    move |e| Error::config(field, e.to_string())
}

/// Names end up in queue names and in topic routing keys of the delay cascade: no wildcard
/// characters, and short enough to leave room for the delay bits in a 255-byte key.
fn check_name(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > 200 {
        return Err(Error::config(field, "must be 1 to 200 bytes"));
    }
    if value.contains(['*', '#']) || value.split('.').any(str::is_empty) {
        return Err(Error::config(
            field,
            format!("{value:?} must not contain '*' or '#', nor empty dot-separated words"),
        ));
    }
    if value.starts_with("amq.") {
        return Err(Error::config(
            field,
            "names starting with amq. are reserved by RabbitMQ",
        ));
    }
    Ok(())
}

impl Consumer {
    /// Starts a builder for the consumer called `name`. The name keys the inbox rows, so two
    /// services consuming the same messages need different names; instances of one service
    /// share theirs.
    pub fn builder(name: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder::new(name.into())
    }
}
