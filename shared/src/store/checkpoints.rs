//! Checkpoints of the embedded store's WAL, on a thread of their own.
//!
//! With SQLite's automatic checkpoint the writer checkpointed inside the commit that
//! filled the WAL: it copied the WAL into the database and made two fsyncs, 0.5-1 s in
//! which save-worker stored nothing (two fsyncs of 0.50 s and 0.16 s in a relay of
//! 200,000 events, the two cores mostly idle meanwhile). Here a commit that leaves the WAL
//! long wakes a thread that checkpoints passively on a connection of its own while the
//! writer goes on appending. The writer then checkpoints the few pages it appended
//! meanwhile, so that its next transaction starts the WAL over: SQLite does that only
//! once all of the WAL is in the database.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use rusqlite::Connection;

/// When the WAL is checkpointed, in WAL pages (tests use small ones).
#[derive(Clone, Copy, Debug)]
pub(super) struct Tuning {
    /// A commit leaving this many pages in the WAL wakes the checkpoint thread.
    pub background_pages: usize,
    /// A commit leaving this many waits for the thread's checkpoint to end and
    /// checkpoints the rest itself: the bound on the WAL should the thread fall behind
    /// (a slow disk).
    pub wait_pages: usize,
}

std::thread_local! {
    /// The WAL's length in pages after the last commit on this thread, from SQLite's WAL
    /// hook: a plain function, which cannot reach the store.
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Registered on the writer's connection in place of SQLite's automatic checkpoint
/// (which is a WAL hook too).
pub(super) fn note_wal_pages(
    _: &rusqlite::hooks::Wal,
    pages: std::os::raw::c_int,
) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// The thread was woken with `woken_at` pages in the WAL.
    Running {
        woken_at: usize,
    },
    /// The thread's checkpoint has ended; the writer checkpoints what came after it.
    Done {
        woken_at: usize,
    },
    /// The thread has ended (a panic in SQLite or below): the writer checkpoints in its
    /// own commits from then on, as SQLite's automatic checkpoint would, rather than wait
    /// for a thread that will never say it is done.
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    WakeTheThread,
    Checkpoint,
    WaitForTheThreadThenCheckpoint,
}

/// What the writer does after a commit that left `pages` in the WAL, and the phase after.
fn next_step(phase: Phase, pages: usize, tuning: Tuning) -> (Phase, Step) {
    match phase {
        Phase::Gone if pages >= tuning.background_pages.min(tuning.wait_pages) => {
            (Phase::Gone, Step::Checkpoint)
        }
        Phase::Gone => (Phase::Gone, Step::Nothing),
        Phase::Running { .. } if pages >= tuning.wait_pages => {
            (Phase::Idle, Step::WaitForTheThreadThenCheckpoint)
        }
        _ if pages >= tuning.wait_pages => (Phase::Idle, Step::Checkpoint),
        Phase::Idle if pages >= tuning.background_pages => {
            (Phase::Running { woken_at: pages }, Step::WakeTheThread)
        }
        // After the thread: the pages appended since its checkpoint, unless the WAL has
        // started over (fewer pages than when the thread was woken).
        Phase::Done { woken_at } if pages >= woken_at => (Phase::Idle, Step::Checkpoint),
        Phase::Done { .. } => (Phase::Idle, Step::Nothing),
        Phase::Idle | Phase::Running { .. } => (phase, Step::Nothing),
    }
}

pub(super) struct Checkpoints {
    wake: SyncSender<()>,
    phase: Arc<(Mutex<Phase>, Condvar)>,
    tuning: Tuning,
    /// The WAL's length after the last commit, for tests.
    #[cfg(test)]
    pub last_wal_pages: std::sync::atomic::AtomicUsize,
}

impl Checkpoints {
    /// Starts the thread on `connection`, which it keeps until the returned value is
    /// dropped.
    pub(super) fn start(connection: Connection, tuning: Tuning) -> std::io::Result<Checkpoints> {
        Self::start_with(connection, tuning, checkpoint)
    }

