//! The embedded store: one SQLite file in WAL mode, so one process writes while others
//! read. Calls run on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};

use super::checkpoints::{note_wal_pages, Checkpoints, Tuning};
use super::{
    unpoisoned, ArmCounts, ExperimentKind, ImpressionTally, RecordBody, Store, StoreError,
    WriteBatch,
};
use crate::events::{Event, RecommendationRecord, UserVectorRecord};

/// Migrations in order; the database's `user_version` counts those applied.
const MIGRATIONS: [&str; 9] = [
    include_str!("../../../schemas/sqlite/V1__init.sql"),
    include_str!("../../../schemas/sqlite/V2__experiments.sql"),
    include_str!("../../../schemas/sqlite/V3__impression_tallies.sql"),
    include_str!("../../../schemas/sqlite/V4__recommendations_rowid.sql"),
    include_str!("../../../schemas/sqlite/V5__events_by_time.sql"),
    include_str!("../../../schemas/sqlite/V6__list_bodies_compressed.sql"),
    include_str!("../../../schemas/sqlite/V7__list_bodies_binary.sql"),
    include_str!("../../../schemas/sqlite/V8__latest_lists.sql"),
    include_str!("../../../schemas/sqlite/V9__events_staged.sql"),
];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
/// Read connections; GETs take whichever is free.
const READERS: usize = 4;
/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Page cache of each connection, in KiB.
const CACHE_KIB: usize = 64 * 1024;
/// Page size of a new database file, in bytes.
const PAGE_SIZE: usize = 8 * 1024;
/// WAL pages after which a commit has them checkpointed into the database (128 MiB of WAL
/// in a new file, 64 MiB in one made with 4 KiB pages), on a thread of their own
/// (store/checkpoints.rs).
const CHECKPOINT_PAGES: usize = 16 * 1024;
/// WAL pages after which the writer waits for that thread and checkpoints the rest.
const CHECKPOINT_WAIT_PAGES: usize = 4 * CHECKPOINT_PAGES;
/// Events the staged tables hold before a write moves the fullest of them into `events`
/// (schemas/sqlite/V9__events_staged.sql). Held about there, each table fills for twice
/// this many events before it moves, about an eighth of this. More makes each move write
/// each page of the events' index for more events, and each read of a user's events scan
/// more of them.
const EVENTS_STAGED_MAX: usize = 64 * 1024;
/// Events the staged tables may hold while writes have a backlog ([`WriteBatch::backlog`]):
/// a burst is appended without moves, which wait for a write without a backlog or for
/// [`Store::upkeep`]. A move was a seventh of save-worker's CPU in a burst of 200,000
/// events (BENCHMARKS.md, forty-seventh session). At this bound a read of a user's
/// events scans 16,000 staged rows on average (1.5-1.8 ms), up to twice that in the
/// fullest table (5.5 ms), against at most about 8,000 (0.5 ms) below EVENTS_STAGED_MAX.
const EVENTS_STAGED_BOUND: usize = 4 * EVENTS_STAGED_MAX;
/// The tables events are staged in (schemas/sqlite/V9__events_staged.sql). Each write
/// appends to the end of each, and reading a user's staged events scans one.
const EVENTS_STAGED_TABLES: [&str; 16] = [
    "events_staged_0",
    "events_staged_1",
    "events_staged_2",
    "events_staged_3",
    "events_staged_4",
    "events_staged_5",
    "events_staged_6",
    "events_staged_7",
    "events_staged_8",
    "events_staged_9",
    "events_staged_10",
    "events_staged_11",
    "events_staged_12",
    "events_staged_13",
    "events_staged_14",
    "events_staged_15",
];

/// Prepared statements a connection keeps.
const STATEMENT_CACHE: usize = 64;

/// The staged table of a user's events: a stable hash, the same in every process and
/// build.
fn staged_table(user_id: &str) -> usize {
    let at = crate::stable_hash::unit_interval("events_staged", user_id);
    ((at * EVENTS_STAGED_TABLES.len() as f64) as usize).min(EVENTS_STAGED_TABLES.len() - 1)
}

/// `recommendations.body_encoding` (schemas/sqlite/V7__list_bodies_binary.sql).
const LIST_JSON: i64 = 0;
const LIST_BINARY: i64 = 1;
/// A batch whose lists come to more JSON than this has them compressed on a thread of
/// its own while its events and states are written; a smaller one compresses them in
/// line, where a thread would cost more than it saves.
const PACK_ON_A_THREAD_BYTES: usize = 256 * 1024;
/// The longest list body that unpacking accepts: far above any list (about 2 KB), so
/// that a damaged length cannot make it allocate gigabytes.
const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;

pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    /// Started by the first write: a store that only reads (query-api) has no thread.
    checkpoints: Arc<std::sync::OnceLock<Checkpoints>>,
    tuning: Tuning,
    /// Rows in each staged table as this store's writer last committed them (another
    /// process writing the file adds rows it does not count: a move just comes later).
    events_staged: Arc<Mutex<StagedRows>>,
    /// EVENTS_STAGED_MAX and EVENTS_STAGED_BOUND, or fewer in tests.
    events_staged_max: usize,
    events_staged_bound: usize,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
}

fn query_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Query(e.to_string())
}

const TUNING: Tuning = Tuning {
    background_pages: CHECKPOINT_PAGES,
    wait_pages: CHECKPOINT_WAIT_PAGES,
};

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies the schema.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_tuned(path, TUNING)
    }

    pub(super) fn open_tuned(path: &Path, tuning: Tuning) -> Result<SqliteStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            location: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        }
        let connect = || -> Result<Connection, StoreError> {
            let c = Connection::open(path).map_err(|e| open_err(&e))?;
            c.busy_timeout(BUSY_TIMEOUT).map_err(|e| open_err(&e))?;
            // A write prepares two inserts per staged table of events (rusqlite keeps 16).
            c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            // Applies to a new file only (an existing one keeps its page size). At 4 KiB a
            // list (about 2 KB of JSON) left much of a page unused, and storing a backlog
            // of 200,000 events took save-worker more pages, b-tree splits and WAL frames:
            // 6.2-6.5 s against 5.7-5.9 s at 8 KiB (16 KiB measured as 8), and no more CPU
            // at a steady 4,806 events/s (BENCHMARKS.md, tenth session).
            c.pragma_update(None, "page_size", PAGE_SIZE as i64)
                .map_err(|e| open_err(&e))?;
            // WAL lets readers in other processes run alongside the writer; NORMAL sync
            // survives a process crash (not an OS crash) and keeps commits cheap.
            set_wal(&c).map_err(|e| open_err(&e))?;
            c.pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| open_err(&e))?;
            // With SQLite's defaults (a 2 MB page cache, a checkpoint every 4 MB of WAL)
            // save-worker spent a quarter of its CPU checkpointing and a fifth reading
            // b-tree pages back from the file. The cache grows only as it is used.
            c.pragma_update(None, "cache_size", -(CACHE_KIB as i64))
                .map_err(|e| open_err(&e))?;
            // The migrations' checkpoints: after them the writer's WAL hook replaces
            // SQLite's automatic checkpoint with store/checkpoints.rs.
            c.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES as i64)
                .map_err(|e| open_err(&e))?;
            Ok(c)
        };
        let writer = connect()?;
        let version: i64 = writer
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| open_err(&e))?;
        if version > SCHEMA_VERSION {
            return Err(open_err(&format!(
                "the database has schema version {version}, newer than this binary's {SCHEMA_VERSION}: upgrade recpipe"
            )));
        }
        for (applied, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            migrate(&writer, applied as i64, migration).map_err(|e| open_err(&e))?;
        }
        let mut events_staged = StagedRows::default();
        for (rows, table) in events_staged.0.iter_mut().zip(EVENTS_STAGED_TABLES) {
            *rows = writer
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(|e| open_err(&e))? as usize;
        }
        let readers = (0..READERS)
            .map(|_| connect().map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        // In place of SQLite's automatic checkpoint, which is a WAL hook too.
        writer.wal_hook(Some(note_wal_pages));
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Arc::new(Mutex::new(writer)),
            checkpoints: Default::default(),
            tuning,
            events_staged: Arc::new(Mutex::new(events_staged)),
            events_staged_max: EVENTS_STAGED_MAX,
            events_staged_bound: EVENTS_STAGED_BOUND,
            readers: Arc::new(readers),
            next_reader: AtomicUsize::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves staged events once `max` are staged, not EVENTS_STAGED_MAX, and in a
    /// backlog once `bound` are.
    #[cfg(test)]
    fn moving_staged_events_at(mut self, max: usize, bound: usize) -> Self {
        self.events_staged_max = max;
        self.events_staged_bound = bound;
        self
    }

    #[cfg(test)]
    pub(super) fn checkpoints(&self) -> Option<&Checkpoints> {
        self.checkpoints.get()
    }

    /// Runs `f` on a free read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            // Take the first idle connection, else wait for our round-robin one.
            for i in 0..readers.len() {
                match readers[(start + i) % readers.len()].try_lock() {
                    Ok(c) => return f(&c),
                    Err(std::sync::TryLockError::Poisoned(p)) => return f(&p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => {}
                }
            }
            f(&unpoisoned(&readers[start % readers.len()]))
        })
        .await
        .map_err(query_err)?
    }
}

