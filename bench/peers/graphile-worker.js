// The graphile-worker side of `cargo run --release -p bench -- peers`: scheduled jobs vs the
// relay's delayed messages. Run by bench/src/peers/graphile.rs with NODE_PATH pointing at the
// pinned graphile-worker it installed; prints one JSON line of results on stdout.
//
// node graphile-worker.js DATABASE_URL DUE WINDOW_MS PENDING LEAD_MS CONCURRENCY POLL_MS
//
// 1. PENDING jobs due in a day (never run here), inserted before the worker starts.
// 2. The worker starts; then DUE jobs are added, due evenly over WINDOW_MS starting LEAD_MS
//    after the first insert.
// 3. Each job records its lateness: when its task starts minus its run_at. If not all have run
//    GRACE_MS after the last one was due, the run stops there, and each job that has not run
//    counts with its lateness so far (a lower bound).
"use strict";
const { run, runMigrations } = require("graphile-worker");
const { Client } = require("pg");

const [url, due, windowMs, pending, leadMs, concurrency, pollMs] = process.argv.slice(2);
const DUE = Number(due);
const WINDOW_MS = Number(windowMs);
const PENDING = Number(pending);
const LEAD_MS = Number(leadMs);
const CHUNK = 50000;
const GRACE_MS = 30000;

const now = () => performance.timeOrigin + performance.now();

async function addJobs(client, n, runAtSql, params, payloadSql = "'{}'::json") {
  for (let from = 0; from < n; from += CHUNK) {
    const to = Math.min(n, from + CHUNK);
    await client.query(
      `SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
         SELECT ROW('due', ${payloadSql}, NULL, ${runAtSql}, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
         FROM generate_series($1::int, $2::int) g))`,
      [from + 1, to, ...params],
    );
  }
}

async function main() {
  await runMigrations({ connectionString: url, logger: quietLogger() });
  const client = new Client({ connectionString: url });
  await client.connect();
  await addJobs(client, PENDING, "now() + interval '1 day'", []);
  await client.query("VACUUM ANALYZE graphile_worker._private_jobs");

  const lateness = [];
  const ran = new Array(DUE + 1).fill(false);
  let lastDone = 0;
  let finished;
  const allDone = new Promise((resolve) => (finished = resolve));
  const runner = await run({
    connectionString: url,
    concurrency: Number(concurrency),
    pollInterval: Number(pollMs),
    noHandleSignals: true,
    logger: quietLogger(),
    taskList: {
      due: async (payload, helpers) => {
        const t = now();
        ran[payload.g] = true;
        lateness.push(t - helpers.job.run_at.getTime());
        lastDone = t;
        if (lateness.length === DUE) finished();
      },
    },
  });

  const insertStart = Date.now();
  const t0 = insertStart + LEAD_MS;
  await addJobs(
    client,
    DUE,
    "to_timestamp(($3::float8 + (g - 1) * $4::float8) / 1000.0)",
    [t0, WINDOW_MS / DUE],
    "json_build_object('g', g)",
  );
  const insertMs = Date.now() - insertStart;
  const timeout = setTimeout(() => finished(), t0 + WINDOW_MS + GRACE_MS - Date.now());
  await allDone;
  clearTimeout(timeout);
  const done = lateness.length;
  const end = now();
  const step = WINDOW_MS / DUE;
  for (let g = 1; g <= DUE; g++) {
    if (!ran[g]) lateness.push(end - (t0 + (g - 1) * step));
  }
  await runner.stop();
  await client.end();

  lateness.sort((a, b) => a - b);
  const q = (p) => lateness[Math.min(lateness.length - 1, Math.round((lateness.length - 1) * p))];
  console.log(
    JSON.stringify({
      done,
      p50_ms: q(0.5),
      p99_ms: q(0.99),
      max_ms: lateness[lateness.length - 1],
      // Jobs run per second from the first one due to the last one done.
      throughput: done / (((done === DUE ? lastDone : end) - t0) / 1000),
      insert_ms: insertMs,
    }),
  );
}

function quietLogger() {
  const { Logger } = require("graphile-worker");
  return new Logger(() => (level, message) => {
    if (level === "error") console.error(message);
  });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
