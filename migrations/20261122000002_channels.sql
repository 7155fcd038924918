-- Channels and intake: provider settings per tenant, the people registry,
-- shared outbound rate limits, the inbound webhook ledger, and the columns the
-- outbox needs for paced sends and replies to chat-originated signals.
-- Expand-only: new tables and nullable columns (no rewrite, short lock).
-- Rollback: drop the new tables and columns; nothing older reads them.
set local lock_timeout = '5s';
set local statement_timeout = '30s';

-- Provider credentials and endpoints. `secrets` is write-only through the API.
create table provider_settings (
    tenant_id   uuid not null references tenants (id),
    provider    text not null check (provider in ('telegram', 'whatsapp', 'twilio', 'resend', 'sendgrid')),
    settings    jsonb not null default '{}'::jsonb,
    secrets     jsonb not null default '{}'::jsonb,
    updated_at  timestamptz not null default now(),
    primary key (tenant_id, provider)
);

-- Executors and operators with their chat identities.
create table people (
    tenant_id          uuid not null references tenants (id),
    id                 text not null check (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    role               text not null check (role in ('executor', 'operator')),
    display_name       text not null,
    telegram_user_id   bigint,
    telegram_username  text,
    phone              text check (phone ~ '^\+[1-9][0-9]{6,14}$'),
    email              text,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    primary key (tenant_id, id)
);
create unique index people_telegram on people (tenant_id, telegram_user_id) where telegram_user_id is not null;
create unique index people_phone on people (tenant_id, phone) where phone is not null;

-- GCRA state shared by every worker process: the theoretical arrival time per key.
create table rate_limits (
    tenant_id  uuid not null,
    key        text not null,
    tat        timestamptz not null,
    primary key (tenant_id, key)
);

-- Verified inbound webhook events, deduplicated by the provider's own id.
create table inbound_events (
    tenant_id    uuid not null references tenants (id),
    id           uuid not null,
    provider     text not null,
    event_id     text not null,
    payload      jsonb not null,
    status       text not null default 'queued' check (status in ('queued', 'processed')),
    outcome      text,
    received_at  timestamptz not null default clock_timestamp(),
    processed_at timestamptz,
    primary key (tenant_id, id),
    unique (tenant_id, provider, event_id)
);

-- Last inbound per WhatsApp number: the 24-hour customer service window.
create table whatsapp_windows (
    tenant_id      uuid not null,
    phone          text not null,
    last_inbound   timestamptz not null,
    primary key (tenant_id, phone)
);

-- A paced send keeps its reserved slot across deferrals.
alter table effects add column send_after timestamptz;
-- Where a chat-originated signal came from, to answer the sender.
alter table signals add column origin jsonb;
alter table deliveries add column provider_message_id text;
