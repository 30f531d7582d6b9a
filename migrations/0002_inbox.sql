-- The consumer side (consumer-lib): the inbox that makes redeliveries harmless, and the
-- compensation log where messages that could not be applied are kept for a person to look at.

CREATE SCHEMA IF NOT EXISTS inbox;

-- One row per (consumer, message id) whose effects committed. The row is inserted in the same
-- transaction as the handler's effects, so "the effects happened" and "the message is marked
-- done" commit or roll back together; a redelivered message finds its row and is acked without
-- running the handler again. Rows are purged in batches once older than the consumer's
-- retention window (longer than any redelivery or retry can arrive).
CREATE TABLE inbox.processed (
    consumer     text        NOT NULL,
    message_id   bigint      NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
) WITH (
    -- Insert-mostly, deleted in batches by age: vacuum after a fixed number of rows rather than
    -- a fraction of a table that may be large.
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000
);

-- The purge walks the oldest rows of one consumer.
CREATE INDEX processed_age_idx ON inbox.processed (consumer, processed_at);

-- The compensation log: every message a consumer gave up on (rejected by its handler, out of
-- attempts, or undecodable), with everything needed to understand and replay it. Rows stay
-- until a person deletes them; a replay marks the row instead of deleting it, as an audit trail.
CREATE TABLE inbox.compensation_log (
    id               bigserial   PRIMARY KEY,
    consumer         text        NOT NULL,
    -- The queue to put the message back on when it is replayed.
    queue            text        NOT NULL,
    -- NULL when the message arrived without a usable message_id property.
    message_id       bigint,
    exchange         text        NOT NULL,
    routing_key      text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}',
    content_type     text,
    ordering_key     text,
    attempts         integer     NOT NULL CHECK (attempts >= 0),
    -- Why the consumer gave up: rejected | exhausted | undecodable | invalid
    reason           text        NOT NULL CHECK (reason IN ('rejected', 'exhausted', 'undecodable', 'invalid')),
    last_error       text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz
);

-- A message is dead-lettered at most once while it waits for a decision, even when the broker
-- delivers it again before the ack of the first dead-lettering arrived. After a replay it may
-- fail again and get a new row.
CREATE UNIQUE INDEX compensation_log_pending_idx ON inbox.compensation_log (consumer, message_id)
    WHERE message_id IS NOT NULL AND replayed_at IS NULL;
CREATE INDEX compensation_log_consumer_idx ON inbox.compensation_log (consumer, id);
