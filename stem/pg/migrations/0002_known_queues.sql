-- Stem 0002: remember every queue ever published to, so `stem queues` keeps listing a
-- queue after it drains (with zeros) instead of forgetting it.

CREATE TABLE stem_queues (
    name text PRIMARY KEY
);

INSERT INTO stem_queues (name)
SELECT queue FROM stem_messages
UNION
SELECT queue FROM stem_dead_letters
ON CONFLICT DO NOTHING;
