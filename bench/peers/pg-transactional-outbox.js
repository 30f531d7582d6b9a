// The pg-transactional-outbox side of `cargo run --release -p bench -- peers`: its listener
// publishing into a durable RabbitMQ queue with publisher confirms, in its polling or its
// logical replication mode. Run by bench/src/peers/pg_outbox.rs with NODE_PATH pointing at the
// pinned packages it installed; prints JSON lines on stdout, its results last.
//
// node pg-transactional-outbox.js MODE JOB DATABASE_URL AMQP_URL QUEUE COUNT SIZE MAX_SECS BATCH POLL_MS SLOT
//
// MODE is `polling` or `replication`; JOB is `drain` or `listen`.
// 1. The library's own setup script for MODE creates its outbox table and, for polling, its
//    polling function; for replication, its publication and logical replication slot (named
//    SLOT: slots are per cluster). Rows are `parallel`, so polled batches are not serialised.
// 2. drain: COUNT rows with a SIZE-byte payload are inserted (after the slot exists), then the
//    listener runs until every row is processed or MAX_SECS pass.
//    listen: the listener runs, `{"ready":true}` is printed, and the caller inserts rows (one
//    transaction each) until it closes our stdin; then the listener is shut down.
// 3. The handler publishes each message (persistent, message id = row id, body = its payload as
//    JSON) and waits for its confirm. Polling takes batches of BATCH every POLL_MS; replication
//    runs up to BATCH handlers at once (its semaphore concurrency controller; its default is a
//    mutex, one message at a time).
"use strict";
const { Client } = require("pg");
const amqp = require("amqplib");
const {
  DatabaseSetupExporter,
  createReplicationSemaphoreConcurrencyController,
  initializePollingMessageListener,
  initializeReplicationMessageListener,
} = require("pg-transactional-outbox");

const [mode, job, dbUrl, amqpUrl, queue, count, size, maxSecs, batch, pollMs, slot] =
  process.argv.slice(2);
const COUNT = Number(count);

const publication = `${slot}_pub`;

/** The library's setup script for `mode`, run on `db`. */
async function setup(db, database) {
  const common = {
    outboxOrInbox: "outbox",
    database,
    schema: "public",
    table: "outbox",
    listenerRole: "postgres",
    handlerRole: "postgres",
  };
  if (mode === "polling") {
    const script = DatabaseSetupExporter.createPollingScript(
      { ...common, nextMessagesSchema: "public", nextMessagesName: "next_outbox_messages" },
      true,
    );
    await db.query(script);
    return;
  }
  const script = DatabaseSetupExporter.createReplicationScript(
    { ...common, publication, replicationSlot: slot },
    true,
  );
  // One query string is one implicit transaction, and PostgreSQL creates no logical slot in a
  // transaction that has written: the slot part of the script runs on its own.
  const marker = "-- Create the logical replication slot";
  const at = script.indexOf(marker);
  if (at < 0) throw new Error("replication script without its slot section");
  await db.query(script.slice(0, at));
  await db.query(script.slice(at));
}

function listenerConfig(dbUrl, database) {
  const url = new URL(dbUrl);
  const dbListenerConfig = {
    host: url.hostname,
    port: Number(url.port || 5432),
    user: decodeURIComponent(url.username),
    password: decodeURIComponent(url.password) || undefined,
    database,
  };
  const settings = {
    dbSchema: "public",
    dbTable: "outbox",
    enableMaxAttemptsProtection: false,
    enablePoisonousMessageProtection: false,
    messageCleanupIntervalInMs: 0,
  };
  if (mode === "polling") {
    Object.assign(settings, {
      nextMessagesBatchSize: Number(batch),
      nextMessagesFunctionName: "next_outbox_messages",
      nextMessagesPollingIntervalInMs: Number(pollMs),
    });
  } else {
    Object.assign(settings, { dbPublication: publication, dbReplicationSlot: slot });
  }
  return { outboxOrInbox: "outbox", dbListenerConfig, dbHandlerConfig: dbListenerConfig, settings };
}

