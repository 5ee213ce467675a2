//! API keys and per-key rate limits for the write endpoint.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;

use crate::startup::AppState;

/// The accepted keys and their rate limiter.
pub struct KeyRing {
    keys: Vec<Vec<u8>>,
    limiter: Option<DefaultKeyedRateLimiter<usize>>,
}

impl KeyRing {
    /// Keys from settings and from `api_keys_file`; an unreadable file is an error at start.
    pub fn from_settings(api: &recpipe_shared::settings::ApiSettings) -> anyhow::Result<KeyRing> {
        let mut keys: Vec<Vec<u8>> = api
            .api_keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| k.as_bytes().to_vec())
            .collect();
        if let Some(path) = &api.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read api.api_keys_file {}: {e}", path.display())
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
        let limiter = NonZeroU32::new(api.rate_limit_per_key)
            .map(|n| RateLimiter::keyed(Quota::per_second(n)));
        Ok(KeyRing { keys, limiter })
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The index of the matching key. Every key is compared in constant time, so the
    /// answer's timing says nothing about how much of a guess was right.
    fn find(&self, presented: &[u8]) -> Option<usize> {
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if bool::from(key.as_slice().ct_eq(presented)) {
                found = Some(i);
            }
        }
        found
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes());
    }
    let auth = headers.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    auth.strip_prefix(b"Bearer ")
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Lets a request through when it carries a known key within its rate.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let ring: &Arc<KeyRing> = &state.keys;
    if ring.is_open() {
        return next.run(request).await;
    }
    let Some(index) = presented_key(request.headers()).and_then(|k| ring.find(k)) else {
        metrics::counter!("recpipe_auth_rejected_total", "reason" => "key").increment(1);
        return refuse(StatusCode::UNAUTHORIZED, "a valid API key is required: send it as the x-api-key header or Authorization: Bearer <key>");
    };
    if let Some(limiter) = &ring.limiter {
        if limiter.check_key(&index).is_err() {
            metrics::counter!("recpipe_auth_rejected_total", "reason" => "rate").increment(1);
            let mut response = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit of this API key exceeded (api.rate_limit_per_key); retry shortly",
            );
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            return response;
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::settings::ApiSettings;

    #[test]
    fn keys_match_exactly_and_come_from_settings_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "from-file\n\n").unwrap();
        let ring = KeyRing::from_settings(&ApiSettings {
            api_keys: vec!["k1".into()],
            api_keys_file: Some(file),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ring.find(b"k1"), Some(0));
        assert_eq!(ring.find(b"from-file"), Some(1));
        assert_eq!(ring.find(b"k"), None);
        assert_eq!(ring.find(b"k1 "), None);
        assert!(!ring.is_open());
        let missing = KeyRing::from_settings(&ApiSettings {
            api_keys_file: Some("/nonexistent".into()),
            ..Default::default()
        });
        assert!(missing.err().unwrap().to_string().contains("api_keys_file"));
    }
}