    /// [`Self::start`] with the thread's checkpoint given (tests make it panic).
    fn start_with(
        connection: Connection,
        tuning: Tuning,
        checkpoint: fn(&Connection) -> rusqlite::Result<()>,
    ) -> std::io::Result<Checkpoints> {
        let (wake, woken) = sync_channel::<()>(1);
        let phase = Arc::new((Mutex::new(Phase::Idle), Condvar::new()));
        let ended = phase.clone();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_string())
            .spawn(move || {
                // Says the thread is gone however it ends, unwinding included.
                let _gone = Gone(ended.clone());
                while woken.recv().is_ok() {
                    if let Err(e) = checkpoint(&connection) {
                        tracing::warn!(error = %e, "checkpointing the database's WAL failed; a later commit tries again");
                    }
                    let (phase, changed) = &*ended;
                    let mut phase = phase.lock().unwrap_or_else(|p| p.into_inner());
                    if let Phase::Running { woken_at } = *phase {
                        *phase = Phase::Done { woken_at };
                    }
                    changed.notify_all();
                }
            })?;
        Ok(Checkpoints {
            wake,
            phase,
            tuning,
            #[cfg(test)]
            last_wal_pages: Default::default(),
        })
    }

    /// After each commit, on the writer's connection `c` and the thread that committed.
    pub(super) fn after_commit(&self, c: &Connection) -> rusqlite::Result<()> {
        let pages = WAL_PAGES.take().max(0) as usize;
        #[cfg(test)]
        self.last_wal_pages
            .store(pages, std::sync::atomic::Ordering::Relaxed);
        let (phase, changed) = &*self.phase;
        let mut phase = phase.lock().unwrap_or_else(|p| p.into_inner());
        let (next, step) = next_step(*phase, pages, self.tuning);
        if step == Step::WaitForTheThreadThenCheckpoint {
            // Unlocked while waiting, so that the thread can say it is done (or gone).
            while matches!(*phase, Phase::Running { .. }) {
                phase = changed.wait(phase).unwrap_or_else(|p| p.into_inner());
            }
        }
        if *phase != Phase::Gone {
            *phase = next;
        }
        drop(phase);
        match step {
            Step::Nothing => Ok(()),
            Step::WakeTheThread => {
                // Full only if the thread is still to take the last wake-up.
                let _ = self.wake.try_send(());
                Ok(())
            }
            Step::Checkpoint | Step::WaitForTheThreadThenCheckpoint => checkpoint(c),
        }
    }
}

/// Held by the checkpoint thread: marks it gone when it ends, so that a writer waiting
/// for it is woken and no later commit waits for it.
struct Gone(Arc<(Mutex<Phase>, Condvar)>);

impl Drop for Gone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the WAL checkpoint thread panicked; the store's writer checkpoints in its own commits from now on");
        }
        let (phase, changed) = &*self.0;
        *phase.lock().unwrap_or_else(|p| p.into_inner()) = Phase::Gone;
        changed.notify_all();
    }
}

