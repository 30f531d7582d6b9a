//! The producer side of the outbox: write a message in the same PostgreSQL transaction as your
//! business change, and the relay publishes it to RabbitMQ once that transaction commits.
//!
//! - [`message`]: the [`Message`] model (bytes or JSON, headers, ordering key, delay, dedupe key).
//! - [`id`]: globally unique 64-bit [`MessageId`]s from a node leased in the database, safe
//!   against the clock moving backwards.
//! - [`Outbox`] (this file): enqueue inside the caller's transaction; [`cancel`] by dedupe key.
//! - [`prepared`]: two-phase messages decided later, with check-back: the SQL side, the wire
//!   types both ends share, the [`barrier`] that answers a check, and behind features the
//!   relay API's HTTP client (`client`) and the check endpoint for axum (`check-handler`).
//!   Without those features the crate pulls in no HTTP crate.
//! - [`error`]: the [`Error`] type.
//! - [`pool`]: connecting through PgBouncer in transaction mode (`DATABASE_POOL_MODE`).
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! let outbox = outbox::Outbox::new(pool.clone()).await?;
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! let msg = outbox::Message::json("orders", "order.created", &serde_json::json!({"id": 42}))?
//!     .with_ordering_key("order-42");
//! let id = outbox.enqueue(&mut tx, &msg).await?;
//! tx.commit().await?;
//! # let _ = id; Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod id;
pub mod message;
pub mod pool;
pub mod prepared;

/// The producer's record of its decision, which answers the relay's check (also
/// `prepared::barrier`).
pub use prepared::barrier;

pub use error::Error;
pub use id::{Clock, IdGenerator, IdGeneratorConfig, ManualClock, MessageId, SystemClock};
pub use message::Message;

use sqlx::{PgConnection, PgPool};

/// The product's one migration set, re-exported from the `migrations` crate (where it lives) for
/// producers that already depend on this one. `outbox-relay migrate` applies it.
pub use migrations::MIGRATOR;

/// The producer handle: holds an id node lease. Create one per process and share it (it is
/// cheap to clone).
#[derive(Debug, Clone)]
pub struct Outbox {
    ids: IdGenerator,
}

impl Outbox {
    /// Leases an id node on `pool`'s database.
    pub async fn new(pool: PgPool) -> Result<Self, Error> {
        Ok(Outbox {
            ids: IdGenerator::new(pool).await?,
        })
    }

    /// Uses an existing id generator (for example one with a test clock).
    pub fn with_ids(ids: IdGenerator) -> Self {
        Outbox { ids }
    }

    /// The id generator.
    pub fn ids(&self) -> &IdGenerator {
        &self.ids
    }

    /// Stores `msg` through `conn`, normally your open transaction (`&mut tx`): the message exists
    /// if and only if that transaction commits. Returns its id, or the pending message's id when
    /// one with the same dedupe key is already waiting.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        msg: &Message,
    ) -> Result<MessageId, Error> {
        let id = self.ids.next_id().await?;
        let headers = msg.stored_headers();
        let stored: i64 = sqlx::query_scalar(
            "SELECT outbox.insert_message($1, $2, $3, $4, $5, $6, $7, \
                 coalesce($8, now() + $9 * interval '1 millisecond'), $10)",
        )
        .bind(id.0)
        .bind(&msg.exchange)
        .bind(&msg.routing_key)
        .bind(&msg.payload)
        .bind(headers)
        .bind(&msg.content_type)
        .bind(&msg.ordering_key)
        .bind(msg.deliver_at)
        .bind(msg.delay.map(|d| d.as_millis() as i64))
        .bind(&msg.dedupe_key)
        .fetch_one(conn)
        .await?;
        Ok(MessageId(stored))
    }

    /// Gives the id node back (call at shutdown; otherwise its lease simply expires).
    pub async fn close(&self) -> Result<(), Error> {
        self.ids.release().await
    }
}

/// Removes the pending message with this dedupe key. `true` when one was removed; `false` when
/// none was pending (never enqueued, already published, or already cancelled). Run it in the
/// transaction that makes the message unnecessary (the payment that pre-empts a timeout).
pub async fn cancel(conn: &mut PgConnection, dedupe_key: &str) -> Result<bool, Error> {
    Ok(sqlx::query_scalar("SELECT outbox.cancel($1)")
        .bind(dedupe_key)
        .fetch_one(conn)
        .await?)
}
