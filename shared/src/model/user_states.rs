//! Where update-embeddings keeps its users' states: the most recently active ones in
//! memory (at most `state.hot_users` between batches), the rest spilled to a local
//! SQLite file, as Kafka Streams keeps a bounded cache in front of its RocksDB store.
//!
//! The file is a cache of the changelog (`user-vectors`), never the source of truth: it
//! is made anew when the service starts and refilled from the changelog whenever
//! partitions are assigned. So it needs no journal on disk and no fsync, and a crash
//! loses nothing that the changelog does not hold. Its name is removed as soon as it is open,
//! so that not even a SIGKILL leaves it behind on the disk.
//!
//! Memory and the file hold each state in a compact binary form ([`compact`]: postcard,
//! fields by position, floats as their 4 bytes, the history's ids front-coded): 0.3 of
//! the changelog JSON at a full history of sequential ids, 0.5 of UUIDs, and a tenth of
//! the decoded struct, whose 100 small strings of history are each an allocation. It is
//! decoded again on the user's next event; spilling writes the bytes as they are. The
//! same form, followed by the folded events, is the body of the changelog's binary
//! records ([`crate::state_record`], schemas/user-vector.binary.md), so its layout is
//! versioned there: a change to it is a new version of that form.
//!
//! Only the two ends of a batch touch the file: [`UserStates::load`] before anything
//! changes (a failure leaves the batch to be retried whole) and [`UserStates::spill`]
//! after (a failure keeps the states in memory and is tried again after the next batch).
//! In between, [`UserStates::get`] and [`UserStates::insert`] touch memory only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::store::unpoisoned;

use hashlink::LruCache;
use rusqlite::{params, Connection, OptionalExtension};

use crate::events::UserVectorRecord;
use crate::settings::StateSettings;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("user state file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("user state file: {0} (check that state.dir is writable and has space)")]
    Sqlite(#[from] rusqlite::Error),
    #[error("user state of {user:?} in the state file is unreadable: {source}")]
    Decode {
        user: String,
        source: postcard::Error,
    },
    #[error("unreadable changelog record: {0}")]
    Unreadable(crate::state_record::StateRecordError),
}

struct Hot {
    /// The state in its [`compact`] form.
    encoded: Box<[u8]>,
    partition: i32,
    version: u64,
    /// Newer than the file's copy (or not in the file): written when spilled.
    dirty: bool,
}

pub struct UserStates {
    hot: LruCache<String, Hot>,
    hot_users: usize,
    /// Where [`UserStates::insert`] encodes, kept between calls.
    scratch: Vec<u8>,
    /// Shared with a [`Restorer`] on the restore thread (the file has no name to open
    /// a second connection by); the processor does not touch it meanwhile.
    cold: Arc<Mutex<Connection>>,
}

// A rowid table: states of a kilobyte or more are what WITHOUT ROWID tables are bad at.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    version INTEGER NOT NULL,
    state BLOB NOT NULL
)";

/// A newer (or equal: later on the changelog) version replaces what the file has.
const UPSERT_NEWEST: &str = "INSERT INTO users (user_id, partition, version, state)
    VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (user_id) DO UPDATE SET
        partition = excluded.partition, version = excluded.version, state = excluded.state
    WHERE excluded.version >= users.version";

fn open_connection(path: &Path) -> Result<Connection, StateError> {
    let conn = Connection::open(path)?;
    // A cache of the changelog: nothing to make durable, so no fsync and the rollback
    // journal in memory (a failed spill or restore still rolls back cleanly). 16 KiB
    // pages hold several states of a full history (1–2 KB) where 4 KiB pages held one or
    // two. A 2 MiB page cache: a miss is a read from the OS's page cache, and 8 MiB
    // measured no faster (bench/memory.sh) while it counted against the process. No
    // other connection ever opens the file (its name is removed once it is open), so it
    // is locked once, not at each transaction with a read of its header to see whether
    // another changed it.
    conn.execute_batch(
        "PRAGMA page_size = 16384; PRAGMA journal_mode = MEMORY; PRAGMA synchronous = OFF;
         PRAGMA cache_size = -2048; PRAGMA locking_mode = EXCLUSIVE;",
    )?;
    Ok(conn)
}

