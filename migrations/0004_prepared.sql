-- Prepared ("half") messages: a message stored before the producer knows whether its business
-- change will commit, then committed (moved into outbox.messages with its id kept, so the relay
-- publishes it) or rolled back (removed). When the producer goes quiet, the relay asks it
-- (check-back); a message it cannot settle is parked as 'unresolved', never dropped.
--
-- Three tables, each with one job:
--   outbox.prepared_messages  undecided messages only ('pending' or parked 'unresolved');
--                             a decision deletes the row, so the check-back claim stays on a
--                             small table (delete, don't mark: see outbox.messages)
--   outbox.prepared_outcomes  the decision per id, so a repeated commit/rollback gets the same
--                             answer and a contradicting one is refused
--   outbox.prepared_barrier   lives in the PRODUCER's database: the decision recorded inside its
--                             business transaction, read by its check handler (branch barrier)

CREATE TABLE outbox.prepared_messages (
    id               bigint      PRIMARY KEY DEFAULT outbox.next_id(),
    exchange         text        NOT NULL,
    routing_key      text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}',
    content_type     text,
    ordering_key     text,
    deliver_at       timestamptz,
    -- Where the relay asks for the decision: GET {check_url}?message_id=ID. Without one the
    -- message is parked as unresolved once its checks are used up.
    check_url        text,
    -- 'pending': waiting for a decision, checked back; 'unresolved': checks used up, parked
    -- until the producer or an operator decides.
    state            text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'unresolved')),
    check_attempts   integer     NOT NULL DEFAULT 0,
    -- NULL until the first check is claimed: the first check waits for the relay's configured
    -- `check_after` from created_at. Afterwards the next check (or the lease of a check that is
    -- running on some relay).
    next_check_at    timestamptz,
    last_check_error text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    unresolved_at    timestamptz
) WITH (
    -- Insert once, update per check, delete on decision: the same queue-table tuning as
    -- outbox.messages, so dead rows do not pile up between vacuums under the claim scans.
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 90
);

-- The check-back claim: first checks by age, later checks by their due time.
CREATE INDEX prepared_first_check_idx ON outbox.prepared_messages (created_at)
    WHERE state = 'pending' AND next_check_at IS NULL;
CREATE INDEX prepared_next_check_idx ON outbox.prepared_messages (next_check_at)
    WHERE state = 'pending' AND next_check_at IS NOT NULL;
-- `outbox-relay status` and the unresolved gauge.
CREATE INDEX prepared_unresolved_idx ON outbox.prepared_messages (created_at)
    WHERE state = 'unresolved';

