"""PostgreSQL support shared by the broker and the result backend: URL and TLS handling
(:mod:`~stem.pg.conninfo`), connections and error translation (:mod:`~stem.pg.client`),
LISTEN/NOTIFY waiting (:mod:`~stem.pg.notify`), versioned migrations (:mod:`~stem.pg.migrate`)
and named queries kept in ``sql/*.sql`` (:mod:`~stem.pg.queries`)."""
