-- Parameter names and duration types made consistent, and every function of the product's
-- schemas documented in the catalog (`\df+`, `obj_description`).
--
-- The rule: a function users call (the SQL API: enqueue, prepare and its decisions, notify.send,
-- saga.start, the barriers, inbox.claim, ...) takes plain parameter names, so named calls read
-- as the documentation does (`outbox.commit_prepared(id => 7)`); its body qualifies a column of
-- the same name. A function only the product calls (its catalog comment starts with
-- "Internal") takes `p_` names, so its body can name columns freely. Durations the product
-- passes between its own parts are `interval`s, as `notify.claim` already took.
--
-- Changed here:
-- - outbox.commit_prepared, outbox.rollback_prepared, outbox.prepared_status: `p_id`,
--   `p_decided_by` become `id`, `decided_by`, the names their documentation always used.
--   Positional calls (all of the product's, and the documented form) are unaffected.
-- - Internal functions that had plain names get `p_` ones: outbox.validate_message (`caller`),
--   inbox.check_name, saga.validate_message, notify.claim.
-- - gateway.lock_enqueue and gateway.lock_try take the wait and the lease as `interval`. The
--   `bigint` milliseconds forms stay as thin wrappers for gateways of the previous release
--   while a rolling upgrade runs; a later migration removes them.
--
-- Functions are dropped and created again (CREATE OR REPLACE cannot rename a parameter); their
-- callers are PL/pgSQL and resolve them at run time.

DROP FUNCTION outbox.commit_prepared(bigint, text);
CREATE FUNCTION outbox.commit_prepared(id bigint, decided_by text DEFAULT 'producer') RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    m outbox.prepared_messages%ROWTYPE;
    d text;
BEGIN
    DELETE FROM outbox.prepared_messages p WHERE p.id = commit_prepared.id RETURNING * INTO m;
    IF FOUND THEN
        -- No dedupe key: a prepared message keeps its id, and a dedupe hit would replace it.
        PERFORM outbox.insert_message(m.id, m.exchange, m.routing_key, m.payload, m.headers,
                                      m.content_type, m.ordering_key, m.deliver_at, NULL);
        INSERT INTO outbox.prepared_outcomes (id, decision, decided_by)
        VALUES (commit_prepared.id, 'committed', commit_prepared.decided_by);
        RETURN 'committed';
    END IF;
    SELECT o.decision INTO d FROM outbox.prepared_outcomes o WHERE o.id = commit_prepared.id;
    RETURN d;
END
$$;

DROP FUNCTION outbox.rollback_prepared(bigint, text);
CREATE FUNCTION outbox.rollback_prepared(id bigint, decided_by text DEFAULT 'producer') RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    d text;
BEGIN
    DELETE FROM outbox.prepared_messages p WHERE p.id = rollback_prepared.id;
    IF FOUND THEN
        INSERT INTO outbox.prepared_outcomes (id, decision, decided_by)
        VALUES (rollback_prepared.id, 'rolled_back', rollback_prepared.decided_by);
        RETURN 'rolled_back';
    END IF;
    SELECT o.decision INTO d FROM outbox.prepared_outcomes o WHERE o.id = rollback_prepared.id;
    RETURN d;
END
$$;

DROP FUNCTION outbox.prepared_status(bigint);
CREATE FUNCTION outbox.prepared_status(id bigint) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT p.state FROM outbox.prepared_messages p WHERE p.id = prepared_status.id),
                    (SELECT o.decision FROM outbox.prepared_outcomes o WHERE o.id = prepared_status.id))
$$;

