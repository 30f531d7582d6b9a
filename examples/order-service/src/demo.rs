//! The demo driver: places orders against the running service like many clients would, with
//! retries and duplicates injected, waits until every part has settled, prints a summary and
//! checks the invariants. `scripts/demo` runs it on about 1,000 orders; the example's test on 50.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use consumer_lib::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use consumer_lib::lapin::types::{AMQPValue, FieldTable, LongString};
use consumer_lib::lapin::{BasicProperties, Connection, ConnectionProperties};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::StatusCode;
use sqlx::PgPool;

use crate::api::{NewOrder, Order};
use crate::events::{self, OrderEvent, OrderPaid};
use crate::metrics_text::scrape;
use crate::provider::ProviderStats;
use crate::receiver::ReceiverStats;

/// Where the parts run and how hard to push them.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Orders to place.
    pub orders: usize,
    /// Clients at once.
    pub concurrency: usize,
    /// Seed of every random choice of the driver.
    pub seed: u64,
    /// The order service.
    pub api_url: String,
    /// The relay's `/metrics`.
    pub relay_metrics_url: String,
    /// The gateway's `/metrics`.
    pub gateway_metrics_url: String,
    /// The workers' `/metrics`.
    pub workers_metrics_url: String,
    /// The fake provider (for `/stats`).
    pub provider_url: String,
    /// The webhook receiver (for `/stats`).
    pub receiver_url: String,
    /// The database every part uses.
    pub database_url: String,
    /// The broker (duplicates are republished by hand).
    pub amqp_url: String,
    /// The order exchange.
    pub exchange: String,
    /// The service's payment timeout.
    pub payment_timeout: Duration,
    /// How long to wait for everything to settle after the last request.
    pub settle_deadline: Duration,
}

