-- Schema version 3: impressions counted per arm, day and partition of the `impressions`
-- topic, with the last offset counted, instead of a row per impression (V2's
-- experiment_events keeps attributed actions, and impressions stored before V3).
-- save-worker writes a row's running total with the offset it covers: an impression at
-- or below it is a replay and not counted again. A row never moves back to an earlier
-- offset, so a stale writer cannot undo a newer count.
CREATE TABLE IF NOT EXISTS impression_tallies (
    arm              TEXT    NOT NULL,
    day              INTEGER NOT NULL,
    source_partition INTEGER NOT NULL,
    impressions      INTEGER NOT NULL,
    through_offset   INTEGER NOT NULL,
    PRIMARY KEY (arm, day, source_partition)
) WITHOUT ROWID;
