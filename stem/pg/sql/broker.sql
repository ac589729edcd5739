-- Named queries of the PostgreSQL broker (stem/brokers/postgres.py).
-- Each query starts at a "-- name: NAME" line. Parameters are psycopg %(name)s style.
-- Every query that makes a message available (or changes when it will be) notifies the
-- %(channel)s channel with the queue as payload, in the same statement, so waiters wake
-- only after the change is committed and visible.

-- name: publish
WITH ins AS (
    INSERT INTO stem_messages (message_id, queue, priority, available_at, body)
    SELECT m.message_id, m.queue, m.priority, coalesce(m.not_before, stem_now_ms()), m.body
    FROM unnest(%(ids)s::text[], %(queues)s::text[], %(priorities)s::smallint[],
                %(not_before)s::bigint[], %(bodies)s::bytea[])
         WITH ORDINALITY AS m(message_id, queue, priority, not_before, body, ord)
    ORDER BY m.ord
    RETURNING queue
), known AS (
    INSERT INTO stem_queues (name)
    SELECT DISTINCT q FROM unnest(%(queues)s::text[]) AS q
    ON CONFLICT DO NOTHING
)
SELECT pg_notify(%(channel)s, q.queue) FROM (SELECT DISTINCT queue FROM ins) AS q;

-- name: reserve
-- One LATERAL probe per queue keeps each probe on the index order; rows locked by the
-- probes but cut by the outer LIMIT are released when the statement ends.
WITH picked AS (
    SELECT c.id, c.priority, c.available_at
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT m.id, m.priority, m.available_at
        FROM stem_messages AS m
        WHERE m.queue = q.name AND m.available_at <= stem_now_ms()
        ORDER BY m.priority DESC, m.available_at, m.id
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.available_at, c.id
    LIMIT %(n)s
)
UPDATE stem_messages AS m
SET lease_token = gen_random_uuid(),
    available_at = stem_now_ms() + %(lease_ms)s,
    delivery_count = LEAST(m.delivery_count, 2147483646) + 1  -- a count written as int max
FROM picked
WHERE m.id = picked.id
RETURNING m.id, m.lease_token, m.message_id, m.queue, m.body, m.delivery_count,
          m.available_at, picked.priority, picked.available_at;

-- name: next_due
-- When the earliest delayed message (or lapsing lease) of these queues becomes available,
-- probing the reserve index once per (queue, priority).
SELECT stem_now_ms(), min(d.available_at)
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN generate_series(0, 9) AS p(priority)
CROSS JOIN LATERAL (
    SELECT m.available_at FROM stem_messages AS m
    WHERE m.queue = q.name AND m.priority = p.priority AND m.available_at > stem_now_ms()
    ORDER BY m.available_at
    LIMIT 1
) AS d;

-- name: ack
DELETE FROM stem_messages AS m
USING unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
WHERE m.id = r.id AND m.lease_token = r.token;

-- name: extend
UPDATE stem_messages AS m
SET available_at = stem_now_ms() + %(lease_ms)s
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
-- By token alone, as the other brokers: a lease that lapsed while nobody took the message
-- (a pause of the server, say) is still this worker's, and renewing it spares a second run.
WHERE m.id = r.id AND m.lease_token = r.token
RETURNING m.id;

