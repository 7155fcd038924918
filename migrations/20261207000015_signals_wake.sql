-- `signals.wake`: a caller waits for this signal's outcome (`?wait_ms=`).
-- Only such signals are announced on `dispatch_signal_done` when applied:
-- a NOTIFY takes a cluster-wide lock at commit and wakes every listening
-- process, so the pumps' commits carry none for signals nobody waits on.
-- Expand-only: a column with a constant default (no rewrite).
-- Rollback: drop the column (waiters then fall back to their 2 s re-check).
set local lock_timeout = '5s';
set local statement_timeout = '30s';

alter table signals add column wake boolean not null default false;
