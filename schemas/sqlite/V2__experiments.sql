-- Schema version 2: online experiment counts.
-- One row per impression (a list served) and per attributed action (a click, cart or
-- purchase that names a served list and one of its products), keyed by its id, so a
-- replayed record is counted once. `arm` is the model version, or `popularity`/`catalog`
-- for fallback lists; `day` is days since the Unix epoch (UTC) of the record's time.
CREATE TABLE IF NOT EXISTS experiment_events (
    arm   TEXT    NOT NULL,
    day   INTEGER NOT NULL,
    kind  TEXT    NOT NULL,
    id    TEXT    NOT NULL,
    ts    INTEGER NOT NULL,
    PRIMARY KEY (arm, day, kind, id)
) WITHOUT ROWID;
