//! The client against the real `chirp_server` (coop-computing-tools), each test with its own
//! server on a free loopback port; and against a fake server that misbehaves.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use copilot_stack::ChirpServer;
use md5::Digest as _;
use tokio::io::AsyncReadExt;

use super::*;

const T: Duration = Duration::from_secs(10);

/// A server whose default ACL gives this host's address and our unix user every right, or
/// `None` (said on stdout) when chirp_server is not installed.
fn server() -> Option<(tempfile::TempDir, ChirpServer)> {
    let dir = tempfile::tempdir().unwrap();
    let me = copilot_stack::unix_user();
    let acl = format!("address:127.0.0.1 rwldav\nunix:{me} rwldav\n");
    ChirpServer::start_or_skip(dir.path(), &acl).map(|s| (dir, s))
}

async fn client(s: &ChirpServer) -> ChirpClient {
    ChirpClient::connect(&s.address(), &[Auth::Address], T)
        .await
        .unwrap()
}

fn noop() -> impl FnMut(&[u8]) + Send {
    |_: &[u8]| {}
}

async fn put(c: &mut ChirpClient, path: &str, data: &[u8]) {
    c.putfile_atomic(path, 0o644, data.len() as u64, &mut &data[..], &mut noop())
        .await
        .unwrap();
}

async fn get(c: &mut ChirpClient, path: &str) -> Result<Vec<u8>, ChirpError> {
    let mut out = Vec::new();
    c.getfile(path, &mut out, u64::MAX, &mut noop()).await?;
    Ok(out)
}

#[tokio::test]
async fn chirp_authenticates_by_address_and_unix_and_falls_back() {
    let Some((_d, s)) = server() else { return };
    let mut c = client(&s).await;
    assert_eq!(c.subject(), "address:127.0.0.1");
    assert_eq!(c.whoami().await.unwrap(), "address:127.0.0.1");

    let c = ChirpClient::connect(&s.address(), &[Auth::Unix], T)
        .await
        .unwrap();
    assert_eq!(c.subject(), format!("unix:{}", copilot_stack::unix_user()));

    // A ticket the server never saw is refused; the next method is tried on the same
    // connection.
    let stranger = Ticket::generate().unwrap();
    let mut c = ChirpClient::connect(
        &s.address(),
        &[Auth::Ticket(Box::new(stranger.clone())), Auth::Address],
        T,
    )
    .await
    .unwrap();
    assert_eq!(c.subject(), "address:127.0.0.1");
    c.stat("/").await.unwrap();
    let err = ChirpClient::connect(&s.address(), &[Auth::Ticket(Box::new(stranger))], T)
        .await
        .unwrap_err();
    assert!(matches!(err, ChirpError::Auth { .. }), "{err}");
}

