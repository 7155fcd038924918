-- Idempotency of the messaging API's sends (POST /v1/messaging/threads/{id}/messages):
-- the first request under a caller's Idempotency-Key, by a hash of what it
-- asked (thread, text, kind), and the answer it got. A replay returns that
-- answer; the same key with another request is refused (422).
-- Expand-only: a new table.
-- Rollback: `drop table msg_api_requests;`
set local lock_timeout = '5s';
set local statement_timeout = '30s';

create table msg_api_requests (
    tenant_id     uuid not null references tenants (id),
    -- `api:<caller>:<Idempotency-Key>`, the message's own source.
    source        text not null,
    request_hash  bytea not null,
    answer        jsonb,
    created_at    timestamptz not null default now(),
    primary key (tenant_id, source)
);
