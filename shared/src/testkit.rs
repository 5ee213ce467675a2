//! Test helpers: a real tansu broker per test (never a mock), and topic readers.
//!
//! The broker binary comes from `$TANSU_BIN`, else `<workspace>/.tools/bin/tansu`, which
//! `scripts/install-tansu.sh` installs (the test command runs it first).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::settings::KafkaSettings;

/// The tansu binary, or a panic that says how to install it.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/tansu");
    assert!(
        path.exists(),
        "the tansu broker is not installed at {}: run scripts/install-tansu.sh (or scripts/test.sh, which does it), or set TANSU_BIN",
        path.display()
    );
    path
}

/// How long a test may run, from its first broker's start, before [`watch_this_test`]
/// aborts it; `RECPIPE_TEST_WATCHDOG_SECS` overrides it (0 turns the watchdog off).
const TEST_LIMIT: Duration = Duration::from_secs(480);

/// The process ids of the brokers this process started and has not stopped. An abort runs
/// no destructor, so the watchdog kills these itself: otherwise every broker of the
/// aborted test binary went on running after it (seen after a watchdog abort).
static RUNNING_BROKERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn running_brokers() -> std::sync::MutexGuard<'static, Vec<u32>> {
    RUNNING_BROKERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

thread_local! {
    /// The watchdog of the test running on this thread, disarmed when the thread ends.
    static WATCHDOG: std::cell::OnceCell<std::sync::mpsc::Sender<()>> =
        const { std::cell::OnceCell::new() };
}

/// Makes a hung test fail. A test whose thread has not ended [`TEST_LIMIT`] after this
/// call prints every thread's stack (with gdb, where installed) and aborts the test
/// process: a hang costs minutes and says where it stands, rather than stalling CI until
/// its own timeout with nothing to show. Each test runs on its own thread, whose end
/// (after the test's runtime and services are dropped) disarms the watchdog.
pub fn watch_this_test() {
    let limit = match std::env::var("RECPIPE_TEST_WATCHDOG_SECS") {
        Ok(v) => Duration::from_secs(v.trim().parse().unwrap_or_else(|_| {
            panic!("RECPIPE_TEST_WATCHDOG_SECS={v:?} is not a whole number of seconds")
        })),
        Err(_) => TEST_LIMIT,
    };
    if limit.is_zero() {
        return;
    }
    WATCHDOG.with(|armed| {
        armed.get_or_init(|| {
            let test = std::thread::current()
                .name()
                .unwrap_or("a test")
                .to_string();
            let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
            let watch = move || {
                // Nothing is ever sent: the sender's drop at the thread's end disconnects.
                if disarmed.recv_timeout(limit) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    return;
                }
                abort_with_stacks(&test, limit);
            };
            std::thread::Builder::new()
                .name("test-watchdog".into())
                .spawn(watch)
                .expect("start the test watchdog");
            disarm
        });
    });
}

