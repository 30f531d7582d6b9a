-- Best-effort notification: signed webhooks to partner endpoints, retried on a widening schedule
-- until acknowledged, every attempt recorded. The notifier (crate `notifier`) claims due rows
-- from notify.notifications; the wait between two attempts is the row's `next_attempt_at`, so
-- a restarted notifier loses nothing and keeps the schedule.

CREATE SCHEMA IF NOT EXISTS notify;

-- Where notifications go, and how.
CREATE TABLE notify.endpoints (
    id                          text        PRIMARY KEY
                                            CHECK (id ~ '^[A-Za-z0-9._:-]{1,100}$'),
    url                         text        NOT NULL CHECK (url ~ '^https?://[^\s/]+'),
    -- The HMAC key is the secret's UTF-8 bytes. While `previous_secret` is still valid (rotation)
    -- every request carries two signatures, so a receiver may switch keys at its own pace.
    secret                      text        NOT NULL CHECK (octet_length(secret) BETWEEN 16 AND 512),
    previous_secret             text        CHECK (octet_length(previous_secret) BETWEEN 16 AND 512),
    previous_secret_expires_at  timestamptz,
    -- When set, a 2xx only counts when the response body, trimmed, equals it (e.g. 'success').
    required_body               text,
    -- Waits after each failed attempt, in milliseconds; NULL = the notifier's default schedule.
    schedule_ms                 integer[]   CHECK (schedule_ms IS NULL OR (
                                                cardinality(schedule_ms) BETWEEN 1 AND 100
                                                AND 0 <= ALL (schedule_ms))),
    timeout_ms                  integer     NOT NULL DEFAULT 10000 CHECK (timeout_ms BETWEEN 1 AND 300000),
    -- Requests in flight to this endpoint at once, over every notifier: a slow partner holds
    -- at most this many of the notifiers' slots.
    max_in_flight               integer     NOT NULL DEFAULT 4 CHECK (max_in_flight BETWEEN 1 AND 1000),
    enabled                     boolean     NOT NULL DEFAULT true,
    -- The circuit: after `breaker threshold` failures in a row nothing is sent to the endpoint
    -- until `circuit_open_until`; then attempts resume, and the first success closes it.
    consecutive_failures        integer     NOT NULL DEFAULT 0,
    circuit_open_until          timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

-- One row per notification, kept after delivery so receivers can reconcile and operators can
-- see what happened. `status` moves pending → delivered | exhausted; a re-send moves it back to
-- pending with a fresh schedule.
CREATE TABLE notify.notifications (
    id              bigint      PRIMARY KEY,           -- from outbox.next_id(): globally unique
    endpoint_id     text        NOT NULL REFERENCES notify.endpoints (id),
    event_type      text        NOT NULL,
    body            bytea       NOT NULL,
    content_type    text        NOT NULL DEFAULT 'application/json',
    dedupe_key      text,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'delivered', 'exhausted')),
    -- Every attempt ever made (numbering of notify.attempts).
    attempts        integer     NOT NULL DEFAULT 0,
    -- Failed attempts in the current round: the position in the schedule.
    step            integer     NOT NULL DEFAULT 0,
    -- When the next attempt is due. A claim moves it forward by a lease, so a notifier that dies
    -- mid-attempt hands the notification back when the lease runs out.
    next_attempt_at timestamptz,
    claimed_until   timestamptz,
    -- Fences a late finisher whose lease ran out: only the holder of the current token records.
    claim_token     bigint      NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    exhausted_at    timestamptz,
    CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
) WITH (
    -- Each attempt updates its row; vacuum after a fixed number of dead rows so the claim's
    -- partial index stays small while the table grows with history.
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000,
    fillfactor = 80
);

