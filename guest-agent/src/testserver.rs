//! Test support: a tiny HTTP server on 127.0.0.1 that serves files at `/files/{name}`, accepts
//! PUTs anywhere (answering like the manager's storage service), and records every request.

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
    pub content_sha256: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Inner {
    files: Mutex<HashMap<String, Vec<u8>>>,
    put_answers: Mutex<VecDeque<StatusCode>>,
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
        content_sha256: header(CONTENT_SHA256_HEADER),
        body: body.to_vec(),
    });
    if method == Method::GET {
        let name = uri.path().strip_prefix("/files/").unwrap_or_default();
        return match inner.files.lock().unwrap().get(name) {
            Some(data) => data.clone().into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        };
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

/// Transfer settings for tests: two retries, 1 MiB input limit.
pub fn settings() -> crate::config::TransferSettings {
    crate::config::TransferSettings {
        timeout: copilot_protocol::units::Seconds(30),
        retries: 2,
        max_input_size: copilot_protocol::units::Bytes(1 << 20),
    }
}

/// Unpacks a tar.gz into path → content.
pub fn unpack(bytes: &[u8]) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut out = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        assert!(out.insert(path, data).is_none(), "duplicate entry");
    }
    out
}
