-- Sagas on the outbox: ordered steps, each an action and a compensation sent as outbox messages,
-- advanced by the participants' replies. Every transition happens in ONE transaction with the
-- coordinator's inbox row (consumer-lib) and the outbox row of the next command, so a crash at
-- any point resumes exactly where it was: either the reply's transaction committed (state moved,
-- next command will be published) or it did not (the reply is redelivered).
--
-- Tables, each with one job:
--   saga.instances  one row per saga: its state and where it is
--   saga.steps      one row per step: the two messages, the step's own state, attempts, errors
--   saga.barrier    lives in each PARTICIPANT's database: which (saga, step, op) ran there, so a
--                   compensation arriving before its action is "empty" and the late action a
--                   no-op (DTM's branch barrier)
--
-- The transition logic lives in SQL (saga.on_reply) rather than in the Rust coordinator so that
-- it is one statement inside the caller's transaction, callable from any language, and the
-- row lock on the instance serialises a saga's replies whichever coordinator receives them.

CREATE SCHEMA IF NOT EXISTS saga;

CREATE TABLE saga.instances (
    id                bigint      PRIMARY KEY,
    name              text        NOT NULL,
    -- running: actions go forward; compensating: completed steps are undone in reverse;
    -- completed / compensated: final; stuck: a compensation cannot succeed, waits for an operator
    -- (`saga retry`), never dropped.
    state             text        NOT NULL DEFAULT 'running'
                      CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'stuck')),
    current_step      integer     NOT NULL DEFAULT 0,
    payload           jsonb       NOT NULL DEFAULT '{}',
    -- Where participants send their replies (the coordinator's queue by default).
    reply_exchange    text        NOT NULL,
    reply_routing_key text        NOT NULL,
    -- Compensations are retried with exponential backoff up to this many attempts, then stuck.
    compensation_max_attempts integer NOT NULL CHECK (compensation_max_attempts >= 1),
    compensation_backoff_ms   integer NOT NULL CHECK (compensation_backoff_ms >= 0),
    -- Why the saga compensated (the failed step's error or a timeout), and why it is stuck.
    failure_reason    text,
    stuck_reason      text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_state_idx ON saga.instances (state, updated_at);

CREATE TABLE saga.steps (
    saga_id        bigint  NOT NULL REFERENCES saga.instances (id) ON DELETE CASCADE,
    idx            integer NOT NULL,
    name           text    NOT NULL,
    -- {"exchange": text, "routing_key": text, "payload": json}
    action         jsonb   NOT NULL,
    -- Same shape, or NULL for a step with nothing to undo.
    compensation   jsonb,
    timeout_ms     integer CHECK (timeout_ms > 0),
    -- pending: not sent yet; sent: action sent, waiting for its reply; done: action applied;
    -- failed: action refused (its effects rolled back at the participant, nothing to undo);
    -- timed_out: no reply in time (may or may not have applied: compensated under the barrier);
    -- compensating: compensation sent; compensated: undone (or nothing to undo);
    -- stuck: compensation cannot succeed.
    state          text    NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'sent', 'done', 'failed', 'timed_out',
                                    'compensating', 'compensated', 'stuck')),
    -- Attempts of the compensation so far; a reply names the attempt it answers, so a late reply
    -- to an earlier attempt is ignored.
    compensation_attempts integer NOT NULL DEFAULT 0,
    -- How many times the compensation was actually applied at the participant (0 or 1): the
    -- "nothing is compensated twice" invariant is checkable in SQL.
    compensations_applied integer NOT NULL DEFAULT 0,
    last_error     text,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, idx)
);

CREATE TABLE saga.barrier (
    saga_id    bigint  NOT NULL,
    step       integer NOT NULL,
    op         text    NOT NULL CHECK (op IN ('action', 'compensation')),
    -- For op = 'action': 'action' when the action ran, 'compensation' when a compensation came
    -- first and blocked it (the late action is then a no-op).
    origin     text    NOT NULL CHECK (origin IN ('action', 'compensation')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, op)
);

