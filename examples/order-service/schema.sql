-- The example's own tables. Three schemas stand for three services that would each have their
-- own database in production: `shop` (the order service), `inventory` (the stock service) and
-- `reporting` (the read model). Applied by `order-service migrate`; idempotent.

CREATE SCHEMA IF NOT EXISTS shop;

CREATE TABLE IF NOT EXISTS shop.orders (
    id                  bigserial PRIMARY KEY,
    -- The client's Idempotency-Key for POST /orders: a retried create finds its first order.
    request_key         text UNIQUE,
    sku                 text NOT NULL,
    quantity            integer NOT NULL CHECK (quantity > 0),
    amount_cents        bigint NOT NULL CHECK (amount_cents > 0),
    -- pending → paying (the payment saga runs) → paid, or → cancelled (refunded: stock ran
    -- out after the charge); pending → cancelled (timeout). The timeout only cancels `pending`,
    -- so a saga in progress can never meet it.
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'paying', 'paid', 'cancelled')),
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    paid_at             timestamptz,
    cancelled_at        timestamptz,
    cancel_reason       text,
    charge_id           text,
    -- The payment saga started by POST /orders/{id}/pay, in the claim's transaction.
    saga_id             bigint,
    -- The provider's refund, when the stock ran out after the charge.
    refund_id           text,
    created_message_id  bigint,
    paid_message_id     bigint,
    -- true when the payment transaction removed the timeout before the relay published it.
    timeout_withdrawn   boolean,
    CHECK (paid_at IS NULL OR cancelled_at IS NULL)
);

CREATE SCHEMA IF NOT EXISTS inventory;

CREATE TABLE IF NOT EXISTS inventory.products (
    sku      text PRIMARY KEY,
    initial  bigint NOT NULL,
    -- The reservation statement never takes more than is there; the CHECK is the last line.
    stock    bigint NOT NULL CHECK (stock >= 0)
);

-- One row per reserved order (the saga's `reserve` step); `released` when the saga undid it.
-- A refused reservation leaves no row: its step failed and the saga keeps the reason.
CREATE TABLE IF NOT EXISTS inventory.reservations (
    order_id          bigint PRIMARY KEY,
    sku               text NOT NULL,
    quantity          integer NOT NULL,
    status            text NOT NULL CHECK (status IN ('reserved', 'rejected', 'released')),
    reason            text,
    order_created_at  timestamptz,
    decided_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_at       timestamptz
);

CREATE SCHEMA IF NOT EXISTS reporting;

-- The query side: per-day totals, built only from the events.
CREATE TABLE IF NOT EXISTS reporting.daily_totals (
    day               date PRIMARY KEY,
    orders_created    bigint NOT NULL DEFAULT 0,
    orders_paid       bigint NOT NULL DEFAULT 0,
    orders_cancelled  bigint NOT NULL DEFAULT 0,
    revenue_cents     bigint NOT NULL DEFAULT 0
);
