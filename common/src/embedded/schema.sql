-- The single-node database. Version 3. Every table is keyed by upload or by job; the state
-- machine's rules live in state.rs, one transaction per operation.

CREATE TABLE IF NOT EXISTS uploads (
  id TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  total_size INTEGER NOT NULL,
  chunk_size INTEGER NOT NULL,
  total_chunks INTEGER NOT NULL,
  filename TEXT NOT NULL DEFAULT '',
  file_md5 TEXT NOT NULL DEFAULT '',
  metadata TEXT NOT NULL DEFAULT '',
  callback_url TEXT NOT NULL DEFAULT '',
  callback_secret TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  bytes_received INTEGER NOT NULL DEFAULT 0,
  chunks_received INTEGER NOT NULL DEFAULT 0,
  merging_at INTEGER,
  requeued_at INTEGER,
  requeues INTEGER NOT NULL DEFAULT 0,
  fence INTEGER NOT NULL DEFAULT 0,
  merge_bytes_done INTEGER,
  size INTEGER,
  md5 TEXT,
  location TEXT,
  completed_at INTEGER,
  completed_event_id TEXT,
  -- Whole-file digests beyond MD5 (version 3; mod.rs upgrades a version-2 database): the
  -- combined CRC32C, the SHA-256 (hex) when configured, the composite MD5 ("<hex>-<parts>").
  crc32c INTEGER,
  sha256 TEXT,
  composite_md5 TEXT,
  -- How the parts make the file (version 4): '' chunks, 'segments', 'partial', 'concat'
  -- with the concatenated uploads' ids, space-separated, in concat_parts.
  assembly TEXT NOT NULL DEFAULT '',
  concat_parts TEXT NOT NULL DEFAULT '',
  failure_reason TEXT,
  failed_at INTEGER,
  failed_event_id TEXT,
  expires_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS parts (
  upload_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  len INTEGER NOT NULL,
  crc32c INTEGER NOT NULL,
  md5 TEXT NOT NULL DEFAULT '',
  token TEXT NOT NULL,
  PRIMARY KEY (upload_id, idx)
) WITHOUT ROWID;

-- Merge triggers and events not yet published. `kind` ('merge' | 'event') says which an
-- entry is; `raw` is the message itself, never read to tell the kinds apart. (Version 2 added
-- `kind`; mod.rs upgrades a version-1 database.)
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY,
  upload_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  raw TEXT NOT NULL,
  enqueued_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_upload ON outbox (upload_id);

CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY,
  family TEXT NOT NULL,
  payload BLOB NOT NULL,
  available_at INTEGER NOT NULL,
  -- The consumer holding it, or NULL when it waits for one.
  claimed_by TEXT,
  deliveries INTEGER NOT NULL DEFAULT 0,
  -- W3C trace context of the publisher, JSON [[name, value], ...].
  trace TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (family, claimed_by, available_at);

CREATE TABLE IF NOT EXISTS dead_jobs (
  id INTEGER PRIMARY KEY,
  family TEXT NOT NULL,
  payload BLOB NOT NULL,
  reason TEXT NOT NULL,
  dead_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY,
  event_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  body TEXT NOT NULL,
  published_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS locks (
  key TEXT PRIMARY KEY,
  token TEXT NOT NULL,
  expires_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS webhook_events (
  event_id TEXT PRIMARY KEY,
  body TEXT NOT NULL,
  expires_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS webhook_deliveries (
  seq INTEGER PRIMARY KEY,
  event_id TEXT NOT NULL,
  entry TEXT NOT NULL,
  logged_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_event ON webhook_deliveries (event_id);

CREATE TABLE IF NOT EXISTS webhook_disabled (
  endpoint TEXT PRIMARY KEY,
  reason TEXT NOT NULL,
  disabled_at INTEGER NOT NULL
);

-- Per-tenant quotas: one row per upload holding a reservation (see quota/mod.rs). Added
-- without a version bump: CREATE IF NOT EXISTS brings a version-1 database up to it.
CREATE TABLE IF NOT EXISTS quota (
  upload_id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  active INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS quota_by_tenant ON quota (tenant, active);
-- Reservations no later step has named yet, and when each was made (ms since the epoch): the
-- janitor releases those whose upload never reached storage. Added without a version bump, as
-- `quota` was: an earlier Stitch opening the database ignores the table.
CREATE TABLE IF NOT EXISTS quota_unconfirmed (
  upload_id TEXT PRIMARY KEY,
  reserved_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS quota_unconfirmed_by_time ON quota_unconfirmed (reserved_at);