-- Checks one message definition of a step; `field` names it in the error, e.g.
-- 'saga.start: steps[1].compensation'.
CREATE FUNCTION saga.validate_message(field text, m jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(m) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION '%: must be an object {exchange, routing_key, payload}', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(m -> 'exchange') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION '%.exchange: must be a string ('''' for the default exchange)', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(m -> 'routing_key') IS DISTINCT FROM 'string' OR m ->> 'routing_key' = '' THEN
        RAISE EXCEPTION '%.routing_key: must be a non-empty string', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(m ->> 'exchange') > 255 OR octet_length(m ->> 'routing_key') > 255 THEN
        RAISE EXCEPTION '%: exchange and routing_key are at most 255 bytes', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT m ? 'payload' THEN
        RAISE EXCEPTION '%.payload: missing (any JSON value)', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Enqueues one command (action or compensation) of a step through outbox.enqueue, in the
-- caller's transaction. The saga headers tell the participant what it is and where to reply.
CREATE FUNCTION saga.send(p_saga saga.instances, p_step saga.steps, p_op text, p_attempt integer,
                          p_delay_ms integer DEFAULT 0) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    m jsonb := CASE p_op WHEN 'action' THEN p_step.action ELSE p_step.compensation END;
BEGIN
    RETURN outbox.enqueue(
        exchange => m ->> 'exchange',
        routing_key => m ->> 'routing_key',
        payload => convert_to((m -> 'payload')::text, 'UTF8'),
        headers => jsonb_build_object(
            'x-saga-id', p_saga.id::text,
            'x-saga-name', p_saga.name,
            'x-saga-step', p_step.idx,
            'x-saga-step-name', p_step.name,
            'x-saga-op', p_op,
            'x-saga-attempt', p_attempt,
            'x-saga-reply-exchange', p_saga.reply_exchange,
            'x-saga-reply-routing-key', p_saga.reply_routing_key),
        deliver_at => CASE WHEN p_delay_ms > 0
                           THEN now() + p_delay_ms * interval '1 millisecond' END);
END
$$;

-- Sends step `p_step`'s action, and its timeout (a delayed message to the coordinator itself,
-- cancelled by dedupe key when the reply arrives).
CREATE FUNCTION saga.send_action(p_saga saga.instances, p_idx integer) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s saga.steps;
BEGIN
    UPDATE saga.steps SET state = 'sent', updated_at = now()
     WHERE saga_id = p_saga.id AND idx = p_idx RETURNING * INTO s;
    UPDATE saga.instances SET current_step = p_idx, updated_at = now() WHERE id = p_saga.id;
    PERFORM saga.send(p_saga, s, 'action', 1);
    IF s.timeout_ms IS NOT NULL THEN
        PERFORM outbox.enqueue(
            exchange => p_saga.reply_exchange,
            routing_key => p_saga.reply_routing_key,
            payload => convert_to(jsonb_build_object('saga_id', p_saga.id::text, 'step', p_idx,
                                                     'op', 'action', 'attempt', 1,
                                                     'outcome', 'timeout')::text, 'UTF8'),
            deliver_at => now() + s.timeout_ms * interval '1 millisecond',
            dedupe_key => saga.timeout_key(p_saga.id, p_idx));
    END IF;
END
$$;

-- The dedupe key of a step's timeout message.
CREATE FUNCTION saga.timeout_key(p_saga bigint, p_idx integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'saga-timeout:' || p_saga || ':' || p_idx $$;

-- Starts (or continues) compensation: the highest step at or below `p_from` that may have
-- applied (done, timed out) gets its compensation sent; steps without a compensation are marked
-- compensated on the way. No such step left: the saga is compensated. Returns the new state.
CREATE FUNCTION saga.compensate_from(p_saga_id bigint, p_from integer) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    inst saga.instances;
    s    saga.steps;
BEGIN
    LOOP
        SELECT * INTO s FROM saga.steps
         WHERE saga_id = p_saga_id AND idx <= p_from AND state IN ('done', 'timed_out')
         ORDER BY idx DESC LIMIT 1;
        IF NOT FOUND THEN
            UPDATE saga.instances SET state = 'compensated', updated_at = now()
             WHERE id = p_saga_id;
            RETURN 'compensated';
        END IF;
        IF s.compensation IS NULL THEN
            UPDATE saga.steps SET state = 'compensated', updated_at = now()
             WHERE saga_id = p_saga_id AND idx = s.idx;
            CONTINUE;
        END IF;
        UPDATE saga.steps SET state = 'compensating', compensation_attempts = 1, updated_at = now()
         WHERE saga_id = p_saga_id AND idx = s.idx RETURNING * INTO s;
        UPDATE saga.instances SET state = 'compensating', current_step = s.idx, updated_at = now()
         WHERE id = p_saga_id RETURNING * INTO inst;
        PERFORM saga.send(inst, s, 'compensation', 1);
        RETURN 'compensating';
    END LOOP;
END
$$;

-- The public SQL API. Starts a saga inside the caller's transaction (so the business row and the
-- saga commit together) and enqueues its first action. Returns the saga id (globally unique, an
-- outbox message id). `steps`: a JSON array, in order, of
--   {"name": text, "action": {"exchange", "routing_key", "payload"},
--    "compensation": {...} or null/absent, "timeout_ms": positive integer or absent}.
-- Bad input raises an error naming the field and stores nothing.
CREATE FUNCTION saga.start(
    name text,
    steps jsonb,
    payload jsonb DEFAULT '{}',
    reply_exchange text DEFAULT '',
    reply_routing_key text DEFAULT 'saga.replies',
    compensation_max_attempts integer DEFAULT 10,
    compensation_backoff_ms integer DEFAULT 1000
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    new_id bigint;
    n      integer;
    i      integer;
    st     jsonb;
    inst   saga.instances;
BEGIN
    IF start.name IS NULL OR start.name = '' OR octet_length(start.name) > 255 THEN
        RAISE EXCEPTION 'saga.start: name must be 1 to 255 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(start.steps) IS DISTINCT FROM 'array' OR jsonb_array_length(start.steps) = 0 THEN
        RAISE EXCEPTION 'saga.start: steps must be a non-empty JSON array' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start.payload IS NULL THEN
        RAISE EXCEPTION 'saga.start: payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF start.reply_exchange IS NULL OR octet_length(start.reply_exchange) > 255 THEN
        RAISE EXCEPTION 'saga.start: reply_exchange must be a string of at most 255 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start.reply_routing_key IS NULL OR start.reply_routing_key = '' OR octet_length(start.reply_routing_key) > 255 THEN
        RAISE EXCEPTION 'saga.start: reply_routing_key must be 1 to 255 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start.compensation_max_attempts IS NULL OR start.compensation_max_attempts < 1 THEN
        RAISE EXCEPTION 'saga.start: compensation_max_attempts must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start.compensation_backoff_ms IS NULL OR start.compensation_backoff_ms < 0 THEN
        RAISE EXCEPTION 'saga.start: compensation_backoff_ms must be 0 or more' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    n := jsonb_array_length(start.steps);
    FOR i IN 0 .. n - 1 LOOP
        st := start.steps -> i;
        IF jsonb_typeof(st) IS DISTINCT FROM 'object' THEN
            RAISE EXCEPTION 'saga.start: steps[%] must be an object', i USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(st -> 'name') IS DISTINCT FROM 'string' OR st ->> 'name' = '' THEN
            RAISE EXCEPTION 'saga.start: steps[%].name must be a non-empty string', i USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM saga.validate_message(format('saga.start: steps[%s].action', i), st -> 'action');
        IF st -> 'compensation' IS NOT NULL AND jsonb_typeof(st -> 'compensation') <> 'null' THEN
            PERFORM saga.validate_message(format('saga.start: steps[%s].compensation', i), st -> 'compensation');
        END IF;
        IF st -> 'timeout_ms' IS NOT NULL AND jsonb_typeof(st -> 'timeout_ms') <> 'null'
           AND (jsonb_typeof(st -> 'timeout_ms') <> 'number' OR (st ->> 'timeout_ms')::numeric <= 0
                OR (st ->> 'timeout_ms')::numeric <> floor((st ->> 'timeout_ms')::numeric)
                OR (st ->> 'timeout_ms')::numeric > 2147483647) THEN
            RAISE EXCEPTION 'saga.start: steps[%].timeout_ms must be a positive integer of milliseconds', i
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    new_id := outbox.next_id();
    INSERT INTO saga.instances (id, name, payload, reply_exchange, reply_routing_key,
                                compensation_max_attempts, compensation_backoff_ms)
    VALUES (new_id, start.name, start.payload, start.reply_exchange, start.reply_routing_key,
            start.compensation_max_attempts, start.compensation_backoff_ms)
    RETURNING * INTO inst;
    INSERT INTO saga.steps (saga_id, idx, name, action, compensation, timeout_ms)
    SELECT new_id, (e.ord - 1)::integer, e.s ->> 'name', e.s -> 'action',
           CASE WHEN jsonb_typeof(e.s -> 'compensation') = 'object' THEN e.s -> 'compensation' END,
           CASE WHEN jsonb_typeof(e.s -> 'timeout_ms') = 'number' THEN (e.s ->> 'timeout_ms')::integer END
      FROM jsonb_array_elements(start.steps) WITH ORDINALITY AS e(s, ord);
    PERFORM saga.send_action(inst, 0);
    RETURN new_id;
END
$$;

-- Applies one reply (or a step's own timeout) to its saga, in the caller's transaction (the
-- coordinator's inbox transaction). Locks the saga row, so a saga's replies are applied one at a
-- time whichever coordinator instance receives them. Returns what happened: the saga's new state,
-- or 'ignored' for a reply that no longer matters (a late reply to an earlier attempt, a timeout
-- after the reply, an action reply after compensation began, an unknown saga).
--   p_op:      'action' | 'compensation'
--   p_outcome: 'ok' | 'failed' (permanent) | 'retry' (transient, compensations only) |
--              'timeout' (from the coordinator's own delayed message) | 'skipped'
CREATE FUNCTION saga.on_reply(p_saga_id bigint, p_step integer, p_op text, p_attempt integer,
                              p_outcome text, p_error text DEFAULT NULL,
                              p_applied boolean DEFAULT true) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    inst saga.instances;
    s    saga.steps;
    n    integer;
    delay_ms bigint;
BEGIN
    IF p_op IS NULL OR p_op NOT IN ('action', 'compensation') THEN
        RAISE EXCEPTION 'saga.on_reply: op must be action or compensation' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_outcome IS NULL OR p_outcome NOT IN ('ok', 'failed', 'retry', 'timeout', 'skipped') THEN
        RAISE EXCEPTION 'saga.on_reply: outcome must be ok, failed, retry, timeout or skipped'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO inst FROM saga.instances WHERE id = p_saga_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'ignored';
    END IF;
    SELECT * INTO s FROM saga.steps WHERE saga_id = p_saga_id AND idx = p_step;
    IF NOT FOUND THEN
        RETURN 'ignored';
    END IF;

    IF p_op = 'action' THEN
        IF inst.state <> 'running' OR s.state <> 'sent' OR p_outcome = 'skipped' THEN
            RETURN 'ignored';
        END IF;
        IF p_outcome <> 'timeout' THEN
            PERFORM outbox.cancel(saga.timeout_key(p_saga_id, p_step));
        END IF;
        IF p_outcome = 'ok' THEN
            UPDATE saga.steps SET state = 'done', updated_at = now()
             WHERE saga_id = p_saga_id AND idx = p_step;
            SELECT count(*) INTO n FROM saga.steps WHERE saga_id = p_saga_id;
            IF p_step + 1 >= n THEN
                UPDATE saga.instances SET state = 'completed', updated_at = now() WHERE id = p_saga_id;
                RETURN 'completed';
            END IF;
            PERFORM saga.send_action(inst, p_step + 1);
            RETURN 'running';
        END IF;
        -- failed, retry (an action has no coordinator retries: the participant retries it
        -- through consumer-lib, and a step timeout bounds how long) or timeout.
        UPDATE saga.steps
           SET state = CASE WHEN p_outcome = 'timeout' THEN 'timed_out' ELSE 'failed' END,
               last_error = coalesce(p_error, CASE WHEN p_outcome = 'timeout'
                                                   THEN format('no reply within %s ms', s.timeout_ms)
                                                   ELSE 'failed' END),
               updated_at = now()
         WHERE saga_id = p_saga_id AND idx = p_step RETURNING * INTO s;
        UPDATE saga.instances
           SET failure_reason = format('step %s (%s): %s', s.idx, s.name, s.last_error)
         WHERE id = p_saga_id;
        -- A timed-out step may have applied after all, so it is compensated too (under the
        -- participant's barrier an early compensation is empty and the late action a no-op).
        RETURN saga.compensate_from(p_saga_id, p_step);
    END IF;

    -- A compensation reply.
    IF inst.state <> 'compensating' OR s.state <> 'compensating'
       OR p_attempt IS DISTINCT FROM s.compensation_attempts THEN
        RETURN 'ignored';
    END IF;
    IF p_outcome IN ('ok', 'skipped') THEN
        UPDATE saga.steps
           SET state = 'compensated', last_error = NULL,
               compensations_applied = compensations_applied + CASE WHEN p_applied THEN 1 ELSE 0 END,
               updated_at = now()
         WHERE saga_id = p_saga_id AND idx = p_step;
        RETURN saga.compensate_from(p_saga_id, p_step - 1);
    END IF;
    IF p_outcome = 'retry' AND s.compensation_attempts < inst.compensation_max_attempts THEN
        -- Exponential backoff, capped at 5 minutes; the retry is a new message (new id), so
        -- the participant's inbox runs it again.
        delay_ms := least(inst.compensation_backoff_ms::bigint * (2 ^ least(s.compensation_attempts - 1, 20))::bigint,
                          300000);
        UPDATE saga.steps SET compensation_attempts = compensation_attempts + 1,
                              last_error = p_error, updated_at = now()
         WHERE saga_id = p_saga_id AND idx = p_step RETURNING * INTO s;
        PERFORM saga.send(inst, s, 'compensation', s.compensation_attempts, delay_ms::integer);
        RETURN 'compensating';
    END IF;
    -- A permanent failure, or out of attempts: parked, never dropped.
    UPDATE saga.steps SET state = 'stuck', last_error = p_error, updated_at = now()
     WHERE saga_id = p_saga_id AND idx = p_step;
    UPDATE saga.instances
       SET state = 'stuck', updated_at = now(),
           stuck_reason = format('compensation of step %s (%s) %s after %s attempt(s): %s', s.idx, s.name,
                                 CASE WHEN p_outcome = 'failed' THEN 'failed permanently' ELSE 'kept failing' END,
                                 s.compensation_attempts, coalesce(p_error, 'no reason given'))
     WHERE id = p_saga_id;
    RETURN 'stuck';
END
$$;

-- Operator action: sends a stuck saga's compensation again (attempts start over) and resumes
-- compensating. True when the saga was stuck; false otherwise (nothing changes).
CREATE FUNCTION saga.retry(saga_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    inst saga.instances;
    s    saga.steps;
BEGIN
    IF retry.saga_id IS NULL THEN
        RAISE EXCEPTION 'saga.retry: saga_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO inst FROM saga.instances i WHERE i.id = retry.saga_id FOR UPDATE;
    IF NOT FOUND OR inst.state <> 'stuck' THEN
        RETURN false;
    END IF;
    UPDATE saga.steps st SET state = 'compensating', compensation_attempts = 1, updated_at = now()
     WHERE st.saga_id = retry.saga_id AND st.state = 'stuck' RETURNING * INTO s;
    UPDATE saga.instances i SET state = 'compensating', stuck_reason = NULL, updated_at = now()
     WHERE i.id = retry.saga_id RETURNING * INTO inst;
    PERFORM saga.send(inst, s, 'compensation', 1);
    RETURN true;
END
$$;

-- The participant's barrier for an action, called in the participant's transaction before its
-- effects. 'run': apply the action; 'duplicate': it ran before (skip, it was answered then);
-- 'blocked': its compensation arrived first, so the action must never apply (a hanging action:
-- skip it). Two concurrent calls meet on the primary key: the second waits for the first commit.
CREATE FUNCTION saga.barrier_action(saga_id bigint, step integer) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    found_origin text;
BEGIN
    IF barrier_action.saga_id IS NULL OR barrier_action.step IS NULL THEN
        RAISE EXCEPTION 'saga.barrier_action: saga_id and step must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO saga.barrier (saga_id, step, op, origin)
    VALUES (barrier_action.saga_id, barrier_action.step, 'action', 'action')
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN 'run';
    END IF;
    SELECT b.origin INTO found_origin FROM saga.barrier b
     WHERE b.saga_id = barrier_action.saga_id AND b.step = barrier_action.step AND b.op = 'action';
    RETURN CASE WHEN found_origin = 'compensation' THEN 'blocked' ELSE 'duplicate' END;
END
$$;

-- The participant's barrier for a compensation. 'run': undo the action's effects; 'empty': the
-- action never applied here (nothing to undo) and is now blocked for good; 'duplicate': this
-- compensation already applied. Roll back with the compensation's own work when it fails, so a
-- retry sees the same answer.
CREATE FUNCTION saga.barrier_compensation(saga_id bigint, step integer) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF barrier_compensation.saga_id IS NULL OR barrier_compensation.step IS NULL THEN
        RAISE EXCEPTION 'saga.barrier_compensation: saga_id and step must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO saga.barrier (saga_id, step, op, origin)
    VALUES (barrier_compensation.saga_id, barrier_compensation.step, 'compensation', 'compensation')
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'duplicate';
    END IF;
    INSERT INTO saga.barrier (saga_id, step, op, origin)
    VALUES (barrier_compensation.saga_id, barrier_compensation.step, 'action', 'compensation')
    ON CONFLICT DO NOTHING;
    RETURN CASE WHEN FOUND THEN 'empty' ELSE 'run' END;
END
$$;

-- A participant's answer to a saga command, enqueued in the participant's transaction (with its
-- effects and its inbox row) to the reply address the command carried.
CREATE FUNCTION saga.reply(reply_exchange text, reply_routing_key text, saga_id bigint, step integer,
                           op text, attempt integer, outcome text, error text DEFAULT NULL,
                           applied boolean DEFAULT true) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF reply.op IS NULL OR reply.op NOT IN ('action', 'compensation') THEN
        RAISE EXCEPTION 'saga.reply: op must be action or compensation' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reply.outcome IS NULL OR reply.outcome NOT IN ('ok', 'failed', 'retry', 'skipped') THEN
        RAISE EXCEPTION 'saga.reply: outcome must be ok, failed, retry or skipped' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN outbox.enqueue(
        exchange => reply.reply_exchange,
        routing_key => reply.reply_routing_key,
        payload => convert_to(jsonb_build_object(
            'saga_id', reply.saga_id::text, 'step', reply.step, 'op', reply.op,
            'attempt', reply.attempt, 'outcome', reply.outcome, 'error', reply.error,
            'applied', reply.applied)::text, 'UTF8'));
END
$$;
