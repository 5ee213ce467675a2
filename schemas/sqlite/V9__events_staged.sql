-- Schema version 9: events arrive in 16 tables `events_staged_0` .. `events_staged_15`
-- and move into `events` in bulk. `events`' unique index (user_id, ts, event_id) is keyed
-- by user first: once it held more pages than a write had users, each 100 ms write put a
-- page of it per user through the WAL and again at the checkpoint, for one or two events
-- of that user (bench: shared/benches/store_growth.rs). A staged table has no index and
-- each write appends to its end, so a write touches a few pages of each. A user's events
-- go to one of them, chosen by the user id's stable hash (sqlite.rs, `staged_table`).
-- The store moves them all into `events` once they hold enough (EVENTS_STAGED_MAX),
-- writing each page of the index once for all of a user's events since the last move.
-- A user's events are those of `events` and of the user's staged table, which reading
-- scans (a sixteenth of the staged events). The move is INSERT OR IGNORE in key order,
-- then rowid: of two rows with one key (an event delivered again), the first stored is
-- kept, in the move as in reading before it.
CREATE TABLE events_staged_0 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_1 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_2 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_3 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_4 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_5 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_6 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_7 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_8 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_9 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_10 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_11 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_12 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_13 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_14 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
CREATE TABLE events_staged_15 (
    user_id   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    event_id  TEXT    NOT NULL,
    body      TEXT    NOT NULL
);
