//! Kafka security settings reach librdkafka and work against a real broker: SASL/SCRAM
//! (tansu checks the credentials) over TLS (tansu 0.6 accepts `--cert/--key` but does not
//! serve TLS yet, so a TLS-terminating proxy stands in front of it, as a load balancer
//! would, and tansu advertises the proxy). The service is configured only through
//! `kafka.client`; what the broker refuses makes it not ready with the reason.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use recpipe_shared::admin::Health;
use recpipe_shared::kafka::framework;
use recpipe_shared::kafka::relay::Relay;
use recpipe_shared::settings::KafkaSettings;
use recpipe_shared::testkit::{eventually, read_topic_with, TestBroker};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

const USER: &str = "recpipe-service";
const PASSWORD: &str = "correct horse battery staple";

/// A certificate authority and a server certificate for 127.0.0.1 signed by it; the CA is
/// written to `dir/<name>.pem` for librdkafka's `ssl.ca.location`.
struct TestCa {
    ca_file: std::path::PathBuf,
    server: ServerConfig,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        // librdkafka checks the broker's name against the certificate (an IP SAN here).
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let server_cert = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let server = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
        TestCa { ca_file, server }
    }
}

/// Terminates TLS on `listener` and relays each connection to the broker's plain port.
/// It runs on its own thread and runtime: the services under test block their thread in
/// some librdkafka calls (e.g. a synchronous commit), which must not starve the proxy
/// that carries the answer.
fn tls_proxy(listener: std::net::TcpListener, server: ServerConfig, broker_port: u16) {
    let acceptor = TlsAcceptor::from(Arc::new(server));
    listener.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not speak TLS, or distrusts us, ends here.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut broker) = TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                });
            }
        })
    });
}

fn secured_settings(brokers: &str, password: &str, ca_file: &Path) -> KafkaSettings {
    let client: BTreeMap<String, String> = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", USER),
        ("sasl.password", password),
        ("ssl.ca.location", ca_file.to_str().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    KafkaSettings {
        brokers: brokers.to_string(),
        delivery_timeout_ms: 20_000,
        client,
        ..KafkaSettings::default()
    }
}

/// The framework running a relay from `in` to `out`, as a service would.
struct CopyService {
    health: Arc<Health>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<framework::RunStats, framework::FrameworkError>>,
}

impl CopyService {
    fn start(settings: &KafkaSettings) -> CopyService {
        let health = Health::new();
        let stop = CancellationToken::new();
        let relay = Relay {
            from: "in".into(),
            to: "out".into(),
        };
        let task = {
            let (settings, stop, health) = (settings.clone(), stop.clone(), health.clone());
            tokio::spawn(
                async move { framework::run_with_health(&settings, relay, stop, health).await },
            )
        };
        CopyService { health, stop, task }
    }

    /// Stops it and returns what it did.
    async fn stop(self) -> framework::RunStats {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops")
            .unwrap()
            .expect("stops without error")
    }
}

/// Waits for the service to report a refused connection, and checks it did nothing.
async fn assert_refused(settings: &KafkaSettings, expect_in_reason: &str) {
    let service = CopyService::start(settings);
    let health = service.health.clone();
    let reason = eventually(
        Duration::from_secs(30),
        "the service reports the refusal",
        || {
            let health = health.clone();
            async move { health.problem() }
        },
    )
    .await;
    assert!(!health.is_ready());
    assert!(
        reason.contains("refused the connection's security") && reason.contains("sasl.*"),
        "{reason}"
    );
    assert!(
        reason
            .to_lowercase()
            .contains(&expect_in_reason.to_lowercase()),
        "expected {expect_in_reason:?} in {reason:?}"
    );
    assert!(
        !reason.contains(PASSWORD) && !reason.contains("wrong-password"),
        "a password leaked into the reason: {reason}"
    );
    assert_eq!(service.stop().await.records, 0);
}

#[tokio::test]
async fn sasl_scram_over_tls_carries_records_and_refusals_are_reported() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "trusted");
    let other_ca = TestCa::new(dir.path(), "untrusted");

    // tansu takes users from its storage: add one, then require authentication.
    let mut broker = TestBroker::start_durable().await;
    broker.create_user(USER, PASSWORD);
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    broker.restart_secured(proxy_port).await;
    tls_proxy(proxy, ca.server, broker.port());

    let settings = secured_settings(&broker.brokers(), PASSWORD, &ca.ca_file);
    recpipe_shared::kafka::ensure_topics(&settings, &["in", "out"], 1)
        .await
        .expect("topics created over SASL_SSL");
    let producer = recpipe_shared::kafka::producer(&settings).unwrap();
    for i in 0..5 {
        let payload = format!("record-{i}");
        producer
            .send(
                FutureRecord::to("in").key("k").payload(&payload),
                Duration::from_secs(20),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produced over SASL_SSL");
    }

    let service = CopyService::start(&settings);
    let health = service.health.clone();
    let out = read_topic_with(&settings, "out", 5, Duration::from_secs(60)).await;
    let payloads: Vec<String> = out
        .iter()
        .map(|m| String::from_utf8(m.payload().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        (0..5).map(|i| format!("record-{i}")).collect::<Vec<_>>(),
        "health: {:?}; broker log: {}",
        health.problem(),
        broker.log()
    );
    assert!(health.is_ready(), "{:?}", health.problem());
    assert_eq!(service.stop().await.records, 5);

    // A wrong password: the broker refuses the SCRAM exchange.
    assert_refused(
        &secured_settings(&broker.brokers(), "wrong-password", &ca.ca_file),
        "authentication",
    )
    .await;
    // A broker certificate from a CA the client does not trust.
    assert_refused(
        &secured_settings(&broker.brokers(), PASSWORD, &other_ca.ca_file),
        "certificate verify failed",
    )
    .await;
}
