//! The consumer: runs broker sessions until shutdown, reconnecting with backoff, and the inbox
//! purge beside them.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::broker::Connector;
use crate::config::Config;
use crate::context::Shared;
use crate::delay::DelayCascade;
use crate::metrics::Metrics;
use crate::process::Process;
use crate::session::{self, End};
use crate::{Error, inbox};

/// A configured consumer. Build one with [`Consumer::builder`], then [`Consumer::run`] it.
pub struct Consumer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.shared.config.name)
            .field("queue", &self.shared.config.queue)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(
        config: Config,
        pool: PgPool,
        process: Arc<dyn Process>,
        metrics: Metrics,
    ) -> Self {
        let cascade = DelayCascade::new(config.delay_prefix.clone(), config.quorum);
        let running = Semaphore::new(config.concurrency);
        Consumer {
            shared: Arc::new(Shared {
                config,
                pool,
                process,
                metrics,
                cascade,
                running,
            }),
        }
    }

    /// The queue this consumer reads.
    pub fn queue(&self) -> &str {
        &self.shared.config.queue
    }

    /// Consumes until `shutdown` is cancelled, then stops consuming, lets running handlers
    /// finish and ack (up to the shutdown grace period), closes, and returns `Ok(())`.
    ///
    /// A lost broker connection or consumer is rebuilt with backoff; a database outage turns
    /// into retries. Only a configuration the broker refuses on the first connection is
    /// returned as an error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let shared = self.shared;
        let config = &shared.config;
        let purge_stop = shutdown.child_token();
        let purge = config.uses_inbox.then(|| {
            tokio::spawn(inbox::purge_loop(
                shared.pool.clone(),
                config.name.clone(),
                config.inbox_retention,
                config.purge_interval,
                config.purge_batch,
                shared.metrics.clone(),
                purge_stop.clone(),
            ))
        });
        let result = reconnect_loop(&shared, &shutdown).await;
        purge_stop.cancel();
        if let Some(purge) = purge {
            let _ = purge.await;
        }
        tracing::info!(consumer = %config.name, "consumer stopped");
        result
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

async fn reconnect_loop(shared: &Arc<Shared>, shutdown: &CancellationToken) -> Result<(), Error> {
    let mut delays = reconnect_backoff();
    let mut first = true;
    let mut connector = Connector::new(
        shared.config.amqp_urls.clone(),
        format!("consumer-lib {}", shared.config.name),
    );
    while !shutdown.is_cancelled() {
        match session::run(shared, shutdown, first, &mut connector).await? {
            End::Shutdown => break,
            End::Lost { error, started } => {
                if started {
                    // A session that consumed resets the backoff: the next outage starts
                    // again from a quick retry.
                    delays = reconnect_backoff();
                    first = false;
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(consumer = %shared.config.name, cause = %error, ?delay, "broker session lost; reconnecting");
                shared.metrics.reconnected();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    Ok(())
}