#[tokio::test]
async fn chirp_round_trips_small_empty_and_100mb_files_with_checksums() {
    let Some((_d, s)) = server() else { return };
    let mut c = client(&s).await;
    c.mkdir_all("/data/deep", 0o755).await.unwrap();
    c.mkdir_all("/data/deep", 0o755).await.unwrap();

    for (name, data) in [
        ("small", b"hello chirp\n".to_vec()),
        ("empty", Vec::new()),
        (
            "big",
            (0..100u32 << 20).map(|i| (i * 7 % 251) as u8).collect(),
        ),
    ] {
        let path = format!("/data/deep/{name}");
        let mut sent = md5::Md5::new();
        c.putfile_atomic(
            &path,
            0o644,
            data.len() as u64,
            &mut &data[..],
            &mut |b: &[u8]| sent.update(b),
        )
        .await
        .unwrap();
        let st = c.stat(&path).await.unwrap();
        assert_eq!((st.size, st.is_dir()), (data.len() as u64, false), "{name}");

        let mut got = Vec::new();
        let mut seen = 0u64;
        let size = c
            .getfile(&path, &mut got, u64::MAX, &mut |b: &[u8]| {
                seen += b.len() as u64
            })
            .await
            .unwrap();
        assert_eq!((size, seen), (data.len() as u64, data.len() as u64));
        assert!(got == data, "{name} came back different");

        let server_md5 = c.hash(HashAlgo::Md5, &path).await.unwrap();
        assert_eq!(server_md5, sent.finalize().to_vec(), "{name}");
        let server_sha1 = c.hash(HashAlgo::Sha1, &path).await.unwrap();
        assert_eq!(server_sha1, sha1::Sha1::digest(&data).to_vec(), "{name}");
    }
    let mut names = c.getdir("/data/deep").await.unwrap();
    names.sort();
    assert_eq!(
        names,
        ["big", "empty", "small"],
        "no temporary files are left"
    );

    // A limit below the size refuses the file before its body is read.
    let err = c
        .getfile("/data/deep/small", &mut Vec::new(), 4, &mut noop())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ChirpError::TooLarge { size: 12, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn chirp_refusals_are_typed_and_keep_the_connection() {
    let Some((_d, s)) = server() else { return };
    let mut c = client(&s).await;
    let err = get(&mut c, "/nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ChirpCode::DoesntExist), "{err}");
    assert_eq!(
        err.to_string(),
        "chirp getfile /nope: no such file or directory"
    );
    let err = c.stat("/nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ChirpCode::DoesntExist));
    c.mkdir("/d", 0o755).await.unwrap();
    let err = c.mkdir("/d", 0o755).await.unwrap_err();
    assert_eq!(err.code(), Some(ChirpCode::AlreadyExists));
    let err = c.unlink("/d").await.unwrap_err();
    assert!(err.code().is_some(), "{err}");
    // Still in step: the next request works.
    put(&mut c, "/d/f", b"x").await;
    c.rename("/d/f", "/d/g").await.unwrap();
    assert_eq!(get(&mut c, "/d/g").await.unwrap(), b"x");
    c.unlink("/d/g").await.unwrap();
    c.rmall("/d").await.unwrap();
    assert_eq!(
        c.stat("/d").await.unwrap_err().code(),
        Some(ChirpCode::DoesntExist)
    );
    let err = c.stat("relative").await.unwrap_err();
    assert!(matches!(err, ChirpError::BadPath { .. }), "{err}");
    c.stat("/").await.unwrap();
}

#[tokio::test]
async fn chirp_acls_deny_and_tickets_grant_only_their_directory() {
    let Some((_d, s)) = server() else { return };
    let mut owner = client(&s).await;
    owner.mkdir_all("/out/job-1", 0o755).await.unwrap();
    owner.mkdir_all("/out/job-2", 0o755).await.unwrap();
    put(&mut owner, "/out/job-1/secret", b"mine").await;

    // Without rights on a directory, writing there is refused.
    owner.mkdir("/closed", 0o755).await.unwrap();
    owner
        .setacl("/closed", "unix:nobody-at-all", "rl")
        .await
        .unwrap();
    owner
        .setacl("/closed", "address:127.0.0.1", "l")
        .await
        .unwrap();
    let acl = owner.getacl("/closed").await.unwrap();
    assert!(
        acl.contains(&("address:127.0.0.1".into(), "l".into())),
        "{acl:?}"
    );
    let err = owner
        .putfile("/closed/x", 0o644, 1, &mut &b"x"[..], &mut noop())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ChirpCode::NotAuthorized), "{err}");

    let ticket = Ticket::generate().unwrap();
    owner.ticket_register(&ticket, 600).await.unwrap();
    // Write only: the agent uploads, the owner verifies and reads.
    owner
        .ticket_modify(&ticket, "/out/job-1", "w")
        .await
        .unwrap();
    let held = Ticket::from_pem(&ticket.to_pem().unwrap()).unwrap();
    let mut agent = ChirpClient::connect(&s.address(), &[Auth::Ticket(Box::new(held))], T)
        .await
        .unwrap();
    assert_eq!(agent.subject(), ticket.subject());
    agent
        .putfile(
            "/out/job-1/output.tar.gz",
            0o644,
            7,
            &mut &b"results"[..],
            &mut noop(),
        )
        .await
        .unwrap();
    let denied = [
        // Its rename needs the rights to read and delete, which it lacks.
        agent
            .putfile_atomic("/out/job-1/other", 0o644, 1, &mut &b"x"[..], &mut noop())
            .await
            .unwrap_err(),
        agent
            .putfile("/out/job-2/x", 0o644, 1, &mut &b"x"[..], &mut noop())
            .await
            .unwrap_err(),
        get(&mut agent, "/out/job-1/secret").await.unwrap_err(),
    ];
    for err in denied {
        assert_eq!(err.code(), Some(ChirpCode::NotAuthorized), "{err}");
    }
    assert_eq!(
        get(&mut owner, "/out/job-1/output.tar.gz").await.unwrap(),
        b"results"
    );

    owner.ticket_delete(&ticket.subject()).await.unwrap();
    let err = ChirpClient::connect(&s.address(), &[Auth::Ticket(Box::new(ticket))], T)
        .await
        .unwrap_err();
    assert!(matches!(err, ChirpError::Auth { .. }), "{err}");
}

#[tokio::test]
async fn chirp_paths_with_spaces_and_percent_signs() {
    let Some((_d, s)) = server() else { return };
    let mut c = client(&s).await;
    let dir = "/with space/100% sure";
    c.mkdir_all(dir, 0o755).await.unwrap();
    let path = format!("{dir}/a 'quoted' \"name\" <x>%20.txt");
    put(&mut c, &path, b"odd").await;
    assert_eq!(get(&mut c, &path).await.unwrap(), b"odd");
    assert_eq!(
        c.getdir(dir).await.unwrap(),
        ["a 'quoted' \"name\" <x>%20.txt"]
    );
    let on_disk = s
        .root()
        .join("with space/100% sure/a 'quoted' \"name\" <x>%20.txt");
    assert_eq!(std::fs::read(on_disk).unwrap(), b"odd");
}

/// Calls `at` once `after` bytes went through, then passes everything on.
struct Tripwire<T> {
    inner: T,
    seen: u64,
    after: u64,
    at: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Tripwire<T> {
    fn new(inner: T, after: u64, at: impl FnOnce() + Send + 'static) -> Self {
        Tripwire {
            inner,
            seen: 0,
            after,
            at: Some(Box::new(at)),
        }
    }

    fn count(&mut self, n: usize) {
        self.seen += n as u64;
        if self.seen >= self.after {
            if let Some(f) = self.at.take() {
                f();
            }
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tripwire<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(n);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tripwire<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count(n);
        r
    }
}

#[tokio::test]
async fn chirp_server_killed_mid_transfer_is_a_clear_error_and_a_retry_succeeds() {
    let Some((_d, s)) = server() else { return };
    let s = Arc::new(Mutex::new(s));
    let addr = s.lock().unwrap().address();
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut c = ChirpClient::connect(&addr, &[Auth::Address], T)
        .await
        .unwrap();
    put(&mut c, "/old", b"the previous version").await;

    // Upload: killed after 8 MiB were read from the local file.
    let killer = Arc::clone(&s);
    let mut src = Tripwire::new(&data[..], 8 << 20, move || {
        killer.lock().unwrap().kill().unwrap();
    });
    let err = c
        .putfile_atomic("/old", 0o644, data.len() as u64, &mut src, &mut noop())
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(matches!(c.stat("/").await, Err(ChirpError::Broken)));
    s.lock().unwrap().restart().unwrap();
    let mut c = ChirpClient::connect(&addr, &[Auth::Address], T)
        .await
        .unwrap();
    assert_eq!(
        get(&mut c, "/old").await.unwrap(),
        b"the previous version",
        "a cut upload never replaces the file"
    );
    put(&mut c, "/old", &data).await;
    assert!(get(&mut c, "/old").await.unwrap() == data);

    // Download: killed after 8 MiB were written locally.
    let killer = Arc::clone(&s);
    let mut out = Tripwire::new(Vec::new(), 8 << 20, move || {
        killer.lock().unwrap().kill().unwrap();
    });
    let err = c
        .getfile("/old", &mut out, u64::MAX, &mut noop())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChirpError::Short { .. } | ChirpError::Disconnected { .. } | ChirpError::Io { .. }
        ),
        "{err}"
    );
    assert!(err.is_transient());
    assert!(out.inner.len() < data.len());
    s.lock().unwrap().restart().unwrap();
    let mut c = ChirpClient::connect(&addr, &[Auth::Address], T)
        .await
        .unwrap();
    assert!(
        get(&mut c, "/old").await.unwrap() == data,
        "the retry gets it all"
    );
}

/// A fake server on loopback that says `script` after reading a line, for each line.
async fn fake(script: Vec<&'static [u8]>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut sock, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        for answer in script {
            if sock.read(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            if tokio::io::AsyncWriteExt::write_all(&mut sock, answer)
                .await
                .is_err()
            {
                return;
            }
        }
        // Then silence, with the connection open.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    addr
}

#[tokio::test]
async fn chirp_misbehaving_servers_give_errors_not_hangs() {
    let short = Duration::from_millis(300);
    let long_line: &'static [u8] = Box::leak(vec![b'9'; 10_000].into_boxed_slice());
    let auth_ok: &'static [u8] = b"yes\nyes\nyes\naddress\n127.0.0.1\n";
    type Check = fn(&ChirpError) -> bool;
    let cases: Vec<(Vec<&'static [u8]>, Check)> = vec![
        // Says nothing at all.
        (vec![], |e| matches!(e, ChirpError::Timeout { .. })),
        // An endless line.
        (vec![long_line], |e| {
            matches!(e, ChirpError::Protocol { .. })
        }),
        // Closes after agreeing.
        (vec![b"yes\n"], |e| {
            matches!(
                e,
                ChirpError::Disconnected { .. } | ChirpError::Timeout { .. }
            )
        }),
        // Authenticates, then answers a stat with garbage.
        (vec![auth_ok, b"0\nnot a stat line\n"], |e| {
            matches!(e, ChirpError::Protocol { .. })
        }),
        // Promises a file and sends half of it.
        (vec![auth_ok, b"100\nonly this"], |e| {
            matches!(e, ChirpError::Timeout { .. })
        }),
    ];
    for (i, (script, check)) in cases.into_iter().enumerate() {
        let addr = fake(script).await;
        let result = async {
            let mut c = ChirpClient::connect(&addr, &[Auth::Address], short).await?;
            if i == 3 {
                c.stat("/x").await.map(drop)
            } else {
                get(&mut c, "/x").await.map(drop)
            }
        }
        .await;
        let err = result.unwrap_err();
        assert!(check(&err), "case {i}: {err}");
    }
}

#[test]
fn chirp_paths_are_encoded_as_the_server_decodes_them() {
    assert_eq!(
        encode_path("/a b/100%/x{y}").unwrap(),
        "/a%20b/100%25/x%7By%7D"
    );
    assert_eq!(encode_path("/é").unwrap(), "/%C3%A9");
    assert_eq!(encode_path("/q'\"<>\\").unwrap(), "/q%27%22%3C%3E%5C");
    assert!(encode_path("rel").is_err());
    assert!(encode_path("/a\nb").is_err());
}