/// A passive checkpoint: it copies what it can without waiting for readers or the
/// writer, as SQLite's automatic one does.
fn checkpoint(c: &Connection) -> rusqlite::Result<()> {
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

#[cfg(test)]
impl Checkpoints {
    fn phase(&self) -> Phase {
        *self.phase.0.lock().unwrap()
    }

    fn last_pages(&self) -> usize {
        self.last_wal_pages
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Store, StoredEvent, WriteBatch};

    /// Writes batch `n`: 300 events of its own, about 15 WAL pages with their index.
    async fn write_batch(store: &SqliteStore, n: usize) -> usize {
        let events = (0..300)
            .map(|i| {
                let e = crate::testkit::event(
                    &format!("batch-{n}-event-{i}"),
                    &format!("user-{i}"),
                    EventType::View,
                    &format!("product-{n}-{i}"),
                    (n * 1000 + i) as i64,
                );
                StoredEvent::of(&e)
            })
            .collect();
        store
            .write(WriteBatch {
                events,
                ..Default::default()
            })
            .await
            .unwrap();
        checkpoints(store).last_pages()
    }

    fn checkpoints(store: &SqliteStore) -> &Checkpoints {
        store.checkpoints().expect("started by the first write")
    }

    async fn events_stored(store: &SqliteStore) -> usize {
        let mut n = 0;
        for i in 0..300 {
            n += store
                .user_events(&format!("user-{i}"), 1000)
                .await
                .unwrap()
                .len();
        }
        n
    }

    const NEVER: usize = usize::MAX;

    /// Bounds that a test crosses by setting the WAL's length itself.
    const SMALL_BOUNDS: Tuning = Tuning {
        background_pages: 10,
        wait_pages: 40,
    };

    /// Opens (creating) a database file in `dir`, in WAL mode.
    fn open_wal(dir: &std::path::Path) -> Connection {
        let c = Connection::open(dir.join("s.db")).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c
    }

    #[test]
    fn the_writer_wakes_the_thread_once_finishes_after_it_and_waits_for_it_past_the_bound() {
        let tuning = Tuning {
            background_pages: 100,
            wait_pages: 400,
        };
        let step = |phase, pages| next_step(phase, pages, tuning);
        let running = Phase::Running { woken_at: 120 };
        let done = Phase::Done { woken_at: 120 };
        assert_eq!(step(Phase::Idle, 99), (Phase::Idle, Step::Nothing));
        assert_eq!(step(Phase::Idle, 120), (running, Step::WakeTheThread));
        // Woken once, however long the WAL grows meanwhile, up to the bound.
        assert_eq!(step(running, 399), (running, Step::Nothing));
        assert_eq!(
            step(running, 400),
            (Phase::Idle, Step::WaitForTheThreadThenCheckpoint)
        );
        assert_eq!(step(Phase::Idle, 400), (Phase::Idle, Step::Checkpoint));
        assert_eq!(step(done, 400), (Phase::Idle, Step::Checkpoint));
        // After the thread: what was appended meanwhile, unless the WAL started over.
        assert_eq!(step(done, 150), (Phase::Idle, Step::Checkpoint));
        assert_eq!(step(done, 120), (Phase::Idle, Step::Checkpoint));
        assert_eq!(step(done, 30), (Phase::Idle, Step::Nothing));
        assert_eq!(step(done, 119), (Phase::Idle, Step::Nothing));
        // Without the thread, the writer checkpoints from the background bound on.
        assert_eq!(step(Phase::Gone, 99), (Phase::Gone, Step::Nothing));
        assert_eq!(step(Phase::Gone, 100), (Phase::Gone, Step::Checkpoint));
        assert_eq!(step(Phase::Gone, 400), (Phase::Gone, Step::Checkpoint));
    }

    #[test]
    fn a_writer_past_the_bound_does_not_wait_for_a_thread_that_panicked() {
        fn panics(_: &Connection) -> rusqlite::Result<()> {
            panic!("a checkpoint that panics (this test's)")
        }
        let dir = tempfile::tempdir().unwrap();
        let open = || open_wal(dir.path());
        let tuning = SMALL_BOUNDS;
        let checkpoints = Arc::new(Checkpoints::start_with(open(), tuning, panics).unwrap());

        // A commit past the background bound wakes the thread, whose checkpoint panics.
        WAL_PAGES.set(10);
        checkpoints.after_commit(&open()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while checkpoints.phase() != Phase::Gone {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread that panicked still counts as {:?}",
                checkpoints.phase()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        // A commit past the wait bound checkpoints on the writer's connection instead of
        // waiting for the thread. On a thread of its own: were it to wait, it would wait
        // forever, and the test fails at the timeout instead.
        let (done, finished) = std::sync::mpsc::channel();
        let writer = {
            let (checkpoints, c) = (checkpoints.clone(), open());
            std::thread::spawn(move || {
                WAL_PAGES.set(40);
                let _ = done.send(checkpoints.after_commit(&c));
            })
        };
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the writer waited for a checkpoint thread that is gone")
            .unwrap();
        writer.join().unwrap();
        assert_eq!(checkpoints.phase(), Phase::Gone);
    }

    #[test]
    fn a_checkpoint_that_fails_on_the_thread_is_left_to_the_writer_and_the_thread_goes_on() {
        // A full disk or an I/O error, as SQLite reports them.
        static TRIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn fails(_: &Connection) -> rusqlite::Result<()> {
            TRIED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some("disk I/O error (this test's)".to_string()),
            ))
        }
        let dir = tempfile::tempdir().unwrap();
        let open = || open_wal(dir.path());
        let tuning = SMALL_BOUNDS;
        let checkpoints = Checkpoints::start_with(open(), tuning, fails).unwrap();
        let writer = open();
        let ended = |tried: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while TRIED.load(std::sync::atomic::Ordering::SeqCst) < tried
                || matches!(checkpoints.phase(), Phase::Running { .. })
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the thread's checkpoint never ended: {:?}",
                    checkpoints.phase()
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            checkpoints.phase()
        };

        // A long WAL wakes the thread; its checkpoint fails, and it says it is done, not
        // gone.
        WAL_PAGES.set(10);
        checkpoints.after_commit(&writer).unwrap();
        assert_eq!(ended(1), Phase::Done { woken_at: 10 });
        // The next commit checkpoints on the writer's connection, which works.
        WAL_PAGES.set(12);
        checkpoints.after_commit(&writer).unwrap();
        assert_eq!(checkpoints.phase(), Phase::Idle);
        // The thread is still there for the next long WAL.
        WAL_PAGES.set(11);
        checkpoints.after_commit(&writer).unwrap();
        assert_eq!(ended(2), Phase::Done { woken_at: 11 });
        assert_eq!(TRIED.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn without_checkpoints_the_wal_grows_with_every_batch() {
        // The control for the tests below: what they see is the checkpoints' doing.
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            background_pages: NEVER,
            wait_pages: NEVER,
        };
        let store = SqliteStore::open_tuned(&dir.path().join("s.db"), tuning).unwrap();
        let mut pages = vec![];
        for n in 0..4 {
            pages.push(write_batch(&store, n).await);
        }
        assert!(pages.windows(2).all(|w| w[1] >= w[0] + 8), "{pages:?}");
    }

    #[tokio::test]
    async fn a_long_wal_is_checkpointed_on_the_thread_and_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let tuning = Tuning {
            background_pages: 8,
            wait_pages: NEVER,
        };
        let store = SqliteStore::open_tuned(&path, tuning).unwrap();
        let database_bytes = || std::fs::metadata(&path).unwrap().len();
        let before = database_bytes();

        let first = write_batch(&store, 0).await;
        assert!(first >= 8, "{first} pages");
        // The writer went on without checkpointing: the thread's turn.
        assert_eq!(
            checkpoints(&store).phase(),
            Phase::Running { woken_at: first }
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while matches!(checkpoints(&store).phase(), Phase::Running { .. }) {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpoint never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(checkpoints(&store).phase(), Phase::Done { woken_at: first });
        assert!(
            database_bytes() > before + 4 * 8192,
            "the thread copied the WAL into the database: {before} -> {} bytes",
            database_bytes()
        );

        // All of the WAL is in the database, so the next batch starts it over, and the
        // one after wakes the thread again.
        let second = write_batch(&store, 1).await;
        assert!(second < first, "{first} then {second} pages");
        assert_eq!(checkpoints(&store).phase(), Phase::Idle);
        let third = write_batch(&store, 2).await;
        let phase = checkpoints(&store).phase();
        assert!(
            phase == Phase::Running { woken_at: third } || phase == Phase::Done { woken_at: third },
            "{phase:?}"
        );
        assert_eq!(events_stored(&store).await, 900);
    }

    #[tokio::test]
    async fn past_the_bound_the_writer_checkpoints_itself() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            background_pages: NEVER,
            wait_pages: 8,
        };
        let store = SqliteStore::open_tuned(&dir.path().join("s.db"), tuning).unwrap();
        let mut pages = vec![];
        for n in 0..4 {
            pages.push(write_batch(&store, n).await);
        }
        // Each batch found the WAL in the database and started it over: it holds that
        // batch's pages alone, as many as the same batch added to the control's WAL.
        let control = SqliteStore::open_tuned(
            &dir.path().join("control.db"),
            Tuning {
                background_pages: NEVER,
                wait_pages: NEVER,
            },
        )
        .unwrap();
        let mut control_pages = vec![];
        for n in 0..4 {
            control_pages.push(write_batch(&control, n).await);
        }
        let added: Vec<usize> = control_pages.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            pages[1..],
            added,
            "{pages:?}, the control's WAL {control_pages:?}"
        );
        assert_eq!(checkpoints(&store).phase(), Phase::Idle);
        assert_eq!(events_stored(&store).await, 1200);
    }
}