/// Puts the file in WAL mode. Converting a new file takes an exclusive lock for which
/// SQLite answers "database is locked" at once, without the busy timeout: a service
/// opening the file while another one converts it (save-worker and query-api starting
/// together) tries again, for as long as the busy timeout would have waited.
fn set_wal(c: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match c.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

/// Applies the migration from schema version `from` and sets the next, in one
/// transaction taken with the write lock: services opening a new file at the same moment
/// each find it at version `from`, and only the first applies it (the others find the
/// version moved on once they get the lock). A failure leaves the file as it was.
fn migrate(c: &Connection, from: i64, migration: &str) -> rusqlite::Result<()> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let applied = (|| {
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version == from {
            // V4 and V5 copy a whole table, which takes a while in a large file.
            tracing::info!(from, to = from + 1, "migrating the database schema");
            c.execute_batch(migration)?;
            c.pragma_update(None, "user_version", from + 1)?;
        }
        Ok(())
    })();
    match applied {
        Ok(()) => c.execute_batch("COMMIT"),
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A list's JSON as the `recommendations` table keeps it since schema version 6: one LZ4
/// block with the JSON's length first (schemas/sqlite/V6__list_bodies_compressed.sql).
/// save-worker writes a third of the bytes through the WAL and its checkpoints, and a
/// backlog of 200,000 events leaves a file half the size (BENCHMARKS.md, twenty-sixth
/// session).
fn pack_list(json: &str) -> Vec<u8> {
    lz4_flex::compress_prepend_size(json.as_bytes())
}

/// Each list's body as stored, in order: a JSON list packed, a binary one as it came
/// (`None`). Many JSON lists are packed on a scoped thread while `meanwhile` runs (writing
/// the rest of the batch): on two cores the writer's transaction is what a backlog waits
/// for.
fn pack_lists_beside(
    lists: &[super::StoredList],
    meanwhile: impl FnOnce() -> Result<(), StoreError>,
) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    fn json(r: &super::StoredList) -> Option<&str> {
        match &r.body {
            RecordBody::Json(text) => Some(text),
            RecordBody::Binary(_) => None,
        }
    }
    let pack_all = || {
        lists
            .iter()
            .map(|r| json(r).map(pack_list))
            .collect::<Vec<_>>()
    };
    let bytes: usize = lists.iter().filter_map(json).map(str::len).sum();
    if bytes <= PACK_ON_A_THREAD_BYTES {
        meanwhile()?;
        return Ok(pack_all());
    }
    std::thread::scope(|scope| {
        let packing = scope.spawn(pack_all);
        let written = meanwhile();
        // Joined before `?`: the scope would join it anyway, and its panic is the news.
        let packed = packing
            .join()
            .map_err(|_| StoreError::Query("packing lists panicked".to_string()))?;
        written.map(|()| packed)
    })
}

/// A stored list: JSON text as rows before schema version 6 have it, a packed BLOB, or
/// (`body_encoding` 1) the binary form.
fn unpack_list(body: ValueRef<'_>, encoding: i64) -> Result<RecommendationRecord, StoreError> {
    if encoding == LIST_BINARY {
        let bytes = body.as_blob().map_err(|e| {
            StoreError::Corrupt(format!(
                "a list in the binary form not stored as a BLOB: {e}"
            ))
        })?;
        return crate::list_record::decode(bytes).map_err(|e| StoreError::Corrupt(e.to_string()));
    }
    if encoding != LIST_JSON {
        return Err(StoreError::Corrupt(format!(
            "a list of body_encoding {encoding}, which this build cannot read: upgrade recpipe"
        )));
    }
    match body {
        ValueRef::Text(json) => {
            serde_json::from_slice(json).map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        ValueRef::Blob(packed) => {
            let corrupt = |why: String| StoreError::Corrupt(format!("a packed list: {why}"));
            let (len, block) = packed
                .split_first_chunk::<4>()
                .ok_or_else(|| corrupt(format!("{} bytes, no length", packed.len())))?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > MAX_LIST_BYTES {
                return Err(corrupt(format!("a length of {len} bytes")));
            }
            let json =
                lz4_flex::block::decompress(block, len).map_err(|e| corrupt(e.to_string()))?;
            // The length is a lower bound to the decoder: a wrong one would go unseen.
            if json.len() != len {
                return Err(corrupt(format!("{} bytes, not {len}", json.len())));
            }
            serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))
        }
        other => Err(StoreError::Corrupt(format!(
            "a list body of type {:?}",
            other.data_type()
        ))),
    }
}

/// Rows a statement inserts when a batch has that many: SQLite's work per statement
/// (binding, stepping, resetting, opening the table's and indexes' cursors again) was
/// about a fifth of an event's write. With rows in key order, each also finds the index
/// pages the one before it touched still in the CPU's caches. 200,000 events in batches
/// of 40,000 took 3.4-3.9 µs an event one at a time in arrival order, 2.7-2.8 µs 32 at a
/// time in key order (BENCHMARKS.md, thirty-fourth session).
const ROWS_PER_STATEMENT: usize = 32;

/// Inserts `rows` with `head`, a `(?, ..)` of `columns` parameters per row and `tail`:
/// [`ROWS_PER_STATEMENT`] rows a statement, the rest one at a time. `bind(statement,
/// first, row)` binds a row's values from parameter `first` (counted from 1) on.
/// With `again`, a statement that inserted fewer rows than it had (an `OR IGNORE` head
/// that met keys already stored) is run once more with `again` as its head.
fn insert_rows<T>(
    tx: &rusqlite::Transaction,
    (head, again): (&str, Option<&str>),
    columns: usize,
    tail: &str,
    rows: &[T],
    bind: impl Fn(&mut rusqlite::Statement, usize, &T) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let sql = |head: &str, n: usize| {
        let row = format!("({})", vec!["?"; columns].join(", "));
        format!("{head} {}{tail}", vec![row; n].join(", "))
    };
    let run = |statement: &mut rusqlite::CachedStatement, group: &[T]| {
        for (i, row) in group.iter().enumerate() {
            bind(statement, i * columns + 1, row).map_err(query_err)?;
        }
        statement.raw_execute().map_err(query_err)
    };
    // Groups of `n` rows: each statement prepared once a call, `again`'s only if needed.
    let insert_groups = |n: usize, groups: &mut dyn Iterator<Item = &[T]>| {
        let mut first = tx.prepare_cached(&sql(head, n)).map_err(query_err)?;
        let mut second = None;
        for group in groups {
            let inserted = run(&mut first, group)?;
            if let Some(again) = again.filter(|_| inserted < group.len()) {
                let statement = match &mut second {
                    Some(statement) => statement,
                    None => second.insert(tx.prepare_cached(&sql(again, n)).map_err(query_err)?),
                };
                run(statement, group)?;
            }
        }
        Ok::<(), StoreError>(())
    };
    let mut groups = rows.chunks_exact(ROWS_PER_STATEMENT);
    if rows.len() >= ROWS_PER_STATEMENT {
        insert_groups(ROWS_PER_STATEMENT, &mut groups)?;
    }
    let rest = groups.remainder();
    if !rest.is_empty() {
        insert_groups(1, &mut rest.chunks(1))?;
    }
    Ok(())
}

