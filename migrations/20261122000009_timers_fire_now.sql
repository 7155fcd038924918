-- no-transaction
-- Timers ops fire early are found by their own small partial index, so the
-- timer loop never walks every pending timer to find them (see
-- `store::timers::claim_due`). Built concurrently: `timers` holds rows (see
-- 20261122000003 for why this file holds one statement and sets no timeout).
-- Rollback: `drop index concurrently if exists timers_fire_now;`
-- squawk-ignore require-statement-timeout, require-lock-timeout
create index concurrently if not exists timers_fire_now on timers (due_at) where status = 'pending' and fire_now;