impl UserStates {
    /// A new, empty state file in `settings.dir` (the system's temporary directory when
    /// unset).
    pub fn open(settings: &StateSettings) -> Result<Self, StateError> {
        let dir = settings.dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&dir).map_err(|source| StateError::File {
            path: dir.clone(),
            source,
        })?;
        let file = tempfile::Builder::new()
            .prefix("recpipe-user-states-")
            .suffix(".db")
            .tempfile_in(&dir)
            .map_err(|source| StateError::File {
                path: dir.clone(),
                source,
            })?
            .into_temp_path();
        let cold = open_connection(&file)?;
        cold.execute_batch(SCHEMA)?;
        // The open connection keeps the file; its name is no longer needed.
        file.close().map_err(|source| StateError::File {
            path: dir.clone(),
            source,
        })?;
        Ok(UserStates {
            hot: LruCache::new_unbounded(),
            hot_users: settings.hot_users.max(1),
            scratch: Vec::new(),
            cold: Arc::new(Mutex::new(cold)),
        })
    }

    /// Bytes of the states held in memory (their encoded form only).
    pub fn hot_bytes(&self) -> usize {
        self.hot.iter().map(|(_, h)| h.encoded.len()).sum()
    }

    /// Most users held in memory between batches (`state.hot_users`).
    pub fn hot_users(&self) -> usize {
        self.hot_users
    }

    /// Users held in memory now.
    pub fn hot_len(&self) -> usize {
        self.hot.len()
    }

    /// Users in the state file (spilled, or restored and not touched since).
    pub fn cold_len(&self) -> Result<usize, StateError> {
        let n: i64 =
            unpoisoned(&self.cold).query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
        Ok(n as usize)
    }

    /// Size of the state file.
    pub fn file_bytes(&self) -> Result<u64, StateError> {
        let cold = unpoisoned(&self.cold);
        let pages: i64 = cold.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let size: i64 = cold.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok((pages * size) as u64)
    }

    /// Brings these users' states into memory (those the file has), so that [`get`]
    /// finds them. Changes no state.
    ///
    /// Room is made first: states not in this batch are spilled until memory holds at
    /// most `hot_users` with the batch's users in it (or only the batch's users, when it
    /// has more). So memory stays near `hot_users` states whatever the batch size; loaded
    /// on top of a full memory, a batch of 20,000 new users held 30,000 states until the
    /// spill after it.
    ///
    /// [`get`]: UserStates::get
    pub fn load<'a>(&mut self, users: impl IntoIterator<Item = &'a str>) -> Result<(), StateError> {
        // The batch's users in memory become the most recent, so that room is made from
        // the others; the rest are to come in.
        let mut in_batch = 0usize;
        let mut missing: Vec<&str> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for user in users {
            if !seen.insert(user) {
                continue;
            }
            if self.hot.get(user).is_some() {
                in_batch += 1;
            } else {
                missing.push(user);
            }
        }
        let keep = self.hot_users.saturating_sub(missing.len()).max(in_batch);
        if self.hot.len() > keep {
            // Best effort, as the spill after a batch: a state file that cannot be written
            // (a full disk) costs memory, not the pipeline's progress.
            if let Err(e) = self.spill_lru(self.hot.len() - keep) {
                metrics::counter!("recpipe_user_state_spill_errors_total").increment(1);
                tracing::error!(error = %e, "no room made for a batch's users: the state file cannot be written; they are loaded beside the others");
            }
        }
        let cold = unpoisoned(&self.cold);
        // One read transaction for the batch, not one per user.
        let reading = cold.unchecked_transaction()?;
        let mut select = reading
            .prepare_cached("SELECT partition, version, state FROM users WHERE user_id = ?1")?;
        let mut loaded = 0u64;
        for user in missing {
            let Some(hot) = select
                .query_row([user], |r| {
                    Ok(Hot {
                        partition: r.get(0)?,
                        version: r.get::<_, i64>(1)? as u64,
                        encoded: r.get::<_, Vec<u8>>(2)?.into_boxed_slice(),
                        dirty: false,
                    })
                })
                .optional()?
            else {
                continue;
            };
            self.hot.insert(user.to_string(), hot);
            loaded += 1;
        }
        drop(select);
        reading.commit()?;
        if loaded > 0 {
            metrics::counter!("recpipe_user_states_loaded_total").increment(loaded);
        }
        Ok(())
    }

    /// The user's state if it is in memory (see [`UserStates::load`]). Every state
    /// held was decoded once before it was kept, so an error here means the memory or
    /// the file was damaged.
    pub fn get(&mut self, user: &str) -> Result<Option<UserVectorRecord>, StateError> {
        let Some(hot) = self.hot.get(user) else {
            return Ok(None);
        };
        compact::decode(&hot.encoded)
            .map(Some)
            .map_err(|source| StateError::Decode {
                user: user.to_string(),
                source,
            })
    }

    /// Keeps `state` as its user's newest, in memory until it is spilled.
    pub fn insert(&mut self, state: &UserVectorRecord) {
        let mut scratch = std::mem::take(&mut self.scratch);
        compact::encode_into(state, &mut scratch);
        self.insert_encoded(state, &scratch);
        self.scratch = scratch;
    }

    /// As [`UserStates::insert`], for a caller that has `state` in its [`compact`] form
    /// already: the binary `user-vectors` record starts with it
    /// ([`crate::state_record::encode_binary`]).
    pub fn insert_encoded(&mut self, state: &UserVectorRecord, encoded: &[u8]) {
        debug_assert_eq!(
            encoded,
            compact::encode(state),
            "not the state's compact form"
        );
        self.hot.insert(
            state.user_id.clone(),
            Hot {
                // A copy of exactly its length. A grown Vec's spare room would stay with
                // it: mimalloc shrinks a block in place when the new size is at least half,
                // so `into_boxed_slice` kept 2 KiB for a 1.3 KB state.
                encoded: Box::from(encoded),
                partition: state.source.partition,
                version: state.version,
                dirty: true,
            },
        );
    }

    /// Writes the least recently used states beyond `hot_users` to the file and drops
    /// them from memory. On an error nothing is dropped.
    pub fn spill(&mut self) -> Result<usize, StateError> {
        let excess = self.hot.len().saturating_sub(self.hot_users);
        if excess == 0 {
            return Ok(0);
        }
        // Spill a little more than the excess, so that the next batches' new users do
        // not each cost a transaction.
        self.spill_lru((excess + self.hot_users / 16).min(self.hot.len()))
    }

    /// Writes the `count` least recently used states to the file (those changed since it
    /// last had them) and drops them from memory. On an error nothing is dropped.
    fn spill_lru(&mut self, count: usize) -> Result<usize, StateError> {
        let mut cold = unpoisoned(&self.cold);
        let tx = cold.transaction()?;
        {
            let mut upsert = tx.prepare_cached(UPSERT_NEWEST)?;
            for (user, hot) in self.hot.iter().take(count) {
                if hot.dirty {
                    upsert.execute(params![
                        user,
                        hot.partition,
                        hot.version as i64,
                        &hot.encoded[..]
                    ])?;
                }
            }
        }
        tx.commit()?;
        for _ in 0..count {
            self.hot.remove_lru();
        }
        metrics::counter!("recpipe_user_states_spilled_total").increment(count as u64);
        Ok(count)
    }

    /// Forgets every user whose events live on these partitions (they were revoked, or
    /// are about to be restored from the changelog).
    pub fn forget_partitions(&mut self, partitions: &[i32]) -> Result<(), StateError> {
        let gone: Vec<String> = self
            .hot
            .iter()
            .filter(|(_, h)| partitions.contains(&h.partition))
            .map(|(u, _)| u.clone())
            .collect();
        for user in gone {
            self.hot.remove(&user);
        }
        let cold = unpoisoned(&self.cold);
        let mut delete = cold.prepare_cached("DELETE FROM users WHERE partition = ?1")?;
        for p in partitions {
            delete.execute([p])?;
        }
        Ok(())
    }

    /// A writer for restoring states into the file from another thread (the changelog
    /// is read on a blocking thread while this stays with the processor).
    pub fn restorer(&self) -> Result<Restorer, StateError> {
        unpoisoned(&self.cold).execute_batch("BEGIN")?;
        Ok(Restorer {
            conn: self.cold.clone(),
            written: 0,
            finished: false,
        })
    }
}

