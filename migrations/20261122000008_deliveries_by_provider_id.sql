-- no-transaction
-- Provider delivery events (Resend, SendGrid webhooks) name the provider's
-- message id; they are matched to our delivery by it. `deliveries` holds rows,
-- so the index is built concurrently (see 20261122000003 for why this file
-- holds one statement and sets no timeout).
-- Rollback: `drop index concurrently if exists deliveries_provider_message;`
-- squawk-ignore require-statement-timeout, require-lock-timeout
create index concurrently if not exists deliveries_provider_message on deliveries (tenant_id, channel, provider_message_id);