/// A batch's events and user states, in the write's transaction, each in key order (see
/// [`ROWS_PER_STATEMENT`]).
/// `staged` counts the events each staged table gained.
fn write_events_and_states(
    tx: &rusqlite::Transaction,
    batch: &WriteBatch,
    staged: &mut StagedRows,
) -> Result<(), StoreError> {
    // Each to its user's table, in arrival order (a stable sort).
    let mut events: Vec<(usize, &super::StoredEvent)> = batch
        .events
        .iter()
        .map(|e| (staged_table(&e.event.user_id), e))
        .collect();
    events.sort_by_key(|&(table, _)| table);
    for rows in events.chunk_by(|a, b| a.0 == b.0) {
        staged.0[rows[0].0] += rows.len();
        insert_rows(
            tx,
            (
                &format!(
                    "INSERT INTO {} (user_id, ts, event_id, body) VALUES",
                    EVENTS_STAGED_TABLES[rows[0].0]
                ),
                None,
            ),
            4,
            "",
            rows,
            |s, at, &(_, stored)| {
                let e = &stored.event;
                s.raw_bind_parameter(at, &e.user_id)?;
                s.raw_bind_parameter(at + 1, e.ts)?;
                s.raw_bind_parameter(at + 2, &e.event_id)?;
                s.raw_bind_parameter(at + 3, &stored.body)
            },
        )?;
    }
    let mut states: Vec<&super::StoredUserState> = batch.user_states.iter().collect();
    states.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    insert_rows(
        tx,
        (
            "INSERT INTO user_state (user_id, version, body) VALUES",
            None,
        ),
        3,
        " ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, body = excluded.body
         WHERE excluded.version >= user_state.version",
        &states,
        |s, at, state| {
            s.raw_bind_parameter(at, &state.user_id)?;
            s.raw_bind_parameter(at + 1, state.version as i64)?;
            // JSON as TEXT (readable in the sqlite3 shell), the binary form as a BLOB.
            s.raw_bind_parameter(
                at + 2,
                ToSqlOutput::Borrowed(match &state.body {
                    RecordBody::Json(text) => ValueRef::Text(text.as_bytes()),
                    RecordBody::Binary(bytes) => ValueRef::Blob(bytes),
                }),
            )
        },
    )
}

/// Rows in each staged table.
#[derive(Debug, Clone, Copy, Default)]
struct StagedRows([usize; EVENTS_STAGED_TABLES.len()]);

impl StagedRows {
    /// Events staged in all the tables.
    fn total(&self) -> usize {
        self.0.iter().sum()
    }

    /// If `max` or more are staged, moves the fullest table's events into `events`
    /// (which in steady use is the one moved longest ago): each move writes the index's
    /// pages of a sixteenth of the users, so no one write stalls save-worker for long.
    /// Whether it moved one.
    fn move_fullest_past(
        &mut self,
        max: usize,
        tx: &rusqlite::Transaction,
    ) -> Result<bool, StoreError> {
        if self.total() < max.max(1) {
            return Ok(false);
        }
        let (fullest, _) = self
            .0
            .iter()
            .enumerate()
            .max_by_key(|&(_, rows)| rows)
            .expect("tables");
        move_staged_events(tx, EVENTS_STAGED_TABLES[fullest])?;
        self.0[fullest] = 0;
        Ok(true)
    }

    /// A write's moves: while `bound` or more are staged, the fullest table; then, unless
    /// the write has a backlog behind it, one more past `max`, so that moves a burst put
    /// off are caught up a table a write once the writer keeps up.
    fn move_after_write(
        &mut self,
        (max, bound): (usize, usize),
        backlog: bool,
        tx: &rusqlite::Transaction,
    ) -> Result<(), StoreError> {
        while self.move_fullest_past(bound, tx)? {}
        if !backlog {
            self.move_fullest_past(max, tx)?;
        }
        Ok(())
    }
}

/// Moves a staged table's events into `events`, in key order so that each page of its
/// index is written once, and of two with one key keeps the one stored first
/// (schemas/sqlite/V9__events_staged.sql).
fn move_staged_events(tx: &rusqlite::Transaction, table: &str) -> Result<(), StoreError> {
    tx.execute_batch(&format!(
        "INSERT OR IGNORE INTO events (user_id, ts, event_id, body)
             SELECT user_id, ts, event_id, body FROM {table}
             ORDER BY user_id, ts, event_id, rowid;
         DELETE FROM {table};"
    ))
    .map_err(query_err)
}

/// A batch's lists, in key order (see [`ROWS_PER_STATEMENT`]), each with its body as
/// [`pack_lists_beside`] made it.
fn write_lists(
    tx: &rusqlite::Transaction,
    lists: &[super::StoredList],
    packed: &[Option<Vec<u8>>],
) -> Result<(), StoreError> {
    let mut rows: Vec<(&super::StoredList, &Option<Vec<u8>>)> = lists.iter().zip(packed).collect();
    // Stable: of two lists with one key, the later still replaces the earlier.
    rows.sort_by(|(a, _), (b, _)| {
        (&a.user_id, &a.recommendation_id).cmp(&(&b.user_id, &b.recommendation_id))
    });
    // Nearly every list is new: inserted with OR IGNORE, which costs SQLite less than OR
    // REPLACE (a write of 20,000 lists 72 against 84 ms, `--bench store_write`), and only a
    // group that met a key already stored (a replay, or a repeat within the batch) is
    // written again with OR REPLACE, so the later list still wins.
    insert_rows(
        tx,
        (
            "INSERT OR IGNORE INTO recommendations (user_id, recommendation_id, user_version, generated_at, body, body_encoding) VALUES",
            Some("INSERT OR REPLACE INTO recommendations (user_id, recommendation_id, user_version, generated_at, body, body_encoding) VALUES"),
        ),
        6,
        "",
        &rows,
        |s, at, (r, packed)| {
            let (body, encoding) = match packed {
                Some(packed) => (ValueRef::Blob(packed), LIST_JSON),
                None => (ValueRef::Blob(r.body.bytes()), LIST_BINARY),
            };
            s.raw_bind_parameter(at, &r.user_id)?;
            s.raw_bind_parameter(at + 1, &r.recommendation_id)?;
            s.raw_bind_parameter(at + 2, r.user_version as i64)?;
            s.raw_bind_parameter(at + 3, r.generated_at)?;
            s.raw_bind_parameter(at + 4, ToSqlOutput::Borrowed(body))?;
            s.raw_bind_parameter(at + 5, encoding)
        },
    )?;
    // Each user's newest list of the batch (of two alike, the later) names itself in
    // `latest_recommendations` unless the row there is newer
    // (schemas/sqlite/V8__latest_lists.sql).
    let mut newest: std::collections::BTreeMap<&str, &super::StoredList> = Default::default();
    for list in lists {
        let held = newest.entry(&list.user_id).or_insert(list);
        if (list.user_version, list.generated_at) >= (held.user_version, held.generated_at) {
            *held = list;
        }
    }
    let newest: Vec<&super::StoredList> = newest.into_values().collect();
    insert_rows(
        tx,
        (
            "INSERT INTO latest_recommendations (user_id, user_version, generated_at, recommendation_id) VALUES",
            None,
        ),
        4,
        " ON CONFLICT (user_id) DO UPDATE SET user_version = excluded.user_version,
             generated_at = excluded.generated_at, recommendation_id = excluded.recommendation_id
         WHERE (excluded.user_version, excluded.generated_at)
             >= (latest_recommendations.user_version, latest_recommendations.generated_at)",
        &newest,
        |s, at, list| {
            s.raw_bind_parameter(at, &list.user_id)?;
            s.raw_bind_parameter(at + 1, list.user_version as i64)?;
            s.raw_bind_parameter(at + 2, list.generated_at)?;
            s.raw_bind_parameter(at + 3, &list.recommendation_id)
        },
    )
}