// The library's warnings, counted by text (ids and numbers left out), each printed once.
const warnings = {};
function warn(...args) {
  const text = args.filter((a) => typeof a === "string").join(" ");
  const kind = text.replace(/[0-9a-f]{8}-[0-9a-f-]{27}/g, "ID").replace(/\d+(\/[0-9A-F]+)?/g, "N");
  warnings[kind] = (warnings[kind] ?? 0) + 1;
  if (warnings[kind] === 1 && !stopping) console.error(`pg-transactional-outbox warns: ${text}`);
}

function start(config, handler) {
  const silent = () => {};
  const logger = {
    trace: silent,
    debug: silent,
    info: silent,
    warn,
    fatal: (...a) => stopping || console.error(...a),
    error: (...a) => stopping || console.error(...a),
    child: () => logger,
  };
  if (mode === "polling") {
    return initializePollingMessageListener(config, handler, logger)[0];
  }
  return initializeReplicationMessageListener(config, handler, logger, {
    concurrencyStrategy: createReplicationSemaphoreConcurrencyController(Number(batch)),
  })[0];
}

async function processedCount(db) {
  const { rows } = await db.query(
    "SELECT count(*)::int AS n FROM public.outbox WHERE processed_at IS NOT NULL",
  );
  return rows[0].n;
}

async function main() {
  if (mode !== "polling" && mode !== "replication") throw new Error(`mode ${mode}?`);
  if (job !== "drain" && job !== "listen") throw new Error(`job ${job}?`);
  const db = new Client({ connectionString: dbUrl });
  await db.connect();
  const database = new URL(dbUrl).pathname.slice(1);
  await setup(db, database);
  if (job === "drain") {
    await db.query(
      `INSERT INTO public.outbox (id, aggregate_type, aggregate_id, message_type, concurrency, payload, created_at)
       SELECT gen_random_uuid(), 'bench', g::text, 'bench', 'parallel', jsonb_build_object('x', repeat('x', $2::int)),
              clock_timestamp()
       FROM generate_series(1, $1::int) g`,
      [COUNT, Number(size) - 8],
    );
    await db.query("VACUUM ANALYZE public.outbox");
  }

  const connection = await amqp.connect(amqpUrl);
  const channel = await connection.createConfirmChannel();
  let published = 0;
  const handler = {
    handle: async (message) => {
      const body = Buffer.from(JSON.stringify(message.payload));
      await new Promise((resolve, reject) =>
        channel.publish("", queue, body, { persistent: true, messageId: message.id }, (err) =>
          err ? reject(err) : resolve(),
        ),
      );
      published += 1;
    },
  };
  const started = performance.now();
  const shutdown = start(listenerConfig(dbUrl, database), handler);
  let processed = 0;
  if (job === "drain") {
    const deadline = started + Number(maxSecs) * 1000;
    while (performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
      processed = await processedCount(db);
      if (processed >= COUNT) break;
    }
  } else {
    // The replication listener has its stream open once it has acknowledged the slot's start;
    // the caller's rows are committed after this line, so they are all in the slot either way.
    console.log(JSON.stringify({ ready: true }));
    process.stdin.resume();
    await new Promise((resolve) => process.stdin.on("end", resolve));
    processed = await processedCount(db);
  }
  const secs = (performance.now() - started) / 1000;
  const result = { processed, published, secs, rate: processed / secs, warnings };
  // Handlers still running when the listener stops fail on its closed pools; the library logs
  // them and some of its promises reject unhandled. The results are in by then.
  stopping = true;
  await shutdown();
  await channel.close().catch(() => {});
  await connection.close().catch(() => {});
  await db.end();
  console.log(JSON.stringify(result));
  process.exit(0);
}

let stopping = false;
const fail = (e) => {
  if (stopping) return;
  console.error(e);
  process.exit(1);
};
process.on("unhandledRejection", fail);
process.on("uncaughtException", fail);
main().catch(fail);
