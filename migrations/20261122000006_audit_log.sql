-- Audit log of ops and override actions: who, what, why, when, and the
-- workflow's state before. Append-only. And `timers.fire_now`: ops fire a
-- timer early without losing the due time it was armed for.
-- Expand-only: a new table and a column with a constant default.
-- Rollback: drop the table and the column (the actions stay in each workflow's history).
set local lock_timeout = '5s';
set local statement_timeout = '30s';

create table audit_log (
    tenant_id      uuid not null,
    id             uuid not null,
    at             timestamptz not null default clock_timestamp(),
    actor_role     text not null,
    actor_subject  text,
    action         text not null,
    workflow_id    uuid,
    target         text,
    reason         text not null check (length(reason) between 1 and 500),
    before_state   text,
    after_state    text,
    detail         jsonb not null default '{}'::jsonb,
    primary key (tenant_id, id)
);
create index audit_log_workflow on audit_log (tenant_id, workflow_id, at);
create index audit_log_actor on audit_log (tenant_id, actor_subject, at);

create trigger audit_log_append_only before update or delete on audit_log
    for each row execute function history_is_append_only();

alter table timers add column fire_now boolean not null default false;