impl SqliteStore {
    /// Runs `f` in a transaction of the writer on the blocking pool, with the staged
    /// tables' counts to change, and commits if it returns `Some`. The counts are a copy,
    /// put back only once committed: a failed write counts nothing.
    async fn in_write_transaction<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction, &mut StagedRows) -> Result<Option<T>, StoreError>
            + Send
            + 'static,
    ) -> Result<Option<T>, StoreError> {
        let writer = self.writer.clone();
        let checkpoints = self.checkpoints.clone();
        let events_staged = self.events_staged.clone();
        let (tuning, path) = (self.tuning, self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut c = unpoisoned(&writer);
            if checkpoints.get().is_none() {
                let connection = Connection::open(&path).map_err(query_err)?;
                let started = Checkpoints::start(connection, tuning).map_err(query_err)?;
                let _ = checkpoints.set(started);
            }
            let mut staged = *events_staged.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = c.transaction().map_err(query_err)?;
            let Some(done) = f(&tx, &mut staged)? else {
                return Ok(None);
            };
            tx.commit().map_err(query_err)?;
            *events_staged.lock().unwrap_or_else(PoisonError::into_inner) = staged;
            if let Some(checkpoints) = checkpoints.get() {
                // The write is stored: a failed checkpoint is the next commit's to retry,
                // not a reason to write it again.
                if let Err(e) = checkpoints.after_commit(&c) {
                    tracing::warn!(error = %e, "checkpointing the database's WAL failed; a later commit tries again");
                }
            }
            Ok(Some(done))
        })
        .await
        .map_err(query_err)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write_shared(&self, batch: Arc<WriteBatch>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let limits = (self.events_staged_max, self.events_staged_bound);
        self.in_write_transaction(move |tx, staged| {
            {
                let packed_lists = pack_lists_beside(&batch.recommendations, || {
                    write_events_and_states(tx, &batch, staged)
                })?;
                write_lists(tx, &batch.recommendations, &packed_lists)?;
                let mut count = tx
                    .prepare_cached("INSERT OR IGNORE INTO experiment_events (arm, day, kind, id, ts) VALUES (?1, ?2, ?3, ?4, ?5)")
                    .map_err(query_err)?;
                for x in &batch.experiment {
                    count
                        .execute(params![x.arm, x.day(), x.kind.as_str(), x.id, x.ts])
                        .map_err(query_err)?;
                }
                let mut tally = tx
                    .prepare_cached(
                        "INSERT INTO impression_tallies (arm, day, source_partition, impressions, through_offset)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (arm, day, source_partition) DO UPDATE
                         SET impressions = excluded.impressions, through_offset = excluded.through_offset
                         WHERE excluded.through_offset >= impression_tallies.through_offset",
                    )
                    .map_err(query_err)?;
                for t in &batch.impression_tallies {
                    tally
                        .execute(params![t.arm, t.day, t.source_partition, t.impressions as i64, t.through_offset])
                        .map_err(query_err)?;
                }
            }
            staged.move_after_write(limits, batch.backlog, tx)?;
            Ok(Some(()))
        })
        .await
        .map(|_| ())
    }

    async fn upkeep(&self) -> Result<bool, StoreError> {
        let max = self.events_staged_max;
        // Asked at every idle tick: most find nothing to do, and need not take the writer.
        let staged = self
            .events_staged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total();
        if staged < max.max(1) {
            return Ok(false);
        }
        let moved = self
            .in_write_transaction(move |tx, staged| {
                Ok(staged.move_fullest_past(max, tx)?.then_some(()))
            })
            .await?;
        Ok(moved.is_some())
    }

    async fn latest_recommendations(
        &self,
        user_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError> {
        let user_id = user_id.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT r.body, r.body_encoding FROM latest_recommendations l
                 JOIN recommendations r
                   ON r.user_id = l.user_id AND r.recommendation_id = l.recommendation_id
                 WHERE l.user_id = ?1",
            )
            .map_err(query_err)?
            .query_row([&user_id], |r| Ok(unpack_list(r.get_ref(0)?, r.get(1)?)))
            .optional()
            .map_err(query_err)?
            .transpose()
        })
        .await
    }

    async fn users_with_lists(&self, limit: usize) -> Result<Option<Vec<String>>, StoreError> {
        self.read(move |c| {
            // One row per user, in key order: one ordered pass, no sort.
            let mut stmt = c
                .prepare("SELECT user_id FROM latest_recommendations ORDER BY user_id LIMIT ?1")
                .map_err(query_err)?;
            let users = stmt
                .query_map([limit.saturating_add(1) as i64], |r| r.get::<_, String>(0))
                .map_err(query_err)?
                .collect::<Result<Vec<String>, _>>()
                .map_err(query_err)?;
            Ok((users.len() <= limit).then_some(users))
        })
        .await
    }

    async fn user_events(&self, user_id: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let user_id = user_id.to_string();
        self.read(move |c| {
            // (ts, event_id, body) of the user's newest `limit` events moved into `events`,
            // then of all those staged, from a scan of the user's staged table.
            let row = |r: &rusqlite::Row| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?));
            let mut rows = c
                .prepare_cached("SELECT ts, event_id, body FROM events WHERE user_id = ?1 ORDER BY ts DESC, event_id DESC LIMIT ?2")
                .map_err(query_err)?
                .query_map(params![user_id, limit as i64], row)
                .map_err(query_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(query_err)?;
            let staged_sql = format!(
                "SELECT ts, event_id, body FROM {} WHERE user_id = ?1 ORDER BY rowid",
                EVENTS_STAGED_TABLES[staged_table(&user_id)]
            );
            let staged = c
                .prepare_cached(&staged_sql)
                .map_err(query_err)?
                .query_map([&user_id], row)
                .map_err(query_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(query_err)?;
            if !staged.is_empty() {
                // An event stored twice counts once, as the move keeps it: the copy in
                // `events`, else the first staged. A copy of one older than the `limit`
                // read from `events` sorts after all of them and is cut below.
                let mut seen: std::collections::HashSet<(i64, String)> =
                    rows.iter().map(|(ts, id, _)| (*ts, id.clone())).collect();
                rows.extend(staged.into_iter().filter(|(ts, id, _)| seen.insert((*ts, id.clone()))));
                rows.sort_unstable_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
                rows.truncate(limit);
            }
            rows.iter().map(|(_, _, body)| decode(body)).collect()
        })
        .await
    }

    async fn user_state(&self, user_id: &str) -> Result<Option<UserVectorRecord>, StoreError> {
        let user_id = user_id.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT body FROM user_state WHERE user_id = ?1")
                .map_err(query_err)?
                .query_row([&user_id], |r| {
                    // TEXT or BLOB: the encoding tells itself by its first byte.
                    Ok(match r.get_ref(0)? {
                        ValueRef::Text(b) | ValueRef::Blob(b) => crate::state_record::decode(b)
                            .map_err(|e| StoreError::Corrupt(e.to_string())),
                        other => Err(StoreError::Corrupt(format!(
                            "a user state of type {:?}",
                            other.data_type()
                        ))),
                    })
                })
                .optional()
                .map_err(query_err)?
                .transpose()
        })
        .await
    }

    async fn recommendation(
        &self,
        user_id: &str,
        recommendation_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError> {
        let (user_id, id) = (user_id.to_string(), recommendation_id.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT body, body_encoding FROM recommendations WHERE user_id = ?1 AND recommendation_id = ?2",
            )
            .map_err(query_err)?
            .query_row([&user_id, &id], |r| Ok(unpack_list(r.get_ref(0)?, r.get(1)?)))
            .optional()
            .map_err(query_err)?
            .transpose()
        })
        .await
    }

    async fn impression_tally(
        &self,
        arm: &str,
        day: i64,
        source_partition: i32,
    ) -> Result<Option<ImpressionTally>, StoreError> {
        let arm = arm.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT impressions, through_offset FROM impression_tallies
                 WHERE arm = ?1 AND day = ?2 AND source_partition = ?3",
            )
            .map_err(query_err)?
            .query_row(params![arm, day, source_partition], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()
            .map_err(query_err)
            .map(|row| {
                row.map(|(impressions, through_offset)| ImpressionTally {
                    arm,
                    day,
                    source_partition,
                    impressions: impressions as u64,
                    through_offset,
                })
            })
        })
        .await
    }

    async fn experiment_counts(
        &self,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<ArmCounts>, StoreError> {
        self.read(move |c| {
            // Rows (attributed actions, impressions before V3) and tallies, by arm.
            let mut stmt = c
                .prepare_cached(
                    "SELECT arm, kind, COUNT(*) FROM experiment_events WHERE day BETWEEN ?1 AND ?2
                     GROUP BY arm, kind
                     UNION ALL
                     SELECT arm, 'impression', SUM(impressions) FROM impression_tallies
                     WHERE day BETWEEN ?1 AND ?2 GROUP BY arm",
                )
                .map_err(query_err)?;
            let rows = stmt
                .query_map(params![from_day, to_day], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(query_err)?;
            let mut out: std::collections::BTreeMap<String, ArmCounts> = Default::default();
            for row in rows {
                let (arm, kind, n) = row.map_err(query_err)?;
                let kind = ExperimentKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("experiment kind {kind:?}")))?;
                out.entry(arm.clone())
                    .or_insert_with(|| ArmCounts {
                        arm,
                        ..Default::default()
                    })
                    .add(kind, n as u64);
            }
            Ok(out.into_values().collect())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(query_err))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::list_record::ListEncoding;
    use crate::store::{StoredEvent, StoredList};

    fn encode<T: serde::Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap()
    }

    /// A database file as a binary of schema `version` left it.
    fn file_at_version(path: &Path, version: usize) -> Connection {
        let c = Connection::open(path).unwrap();
        for migration in &MIGRATIONS[..version] {
            c.execute_batch(migration).unwrap();
        }
        c.pragma_update(None, "user_version", version as i64)
            .unwrap();
        c
    }

    fn pragma(path: &Path, name: &str) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn sqlite_passes_the_store_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("sqlite://{}", dir.path().join("s.db").display()))
            .await
            .unwrap();
        crate::store::suite::run_all(store.as_ref()).await;
    }

    /// A list stored again under its key by a later write (a replay) with other products
    /// replaces the stored one, whether it shares a statement with new lists (a full
    /// group of `ROWS_PER_STATEMENT`) or goes in one of its own (the rest), and leaves the
    /// lists around it as they were: new lists go in with OR IGNORE, and a statement that
    /// met a stored key is written again with OR REPLACE.
    #[tokio::test]
    async fn a_list_written_again_by_a_later_write_replaces_the_stored_one() {
        use crate::testkit;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let write = |lists: Vec<&RecommendationRecord>| {
            let batch = WriteBatch {
                recommendations: lists
                    .into_iter()
                    .map(|l| StoredList::of(l, ListEncoding::Binary))
                    .collect(),
                ..Default::default()
            };
            let store = &store;
            async move { store.write(batch).await.unwrap() }
        };
        let n = ROWS_PER_STATEMENT + 3;
        let first: Vec<RecommendationRecord> = (0..n)
            .map(|i| testkit::list(&format!("u{i:03}"), 1, &["p-1"]))
            .collect();
        write(first.iter().collect()).await;
        let again = |i: usize| testkit::list(&format!("u{i:03}"), 1, &["p-2", "p-3"]);
        // Users "t.." sort first: the two replays fall in the rest, a row a statement.
        let (t, late) = (
            (0..n - 2)
                .map(|i| testkit::list(&format!("t{i:03}"), 1, &["p-1"]))
                .collect::<Vec<_>>(),
            [again(4), again(n - 1)],
        );
        write(t.iter().chain(&late).collect()).await;
        // Users "v.." sort last: the replay shares the first full statement with them.
        let (v, early) = (
            (0..n - 1)
                .map(|i| testkit::list(&format!("v{i:03}"), 1, &["p-1"]))
                .collect::<Vec<_>>(),
            again(10),
        );
        write(v.iter().chain([&early]).collect()).await;

        let replayed = [4, n - 1, 10];
        let expected = first.iter().enumerate().map(|(i, list)| {
            if replayed.contains(&i) {
                again(i)
            } else {
                list.clone()
            }
        });
        for list in expected.chain(t).chain(v) {
            assert_eq!(
                store
                    .recommendation(&list.user_id, &list.recommendation_id)
                    .await
                    .unwrap()
                    .as_ref(),
                Some(&list),
                "{}",
                list.user_id
            );
        }
    }

    /// Batches of more rows than one statement inserts (`ROWS_PER_STATEMENT`), in no key
    /// order and with repeats, store what rows written one at a time in arrival order
    /// would.
    #[tokio::test]
    async fn batches_of_many_rows_store_what_one_row_at_a_time_would() {
        use crate::events::EventType;
        use crate::state_record::StateEncoding;
        use crate::store::StoredUserState;
        use crate::testkit;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let n = 3 * ROWS_PER_STATEMENT + 9;
        let users: Vec<String> = (0..7).map(|u| format!("u{u}")).collect();

        // Events: each user's newer and older ones interleaved; the batch holds its first
        // ten twice, and is written twice.
        let events: Vec<Event> = (0..n)
            .map(|i| {
                let ts = if i % 2 == 0 { 1_000 + i } else { 1_000 - i } as i64;
                let user = &users[i % users.len()];
                testkit::event(&format!("e{i}"), user, EventType::View, "p-1", ts)
            })
            .collect();
        let mut stored: Vec<StoredEvent> = events.iter().map(StoredEvent::of).collect();
        stored.extend(events[..10].iter().map(StoredEvent::of));
        let batch = WriteBatch {
            events: stored,
            ..Default::default()
        };
        store.write(batch.clone()).await.unwrap();
        store.write(batch).await.unwrap();
        let mut read_back = 0;
        for user in &users {
            let mut expected: Vec<&Event> = events.iter().filter(|e| &e.user_id == user).collect();
            expected.sort_by(|a, b| (b.ts, &b.event_id).cmp(&(a.ts, &a.event_id)));
            let read = store.user_events(user, n).await.unwrap();
            assert_eq!(
                read.iter().collect::<Vec<_>>(),
                expected,
                "{user}, newest first"
            );
            read_back += read.len();
        }
        assert_eq!(read_back, n, "each event once");

        // States: every user at version 2, then half of them at an older version and half
        // at a newer one, each batch in reverse key order.
        let many: Vec<String> = (0..n).map(|u| format!("s{u:03}")).collect();
        let states = |version: &dyn Fn(usize) -> u64| WriteBatch {
            user_states: (0..n)
                .rev()
                .map(|i| {
                    StoredUserState::of(
                        &testkit::state(&many[i], version(i)),
                        StateEncoding::Binary,
                    )
                })
                .collect(),
            ..Default::default()
        };
        store.write(states(&|_| 2)).await.unwrap();
        store
            .write(states(&|i| if i % 2 == 0 { 1 } else { 3 }))
            .await
            .unwrap();
        for (i, user) in many.iter().enumerate() {
            let newest = if i % 2 == 0 { 2 } else { 3 };
            assert_eq!(
                store.user_state(user).await.unwrap(),
                Some(testkit::state(user, newest)),
                "{user}"
            );
        }

        // Lists: of two with one key in a batch, the later replaces the earlier.
        let lists: Vec<RecommendationRecord> = (0..n)
            .map(|i| testkit::list(&users[i % users.len()], i as u64, &["p-1"]))
            .collect();
        let again = testkit::list(&users[0], 0, &["p-2"]);
        assert_eq!(again.recommendation_id, lists[0].recommendation_id);
        let mut batch: Vec<StoredList> = lists
            .iter()
            .rev()
            .map(|l| StoredList::of(l, ListEncoding::Binary))
            .collect();
        batch.push(StoredList::of(&again, ListEncoding::Binary));
        store
            .write(WriteBatch {
                recommendations: batch,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store
                .recommendation(&users[0], &again.recommendation_id)
                .await
                .unwrap(),
            Some(again)
        );
        for l in &lists[1..] {
            assert_eq!(
                store
                    .recommendation(&l.user_id, &l.recommendation_id)
                    .await
                    .unwrap()
                    .as_ref(),
                Some(l)
            );
        }
        for user in &users {
            let newest = lists
                .iter()
                .filter(|l| &l.user_id == user)
                .max_by_key(|l| l.user_version);
            assert_eq!(
                store.latest_recommendations(user).await.unwrap().as_ref(),
                newest
            );
        }
    }

    /// Rows of `events` and of the staged tables: (user, ts, event_id, body) in key
    /// order, and the staged ones' count.
    fn stored_events(path: &Path) -> (Vec<(String, i64, String, String)>, i64) {
        let c = Connection::open(path).unwrap();
        let rows = c
            .prepare(
                "SELECT user_id, ts, event_id, body FROM events ORDER BY user_id, ts, event_id",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let staged = EVENTS_STAGED_TABLES
            .iter()
            .map(|t| {
                c.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
            })
            .sum();
        (rows, staged)
    }

    /// Events wait in the staged tables until enough have come, then the fullest table's
    /// move into `events` in one write. Read before or after, each event comes once,
    /// newest first, as it was first stored (a copy delivered again, with another body,
    /// is not what is read), and a new handle on the file goes on counting the staged.
    #[tokio::test]
    async fn staged_events_move_in_bulk_and_read_once_each_as_first_stored() {
        use crate::events::EventType;
        use crate::testkit;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path)
            .unwrap()
            .moving_staged_events_at(5, 20);
        // A second user whose events are staged in another table than u's.
        let v = (0..)
            .map(|i| format!("v{i}"))
            .find(|v| staged_table(v) != staged_table("u"))
            .unwrap();
        let event = |id: &str, user: &str, ts: i64, product: &str| {
            testkit::event(id, user, EventType::View, product, ts)
        };
        async fn write(store: &SqliteStore, events: Vec<Event>) {
            let batch = WriteBatch {
                events: events.iter().map(StoredEvent::of).collect(),
                ..Default::default()
            };
            store.write(batch).await.unwrap()
        }
        let ids = |events: Vec<Event>| -> Vec<(String, String)> {
            events
                .into_iter()
                .map(|e| (e.event_id, e.product_id.unwrap_or_default()))
                .collect()
        };
        let pair = |id: &str, product: &str| (id.to_string(), product.to_string());
        let moved_ids = |rows: &[(String, i64, String, String)]| -> Vec<(String, String)> {
            rows.iter()
                .map(|(u, _, id, _)| (u.clone(), id.clone()))
                .collect()
        };
        let u = |id: &str| ("u".to_string(), id.to_string());

        // Four events, fewer than five: all staged.
        write(
            &store,
            vec![
                event("e2", "u", 20, "p-2"),
                event("e1", "u", 10, "p-1"),
                event("x1", &v, 15, "p-1"),
                event("e3", "u", 30, "p-3"),
            ],
        )
        .await;
        assert_eq!(stored_events(&path), (vec![], 4));
        let read = |limit: usize| store.user_events("u", limit);
        assert_eq!(
            ids(read(10).await.unwrap()),
            [pair("e3", "p-3"), pair("e2", "p-2"), pair("e1", "p-1")]
        );
        assert_eq!(
            ids(read(2).await.unwrap()),
            [pair("e3", "p-3"), pair("e2", "p-2")]
        );

        // e1 again (another body) and e4: six staged, so u's table, the fullest, moves
        // (e1 as first stored) and v's event stays.
        write(
            &store,
            vec![event("e1", "u", 10, "p-9"), event("e4", "u", 40, "p-4")],
        )
        .await;
        let (moved, staged) = stored_events(&path);
        assert_eq!(staged, 1);
        assert_eq!(moved_ids(&moved), [u("e1"), u("e2"), u("e3"), u("e4")]);
        let first = [
            pair("e4", "p-4"),
            pair("e3", "p-3"),
            pair("e2", "p-2"),
            pair("e1", "p-1"),
        ];
        assert_eq!(ids(read(10).await.unwrap()), first);
        assert_eq!(
            ids(store.user_events(&v, 10).await.unwrap()),
            [pair("x1", "p-1")]
        );

        // Copies of moved events staged beside a new, older one: each read finds every
        // event once whatever its limit.
        write(
            &store,
            vec![
                event("e2", "u", 20, "p-8"),
                event("e0", "u", 5, "p-0"),
                event("e1", "u", 10, "p-7"),
            ],
        )
        .await;
        assert_eq!(stored_events(&path).1, 4);
        let all: Vec<_> = first.iter().cloned().chain([pair("e0", "p-0")]).collect();
        for limit in 1..=6 {
            assert_eq!(
                ids(read(limit).await.unwrap()),
                all[..limit.min(5)],
                "limit {limit}"
            );
        }

        // Another handle counts the four staged: two more make six, and u's table moves.
        drop(store);
        let store = SqliteStore::open(&path)
            .unwrap()
            .moving_staged_events_at(5, 20);
        write(
            &store,
            vec![event("e5", "u", 50, "p-5"), event("x2", &v, 16, "p-2")],
        )
        .await;
        let (moved, staged) = stored_events(&path);
        assert_eq!(staged, 2, "v's two");
        assert_eq!(
            moved_ids(&moved),
            [u("e0"), u("e1"), u("e2"), u("e3"), u("e4"), u("e5")]
        );
        let e2 = moved.iter().find(|(_, _, id, _)| id == "e2").unwrap();
        assert!(e2.3.contains("p-2"), "e2 as first stored: {}", e2.3);
        let newest: Vec<_> = [pair("e5", "p-5")].into_iter().chain(all).collect();
        assert_eq!(ids(store.user_events("u", 10).await.unwrap()), newest);
        assert_eq!(
            ids(store.user_events(&v, 10).await.unwrap()),
            [pair("x2", "p-2"), pair("x1", "p-1")]
        );
    }

    /// Writes with a backlog append without moving until the bound; once the writer
    /// keeps up, each write and each upkeep moves one table while the max is passed,
    /// and every event is read at every step.
    #[tokio::test]
    async fn moves_wait_while_writes_have_a_backlog_then_go_a_table_a_write() {
        use crate::events::EventType;
        use crate::testkit;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path)
            .unwrap()
            .moving_staged_events_at(4, 12);
        // Four users, each staged in a table of its own.
        let mut users: Vec<String> = Vec::new();
        for i in 0.. {
            let user = format!("u{i}");
            if users.iter().all(|u| staged_table(u) != staged_table(&user)) {
                users.push(user);
            }
            if users.len() == 4 {
                break;
            }
        }
        let mut written: Vec<Vec<String>> = vec![Vec::new(); users.len()];
        // `counts[i]` more events of user i, in one write.
        let mut write = async |counts: [usize; 4], backlog: bool| {
            let mut events = Vec::new();
            for (i, &n) in counts.iter().enumerate() {
                for _ in 0..n {
                    let id = format!("{}-{}", users[i], written[i].len());
                    let ts = 1_000 + written[i].len() as i64;
                    events.push(testkit::event(&id, &users[i], EventType::View, "p-1", ts));
                    written[i].push(id);
                }
            }
            let batch = WriteBatch {
                events: events.iter().map(StoredEvent::of).collect(),
                backlog,
                ..Default::default()
            };
            store.write(batch).await.unwrap();
            written.clone()
        };
        let every_event_read = async |store: &SqliteStore, written: &[Vec<String>]| {
            for (user, ids) in users.iter().zip(written) {
                let read: Vec<String> = store
                    .user_events(user, 100)
                    .await
                    .unwrap()
                    .into_iter()
                    .rev()
                    .map(|e| e.event_id)
                    .collect();
                assert_eq!(&read, ids, "{user}'s events");
            }
        };
        let moved = |path: &Path| {
            let (rows, staged) = stored_events(path);
            (rows.len(), staged)
        };

        // A backlog: 8 staged, past the max of 4 but under the bound of 12, none moved.
        let w = write([2, 2, 2, 2], true).await;
        assert_eq!(moved(&path), (0, 8));
        every_event_read(&store, &w).await;
        // 14 staged passes the bound: the fullest table (user 0's, 6) moves, 8 stay.
        let w = write([4, 2, 0, 0], true).await;
        assert_eq!(moved(&path), (6, 8));
        every_event_read(&store, &w).await;
        // Upkeep: a table a call while 4 or more are staged (user 1's 4, then one of 2).
        assert!(store.upkeep().await.unwrap());
        assert_eq!(moved(&path), (10, 4));
        assert!(store.upkeep().await.unwrap());
        assert_eq!(moved(&path), (12, 2));
        assert!(
            !store.upkeep().await.unwrap(),
            "under the max: nothing to do"
        );
        assert_eq!(moved(&path), (12, 2));
        every_event_read(&store, &w).await;
        // A backlog again leaves 2 + 8 staged; a write without one then moves a single
        // table, the fullest (user 0's 5), though 6 stay staged.
        write([5, 3, 0, 0], true).await;
        assert_eq!(moved(&path), (12, 10));
        let w = write([0, 0, 0, 1], false).await;
        assert_eq!(moved(&path), (17, 6));
        every_event_read(&store, &w).await;
    }

    #[test]
    fn services_opening_a_new_file_at_the_same_moment_all_open_it() {
        // save-worker and query-api start together on one machine and open the same new
        // file: neither may fail with "database is locked".
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.db");
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                let opened: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            SqliteStore::open(&path).map(drop)
                        })
                    })
                    .collect();
                for o in opened {
                    if let Err(e) = o.join().unwrap() {
                        panic!("round {round}: {e}");
                    }
                }
            });
            assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
            let mode: String = Connection::open(&path)
                .unwrap()
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
    }

    #[tokio::test]
    async fn a_second_handle_sees_the_first_ones_writes_and_reopening_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/s.db");
        let writer = SqliteStore::open(&path).unwrap();
        let reader = SqliteStore::open(&path).unwrap();
        let e = crate::events::Event::from_json(
            br#"{"event_id":"e","user_id":"u","type":"view","product_id":"p","ts":1}"#,
        )
        .unwrap();
        writer
            .write(WriteBatch {
                events: vec![StoredEvent::of(&e)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(reader.user_events("u", 5).await.unwrap(), vec![e.clone()]);
        let page_size: i64 = reader.readers[0]
            .lock()
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page_size, PAGE_SIZE as i64, "a new file");
        drop((writer, reader));
        assert_eq!(
            SqliteStore::open(&path)
                .unwrap()
                .user_events("u", 5)
                .await
                .unwrap(),
            vec![e]
        );
    }

    #[tokio::test]
    async fn a_panic_inside_a_write_leaves_nothing_of_it_and_the_store_writing_and_reading() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let event = |id: &str| {
            crate::events::Event::from_json(
                format!(
                    r#"{{"event_id":"{id}","user_id":"u","type":"view","product_id":"p","ts":1}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        // A bug panics halfway through a write, holding the writer and a reader.
        let (writer, readers) = (store.writer.clone(), store.readers.clone());
        let e = event("half-written");
        let panicked = std::thread::spawn(move || {
            let _reader = readers[0].lock().unwrap();
            let mut c = writer.lock().unwrap();
            let tx = c.transaction().unwrap();
            tx.execute(
                "INSERT INTO events (user_id, ts, event_id, body) VALUES (?1, ?2, ?3, ?4)",
                params![e.user_id, e.ts, e.event_id, encode(&e)],
            )
            .unwrap();
            panic!("a bug in the middle of a write");
        })
        .join();
        assert!(panicked.is_err());
        assert!(store.writer.is_poisoned() && store.readers[0].is_poisoned());

        store
            .write(WriteBatch {
                events: vec![StoredEvent::of(&event("e2"))],
                ..Default::default()
            })
            .await
            .unwrap();
        // Every reader, the poisoned one among them, reads what was committed.
        for _ in 0..READERS {
            let ids: Vec<String> = store
                .user_events("u", 10)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event_id)
                .collect();
            assert_eq!(ids, ["e2"]);
        }
    }

    #[tokio::test]
    async fn a_version_3_database_keeps_its_lists_when_they_move_to_a_rowid_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let old = crate::testkit::list("u", 1, &["p-1", "p-2"]);
        {
            let c = file_at_version(&path, 3);
            c.execute(
                "INSERT INTO recommendations (user_id, recommendation_id, user_version, generated_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![old.user_id, old.recommendation_id, 1, old.generated_at, encode(&old)],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let table: String = store
            .writer
            .lock()
            .unwrap()
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'recommendations'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!table.contains("WITHOUT ROWID"), "{table}");
        assert_eq!(
            store
                .recommendation("u", &old.recommendation_id)
                .await
                .unwrap(),
            Some(old.clone())
        );
        // A newer list is the latest; the old one written again (a replay) stays one row.
        let new = crate::testkit::list("u", 2, &["p-3"]);
        store
            .write(WriteBatch {
                recommendations: vec![
                    StoredList::of(&old, ListEncoding::Json),
                    StoredList::of(&new, ListEncoding::Binary),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(store.latest_recommendations("u").await.unwrap(), Some(new));
        let rows: i64 = store
            .writer
            .lock()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM recommendations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2);
        drop(store);
        assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
        // Made with SQLite's default page size, it keeps it.
        assert_eq!(pragma(&path, "page_size"), 4096);
    }

    #[tokio::test]
    async fn a_version_4_database_keeps_its_events_when_they_move_to_a_rowid_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let event = |id: &str, ts: i64| {
            Event::from_json(
                format!(r#"{{"event_id":"{id}","user_id":"u","type":"view","product_id":"p","ts":{ts}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let (older, newer) = (event("e1", 10), event("e2", 20));
        {
            let c = file_at_version(&path, 4);
            for e in [&older, &newer] {
                c.execute(
                    "INSERT INTO events (user_id, event_id, ts, body) VALUES (?1, ?2, ?3, ?4)",
                    params![e.user_id, e.event_id, e.ts, encode(e)],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let schema: Vec<String> = store
            .writer
            .lock()
            .unwrap()
            .prepare("SELECT sql FROM sqlite_schema WHERE tbl_name = 'events' AND sql IS NOT NULL")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            schema.len(),
            1,
            "the old (user, ts) index is gone: {schema:?}"
        );
        assert!(!schema[0].contains("WITHOUT ROWID"), "{schema:?}");
        assert_eq!(
            store.user_events("u", 10).await.unwrap(),
            vec![newer.clone(), older.clone()]
        );
        // A replay of a moved event stays one row; a new one comes first.
        let newest = event("e3", 30);
        store
            .write(WriteBatch {
                events: vec![StoredEvent::of(&older), StoredEvent::of(&newest)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store.user_events("u", 10).await.unwrap(),
            vec![newest, newer, older]
        );
        drop(store);
        assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    }

    /// A stored list's body: its SQLite type, its length and its `body_encoding`.
    fn body_of(store: &SqliteStore, list: &RecommendationRecord) -> (String, usize, i64) {
        store
            .writer
            .lock()
            .unwrap()
            .query_row(
                "SELECT typeof(body), length(body), body_encoding FROM recommendations
                 WHERE user_id = ?1 AND recommendation_id = ?2",
                [&list.user_id, &list.recommendation_id],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize, r.get(2)?)),
            )
            .unwrap()
    }

    #[tokio::test]
    async fn a_version_7_database_names_each_users_latest_list_as_its_index_found_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let at = |user: &str, version: u64, generated_at: i64, id: &str| {
            let mut l = crate::testkit::list(user, version, &["p-1"]);
            (l.generated_at, l.recommendation_id) = (generated_at, id.into());
            l
        };
        // a: the newest version has two lists (two models), the later generated wins;
        // b: one list; c: two of one version and time, the later row wins.
        let lists = [
            at("a", 3, 30, "a-3-x"),
            at("a", 1, 90, "a-1"),
            at("a", 3, 31, "a-3-y"),
            at("a", 2, 50, "a-2"),
            at("b", 7, 5, "b-7"),
            at("c", 4, 8, "c-4-x"),
            at("c", 4, 8, "c-4-y"),
        ];
        {
            let c = file_at_version(&path, 7);
            for l in &lists {
                c.execute(
                    "INSERT INTO recommendations (user_id, recommendation_id, user_version, generated_at, body)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![l.user_id, l.recommendation_id, l.user_version as i64, l.generated_at, encode(l)],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let latest = |user: &'static str| {
            let store = &store;
            async move { store.latest_recommendations(user).await.unwrap() }
        };
        assert_eq!(latest("a").await, Some(lists[2].clone()));
        assert_eq!(latest("b").await, Some(lists[4].clone()));
        assert_eq!(latest("c").await, Some(lists[6].clone()));
        assert_eq!(latest("d").await, None);
        assert_eq!(
            store.users_with_lists(10).await.unwrap(),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        let index: i64 = store
            .writer
            .lock()
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'recommendations_latest'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 0, "the per-list index is gone");
        // Written after: an older list (a replay) leaves a's latest, a newer one of b
        // takes its place, of two new ones in one batch the newer wins, and of two alike
        // the later.
        let newer_b = at("b", 8, 1, "b-8");
        let (c5, c6) = (at("c", 5, 1, "c-5"), at("c", 6, 1, "c-6"));
        let (d_first, d_later) = (at("d", 1, 1, "d-z"), at("d", 1, 1, "d-a"));
        store
            .write(WriteBatch {
                recommendations: [&lists[1], &newer_b, &c6, &c5, &d_first, &d_later]
                    .into_iter()
                    .map(|l| StoredList::of(l, ListEncoding::Binary))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(latest("a").await, Some(lists[2].clone()));
        assert_eq!(latest("b").await, Some(newer_b));
        assert_eq!(latest("c").await, Some(c6));
        assert_eq!(latest("d").await, Some(d_later));
        drop(store);
        assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn json_lists_are_stored_packed_binary_ones_as_they_came_and_older_rows_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        // Rows of a version-6 file: a text one (from before version 6) and a packed one.
        let old = crate::testkit::list("u", 1, &["p-1", "p-2"]);
        let old_packed = crate::testkit::list("v", 1, &["p-3"]);
        let insert = "INSERT INTO recommendations (user_id, recommendation_id, user_version, generated_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)";
        let c = file_at_version(&path, 6);
        c.execute(
            insert,
            params![
                old.user_id,
                old.recommendation_id,
                1,
                old.generated_at,
                encode(&old)
            ],
        )
        .unwrap();
        let l = &old_packed;
        c.execute(
            insert,
            params![
                l.user_id,
                l.recommendation_id,
                1,
                l.generated_at,
                pack_list(&encode(l))
            ],
        )
        .unwrap();
        drop(c);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
        assert_eq!(body_of(&store, &old).0, "text", "nothing is rewritten");
        for l in [&old, &old_packed] {
            assert_eq!(
                store
                    .latest_recommendations(&l.user_id)
                    .await
                    .unwrap()
                    .as_ref(),
                Some(l)
            );
        }

        // A batch small enough to pack in line, and one packed on a thread of its own
        // beside its events, in either encoding: every list reads back as it was, in its
        // own row, JSON packed and the binary form as it came.
        let products: Vec<String> = (0..40).map(|i| format!("p-{i:05}")).collect();
        let products: Vec<&str> = products.iter().map(String::as_str).collect();
        for (version, encoding) in [(2, ListEncoding::Json), (3, ListEncoding::Binary)] {
            let small = vec![crate::testkit::list("u", version, &products)];
            let many: Vec<_> = (0..400)
                .map(|i| crate::testkit::list(&format!("user-{i}"), version, &products))
                .collect();
            let json_bytes: usize = many.iter().map(|l| encode(l).len()).sum();
            assert!(json_bytes > PACK_ON_A_THREAD_BYTES, "{json_bytes}");
            for lists in [&small, &many] {
                store
                    .write(WriteBatch {
                        events: vec![StoredEvent::from_json(
                            br#"{"event_id":"e","user_id":"u","type":"view","product_id":"p","ts":1}"#,
                        )
                        .unwrap()],
                        recommendations: lists.iter().map(|l| StoredList::of(l, encoding)).collect(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            assert_eq!(
                store.latest_recommendations("u").await.unwrap(),
                Some(small[0].clone())
            );
            for list in small.iter().chain(&many) {
                assert_eq!(
                    store
                        .recommendation(&list.user_id, &list.recommendation_id)
                        .await
                        .unwrap()
                        .as_ref(),
                    Some(list)
                );
                let (kind, stored, stored_encoding) = body_of(&store, list);
                let json = encode(list).len();
                assert_eq!(kind, "blob");
                assert!(
                    stored * 2 < json,
                    "{stored} bytes stored for {json} of JSON"
                );
                match encoding {
                    ListEncoding::Json => {
                        assert_eq!(stored_encoding, LIST_JSON);
                        assert!(
                            stored * 3 < json,
                            "{stored} bytes packed for {json} of JSON"
                        );
                    }
                    ListEncoding::Binary => {
                        assert_eq!(stored_encoding, LIST_BINARY);
                        assert_eq!(stored, crate::list_record::encode(list, encoding).len());
                    }
                }
            }
        }
        assert_eq!(
            store
                .recommendation("u", &old.recommendation_id)
                .await
                .unwrap(),
            Some(old)
        );
    }

    #[test]
    fn a_binary_older_than_the_file_refuses_it_and_leaves_it_as_it_was() {
        // How a version-5 binary meets a file with packed lists: it cannot read them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(file_at_version(&path, SCHEMA_VERSION as usize));
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = SqliteStore::open(&path).err().unwrap().to_string();
        let says = format!(
            "schema version {}, newer than this binary's {SCHEMA_VERSION}: upgrade recpipe",
            SCHEMA_VERSION + 1
        );
        assert!(err.contains(&says), "{err}");
        assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION + 1);
    }

    #[tokio::test]
    async fn a_damaged_user_state_is_reported_as_corrupt_naming_its_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let state = crate::events::UserVectorRecord {
            user_id: "u".into(),
            vector: vec![0.5],
            anchor_ts: 1,
            version: 1,
            recent_products: vec![],
            purchased: vec![],
            last_event: crate::events::LastEvent {
                event_id: "e".into(),
                event_type: crate::events::EventType::View,
                product_id: None,
                ts: 1,
            },
            source: crate::events::SourcePosition {
                partition: 0,
                offset: 0,
            },
            updated_at: 1,
            embeddings: None,
            recent_event_ids: vec![],
            folded_events: vec![],
        };
        let binary =
            crate::state_record::encode(&state, crate::state_record::StateEncoding::Binary);
        store
            .write(WriteBatch {
                user_states: vec![super::super::StoredUserState::of(
                    &state,
                    crate::state_record::StateEncoding::Binary,
                )],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(store.user_state("u").await.unwrap(), Some(state));
        let damaged: [(&str, rusqlite::types::Value); 3] = [
            ("binary form", binary[..binary.len() - 1].to_vec().into()),
            ("version 7", [&[0u8, 7][..], &binary[2..]].concat().into()),
            ("JSON", "{\"user_id\":".to_string().into()),
        ];
        for (says, body) in damaged {
            store
                .writer
                .lock()
                .unwrap()
                .execute("UPDATE user_state SET body = ?1", [&body])
                .unwrap();
            match store.user_state("u").await {
                Err(StoreError::Corrupt(e)) => assert!(e.contains(says), "{e}"),
                other => panic!("{body:?} read as {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_binary_list_is_reported_as_corrupt_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let list = crate::testkit::list("u", 1, &["p-1"]);
        store
            .write(WriteBatch {
                recommendations: vec![StoredList::of(&list, ListEncoding::Binary)],
                ..Default::default()
            })
            .await
            .unwrap();
        let binary = crate::list_record::encode(&list, ListEncoding::Binary);
        let blob = |b: &[u8]| rusqlite::types::Value::Blob(b.to_vec());
        let damaged = [
            (
                "binary form",
                blob(&binary[..binary.len() - 1]),
                LIST_BINARY,
            ),
            (
                "version 9",
                blob(&[&[0u8, 9][..], &binary[2..]].concat()),
                LIST_BINARY,
            ),
            (
                "not stored as a BLOB",
                "text".to_string().into(),
                LIST_BINARY,
            ),
            ("body_encoding 2", blob(&binary), 2),
        ];
        for (says, body, encoding) in damaged {
            store
                .writer
                .lock()
                .unwrap()
                .execute(
                    "UPDATE recommendations SET body = ?1, body_encoding = ?2",
                    params![body, encoding],
                )
                .unwrap();
            for read in [
                store.latest_recommendations("u").await,
                store.recommendation("u", &list.recommendation_id).await,
            ] {
                match read {
                    Err(StoreError::Corrupt(e)) => assert!(e.contains(says), "{says}: {e}"),
                    other => panic!("{says}: read as {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_packed_list_is_reported_as_such_and_nothing_huge_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let list = crate::testkit::list("u", 1, &["p-1"]);
        store
            .write(WriteBatch {
                recommendations: vec![StoredList::of(&list, ListEncoding::Json)],
                ..Default::default()
            })
            .await
            .unwrap();
        let packed = pack_list(&encode(&list));
        let mut wrong_length = packed.clone();
        wrong_length[0] = wrong_length[0].wrapping_add(1);
        let damaged: [(&str, Vec<u8>); 4] = [
            ("no length", vec![1, 2]),
            (
                "a length of 4294967295 bytes",
                [&[0xff; 4][..], &packed[4..]].concat(),
            ),
            ("", wrong_length),
            ("", [&packed[..4], &[0xff; 8][..]].concat()),
        ];
        for (says, body) in damaged {
            store
                .writer
                .lock()
                .unwrap()
                .execute("UPDATE recommendations SET body = ?1", [&body])
                .unwrap();
            for read in [
                store.latest_recommendations("u").await,
                store.recommendation("u", &list.recommendation_id).await,
            ] {
                match read {
                    Err(StoreError::Corrupt(e)) => {
                        assert!(e.starts_with("a packed list: ") && e.contains(says), "{e}")
                    }
                    other => panic!("{body:?} read as {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_migration_applies_only_at_its_version_and_wholly_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let c = file_at_version(&path, 2);
        // Another process got there first: the file is past this migration.
        migrate(&c, 1, "SELECT no_such_function()").unwrap();
        assert_eq!(pragma(&path, "user_version"), 2);
        // A migration that fails half-way leaves nothing of itself.
        let err = migrate(&c, 2, "CREATE TABLE half (x); SELECT no_such_function()");
        assert!(err.is_err());
        assert_eq!(pragma(&path, "user_version"), 2);
        let tables: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'half'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
        migrate(&c, 2, MIGRATIONS[2]).unwrap();
        assert_eq!(pragma(&path, "user_version"), 3);
    }

    #[tokio::test]
    async fn unknown_urls_say_what_is_supported() {
        let err = crate::store::open("postgres://x")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sqlite://"), "{err}");
    }
}
