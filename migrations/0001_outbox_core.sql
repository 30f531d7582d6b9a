-- The outbox core: messages waiting to be relayed, dead letters, message ids and the SQL API.

CREATE SCHEMA IF NOT EXISTS outbox;

-- This database's place in the global id space. Message ids carry it, so ids made in two
-- databases with different `database_id`s can never collide. `outbox-relay migrate
-- --database-id N` sets it; a fresh database gets a random one until then.
CREATE TABLE outbox.settings (
    singleton   boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    database_id smallint NOT NULL CHECK (database_id BETWEEN 0 AND 127)
);
INSERT INTO outbox.settings (database_id) VALUES (floor(random() * 128)::smallint);

-- Id layout (63 bits, always positive):
--   41 bits  milliseconds since 2024-01-01T00:00:00Z (until 2093)
--    7 bits  database id (outbox.settings)
--    6 bits  node: 0 = this SQL function, 1..63 leased to producer processes (outbox.id_nodes)
--    9 bits  sequence within the millisecond (512 ids per ms per node)
--
-- Node 0: the high-water mark `v = ms << 9 | seq` lives in a sequence. A sequence never goes
-- backwards, is crash safe (WAL-logged ahead of use) and is not rolled back, so ids from this
-- function never repeat even when the server clock steps back: they run ahead of the clock until
-- it catches up. The session advisory lock makes "take the next value or jump to the clock" one
-- step; it is held for microseconds, never until commit, so producers' commits stay concurrent.
CREATE SEQUENCE outbox.sql_id_high_water AS bigint MINVALUE 0 START 0;

CREATE FUNCTION outbox.next_id() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    clock_v bigint := (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1704067200000) << 9;
    v  bigint;
    db bigint;
BEGIN
    SELECT database_id INTO db FROM outbox.settings;
    PERFORM pg_advisory_lock(7310, 1);
    v := nextval('outbox.sql_id_high_water');
    IF v < clock_v THEN
        PERFORM setval('outbox.sql_id_high_water', clock_v, true);
        v := clock_v;
    END IF;
    PERFORM pg_advisory_unlock(7310, 1);
    RETURN ((v >> 9) << 22) | (db << 15) | (v & 511);
END
$$;

-- Nodes 1..63 for producer processes. A process leases one (expired lease, oldest high water
-- first), renews it while it lives, and reserves time ahead in `high_water_ms` before it issues
-- ids up to that time: a later holder of the node starts above it, so an id is never repeated.
CREATE TABLE outbox.id_nodes (
    node             smallint    PRIMARY KEY CHECK (node BETWEEN 1 AND 63),
    holder           text,
    lease_expires_at timestamptz NOT NULL DEFAULT '-infinity',
    high_water_ms    bigint      NOT NULL DEFAULT 0
);
INSERT INTO outbox.id_nodes (node) SELECT generate_series(1, 63);

-- Messages waiting to be published. A row is deleted once the broker confirmed it: deleting
-- (not marking) keeps the claim query on a small, hot table.
CREATE TABLE outbox.messages (
    id           bigint      PRIMARY KEY,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    content_type text,
    ordering_key text,
    dedupe_key   text,
    -- When the message may go out: the requested delivery time, then the next try after a
    -- failed attempt.
    available_at timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now()
) WITH (
    -- A queue table: every row is inserted once, maybe updated after a failed attempt, and
    -- deleted. The default thresholds (20 % of the table) let dead tuples pile up between
    -- vacuums while the live table stays small, and the claim scans walk over them. Vacuum after
    -- a fixed number of dead rows instead, without throttling, and keep some free space in each
    -- page so retry updates can stay HOT.
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 90
);

-- The claim: due rows in id order.
CREATE INDEX messages_due_idx ON outbox.messages (available_at, id);
-- Per-key order: "is there an earlier message with my ordering key?"
CREATE INDEX messages_ordering_idx ON outbox.messages (ordering_key, id) WHERE ordering_key IS NOT NULL;
-- One pending message per dedupe key; cancel finds it here.
CREATE UNIQUE INDEX messages_dedupe_idx ON outbox.messages (dedupe_key) WHERE dedupe_key IS NOT NULL;

-- Messages that could not be published after the maximum attempts (or were moved by hand).
-- Never deleted by the relay: `outbox-relay dead redrive` puts them back in the queue.
CREATE TABLE outbox.dead_letters (
    id              bigint      PRIMARY KEY,
    exchange        text        NOT NULL,
    routing_key     text        NOT NULL,
    payload         bytea       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}',
    content_type    text,
    ordering_key    text,
    dedupe_key      text,
    attempts        integer     NOT NULL,
    reason          text        NOT NULL,
    created_at      timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);

-- Limits shared by every entry point. AMQP short strings hold at most 255 bytes.
CREATE FUNCTION outbox.max_payload_bytes() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 4 * 1024 * 1024 $$;

