-- The W3C trace context of the transaction that created a notification. The notifier's delivery
-- span joins that trace, and every webhook attempt carries it (`traceparent` with the trace id
-- kept and a new parent span id, `tracestate` as stored).

-- A version-00 traceparent as the W3C Trace Context recommendation defines it: lower-case hex,
-- trace id and parent id not all zeros.
CREATE FUNCTION notify.valid_traceparent(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT t ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
       AND substr(t, 4, 32) <> repeat('0', 32)
       AND substr(t, 37, 16) <> repeat('0', 16)
$$;

ALTER TABLE notify.notifications
    ADD COLUMN traceparent text CHECK (traceparent IS NULL OR notify.valid_traceparent(traceparent)),
    ADD COLUMN tracestate  text CHECK (tracestate IS NULL OR (octet_length(tracestate) <= 512
                                                              AND tracestate !~ '[\r\n]')),
    ADD CHECK (tracestate IS NULL OR traceparent IS NOT NULL);

-- The store with the trace context. A malformed traceparent passed explicitly is an error naming
-- the field (the caller wrote it); readers of headers drop a malformed one before calling.
CREATE FUNCTION notify.insert_notification(
    p_endpoint text,
    p_event_type text,
    p_body bytea,
    p_content_type text,
    p_dedupe_key text,
    p_deliver_at timestamptz,
    p_traceparent text,
    p_tracestate text
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored bigint;
BEGIN
    IF p_traceparent IS NOT NULL AND NOT notify.valid_traceparent(p_traceparent) THEN
        RAISE EXCEPTION 'notify.send: traceparent must be a W3C traceparent 00-<32 hex>-<16 hex>-<2 hex> (lower case, ids not all zeros), got %',
            quote_literal(left(p_traceparent, 80))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_tracestate IS NOT NULL AND p_traceparent IS NULL THEN
        RAISE EXCEPTION 'notify.send: tracestate needs a traceparent'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_tracestate IS NOT NULL AND (octet_length(p_tracestate) > 512 OR p_tracestate ~ '[\r\n]') THEN
        RAISE EXCEPTION 'notify.send: tracestate must be at most 512 bytes on one line'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    stored := notify.insert_notification(p_endpoint, p_event_type, p_body, p_content_type,
                                         p_dedupe_key, p_deliver_at);
    -- A deduplicated send returns the first notification, whose context stays its own.
    UPDATE notify.notifications
    SET traceparent = p_traceparent, tracestate = nullif(p_tracestate, '')
    WHERE id = stored AND p_traceparent IS NOT NULL AND traceparent IS NULL
      AND xmin = pg_current_xact_id()::xid;
    RETURN stored;
END
$$;

-- The SQL API keeps its parameters and positions; the trace context is two optional trailing
-- parameters (named calls: `traceparent => ..., tracestate => ...`).
DROP FUNCTION notify.send(text, text, jsonb, text, timestamptz);
CREATE FUNCTION notify.send(
    endpoint text,
    event_type text,
    body jsonb,
    dedupe_key text DEFAULT NULL,
    deliver_at timestamptz DEFAULT NULL,
    traceparent text DEFAULT NULL,
    tracestate text DEFAULT NULL
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT notify.insert_notification(endpoint, event_type, convert_to(body::text, 'UTF8'),
                                      'application/json', dedupe_key, deliver_at,
                                      traceparent, tracestate)
$$;

DROP FUNCTION notify.send_bytes(text, text, bytea, text, text, timestamptz);
CREATE FUNCTION notify.send_bytes(
    endpoint text,
    event_type text,
    body bytea,
    content_type text DEFAULT 'application/octet-stream',
    dedupe_key text DEFAULT NULL,
    deliver_at timestamptz DEFAULT NULL,
    traceparent text DEFAULT NULL,
    tracestate text DEFAULT NULL
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT notify.insert_notification(endpoint, event_type, body, content_type, dedupe_key,
                                      deliver_at, traceparent, tracestate)
$$;
