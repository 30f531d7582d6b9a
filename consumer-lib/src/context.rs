//! What the tasks of a running consumer share: [`Shared`] for the consumer's whole life (the
//! validated config, the pool, the processing, the delay cascade, the concurrency bound) and
//! [`Session`] for one broker connection.

use lapin::Channel;
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delay::DelayCascade;
use crate::metrics::Metrics;
use crate::process::Process;

/// What every delivery task shares for the consumer's whole life.
pub(crate) struct Shared {
    pub config: Config,
    pub pool: PgPool,
    pub process: Arc<dyn Process>,
    pub metrics: Metrics,
    pub cascade: DelayCascade,
    /// Bounds handlers running at once across the consumer.
    pub running: Semaphore,
}

/// One broker connection's worth of state.
pub(crate) struct Session {
    /// A channel in confirm mode for retries and dead letters.
    pub publish: Channel,
    /// Cancelled when the session ends (shutdown or lost connection): deliveries not yet
    /// started are left unacked, for the broker to requeue.
    pub stop: CancellationToken,
    /// Cancelled when the connection is lost (not on shutdown): broker replies still awaited
    /// will never come.
    pub lost: CancellationToken,
}
