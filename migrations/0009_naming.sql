-- Naming made consistent where that is safe on a deployed database: index names end in `_idx`
-- (the gateway's three did not), and the functions documented only by a comment in an earlier
-- file get one in the catalog too (`\df+`, `obj_description`). Function parameters keep their
-- names (named calls such as `payload => ...` are part of the SQL API) and columns keep their
-- types: renaming either is a breaking change, not a tidy-up.

ALTER INDEX gateway.idempotency_records_expires_at RENAME TO idempotency_records_expires_at_idx;
ALTER INDEX gateway.lock_entries_name_id RENAME TO lock_entries_name_id_idx;
ALTER INDEX gateway.lock_entries_expires_at RENAME TO lock_entries_expires_at_idx;

COMMENT ON FUNCTION outbox.next_id() IS
    'A message id from node 0 (this SQL function): 41 bits of milliseconds since 2024-01-01, '
    '7 bits of database id, 6 bits of node and 9 of sequence; never repeats, even when the '
    'clock steps back (the high water lives in outbox.sql_id_high_water).';
COMMENT ON FUNCTION gateway.lock_enqueue(text, bigint) IS
    'Queues a waiter for lock p_name and returns its entry id; the entry expires p_wait_ms + 1 s '
    'from now unless gateway.lock_try grants it first.';
COMMENT ON FUNCTION notify.send(text, text, jsonb, text, timestamptz, text, text) IS
    'Queues a JSON webhook for endpoint in the caller''s transaction; optional dedupe_key, '
    'deliver_at and W3C trace context. Returns the notification id (the existing one for a '
    'repeated dedupe_key).';
COMMENT ON FUNCTION notify.send_bytes(text, text, bytea, text, text, timestamptz, text, text) IS
    'notify.send with a raw body and its content type.';
