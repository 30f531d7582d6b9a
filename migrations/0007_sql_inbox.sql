-- The consumer inbox as a SQL API, for consumers written in any language (Python, Node, Go...)
-- that cannot link consumer-lib. Each function runs inside the caller's own transaction, next to
-- the statements that apply the message's effects, exactly as consumer-lib does it in Rust:
--
--   BEGIN;
--   SELECT inbox.claim('inventory', 7311890219438080);   -- false: a duplicate, apply nothing
--   UPDATE stock SET reserved = reserved + 1 WHERE sku = 'A-1';
--   COMMIT;                                              -- then ack the delivery
--
-- The functions write the very tables consumer-lib uses (0002_inbox.sql), with the same keys and
-- conflict rules, so a consumer name means one inbox whichever language its instances are
-- written in: a Rust and a Python instance of `inventory` never both apply a message, and
-- `consumer-dead` lists and replays the dead letters either one recorded.
--
-- Bad input raises an exception whose message starts with the function and names the parameter
-- (`inbox.claim: message_id must be a positive message id, got -1`), before anything is written.
-- SQLSTATE: 22004 (null_value_not_allowed) for a NULL, 22023 (invalid_parameter_value) otherwise.

-- The checks on a name parameter shared by the functions below. Names are AMQP short strings
-- (consumer names double as queue names in consumer-lib), hence at most 255 bytes.
CREATE FUNCTION inbox.check_name(caller text, parameter text, value text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '%: % must not be NULL', caller, parameter USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF value = '' OR octet_length(value) > 255 THEN
        RAISE EXCEPTION '%: % must be 1 to 255 bytes, got %', caller, parameter, octet_length(value)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION inbox.check_name(text, text, text) IS
    'Internal: raises an error naming the parameter unless value is 1 to 255 bytes.';

-- Claims `message_id` for `consumer` in the caller's transaction: true the first time, false
-- when the message was already applied (a redelivery or a copy), in which case the caller applies
-- nothing, commits (or rolls back) and acks. The claim is only durable if the caller commits:
-- a rollback (the effect failed, the process died) releases it, and the redelivered message
-- claims again. Two transactions claiming the same id at once meet on the primary key: the
-- second waits for the first, then gets false if the first committed, true if it rolled back.
-- Message ids are the AMQP `message_id` property the relay sets (a positive bigint in decimal).
CREATE FUNCTION inbox.claim(consumer text, message_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    inserted integer;
BEGIN
    PERFORM inbox.check_name('inbox.claim', 'consumer', claim.consumer);
    IF claim.message_id IS NULL THEN
        RAISE EXCEPTION 'inbox.claim: message_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF claim.message_id <= 0 THEN
        RAISE EXCEPTION 'inbox.claim: message_id must be a positive message id, got %', claim.message_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The same statement as consumer-lib's inbox::mark_done, so both agree on what a duplicate is.
    INSERT INTO inbox.processed (consumer, message_id) VALUES (claim.consumer, claim.message_id)
    ON CONFLICT (consumer, message_id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted = 1;
END
$$;
COMMENT ON FUNCTION inbox.claim(text, bigint) IS
    'Marks message_id applied for consumer in the caller''s transaction: true once, false for a duplicate. '
    'A rollback releases the claim. Shares inbox.processed with consumer-lib.';

-- Records a message the consumer gives up on in the compensation log, where `consumer-dead list`
-- shows it and `consumer-dead replay` publishes it back to `queue` (the queue this consumer
-- reads) with the same message id. Call it in a transaction of its own, or in one that does not
-- also claim the message: a dead letter must not roll back with the failed effect, and a
-- message that never committed its claim is applied when replayed. Then ack the delivery.
-- True when recorded; false when this message id already waits in this consumer's log
-- (a redelivery of a message being dead-lettered is logged once, as consumer-lib does).
--   reason:     rejected (the effect refused it for good), exhausted (out of attempts),
--               undecodable (the body could not be parsed), invalid (no usable message_id)
--   message_id: the delivery's id; NULL only with reason 'invalid'
--   headers:    the AMQP headers as a JSON object (replayed as headers)
CREATE FUNCTION inbox.dead_letter(
    consumer text,
    queue text,
    message_id bigint,
    exchange text,
    routing_key text,
    payload bytea,
    reason text,
    last_error text,
    headers jsonb DEFAULT '{}',
    content_type text DEFAULT NULL,
    ordering_key text DEFAULT NULL,
    attempts integer DEFAULT 1
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    caller constant text := 'inbox.dead_letter';
    inserted integer;
BEGIN
    PERFORM inbox.check_name(caller, 'consumer', dead_letter.consumer);
    PERFORM inbox.check_name(caller, 'queue', dead_letter.queue);
    IF dead_letter.reason IS NULL THEN
        RAISE EXCEPTION '%: reason must not be NULL', caller USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF dead_letter.reason NOT IN ('rejected', 'exhausted', 'undecodable', 'invalid') THEN
        RAISE EXCEPTION '%: reason must be rejected, exhausted, undecodable or invalid, got %', caller,
            quote_literal(dead_letter.reason) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.message_id IS NULL AND dead_letter.reason <> 'invalid' THEN
        RAISE EXCEPTION '%: message_id must not be NULL (NULL only with reason ''invalid'', for a message without a usable id)', caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF dead_letter.message_id <= 0 THEN
        RAISE EXCEPTION '%: message_id must be a positive message id, got %', caller, dead_letter.message_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.exchange IS NULL THEN
        RAISE EXCEPTION '%: exchange must not be NULL (use '''' for the default exchange)', caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(dead_letter.exchange) > 255 THEN
        RAISE EXCEPTION '%: exchange is % bytes, at most 255 allowed', caller, octet_length(dead_letter.exchange)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.routing_key IS NULL THEN
        RAISE EXCEPTION '%: routing_key must not be NULL', caller USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(dead_letter.routing_key) > 255 THEN
        RAISE EXCEPTION '%: routing_key is % bytes, at most 255 allowed', caller, octet_length(dead_letter.routing_key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.payload IS NULL THEN
        RAISE EXCEPTION '%: payload must not be NULL (use ''''::bytea for an empty body)', caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- The relay refuses larger payloads, so a larger body did not come from the outbox.
    IF octet_length(dead_letter.payload) > outbox.max_payload_bytes() THEN
        RAISE EXCEPTION '%: payload is % bytes, at most % allowed', caller,
            octet_length(dead_letter.payload), outbox.max_payload_bytes() USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF dead_letter.last_error IS NULL THEN
        RAISE EXCEPTION '%: last_error must not be NULL (say why the consumer gave up)', caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF dead_letter.headers IS NOT NULL AND jsonb_typeof(dead_letter.headers) <> 'object' THEN
        RAISE EXCEPTION '%: headers must be a JSON object, got %', caller, jsonb_typeof(dead_letter.headers)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.content_type IS NOT NULL AND (dead_letter.content_type = '' OR octet_length(dead_letter.content_type) > 255) THEN
        RAISE EXCEPTION '%: content_type must be 1 to 255 bytes (or NULL for none)', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.ordering_key IS NOT NULL AND (dead_letter.ordering_key = '' OR octet_length(dead_letter.ordering_key) > 255) THEN
        RAISE EXCEPTION '%: ordering_key must be 1 to 255 bytes (or NULL for none)', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dead_letter.attempts IS NULL OR dead_letter.attempts < 0 THEN
        RAISE EXCEPTION '%: attempts must be 0 or more, got %', caller, coalesce(dead_letter.attempts::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- The same conflict rule as consumer-lib's dead_letter::record (the partial unique index of
    -- 0002_inbox.sql): one waiting row per (consumer, message id).
    INSERT INTO inbox.compensation_log
        (consumer, queue, message_id, exchange, routing_key, payload, headers, content_type,
         ordering_key, attempts, reason, last_error)
    VALUES (dead_letter.consumer, dead_letter.queue, dead_letter.message_id, dead_letter.exchange,
            dead_letter.routing_key, dead_letter.payload, coalesce(dead_letter.headers, '{}'),
            dead_letter.content_type, dead_letter.ordering_key, dead_letter.attempts,
            dead_letter.reason, dead_letter.last_error)
    ON CONFLICT (consumer, message_id) WHERE message_id IS NOT NULL AND replayed_at IS NULL
    DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted = 1;
END
$$;
COMMENT ON FUNCTION inbox.dead_letter(text, text, bigint, text, text, bytea, text, text, jsonb, text, text, integer) IS
    'Records a message consumer gave up on in inbox.compensation_log (listed and replayed by consumer-dead). '
    'True when recorded, false when the message id already waits there.';

-- Deletes up to `max_rows` of `consumer`'s inbox rows claimed more than `older_than` ago and
-- returns how many it deleted. One call is one short statement: call it again (each in its own
-- transaction, e.g. autocommit) while it returns `max_rows`, as consumer-lib's purge loop does,
-- rather than deleting millions of rows under one long-held set of locks. `older_than` must
-- cover every way a duplicate can still arrive (consumer-lib keeps 7 days by default): a
-- message redelivered after its row is purged is applied again.
CREATE FUNCTION inbox.purge(consumer text, older_than interval, max_rows integer DEFAULT 5000)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    deleted integer;
BEGIN
    PERFORM inbox.check_name('inbox.purge', 'consumer', purge.consumer);
    IF purge.older_than IS NULL THEN
        RAISE EXCEPTION 'inbox.purge: older_than must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF purge.older_than < interval '0' THEN
        RAISE EXCEPTION 'inbox.purge: older_than must be 0 or more, got %', purge.older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF purge.max_rows IS NULL OR purge.max_rows < 1 THEN
        RAISE EXCEPTION 'inbox.purge: max_rows must be 1 or more, got %', coalesce(purge.max_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM inbox.processed WHERE ctid IN (
        SELECT ctid FROM inbox.processed
        WHERE consumer = purge.consumer AND processed_at < now() - purge.older_than
        LIMIT purge.max_rows);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION inbox.purge(text, interval, integer) IS
    'Deletes up to max_rows inbox rows of consumer older than older_than; returns the count. Repeat while it returns max_rows.';
