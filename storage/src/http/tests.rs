//! The HTTP adapter through [`Transfers`] against the in-process test server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use copilot_protocol::Sha256;

use super::*;
use crate::testserver::TestServer;
use crate::{GetSpec, Retry, Settings, Transfers};

fn transfers() -> Transfers {
    Transfers::new(Settings {
        extra_root_pem: None,
        timeout: Duration::from_secs(30),
        retry: Retry { retries: 2 },
    })
    .unwrap()
}

fn spec(data: &[u8]) -> GetSpec {
    GetSpec {
        sha256: Some(Sha256::of(data)),
        size: Some(data.len() as u64),
        limit: 1 << 20,
    }
}

fn url(s: &str) -> Url {
    s.parse().unwrap()
}

async fn get(server_url: &str, dest: &Path, spec: &GetSpec) -> Result<Stored, StorageError> {
    transfers()
        .get(
            &url(server_url),
            dest,
            spec,
            &Credential::None,
            &crate::no_progress(),
        )
        .await
}

#[tokio::test]
async fn a_download_is_verified_and_reports_progress() {
    let server = TestServer::start().await;
    let data = b"echo hello\n".repeat(1000);
    let u = server.serve("run.sh", &data);
    let dir = tempfile::tempdir().unwrap();
    let last = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&last);
    let progress: Progress = Arc::new(move |n| seen.store(n, Ordering::Relaxed));
    let got = transfers()
        .get(
            &url(&u),
            &dir.path().join("run.sh"),
            &spec(&data),
            &Credential::None,
            &progress,
        )
        .await
        .unwrap();
    assert_eq!(
        (got.sha256, got.size),
        (Sha256::of(&data), data.len() as u64)
    );
    assert_eq!(std::fs::read(dir.path().join("run.sh")).unwrap(), data);
    assert_eq!(last.load(Ordering::Relaxed), data.len() as u64);

    let loose = GetSpec {
        sha256: None,
        size: None,
        limit: 1 << 20,
    };
    get(&u, &dir.path().join("unverified"), &loose)
        .await
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("unverified")).unwrap(), data);
}

#[tokio::test]
async fn a_wrong_digest_fails_at_once_and_leaves_no_file() {
    let server = TestServer::start().await;
    let u = server.serve("data", b"the real content");
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(b"the real content");
    s.sha256 = Some(Sha256::of(b"something else"));
    let err = get(&u, &dir.path().join("data"), &s).await.unwrap_err();
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    assert!(!dir.path().join("data").exists());
    assert_eq!(server.seen().len(), 1, "a digest mismatch is not retried");
}