CREATE TABLE outbox.prepared_outcomes (
    id         bigint      PRIMARY KEY,
    decision   text        NOT NULL CHECK (decision IN ('committed', 'rolled_back')),
    -- 'producer' (API or library call), 'checkback' (the producer's check answer), 'operator'
    -- (`outbox-relay prepared resolve`).
    decided_by text        NOT NULL CHECK (decided_by IN ('producer', 'checkback', 'operator')),
    decided_at timestamptz NOT NULL DEFAULT now()
);
-- Outcomes are kept for a retention period (the relay prunes them), then forgotten: a commit
-- arriving after that is answered "unknown id".
CREATE INDEX prepared_outcomes_decided_at_idx ON outbox.prepared_outcomes (decided_at);

-- The producer-side barrier. In a producer whose business data lives elsewhere, this table is
-- created in that database (`outbox::barrier::install`, or this migration set). The business
-- transaction inserts 'committed'; the check handler, finding no row, inserts 'rolled_back'.
-- The primary key makes the two exclusive: whichever commits first wins, the other sees it.
CREATE TABLE outbox.prepared_barrier (
    message_id bigint      PRIMARY KEY,
    decision   text        NOT NULL CHECK (decision IN ('committed', 'rolled_back')),
    decided_at timestamptz NOT NULL DEFAULT now()
);

-- Stores a prepared message and returns its id. Validates with outbox.validate_message, as
-- outbox.insert_message does, so a message accepted here cannot be refused at commit.
CREATE FUNCTION outbox.prepare(
    exchange text,
    routing_key text,
    payload bytea,
    headers jsonb DEFAULT '{}',
    ordering_key text DEFAULT NULL,
    deliver_at timestamptz DEFAULT NULL,
    check_url text DEFAULT NULL,
    content_type text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM outbox.validate_message('outbox.prepare', prepare.exchange, prepare.routing_key,
                                    prepare.payload, prepare.headers, prepare.content_type,
                                    prepare.ordering_key, prepare.deliver_at);
    IF prepare.check_url IS NOT NULL
       AND (prepare.check_url !~* '^https?://[^/?#\s]+[^\s]*$' OR octet_length(prepare.check_url) > 2048) THEN
        RAISE EXCEPTION 'outbox.prepare: check_url must be an absolute http:// or https:// URL of at most 2048 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO outbox.prepared_messages (exchange, routing_key, payload, headers, content_type,
                                          ordering_key, deliver_at, check_url)
    VALUES (prepare.exchange, prepare.routing_key, prepare.payload, coalesce(prepare.headers, '{}'),
            prepare.content_type, prepare.ordering_key, prepare.deliver_at, prepare.check_url)
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- Commits a prepared message: moves it into outbox.messages with its id kept (the relay then
-- publishes it) and records the outcome, in the caller's transaction. Returns the decision now
-- in effect: 'committed', or 'rolled_back' when it was rolled back before (nothing changes), or
-- NULL when the id is unknown (never prepared, or its outcome has been pruned).
--
-- Exactly one decision wins: both commit and rollback start by deleting the prepared row, and
-- only one transaction can delete it. The loser waits on the row lock, then finds it gone and
-- reads the winner's outcome (a VOLATILE function takes a new snapshot per statement).
CREATE FUNCTION outbox.commit_prepared(p_id bigint, p_decided_by text DEFAULT 'producer') RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    m outbox.prepared_messages%ROWTYPE;
    d text;
BEGIN
    DELETE FROM outbox.prepared_messages WHERE id = p_id RETURNING * INTO m;
    IF FOUND THEN
        -- No dedupe key: a prepared message keeps its id, and a dedupe hit would replace it.
        PERFORM outbox.insert_message(m.id, m.exchange, m.routing_key, m.payload, m.headers,
                                      m.content_type, m.ordering_key, m.deliver_at, NULL);
        INSERT INTO outbox.prepared_outcomes (id, decision, decided_by) VALUES (p_id, 'committed', p_decided_by);
        RETURN 'committed';
    END IF;
    SELECT decision INTO d FROM outbox.prepared_outcomes WHERE id = p_id;
    RETURN d;
END
$$;

-- Rolls a prepared message back: removes it and records the outcome. Returns the decision now
-- in effect ('rolled_back', or 'committed' when it was committed before), NULL when unknown.
CREATE FUNCTION outbox.rollback_prepared(p_id bigint, p_decided_by text DEFAULT 'producer') RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    d text;
BEGIN
    DELETE FROM outbox.prepared_messages WHERE id = p_id;
    IF FOUND THEN
        INSERT INTO outbox.prepared_outcomes (id, decision, decided_by) VALUES (p_id, 'rolled_back', p_decided_by);
        RETURN 'rolled_back';
    END IF;
    SELECT decision INTO d FROM outbox.prepared_outcomes WHERE id = p_id;
    RETURN d;
END
$$;

-- Where a prepared message stands: 'pending', 'unresolved', 'committed', 'rolled_back', or NULL
-- when the id is unknown.
CREATE FUNCTION outbox.prepared_status(p_id bigint) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT state FROM outbox.prepared_messages WHERE id = p_id),
                    (SELECT decision FROM outbox.prepared_outcomes WHERE id = p_id))
$$;