/// The outcome of a demo run.
#[derive(Debug, Default)]
pub struct Summary {
    /// Orders placed (distinct).
    pub orders_created: i64,
    /// Repeated `POST /orders` with the same key (lost-response retries), answered with the
    /// first order.
    pub create_retries_absorbed: u64,
    /// Orders paid.
    pub paid: i64,
    /// Orders cancelled by their payment timeout.
    pub timed_out: i64,
    /// Orders charged, then refunded by the saga because the stock ran out.
    pub refunded: i64,
    /// Orders whose charge was declined (cancelled, nothing charged).
    pub declined: i64,
    /// Payment sagas started (one per order that reached `paying`).
    pub sagas_started: i64,
    /// Sagas completed (charged, stock reserved, order paid).
    pub sagas_completed: i64,
    /// Sagas compensated (refunded, or nothing to undo).
    pub sagas_compensated: i64,
    /// Sagas parked stuck (a compensation that cannot succeed).
    pub sagas_stuck: i64,
    /// Refunds the provider issued (its own count).
    pub refunds_issued: u64,
    /// Compensations (refund attempts included) the coordinator sent in all.
    pub refund_attempts: i64,
    /// Charged orders that are paid and hold their stock.
    pub paid_and_reserved: i64,
    /// Payment timeouts withdrawn by the payment transaction before they were published.
    pub timeouts_withdrawn: i64,
    /// Payments attempted after the timeout, refused with 409.
    pub late_payments_refused: u64,
    /// Payments sent right at the timeout that won (paid).
    pub race_paid: u64,
    /// Payments sent right at the timeout that lost (order cancelled, refused).
    pub race_refused: u64,
    /// Concurrent duplicate `POST /orders/{id}/pay` sent.
    pub duplicate_pay_requests: u64,
    /// Gateway replays of a stored response.
    pub gateway_replays: u64,
    /// Gateway 409s for a key already in flight.
    pub gateway_in_flight: u64,
    /// Provider requests answered with the existing charge.
    pub provider_dedupes: u64,
    /// Provider requests refused for a stale fencing token.
    pub stale_tokens: u64,
    /// Charges at the provider.
    pub charges: u64,
    /// Provider 503s injected.
    pub provider_failures: u64,
    /// Provider slow answers injected.
    pub provider_slow: u64,
    /// Gateway retries.
    pub gateway_retries: u64,
    /// Messages the relay published.
    pub published: u64,
    /// Messages republished by hand (duplicates).
    pub republished: u64,
    /// Duplicate deliveries the consumers' inboxes skipped.
    pub duplicates_suppressed: u64,
    /// Messages the consumers applied.
    pub applied: u64,
    /// Consumer retries (a timeout meeting a payment in progress, transient errors).
    pub consumer_retries: u64,
    /// Stock reservations held.
    pub reserved: i64,
    /// Reservations refused for insufficient stock (after the charge).
    pub rejected: i64,
    /// Reservations given back by a compensating saga.
    pub released: i64,
    /// Notifications acknowledged by the receiver (distinct).
    pub notifications_delivered: u64,
    /// Webhook attempts in all (first tries, retries after injected failures).
    pub notification_attempts: i64,
    /// Saga started → saga finished, median (ms).
    pub p50_ms: f64,
    /// Same, 99th percentile (ms).
    pub p99_ms: f64,
    /// The read model's totals.
    pub read_model: (i64, i64, i64, i64),
    /// Time from the first request until settled.
    pub elapsed: Duration,
    /// Every invariant that failed (empty: all hold).
    pub failures: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, label: &str, value: String, note: String| {
            writeln!(f, "  {label:<30} {value:>7}   {note}")
        };
        let (rc, rp, rx, rev) = self.read_model;
        let prevented = self.gateway_replays
            + self.gateway_in_flight
            + self.provider_dedupes
            + self.stale_tokens;
        writeln!(
            f,
            "order-service demo: {} orders in {:.1} s",
            self.orders_created,
            self.elapsed.as_secs_f64()
        )?;
        row(
            f,
            "orders created",
            self.orders_created.to_string(),
            format!(
                "{} client retries answered with the first order",
                self.create_retries_absorbed
            ),
        )?;
        row(
            f,
            "paid",
            self.paid.to_string(),
            format!(
                "{} timeouts withdrawn before publishing; {} paid racing the timeout",
                self.timeouts_withdrawn, self.race_paid
            ),
        )?;
        row(
            f,
            "timed out and cancelled",
            self.timed_out.to_string(),
            format!(
                "{} late payments refused, {} lost the race to the timeout",
                self.late_payments_refused, self.race_refused
            ),
        )?;
        row(
            f,
            "refunded (stock ran out)",
            self.refunded.to_string(),
            format!(
                "charged, then the reservation failed; {} declined charges",
                self.declined
            ),
        )?;
        writeln!(
            f,
            "  sagas: started {}, completed {}, compensated {}, stuck {}",
            self.sagas_started, self.sagas_completed, self.sagas_compensated, self.sagas_stuck
        )?;
        writeln!(
            f,
            "  refunds issued {}   (the provider's count; {} refund commands sent)",
            self.refunds_issued, self.refund_attempts
        )?;
        row(
            f,
            "duplicate charges prevented",
            prevented.to_string(),
            format!(
                "gateway replays {}, gateway 409s {}, provider key dedupes {}, stale fencing tokens {}",
                self.gateway_replays,
                self.gateway_in_flight,
                self.provider_dedupes,
                self.stale_tokens
            ),
        )?;
        row(
            f,
            "charges at the provider",
            self.charges.to_string(),
            format!(
                "{} failures and {} slow answers injected, {} gateway retries, {} double pay clicks",
                self.provider_failures,
                self.provider_slow,
                self.gateway_retries,
                self.duplicate_pay_requests
            ),
        )?;
        row(
            f,
            "messages published",
            self.published.to_string(),
            "by the relay, with publisher confirms".into(),
        )?;
        row(
            f,
            "duplicates suppressed",
            self.duplicates_suppressed.to_string(),
            format!(
                "{} copies republished by hand; {} messages applied once, {} consumer retries",
                self.republished, self.applied, self.consumer_retries
            ),
        )?;
        row(
            f,
            "stock decisions",
            (self.reserved + self.rejected + self.released).to_string(),
            format!(
                "reserved {}, rejected after payment (insufficient) {}, released by compensation {}",
                self.reserved, self.rejected, self.released
            ),
        )?;
        row(
            f,
            "notifications delivered",
            self.notifications_delivered.to_string(),
            format!(
                "signed webhooks verified; {} attempts",
                self.notification_attempts
            ),
        )?;
        row(
            f,
            "read model (GET /reports/daily)",
            rc.to_string(),
            format!(
                "created; paid {rp}, cancelled {rx}, revenue {}.{:02}",
                rev / 100,
                rev % 100
            ),
        )?;
        row(
            f,
            "payment saga latency",
            format!("{:.0} ms", self.p50_ms),
            format!(
                "p50 from start to completed or compensated; p99 {:.0} ms",
                self.p99_ms
            ),
        )?;
        let saga_ok = !self.failures.iter().any(|x| x.starts_with("saga:"));
        writeln!(
            f,
            "invariant: every charged order is paid-and-reserved ({}) or refunded exactly once ({}); \
             none refunded twice; stuck = 0; started = completed + compensated: {}",
            self.paid_and_reserved,
            self.refunded,
            if saga_ok { "holds" } else { "FAILED" }
        )?;
        if self.failures.is_empty() {
            write!(
                f,
                "invariants: all hold (stock never negative and conserved, no order both paid and cancelled, \
                       each payment charged once, every paid order holds its stock, read model = orders, every paid order notified)"
            )
        } else {
            writeln!(f, "INVARIANTS FAILED:")?;
            for x in &self.failures {
                writeln!(f, "  - {x}")?;
            }
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    PayNow,
    /// Pay within a few hundred milliseconds of the payment timeout: either may win.
    PayAtDeadline,
    PayLate,
    NeverPay,
}

#[derive(Debug, Clone)]
struct Plan {
    order: NewOrder,
    fate: Fate,
    duplicate_create: bool,
    duplicate_pay: bool,
}

/// The products: (sku, stock, unit price). `limited` runs out on purpose: its stock is
/// [`limited_stock`], about a fifth of what its orders ask for, so about one order in eleven is
/// charged and then refunded by the saga.
pub const PRODUCTS: &[(&str, i64, i64)] = &[
    ("sku-apple", 1_000_000, 120),
    ("sku-pear", 1_000_000, 95),
    ("sku-plum", 1_000_000, 250),
    ("sku-fig", 1_000_000, 410),
    ("limited", 0, 9_900),
];

/// The stock of `limited` for a run of `orders` orders (40 for 1,000; 2 for 50).
pub fn limited_stock(orders: usize) -> i64 {
    (orders as i64 / 25).max(2)
}

fn plans(cfg: &DemoConfig) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    (0..cfg.orders)
        .map(|_| {
            let p = if rng.random_bool(0.1) {
                PRODUCTS[4]
            } else {
                PRODUCTS[rng.random_range(0..4)]
            };
            let quantity: i32 = rng.random_range(1..=3);
            let r: f64 = rng.random();
            let fate = if r < 0.74 {
                Fate::PayNow
            } else if r < 0.78 {
                Fate::PayAtDeadline
            } else if r < 0.85 {
                Fate::PayLate
            } else {
                Fate::NeverPay
            };
            Plan {
                order: NewOrder {
                    sku: p.0.into(),
                    quantity,
                    amount_cents: p.2 * i64::from(quantity),
                },
                fate,
                duplicate_create: rng.random_bool(0.1),
                duplicate_pay: fate == Fate::PayNow && rng.random_bool(0.1),
            }
        })
        .collect()
}