-- name: nack
WITH up AS (
    UPDATE stem_messages
    SET lease_token = NULL,
        available_at = stem_now_ms() + %(delay_ms)s,
        delivery_count = CASE WHEN %(body)s::bytea IS NULL
                              THEN greatest(delivery_count - 1, 0) ELSE 0 END,
        body = coalesce(%(body)s::bytea, body)
    WHERE id = %(id)s AND lease_token = %(token)s
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM up;

-- name: dead_letter
WITH moved AS (
    DELETE FROM stem_messages
    WHERE id = %(id)s AND lease_token = %(token)s
    RETURNING message_id, queue, priority, body, delivery_count
)
INSERT INTO stem_dead_letters
    (message_id, queue, priority, body, reason, detail, dead_at, delivery_count)
SELECT message_id, queue, priority, body, %(reason)s, %(detail)s, stem_now_ms(), delivery_count
FROM moved;

-- name: dlq_list
SELECT id, message_id, queue, body, reason, detail, dead_at, delivery_count
FROM stem_dead_letters
WHERE %(queue)s::text IS NULL OR queue = %(queue)s
ORDER BY id
LIMIT %(limit)s;

-- name: dlq_get
SELECT id, message_id, queue, body, reason, detail, dead_at, delivery_count
FROM stem_dead_letters
WHERE id = %(id)s;

-- name: dlq_replay
WITH moved AS (
    DELETE FROM stem_dead_letters
    WHERE (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
    RETURNING id, message_id, queue, priority, body
), ins AS (
    INSERT INTO stem_messages (message_id, queue, priority, available_at, body, delivery_count)
    SELECT message_id, queue, priority, stem_now_ms(), body, 0 FROM moved ORDER BY id
    RETURNING queue
)
SELECT c.n, pg_notify(%(channel)s, c.queue)
FROM (SELECT queue, count(*) AS n FROM ins GROUP BY queue) AS c;

-- name: dlq_purge
DELETE FROM stem_dead_letters
WHERE (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(queue)s::text IS NULL OR queue = %(queue)s);

-- name: stats_messages
SELECT queue,
       count(*) FILTER (WHERE available_at <= stem_now_ms()),
       count(*) FILTER (WHERE available_at > stem_now_ms() AND lease_token IS NULL),
       count(*) FILTER (WHERE available_at > stem_now_ms() AND lease_token IS NOT NULL)
FROM stem_messages
WHERE %(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[])
GROUP BY queue;

-- name: stats_known
SELECT name FROM stem_queues;

-- name: stats_dead
SELECT queue, count(*)
FROM stem_dead_letters
WHERE %(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[])
GROUP BY queue;

-- name: purge
-- Ready and delayed messages; a leased one stays unless its lease has lapsed.
DELETE FROM stem_messages
WHERE queue = %(queue)s AND (lease_token IS NULL OR available_at <= stem_now_ms());

-- name: drop
WITH gone AS (DELETE FROM stem_queues WHERE name = %(queue)s)
DELETE FROM stem_messages WHERE queue = %(queue)s;

-- name: claim
INSERT INTO stem_claims AS c (key, value, expires_at)
VALUES (%(key)s, %(value)s, stem_now_ms() + %(ttl_ms)s)
ON CONFLICT (key) DO UPDATE
    SET value = excluded.value, expires_at = excluded.expires_at
    WHERE c.expires_at <= stem_now_ms()
RETURNING value;

-- name: claim_many
-- Keys arrive distinct and sorted (two batches never lock the same rows in opposite orders).
INSERT INTO stem_claims AS c (key, value, expires_at)
SELECT k, v, stem_now_ms() + t
FROM unnest(%(keys)s::text[], %(values)s::text[], %(ttls)s::bigint[]) AS u(k, v, t)
ON CONFLICT (key) DO UPDATE
    SET value = excluded.value, expires_at = excluded.expires_at
    WHERE c.expires_at <= stem_now_ms()
RETURNING key, value;

-- name: peek_many
SELECT key, value FROM stem_claims
WHERE key = ANY(%(keys)s::text[]) AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: peek
SELECT value FROM stem_claims
WHERE key = %(key)s AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: release
DELETE FROM stem_claims
WHERE key = %(key)s AND (%(value)s::text IS NULL OR value = %(value)s)
  AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: swap_from_absent
-- Compare-and-set where the expected value is "absent": insert, or take over an expired key.
INSERT INTO stem_claims AS c (key, value, expires_at)
VALUES (%(key)s, %(new)s, stem_now_ms() + %(ttl_ms)s::bigint)
ON CONFLICT (key) DO UPDATE
    SET value = excluded.value, expires_at = excluded.expires_at
    WHERE c.expires_at <= stem_now_ms()
RETURNING 1;

-- name: swap_value
UPDATE stem_claims
SET value = %(new)s, expires_at = stem_now_ms() + %(ttl_ms)s::bigint
WHERE key = %(key)s AND value = %(expected)s
  AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: scan
-- %(hi)s is the least string above every string with the prefix (NULL: no upper bound).
SELECT key, value FROM stem_claims
WHERE key >= %(lo)s AND (%(hi)s::text IS NULL OR key < %(hi)s) AND starts_with(key, %(lo)s)
  AND (expires_at IS NULL OR expires_at > stem_now_ms());

-- name: sweep_claims
-- Bounded so one sweep never holds many row locks or runs long; rows are locked in key
-- order (as claim_many locks them) and rows someone holds are left for the next sweep,
-- so a sweep and a batch of claims never deadlock.
DELETE FROM stem_claims
WHERE key IN (
    SELECT key FROM stem_claims WHERE expires_at <= stem_now_ms()
    ORDER BY key LIMIT 1000 FOR UPDATE SKIP LOCKED
);
