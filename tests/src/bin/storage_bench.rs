//! `storage-bench`: copilot's transfers next to the native tools, in one run on loopback.
//!
//! For each file size: HTTP download with copilot-storage (sha256 while it flows) against
//! `curl` (and `curl` followed by `sha256sum`, the same work), from one small HTTP file server
//! in this process; and Chirp download and upload with copilot-storage against `chirp_get` and
//! `chirp_put`, from a private `chirp_server`. Each measurement is the median of `--runs` runs;
//! files come from and go to the page cache of one temp dir. Prints a markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use copilot_protocol::Sha256;
use copilot_stack::ChirpServer;
use copilot_storage::{no_progress, Credential, GetSpec, Retry, Settings, Transfers, Upload, Url};

#[derive(Debug, Parser)]
#[command(
    about = "Measure copilot's HTTP and Chirp transfers next to curl, chirp_get and chirp_put"
)]
struct Args {
    /// File sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [100u64, 1024])]
    sizes: Vec<u64>,
    /// Runs per measurement (the median is shown).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Runs `cmd`, failing with its output if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn timed(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// A file server on 127.0.0.1: GET /<name> streams `dir/<name>`.
async fn file_server(dir: PathBuf) -> Result<String> {
    use axum::extract::{Path as UrlPath, State};
    use axum::response::IntoResponse;
    async fn get(
        State(dir): State<PathBuf>,
        UrlPath(name): UrlPath<String>,
    ) -> axum::response::Response {
        let path = dir.join(name);
        match tokio::fs::File::open(&path).await {
            Ok(f) => {
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                let body = axum::body::Body::from_stream(
                    tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024),
                );
                ([("content-length", len.to_string())], body).into_response()
            }
            Err(_) => axum::http::StatusCode::NOT_FOUND.into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/{name}", axum::routing::get(get))
        .with_state(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

fn write_file(path: &Path, mib: u64) -> Result<Sha256> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut h = copilot_protocol::digest::Hasher::new();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = ((i as usize * 31 + j * 7) % 251) as u8;
        }
        h.update(&block);
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(h.finish().0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_owned();
    let base = rt.block_on(file_server(dir.clone()))?;
    let chirp_dir = dir.join("chirp");
    let mut chirp = ChirpServer::start(&chirp_dir, "address:127.0.0.1 rwlda\n")
        .context("starting chirp_server")?;
    let transfers = Transfers::new(Settings {
        extra_root_pem: None,
        timeout: Duration::from_secs(600),
        retry: Retry { retries: 0 },
    })?;
    println!("| file | measurement | copilot | native tool | copilot ÷ native |");
    println!("|---|---|---:|---:|---:|");
    for &mib in &args.sizes {
        let name = format!("data-{mib}M");
        let src = dir.join(&name);
        let sha = write_file(&src, mib)?;
        let bytes = mib << 20;
        let spec = GetSpec {
            sha256: Some(sha),
            size: Some(bytes),
            limit: bytes,
        };
        let got = dir.join("got");
        let row = |what: &str, ours: Duration, theirs: Duration, tool: &str| {
            println!(
                "| {mib} MiB | {what} | {:.0} MiB/s | {:.0} MiB/s ({tool}) | {:.2} |",
                mib_s(bytes, ours),
                mib_s(bytes, theirs),
                theirs.as_secs_f64() / ours.as_secs_f64()
            );
        };

        // HTTP download.
        let url: Url = format!("{base}/{name}").parse()?;
        let ours = timed(args.runs, || {
            rt.block_on(transfers.get(&url, &got, &spec, &Credential::None, &no_progress()))?;
            Ok(())
        })?;
        let curl = timed(args.runs, || {
            run(Command::new("curl")
                .args(["-sS", "-o"])
                .arg(&got)
                .arg(url.as_str()))
        })?;
        let curl_sha = timed(args.runs, || {
            run(Command::new("curl")
                .args(["-sS", "-o"])
                .arg(&got)
                .arg(url.as_str()))?;
            run(Command::new("sha256sum").arg(&got))
        })?;
        row("HTTP GET, sha256 checked", ours, curl, "curl, no digest");
        row(
            "HTTP GET, sha256 checked",
            ours,
            curl_sha,
            "curl + sha256sum",
        );

        // Chirp download and upload.
        std::fs::copy(&src, chirp.root().join(&name))?;
        if nix::unistd::geteuid().is_root() {
            // The server runs as nobody and must read the file.
            std::os::unix::fs::chown(chirp.root().join(&name), Some(65534), Some(65534))?;
        }
        let addr = chirp.address();
        let curl_url: Url = format!("chirp://{addr}/{name}").parse()?;
        let ours = timed(args.runs, || {
            rt.block_on(transfers.get(&curl_url, &got, &spec, &Credential::None, &no_progress()))?;
            Ok(())
        })?;
        let native = timed(args.runs, || {
            run(Command::new("chirp_get")
                .args(["-a", "address", &addr, &format!("/{name}")])
                .arg(&got))
        })?;
        row(
            "Chirp get, sha256 checked",
            ours,
            native,
            "chirp_get, no digest",
        );
        let put_url: Url = format!("chirp://{addr}/put-ours").parse()?;
        let upload = Upload {
            sha256: sha,
            size: bytes,
        };
        let ours = timed(args.runs, || {
            rt.block_on(transfers.put(&src, &put_url, upload, &Credential::None, &no_progress()))?;
            Ok(())
        })?;
        let native = timed(args.runs, || {
            run(Command::new("chirp_put")
                .args(["-a", "address"])
                .arg(&src)
                .args([&addr, "/put-native"]))
        })?;
        row("Chirp put", ours, native, "chirp_put");
        let stored = std::fs::metadata(chirp.root().join("put-ours"))?.len();
        ensure!(
            stored == bytes,
            "the Chirp upload stored {stored} bytes, not {bytes}"
        );
        for f in ["put-ours", "put-native", name.as_str()] {
            let _ = std::fs::remove_file(chirp.root().join(f));
        }
        std::fs::remove_file(&src)?;
        let _ = std::fs::remove_file(&got);
    }
    chirp.kill()?;
    Ok(())
}
