//! The validated settings of a consumer: what
//! [`ConsumerBuilder::build`](crate::ConsumerBuilder::build) produces and every running part
//! reads. Nothing here imports another module of the consumer.

use std::time::Duration;

use lapin::ExchangeKind;

use crate::RetryPolicy;
use crate::broker::BrokerUrls;

/// Everything a running consumer needs to know, after validation.
#[derive(Clone)]
pub(crate) struct Config {
    pub name: String,
    pub amqp_urls: BrokerUrls,
    pub queue: String,
    pub exchanges: Vec<(String, ExchangeKind)>,
    pub bindings: Vec<(String, String)>,
    pub quorum: bool,
    pub single_active_consumer: bool,
    pub prefetch: u16,
    pub concurrency: usize,
    pub batch_size: usize,
    pub ordered: bool,
    pub retry: RetryPolicy,
    pub dead_letter_queue: bool,
    pub delay_prefix: String,
    pub inbox_retention: Duration,
    pub purge_interval: Duration,
    pub purge_batch: i64,
    pub shutdown_grace: Duration,
    pub uses_inbox: bool,
}
