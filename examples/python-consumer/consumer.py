#!/usr/bin/env python3
"""Exactly-once effects in Python, on the inbox SQL API (migrations/0007_sql_inbox.sql).

RabbitMQ delivers at least once; this consumer applies each message's effect exactly once per
message id, the way consumer-lib does in Rust:

    BEGIN; SELECT inbox.claim(consumer, message_id); <effect>; COMMIT; then ack

A redelivered message finds its claim and is acked without applying anything. A crash before
COMMIT leaves neither claim nor effect, so the redelivery applies it; a crash after COMMIT and
before the ack leaves both, so the redelivery is skipped. It shares the inbox with consumer-lib:
Rust and Python instances of one consumer name never both apply a message.

The effect here is one row in python_example.applied (deliberately without a unique key, so a
double application would show): SELECT count(*), count(DISTINCT message_id) stay equal however
often the broker redelivers.

Messages it gives up on go to the compensation log through inbox.dead_letter, where
`consumer-dead list` shows them and `consumer-dead replay ID` puts them back on the queue:
a body that is not JSON (undecodable), a message without a positive integer message_id
(invalid), a payload the effect refuses (rejected), or an effect that kept failing (exhausted).

Configuration: DATABASE_URL and AMQP_URL as for the rest of the project; see --help.
SIGTERM or Ctrl-C stops it: the consumer is cancelled, deliveries not yet handled go back to
the queue, and it exits 0.
"""

import argparse
import datetime
import decimal
import json
import os
import signal
import sys
import time

import pika
import pika.exceptions
import psycopg

