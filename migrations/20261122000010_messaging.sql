-- Masked-number messaging (DOMAIN.md §2): numbers and their classes, sitters,
-- clients, bookings with their assignment windows, threads, messages, the
-- owner's inbox and the log of poaching attempts. Message bodies are personal
-- data: they live here and in `deliveries`, never in workflow state or logs.
-- Expand-only: new tables.
-- Rollback: `drop table msg_poaching, msg_inbox, msg_messages, msg_threads,
-- msg_bookings, msg_clients, msg_sitters, msg_numbers;`
set local lock_timeout = '5s';
set local statement_timeout = '30s';

create table msg_numbers (
    tenant_id       uuid not null references tenants (id),
    id              uuid not null,
    e164            text not null check (e164 ~ '^\+[1-9][0-9]{6,14}$'),
    class           text not null check (class in ('front_desk', 'sitter', 'pool')),
    -- available: in inventory (sitter class) or free (pool); assigned: a
    -- sitter's; leased: a pool number's client; cooldown: released (pool, 30
    -- days) or deactivated (a former sitter's, 90 days).
    status          text not null default 'available'
                    check (status in ('available', 'assigned', 'leased', 'cooldown')),
    sitter_id       text,
    client_id       text,
    lease_until     timestamptz,
    cooldown_until  timestamptz,
    -- A former sitter number: never a sitter's number again.
    retired_sitter  boolean not null default false,
    provider_sid    text,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    primary key (tenant_id, id),
    unique (tenant_id, e164)
);
create unique index msg_numbers_one_front_desk on msg_numbers (tenant_id) where class = 'front_desk';
create unique index msg_numbers_one_per_sitter on msg_numbers (tenant_id, sitter_id) where status = 'assigned';

create table msg_sitters (
    tenant_id   uuid not null references tenants (id),
    id          text not null check (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    name        text not null check (length(name) between 1 and 200),
    phone       text not null check (phone ~ '^\+[1-9][0-9]{6,14}$'),
    status      text not null default 'active' check (status in ('active', 'offboarded')),
    number_id   uuid,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, id)
);
create unique index msg_sitters_phone on msg_sitters (tenant_id, phone) where status = 'active';

create table msg_clients (
    tenant_id           uuid not null references tenants (id),
    id                  text not null check (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    name                text not null check (length(name) between 1 and 200),
    phone               text not null check (phone ~ '^\+[1-9][0-9]{6,14}$'),
    -- Stored; "recurring" is derived (a booking with a recurrence, or a weekly plan).
    is_one_time_client  boolean not null default true,
    weekly_plan         boolean not null default false,
    created_at          timestamptz not null default now(),
    primary key (tenant_id, id),
    unique (tenant_id, phone)
);

create table msg_bookings (
    tenant_id     uuid not null references tenants (id),
    id            uuid not null,
    client_id     text not null,
    -- NULL: the owner handles it (its sitter was offboarded to the owner).
    sitter_id     text,
    service_type  text not null check (service_type in ('walk', 'drop_in', 'house_sitting')),
    starts_at     timestamptz not null,
    ends_at       timestamptz not null,
    -- The assignment window (start - buffer, end + buffer).
    opens_at      timestamptz not null,
    closes_at     timestamptz not null,
    recurrence    text check (recurrence in ('weekly', 'biweekly', 'monthly')),
    -- The number the client talks on for this booking (the sitter's, or a pool number).
    number_id     uuid not null,
    cancelled     boolean not null default false,
    created_at    timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, client_id) references msg_clients (tenant_id, id),
    foreign key (tenant_id, sitter_id) references msg_sitters (tenant_id, id),
    check (closes_at > opens_at)
);
create index msg_bookings_client_window on msg_bookings (tenant_id, client_id, closes_at) where not cancelled;
create index msg_bookings_sitter_window on msg_bookings (tenant_id, sitter_id, closes_at) where not cancelled;

create table msg_threads (
    tenant_id   uuid not null references tenants (id),
    id          uuid not null,
    client_id   text not null,
    -- NULL: the owner's (front desk, or reassigned to the owner).
    sitter_id   text,
    number_id   uuid not null,
    scope       text not null check (scope in ('service', 'meet_and_greet', 'front_desk')),
    status      text not null default 'active' check (status in ('active', 'closed')),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (tenant_id, id),
    foreign key (tenant_id, client_id) references msg_clients (tenant_id, id)
);
create index msg_threads_number on msg_threads (tenant_id, number_id, client_id) where status = 'active';
create index msg_threads_sitter on msg_threads (tenant_id, sitter_id) where status = 'active';

create table msg_messages (
    tenant_id     uuid not null references tenants (id),
    id            uuid not null,
    -- What caused it (the provider's event id, an API idempotency key, the
    -- message it answers): the same source is stored once.
    source        text not null,
    thread_id     uuid,
    direction     text not null check (direction in ('in', 'out')),
    sender_role   text not null check (sender_role in ('client', 'sitter', 'owner', 'system', 'unknown')),
    sitter_id     text,
    from_number   text not null,
    to_number     text not null,
    body          text not null check (length(body) <= 10000),
    kind          text not null default 'service' check (kind in ('service', 'billing', 'notice')),
    -- in: relayed | routed_to_owner | blocked | refused | forced
    -- out: queued (a send workflow delivers it)
    status        text not null,
    reason        text,
    -- Where it goes (or would have gone, for a blocked or held message).
    deliver_from  text,
    deliver_to    text,
    created_at    timestamptz not null default clock_timestamp(),
    primary key (tenant_id, id),
    unique (tenant_id, source)
);
create index msg_messages_thread on msg_messages (tenant_id, thread_id, created_at);

create table msg_inbox (
    tenant_id    uuid not null references tenants (id),
    id           uuid not null,
    source       text not null,
    message_id   uuid,
    thread_id    uuid,
    reason       text not null,
    severity     text not null default 'normal' check (severity in ('normal', 'high')),
    detail       jsonb not null default '{}'::jsonb,
    created_at   timestamptz not null default clock_timestamp(),
    resolved_at  timestamptz,
    primary key (tenant_id, id),
    unique (tenant_id, source)
);
create index msg_inbox_open on msg_inbox (tenant_id, created_at) where resolved_at is null;

create table msg_poaching (
    tenant_id    uuid not null references tenants (id),
    id           uuid not null,
    message_id   uuid not null,
    thread_id    uuid,
    sender_role  text not null,
    sitter_id    text,
    findings     jsonb not null,
    at           timestamptz not null default clock_timestamp(),
    primary key (tenant_id, id),
    unique (tenant_id, message_id)
);
