-- In-flight workflow versioning: each instance records the definition version
-- it was started with (existing rows: version 1), and history records
-- upcasts and ops migrations. Expand-only: a column with a constant default
-- (no rewrite on PostgreSQL 11+); the history check is widened as NOT VALID,
-- then validated without blocking writes.
-- Rollback: drop the column; restore the narrower check (no rows use the new events).
set local lock_timeout = '5s';
set local statement_timeout = '30s';

-- definition versions are small counters: int is ample
-- squawk-ignore prefer-bigint-over-int
alter table workflows add column def_version integer not null default 1;

alter table history drop constraint history_event_check;
alter table history add constraint history_event_check
    check (event in ('started', 'applied', 'rejected', 'effect_dead', 'upcast', 'migrated')) not valid;
-- Validated in the next migration, in its own transaction (no long lock here).
