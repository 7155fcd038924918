-- Core runtime schema: tenants and keys, workflows with their inbox (signals),
-- append-only history, durable timers, the effect outbox and the log channel's
-- deliveries. Every table leads with tenant_id so the schema distributes by
-- tenant (Citus) without redesign. Lifecycle columns are text with CHECK
-- constraints mirroring the Rust enums (cheap to extend: drop/add the check).
-- Rollback: this is the first migration; drop the tables (no data to keep).
set local lock_timeout = '5s';
set local statement_timeout = '30s';

create table tenants (
    id          uuid primary key,
    name        text not null unique check (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    config      jsonb not null default '{}'::jsonb,
    created_at  timestamptz not null default now()
);

create table api_keys (
    tenant_id   uuid not null references tenants (id),
    id          uuid not null,
    role        text not null check (role in ('ops', 'operator', 'executor', 'integration')),
    subject     text,
    -- sha256 of the 32-byte random key: keys are high-entropy, so a fast hash is
    -- the standard (GitHub/Stripe tokens); the plaintext is shown once.
    key_hash    bytea not null unique,
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz,
    primary key (tenant_id, id)
);

create table workflows (
    tenant_id    uuid not null references tenants (id),
    id           uuid not null,
    kind         text not null,
    key          text not null,
    input_hash   bytea not null,
    state_name   text not null,
    state        jsonb not null,
    status       text not null default 'running' check (status in ('running', 'completed', 'failed')),
    -- bumped by every accepted transition; every update states the version it read
    version      bigint not null default 0,
    -- set when an effect dead-letters; ops clear it
    attention    text,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    primary key (tenant_id, id),
    unique (tenant_id, kind, key)
);
create index workflows_attention on workflows (tenant_id) where attention is not null;

-- Start input (may hold personal data): kept apart from state and history.
create table workflow_inputs (
    tenant_id    uuid not null,
    workflow_id  uuid not null,
    input        jsonb not null,
    primary key (tenant_id, workflow_id),
    foreign key (tenant_id, workflow_id) references workflows (tenant_id, id)
);

-- The inbox. A signal is stored once per (workflow, idempotency key); it is
-- applied by a worker in seq order, one at a time per workflow.
create table signals (
    tenant_id        uuid not null,
    id               uuid not null,
    workflow_id      uuid not null,
    seq              bigint generated always as identity,
    idempotency_key  text not null,
    name             text not null,
    payload          jsonb not null,
    request_hash     bytea not null,
    actor_role       text not null check (actor_role in ('ops', 'operator', 'executor', 'integration', 'system')),
    actor_subject    text,
    status           text not null default 'queued' check (status in ('queued', 'applied', 'rejected')),
    reason           text,
    state_after      text,
    received_at      timestamptz not null default clock_timestamp(),
    applied_at       timestamptz,
    primary key (tenant_id, id),
    unique (tenant_id, workflow_id, idempotency_key),
    foreign key (tenant_id, workflow_id) references workflows (tenant_id, id)
);
create index signals_queued on signals (tenant_id, workflow_id, seq) where status = 'queued';
create index signals_queued_age on signals (received_at) where status = 'queued';

-- Append-only audit trail of everything that happened to a workflow.
create table history (
    tenant_id      uuid not null,
    workflow_id    uuid not null,
    seq            bigint generated always as identity,
    version        bigint not null,
    at             timestamptz not null default clock_timestamp(),
    event          text not null check (event in ('started', 'applied', 'rejected', 'effect_dead')),
    signal_id      uuid,
    signal_name    text,
    actor_role     text,
    actor_subject  text,
    from_state     text,
    to_state       text,
    reason         text,
    commands       jsonb not null default '[]'::jsonb,
    primary key (tenant_id, workflow_id, seq)
);

create function history_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'history is append-only';
end $$;
create trigger history_append_only before update or delete on history
    for each row execute function history_is_append_only();

-- Durable timers with millisecond due times on the server clock. At most one
-- pending timer per (workflow, name): re-arming cancels the previous one.
create table timers (
    tenant_id     uuid not null,
    id            uuid not null,
    workflow_id   uuid not null,
    name          text not null,
    due_at        timestamptz not null,
    signal        text not null,
    status        text not null default 'pending' check (status in ('pending', 'fired', 'cancelled')),
    enqueued_at   timestamptz,
    created_at    timestamptz not null default now(),
    closed_at     timestamptz,
    primary key (tenant_id, id),
    foreign key (tenant_id, workflow_id) references workflows (tenant_id, id)
);
create unique index timers_one_pending on timers (tenant_id, workflow_id, name) where status = 'pending';
create index timers_due on timers (due_at) where status = 'pending';

-- The outbox. One row per effect idempotency key per workflow.
create table effects (
    tenant_id        uuid not null,
    id               uuid not null,
    workflow_id      uuid not null,
    name             text not null,
    idempotency_key  text not null,
    payload          jsonb not null,
    reply            text,
    status           text not null default 'pending' check (status in ('pending', 'running', 'delivered', 'dead')),
    -- attempt counters are bounded by max_attempts (default 8): int is ample
    -- squawk-ignore prefer-bigint-over-int
    attempts         integer not null default 0,
    -- squawk-ignore prefer-bigint-over-int
    max_attempts     integer not null,
    next_attempt_at  timestamptz not null default now(),
    lease_until      timestamptz,
    last_error       text,
    result           jsonb,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    primary key (tenant_id, id),
    unique (tenant_id, workflow_id, idempotency_key),
    foreign key (tenant_id, workflow_id) references workflows (tenant_id, id)
);
create index effects_pending on effects (next_attempt_at) where status = 'pending';
create index effects_running on effects (lease_until) where status = 'running';

-- What the built-in `log` channel delivered: one row per idempotency key.
create table deliveries (
    tenant_id        uuid not null,
    id               uuid not null,
    effect_id        uuid not null,
    channel          text not null,
    idempotency_key  text not null,
    recipient        text not null,
    payload          jsonb not null,
    body             text not null,
    delivered_at     timestamptz not null default clock_timestamp(),
    primary key (tenant_id, id),
    unique (tenant_id, channel, idempotency_key)
);