fn abort_with_stacks(test: &str, limit: Duration) -> ! {
    use std::io::Write;
    // Written to stderr directly: the test harness captures only print! and eprint!.
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\n{test} is still running after {} s: it hangs. Every thread's stack follows, then \
         the test process aborts (RECPIPE_TEST_WATCHDOG_SECS sets the limit, 0 turns it off).",
        limit.as_secs()
    );
    let _ = err.flush();
    let pid = std::process::id().to_string();
    // gdb writes straight to this process's stderr, and gets a minute: the abort must
    // come even if gdb itself cannot attach.
    let to_stderr = || {
        use std::os::fd::AsFd;
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    };
    match Command::new("gdb")
        .args(["-p", &pid, "-batch", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .stdout(to_stderr())
        .stderr(to_stderr())
        .spawn()
    {
        Ok(mut gdb) => {
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(gdb.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = gdb.kill();
        }
        Err(e) => {
            let _ = writeln!(err, "(no stacks: gdb did not run: {e})");
        }
    }
    for pid in running_brokers().iter() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdin(Stdio::null())
            .status();
    }
    let _ = err.flush();
    std::process::abort();
}

/// CPU time spent so far, user and system, in clock ticks (USER_HZ, 100 on every Linux
/// this runs on), from a `/proc` stat file: `/proc/self/stat` for the whole process
/// (every thread's, those ended included), `/proc/thread-self/stat` for this thread.
/// CPU rather than the clock, for measures the host's stolen time would move.
pub fn cpu_ticks(stat_file: &str) -> u64 {
    let stat = std::fs::read_to_string(stat_file)
        .unwrap_or_else(|e| panic!("cannot read {stat_file} (Linux only): {e}"));
    // The fields after the command's name, which is in parentheses: utime and stime are
    // the 12th and 13th of them (the stat file's 14th and 15th).
    let after = &stat[stat.rfind(')').expect("a command in parentheses") + 2..];
    after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|t| t.parse::<u64>().expect("a tick count"))
        .sum()
}

/// A free loopback port for a server a test starts (bound and released: the broker must
/// advertise its real port).
///
/// The port is free now but not held, so it comes from below the kernel's ephemeral
/// range where it can: `bind(0)` (another test's API listener) and outgoing connections
/// draw from that range and could take the port before the broker binds it. tansu then
/// exits and the test meets whatever holds the port. A process hands out the range's
/// ports in turn (none twice until it has gone round all 10,000), each process from its
/// own place in the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    let Some(range) = ports_below_ephemeral(&ephemeral_range_low()) else {
        return bound_port("127.0.0.1:0").expect("bind a loopback port");
    };
    let len = u32::from(range.end - range.start);
    let start = std::process::id().wrapping_mul(2_654_435_761) % len;
    for _ in 0..len {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = range.start + ((start + n) % len) as u16;
        if let Some(port) = bound_port(&format!("127.0.0.1:{port}")) {
            return port;
        }
    }
    bound_port("127.0.0.1:0").expect("bind a loopback port")
}

fn bound_port(address: &str) -> Option<u16> {
    Some(TcpListener::bind(address).ok()?.local_addr().ok()?.port())
}

/// The first port of the kernel's ephemeral range (Linux), as its file gives it.
fn ephemeral_range_low() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default()
}

/// Up to 10,000 ports just below the ephemeral range whose first port `range_file`
/// gives, none below 10,000; `None` when there is no such room (or no such file).
fn ports_below_ephemeral(range_file: &str) -> Option<std::ops::Range<u16>> {
    let low: u16 = range_file.split_whitespace().next()?.parse().ok()?;
    let start = low.saturating_sub(10_000).max(10_000);
    (low >= start + 1_000).then_some(start..low)
}

/// A tansu broker on 127.0.0.1 owned by one test; killed on drop.
pub struct TestBroker {
    child: Option<Child>,
    port: u16,
    /// Where clients are told to connect: `port`, or a proxy in front of it.
    advertised_port: u16,
    /// SASL/SCRAM required of every client.
    authentication: bool,
    storage: String,
    dir: tempfile::TempDir,
}

impl TestBroker {
    /// An in-memory broker.
    pub async fn start() -> TestBroker {
        Self::start_with("memory://tansu/".into()).await
    }

    /// A broker whose data survives [`TestBroker::kill`] and [`TestBroker::restart`].
    pub async fn start_durable() -> TestBroker {
        Self::start_with("sqlite://tansu.db".into()).await
    }