#[derive(Default)]
struct Counters {
    create_retries: AtomicU64,
    late_refused: AtomicU64,
    duplicate_pay: AtomicU64,
    late_accepted: AtomicU64,
    race_paid: AtomicU64,
    race_refused: AtomicU64,
    republished: AtomicU64,
}

struct Driver {
    cfg: DemoConfig,
    http: reqwest::Client,
    counters: Counters,
    /// Payments racing the timeout, running apart so they hold no client slot while waiting.
    racing: std::sync::Mutex<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>>,
}

impl Driver {
    /// `POST /orders` with the client's key, retried (same key) on errors and 5xx.
    async fn create(&self, key: &str, order: &NewOrder) -> anyhow::Result<Order> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sent = self
                .http
                .post(format!("{}/orders", self.cfg.api_url))
                .header("Idempotency-Key", key)
                .json(order)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    if r.headers().get("idempotent-replayed").is_some() {
                        self.counters.create_retries.fetch_add(1, Ordering::Relaxed);
                    }
                    return r.json::<Order>().await.context("order JSON");
                }
                Ok(r) if r.status().is_client_error() => {
                    anyhow::bail!(
                        "POST /orders: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )
                }
                _ if Instant::now() > deadline => anyhow::bail!("POST /orders: no answer in 20 s"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `POST /orders/{id}/pay` until a decision: paid (true) or refused (false).
    async fn pay(&self, id: i64) -> anyhow::Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sent = self
                .http
                .post(format!("{}/orders/{id}/pay", self.cfg.api_url))
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == StatusCode::OK => return Ok(true),
                Ok(r) if r.status() == StatusCode::CONFLICT => return Ok(false),
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    anyhow::bail!("order {id}: not found")
                }
                _ if Instant::now() > deadline => {
                    anyhow::bail!("order {id}: payment undecided after 30 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(150)).await,
            }
        }
    }

    async fn get(&self, id: i64) -> anyhow::Result<Order> {
        Ok(self
            .http
            .get(format!("{}/orders/{id}", self.cfg.api_url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn one(self: Arc<Self>, i: usize, plan: Plan) -> anyhow::Result<(i64, Fate)> {
        let key = format!("demo-{}-{i}", self.cfg.seed);
        let order = if plan.duplicate_create {
            // The same request twice at once, as a client that timed out and retried would.
            let (a, b) = tokio::join!(
                self.create(&key, &plan.order),
                self.create(&key, &plan.order)
            );
            let (a, b) = (a?, b?);
            anyhow::ensure!(a.id == b.id, "a retried POST /orders made a second order");
            a
        } else {
            self.create(&key, &plan.order).await?
        };
        if plan.fate == Fate::PayAtDeadline {
            let offset_ms = (order.id % 7) * 100 - 300;
            let wait = self.cfg.payment_timeout.as_millis() as i64 + offset_ms;
            let d = self.clone();
            let id = order.id;
            let race = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
                let counter = if d.pay(id).await? {
                    &d.counters.race_paid
                } else {
                    &d.counters.race_refused
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
            self.racing.lock().expect("racing lock").push(race);
        }
        if plan.fate == Fate::PayNow {
            if plan.duplicate_pay {
                self.counters.duplicate_pay.fetch_add(1, Ordering::Relaxed);
                let (a, b) = tokio::join!(self.pay(order.id), self.pay(order.id));
                a?;
                b?;
            } else {
                self.pay(order.id).await?;
            }
        }
        Ok((order.id, plan.fate))
    }

    /// A late payer waits until its order was cancelled, then tries to pay: must be refused.
    async fn pay_late(&self, id: i64) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.cfg.payment_timeout + Duration::from_secs(20);
        loop {
            let order = self.get(id).await?;
            if order.status == "cancelled" {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "order {id}: never cancelled");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if self.pay(id).await? {
            self.counters.late_accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.late_refused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Publishes copies of already-delivered events with their original message ids, as a broker
/// redelivery or an operator's replay would.
/// An order with the ids of the messages the relay published for it.
#[derive(sqlx::FromRow)]
struct Published {
    id: i64,
    sku: String,
    quantity: i32,
    amount_cents: i64,
    created_at: chrono::DateTime<chrono::Utc>,
    created_message_id: Option<i64>,
    paid_message_id: Option<i64>,
    charge_id: Option<String>,
}

/// Returns the copies sent and how many deliveries they make (one per queue they reach).
async fn republish(cfg: &DemoConfig, pool: &PgPool, sample: &[i64]) -> anyhow::Result<(u64, u64)> {
    let conn = Connection::connect(&cfg.amqp_url, ConnectionProperties::default())
        .await
        .context("connect to AMQP_URL")?;
    let channel = conn.create_channel().await?;
    // Confirms: count a duplicate only once the broker has it.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let rows: Vec<Published> =
        sqlx::query_as(
            "SELECT id, sku, quantity, amount_cents, created_at, created_message_id, paid_message_id, charge_id \
             FROM shop.orders WHERE id = ANY($1)",
        )
        .bind(sample)
        .fetch_all(pool)
        .await?;
    let (mut sent, mut deliveries) = (0, 0);
    for Published {
        id,
        sku,
        quantity,
        amount_cents,
        created_at,
        created_message_id: created_msg,
        paid_message_id: paid_msg,
        charge_id,
    } in rows
    {
        let mut copies: Vec<(i64, &str, Vec<u8>)> = Vec::new();
        if let Some(m) = created_msg {
            let e = OrderEvent {
                order_id: id,
                sku,
                quantity,
                amount_cents,
                created_at,
                reason: None,
            };
            copies.push((m, events::ORDER_CREATED, serde_json::to_vec(&e)?));
        }
        if let (Some(m), Some(charge_id)) = (paid_msg, charge_id) {
            let e = OrderPaid {
                order_id: id,
                amount_cents,
                charge_id,
                created_at,
            };
            copies.push((m, events::ORDER_PAID, serde_json::to_vec(&e)?));
        }
        for (message_id, routing_key, payload) in copies {
            let mut headers = FieldTable::default();
            headers.insert(
                "x-ordering-key".into(),
                AMQPValue::LongString(LongString::from(events::ordering_key(id).as_str())),
            );
            // Persistent, like the relay's: the copy is as real as the original.
            let properties = BasicProperties::default()
                .with_message_id(message_id.to_string().into())
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers);
            channel
                .basic_publish(
                    cfg.exchange.as_str().into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await?
                .await?;
            sent += 1;
            // order.created and order.paid reach the read model (inventory takes saga commands).
            deliveries += 1;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok((sent, deliveries))
}

async fn seed_products(pool: &PgPool, orders: usize) -> anyhow::Result<()> {
    for (sku, stock, _) in PRODUCTS {
        let stock = if *sku == "limited" {
            limited_stock(orders)
        } else {
            *stock
        };
        sqlx::query(
            "INSERT INTO inventory.products (sku, initial, stock) VALUES ($1, $2, $2) \
             ON CONFLICT (sku) DO NOTHING",
        )
        .bind(sku)
        .bind(stock)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Polls `check` every 200 ms until it returns true, or fails after `deadline`.
async fn wait_until<F, Fut>(deadline: Instant, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "not settled in time: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the demo. Returns the summary; `summary.failures` lists broken invariants. An `Err` is
/// a run that could not finish (a part down, a deadline missed).
pub async fn run(cfg: DemoConfig) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&cfg.database_url)
        .await
        .context("connect to the demo database")?;
    seed_products(&pool, cfg.orders).await?;
    let driver = Arc::new(Driver {
        cfg: cfg.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()?,
        counters: Counters::default(),
        racing: Default::default(),
    });

    let results: Vec<anyhow::Result<(i64, Fate)>> =
        futures::stream::iter(plans(&cfg).into_iter().enumerate())
            .map(|(i, plan)| {
                let d = driver.clone();
                async move { d.one(i, plan).await }
            })
            .buffer_unordered(cfg.concurrency.max(1))
            .collect()
            .await;
    let mut placed = Vec::new();
    for r in results {
        placed.push(r?);
    }

    // Duplicates of delivered events: every 10th order's created and paid messages.
    let sample: Vec<i64> = placed
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| id % 10 == 3)
        .collect();
    let (republished, duplicate_deliveries) = republish(&cfg, &pool, &sample).await?;
    driver
        .counters
        .republished
        .store(republished, Ordering::Relaxed);

    let late: Vec<i64> = placed
        .iter()
        .filter(|(_, f)| *f == Fate::PayLate)
        .map(|(id, _)| *id)
        .collect();
    let late_results: Vec<anyhow::Result<()>> = futures::stream::iter(late)
        .map(|id| {
            let d = driver.clone();
            async move { d.pay_late(id).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in late_results {
        r?;
    }
    let racing = std::mem::take(&mut *driver.racing.lock().expect("racing lock"));
    for race in racing {
        race.await??;
    }

    let deadline = Instant::now() + cfg.settle_deadline;
    wait_until(
        deadline,
        "every order paid or cancelled, every saga finished, outbox empty",
        || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM shop.orders WHERE status IN ('pending', 'paying')) \
                  + (SELECT count(*) FROM saga.instances WHERE state IN ('running', 'compensating')) \
                  + (SELECT count(*) FROM outbox.messages)",
            )
            .fetch_one(&pool)
            .await?;
            Ok(open == 0)
        },
    )
    .await?;
    wait_until(deadline, "read model caught up", || async {
        let behind: bool = sqlx::query_scalar(
            "SELECT (SELECT (count(*), count(*) FILTER (WHERE status = 'paid'), \
                            count(*) FILTER (WHERE status = 'cancelled'), \
                            coalesce(sum(amount_cents) FILTER (WHERE status = 'paid'), 0)::bigint) FROM shop.orders) \
                 IS DISTINCT FROM \
                    (SELECT (coalesce(sum(orders_created), 0)::bigint, coalesce(sum(orders_paid), 0)::bigint, \
                             coalesce(sum(orders_cancelled), 0)::bigint, coalesce(sum(revenue_cents), 0)::bigint) \
                     FROM reporting.daily_totals)",
        )
        .fetch_one(&pool)
        .await?;
        Ok(!behind)
    })
    .await?;
    let http = driver.http.clone();
    let paid_count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shop.orders WHERE status = 'paid'")
            .fetch_one(&pool)
            .await?;
    wait_until(deadline, "every paid order notified", || async {
        let s: ReceiverStats = http
            .get(format!("{}/stats", cfg.receiver_url))
            .send()
            .await?
            .json()
            .await?;
        Ok(s.delivered as i64 >= paid_count)
    })
    .await?;
    // Each republished copy reaches one or two queues; wait until the inboxes have seen them.
    let expected_dups = duplicate_deliveries;
    wait_until(deadline, "republished duplicates consumed", || async {
        Ok(scrape(
            &http,
            &cfg.workers_metrics_url,
            "consumer_messages_duplicate_total",
        )
        .await
            >= expected_dups)
    })
    .await?;

    let mut s = summarise(&cfg, &pool, &http, &driver.counters).await?;
    s.elapsed = started.elapsed();
    Ok(s)
}

async fn summarise(
    cfg: &DemoConfig,
    pool: &PgPool,
    http: &reqwest::Client,
    c: &Counters,
) -> anyhow::Result<Summary> {
    let provider: ProviderStats = http
        .get(format!("{}/stats", cfg.provider_url))
        .send()
        .await?
        .json()
        .await?;
    let receiver: ReceiverStats = http
        .get(format!("{}/stats", cfg.receiver_url))
        .send()
        .await?
        .json()
        .await?;
    let (timed_out, refunded, declined, with_saga): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE cancel_reason = 'payment timeout'), \
                count(*) FILTER (WHERE status = 'cancelled' AND refund_id IS NOT NULL), \
                count(*) FILTER (WHERE cancel_reason = 'payment declined'), \
                count(*) FILTER (WHERE saga_id IS NOT NULL) FROM shop.orders",
    )
    .fetch_one(pool)
    .await?;
    let (created, paid, cancelled, revenue, withdrawn, both): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'paid'), count(*) FILTER (WHERE status = 'cancelled'), \
                coalesce(sum(amount_cents) FILTER (WHERE status = 'paid'), 0)::bigint, \
                count(*) FILTER (WHERE timeout_withdrawn), \
                count(*) FILTER (WHERE paid_at IS NOT NULL AND cancelled_at IS NOT NULL) \
         FROM shop.orders",
    )
    .fetch_one(pool)
    .await?;
    let (reserved, released): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'reserved'), \
                count(*) FILTER (WHERE status = 'released') FROM inventory.reservations",
    )
    .fetch_one(pool)
    .await?;
    let (rejected, refund_attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.idx = 1 AND s.state = 'failed'), \
                coalesce(sum(s.compensation_attempts) FILTER (WHERE s.idx = 0), 0)::bigint \
         FROM saga.steps s JOIN saga.instances i ON i.id = s.saga_id WHERE i.name = $1",
    )
    .bind(crate::order_saga::NAME)
    .fetch_one(pool)
    .await?;
    let (started, completed, compensated, stuck, twice): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'completed'), \
                count(*) FILTER (WHERE state = 'compensated'), count(*) FILTER (WHERE state = 'stuck'), \
                (SELECT count(*) FROM saga.steps s JOIN saga.instances j ON j.id = s.saga_id \
                  WHERE j.name = $1 AND s.compensations_applied > 1) \
         FROM saga.instances i WHERE i.name = $1",
    )
    .bind(crate::order_saga::NAME)
    .fetch_one(pool)
    .await?;
    let (p50, p99): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
         FROM (SELECT extract(epoch FROM updated_at - created_at) * 1000 AS ms \
               FROM saga.instances WHERE state IN ('completed', 'compensated')) d",
    )
    .fetch_one(pool)
    .await?;
    // The query side, read the way a client would: through the service.
    let days: Vec<crate::api::DailyTotals> = http
        .get(format!("{}/reports/daily", cfg.api_url))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let read_model = days.iter().fold((0, 0, 0, 0), |t, d| {
        (
            t.0 + d.orders_created,
            t.1 + d.orders_paid,
            t.2 + d.orders_cancelled,
            t.3 + d.revenue_cents,
        )
    });
    let notification_attempts: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(attempts), 0)::bigint FROM notify.notifications")
            .fetch_one(pool)
            .await?;

    let mut failures = Vec::new();
    // Stock never negative, and conserved: what left the shelf is exactly what is reserved.
    let stock: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.sku, p.initial, p.stock, coalesce((SELECT sum(quantity) FROM inventory.reservations r \
                 WHERE r.sku = p.sku AND r.status = 'reserved'), 0)::bigint \
         FROM inventory.products p ORDER BY p.sku",
    )
    .fetch_all(pool)
    .await?;
    for (sku, initial, left, held) in &stock {
        if *left < 0 {
            failures.push(format!("stock of {sku} is negative: {left}"));
        }
        if initial - left != *held {
            failures.push(format!(
                "stock of {sku}: {initial} - {left} left != {held} reserved (applied twice or lost)"
            ));
        }
    }
    if both > 0 {
        failures.push(format!("{both} orders both paid and cancelled"));
    }
    // Each payment charged once at the provider; every charged order either paid and holding
    // its stock, or refunded exactly once (the provider's own records, not ours).
    let orders: Vec<(i64, String, i64, Option<String>, bool)> = sqlx::query_as(
        "SELECT o.id, o.status, o.amount_cents, o.refund_id, \
                EXISTS (SELECT 1 FROM inventory.reservations r WHERE r.order_id = o.id AND r.status = 'reserved') \
         FROM shop.orders o ORDER BY o.id",
    )
    .fetch_all(pool)
    .await?;
    let charges: &BTreeMap<i64, u32> = &provider.charges_per_order;
    let refunds: &BTreeMap<i64, u32> = &provider.refunds_per_order;
    let mut paid_and_reserved = 0;
    for (id, status, amount, refund_id, holds_stock) in &orders {
        let n = charges.get(id).copied().unwrap_or(0);
        let r = refunds.get(id).copied().unwrap_or(0);
        if n > 1 {
            failures.push(format!("order {id} charged {n} times"));
        }
        if r > 1 {
            failures.push(format!("saga: order {id} refunded {r} times"));
        }
        if n >= 1 && provider.amount_per_order.get(id) != Some(amount) {
            failures.push(format!("order {id} charged another amount than {amount}"));
        }
        match status.as_str() {
            "paid" if n != 1 || r != 0 || !holds_stock => failures.push(format!(
                "saga: order {id} paid with {n} charges, {r} refunds, stock held: {holds_stock}"
            )),
            "paid" => paid_and_reserved += 1,
            "cancelled" if n == 1 && (r != 1 || refund_id.is_none()) => failures.push(format!(
                "saga: order {id} charged, cancelled, refunded {r} times (our record: {refund_id:?})"
            )),
            "cancelled" if n == 0 && (r != 0 || refund_id.is_some()) => failures.push(format!(
                "saga: order {id} never charged but refunded {r} times"
            )),
            "cancelled" if *holds_stock => {
                failures.push(format!("order {id} cancelled but holds stock"))
            }
            _ => {}
        }
    }
    if provider.charges as i64 != paid + refunded {
        failures.push(format!(
            "{} charges at the provider for {paid} paid and {refunded} refunded orders",
            provider.charges
        ));
    }
    if provider.refunds as i64 != refunded {
        failures.push(format!(
            "saga: {} refunds at the provider for {refunded} refunded orders",
            provider.refunds
        ));
    }
    if stuck != 0 {
        failures.push(format!("saga: {stuck} sagas stuck"));
    }
    if started != completed + compensated + stuck || started != with_saga {
        failures.push(format!(
            "saga: started {started} != completed {completed} + compensated {compensated} \
             (orders with a saga: {with_saga})"
        ));
    }
    if completed != paid || compensated != refunded + declined {
        failures.push(format!(
            "saga: completed {completed} for {paid} paid orders, compensated {compensated} for \
             {refunded} refunded + {declined} declined"
        ));
    }
    if twice != 0 {
        failures.push(format!("saga: {twice} steps compensated twice"));
    }
    if read_model != (created, paid, cancelled, revenue) {
        failures.push(format!("read model {read_model:?} disagrees with the orders ({created}, {paid}, {cancelled}, {revenue})"));
    }
    let late_accepted = c.late_accepted.load(Ordering::Relaxed);
    if late_accepted > 0 {
        failures.push(format!(
            "{late_accepted} payments accepted after the order was cancelled"
        ));
    }
    let paid_ids: Vec<i64> = orders
        .iter()
        .filter(|o| o.1 == "paid")
        .map(|o| o.0)
        .collect();
    let unnotified = paid_ids
        .iter()
        .filter(|id| !receiver.paid_orders.contains(id))
        .count();
    if unnotified > 0 || receiver.paid_orders.len() != paid_ids.len() {
        failures.push(format!(
            "{unnotified} paid orders not notified; {} notified in all",
            receiver.paid_orders.len()
        ));
    }
    if receiver.bad_signatures > 0 {
        failures.push(format!(
            "{} webhooks with a bad signature",
            receiver.bad_signatures
        ));
    }

    Ok(Summary {
        orders_created: created,
        create_retries_absorbed: c.create_retries.load(Ordering::Relaxed),
        paid,
        timed_out,
        refunded,
        declined,
        sagas_started: started,
        sagas_completed: completed,
        sagas_compensated: compensated,
        sagas_stuck: stuck,
        refunds_issued: provider.refunds,
        refund_attempts,
        paid_and_reserved,
        timeouts_withdrawn: withdrawn,
        late_payments_refused: c.late_refused.load(Ordering::Relaxed),
        race_paid: c.race_paid.load(Ordering::Relaxed),
        race_refused: c.race_refused.load(Ordering::Relaxed),
        duplicate_pay_requests: c.duplicate_pay.load(Ordering::Relaxed),
        gateway_replays: scrape(
            http,
            &cfg.gateway_metrics_url,
            "gateway_idempotency_replays_total",
        )
        .await,
        gateway_in_flight: scrape(
            http,
            &cfg.gateway_metrics_url,
            "gateway_idempotency_conflicts_total",
        )
        .await,
        provider_dedupes: provider.deduplicated,
        stale_tokens: provider.stale_fencing_tokens,
        charges: provider.charges,
        provider_failures: provider.failures_injected,
        provider_slow: provider.slow_injected,
        gateway_retries: scrape(http, &cfg.gateway_metrics_url, "gateway_retries_total").await,
        published: scrape(http, &cfg.relay_metrics_url, "outbox_relay_published_total").await,
        republished: c.republished.load(Ordering::Relaxed),
        duplicates_suppressed: scrape(
            http,
            &cfg.workers_metrics_url,
            "consumer_messages_duplicate_total",
        )
        .await,
        applied: scrape(
            http,
            &cfg.workers_metrics_url,
            "consumer_messages_processed_total",
        )
        .await,
        consumer_retries: scrape(
            http,
            &cfg.workers_metrics_url,
            "consumer_messages_retried_total",
        )
        .await,
        reserved,
        rejected,
        released,
        notifications_delivered: receiver.delivered,
        notification_attempts,
        p50_ms: p50.unwrap_or(0.0),
        p99_ms: p99.unwrap_or(0.0),
        read_model,
        elapsed: Duration::ZERO,
        failures,
    })
}
