-- Schema version 5: events in an ordinary (rowid) table, unique by (user, ts, event id)
-- as the CQL table is keyed. Before, the rows lived in the b-tree of their key (user,
-- event id) and a second index ordered them by (user, ts): each event went into two
-- b-trees at places spread over the file, and every commit wrote the pages it touched
-- again through the WAL. Rows are now appended as they come, and one index of small
-- entries both keeps a replayed event (the same record, so the same ts) to one row and
-- answers "a user's events, newest first".
-- The store applies each migration in one transaction with the version it sets.
CREATE TABLE events_v5 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL,
    UNIQUE (user_id, ts, event_id)
);
INSERT OR IGNORE INTO events_v5 (user_id, ts, event_id, body)
    SELECT user_id, ts, event_id, body FROM events ORDER BY user_id, ts, event_id;
DROP TABLE events;
ALTER TABLE events_v5 RENAME TO events;