    async fn start_with(storage: String) -> TestBroker {
        watch_this_test();
        let port = free_port();
        let mut broker = TestBroker {
            child: None,
            port,
            advertised_port: port,
            authentication: false,
            storage,
            dir: tempfile::tempdir().unwrap(),
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap();
        let mut cmd = Command::new(tansu_binary());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            &self.storage,
        ])
        .current_dir(self.dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        if self.authentication {
            cmd.arg("--authentication");
        }
        // tansu reads these from the environment; every setting comes from flags instead.
        for var in [
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
        ] {
            cmd.env_remove(var);
        }
        // tansu prints this line once its listener is bound (0.6.0; a version that did
        // not would fail every test here with the log below). A port that answers
        // without a new one is held by something else, which tansu exits on.
        const READY: &str = "\nready in ";
        let ready_before = self.log().matches(READY).count();
        let child = cmd.spawn().expect("start tansu");
        running_brokers().push(child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log().matches(READY).count() > ready_before
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.as_mut().expect("just spawned").try_wait() {
                panic!(
                    "tansu exited ({status}) before it was ready on port {}; log: {}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tansu was not ready on port {} within 30 s; log: {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    /// Kafka settings pointing at this broker, with small batches for quick tests.
    pub fn kafka_settings(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.brokers(),
            delivery_timeout_ms: 20_000,
            // Several partitions, as a scaled-out deployment has (the local default is 1).
            partitions: 4,
            ..KafkaSettings::default()
        }
    }

    /// Creates the pipeline's topics.
    pub async fn create_topics(&self, settings: &KafkaSettings) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match crate::kafka::ensure_pipeline_topics(settings, settings.partitions).await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "topic creation not ready");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot create topics: {e}; log: {}", self.log()),
            }
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            running_brokers().retain(|&pid| pid != c.id());
        }
    }

    /// The port the broker listens on (which it may not advertise: see
    /// [`TestBroker::restart_secured`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Adds a SCRAM-SHA-512 user. tansu keeps users in its storage and checks them only
    /// when started with authentication, so call this before [`TestBroker::restart_secured`]
    /// on a durable broker.
    pub fn create_user(&self, name: &str, password: &str) {
        let out = Command::new(tansu_binary())
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--mechanism",
                "scram512",
                name,
                password,
            ])
            .current_dir(self.dir.path())
            .output()
            .expect("run tansu user create");
        assert!(
            out.status.success(),
            "tansu user create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Restarts the broker requiring SASL/SCRAM, advertising `advertised_port` (e.g. a
    /// TLS proxy in front of it) to clients.
    pub async fn restart_secured(&mut self, advertised_port: u16) {
        self.restart_advertising(advertised_port, true).await;
    }

    /// Restarts the broker advertising `advertised_port`, with or without authentication.
    pub async fn restart_advertising(&mut self, advertised_port: u16, authentication: bool) {
        self.authentication = authentication;
        self.advertised_port = advertised_port;
        self.restart().await;
    }

    /// Starts the broker again on the same port and storage.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Produces one record and waits for its acknowledgement.
pub async fn produce(brokers: &str, topic: &str, key: &str, payload: &[u8]) {
    send(&test_producer(brokers), topic, key, payload).await;
}

/// A producer that partitions by key as the project's own producers do.
fn test_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap()
}

/// Sends one record and waits for its acknowledgement.
async fn send(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(20),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

/// Reads every partition of `topic` from the start until `at_least` records arrived (or
/// `timeout` passed, returning what came).
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    at_least: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let settings = KafkaSettings {
        brokers: brokers.to_string(),
        ..KafkaSettings::default()
    };
    read_topic_with(&settings, topic, at_least, timeout).await
}

/// Reads `topic` from the beginning of every partition until `enough` says the records
/// read so far are, or `timeout` passes; returns what was read.
pub async fn read_topic_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    enough: impl Fn(&[OwnedMessage]) -> bool + Send + 'static,
) -> Vec<OwnedMessage> {
    let settings = KafkaSettings {
        brokers: brokers.to_string(),
        ..KafkaSettings::default()
    };
    read_topic_until_with(&settings, topic, timeout, enough).await
}

