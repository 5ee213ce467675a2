-- Schema version 4: the recommendations history as an ordinary (rowid) table.
-- As a WITHOUT ROWID table its rows (about 2 KB of JSON each) lived in the b-tree of its
-- key (user, id): lists arrive in no order of user, so inserts split pages across the
-- file, and every commit rewrote those pages through the WAL. Rows are now appended in
-- the order they come, and the key is a unique index of small entries. Reads are the
-- same queries.
-- The store applies each migration in one transaction with the version it sets.
CREATE TABLE recommendations_v4 (
    user_id           TEXT    NOT NULL,
    recommendation_id TEXT    NOT NULL,
    user_version      INTEGER NOT NULL,
    generated_at      INTEGER NOT NULL,
    body              TEXT    NOT NULL,
    UNIQUE (user_id, recommendation_id)
);
INSERT INTO recommendations_v4 (user_id, recommendation_id, user_version, generated_at, body)
    SELECT user_id, recommendation_id, user_version, generated_at, body FROM recommendations;
DROP TABLE recommendations;
ALTER TABLE recommendations_v4 RENAME TO recommendations;
CREATE INDEX recommendations_latest ON recommendations (user_id, user_version, generated_at);
