//! The query driver's HTTP/1.1 client: keep-alive connections, one GET at a time on each,
//! written and read in the requesting task itself. reqwest's pool (URL parsing, a
//! connection task and channels per request) cost the load tester 38 µs of CPU per GET
//! at 20,000/s — more than the API it measured on the same two cores.

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers of an answer beyond this are a malformed answer, not a reason to read on.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// GETs paths of one `http://` base URL.
pub struct GetClient {
    address: (String, u16),
    host: String,
    base_path: String,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

impl GetClient {
    /// `base` is e.g. `http://127.0.0.1:8080`; None for what this client does not speak
    /// (https), where the caller keeps its general client.
    pub fn new(base: &str, timeout: Duration) -> Option<GetClient> {
        let url = reqwest::Url::parse(base).ok()?;
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?.to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        Some(GetClient {
            address: (host.clone(), port),
            host: match url.port() {
                Some(_) => format!("{host}:{port}"),
                None => host,
            },
            base_path: url.path().trim_end_matches('/').to_string(),
            timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// GETs `path` (with its query) and reads the whole answer; true for a 2xx status.
    pub async fn get_ok(&self, path: &str) -> bool {
        let request = format!(
            "GET {}{path} HTTP/1.1\r\nhost: {}\r\n\r\n",
            self.base_path, self.host
        );
        let reused = self.idle.lock().expect("not poisoned").pop();
        let was_reused = reused.is_some();
        let answer = tokio::time::timeout(self.timeout, async {
            let connection = match reused {
                Some(c) => c,
                None => self.connect().await?,
            };
            match exchange(connection, request.as_bytes()).await {
                Exchange::Answered(status, keep) => Some((status, keep)),
                // The server closed an idle connection before this request reached it:
                // not an error of the request, so it goes again on a new one.
                Exchange::ClosedBeforeAnswer if was_reused => match self.connect().await {
                    Some(c) => match exchange(c, request.as_bytes()).await {
                        Exchange::Answered(status, keep) => Some((status, keep)),
                        _ => None,
                    },
                    None => None,
                },
                _ => None,
            }
        })
        .await;
        match answer {
            Ok(Some((status, keep))) => {
                if let Some(c) = keep {
                    self.idle.lock().expect("not poisoned").push(c);
                }
                (200..300).contains(&status)
            }
            _ => false,
        }
    }

    async fn connect(&self) -> Option<Connection> {
        let stream = TcpStream::connect((self.address.0.as_str(), self.address.1))
            .await
            .ok()?;
        stream.set_nodelay(true).ok()?;
        Some(Connection {
            stream,
            buffer: Vec::with_capacity(4096),
        })
    }
}

enum Exchange {
    /// Status, and the connection when it may carry the next request.
    Answered(u16, Option<Connection>),
    ClosedBeforeAnswer,
    Failed,
}

async fn exchange(mut c: Connection, request: &[u8]) -> Exchange {
    if c.stream.write_all(request).await.is_err() {
        return Exchange::ClosedBeforeAnswer;
    }
    c.buffer.clear();
    let (status, head, length, keep_alive) = loop {
        match read_more(&mut c).await {
            Some(0) if c.buffer.is_empty() => return Exchange::ClosedBeforeAnswer,
            Some(0) | None => return Exchange::Failed,
            Some(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&c.buffer) {
            Ok(httparse::Status::Complete(head)) => {
                let mut length = None;
                let mut keep_alive = true;
                for h in response.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok());
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        keep_alive = !h.value.eq_ignore_ascii_case(b"close");
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        // The API and the trivial server send lengths; a chunked answer
                        // is not read here, so its connection is not reused.
                        length = None;
                    }
                }
                let Some(length) = length else {
                    return Exchange::Failed;
                };
                break (response.code.unwrap_or(0), head, length, keep_alive);
            }
            Ok(httparse::Status::Partial) if c.buffer.len() < MAX_HEAD => continue,
            _ => return Exchange::Failed,
        }
    };
    while c.buffer.len() < head + length {
        match read_more(&mut c).await {
            Some(n) if n > 0 => {}
            _ => return Exchange::Failed,
        }
    }
    // One request at a time per connection: anything past the answer is a broken server.
    let keep = (keep_alive && c.buffer.len() == head + length).then_some(c);
    Exchange::Answered(status, keep)
}

/// Appends what the socket has to the buffer: the byte count, 0 at its end, None on error.
async fn read_more(c: &mut Connection) -> Option<usize> {
    if c.buffer.capacity() - c.buffer.len() < 1024 {
        c.buffer.reserve(4096);
    }
    c.stream.read_buf(&mut c.buffer).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{routing::get, Router};

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn answers_are_read_whole_and_connections_reused() {
        let body = "x".repeat(100_000);
        let app = Router::new()
            .route("/ok", get(move || std::future::ready(body.clone())))
            .route(
                "/missing",
                get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
            );
        let client = GetClient::new(&serve(app).await, Duration::from_secs(5)).unwrap();
        for _ in 0..20 {
            assert!(client.get_ok("/ok").await);
        }
        // Sequential GETs share one connection: the answer was read to its end.
        assert_eq!(client.idle.lock().unwrap().len(), 1);
        assert!(!client.get_ok("/missing").await);
        assert!(client.get_ok("/ok?k=10").await);
    }

    #[tokio::test]
    async fn concurrent_gets_open_connections_and_keep_them() {
        let app = Router::new().route("/ok", get(|| async { "fine" }));
        let client = Arc::new(GetClient::new(&serve(app).await, Duration::from_secs(5)).unwrap());
        let gets: Vec<_> = (0..16)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.get_ok("/ok").await })
            })
            .collect();
        for g in gets {
            assert!(g.await.unwrap());
        }
        let idle = client.idle.lock().unwrap().len();
        assert!((1..=16).contains(&idle), "{idle} idle connections");
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_and_no_server_is_an_error() {
        // A server that answers one request per connection, then closes it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = s.shutdown().await;
            }
        });
        let client = GetClient::new(&format!("http://{address}"), Duration::from_secs(5)).unwrap();
        for _ in 0..5 {
            assert!(client.get_ok("/").await);
        }
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let client = GetClient::new(&gone, Duration::from_secs(5)).unwrap();
        assert!(!client.get_ok("/").await);
        assert!(GetClient::new("https://example.com", Duration::from_secs(1)).is_none());
    }
}