/// As [`read_topic`], connecting as `settings` say (e.g. with SASL and TLS).
pub async fn read_topic_with(
    settings: &KafkaSettings,
    topic: &str,
    at_least: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    read_topic_until_with(settings, topic, timeout, move |out| out.len() >= at_least).await
}

async fn read_topic_until_with(
    settings: &KafkaSettings,
    topic: &str,
    timeout: Duration,
    enough: impl Fn(&[OwnedMessage]) -> bool + Send + 'static,
) -> Vec<OwnedMessage> {
    let mut config = crate::kafka::consumer_config(settings);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .set("group.id", "recpipe-testkit-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !enough(&out) && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.detach());
            }
        }
        out
    })
    .await
    .unwrap()
}

/// The value of header `name` on `m`, as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// A broker with the pipeline's topics, a generated catalog and a store location, all
/// private to one test.
pub struct TestEnv {
    pub broker: TestBroker,
    pub dir: tempfile::TempDir,
    pub settings: crate::settings::Settings,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        Self::with_broker(TestBroker::start().await).await
    }

    pub async fn with_broker(broker: TestBroker) -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::settings::Settings {
            kafka: broker.kafka_settings(),
            ..Default::default()
        };
        settings.catalog.dir = dir.path().join("catalog");
        settings.store.url = format!("sqlite://{}", dir.path().join("recpipe.db").display());
        settings.model.popularity_publish_ms = 100;
        settings.api.port = 0;
        // Fewer hot users than most tests have users: the state file is always in use.
        settings.state.hot_users = 8;
        settings.state.dir = Some(dir.path().join("state"));
        write_catalog(&settings.catalog.dir, 1_000, 16);
        broker.create_topics(&settings.kafka).await;
        TestEnv {
            broker,
            dir,
            settings,
        }
    }

    pub fn catalog(&self) -> crate::catalog::Catalog {
        crate::catalog::Catalog::load(&self.settings.catalog.dir).unwrap()
    }

    /// Produces `events` to the events topic, keyed by user, one acknowledged at a time.
    pub async fn send_events(&self, events: &[crate::events::Event]) {
        self.send_events_paced(events, Duration::ZERO).await;
    }

    /// As [`Self::send_events`], waiting `gap` after each event: a stream rather than a
    /// burst.
    pub async fn send_events_paced(&self, events: &[crate::events::Event], gap: Duration) {
        // One producer for the lot, each record acknowledged before the next is sent: the
        // order stays the order given, without a new connection per event (about 0.1 s).
        let producer = test_producer(&self.broker.brokers());
        for e in events {
            send(
                &producer,
                &self.settings.kafka.topics.events,
                &e.user_id,
                &serde_json::to_vec(e).unwrap(),
            )
            .await;
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
    }
}

/// Writes a generated catalog of `products` × `dim` to `dir`.
pub fn write_catalog(dir: &std::path::Path, products: usize, dim: usize) {
    crate::catalog::generate(crate::catalog::SyntheticCatalog {
        products,
        dim,
        ..Default::default()
    })
    .save(dir)
    .unwrap();
}

/// An event with a product, as JSON-ready struct.
pub fn event(
    id: &str,
    user: &str,
    t: crate::events::EventType,
    product: &str,
    ts: i64,
) -> crate::events::Event {
    crate::events::Event {
        event_id: id.into(),
        user_id: user.into(),
        event_type: t,
        product_id: Some(product.into()),
        query: None,
        ts,
        recommendation_id: None,
    }
}

/// A list of `products` for `user` at `version` (id `{user}-v{version}`, model
/// `synthetic-v1`), as gen-recommendations would produce it.
pub fn list(user: &str, version: u64, products: &[&str]) -> crate::events::RecommendationRecord {
    crate::events::RecommendationRecord {
        recommendation_id: format!("{user}-v{version}"),
        user_id: user.into(),
        model_version: "synthetic-v1".into(),
        fallback: None,
        items: products
            .iter()
            .map(|p| crate::events::ScoredProduct {
                product_id: p.to_string(),
                score: 0.5,
                because: None,
            })
            .collect(),
        user_version: version,
        source_event_id: Some(format!("{user}-e{version}")),
        source_event_ts: Some(1_700_000_000_000),
        generated_at: 1_700_000_000_000 + version as i64,
        source: None,
        input_event_ids: Vec::new(),
    }
}

