-- recpipe embedded store, schema version 1 (SQLite in WAL mode).
-- Mirrors the CQL tables: every table is keyed by user first, so a user's rows sit together.

-- Every event, once: the key is (user, event id), so a replayed event is ignored.
CREATE TABLE IF NOT EXISTS events (
    user_id   TEXT    NOT NULL,
    event_id  TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    body      TEXT    NOT NULL,
    PRIMARY KEY (user_id, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user_id, ts);

-- Every recommendation list (the history), keyed by its deterministic id.
CREATE TABLE IF NOT EXISTS recommendations (
    user_id           TEXT    NOT NULL,
    recommendation_id TEXT    NOT NULL,
    user_version      INTEGER NOT NULL,
    generated_at      INTEGER NOT NULL,
    body              TEXT    NOT NULL,
    PRIMARY KEY (user_id, recommendation_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recommendations_latest
    ON recommendations (user_id, user_version, generated_at);

-- The latest state of each user; an older version never overwrites a newer one.
CREATE TABLE IF NOT EXISTS user_state (
    user_id  TEXT    NOT NULL PRIMARY KEY,
    version  INTEGER NOT NULL,
    body     TEXT    NOT NULL
) WITHOUT ROWID;
