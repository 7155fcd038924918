-- no-transaction
-- Replaced by the partial `deliveries_provider_message_id` (previous file).
-- Rollback: `create index concurrently if not exists deliveries_provider_message on deliveries (tenant_id, channel, provider_message_id);`
-- squawk-ignore require-statement-timeout, require-lock-timeout
drop index concurrently if exists deliveries_provider_message;