EFFECT_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS python_example;
CREATE TABLE IF NOT EXISTS python_example.applied (
    message_id bigint      NOT NULL,
    n          bigint      NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- Only written with --record-deliveries (tests). Unlogged: its inserts then commit without
-- waiting for a WAL flush, so recording every delivery costs little.
CREATE UNLOGGED TABLE IF NOT EXISTS python_example.deliveries (
    message_id   text,
    redelivered  boolean     NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""


class Reject(Exception):
    """The effect refuses this message for good: dead-letter it now, never retry."""


def apply_effect(cur, message_id, order):
    """The business effect, in the caller's transaction (after the claim succeeded)."""
    n = order.get("n") if isinstance(order, dict) else None
    if not isinstance(n, int) or isinstance(n, bool):
        raise Reject(f"payload has no integer field n: {order!r:.200}")
    cur.execute(
        "INSERT INTO python_example.applied (message_id, n) VALUES (%s, %s)", (message_id, n)
    )


def amqp_to_json(value):
    """AMQP header values as JSON, for the compensation log's headers column."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"header value {value!r} has no JSON form")


def parse_message_id(properties):
    """The relay's message_id property: a positive bigint in decimal, else None."""
    raw = properties.message_id
    if raw is None or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if 0 < value < 2**63 else None


class Consumer:
    def __init__(self, args):
        self.args = args
        self.attempts = {}  # message id -> failed attempts so far (this process only)
        self.stats = {"deliveries": 0, "applied": 0, "duplicates": 0, "dead_lettered": 0}
        self.stopping = False
        self.db = None
        self.connect_db()

    def connect_db(self):
        # Autocommit: every transaction below is an explicit `with db.transaction()` block,
        # so nothing stays open between messages (an idle open transaction holds back vacuum).
        self.db = psycopg.connect(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
                                  autocommit=True)
        with self.db.transaction():
            # Two instances starting at once must not race on CREATE ... IF NOT EXISTS.
            self.db.execute("SELECT pg_advisory_xact_lock(7310, 7)")
            self.db.execute(EFFECT_SCHEMA)

    def dead_letter(self, method, properties, body, message_id, reason, error, attempts):
        """Records the message in the compensation log, in a transaction of its own: it must
        survive the rollback of the failed effect, and the claim it never committed lets a
        replay apply it."""
        headers = json.dumps(properties.headers or {}, default=amqp_to_json)
        recorded = self.db.execute(
            "SELECT inbox.dead_letter(consumer => %s, queue => %s, message_id => %s, "
            "exchange => %s, routing_key => %s, payload => %s, reason => %s, "
            "last_error => %s, headers => %s::jsonb, content_type => %s, "
            "ordering_key => %s, attempts => %s)",
            (self.args.consumer, self.args.queue, message_id, method.exchange,
             method.routing_key, body, reason, error[:2000], headers,
             properties.content_type or None,
             (properties.headers or {}).get("x-ordering-key"), attempts),
        ).fetchone()[0]
        if recorded:
            self.stats["dead_lettered"] += 1
        log(f"dead-lettered message {message_id} ({reason}): {error}")

    def handle(self, channel, method, properties, body):
        """Handles one delivery and settles it (ack, or nack back to the queue)."""
        self.stats["deliveries"] += 1
        if self.args.record_deliveries:
            self.db.execute(
                "INSERT INTO python_example.deliveries (message_id, redelivered) VALUES (%s, %s)",
                (properties.message_id, method.redelivered),
            )
        message_id = parse_message_id(properties)
        if message_id is None:
            # Without an id there is nothing to dedupe on: applying it could double an effect.
            self.dead_letter(method, properties, body, None, "invalid",
                             f"message_id {properties.message_id!r} is not a positive integer", 1)
            channel.basic_ack(method.delivery_tag)
            return
        try:
            order = json.loads(body)
        except ValueError as err:
            self.dead_letter(method, properties, body, message_id, "undecodable",
                             f"body does not decode as JSON: {err}", 1)
            channel.basic_ack(method.delivery_tag)
            return

        attempt = self.attempts.get(message_id, 0) + 1
        try:
            with self.db.transaction():
                claimed = self.db.execute(
                    "SELECT inbox.claim(%s, %s)", (self.args.consumer, message_id)
                ).fetchone()[0]
                if claimed:
                    with self.db.cursor() as cur:
                        apply_effect(cur, message_id, order)
            # Committed: only now is it safe to ack.
        except Reject as err:
            self.attempts.pop(message_id, None)
            self.dead_letter(method, properties, body, message_id, "rejected", str(err), attempt)
            channel.basic_ack(method.delivery_tag)
            return
        except psycopg.OperationalError:
            raise  # an outage, not the message's fault: handled in run(), not an attempt
        except Exception as err:  # the effect failed in some other way: retry, then give up
            if attempt >= self.args.max_attempts:
                self.attempts.pop(message_id, None)
                self.dead_letter(method, properties, body, message_id, "exhausted",
                                 f"{type(err).__name__}: {err}", attempt)
                channel.basic_ack(method.delivery_tag)
            else:
                self.attempts[message_id] = attempt
                log(f"message {message_id} failed (attempt {attempt}), requeued: {err}")
                time.sleep(min(0.1 * 2 ** attempt, 5.0))
                channel.basic_nack(method.delivery_tag, requeue=True)
            return

        self.attempts.pop(message_id, None)
        self.stats["applied" if claimed else "duplicates"] += 1
        if self.args.lose_first_ack and not method.redelivered:
            # Test hook: behave as if the process died between COMMIT and ack. The broker
            # delivers the message again and the claim must turn it into a duplicate.
            channel.basic_nack(method.delivery_tag, requeue=True)
        else:
            channel.basic_ack(method.delivery_tag)

    def reconnect_db(self):
        delay = 0.1
        while not self.stopping:
            try:
                self.db.close()
                self.connect_db()
                return
            except psycopg.OperationalError as err:
                log(f"database still unreachable ({err}); retrying in {delay:.1f}s")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def run(self):
        params = pika.URLParameters(os.environ.get("AMQP_URL", DEFAULT_AMQP_URL))
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        # Durable: the queue and its messages survive a broker restart.
        channel.queue_declare(self.args.queue, durable=True)
        for exchange, routing_key in self.args.bind:
            channel.queue_bind(self.args.queue, exchange, routing_key)
        # Enough unacked deliveries in flight to keep the pipe full; each is one transaction.
        channel.basic_qos(prefetch_count=self.args.prefetch)
        log(f"consuming {self.args.queue} as {self.args.consumer}")
        # A generator with a timeout instead of callbacks: the loop gets control back twice a
        # second even when idle, so a signal only has to set a flag.
        for method, properties, body in channel.consume(self.args.queue, inactivity_timeout=0.5):
            if self.stopping:
                break
            if method is None:
                # Nothing buffered for half a second: a quiet point the tests wait for.
                if self.args.report_idle:
                    print("idle " + " ".join(f"{k}={v}" for k, v in self.stats.items()),
                          flush=True)
                continue
            try:
                self.handle(channel, method, properties, body)
            except psycopg.OperationalError as err:
                # The database went away: whatever was in flight did not commit. Put the
                # message back and reconnect; the redelivery claims it again.
                log(f"database error, message requeued: {err}")
                channel.basic_nack(method.delivery_tag, requeue=True)
                self.reconnect_db()
        # Cancel the consumer; deliveries received but not handled go back to the queue.
        channel.cancel()
        connection.close()
        self.db.close()
        print("stopped " + " ".join(f"{k}={v}" for k, v in self.stats.items()), flush=True)


DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/test"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def log(text):
    print(f"python-consumer: {text}", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", required=True, help="queue to consume (declared durable)")
    parser.add_argument("--consumer", help="inbox consumer name (default: the queue name)")
    parser.add_argument("--bind", nargs=2, action="append", default=[],
                        metavar=("EXCHANGE", "ROUTING_KEY"),
                        help="bind the queue to an existing exchange (repeatable)")
    parser.add_argument("--prefetch", type=int, default=100, help="unacked deliveries in flight")
    parser.add_argument("--max-attempts", type=int, default=5,
                        help="failed attempts of an effect before it is dead-lettered")
    parser.add_argument("--lose-first-ack", action="store_true",
                        help="test hook: after committing a first delivery, requeue it instead "
                             "of acking (a crash between COMMIT and ack)")
    parser.add_argument("--record-deliveries", action="store_true",
                        help="test hook: log every delivery in python_example.deliveries")
    parser.add_argument("--report-idle", action="store_true",
                        help="test hook: print the counters each time no delivery arrived for 0.5 s")
    args = parser.parse_args()
    args.consumer = args.consumer or args.queue
    for name, value in (("--queue", args.queue), ("--consumer", args.consumer)):
        if not value or len(value.encode()) > 255:
            parser.error(f"{name} must be 1 to 255 bytes")
    if not 1 <= args.prefetch <= 65535:
        parser.error("--prefetch must be 1 to 65535")
    if args.max_attempts < 1:
        parser.error("--max-attempts must be 1 or more")

    consumer = Consumer(args)

    def stop(signum, _frame):
        log(f"signal {signum}: stopping")
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = 0.1
    while True:
        try:
            consumer.run()
            return
        except pika.exceptions.AMQPError as err:
            # Broker restart or network loss: unacked deliveries go back to the queue on the
            # broker's side, and the inbox turns those already committed into duplicates.
            if consumer.stopping:
                return
            log(f"broker connection lost ({err!r}); reconnecting in {delay:.1f}s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


if __name__ == "__main__":
    main()