/// A user's state at `version` with the fewest fields set (a one-value vector, no
/// products, its last event `{user}-{version}`), as update-embeddings would produce it.
pub fn state(user: &str, version: u64) -> crate::events::UserVectorRecord {
    use crate::events::{EventType, LastEvent, SourcePosition, UserVectorRecord};
    UserVectorRecord {
        user_id: user.into(),
        vector: vec![version as f32],
        anchor_ts: 0,
        version,
        recent_products: Vec::new(),
        purchased: Vec::new(),
        last_event: LastEvent {
            event_id: format!("{user}-{version}"),
            event_type: EventType::View,
            product_id: None,
            ts: 0,
        },
        source: SourcePosition {
            partition: 0,
            offset: version as i64,
        },
        updated_at: 0,
        embeddings: None,
        recent_event_ids: Vec::new(),
        folded_events: Vec::new(),
    }
}

/// Waits until `check` returns Some, polling every 50 ms, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ports_come_from_below_the_ephemeral_range_when_there_is_room() {
        assert_eq!(
            ports_below_ephemeral("32768\t60999\n"),
            Some(22_768..32_768)
        );
        assert_eq!(ports_below_ephemeral("15000 60999"), Some(10_000..15_000));
        // Too little room above 10,000, or no range known: the kernel picks (bind 0).
        assert_eq!(ports_below_ephemeral("10500 60999"), None);
        assert_eq!(ports_below_ephemeral("1024 65535"), None);
        assert_eq!(ports_below_ephemeral(""), None);
    }

    #[test]
    fn free_ports_are_never_handed_out_twice_and_are_free() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        if let Some(range) = ports_below_ephemeral(&ephemeral_range_low()) {
            assert!(ports.iter().all(|p| range.contains(p)), "{ports:?}");
        }
        // Free, and still so: a listener can take each one.
        for port in ports {
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    #[tokio::test]
    async fn a_broker_whose_port_is_taken_fails_at_once_and_says_why() {
        // Something else listens on the port: connecting works, but it is not tansu.
        let impostor = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = impostor.local_addr().unwrap().port();
        let mut broker = TestBroker {
            child: None,
            port,
            advertised_port: port,
            authentication: false,
            storage: "memory://tansu/".into(),
            dir: tempfile::tempdir().unwrap(),
        };
        let failed = tokio::spawn(async move { broker.spawn().await })
            .await
            .expect_err("a broker on a taken port");
        let message = *failed.into_panic().downcast::<String>().unwrap();
        assert!(message.contains("tansu exited"), "{message}");
        assert!(message.contains("Address already in use"), "{message}");
        drop(impostor);
    }

    #[test]
    #[ignore = "hangs on purpose: a_hung_test_is_aborted_with_every_threads_stack runs it"]
    fn hangs_on_purpose() {
        watch_this_test();
        std::thread::sleep(Duration::from_secs(600));
    }

    #[test]
    fn a_hung_test_is_aborted_with_every_threads_stack() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "testkit::tests::hangs_on_purpose"])
            .env("RECPIPE_TEST_WATCHDOG_SECS", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("testkit::tests::hangs_on_purpose is still running after 1 s"),
            "{stderr}"
        );
        // With gdb installed, the stacks show where the test stands.
        if Command::new("gdb").arg("--version").output().is_ok() {
            assert!(stderr.contains("hangs_on_purpose"), "{stderr}");
            assert!(stderr.contains("Thread "), "{stderr}");
        }
    }
}
