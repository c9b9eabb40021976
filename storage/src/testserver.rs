//! Test support: a tiny HTTP server on 127.0.0.1 that serves files at `/files/{name}` (with
//! `Range` support, and on request a body cut off part-way), accepts PUTs anywhere (answering
//! like the manager's storage service), and records every request.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use copilot_protocol::api::{ApiError, Stored, CONTENT_SHA256_HEADER};
use copilot_protocol::Sha256;

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub content_sha256: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Inner {
    files: Mutex<HashMap<String, Vec<u8>>>,
    put_answers: Mutex<VecDeque<StatusCode>>,
    /// For each of the next GETs of a file: send this many bytes, then break the connection.
    cuts: Mutex<VecDeque<usize>>,
    ignore_ranges: std::sync::atomic::AtomicBool,
    seen: Mutex<Vec<Seen>>,
}

/// A running test server; it stops when the test's runtime ends.
#[derive(Debug, Clone)]
pub struct TestServer {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    inner: Arc<Inner>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        TestServer { base, inner }
    }

    /// Serve `data` at `/files/{name}`; returns its URL.
    pub fn serve(&self, name: &str, data: &[u8]) -> String {
        self.inner
            .files
            .lock()
            .unwrap()
            .insert(name.to_owned(), data.to_vec());
        format!("{}/files/{name}", self.base)
    }

    /// Cut the bodies of the next GETs of files after these many bytes each.
    pub fn cut_gets_after(&self, bytes: &[usize]) {
        self.inner.cuts.lock().unwrap().extend(bytes);
    }

    /// Answer every GET with the whole file, as servers without range support do.
    pub fn ignore_ranges(&self) {
        self.inner
            .ignore_ranges
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Answer the next PUTs with these statuses (then 201 again).
    pub fn answer_puts_with(&self, statuses: &[u16]) {
        let mut answers = self.inner.put_answers.lock().unwrap();
        answers.extend(statuses.iter().map(|s| StatusCode::from_u16(*s).unwrap()));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    pub fn puts(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == Method::PUT)
            .collect()
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    inner.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        range: header("range"),
        content_sha256: header(CONTENT_SHA256_HEADER),
        body: body.to_vec(),
    });
    if method == Method::GET {
        let name = uri.path().strip_prefix("/files/").unwrap_or_default();
        let Some(data) = inner.files.lock().unwrap().get(name).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let from = header("range")
            .filter(|_| {
                !inner
                    .ignore_ranges
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .and_then(|r| {
                r.strip_prefix("bytes=")?
                    .strip_suffix('-')?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&n| n < data.len());
        let (status, body) = match from {
            Some(n) => (StatusCode::PARTIAL_CONTENT, data[n..].to_vec()),
            None => (StatusCode::OK, data.clone()),
        };
        let mut headers = HeaderMap::new();
        headers.insert("content-length", body.len().into());
        if let Some(n) = from {
            let range = format!("bytes {n}-{}/{}", data.len() - 1, data.len());
            headers.insert("content-range", range.parse().unwrap());
        }
        let cut = inner.cuts.lock().unwrap().pop_front();
        let body = match cut {
            None => axum::body::Body::from(body),
            Some(keep) => {
                use futures::StreamExt;
                let first: Result<Vec<u8>, std::io::Error> =
                    Ok(body[..keep.min(body.len())].to_vec());
                // A pause first, so the part sent reaches the client before the connection
                // is torn down.
                let broken = futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Err::<Vec<u8>, _>(std::io::Error::other("cut by the test server"))
                });
                axum::body::Body::from_stream(futures::stream::iter([first]).chain(broken))
            }
        };
        return (status, headers, body).into_response();
    }
    let answer = inner
        .put_answers
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(StatusCode::CREATED);
    if answer.is_success() {
        let stored = Stored {
            sha256: Sha256::of(&body),
            size: body.len() as u64,
        };
        (answer, Json(stored)).into_response()
    } else {
        let error = ApiError {
            error: format!("scripted failure {}", answer.as_u16()),
        };
        (answer, Json(error)).into_response()
    }
}
