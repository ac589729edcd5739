-- SQLite broker: schema and named queries (loaded by stem/brokers/sqlite.py).
--
-- stem_messages holds every message not yet settled. One column, visible_ms, says when a
-- row may be reserved next: the publish time or not-before time while it waits, the retry
-- time after a nack, the lease expiry while it is leased. So a lapsed lease needs no sweeper:
-- the row is simply visible again. lease_token names the current lease; a receipt is
-- "<id>:<lease_token>", and every settling statement matches both, so a receipt whose
-- message was leased again (new token) settles nothing.

-- name: schema
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS stem_schema (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stem_messages (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    visible_ms INTEGER NOT NULL,
    lease_token TEXT,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
-- reserve walks this index in delivery order and stops after max_n rows.
CREATE INDEX IF NOT EXISTS stem_messages_reserve
    ON stem_messages (queue, priority DESC, visible_ms, id);
CREATE TABLE IF NOT EXISTS stem_dead_letters (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    dead_ms INTEGER NOT NULL,
    delivery_count INTEGER NOT NULL
);
-- Every queue a message was ever published to, so stats() lists drained queues too.
CREATE TABLE IF NOT EXISTS stem_queues (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stem_dead_letters_queue ON stem_dead_letters (queue, id);
-- Claims: expires_ms NULL never expires.
CREATE TABLE IF NOT EXISTS stem_claims (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_ms INTEGER
);
CREATE INDEX IF NOT EXISTS stem_claims_expiry ON stem_claims (expires_ms);
INSERT OR IGNORE INTO stem_schema (component, version) VALUES ('broker', 1);
COMMIT;

-- name: schema_version
SELECT version FROM stem_schema WHERE component = 'broker';

-- name: publish
INSERT INTO stem_messages (message_id, queue, priority, visible_ms, body)
VALUES (?, ?, ?, ?, ?);

-- name: known_queue
INSERT OR IGNORE INTO stem_queues (name) VALUES (?);

-- name: known_queues
SELECT CAST(name AS BLOB) FROM stem_queues;

-- name: candidates
-- CAST: a row written by something else than Stem (a text priority, text that is not
-- UTF-8, say) must reach the worker, which dead-letters what it cannot decode, instead of
-- failing every reserve. Text is read as bytes (sqlite3 would fail to decode it); a
-- visible_ms that is not a number is due (as text it sorted after every number: never).
SELECT id, CAST(message_id AS BLOB), queue, CAST(body AS BLOB), CAST(delivery_count AS INTEGER),
       CAST(priority AS INTEGER), CAST(visible_ms AS INTEGER)
FROM stem_messages
WHERE queue = ? AND CAST(visible_ms AS INTEGER) <= ?
ORDER BY priority DESC, visible_ms, id
LIMIT ?;

-- name: any_visible
SELECT 1 FROM stem_messages WHERE queue = ? AND CAST(visible_ms AS INTEGER) <= ? LIMIT 1;

-- name: lease
UPDATE stem_messages
SET lease_token = ?, visible_ms = ?, delivery_count = delivery_count + 1
WHERE id = ?;

-- name: ack
DELETE FROM stem_messages WHERE id = ? AND lease_token = ?;

-- name: extend
UPDATE stem_messages SET visible_ms = ? WHERE id = ? AND lease_token = ?;

-- name: nack
UPDATE stem_messages
SET lease_token = NULL,
    visible_ms = :visible_ms,
    body = coalesce(:body, body),
    delivery_count = CASE WHEN :body IS NULL THEN max(delivery_count - 1, 0) ELSE 0 END
WHERE id = :id AND lease_token = :token;

-- name: take_for_dead_letter
DELETE FROM stem_messages WHERE id = ? AND lease_token = ?
RETURNING CAST(message_id AS BLOB), queue, priority, CAST(body AS BLOB), delivery_count;

-- name: insert_dead_letter
INSERT INTO stem_dead_letters
    (message_id, queue, priority, body, reason, detail, dead_ms, delivery_count)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: dlq_list
SELECT id, CAST(message_id AS BLOB), CAST(queue AS BLOB), CAST(body AS BLOB),
       CAST(reason AS BLOB), CAST(detail AS BLOB),
       CAST(dead_ms AS INTEGER), CAST(delivery_count AS INTEGER)
FROM stem_dead_letters
WHERE :queue IS NULL OR queue = :queue
ORDER BY id
LIMIT :limit;

-- name: dlq_get
SELECT id, CAST(message_id AS BLOB), CAST(queue AS BLOB), CAST(body AS BLOB),
       CAST(reason AS BLOB), CAST(detail AS BLOB),
       CAST(dead_ms AS INTEGER), CAST(delivery_count AS INTEGER)
FROM stem_dead_letters WHERE id = ?;

-- Dead-letter selections: :ids is a JSON array of ids, or NULL for all; :queue narrows.
-- name: dlq_replay
INSERT INTO stem_messages (message_id, queue, priority, visible_ms, body)
SELECT message_id, queue, priority, :now, body
FROM stem_dead_letters
WHERE (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
  AND (:queue IS NULL OR queue = :queue)
ORDER BY id;

-- name: dlq_delete
DELETE FROM stem_dead_letters
WHERE (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
  AND (:queue IS NULL OR queue = :queue);

-- name: stats_all
SELECT CAST(queue AS BLOB),
       sum(CAST(visible_ms AS INTEGER) <= :now),
       sum(CAST(visible_ms AS INTEGER) > :now AND lease_token IS NULL),
       sum(CAST(visible_ms AS INTEGER) > :now AND lease_token IS NOT NULL)
FROM stem_messages GROUP BY queue;

-- name: stats_one
SELECT sum(CAST(visible_ms AS INTEGER) <= :now),
       sum(CAST(visible_ms AS INTEGER) > :now AND lease_token IS NULL),
       sum(CAST(visible_ms AS INTEGER) > :now AND lease_token IS NOT NULL)
FROM stem_messages WHERE queue = :queue;

-- name: dead_all
SELECT CAST(queue AS BLOB), count(*) FROM stem_dead_letters GROUP BY queue;

-- name: dead_one
SELECT count(*) FROM stem_dead_letters WHERE queue = ?;

-- name: purge
DELETE FROM stem_messages
WHERE queue = ? AND (lease_token IS NULL OR CAST(visible_ms AS INTEGER) <= ?);

-- name: drop
DELETE FROM stem_messages WHERE queue = ?;

-- name: forget_queue
DELETE FROM stem_queues WHERE name = ?;

-- name: claim
INSERT INTO stem_claims (key, value, expires_ms) VALUES (:key, :value, :expires_ms)
ON CONFLICT (key) DO UPDATE
SET value = excluded.value, expires_ms = excluded.expires_ms
WHERE stem_claims.expires_ms <= :now;

-- name: peek
SELECT value FROM stem_claims WHERE key = ? AND (expires_ms IS NULL OR expires_ms > ?);

-- name: release
DELETE FROM stem_claims
WHERE key = :key AND (expires_ms IS NULL OR expires_ms > :now)
  AND (:value IS NULL OR value = :value);

-- name: set_claim
INSERT OR REPLACE INTO stem_claims (key, value, expires_ms) VALUES (?, ?, ?);

-- name: delete_claim
DELETE FROM stem_claims WHERE key = ?;

-- The key range [:lo, :hi) finds the prefix through the primary key; substr() keeps the
-- answer exact where no upper bound could be formed (:hi NULL).
-- name: scan
SELECT key, value FROM stem_claims
WHERE key >= :lo AND (:hi IS NULL OR key < :hi)
  AND substr(key, 1, length(:lo)) = :lo
  AND (expires_ms IS NULL OR expires_ms > :now);

-- name: expire_claims
DELETE FROM stem_claims WHERE expires_ms <= ?;