-- The checks every entry point applies to a message (enqueue, the Rust producer, prepare), so a
-- message accepted by one is never refused by another. `caller` prefixes the error message.
CREATE FUNCTION outbox.validate_message(
    caller text,
    p_exchange text,
    p_routing_key text,
    p_payload bytea,
    p_headers jsonb,
    p_content_type text,
    p_ordering_key text,
    p_deliver_at timestamptz
) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_exchange IS NULL THEN
        RAISE EXCEPTION '%: exchange must not be NULL (use '''' for the default exchange)', caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_exchange) > 255 THEN
        RAISE EXCEPTION '%: exchange is % bytes, at most 255 allowed', caller, octet_length(p_exchange)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_routing_key IS NULL THEN
        RAISE EXCEPTION '%: routing_key must not be NULL', caller USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_routing_key) > 255 THEN
        RAISE EXCEPTION '%: routing_key is % bytes, at most 255 allowed', caller, octet_length(p_routing_key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_exchange = '' AND p_routing_key = '' THEN
        RAISE EXCEPTION '%: routing_key must name a queue when exchange is the default exchange ('''')', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_payload IS NULL THEN
        RAISE EXCEPTION '%: payload must not be NULL (use ''''::bytea for an empty body)', caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_payload) > outbox.max_payload_bytes() THEN
        RAISE EXCEPTION '%: payload is % bytes, at most % allowed', caller,
            octet_length(p_payload), outbox.max_payload_bytes()
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION '%: headers must be a JSON object, got %', caller, jsonb_typeof(p_headers)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_headers IS NOT NULL AND octet_length(p_headers::text) > 65536 THEN
        RAISE EXCEPTION '%: headers are % bytes as JSON, at most 65536 allowed', caller, octet_length(p_headers::text)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_content_type IS NOT NULL AND (p_content_type = '' OR octet_length(p_content_type) > 255) THEN
        RAISE EXCEPTION '%: content_type must be 1 to 255 bytes', caller USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ordering_key IS NOT NULL AND (p_ordering_key = '' OR octet_length(p_ordering_key) > 255) THEN
        RAISE EXCEPTION '%: ordering_key must be 1 to 255 bytes (or NULL for none)', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_deliver_at IS NOT NULL AND NOT isfinite(p_deliver_at) THEN
        RAISE EXCEPTION '%: deliver_at must be a finite time', caller USING ERRCODE = 'invalid_parameter_value';
    END IF;

END
$$;

-- Validates and stores one message with a given id. Used by outbox.enqueue and by the Rust
-- producer (which brings ids from its leased node). Returns the id stored, or, when a pending
-- message already has this dedupe key, that message's id (nothing new is stored).
CREATE FUNCTION outbox.insert_message(
    p_id bigint,
    p_exchange text,
    p_routing_key text,
    p_payload bytea,
    p_headers jsonb,
    p_content_type text,
    p_ordering_key text,
    p_deliver_at timestamptz,
    p_dedupe_key text
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored bigint;
BEGIN
    PERFORM outbox.validate_message('outbox.enqueue', p_exchange, p_routing_key, p_payload,
                                    p_headers, p_content_type, p_ordering_key, p_deliver_at);
    IF p_dedupe_key IS NOT NULL AND (p_dedupe_key = '' OR octet_length(p_dedupe_key) > 255) THEN
        RAISE EXCEPTION 'outbox.enqueue: dedupe_key must be 1 to 255 bytes (or NULL for none)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO outbox.messages (id, exchange, routing_key, payload, headers, content_type,
                                 ordering_key, dedupe_key, available_at)
    VALUES (p_id, p_exchange, p_routing_key, p_payload, coalesce(p_headers, '{}'), p_content_type,
            p_ordering_key, p_dedupe_key, coalesce(p_deliver_at, now()))
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING id INTO stored;

    IF stored IS NULL THEN
        SELECT id INTO stored FROM outbox.messages WHERE dedupe_key = p_dedupe_key;
        IF stored IS NULL THEN
            -- The conflicting message was published or cancelled between the two statements.
            RAISE EXCEPTION 'outbox.enqueue: dedupe_key % raced with its own publication; retry the transaction', p_dedupe_key
                USING ERRCODE = 'serialization_failure';
        END IF;
        RETURN stored;
    END IF;

    -- Opt-in wake-up for relays (SET outbox.notify = 'on'). Off by default: NOTIFY takes a
    -- global lock at commit and cut producers' commit rate here (see README, Performance).
    IF current_setting('outbox.notify', true) = 'on' THEN
        PERFORM pg_notify('outbox_wakeup', '');
    END IF;
    RETURN stored;
END
$$;

-- The public SQL API (fixed contract). Call it inside your own transaction.
CREATE FUNCTION outbox.enqueue(
    exchange text,
    routing_key text,
    payload bytea,
    headers jsonb DEFAULT '{}',
    ordering_key text DEFAULT NULL,
    deliver_at timestamptz DEFAULT NULL,
    dedupe_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT outbox.insert_message(outbox.next_id(), exchange, routing_key, payload, headers, NULL,
                                 ordering_key, deliver_at, dedupe_key)
$$;

-- Removes a pending message by its dedupe key. True when one was removed; false when there was
-- none (never enqueued, already published, or already cancelled).
CREATE FUNCTION outbox.cancel(dedupe_key text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    removed integer;
BEGIN
    IF cancel.dedupe_key IS NULL THEN
        RAISE EXCEPTION 'outbox.cancel: dedupe_key must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    DELETE FROM outbox.messages m WHERE m.dedupe_key = cancel.dedupe_key;
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed > 0;
END
$$;
