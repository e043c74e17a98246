-- Messages may expire (the seed guides' TTL cleanup): a periodic task deletes those past
-- expires_at. The partial index holds only expiring messages, so the task reads no others.
ALTER TABLE messages ADD COLUMN expires_at TIMESTAMPTZ;
CREATE INDEX idx_messages_expires ON messages (expires_at) WHERE expires_at IS NOT NULL;
