//! The test application: a real tansu broker, the three pipeline services and the API in
//! this process on port 0, the embedded store.
#![allow(dead_code)] // each test binary uses part of it

use std::net::SocketAddr;
use std::time::Duration;

use query_api::routes::RecommendationsResponse;
use recpipe_shared::events::{Event, EventType};
use recpipe_shared::settings::Settings;
use recpipe_shared::testkit::{event, TestEnv};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(60);

pub struct TestApp {
    pub env: TestEnv,
    pub address: SocketAddr,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub services: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts a broker, the three pipeline services and the API on port 0.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut env = TestEnv::start().await;
    configure(&mut env.settings);
    let shutdown = CancellationToken::new();
    let mut services = Vec::new();
    let settings: Settings = env.settings.clone();
    let (s, t) = (settings.clone(), shutdown.clone());
    services.push(tokio::spawn(async move {
        update_embeddings::run(s, t).await.map(drop).unwrap()
    }));
    let (s, t) = (settings.clone(), shutdown.clone());
    services.push(tokio::spawn(async move {
        gen_recommendations::run(s, t).await.map(drop).unwrap()
    }));
    let (s, t) = (settings.clone(), shutdown.clone());
    services.push(tokio::spawn(async move {
        save_worker::run(s, t).await.map(drop).unwrap()
    }));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let state = query_api::AppState::build(settings, shutdown.clone())
        .await
        .unwrap();
    let t = shutdown.clone();
    services.push(tokio::spawn(async move {
        query_api::serve(listener, state, t).await.unwrap()
    }));
    TestApp {
        env,
        address,
        client: reqwest::Client::new(),
        shutdown,
        services,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub async fn post_events(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/events"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` and decodes its JSON body.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        r.json().await.unwrap()
    }

    pub async fn recommendations(&self, user: &str, k: usize) -> RecommendationsResponse {
        let r = self
            .client
            .get(self.url(&format!("/v1/users/{user}/recommendations?k={k}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Stops every service and checks they all ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for s in self.services {
            tokio::time::timeout(Duration::from_secs(30), s)
                .await
                .expect("service stops")
                .expect("service did not panic");
        }
    }
}

/// A user who views products of one category, then buys one of them.
pub fn shopper(app: &TestApp, user: &str, category: &str, views: usize) -> (Vec<Event>, String) {
    let catalog = app.env.catalog();
    let products: Vec<&str> = catalog
        .products()
        .iter()
        .filter(|p| p.category == category && p.available)
        .map(|p| p.product_id.as_str())
        .take(views + 1)
        .collect();
    let mut events: Vec<Event> = products[..views]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            event(
                &format!("{user}-v{i}"),
                user,
                EventType::View,
                p,
                1_700_000_000_000 + i as i64 * 1_000,
            )
        })
        .collect();
    let bought = products[views].to_string();
    events.push(event(
        &format!("{user}-buy"),
        user,
        EventType::Purchase,
        &bought,
        1_700_000_100_000,
    ));
    (events, bought)
}

// For tests that run the API alone and feed `recommendations` themselves.

#[allow(unused_imports)] // each test binary uses part of this module
pub use recpipe_shared::testkit::list;

pub async fn publish(env: &TestEnv, list: &recpipe_shared::events::RecommendationRecord) {
    recpipe_shared::testkit::produce(
        &env.broker.brokers(),
        &env.settings.kafka.topics.recommendations,
        &list.user_id,
        &serde_json::to_vec(list).unwrap(),
    )
    .await;
}

pub async fn get(
    client: &reqwest::Client,
    address: std::net::SocketAddr,
    user: &str,
) -> serde_json::Value {
    client
        .get(format!(
            "http://{address}/v1/users/{user}/recommendations?k=10"
        ))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The API alone on port 0, without the pipeline's services.
pub struct ApiOnly {
    pub address: SocketAddr,
    pub view: std::sync::Arc<query_api::view::ListView>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn start_api(settings: &Settings) -> ApiOnly {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let state = query_api::AppState::build(settings.clone(), shutdown.clone())
        .await
        .unwrap();
    let view = state.view.clone();
    let task = tokio::spawn(query_api::serve(listener, state, shutdown.clone()));
    ApiOnly {
        address,
        view,
        shutdown,
        task,
    }
}

impl ApiOnly {
    /// Stops it and waits until it has stopped (impressions flushed).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}