/// Writes changelog records into the state file in one transaction; the newest version
/// of each user wins.
pub struct Restorer {
    conn: Arc<Mutex<Connection>>,
    written: usize,
    finished: bool,
}

impl Drop for Restorer {
    /// A restore that failed part way leaves the file as it was before it.
    fn drop(&mut self) {
        if !self.finished {
            let _ = unpoisoned(&self.conn).execute_batch("ROLLBACK");
        }
    }
}

impl Restorer {
    /// Keeps one changelog record (a state in either encoding, as produced) unless the
    /// file has a newer version of its user. An unreadable record is
    /// [`StateError::Unreadable`]: the whole record is decoded here, so that what the
    /// file holds always decodes.
    pub fn put(&mut self, payload: &[u8]) -> Result<(), StateError> {
        let state = crate::state_record::decode(payload).map_err(StateError::Unreadable)?;
        unpoisoned(&self.conn)
            .prepare_cached(UPSERT_NEWEST)?
            .execute(params![
                state.user_id,
                state.source.partition,
                state.version as i64,
                compact::encode(&state)
            ])?;
        self.written += 1;
        Ok(())
    }

    /// Commits; returns the records written.
    pub fn finish(mut self) -> Result<usize, StateError> {
        unpoisoned(&self.conn).execute_batch("COMMIT")?;
        self.finished = true;
        Ok(self.written)
    }
}

