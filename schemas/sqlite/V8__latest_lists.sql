-- Schema version 8: each user's latest list named in a table of one row per user, in
-- place of the index `recommendations_latest` (user_id, user_version, generated_at),
-- which had an entry per list. Every list that save-worker stored went into that index
-- at its user's end: with thousands of users in a write, each commit wrote a page of it
-- per user through the WAL and again at the checkpoint, and as the history grew those
-- pages were ever more distinct (bench: shared/benches/store_growth.rs). This table's
-- rows are small and one per user, so a write touches a few of its pages.
-- A row names the list with the highest (user_version, generated_at) of its user; of
-- two with the same, the one written later. save-worker keeps it in the transaction
-- that stores the lists.
CREATE TABLE latest_recommendations (
    user_id           TEXT    NOT NULL PRIMARY KEY,
    user_version      INTEGER NOT NULL,
    generated_at      INTEGER NOT NULL,
    recommendation_id TEXT    NOT NULL
) WITHOUT ROWID;
-- The newest list of each user, as the index found it (ties: the latest row).
INSERT INTO latest_recommendations (user_id, user_version, generated_at, recommendation_id)
    SELECT user_id, user_version, generated_at, recommendation_id FROM (
        SELECT user_id, user_version, generated_at, recommendation_id,
               row_number() OVER (PARTITION BY user_id
                                  ORDER BY user_version DESC, generated_at DESC, rowid DESC) AS n
        FROM recommendations)
    WHERE n = 1;
DROP INDEX recommendations_latest;
