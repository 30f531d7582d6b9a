// The pg-transactional-outbox side of `cargo run --release -p bench -- peers`: drain of a due
// backlog into a durable RabbitMQ queue with publisher confirms, polling listener. Run by
// bench/src/peers/pg_outbox.rs with NODE_PATH pointing at the pinned packages it installed;
// prints one JSON line of results on stdout.
//
// node pg-transactional-outbox.js DATABASE_URL AMQP_URL QUEUE COUNT SIZE MAX_SECS BATCH POLL_MS
//
// 1. The library's own setup script creates its outbox table and polling function; COUNT rows
//    with a SIZE-byte payload are inserted, `parallel` so batches are not serialised.
// 2. The polling listener runs until every row is processed or MAX_SECS pass; the handler
//    publishes each message (persistent, message id = row id) and waits for its confirm.
"use strict";
const { Client } = require("pg");
const amqp = require("amqplib");
const {
  DatabaseSetupExporter,
  initializePollingMessageListener,
} = require("pg-transactional-outbox");

const [dbUrl, amqpUrl, queue, count, size, maxSecs, batch, pollMs] = process.argv.slice(2);
const COUNT = Number(count);

async function main() {
  const db = new Client({ connectionString: dbUrl });
  await db.connect();
  const database = new URL(dbUrl).pathname.slice(1);
  await db.query(
    DatabaseSetupExporter.createPollingScript(
      {
        outboxOrInbox: "outbox",
        database,
        schema: "public",
        table: "outbox",
        listenerRole: "postgres",
        handlerRole: "postgres",
        nextMessagesSchema: "public",
        nextMessagesName: "next_outbox_messages",
      },
      true,
    ),
  );
  await db.query(
    `INSERT INTO public.outbox (id, aggregate_type, aggregate_id, message_type, concurrency, payload, created_at)
     SELECT gen_random_uuid(), 'bench', g::text, 'bench', 'parallel', jsonb_build_object('x', repeat('x', $2::int)),
            clock_timestamp()
     FROM generate_series(1, $1::int) g`,
    [COUNT, Number(size) - 8],
  );
  await db.query("VACUUM ANALYZE public.outbox");

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
    nextMessagesBatchSize: Number(batch),
    nextMessagesFunctionName: "next_outbox_messages",
    nextMessagesPollingIntervalInMs: Number(pollMs),
    messageCleanupIntervalInMs: 0,
  };
  const silent = () => {};
  const logger = { trace: silent, debug: silent, info: silent, warn: silent, fatal: console.error, error: console.error, child: () => logger };
  const started = performance.now();
  const [shutdown] = initializePollingMessageListener(
    { outboxOrInbox: "outbox", dbListenerConfig, dbHandlerConfig: dbListenerConfig, settings },
    handler,
    logger,
  );
  const deadline = started + Number(maxSecs) * 1000;
  let processed = 0;
  while (performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    const { rows } = await db.query(
      "SELECT count(*)::int AS n FROM public.outbox WHERE processed_at IS NOT NULL",
    );
    processed = rows[0].n;
    if (processed >= COUNT) break;
  }
  const secs = (performance.now() - started) / 1000;
  await shutdown();
  await channel.close();
  await connection.close();
  await db.end();
  console.log(JSON.stringify({ processed, published, secs, rate: processed / secs }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
