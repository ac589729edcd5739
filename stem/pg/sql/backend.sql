-- Named queries of the PostgreSQL result backend (stem/backends/postgres.py).
-- Each query starts at a "-- name: NAME" line. Parameters are psycopg %(name)s style.

-- name: store
-- Notify %(channel)s with the task id in the same statement, only for ready states, so a
-- waiter that wakes finds the record committed.
WITH up AS (
    INSERT INTO stem_results AS r (task_id, state, body, expires_at, updated_at)
    VALUES (%(task_id)s, %(state)s, %(body)s,
            stem_now_ms() + %(ttl_ms)s::bigint, stem_now_ms())
    ON CONFLICT (task_id) DO UPDATE
        SET state = excluded.state, body = excluded.body,
            expires_at = excluded.expires_at, updated_at = excluded.updated_at
    RETURNING task_id
)
SELECT pg_notify(%(channel)s, task_id) FROM up WHERE %(ready)s;

-- name: fetch
SELECT state, body FROM stem_results
WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: fetch_many
SELECT task_id, body FROM stem_results
WHERE task_id = ANY(%(task_ids)s::text[])
  AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: delete
DELETE FROM stem_results WHERE task_id = %(task_id)s;

-- name: drop_expired_set
-- An expired set starts over empty when a member is added again.
WITH gone AS (
    DELETE FROM stem_sets WHERE key = %(key)s AND expires_at <= stem_now_ms() RETURNING key
)
DELETE FROM stem_set_members AS m USING gone WHERE m.key = gone.key;

-- name: add_member
INSERT INTO stem_set_members (key, member) VALUES (%(key)s, %(member)s)
ON CONFLICT DO NOTHING;

-- name: bump_set
-- Runs in the same transaction as add_member, with %(added)s its row count (0 or 1). The
-- row lock on stem_sets serialises concurrent adders, and the unique (key, member) insert
-- above waits for a concurrent insert of the same member, so each member counts once.
INSERT INTO stem_sets AS s (key, size, expires_at)
VALUES (%(key)s, %(added)s, stem_now_ms() + %(ttl_ms)s::bigint)
ON CONFLICT (key) DO UPDATE
    SET size = s.size + excluded.size,
        expires_at = coalesce(excluded.expires_at, s.expires_at)
RETURNING size;

-- name: cleanup_results
DELETE FROM stem_results WHERE expires_at <= stem_now_ms();

-- name: cleanup_sets
WITH gone AS (
    DELETE FROM stem_sets WHERE expires_at <= stem_now_ms() RETURNING key
), members AS (
    DELETE FROM stem_set_members AS m USING gone WHERE m.key = gone.key
)
SELECT count(*) FROM gone;