/// The in-process form of a state: [`UserVectorRecord`]'s fields in a fixed order,
/// encoded with postcard (no field names, lengths and integers as varints, floats as
/// their 4 little-endian bytes, so a vector comes back bit for bit).
///
/// The history's ids are most of a state, so they are written compactly. Each id of a
/// list is written against the one before it (the length of the prefix they share, then
/// the rest: `user-7-e0059` after `user-7-e0058` costs 4 bytes); an id in UUID's
/// canonical form is written as its 16 bytes; the last event's id and product, which are
/// nearly always the newest of their lists, are written as "the same". At a full history
/// of 50 products and 50 event ids this takes a state from 1.8 KB to about 0.7 KB.
pub mod compact {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Serialize, Serializer};

    use crate::events::{EventType, LastEvent, SourcePosition, UserVectorRecord};

    /// One id of a list, as written.
    #[derive(Serialize, Deserialize)]
    enum Id<'a> {
        /// Shares its first `shared` bytes with the id before it; `rest` follows.
        Text { shared: u32, rest: &'a str },
        /// A UUID in its canonical form (lower-case, hyphenated): its 16 bytes.
        Uuid([u8; 16]),
    }

    fn canonical_uuid(id: &str) -> Option<[u8; 16]> {
        if id.len() != 36 {
            return None;
        }
        let uuid = uuid::Uuid::try_parse(id).ok()?;
        let mut text = [0u8; 36];
        // Only a form that prints back to the very same text may be written as bytes.
        (uuid.hyphenated().encode_lower(&mut text).as_bytes() == id.as_bytes())
            .then(|| *uuid.as_bytes())
    }

    fn shared_prefix(a: &str, b: &str) -> usize {
        let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
        // Cut on a character boundary, so that the rest is a string of its own.
        while !b.is_char_boundary(n) {
            n -= 1;
        }
        n
    }

    /// A list of ids, each written against the one before it.
    struct Ids<'a>(&'a [String]);

    impl Serialize for Ids<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
            let mut previous = "";
            for id in self.0 {
                match canonical_uuid(id) {
                    Some(bytes) => seq.serialize_element(&Id::Uuid(bytes))?,
                    None => {
                        let shared = shared_prefix(previous, id);
                        seq.serialize_element(&Id::Text {
                            shared: shared as u32,
                            rest: &id[shared..],
                        })?
                    }
                }
                previous = id;
            }
            seq.end()
        }
    }

    fn expand(ids: Vec<Id<'_>>) -> Result<Vec<String>, postcard::Error> {
        let mut out: Vec<String> = Vec::with_capacity(ids.len());
        for id in ids {
            let text = match id {
                Id::Uuid(bytes) => uuid::Uuid::from_bytes(bytes).hyphenated().to_string(),
                Id::Text { shared, rest } => {
                    let previous = out.last().map(String::as_str).unwrap_or("");
                    let prefix = previous
                        .get(..shared as usize)
                        .ok_or(postcard::Error::DeserializeBadEncoding)?;
                    let mut text = String::with_capacity(prefix.len() + rest.len());
                    text.push_str(prefix);
                    text.push_str(rest);
                    text
                }
            };
            out.push(text);
        }
        Ok(out)
    }

    /// An id that is nearly always the first of a list.
    #[derive(Serialize, Deserialize)]
    enum Newest<'a> {
        None,
        /// The same as the list's first.
        First,
        Other(&'a str),
    }

    impl<'a> Newest<'a> {
        fn of(id: Option<&'a str>, list: &[String]) -> Self {
            match id {
                None => Newest::None,
                Some(id) if list.first().map(String::as_str) == Some(id) => Newest::First,
                Some(id) => Newest::Other(id),
            }
        }

        fn expand(self, list: &[String]) -> Result<Option<String>, postcard::Error> {
            Ok(match self {
                Newest::None => None,
                Newest::First => Some(
                    list.first()
                        .ok_or(postcard::Error::DeserializeBadEncoding)?
                        .clone(),
                ),
                Newest::Other(id) => Some(id.to_string()),
            })
        }
    }

    /// Borrowed, for encoding without copying. The record's optional fields are written
    /// always (postcard has no names to tell an omitted field by).
    #[derive(Serialize)]
    struct Borrowed<'a> {
        user_id: &'a str,
        vector: &'a [f32],
        anchor_ts: i64,
        version: u64,
        recent_products: Ids<'a>,
        purchased: Ids<'a>,
        recent_event_ids: Ids<'a>,
        last_event_id: Newest<'a>,
        last_event_type: EventType,
        last_event_product: Newest<'a>,
        last_event_ts: i64,
        partition: i32,
        offset: i64,
        updated_at: i64,
        embeddings: Option<&'a str>,
    }

    /// The same fields in the same order, borrowing from the encoded bytes.
    #[derive(Deserialize)]
    struct Encoded<'a> {
        user_id: String,
        vector: Vec<f32>,
        anchor_ts: i64,
        version: u64,
        #[serde(borrow)]
        recent_products: Vec<Id<'a>>,
        #[serde(borrow)]
        purchased: Vec<Id<'a>>,
        #[serde(borrow)]
        recent_event_ids: Vec<Id<'a>>,
        #[serde(borrow)]
        last_event_id: Newest<'a>,
        last_event_type: EventType,
        #[serde(borrow)]
        last_event_product: Newest<'a>,
        last_event_ts: i64,
        partition: i32,
        offset: i64,
        updated_at: i64,
        embeddings: Option<String>,
    }

    pub fn encode(state: &UserVectorRecord) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(state, &mut out);
        out
    }

    /// Encodes `state` into `out`, which is cleared first (a buffer kept for reuse).
    pub fn encode_into(state: &UserVectorRecord, out: &mut Vec<u8>) {
        out.clear();
        append(state, out);
    }

    /// Writes `state` after what `out` holds.
    pub fn append(state: &UserVectorRecord, out: &mut Vec<u8>) {
        let buffer = std::mem::take(out);
        *out = postcard::to_extend(
            &Borrowed {
                user_id: &state.user_id,
                vector: &state.vector,
                anchor_ts: state.anchor_ts,
                version: state.version,
                recent_products: Ids(&state.recent_products),
                purchased: Ids(&state.purchased),
                recent_event_ids: Ids(&state.recent_event_ids),
                last_event_id: Newest::of(
                    Some(&state.last_event.event_id),
                    &state.recent_event_ids,
                ),
                last_event_type: state.last_event.event_type,
                last_event_product: Newest::of(
                    state.last_event.product_id.as_deref(),
                    &state.recent_products,
                ),
                last_event_ts: state.last_event.ts,
                partition: state.source.partition,
                offset: state.source.offset,
                updated_at: state.updated_at,
                embeddings: state.embeddings.as_deref(),
            },
            buffer,
        )
        // Serialising these types into a Vec has no failure case.
        .expect("a user state encodes");
    }

    pub fn decode(bytes: &[u8]) -> Result<UserVectorRecord, postcard::Error> {
        let (state, rest) = decode_prefix(bytes)?;
        if !rest.is_empty() {
            // Not a state this module wrote: it ends where a state ends.
            return Err(postcard::Error::DeserializeBadEncoding);
        }
        Ok(state)
    }

    /// One folded event as [`append_folded`] writes it.
    #[derive(Serialize, Deserialize)]
    struct Folded<'a> {
        event_id: &'a str,
        event_type: EventType,
        product_id: Option<&'a str>,
        ts: i64,
    }

    /// Writes the state's folded events after what `out` holds, which the in-process form
    /// leaves out: after [`append`], the body of the `user-vectors` record's binary form
    /// ([`crate::state_record`], schemas/user-vector.binary.md).
    pub fn append_folded(state: &UserVectorRecord, out: &mut Vec<u8>) {
        let folded: Vec<Folded> = state
            .folded_events
            .iter()
            .map(|e| Folded {
                event_id: &e.event_id,
                event_type: e.event_type,
                product_id: e.product_id.as_deref(),
                ts: e.ts,
            })
            .collect();
        let buffer = std::mem::take(out);
        *out = postcard::to_extend(&folded, buffer).expect("folded events encode");
    }

    /// Reads what [`append`] then [`append_folded`] wrote, and nothing after it.
    pub fn decode_with_folded(bytes: &[u8]) -> Result<UserVectorRecord, postcard::Error> {
        let (mut state, rest) = decode_prefix(bytes)?;
        let (folded, rest): (Vec<Folded>, _) = postcard::take_from_bytes(rest)?;
        if !rest.is_empty() {
            return Err(postcard::Error::DeserializeBadEncoding);
        }
        state.folded_events = folded
            .into_iter()
            .map(|e| LastEvent {
                event_id: e.event_id.to_string(),
                event_type: e.event_type,
                product_id: e.product_id.map(str::to_string),
                ts: e.ts,
            })
            .collect();
        Ok(state)
    }

    /// What checking a state yields: its key and version, and the index of its vector's
    /// first value that is not finite, if any.
    pub struct Checked {
        pub user_id: String,
        pub version: u64,
        pub first_not_finite: Option<usize>,
    }

    /// Checks what [`append`] then [`append_folded`] wrote, accepting exactly what
    /// [`decode_with_folded`] accepts, without building the state: its ids are checked
    /// against a buffer rather than each made a `String` (a hundred allocations at a full
    /// history). save-worker stores the record as it came and needs only the key and
    /// version.
    pub fn check_with_folded(bytes: &[u8]) -> Result<Checked, postcard::Error> {
        let (c, rest): (Checking, _) = postcard::take_from_bytes(bytes)?;
        let (_, rest): (Folding<Each<Folded>>, _) = postcard::take_from_bytes(rest)?;
        if !rest.is_empty() {
            return Err(postcard::Error::DeserializeBadEncoding);
        }
        let (recent_products, recent_event_ids) = (&c.recent_products.0, &c.recent_event_ids.0);
        let newest_ok = |newest: &Newest, list: &CheckedIds| match newest {
            Newest::None => true,
            Newest::First => list.count > 0,
            Newest::Other(_) => true,
        };
        let event_id_ok = !matches!(c.last_event_id, Newest::None)
            && newest_ok(&c.last_event_id, recent_event_ids);
        if !event_id_ok || !newest_ok(&c.last_event_product, recent_products) {
            return Err(postcard::Error::DeserializeBadEncoding);
        }
        Ok(Checked {
            user_id: c.user_id.to_string(),
            version: c.version,
            first_not_finite: c.vector.0.first_not_finite,
        })
    }

    /// [`Encoded`]'s fields, checked and not kept: the same fields in the same order,
    /// which `the_check_refuses_exactly_what_the_decoder_refuses` keeps in step.
    #[derive(Deserialize)]
    #[allow(dead_code)] // fields read only to check them
    struct Checking<'a> {
        user_id: &'a str,
        vector: Folding<CheckedFloats>,
        anchor_ts: i64,
        version: u64,
        recent_products: Folding<CheckedIds>,
        purchased: Folding<CheckedIds>,
        recent_event_ids: Folding<CheckedIds>,
        #[serde(borrow)]
        last_event_id: Newest<'a>,
        last_event_type: EventType,
        #[serde(borrow)]
        last_event_product: Newest<'a>,
        last_event_ts: i64,
        partition: i32,
        offset: i64,
        updated_at: i64,
        embeddings: Option<&'a str>,
    }

    /// A list read one element at a time into a running check, nothing kept.
    trait Fold<'de>: Default {
        type Item: Deserialize<'de>;
        fn take(&mut self, item: Self::Item) -> Result<(), &'static str>;
    }

    impl<'de, F: Fold<'de>> Deserialize<'de> for Folding<F> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor<F>(std::marker::PhantomData<F>);
            impl<'de, F: Fold<'de>> serde::de::Visitor<'de> for Visitor<F> {
                type Value = Folding<F>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a list")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Folding<F>, A::Error> {
                    let mut fold = F::default();
                    while let Some(item) = seq.next_element::<F::Item>()? {
                        fold.take(item).map_err(serde::de::Error::custom)?;
                    }
                    Ok(Folding(fold))
                }
            }
            d.deserialize_seq(Visitor(std::marker::PhantomData))
        }
    }

    struct Folding<F>(F);

    /// A vector's floats: where the first that is not finite is.
    #[derive(Default)]
    struct CheckedFloats {
        count: usize,
        first_not_finite: Option<usize>,
    }

    impl Fold<'_> for CheckedFloats {
        type Item = f32;
        fn take(&mut self, v: f32) -> Result<(), &'static str> {
            if !v.is_finite() && self.first_not_finite.is_none() {
                self.first_not_finite = Some(self.count);
            }
            self.count += 1;
            Ok(())
        }
    }

    /// A list of ids, each checked as [`expand`] would expand it, into one buffer.
    #[derive(Default)]
    struct CheckedIds {
        count: usize,
        /// The previous id, as expand() would have made it.
        previous: String,
    }

    impl<'de> Fold<'de> for CheckedIds {
        type Item = Id<'de>;
        fn take(&mut self, id: Id<'de>) -> Result<(), &'static str> {
            match id {
                Id::Uuid(bytes) => {
                    let mut text = [0u8; 36];
                    self.previous.clear();
                    self.previous.push_str(
                        uuid::Uuid::from_bytes(bytes)
                            .hyphenated()
                            .encode_lower(&mut text),
                    );
                }
                Id::Text { shared, rest } => {
                    if self.previous.get(..shared as usize).is_none() {
                        return Err("an id's shared prefix is not in the id before it");
                    }
                    self.previous.truncate(shared as usize);
                    self.previous.push_str(rest);
                }
            }
            self.count += 1;
            Ok(())
        }
    }

    /// A list whose elements are read and dropped.
    struct Each<T>(std::marker::PhantomData<T>);

    impl<T> Default for Each<T> {
        fn default() -> Self {
            Each(std::marker::PhantomData)
        }
    }

    impl<'de, T: Deserialize<'de>> Fold<'de> for Each<T> {
        type Item = T;
        fn take(&mut self, _: T) -> Result<(), &'static str> {
            Ok(())
        }
    }

    /// A state from the start of `bytes`, and the bytes after it.
    fn decode_prefix(bytes: &[u8]) -> Result<(UserVectorRecord, &[u8]), postcard::Error> {
        let (e, rest): (Encoded, _) = postcard::take_from_bytes(bytes)?;
        let recent_products = expand(e.recent_products)?;
        let recent_event_ids = expand(e.recent_event_ids)?;
        let event_id = e
            .last_event_id
            .expand(&recent_event_ids)?
            .ok_or(postcard::Error::DeserializeBadEncoding)?;
        let state = UserVectorRecord {
            user_id: e.user_id,
            vector: e.vector,
            anchor_ts: e.anchor_ts,
            version: e.version,
            purchased: expand(e.purchased)?,
            last_event: LastEvent {
                event_id,
                event_type: e.last_event_type,
                product_id: e.last_event_product.expand(&recent_products)?,
                ts: e.last_event_ts,
            },
            recent_products,
            source: SourcePosition {
                partition: e.partition,
                offset: e.offset,
            },
            updated_at: e.updated_at,
            embeddings: e.embeddings,
            recent_event_ids,
            folded_events: Vec::new(),
        };
        Ok((state, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventType, LastEvent, SourcePosition};

    fn state(user: &str, partition: i32, version: u64) -> UserVectorRecord {
        UserVectorRecord {
            user_id: user.into(),
            vector: vec![version as f32 * 0.1, -1.5, 1e-7],
            anchor_ts: 1_700_000_000_000,
            version,
            recent_products: vec!["p-00001".into(), "p-00002".into()],
            purchased: vec!["p-00002".into()],
            last_event: LastEvent {
                event_id: format!("{user}-e{version}"),
                event_type: EventType::Purchase,
                product_id: Some("p-00002".into()),
                ts: 1_700_000_000_000,
            },
            source: SourcePosition {
                partition,
                offset: version as i64,
            },
            updated_at: 5,
            embeddings: Some("abc".into()),
            recent_event_ids: vec![format!("{user}-e{version}")],
            folded_events: Vec::new(),
        }
    }

    fn states(hot_users: usize) -> (tempfile::TempDir, UserStates) {
        let dir = tempfile::tempdir().unwrap();
        let s = UserStates::open(&StateSettings {
            hot_users,
            dir: Some(dir.path().join("nested")),
            ..StateSettings::default()
        })
        .unwrap();
        (dir, s)
    }

    fn fetch(s: &mut UserStates, user: &str) -> Option<UserVectorRecord> {
        s.load([user]).unwrap();
        s.get(user).unwrap()
    }

    fn put(s: &mut UserStates, state: UserVectorRecord) {
        s.insert(&state);
    }

    fn in_memory(s: &mut UserStates, user: &str) -> bool {
        s.get(user).unwrap().is_some()
    }

    /// Ids as producers write them: any text, UUIDs in canonical and other forms, and
    /// sequences that share long prefixes.
    fn any_id() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            ".{0,40}",
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
            "[0-9a-f]{32}",
            "user-é[0-9]{1,2}-e[0-9]{1,4}",
        ]
    }

    proptest::proptest! {
        /// Any state comes back from its compact form exactly as it was: every field,
        /// the optional ones absent or present, floats bit for bit, ids of any form.
        #[test]
        fn the_compact_form_gives_back_the_state_it_was_made_from(
            user in "[a-zA-Z0-9_\\-\"é]{1,20}",
            vector in proptest::collection::vec(-1e30f32..1e30, 0..64),
            products in proptest::collection::vec("[a-z0-9\\-]{1,12}", 0..50),
            ids in proptest::collection::vec(any_id(), 0..50),
            other_id in any_id(),
            product in proptest::option::of("[a-z0-9\\-]{1,12}"),
            newest in (proptest::bool::ANY, proptest::bool::ANY),
            embeddings in proptest::option::of("[a-f0-9]{0,16}"),
            numbers in (proptest::num::i64::ANY, proptest::num::u64::ANY, proptest::num::i32::ANY, proptest::num::i64::ANY),
            kind in 0usize..5,
        ) {
            let (ts, version, partition, offset) = numbers;
            let (id_is_newest, product_is_newest) = newest;
            let event_id = match ids.first() {
                Some(first) if id_is_newest => first.clone(),
                _ => other_id,
            };
            let product_id = match products.first() {
                Some(first) if product_is_newest => Some(first.clone()),
                _ => product,
            };
            let state = UserVectorRecord {
                user_id: user,
                vector,
                anchor_ts: ts,
                version,
                recent_products: products.clone(),
                purchased: products.into_iter().rev().collect(),
                last_event: LastEvent {
                    event_id,
                    event_type: EventType::ALL[kind],
                    product_id,
                    ts: ts.wrapping_neg(),
                },
                source: SourcePosition { partition, offset },
                updated_at: offset.wrapping_add(1),
                embeddings,
                recent_event_ids: ids,
                folded_events: Vec::new(),
            };
            let encoded = compact::encode(&state);
            proptest::prop_assert_eq!(compact::decode(&encoded).unwrap(), state);
            // A damaged form is an error, not a wrong state.
            proptest::prop_assert!(compact::decode(&encoded[..encoded.len() - 1]).is_err());
            let mut longer = encoded.clone();
            longer.push(0);
            proptest::prop_assert!(compact::decode(&longer).is_err());
        }
    }

    /// A full history as the service keeps it: 50 products and 50 event ids.
    fn full_history(event_id: impl Fn(usize) -> String) -> UserVectorRecord {
        let mut s = state("user-0012345", 3, 60);
        s.vector = vec![0.5; 32];
        s.recent_products = (0..50)
            .map(|n| format!("p-{:05}", 59 - n * 7 % 60))
            .collect();
        s.recent_event_ids = (0..50).map(|n| event_id(59 - n)).collect();
        s.last_event.event_id = s.recent_event_ids[0].clone();
        s.last_event.product_id = Some(s.recent_products[0].clone());
        s
    }

    #[test]
    fn a_full_history_takes_far_less_than_its_text() {
        // Sequential ids share all but their last characters; UUIDs take their 16 bytes.
        let sequential = full_history(|n| format!("user-0012345-e{n:04}"));
        let uuids =
            full_history(|n| uuid::Uuid::from_u128(n as u128 * 0x9e37_79b9_7f4a_7c15).to_string());
        for (state, at_most) in [(&sequential, 700), (&uuids, 1_400)] {
            let text: usize = state
                .recent_products
                .iter()
                .chain(&state.recent_event_ids)
                .map(|id| id.len() + 1)
                .sum();
            let encoded = compact::encode(state);
            assert!(
                encoded.len() <= at_most,
                "{} bytes encoded, {text} bytes of ids as text",
                encoded.len()
            );
            assert_eq!(&compact::decode(&encoded).unwrap(), state);
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_state_in_memory_takes_a_block_of_about_its_encoded_length() {
        let (_dir, mut s) = states(16);
        let state =
            full_history(|n| uuid::Uuid::from_u128(n as u128 * 0x9e37_79b9_7f4a_7c15).to_string());
        s.insert(&state);
        let held = &s.hot.get(&state.user_id).unwrap().encoded;
        let len = compact::encode(&state).len();
        assert_eq!(held.len(), len);
        // SAFETY: `held` is a live allocation of the global allocator, which is mimalloc.
        let block = unsafe { crate::TEST_ALLOCATOR.usable_size(held.as_ptr()) };
        // mimalloc's size classes are an eighth apart; a grown buffer was 2 KiB.
        assert!(
            block <= len + len / 8,
            "{len} bytes held in a block of {block}"
        );
    }

    #[test]
    fn memory_holds_at_most_hot_users_and_spilled_states_come_back_equal() {
        let (_dir, mut s) = states(16);
        for u in 0..100 {
            put(&mut s, state(&format!("u{u}"), u % 4, 1));
            s.spill().unwrap();
            assert!(s.hot_len() <= 16, "{} in memory", s.hot_len());
        }
        assert_eq!(s.cold_len().unwrap() + s.hot_len(), 100);
        for u in 0..100 {
            let user = format!("u{u}");
            assert_eq!(fetch(&mut s, &user), Some(state(&user, u % 4, 1)));
        }
        assert_eq!(fetch(&mut s, "nobody"), None);
    }

    #[test]
    fn a_batch_of_new_users_makes_room_for_itself_and_keeps_its_own_users_in_memory() {
        let (_dir, mut s) = states(4);
        for u in ["a", "b", "c", "d"] {
            put(&mut s, state(u, 0, 1));
        }
        // a is in the batch, x and y are new: two of the others go to the file first.
        s.load(["x", "a", "y", "a"]).unwrap();
        assert_eq!(s.hot_len(), 2);
        assert!(
            in_memory(&mut s, "a"),
            "a user of the batch stays in memory"
        );
        put(&mut s, state("x", 0, 1));
        put(&mut s, state("y", 0, 1));
        assert_eq!(s.hot_len(), 4, "the batch fits in hot_users");
        // The states that made room are in the file, unchanged.
        for u in ["b", "c", "d"] {
            assert_eq!(fetch(&mut s, u), Some(state(u, 0, 1)));
        }
        // A batch of more users than hot_users spills every other state but none of its own.
        let (_dir, mut s) = states(2);
        for u in ["a", "b", "c"] {
            put(&mut s, state(u, 0, 1));
        }
        s.load(["a", "b", "n1", "n2", "n3"]).unwrap();
        assert_eq!(s.hot_len(), 2);
        assert!(in_memory(&mut s, "a") && in_memory(&mut s, "b"));
        assert_eq!(fetch(&mut s, "c"), Some(state("c", 0, 1)));
    }

    #[test]
    fn a_state_file_that_cannot_grow_costs_memory_not_the_batch() {
        let (_dir, mut s) = states(10);
        for u in 0..300 {
            put(&mut s, state(&format!("u{u}"), 0, 1));
        }
        // The file may not grow past its present pages: making room for the batch fails.
        {
            let cold = unpoisoned(&s.cold);
            let pages: i64 = cold
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap();
            let _: i64 = cold
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                    r.get(0)
                })
                .unwrap();
        }
        s.load(["new-1", "new-2"])
            .expect("the batch goes on with its users beside the others");
        assert_eq!(s.hot_len(), 300, "nothing dropped from memory");
        for u in 0..300 {
            let user = format!("u{u}");
            assert_eq!(s.get(&user).unwrap(), Some(state(&user, 0, 1)));
        }
    }

    #[test]
    fn the_least_recently_used_are_spilled_first_and_updates_after_a_spill_win() {
        let (_dir, mut s) = states(2);
        put(&mut s, state("a", 0, 1));
        put(&mut s, state("b", 0, 1));
        assert!(in_memory(&mut s, "a")); // a is now the most recent
        put(&mut s, state("c", 0, 1));
        s.spill().unwrap();
        assert!(!in_memory(&mut s, "b"), "b was the least recently used");
        assert!(in_memory(&mut s, "a") && in_memory(&mut s, "c"));
        // b comes back, changes, goes out again: the file keeps the change.
        s.load(["b"]).unwrap();
        put(&mut s, state("b", 0, 2));
        put(&mut s, state("d", 0, 1));
        put(&mut s, state("e", 0, 1));
        s.spill().unwrap();
        assert!(!in_memory(&mut s, "b"));
        assert_eq!(fetch(&mut s, "b").unwrap().version, 2);
    }

    #[test]
    fn forgetting_partitions_drops_their_users_from_memory_and_file() {
        let (_dir, mut s) = states(2);
        for (u, p) in [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 0)] {
            put(&mut s, state(u, p, 1));
        }
        s.spill().unwrap();
        s.forget_partitions(&[0]).unwrap();
        for u in ["a", "c", "e"] {
            assert_eq!(fetch(&mut s, u), None, "{u} is on partition 0");
        }
        for u in ["b", "d"] {
            assert!(fetch(&mut s, u).is_some(), "{u} is on partition 1");
        }
    }

    #[test]
    fn a_restore_keeps_the_newest_version_of_each_user_and_skips_unreadable_records() {
        let (_dir, mut s) = states(4);
        let mut r = s.restorer().unwrap();
        // A changelog written in either encoding, or in both after a change of
        // `state.encoding`.
        use crate::state_record::{encode, StateEncoding::*};
        for (u, v, encoding) in [
            ("a", 1, Json),
            ("a", 3, Binary),
            ("b", 2, Json),
            ("a", 2, Binary),
        ] {
            r.put(&encode(&state(u, 0, v), encoding)).unwrap();
        }
        assert!(matches!(
            r.put(b"{not json"),
            Err(StateError::Unreadable(_))
        ));
        let mut cut = encode(&state("c", 0, 9), Binary);
        cut.pop();
        assert!(matches!(r.put(&cut), Err(StateError::Unreadable(_))));
        assert_eq!(r.finish().unwrap(), 4);
        assert_eq!(fetch(&mut s, "a"), Some(state("a", 0, 3)));
        assert_eq!(fetch(&mut s, "b"), Some(state("b", 0, 2)));
        // A restore that fails part way (dropped unfinished) leaves nothing, and the next
        // one can start.
        let mut r = s.restorer().unwrap();
        r.put(&serde_json::to_vec(&state("c", 0, 1)).unwrap())
            .unwrap();
        drop(r);
        assert_eq!(fetch(&mut s, "c"), None);
        s.restorer().unwrap().finish().unwrap();
        // A spilled state older than the file's copy does not overwrite it.
        let (_d2, mut t) = states(1);
        let mut r = t.restorer().unwrap();
        r.put(&serde_json::to_vec(&state("a", 0, 5)).unwrap())
            .unwrap();
        r.finish().unwrap();
        put(&mut t, state("a", 0, 4));
        put(&mut t, state("z", 0, 1));
        t.spill().unwrap();
        assert_eq!(fetch(&mut t, "a").unwrap().version, 5);
    }

    #[test]
    fn the_file_leaves_no_name_behind_and_an_unwritable_dir_is_a_clear_error() {
        let (dir, mut s) = states(1);
        let nested = dir.path().join("nested");
        // Nothing to clean up after a crash, though the states still work.
        assert_eq!(std::fs::read_dir(&nested).unwrap().count(), 0);
        for u in ["a", "b", "c"] {
            put(&mut s, state(u, 0, 1));
        }
        s.spill().unwrap();
        assert_eq!(fetch(&mut s, "a"), Some(state("a", 0, 1)));
        assert_eq!(std::fs::read_dir(&nested).unwrap().count(), 0);
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        let err = UserStates::open(&StateSettings {
            hot_users: 1,
            dir: Some(blocker.join("sub")),
            ..StateSettings::default()
        })
        .err()
        .expect("a directory under a file cannot be made");
        assert!(err.to_string().contains("a-file"), "{err}");
    }
}
