-- Gateway state: idempotency records and per-resource locks, shared by every gateway instance.
CREATE SCHEMA IF NOT EXISTS gateway;

-- One row per (caller, Idempotency-Key). "in_flight" rows carry a lease: when it runs out the key
-- may be claimed again (the gateway handling it died). settle_by is when a live gateway must have
-- finished (its route timeout); an in-flight row past it has an unknown outcome.
CREATE TABLE gateway.idempotency_records (
    caller      text        NOT NULL,
    key         text        NOT NULL,
    fingerprint bytea       NOT NULL,
    token       uuid        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    lease_until timestamptz,
    settle_by   timestamptz,
    status      smallint,
    headers     jsonb,
    body        bytea,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (caller, key)
);
CREATE INDEX idempotency_records_expires_at ON gateway.idempotency_records (expires_at);

-- A line per lock name: the oldest live entry holds the lock. Waiting entries expire shortly
-- after their wait window (a waiter that died stops blocking the line); a holding entry's
-- expires_at is its lease.
CREATE TABLE gateway.lock_entries (
    id            bigserial   PRIMARY KEY,
    name          text        NOT NULL,
    fencing_token bigint,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX lock_entries_name_id ON gateway.lock_entries (name, id);
CREATE INDEX lock_entries_expires_at ON gateway.lock_entries (expires_at);

-- Fencing tokens: one sequence, so every grant of any lock gets a larger token than all before.
CREATE SEQUENCE gateway.fencing_token_seq;

CREATE FUNCTION gateway.lock_enqueue(p_name text, p_wait_ms bigint) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO gateway.lock_entries (name, expires_at)
    VALUES (p_name, clock_timestamp() + (p_wait_ms + 1000) * interval '1 millisecond')
    RETURNING id
$$;

-- Grants the lock to entry p_id if no older live entry for its name exists; returns the fencing
-- token, or NULL when it must keep waiting.
CREATE FUNCTION gateway.lock_try(p_id bigint, p_lease_ms bigint) RETURNS bigint
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
    SET fencing_token = v_token,
        expires_at = clock_timestamp() + p_lease_ms * interval '1 millisecond'
    WHERE id = p_id;
    RETURN v_token;
END
$$;
