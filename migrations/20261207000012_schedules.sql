-- Recurring schedules: cron expressions whose ticks become signals to a
-- workflow (a tenant's digest hour, archival) or run a system task (purge).
-- Each tick is claimed once across processes (the row is locked and its
-- `next_at` moved in the transaction that fires it); after downtime the
-- missed ticks are caught up or skipped by `policy`.
-- Expand-only: a new table.
-- Rollback: `drop table schedules;`
set local lock_timeout = '5s';
set local statement_timeout = '30s';

create table schedules (
    id           uuid primary key,
    -- Null for the runtime's own schedules (purge).
    tenant_id    uuid references tenants (id),
    name         text not null check (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    -- Six fields (seconds first) or the classic five.
    cron         text not null check (length(cron) <= 200),
    timezone     text not null default 'UTC',
    policy       text not null check (policy in ('catch_up', 'skip')),
    action       text not null check (action in ('signal', 'purge')),
    kind         text,
    key          text,
    signal       text,
    next_at      timestamptz not null,
    last_tick_at timestamptz,
    ticks        bigint not null default 0,
    skipped      bigint not null default 0,
    last_error   text,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    check ((action = 'signal') = (tenant_id is not null and kind is not null and key is not null and signal is not null))
);
create unique index schedules_name on schedules (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name);
create index schedules_due on schedules (next_at);
