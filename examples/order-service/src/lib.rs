//! The order-service example: one shop built from every part of the product.
//!
//! The order service ([`api`]) writes an order and its outbox messages in one transaction, pays
//! through the gateway ([`payment`]) and, in the payment transaction, withdraws the payment
//! timeout, enqueues `order.paid` and produces a signed webhook with `notify.send`. Three
//! consumers built on consumer-lib ([`workers`]) apply the events exactly once: [`inventory`]
//! reserves stock, [`timeout`] cancels orders left unpaid, [`read_model`] keeps per-day totals
//! (the query side). The outside world is faked locally: a payment [`provider`] that is
//! sometimes slow and sometimes fails, and a webhook [`receiver`] that verifies signatures.
//! [`demo`] drives the whole flow, prints a summary and checks the invariants. [`events`] holds
//! the message types, [`schema`] the example's tables, [`metrics_text`] a Prometheus scrape helper.
#![warn(missing_docs)]

pub mod api;
pub mod demo;
pub mod events;
pub mod inventory;
pub mod metrics_text;
pub mod order_saga;
pub mod payment;
pub mod provider;
pub mod read_model;
pub mod receiver;
pub mod schema;
pub mod timeout;
pub mod workers;
