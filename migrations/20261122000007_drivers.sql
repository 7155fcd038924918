-- Route dispatch to drivers (DOMAIN.md §3): the drivers of a tenant and the
-- single-use Telegram registration tokens (stored hashed: a token is a
-- credential, the table never holds it).
-- Expand-only: two new tables.
-- Rollback: `drop table driver_registrations; drop table drivers;`
set local lock_timeout = '5s';
set local statement_timeout = '30s';

create table drivers (
    tenant_id         uuid not null references tenants (id),
    id                text not null check (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    name              text not null check (length(name) between 1 and 200),
    email             text check (length(email) <= 254),
    telegram_chat_id  bigint,
    -- Channels to dispatch on, in order: 'telegram', 'email'.
    channels          text[] not null default '{telegram,email}',
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    primary key (tenant_id, id)
);

create table driver_registrations (
    tenant_id        uuid not null references tenants (id),
    token_hash       bytea not null,
    registration_id  uuid not null,
    driver_id        text not null,
    created_at       timestamptz not null default now(),
    primary key (tenant_id, token_hash)
);
