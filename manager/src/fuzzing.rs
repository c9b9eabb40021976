//! The HTTP service's promise, for the fuzz target (fuzz/) and its regression tests: whatever a
//! client sends to the upload and submit routes, the answer is a refusal or a success, never a
//! server error or a panic, and the service keeps serving.
//!
//! The bytes become one request: the first picks the route (`PUT /outputs/1/1`, `PUT
//! /inputs/<sha256>`, `POST /api/jobs`, `GET /api/jobs/1`), the second which headers come with
//! it (a valid token, a digest right or wrong for the body, a content length right or wrong),
//! the rest is the body. Job 1 exists and its attempt 1 holds a lease, so the valid paths are
//! reachable too.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use copilot_protocol::api::CONTENT_SHA256_HEADER;
use copilot_protocol::{JobSpec, Sha256};
use tower::ServiceExt;

use crate::config::ManagerConfig;
use crate::Shared;

const API_TOKEN: &str = "fuzzing-api-token";

struct Service {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    upload_token: String,
}

fn service() -> &'static Service {
    static S: OnceLock<Service> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = std::env::temp_dir().join(format!("copilot-http-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a data dir");
        let mut config = ManagerConfig::loopback(&dir, API_TOKEN, ([127, 0, 0, 1], 9).into());
        config.jobs.max_input_size.0 = 1 << 16;
        config.jobs.max_output_size.0 = 1 << 16;
        let shared = Arc::new(Shared::open(config, None).expect("a queue"));
        shared
            .queue
            .submit(&[JobSpec::new("fuzz", &["true"])], 3)
            .expect("a job");
        let claim = shared
            .queue
            .claim(
                "agent",
                None,
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            )
            .expect("a claim")
            .expect("the job");
        let router = rt.block_on(crate::http::app(shared)).expect("the service");
        Service {
            rt,
            router,
            upload_token: claim.upload_token,
        }
    })
}

/// Sends the request `data` describes; panics on a server error.
pub fn http_request(data: &[u8]) {
    let s = service();
    let (route, flags, body) = match data {
        [r, f, rest @ ..] => (*r, *f, rest),
        _ => return,
    };
    let body_sha = Sha256::of(body);
    let (method, path, token) = match route % 4 {
        0 => (
            Method::PUT,
            "/outputs/1/1".to_owned(),
            s.upload_token.as_str(),
        ),
        1 => {
            let sha = if flags & 8 != 0 {
                body_sha.to_string()
            } else {
                format!("{:02x}", route).repeat(32)
            };
            (Method::PUT, format!("/inputs/{sha}"), API_TOKEN)
        }
        2 => (Method::POST, "/api/jobs".to_owned(), API_TOKEN),
        _ => (Method::GET, "/api/jobs/1".to_owned(), API_TOKEN),
    };
    let mut req = Request::builder().method(method).uri(&path);
    if flags & 1 != 0 {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if flags & 2 != 0 {
        let sha = if flags & 4 != 0 {
            body_sha
        } else {
            Sha256::of(b"something else")
        };
        req = req.header(CONTENT_SHA256_HEADER, sha.to_string());
    }
    if flags & 16 != 0 {
        let claimed = if flags & 32 != 0 {
            body.len() as u64
        } else {
            u64::from(flags) * 1000
        };
        req = req.header("content-length", claimed.to_string());
    }
    let Ok(req) = req.body(Body::from(body.to_vec())) else {
        return;
    };
    let status = s.rt.block_on(async {
        let answer = s.router.clone().oneshot(req).await;
        let resp = answer.expect("the router is infallible");
        let status = resp.status();
        // Read the whole answer, as a client would.
        let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await;
        status
    });
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{path} answered {status} to flags {flags:#x} and {} body bytes",
        body.len()
    );
}
