//! Broker helpers shared by the scenarios: queues, the raw pipelined publisher baseline, and a
//! consumer that timestamps arrivals.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::{MaybeDone, maybe_done};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

/// Connects to `AMQP_URL`.
pub async fn connect() -> anyhow::Result<Connection> {
    Ok(Connection::connect(
        &integration_tests::amqp_url(),
        ConnectionProperties::default(),
    )
    .await?)
}

/// Declares a durable classic queue (the relay's usual target).
pub async fn declare_queue(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            queue_args(),
        )
        .await?;
    Ok(())
}

fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    if let Ok(kind) = std::env::var("BENCH_QUEUE_TYPE") {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString(kind.into()),
        );
    }
    args
}

/// How many messages `queue` holds (a passive declare: the queue's declaration is left to whoever
/// owns it).
pub async fn queue_len(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Empties a queue.
pub async fn purge(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .queue_purge(name.into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

/// Deletes a queue.
pub async fn delete_queue(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .queue_delete(name.into(), Default::default())
        .await?;
    Ok(())
}

/// The ceiling: `n` persistent messages of `size` bytes published on one confirm channel with
/// `in_flight` unconfirmed at most, as fast as the broker takes them. Returns msg/s.
pub async fn raw_publish(
    connection: &Connection,
    queue: &str,
    n: usize,
    size: usize,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = vec![b'x'; size];
    let started = Instant::now();
    // As the relay does: each publish is polled once (which queues its frames), and its write
    // and confirm are awaited later, so lapin's I/O thread writes many messages per wake-up.
    let mut pending = VecDeque::with_capacity(in_flight);
    for i in 0..n {
        let mut send = Box::pin(maybe_done(
            channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                BasicProperties::default()
                    .with_message_id(i.to_string().into())
                    .with_delivery_mode(2),
            ),
        ));
        let _ = futures::poll!(send.as_mut());
        pending.push_back(send);
        if pending.len() >= in_flight {
            confirmed(pending.pop_front().expect("non-empty")).await?;
        }
    }
    for send in pending {
        confirmed(send).await?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = channel.close(200, "done".into()).await;
    Ok(rate)
}

/// Waits for a queued publish to be written and confirmed.
async fn confirmed<F>(mut send: std::pin::Pin<Box<MaybeDone<F>>>) -> anyhow::Result<()>
where
    F: std::future::Future<Output = lapin::Result<lapin::PublisherConfirm>>,
{
    send.as_mut().await;
    let confirm = send
        .as_mut()
        .take_output()
        .ok_or_else(|| anyhow::anyhow!("publish has no result"))??;
    anyhow::ensure!(
        matches!(confirm.await?, Confirmation::Ack(None)),
        "raw publish not acked"
    );
    Ok(())
}

/// Opens a channel with `prefetch` unacked deliveries at most and starts consuming `queue`
/// with manual acks.
pub async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// Arrival times by `message_id`, filled by a consumer task.
pub type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

/// Consumes `queue` (acking in the consumer), recording each message id with its arrival time.
pub async fn record_arrivals(connection: &Connection, queue: &str) -> anyhow::Result<Arrivals> {
    // Prefetch well above ~100: below that the consumer, not the relay, would be measured.
    let (_channel, mut consumer) = consume(connection, queue, 1000).await?;
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let sink = arrivals.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let now = Instant::now();
            if let Some(id) = delivery.properties.message_id() {
                sink.lock()
                    .expect("arrivals lock")
                    .push((id.as_str().to_owned(), now));
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    });
    Ok(arrivals)
}

/// Waits until `arrivals` holds `n` entries (or `timeout` passes).
pub async fn wait_arrivals(arrivals: &Arrivals, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while arrivals.lock().expect("arrivals lock").len() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} arrived",
            arrivals.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
