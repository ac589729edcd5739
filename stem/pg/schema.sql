-- The schema that all migrations together produce, declared in one place for readers.
-- tests/unit/test_pg_migrations.py checks that migrating an empty database yields exactly
-- this. When you add a migration, update this file to match.

CREATE FUNCTION stem_now_ms() RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT floor(extract(epoch FROM now()) * 1000)::bigint $$;

-- One row per message that is ready, delayed or leased. available_at is when the row may
-- next be reserved: the not-before time while waiting, the lease deadline while leased.
-- One column for both keeps reserve to a single index range and makes a lapsed lease
-- available again with no sweeper. lease_token names the current lease; a new one is drawn
-- at each reserve, so an old receipt never matches again.
CREATE TABLE stem_messages (
    id             bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     text     NOT NULL,
    queue          text     NOT NULL,
    priority       smallint NOT NULL DEFAULT 0,
    available_at   bigint   NOT NULL,
    lease_token    uuid,
    delivery_count integer  NOT NULL DEFAULT 0,
    body           bytea    NOT NULL
);

-- Serves reserve (queue = $1 AND available_at <= now ORDER BY priority DESC, available_at,
-- id) and the "next due" probe per (queue, priority).
CREATE INDEX stem_messages_reserve ON stem_messages (queue, priority DESC, available_at, id);

CREATE TABLE stem_dead_letters (
    id             bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     text     NOT NULL,
    queue          text     NOT NULL,
    priority       smallint NOT NULL DEFAULT 0,
    body           bytea    NOT NULL,
    reason         text     NOT NULL,
    detail         text     NOT NULL DEFAULT '',
    dead_at        bigint   NOT NULL,
    delivery_count integer  NOT NULL
);

CREATE INDEX stem_dead_letters_queue ON stem_dead_letters (queue, id);

-- Expiring keys (replay nonces, unique tasks, beat ticks, revocations); expires_at NULL
-- never expires. Keys compare bytewise (COLLATE "C") so a prefix scan is an index range.
CREATE TABLE stem_claims (
    key        text COLLATE "C" PRIMARY KEY,
    value      text   NOT NULL,
    expires_at bigint
);

CREATE INDEX stem_claims_expires ON stem_claims (expires_at);

-- Result backend: one record per task id.
CREATE TABLE stem_results (
    task_id    text   PRIMARY KEY,
    state      text   NOT NULL,
    body       bytea  NOT NULL,
    expires_at bigint,
    updated_at bigint NOT NULL
);

CREATE INDEX stem_results_expires ON stem_results (expires_at) WHERE expires_at IS NOT NULL;

-- Unique-member sets for group and chord completion: size is kept in stem_sets so that
-- adding a member costs O(1), and a redelivered member is counted once.
CREATE TABLE stem_sets (
    key        text    PRIMARY KEY,
    size       integer NOT NULL,
    expires_at bigint
);

CREATE INDEX stem_sets_expires ON stem_sets (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE stem_set_members (
    key    text NOT NULL,
    member text NOT NULL,
    PRIMARY KEY (key, member)
);

-- Every queue ever published to (0002), so drained queues keep showing in stats.
CREATE TABLE stem_queues (
    name text PRIMARY KEY
);
