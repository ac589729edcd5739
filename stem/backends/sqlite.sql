-- SQLite result backend: schema and named queries (loaded by stem/backends/sqlite.py).
-- It may share a file with the SQLite broker: its tables have their own names and its own
-- row in stem_schema. expires_ms is wall-clock epoch milliseconds, NULL for "keep".

-- name: schema
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS stem_schema (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stem_results (
    task_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    body BLOB NOT NULL,
    expires_ms INTEGER
);
CREATE INDEX IF NOT EXISTS stem_results_expiry
    ON stem_results (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS stem_member_sets (
    key TEXT PRIMARY KEY,
    expires_ms INTEGER
);
CREATE INDEX IF NOT EXISTS stem_member_sets_expiry
    ON stem_member_sets (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS stem_members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
INSERT OR IGNORE INTO stem_schema (component, version) VALUES ('backend', 1);
COMMIT;

-- name: schema_version
SELECT version FROM stem_schema WHERE component = 'backend';

-- name: store
INSERT INTO stem_results (task_id, state, body, expires_ms) VALUES (?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE
SET state = excluded.state, body = excluded.body, expires_ms = excluded.expires_ms;

-- name: fetch
SELECT state, body FROM stem_results
WHERE task_id = ? AND (expires_ms IS NULL OR expires_ms > ?);

-- name: fetch_many
SELECT task_id, body FROM stem_results
WHERE task_id IN (SELECT value FROM json_each(?)) AND (expires_ms IS NULL OR expires_ms > ?);

-- name: delete
DELETE FROM stem_results WHERE task_id = ?;

-- name: set_expired
SELECT 1 FROM stem_member_sets WHERE key = ? AND expires_ms <= ?;

-- name: drop_set
DELETE FROM stem_members WHERE key = ?;

-- name: add_member
INSERT OR IGNORE INTO stem_members (key, member) VALUES (?, ?);

-- A NULL ttl leaves an existing expiry alone; a ttl moves it.
-- name: touch_set
INSERT INTO stem_member_sets (key, expires_ms) VALUES (:key, :expires_ms)
ON CONFLICT (key) DO UPDATE
SET expires_ms = CASE WHEN :expires_ms IS NULL AND stem_member_sets.expires_ms > :now
                      THEN stem_member_sets.expires_ms
                      ELSE :expires_ms END;

-- name: count_members
SELECT count(*) FROM stem_members WHERE key = ?;

-- name: cleanup_results
DELETE FROM stem_results WHERE expires_ms <= ?;

-- name: cleanup_members
DELETE FROM stem_members
WHERE key IN (SELECT key FROM stem_member_sets WHERE expires_ms <= ?);

-- name: cleanup_sets
DELETE FROM stem_member_sets WHERE expires_ms <= ?;