DROP FUNCTION outbox.validate_message(text, text, text, bytea, jsonb, text, text, timestamptz);
CREATE FUNCTION outbox.validate_message(
    p_caller text,
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
        RAISE EXCEPTION '%: exchange must not be NULL (use '''' for the default exchange)', p_caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_exchange) > 255 THEN
        RAISE EXCEPTION '%: exchange is % bytes, at most 255 allowed', p_caller, octet_length(p_exchange)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_routing_key IS NULL THEN
        RAISE EXCEPTION '%: routing_key must not be NULL', p_caller USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_routing_key) > 255 THEN
        RAISE EXCEPTION '%: routing_key is % bytes, at most 255 allowed', p_caller, octet_length(p_routing_key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_exchange = '' AND p_routing_key = '' THEN
        RAISE EXCEPTION '%: routing_key must name a queue when exchange is the default exchange ('''')', p_caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_payload IS NULL THEN
        RAISE EXCEPTION '%: payload must not be NULL (use ''''::bytea for an empty body)', p_caller
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_payload) > outbox.max_payload_bytes() THEN
        RAISE EXCEPTION '%: payload is % bytes, at most % allowed', p_caller,
            octet_length(p_payload), outbox.max_payload_bytes()
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION '%: headers must be a JSON object, got %', p_caller, jsonb_typeof(p_headers)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_headers IS NOT NULL AND octet_length(p_headers::text) > 65536 THEN
        RAISE EXCEPTION '%: headers are % bytes as JSON, at most 65536 allowed', p_caller, octet_length(p_headers::text)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_content_type IS NOT NULL AND (p_content_type = '' OR octet_length(p_content_type) > 255) THEN
        RAISE EXCEPTION '%: content_type must be 1 to 255 bytes', p_caller USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ordering_key IS NOT NULL AND (p_ordering_key = '' OR octet_length(p_ordering_key) > 255) THEN
        RAISE EXCEPTION '%: ordering_key must be 1 to 255 bytes (or NULL for none)', p_caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_deliver_at IS NOT NULL AND NOT isfinite(p_deliver_at) THEN
        RAISE EXCEPTION '%: deliver_at must be a finite time', p_caller USING ERRCODE = 'invalid_parameter_value';
    END IF;

END
$$;

DROP FUNCTION inbox.check_name(text, text, text);
CREATE FUNCTION inbox.check_name(p_caller text, p_parameter text, p_value text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RAISE EXCEPTION '%: % must not be NULL', p_caller, p_parameter USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_value = '' OR octet_length(p_value) > 255 THEN
        RAISE EXCEPTION '%: % must be 1 to 255 bytes, got %', p_caller, p_parameter, octet_length(p_value)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

DROP FUNCTION saga.validate_message(text, jsonb);
CREATE FUNCTION saga.validate_message(p_field text, p_message jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(p_message) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION '%: must be an object {exchange, routing_key, payload}', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(p_message -> 'exchange') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION '%.exchange: must be a string ('''' for the default exchange)', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(p_message -> 'routing_key') IS DISTINCT FROM 'string' OR p_message ->> 'routing_key' = '' THEN
        RAISE EXCEPTION '%.routing_key: must be a non-empty string', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(p_message ->> 'exchange') > 255 OR octet_length(p_message ->> 'routing_key') > 255 THEN
        RAISE EXCEPTION '%: exchange and routing_key are at most 255 bytes', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT p_message ? 'payload' THEN
        RAISE EXCEPTION '%.payload: missing (any JSON value)', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

DROP FUNCTION notify.claim(integer, interval);
CREATE FUNCTION notify.claim(p_batch integer, p_lease interval)
RETURNS TABLE (id bigint, endpoint_id text, claim_token bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    e record;
    busy integer;
    taken integer := 0;
    got integer;
BEGIN
    FOR e IN
        SELECT ep.id, ep.max_in_flight FROM notify.endpoints ep
        WHERE ep.enabled
          AND coalesce(ep.circuit_open_until, '-infinity') <= now()
          AND EXISTS (SELECT 1 FROM notify.notifications n
                      WHERE n.endpoint_id = ep.id AND n.status = 'pending' AND n.next_attempt_at <= now())
        ORDER BY random()   -- no endpoint starves another when the batch is full
        FOR NO KEY UPDATE OF ep SKIP LOCKED
    LOOP
        EXIT WHEN taken >= p_batch;
        SELECT count(*) INTO busy FROM notify.notifications n
        WHERE n.endpoint_id = e.id AND n.claimed_until IS NOT NULL AND n.claimed_until > now()
          AND n.status = 'pending';
        CONTINUE WHEN busy >= e.max_in_flight;
        RETURN QUERY
            UPDATE notify.notifications n
            SET next_attempt_at = now() + p_lease, claimed_until = now() + p_lease,
                claim_token = n.claim_token + 1
            WHERE n.id IN (SELECT d.id FROM notify.notifications d
                           WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now()
                           ORDER BY d.next_attempt_at
                           LIMIT least(e.max_in_flight - busy, p_batch - taken)
                           FOR UPDATE SKIP LOCKED)
            RETURNING n.id, n.endpoint_id, n.claim_token;
        GET DIAGNOSTICS got = ROW_COUNT;
        taken := taken + got;
    END LOOP;
END
$$;

CREATE FUNCTION gateway.lock_enqueue(p_name text, p_wait interval) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO gateway.lock_entries (name, expires_at)
    VALUES (p_name, clock_timestamp() + p_wait + interval '1 second')
    RETURNING id
$$;

CREATE FUNCTION gateway.lock_try(p_id bigint, p_lease interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_name  text;
    v_token bigint;
BEGIN
    SELECT name INTO v_name FROM gateway.lock_entries WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lock entry % does not exist (expired and cleaned up?)', p_id
            USING ERRCODE = 'no_data_found';
    END IF;
    -- Serialises grant decisions per name until commit, so two entries cannot both see
    -- "nobody ahead of me" (a hash collision only serialises two names, harmlessly).
    PERFORM pg_advisory_xact_lock(hashtextextended('gateway.lock:' || v_name, 0));
    IF EXISTS (
        SELECT 1 FROM gateway.lock_entries
        WHERE name = v_name AND id < p_id AND expires_at > clock_timestamp()
    ) THEN
        RETURN NULL;
    END IF;
    v_token := nextval('gateway.fencing_token_seq');
    UPDATE gateway.lock_entries
    SET fencing_token = v_token, expires_at = clock_timestamp() + p_lease
    WHERE id = p_id;
    RETURN v_token;
END
$$;

CREATE OR REPLACE FUNCTION gateway.lock_enqueue(p_name text, p_wait_ms bigint) RETURNS bigint
LANGUAGE sql AS $$ SELECT gateway.lock_enqueue(p_name, p_wait_ms * interval '1 millisecond') $$;
CREATE OR REPLACE FUNCTION gateway.lock_try(p_id bigint, p_lease_ms bigint) RETURNS bigint
LANGUAGE sql AS $$ SELECT gateway.lock_try(p_id, p_lease_ms * interval '1 millisecond') $$;

-- The SQL API.
COMMENT ON FUNCTION outbox.enqueue(text, text, bytea, jsonb, text, timestamptz, text) IS
    'Queues a message in the caller''s transaction: it is published if and only if that '
    'transaction commits. Optional headers, ordering_key (per-key order), deliver_at (a delayed '
    'message) and dedupe_key (a pending message with the same key is kept instead). Returns the '
    'message id.';
COMMENT ON FUNCTION outbox.cancel(text) IS
    'Removes a pending message by its dedupe key; true when one was removed, false when there was '
    'none (never enqueued, already published or already cancelled).';
COMMENT ON FUNCTION outbox.max_payload_bytes() IS
    'The largest payload outbox.enqueue and outbox.prepare accept, in bytes (4 MiB).';
COMMENT ON FUNCTION outbox.prepare(text, text, bytea, jsonb, text, timestamptz, text, text) IS
    'Stores a prepared (two-phase) message and returns its id; it is published only after '
    'outbox.commit_prepared, and the relay asks check_url when it stays undecided.';
COMMENT ON FUNCTION outbox.commit_prepared(bigint, text) IS
    'Commits prepared message id in the caller''s transaction (the relay then publishes it). '
    'Returns the decision in effect: committed, rolled_back when it was rolled back before, NULL '
    'for an unknown id.';
COMMENT ON FUNCTION outbox.rollback_prepared(bigint, text) IS
    'Rolls prepared message id back. Returns the decision in effect: rolled_back, committed when '
    'it was committed before, NULL for an unknown id.';
COMMENT ON FUNCTION outbox.prepared_status(bigint) IS
    'Where prepared message id stands: pending, unresolved, committed, rolled_back, or NULL when '
    'the id is unknown.';
COMMENT ON FUNCTION notify.max_body_bytes() IS
    'The largest webhook body notify.send and notify.send_bytes accept, in bytes.';
COMMENT ON FUNCTION notify.upsert_endpoint(text, text, text, text, integer[], integer, integer, interval) IS
    'Creates or updates a webhook endpoint. A changed secret is a rotation: the old one stays '
    'valid, and is signed with too, for previous_valid_for.';
COMMENT ON FUNCTION notify.valid_traceparent(text) IS
    'Whether t is a version-00 W3C traceparent: lower-case hex, trace id and parent id not all '
    'zeros.';
COMMENT ON FUNCTION saga.start(text, jsonb, jsonb, text, text, integer, integer) IS
    'Starts a saga in the caller''s transaction and enqueues its first action; steps is a JSON '
    'array of {name, action, compensation, timeout_ms, max_attempts}. Returns the saga id.';
COMMENT ON FUNCTION saga.retry(bigint) IS
    'Operator action: sends a stuck saga''s compensation again and resumes compensating; true '
    'when the saga was stuck, false otherwise (nothing changes).';
COMMENT ON FUNCTION saga.barrier_action(bigint, integer) IS
    'A participant''s barrier before an action''s effects, in its transaction: run, duplicate '
    '(it ran before) or blocked (its compensation came first: never apply it).';
COMMENT ON FUNCTION saga.barrier_compensation(bigint, integer) IS
    'A participant''s barrier before a compensation: run (undo the action), empty (the action '
    'never applied; it is now blocked for good) or duplicate (already compensated).';
COMMENT ON FUNCTION saga.reply(text, text, bigint, integer, text, integer, text, text, boolean) IS
    'A participant''s answer to a saga command, enqueued in its transaction to the reply address '
    'the command carried.';

-- Internal: called by the product's own functions and binaries.
COMMENT ON FUNCTION outbox.validate_message(text, text, text, bytea, jsonb, text, text, timestamptz) IS
    'Internal: the checks every entry point applies to a message; p_caller prefixes the error.';
COMMENT ON FUNCTION outbox.insert_message(bigint, text, text, bytea, jsonb, text, text, timestamptz, text) IS
    'Internal: validates and stores one message with a given id (outbox.enqueue, the Rust '
    'producer); returns it, or the id of the pending message with the same dedupe key.';
COMMENT ON FUNCTION inbox.check_name(text, text, text) IS
    'Internal: raises an error naming p_parameter unless p_value is 1 to 255 bytes.';
COMMENT ON FUNCTION notify.insert_notification(text, text, bytea, text, text, timestamptz) IS
    'Internal: stores one notification; returns its id, or the id of the endpoint''s one with the '
    'same dedupe key.';
COMMENT ON FUNCTION notify.insert_notification(text, text, bytea, text, text, timestamptz, text, text) IS
    'Internal: notify.insert_notification with W3C trace context (a malformed traceparent is an '
    'error naming the field).';
COMMENT ON FUNCTION notify.claim(integer, interval) IS
    'Internal (the notifier): claims at most p_batch due notifications within each endpoint''s '
    'free max_in_flight slots, skipping open circuits; each claimed row is leased for p_lease.';
COMMENT ON FUNCTION saga.validate_message(text, jsonb) IS
    'Internal: checks one message definition of a saga step; p_field names it in the error.';
COMMENT ON FUNCTION saga.send(saga.instances, saga.steps, text, integer, integer) IS
    'Internal: enqueues one command (action or compensation) of a step with the saga headers.';
COMMENT ON FUNCTION saga.send_action(saga.instances, integer) IS
    'Internal: sends step p_idx''s action and its timeout (a delayed message to the coordinator).';
COMMENT ON FUNCTION saga.timeout_key(bigint, integer) IS
    'Internal: the dedupe key of a step''s timeout message.';
COMMENT ON FUNCTION saga.compensate_from(bigint, integer) IS
    'Internal: sends the compensation of the highest step at or below p_from that may have '
    'applied; returns the saga''s new state.';
COMMENT ON FUNCTION saga.on_reply(bigint, integer, text, integer, text, text, boolean) IS
    'Internal (the coordinator): applies one reply or timeout to its saga, one at a time per '
    'saga; returns the new state, or ignored for a stale or repeated reply.';
COMMENT ON FUNCTION gateway.lock_enqueue(text, interval) IS
    'Internal (the gateway): queues a waiter for lock p_name and returns its entry id; the entry '
    'expires p_wait + 1 s from now unless gateway.lock_try grants it first.';
COMMENT ON FUNCTION gateway.lock_try(bigint, interval) IS
    'Internal (the gateway): grants the lock to entry p_id for p_lease when no older live entry '
    'for its name exists; returns the fencing token, or NULL while it must wait.';
COMMENT ON FUNCTION gateway.lock_enqueue(text, bigint) IS
    'Internal, deprecated: gateway.lock_enqueue with the wait in milliseconds, for gateways of the '
    'previous release during a rolling upgrade.';
COMMENT ON FUNCTION gateway.lock_try(bigint, bigint) IS
    'Internal, deprecated: gateway.lock_try with the lease in milliseconds, for gateways of the '
    'previous release during a rolling upgrade.';
