//! What a save-worker window costs the embedded store as the store grows: batches shaped
//! like the `peak` run's 100 ms windows at 14,000 events/s (1,400 events of 10,000
//! Zipf-distributed users, and each user's latest state and list), written one after
//! another into a new SQLite file, with the time per event printed for each slice.
//! Single-threaded apart from the store's checkpoint thread; no broker, no other service.
//! Run: `cargo bench -p recpipe-shared --bench store_growth -- [EVENTS] [PER_BATCH] [DIR]`
//! (default 2,000,000 events, 1,400 a batch, in a temporary directory).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use recpipe_shared::events::{EventType, LastEvent, RecommendationRecord, ScoredProduct};
use recpipe_shared::list_record::ListEncoding;
use recpipe_shared::model::recommendation_id;
use recpipe_shared::state_record::StateEncoding;
use recpipe_shared::store::{StoredEvent, StoredList, StoredUserState, WriteBatch};

const USERS: usize = 10_000;
const SLICE: usize = 200_000;
const DIM: usize = 64;

/// splitmix64: deterministic, so two builds write the same batches.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Users drawn as the load tester draws them: Zipf with exponent 1 over `USERS` ranks.
struct Users(Vec<f64>);
impl Users {
    fn new() -> Users {
        let mut total = 0.0;
        Users(
            (1..=USERS)
                .map(|k| {
                    total += 1.0 / k as f64;
                    total
                })
                .collect(),
        )
    }
    fn draw(&self, rng: &mut Rng) -> usize {
        let x = rng.unit() * self.0[USERS - 1];
        self.0.partition_point(|&c| c < x).min(USERS - 1)
    }
}

fn product(rng: &mut Rng) -> String {
    format!("p-{:05}", rng.next() % 20_000)
}

fn batch(
    rng: &mut Rng,
    users: &Users,
    per_batch: usize,
    versions: &mut [u64],
    seq: &mut u64,
) -> WriteBatch {
    let mut latest: BTreeMap<usize, (u64, i64, String)> = BTreeMap::new();
    let mut events = Vec::with_capacity(per_batch);
    for _ in 0..per_batch {
        let u = users.draw(rng);
        *seq += 1;
        versions[u] += 1;
        let ts = 1_800_000_000_000 + *seq as i64 / 14;
        let id = format!("pipe-1796488415239-{seq}");
        let p = product(rng);
        events.push(StoredEvent::of(&recpipe_shared::events::Event {
            event_id: id.clone(),
            user_id: format!("user-{:05}", u + 1),
            event_type: EventType::View,
            product_id: Some(p),
            query: None,
            ts,
            recommendation_id: None,
        }));
        latest.insert(u, (versions[u], ts, id));
    }
    let mut user_states = Vec::with_capacity(latest.len());
    let mut recommendations = Vec::with_capacity(latest.len());
    for (u, (version, ts, id)) in latest {
        let user = format!("user-{:05}", u + 1);
        let mut state = recpipe_shared::testkit::state(&user, version);
        state.vector = (0..DIM).map(|i| (i as f32 * 0.01).sin()).collect();
        state.recent_products = (0..20).map(|_| product(rng)).collect();
        state.last_event = LastEvent {
            event_id: id.clone(),
            event_type: EventType::View,
            product_id: Some(product(rng)),
            ts,
        };
        user_states.push(StoredUserState::of(&state, StateEncoding::Binary));
        let list = RecommendationRecord {
            recommendation_id: recommendation_id(&user, version, "als-v1"),
            user_id: user,
            model_version: "als-v1".into(),
            fallback: None,
            items: (0..20)
                .map(|i| ScoredProduct {
                    product_id: product(rng),
                    score: 1.0 - i as f32 * 0.01,
                    because: None,
                })
                .collect(),
            user_version: version,
            source_event_id: Some(id),
            source_event_ts: Some(ts),
            generated_at: ts + 5,
            source: None,
            input_event_ids: Vec::new(),
        };
        recommendations.push(StoredList::of(&list, ListEncoding::Binary));
    }
    WriteBatch {
        events,
        user_states,
        recommendations,
        ..Default::default()
    }
}

fn bytes_of(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; the numbers are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let total: usize = args
        .first()
        .map_or(2_000_000, |a| a.parse().expect("EVENTS: a number"));
    let per_batch: usize = args
        .get(1)
        .map_or(1_400, |a| a.parse().expect("PER_BATCH: a number"));
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = args
        .get(2)
        .map_or(temp.path().to_path_buf(), std::path::PathBuf::from);
    std::fs::create_dir_all(&dir).expect("DIR can be made");
    let path = dir.join("store-growth.db");
    let store = recpipe_shared::store::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("the store opens");
    let (mut rng, users) = (Rng(7), Users::new());
    let (mut versions, mut seq) = (vec![0u64; USERS], 0u64);
    // The slowest write of a slice: a move of the staged events is one write.
    println!("events_stored\twrite_us_per_event\tcpu_us_per_event\twritten_kb_per_event\tstore_mb\tslowest_write_ms");
    let (mut written, mut in_slice, mut cpu_at) = (0usize, 0usize, cpu_secs());
    let mut wrote_at = bytes_written();
    let (mut slice_busy, mut slowest) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    while written < total {
        let b = Arc::new(batch(&mut rng, &users, per_batch, &mut versions, &mut seq));
        let started = Instant::now();
        store.write_shared(b).await.expect("the batch is written");
        let took = started.elapsed();
        slice_busy += took;
        slowest = slowest.max(took);
        written += per_batch;
        in_slice += per_batch;
        if in_slice >= SLICE || written >= total {
            let (cpu, wrote) = (cpu_secs(), bytes_written());
            println!(
                "{written}\t{:.2}\t{:.2}\t{:.1}\t{}\t{:.0}",
                slice_busy.as_secs_f64() * 1e6 / in_slice as f64,
                (cpu - cpu_at) * 1e6 / in_slice as f64,
                (wrote - wrote_at) as f64 / 1e3 / in_slice as f64,
                bytes_of(&dir) / 1_000_000,
                slowest.as_secs_f64() * 1e3
            );
            (in_slice, slice_busy, slowest) =
                (0, std::time::Duration::ZERO, std::time::Duration::ZERO);
            (cpu_at, wrote_at) = (cpu, wrote);
        }
    }
}

/// Bytes this process has written (`wchar`: the WAL's frames and the checkpoints' pages).
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// This process's CPU seconds (every thread: the checkpoints run on one of their own).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are the 14th and 15th fields; `fields` starts at the 3rd.
    (ticks(11) + ticks(12)) / 100.0
}