#[tokio::test]
async fn size_limits_are_enforced() {
    let server = TestServer::start().await;
    let data = vec![7u8; 5000];
    let u = server.serve("big", &data);
    let dir = tempfile::tempdir().unwrap();
    let loose = GetSpec {
        sha256: None,
        size: None,
        limit: 4096,
    };
    let err = get(&u, &dir.path().join("big"), &loose).await.unwrap_err();
    assert!(
        matches!(err, StorageError::TooLarge { limit: 4096, .. }),
        "{err}"
    );
    assert!(!dir.path().join("big").exists());
    let said = GetSpec {
        sha256: None,
        size: Some(100),
        limit: 1 << 20,
    };
    let err = get(&u, &dir.path().join("big"), &said).await.unwrap_err();
    assert!(
        matches!(err, StorageError::TooLarge { limit: 100, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request() {
    let server = TestServer::start().await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let u = server.serve("data", &data);
    server.cut_gets_after(&[100_000]);
    let dir = tempfile::tempdir().unwrap();
    get(&u, &dir.path().join("data"), &spec(&data))
        .await
        .unwrap();
    assert!(std::fs::read(dir.path().join("data")).unwrap() == data);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    assert_eq!(seen[1].range.as_deref(), Some("bytes=100000-"));
}

#[tokio::test]
async fn without_range_support_a_cut_download_starts_over() {
    let server = TestServer::start().await;
    server.ignore_ranges();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
    let u = server.serve("data", &data);
    server.cut_gets_after(&[100_000, 5]);
    let dir = tempfile::tempdir().unwrap();
    get(&u, &dir.path().join("data"), &spec(&data))
        .await
        .unwrap();
    assert!(std::fs::read(dir.path().join("data")).unwrap() == data);
    assert_eq!(server.seen().len(), 3);
}

#[tokio::test]
async fn a_missing_file_is_an_http_error_without_retries() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let err = get(
        &format!("{}/files/nothing", server.base),
        &dir.path().join("x"),
        &spec(b"x"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StorageError::Status { status, .. } if status == StatusCode::NOT_FOUND),
        "{err}"
    );
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn the_bearer_token_goes_only_where_it_is_given() {
    let server = TestServer::start().await;
    let u = url(&server.serve("a", b"a"));
    let dir = tempfile::tempdir().unwrap();
    let t = transfers();
    let none = crate::no_progress();
    t.get(
        &u,
        &dir.path().join("a"),
        &spec(b"a"),
        &Credential::Bearer("tok".into()),
        &none,
    )
    .await
    .unwrap();
    t.get(
        &u,
        &dir.path().join("b"),
        &spec(b"a"),
        &Credential::None,
        &none,
    )
    .await
    .unwrap();
    let seen = server.seen();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer tok"));
    assert_eq!(seen[1].authorization, None);
}

async fn archive() -> (tempfile::TempDir, PathBuf, Upload) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.tar.gz");
    let data = b"pretend this is a tar.gz".repeat(100);
    std::fs::write(&path, &data).unwrap();
    let upload = Upload {
        sha256: Sha256::of(&data),
        size: data.len() as u64,
    };
    (dir, path, upload)
}

use std::path::PathBuf;

async fn put(server: &TestServer, path: &Path, upload: Upload) -> Result<(), StorageError> {
    let u = url(&format!("{}/outputs/7/1", server.base));
    transfers()
        .put(
            path,
            &u,
            upload,
            &Credential::Bearer("tok".into()),
            &crate::no_progress(),
        )
        .await
}

#[tokio::test]
async fn an_upload_streams_with_token_and_digest() {
    let server = TestServer::start().await;
    let (_d, path, upload) = archive().await;
    put(&server, &path, upload).await.unwrap();
    let puts = server.puts();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].path, "/outputs/7/1");
    assert_eq!(puts[0].body, std::fs::read(&path).unwrap());
    assert_eq!(puts[0].authorization.as_deref(), Some("Bearer tok"));
    assert_eq!(puts[0].content_sha256, Some(upload.sha256.to_string()));
}

#[tokio::test]
async fn upload_server_errors_are_retried_and_client_errors_explained() {
    let server = TestServer::start().await;
    let (_d, path, upload) = archive().await;
    server.answer_puts_with(&[503]);
    put(&server, &path, upload).await.unwrap();
    let puts = server.puts();
    assert_eq!(puts.len(), 2);
    assert_eq!(
        puts[1].body.len() as u64,
        upload.size,
        "the retry sent the whole file"
    );

    server.answer_puts_with(&[403]);
    let err = put(&server, &path, upload).await.unwrap_err();
    assert!(err.to_string().contains("scripted failure 403"), "{err}");
    assert!(matches!(err, StorageError::Status { status, .. } if status == StatusCode::FORBIDDEN));
    assert_eq!(server.puts().len(), 3, "a 403 is not retried");
}

#[tokio::test]
async fn a_wrong_stored_digest_is_an_error() {
    let server = TestServer::start().await;
    let (_d, path, upload) = archive().await;
    let claimed = Upload {
        sha256: Sha256::of(b"not the file"),
        ..upload
    };
    let err = put(&server, &path, claimed).await.unwrap_err();
    assert!(matches!(err, StorageError::StoredMismatch { .. }), "{err}");
}

#[test]
fn server_messages_are_extracted() {
    assert_eq!(
        server_message(r#"{"error":"token expired"}"#),
        "token expired"
    );
    assert_eq!(server_message("plain text\n"), "plain text");
    assert_eq!(server_message(""), "(no message)");
    assert_eq!(server_message(&"x".repeat(2000)).len(), MAX_ERROR_TEXT);
}
