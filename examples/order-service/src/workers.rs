//! The consumers of the example, one process: the payment saga's participants (payments,
//! inventory, the order confirmation) and its coordinator, payment timeouts, read model. Each
//! has its own consumer name (its own inbox rows) and its own durable queue bound to the order
//! exchange.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use consumer_lib::lapin::options::QueueDeclareOptions;
use consumer_lib::lapin::types::FieldTable;
use consumer_lib::lapin::{Connection, ConnectionProperties, ExchangeKind};
use consumer_lib::{Consumer, RetryPolicy};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::events;
use crate::inventory::Inventory;
use crate::order_saga::{self, Confirm, Payments};
use crate::payment::PaymentClient;
use crate::read_model::DailyTotals;
use crate::timeout::CancelUnpaid;
use saga::{Coordinator, ParticipantHandler};

/// Settings of the worker process.
#[derive(Debug, Clone)]
pub struct WorkersConfig {
    /// Broker.
    pub amqp_url: String,
    /// The exchange of the order events (declared durable topic if missing).
    pub exchange: String,
    /// Prefix of the three queue names (a demo run uses a random one).
    pub queue_prefix: String,
    /// Handlers running at once, per consumer.
    pub concurrency: usize,
    /// The gateway (its `/pay` and `/refund` routes lead to the payment provider).
    pub gateway_url: String,
    /// Attempts per gateway request (same key).
    pub payment_attempts: u32,
    /// The notifier endpoint of the merchant's webhook.
    pub notify_endpoint: String,
}

impl WorkersConfig {
    /// The queues the workers consume, in the order inventory, payment timeouts, read model,
    /// payments, order confirmation, saga replies.
    pub fn queues(&self) -> [String; 6] {
        [
            format!("{}inventory", self.queue_prefix),
            format!("{}payment-timeouts", self.queue_prefix),
            format!("{}read-model", self.queue_prefix),
            format!("{}payments", self.queue_prefix),
            format!("{}order-confirm", self.queue_prefix),
            format!("{}saga-replies", self.queue_prefix),
        ]
    }
}

/// Runs the three consumers until `shutdown`. `ready` turns true once their queues exist on the
/// broker (so messages published from then on are routed).
pub async fn run(
    config: WorkersConfig,
    pool: PgPool,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let [
        inventory_q,
        timeouts_q,
        read_model_q,
        payments_q,
        confirm_q,
        replies_q,
    ] = config.queues();
    let ex = config.exchange.as_str();
    let base = |name: &str, queue: &str| {
        Consumer::builder(name)
            .amqp_url(&config.amqp_url)
            .database(pool.clone())
            .queue(queue)
            .declare_exchange(ex, ExchangeKind::Topic)
            .prefetch(200)
            .concurrency(config.concurrency)
    };
    let participant_retry = || {
        RetryPolicy::exponential()
            .max_attempts(30)
            .min_delay(Duration::from_millis(100))
            .max_delay(Duration::from_secs(2))
    };
    let inventory = base("inventory", &inventory_q)
        .bind(ex, order_saga::RESERVE)
        .bind(ex, order_saga::RELEASE)
        .retry(participant_retry())
        .handler(ParticipantHandler::new(Inventory))
        .build()?;
    let payments = base("payments", &payments_q)
        .bind(ex, order_saga::CHARGE)
        .bind(ex, order_saga::REFUND)
        .retry(participant_retry())
        .handler(ParticipantHandler::new(Payments {
            client: PaymentClient::new(&config.gateway_url, config.payment_attempts),
            exchange: config.exchange.clone(),
        }))
        .build()?;
    let confirm = base("order-confirm", &confirm_q)
        .bind(ex, order_saga::CONFIRM)
        .retry(participant_retry())
        .handler(ParticipantHandler::new(Confirm {
            exchange: config.exchange.clone(),
            notify_endpoint: config.notify_endpoint.clone(),
        }))
        .build()?;
    let coordinator = base("saga-coordinator", &replies_q)
        .bind(ex, order_saga::REPLY)
        .retry(participant_retry())
        .handler(Coordinator::new())
        .build()?;
    let timeouts = base("payment-timeouts", &timeouts_q)
        .bind(ex, events::PAYMENT_TIMEOUT)
        // A timeout meeting a payment in progress waits for its outcome: short steps, many
        // of them, so the decision follows the payment by well under a second.
        .retry(
            RetryPolicy::exponential()
                .max_attempts(60)
                .min_delay(Duration::from_millis(200))
                .max_delay(Duration::from_secs(2)),
        )
        .handler(CancelUnpaid {
            exchange: config.exchange.clone(),
        })
        .build()?;
    let read_model = base("read-model", &read_model_q)
        .bind(ex, events::ORDER_CREATED)
        .bind(ex, events::ORDER_PAID)
        .bind(ex, events::ORDER_CANCELLED)
        .retry(
            RetryPolicy::exponential()
                .max_attempts(8)
                .min_delay(Duration::from_millis(200))
                .max_delay(Duration::from_secs(5)),
        )
        .handler(DailyTotals)
        .build()?;

    let mut tasks = tokio::task::JoinSet::new();
    for consumer in [
        inventory,
        timeouts,
        read_model,
        payments,
        confirm,
        coordinator,
    ] {
        let token = shutdown.clone();
        tasks.spawn(async move { consumer.run(token).await });
    }
    let queues = config.queues();
    let amqp_url = config.amqp_url.clone();
    let watch = shutdown.clone();
    tokio::spawn(async move {
        while !watch.is_cancelled() {
            if queues_exist(&amqp_url, &queues).await {
                ready.store(true, Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined
            .map_err(anyhow::Error::from)
            .and_then(|r| r.map_err(Into::into));
        if let Err(e) = result {
            tracing::error!(cause = %e, "consumer stopped");
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// True when every queue exists (a passive declare answers; it fails on a missing queue and
/// closes its channel, hence one channel per check).
async fn queues_exist(amqp_url: &str, queues: &[String]) -> bool {
    let Ok(conn) = Connection::connect(amqp_url, ConnectionProperties::default()).await else {
        return false;
    };
    let mut all = true;
    for q in queues {
        let Ok(channel) = conn.create_channel().await else {
            all = false;
            break;
        };
        let found = channel
            .queue_declare(
                q.as_str().into(),
                // Passive: only ask whether it exists, never create it with other arguments.
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if !found {
            all = false;
            break;
        }
        let _ = channel.close(200, "checked".into()).await;
    }
    let _ = conn.close(200, "checked".into()).await;
    all
}

/// Deletes the workers' queues and the order exchange: a demo run's broker objects, removed
/// once its processes have stopped so repeated runs leave nothing behind.
pub async fn remove_topology(config: &WorkersConfig) -> anyhow::Result<()> {
    use consumer_lib::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = Connection::connect(&config.amqp_url, ConnectionProperties::default()).await?;
    for q in config.queues() {
        // One channel per delete: deleting a queue that is already gone closes the channel.
        let channel = conn.create_channel().await?;
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let channel = conn.create_channel().await?;
    let _ = channel
        .exchange_delete(
            config.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "removed".into()).await;
    Ok(())
}