-- The claim: due pending rows per endpoint. Only pending rows are indexed, so delivered history
-- does not slow it down.
CREATE INDEX notifications_due_idx ON notify.notifications (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
-- Requests in flight per endpoint: only claimed rows are indexed (a claim sets `claimed_until`,
-- recording the outcome clears it), so counting them stays cheap behind a large backlog.
CREATE INDEX notifications_claimed_idx ON notify.notifications (endpoint_id, claimed_until)
    WHERE claimed_until IS NOT NULL;
-- Reconciliation lists: by endpoint and creation time.
CREATE INDEX notifications_endpoint_created_idx ON notify.notifications (endpoint_id, created_at, id);
-- A dedupe key names one notification per endpoint.
CREATE UNIQUE INDEX notifications_dedupe_idx ON notify.notifications (endpoint_id, dedupe_key)
    WHERE dedupe_key IS NOT NULL;

-- Every attempt, successful or not.
CREATE TABLE notify.attempts (
    id              bigserial   PRIMARY KEY,
    notification_id bigint      NOT NULL REFERENCES notify.notifications (id) ON DELETE CASCADE,
    attempt_no      integer     NOT NULL,
    attempted_at    timestamptz NOT NULL,
    http_status     integer,
    latency_ms      integer     NOT NULL,
    succeeded       boolean     NOT NULL,
    -- Why it failed: connection error, timeout, status, or body not the required one.
    error           text,
    -- The start of the response body, for diagnosis.
    response_body   text
);
CREATE INDEX attempts_notification_idx ON notify.attempts (notification_id, attempt_no);

-- Limits shared by the SQL and Rust entry points.
CREATE FUNCTION notify.max_body_bytes() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 1024 * 1024 $$;

-- Stores one notification. Returns its id, or when the endpoint already has a notification with
-- this dedupe key, that one's id (nothing new is stored).
CREATE FUNCTION notify.insert_notification(
    p_endpoint text,
    p_event_type text,
    p_body bytea,
    p_content_type text,
    p_dedupe_key text,
    p_deliver_at timestamptz
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored bigint;
BEGIN
    IF p_endpoint IS NULL THEN
        RAISE EXCEPTION 'notify.send: endpoint must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM notify.endpoints WHERE id = p_endpoint) THEN
        RAISE EXCEPTION 'notify.send: endpoint "%" does not exist (create it with notify.upsert_endpoint)', p_endpoint
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF p_event_type IS NULL OR p_event_type !~ '^[A-Za-z0-9._:-]{1,255}$' THEN
        RAISE EXCEPTION 'notify.send: event_type must be 1 to 255 characters of A-Z a-z 0-9 . _ : -, got %',
            coalesce(quote_literal(p_event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_body IS NULL THEN
        RAISE EXCEPTION 'notify.send: body must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(p_body) > notify.max_body_bytes() THEN
        RAISE EXCEPTION 'notify.send: body is % bytes, at most % allowed', octet_length(p_body), notify.max_body_bytes()
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_content_type IS NULL OR p_content_type = '' OR octet_length(p_content_type) > 255
       OR p_content_type ~ '[\r\n]' THEN
        RAISE EXCEPTION 'notify.send: content_type must be 1 to 255 bytes on one line'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_dedupe_key IS NOT NULL AND (p_dedupe_key = '' OR octet_length(p_dedupe_key) > 255) THEN
        RAISE EXCEPTION 'notify.send: dedupe_key must be 1 to 255 bytes (or NULL for none)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_deliver_at IS NOT NULL AND NOT isfinite(p_deliver_at) THEN
        RAISE EXCEPTION 'notify.send: deliver_at must be a finite time' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO notify.notifications (id, endpoint_id, event_type, body, content_type, dedupe_key,
                                      next_attempt_at)
    VALUES (outbox.next_id(), p_endpoint, p_event_type, p_body, p_content_type, p_dedupe_key,
            coalesce(p_deliver_at, now()))
    ON CONFLICT (endpoint_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING id INTO stored;
    IF stored IS NULL THEN
        SELECT id INTO stored FROM notify.notifications
        WHERE endpoint_id = p_endpoint AND dedupe_key = p_dedupe_key;
    END IF;
    RETURN stored;
END
$$;

-- The SQL API: call it inside your own transaction; the notification exists if and only if
-- that transaction commits. JSON body.
CREATE FUNCTION notify.send(
    endpoint text,
    event_type text,
    body jsonb,
    dedupe_key text DEFAULT NULL,
    deliver_at timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT notify.insert_notification(endpoint, event_type, convert_to(body::text, 'UTF8'),
                                      'application/json', dedupe_key, deliver_at)
$$;

-- The same with a raw body and its content type.
CREATE FUNCTION notify.send_bytes(
    endpoint text,
    event_type text,
    body bytea,
    content_type text DEFAULT 'application/octet-stream',
    dedupe_key text DEFAULT NULL,
    deliver_at timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT notify.insert_notification(endpoint, event_type, body, content_type, dedupe_key, deliver_at)
$$;

-- Creates or updates an endpoint. A changed secret is a rotation: the old one stays valid (and
-- is signed with) for `previous_valid_for`.
CREATE FUNCTION notify.upsert_endpoint(
    id text,
    url text,
    secret text,
    required_body text DEFAULT NULL,
    schedule_ms integer[] DEFAULT NULL,
    timeout_ms integer DEFAULT 10000,
    max_in_flight integer DEFAULT 4,
    previous_valid_for interval DEFAULT '24 hours'
) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO notify.endpoints AS e (id, url, secret, required_body, schedule_ms, timeout_ms, max_in_flight)
    VALUES (upsert_endpoint.id, upsert_endpoint.url, upsert_endpoint.secret, upsert_endpoint.required_body,
            upsert_endpoint.schedule_ms, upsert_endpoint.timeout_ms, upsert_endpoint.max_in_flight)
    ON CONFLICT ON CONSTRAINT endpoints_pkey DO UPDATE SET
        url = excluded.url,
        required_body = excluded.required_body,
        schedule_ms = excluded.schedule_ms,
        timeout_ms = excluded.timeout_ms,
        max_in_flight = excluded.max_in_flight,
        previous_secret = CASE WHEN e.secret <> excluded.secret THEN e.secret ELSE e.previous_secret END,
        previous_secret_expires_at = CASE WHEN e.secret <> excluded.secret
                                          THEN now() + upsert_endpoint.previous_valid_for
                                          ELSE e.previous_secret_expires_at END,
        secret = excluded.secret,
        updated_at = now();
END
$$;

-- Claims due notifications for delivery: at most `batch` rows, never more per endpoint than its
-- free `max_in_flight` slots (counted over every notifier), skipping endpoints whose circuit is
-- open. The endpoint row is locked (SKIP LOCKED) while its slots are counted, so two notifiers
-- cannot both fill the same free slot. Each claimed row's due time moves forward by `lease`.
CREATE FUNCTION notify.claim(batch integer, lease interval)
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
        EXIT WHEN taken >= batch;
        SELECT count(*) INTO busy FROM notify.notifications n
        WHERE n.endpoint_id = e.id AND n.claimed_until IS NOT NULL AND n.claimed_until > now()
          AND n.status = 'pending';
        CONTINUE WHEN busy >= e.max_in_flight;
        RETURN QUERY
            UPDATE notify.notifications n
            SET next_attempt_at = now() + lease, claimed_until = now() + lease,
                claim_token = n.claim_token + 1
            WHERE n.id IN (SELECT d.id FROM notify.notifications d
                           WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now()
                           ORDER BY d.next_attempt_at
                           LIMIT least(e.max_in_flight - busy, batch - taken)
                           FOR UPDATE SKIP LOCKED)
            RETURNING n.id, n.endpoint_id, n.claim_token;
        GET DIAGNOSTICS got = ROW_COUNT;
        taken := taken + got;
    END LOOP;
END
$$;
