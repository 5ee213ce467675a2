-- Schema version 7: a list's `body` in `recommendations` may be in the binary form
-- (schemas/recommendation.binary.md), kept as it came from the topic; `body_encoding`
-- says which: 0, the rows before this version and every list that came as JSON (TEXT, or
-- a BLOB as version 6 packs it), or 1, the binary form (a BLOB). A list of 20 products is
-- about 1.6 KB of JSON, 650 bytes packed and about 370 in the binary form, which needs
-- neither packing nor unpacking. A packed BLOB's first bytes (its length) can be any, so
-- the column, not the bytes, tells the two BLOBs apart.
-- Adding a column with a default rewrites no row. The version is set so that an older
-- binary, which would take a binary body for a packed one, refuses the file instead.
ALTER TABLE recommendations ADD COLUMN body_encoding INTEGER NOT NULL DEFAULT 0;
