-- Pruning finished outbound work (`prune_outbound`) scans by age, and checks
-- each old message for pending deliveries.
CREATE INDEX outbox_by_age ON outbox (created_at);
CREATE INDEX webhook_deliveries_by_message ON webhook_deliveries (message_id, status);
CREATE INDEX emails_by_age ON emails (created_at);
CREATE INDEX growth_requests_by_age ON growth_requests (created_at);
