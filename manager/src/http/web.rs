//! The web dashboard under `/ui`: pages rendered by `copilot_dashboard` from the same views as
//! the JSON API ([`super::views`]), its two static assets, a server-sent event stream that
//! tells open pages when jobs or agents changed, file downloads, and the login.
//!
//! **Login.** Pages need a session cookie (`copilot_session`, HttpOnly, SameSite=Lax) or the
//! API token as a bearer token. The cookie comes from `GET /ui/login?code=…` with a login code
//! that `copilot dashboard` (or `copilot up`) prints, or from the login form with the API token;
//! codes and cookies are `<expiry>.<HMAC>` keyed with the API token (`copilot_protocol::login`),
//! so nothing is stored server-side, a restart logs nobody out, and changing the token logs
//! everybody out. Pages are sent with a strict content security policy: only the manager's own
//! script and styles, no frames, no other origin.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use copilot_dashboard::{document, pages, Page};
use copilot_protocol::login::{self, Purpose, SESSION_TTL_SECS};
use serde::Deserialize;

use super::views::{self, SummaryQuery, Views, RECENT};
use super::{bearer, db, job_id, path, stamp, Answer, App, Fail};
use crate::fleet::{now_ms, now_secs};
use crate::queue::same_token;
use crate::Shared;

/// The session cookie's name.
pub const COOKIE: &str = "copilot_session";
/// How often the state of jobs and agents is checked for open pages.
const STAMP_EVERY: Duration = Duration::from_secs(1);
/// Largest login form body.
const MAX_LOGIN_BYTES: usize = 16 << 10;
/// The policy for every page: the manager's own script, styles and data only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The dashboard's routes (merged into the manager's router).
pub(super) fn routes() -> Router<App> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(work))
        .route("/ui/fleet", get(fleet))
        .route("/ui/contributions", get(contributions))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/jobs/{id}/output", get(job_output))
        .route("/ui/jobs/{id}/files/{*path}", get(job_file))
        .route("/ui/batches/{name}", get(batch))
        .route("/ui/events", get(events))
        .route("/ui/assets/style.css", get(style))
        .route("/ui/assets/app.js", get(script))
        .route("/ui/login", get(login_page).post(login_form))
        .route("/ui/logout", get(logout))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the request carries a valid session cookie or the API token.
fn logged_in(app: &App, headers: &HeaderMap) -> bool {
    let token = &app.shared.config.api_token;
    if let Some(v) = cookie(headers, COOKIE) {
        if login::verify(token, Purpose::Session, v, now_secs()).is_ok() {
            return true;
        }
    }
    bearer(headers).is_ok_and(|b| same_token(b, token))
}

fn partial(headers: &HeaderMap) -> bool {
    headers.contains_key("x-copilot-partial")
}

/// Where to go after logging in: a dashboard path, else the work page.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && !n.contains("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n.to_owned()
        }
        _ => "/ui/".to_owned(),
    }
}

fn with_security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Login codes in addresses never leave in a Referer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A whole page (or, for a page refreshing itself, the contents of its `<main>`).
async fn respond(app: &App, headers: &HeaderMap, status: StatusCode, page: &Page) -> Response {
    // A stamp that cannot be read only makes the page refresh once more.
    let stamp = app.stamp().await.unwrap_or_default();
    let mut resp = if partial(headers) {
        (status, page.body.clone()).into_response()
    } else {
        (status, document(page, &stamp)).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&stamp) {
        h.insert("x-copilot-stamp", v);
    }
    with_security_headers(resp)
}

/// Serve a page built by `build` to a logged-in user; others go to the login form.
async fn page<F>(app: App, headers: HeaderMap, uri: Uri, build: F) -> Response
where
    F: std::future::Future<Output = Answer<Page>>,
{
    if !logged_in(&app, &headers) {
        if partial(&headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let next = uri.path_and_query().map_or("/ui/", |p| p.as_str());
        let to = format!(
            "/ui/login?next={}",
            copilot_dashboard::html::url_part(&safe_next(Some(next)))
        );
        return Redirect::to(&to).into_response();
    }
    match build.await {
        Ok(p) => respond(&app, &headers, StatusCode::OK, &p).await,
        Err(Fail(status, message)) => {
            let title = if status == StatusCode::NOT_FOUND {
                "Not found"
            } else {
                "Error"
            };
            respond(&app, &headers, status, &pages::error(title, &message)).await
        }
    }
}

async fn work(
    State(app): State<App>,
    query: Result<Query<SummaryQuery>, QueryRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let a = app.clone();
    page(app, headers, uri, async move {
        let window = views::window(query)?;
        let summary = a.summary(window).await?;
        let recent = db(&a.shared, |q| q.recent(RECENT)).await?;
        Ok(pages::work(&summary, &recent))
    })
    .await
}

async fn fleet(State(app): State<App>, headers: HeaderMap, uri: Uri) -> Response {
    let list = app.shared.fleet.list();
    page(app, headers, uri, async move {
        Ok(pages::fleet(&list, now_ms()))
    })
    .await
}

async fn contributions(State(app): State<App>, headers: HeaderMap, uri: Uri) -> Response {
    let a = app.clone();
    page(app, headers, uri, async move {
        Ok(pages::contributions(&a.contributions().await?))
    })
    .await
}

async fn job(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let a = app.clone();
    page(app, headers, uri, async move {
        let id = job_id(id)?;
        Ok(pages::job(&a.job_detail(id).await?))
    })
    .await
}

async fn batch(
    State(app): State<App>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let a = app.clone();
    page(app, headers, uri, async move {
        let name = path(name)?;
        Ok(pages::batch(&a.batch(name).await?, now_ms()))
    })
    .await
}

/// Downloads need a session too; without one they answer 401 (a link, not a page).
fn require_login(app: &App, headers: &HeaderMap) -> Answer<()> {
    if logged_in(app, headers) {
        Ok(())
    } else {
        Err(Fail(
            StatusCode::UNAUTHORIZED,
            "log in at /ui/login first".into(),
        ))
    }
}

async fn job_file(
    State(app): State<App>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_login(&app, &headers)?;
    let (id, file) = views::named_job(p)?;
    app.file(id, file).await
}

async fn job_output(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_login(&app, &headers)?;
    super::serve_output(&app, job_id(id)?).await
}

/// Counts one page listening to the event stream while alive.
struct Listening(Arc<Views>);

impl Listening {
    fn new(views: Arc<Views>) -> Listening {
        views.listeners.fetch_add(1, Ordering::Relaxed);
        Listening(views)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `change` events whose id is the stamp of jobs and agents: one at once, then one whenever it
/// changes. Ends when the manager stops.
async fn events(State(app): State<App>, headers: HeaderMap) -> Answer<Response> {
    require_login(&app, &headers)?;
    let listening = Listening::new(app.views.clone());
    let mut rx = app.stamps.clone();
    let first = app.stamp().await?;
    rx.mark_unchanged();
    let event = |stamp: &str| Event::default().event("change").id(stamp).data(stamp);
    let now = futures::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(
        event(&first),
    )));
    let rest = futures::stream::unfold(
        (rx, first, listening),
        move |(mut rx, mut last, listening)| async move {
            loop {
                // The watcher ends at shutdown: so does the stream.
                rx.changed().await.ok()?;
                let stamp = rx.borrow_and_update().clone();
                if stamp != last {
                    last.clone_from(&stamp);
                    return Some((Ok(event(&stamp)), (rx, last, listening)));
                }
            }
        },
    );
    use futures::StreamExt;
    Ok(Sse::new(now.chain(rest))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Resolves once `stop` says so; never, if nothing can say it any more.
pub(super) async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Keep the stamp of jobs and agents current while a page listens. Ends at `stop`, or once
/// every router holding a receiver is gone; the event streams end with it.
pub(super) async fn watch_stamps(
    shared: Arc<Shared>,
    views: Arc<Views>,
    tx: tokio::sync::watch::Sender<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(STAMP_EVERY);
    let stopping = stopped(stop);
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            () = &mut stopping => return,
            () = tx.closed() => return,
            _ = tick.tick() => {}
        }
        if views.listeners.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match stamp(&shared).await {
            Ok(s) => {
                tx.send_if_modified(|cur| {
                    let changed = *cur != s;
                    if changed {
                        cur.clone_from(&s);
                    }
                    changed
                });
            }
            Err(e) => tracing::warn!("dashboard: cannot read the queue: {}", e.1),
        }
    }
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, kind)], body).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", copilot_dashboard::STYLE_CSS)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", copilot_dashboard::APP_JS)
}

/// The session cookie, valid for [`SESSION_TTL_SECS`].
fn session_cookie(app: &App) -> HeaderValue {
    let expiry = now_secs() + SESSION_TTL_SECS;
    let value = login::mint(&app.shared.config.api_token, Purpose::Session, expiry);
    let cookie =
        format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={SESSION_TTL_SECS}");
    // Digits, a dot, hex and fixed text: a valid header value.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn logged_in_to(app: &App, next: &str) -> Response {
    let mut resp = Redirect::to(next).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(app));
    with_security_headers(resp)
}

#[derive(Deserialize)]
struct LoginQuery {
    code: Option<String>,
    next: Option<String>,
}

async fn login_page(
    State(app): State<App>,
    query: Result<Query<LoginQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Query(q)) = query else {
        let p = pages::login("/ui/", Some("That login address is malformed."));
        return respond(&app, &headers, StatusCode::BAD_REQUEST, &p).await;
    };
    let next = safe_next(q.next.as_deref());
    if let Some(code) = q.code {
        return match login::verify(
            &app.shared.config.api_token,
            Purpose::Login,
            &code,
            now_secs(),
        ) {
            Ok(_) => logged_in_to(&app, &next),
            Err(e) => {
                let p = pages::login(&next, Some(&format!("That login link does not work: {e}.")));
                respond(&app, &headers, StatusCode::UNAUTHORIZED, &p).await
            }
        };
    }
    if logged_in(&app, &headers) {
        return Redirect::to(&next).into_response();
    }
    respond(&app, &headers, StatusCode::OK, &pages::login(&next, None)).await
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login_form(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let form = to_bytes(body, MAX_LOGIN_BYTES)
        .await
        .ok()
        .and_then(|b| serde_urlencoded::from_bytes::<LoginForm>(&b).ok());
    let Some(form) = form else {
        let p = pages::login("/ui/", Some("The form did not arrive whole; try again."));
        return respond(&app, &headers, StatusCode::BAD_REQUEST, &p).await;
    };
    let next = safe_next(form.next.as_deref());
    if same_token(form.token.trim(), &app.shared.config.api_token) {
        return logged_in_to(&app, &next);
    }
    let p = pages::login(
        &next,
        Some("That is not this manager's API token (api_token in its config)."),
    );
    respond(&app, &headers, StatusCode::UNAUTHORIZED, &p).await
}

async fn logout() -> Response {
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("copilot_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_the_dashboard() {
        assert_eq!(safe_next(Some("/ui/jobs/3")), "/ui/jobs/3");
        assert_eq!(
            safe_next(Some("/ui/batches/mc-pi?x=1")),
            "/ui/batches/mc-pi?x=1"
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil",
            "/ui/\\evil",
            "/api/jobs",
            "/ui/\nx",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; copilot_session=x.y".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE), Some("x.y"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }
}

/// The dashboard and the views over HTTP, on an in-process server with finished jobs.
#[cfg(test)]
mod served {
    use copilot_protocol::api::{FileView, CONTENT_SHA256_HEADER, STDOUT_ENTRY};
    use copilot_protocol::login::{mint, LOGIN_CODE_TTL_SECS};
    use copilot_protocol::summary::{BatchView, Contributions, JobEvents, Summary};
    use copilot_protocol::wire::{DoneReport, FileDigest, Outcome, Timings};
    use copilot_protocol::{JobId, JobSpec, JobState, Sha256};
    use reqwest::redirect::Policy;
    use reqwest::{Client, Response, StatusCode};

    use super::COOKIE;
    use crate::http::tests::Server;
    use copilot_archive::testutil::targz;

    const TOKEN: &str = "api-token-for-tests";
    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
    const CSV: &str = "lo,hi,count\n0,1,3\n1,2,5\n";

    /// Run a job named `name` on agent-1 to the end, returning `files` in its archive (and a
    /// stdout log); returns its id.
    async fn finish(s: &Server, name: &str, files: &[(&str, &str)]) -> JobId {
        s.shared
            .fleet
            .seen("agent-1", "agent-1@localhost/r", Some("0.1.0"))
            .unwrap();
        let mut spec = JobSpec::new(name, &["sh", "run.sh"]);
        spec.outputs = files.iter().map(|(p, _)| (*p).to_owned()).collect();
        assert_eq!(s.submit(vec![spec]).await.status(), StatusCode::CREATED);
        let c = s
            .shared
            .queue
            .claim("agent-1", None, HOUR, HOUR)
            .unwrap()
            .unwrap();
        let mut all: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (*p, d.as_bytes())).collect();
        all.push((STDOUT_ENTRY, b"pi ~ 3.14\n"));
        let archive = targz(&all);
        let r = s
            .upload(&c, c.attempt, &c.upload_token, archive.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let report = DoneReport {
            agent: "agent-1".into(),
            job: c.job,
            attempt: c.attempt,
            outcome: Outcome::Exited { code: 0 },
            timings: Timings {
                stage_in_ms: 5,
                run_ms: 1500,
                stage_out_ms: 7,
                cpu_ms: None,
            },
            archive: Some((Sha256::of(&archive), archive.len() as u64)),
            files: all
                .iter()
                .map(|(p, d)| FileDigest {
                    path: (*p).into(),
                    size: d.len() as u64,
                    sha256: Sha256::of(d),
                })
                .collect(),
            sandbox: Default::default(),
            volunteer: None,
            want_more: false,
        };
        s.shared.queue.complete("agent-1", &report).unwrap();
        s.shared.fleet.finished("agent-1", c.job, true);
        c.job
    }

    fn browser() -> Client {
        Client::builder().redirect(Policy::none()).build().unwrap()
    }

    fn location(r: &Response) -> &str {
        r.headers()["location"].to_str().unwrap()
    }

    /// The session cookie a response sets.
    fn session(r: &Response) -> String {
        let set = r.headers()["set-cookie"].to_str().unwrap();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Lax"),
            "{set}"
        );
        set.split(';').next().unwrap().to_owned()
    }

    #[tokio::test]
    async fn pages_need_a_login_which_a_code_or_the_token_gives() {
        let s = Server::start().await;
        let b = browser();
        let get = |path: &str| b.get(format!("{}{path}", s.base));
        let r = get("/ui/batches/x?y=1").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&r), "/ui/login?next=%2Fui%2Fbatches%2Fx%3Fy%3D1");
        let r = get("/").send().await.unwrap();
        assert_eq!(location(&r), "/ui/");
        let r = get("/ui/")
            .header("x-copilot-partial", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a refreshing page");
        for path in ["/ui/events", "/ui/jobs/1/files/a.txt", "/ui/jobs/1/output"] {
            let r = get(path).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        let r = get("/ui/login?next=/ui/fleet").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let form = r.text().await.unwrap();
        assert!(form.contains("name=\"next\" value=\"/ui/fleet\""), "{form}");

        // A login code: a cookie, and on to where the link said.
        let now = crate::fleet::now_secs();
        let code = mint(
            TOKEN,
            copilot_protocol::login::Purpose::Login,
            now + LOGIN_CODE_TTL_SECS,
        );
        let r = get(&format!("/ui/login?code={code}&next=/ui/fleet"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&r), "/ui/fleet");
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        let cookie = session(&r);
        assert!(cookie.starts_with(&format!("{COOKIE}=")));
        let r = get("/ui/").header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert!(r.text().await.unwrap().contains("id=\"count-queued\">0<"));
        // Codes made with another token, or expired, are refused and say so.
        let other = mint("another", copilot_protocol::login::Purpose::Login, now + 60);
        let expired = mint(TOKEN, copilot_protocol::login::Purpose::Login, now - 1);
        for (code, why) in [(other, "API token"), (expired, "expired")] {
            let r = get(&format!("/ui/login?code={code}")).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            assert!(r.text().await.unwrap().contains(why));
        }
        // The form with the token; a wrong token; the bearer token instead of a cookie.
        let post = |body: &str| {
            b.post(format!("{}/ui/login", s.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.to_owned())
                .send()
        };
        let r = post("token=nope&next=%2Fui%2Ffleet").await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.text().await.unwrap().contains("not this manager"));
        let r = post(&format!("token={TOKEN}&next=https%3A%2F%2Fevil.example%2F"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&r), "/ui/", "only dashboard paths");
        session(&r);
        let r = get("/ui/fleet").bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = get("/ui/logout").send().await.unwrap();
        assert!(r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0"));
        // Assets need no login.
        let r = get("/ui/assets/app.js").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript"));
        assert!(r.text().await.unwrap().contains("EventSource"));
    }

    #[tokio::test]
    async fn views_and_pages_show_a_finished_batch() {
        let s = &Server::start().await;
        let ids = [
            finish(s, "mc#0", &[("histogram.csv", CSV)]).await,
            finish(
                s,
                "mc#1",
                &[("histogram.csv", "lo,hi,count\n0,1,1\n1,2,1\n")],
            )
            .await,
        ];
        let api = |path: String| async move {
            let r = s.get(&path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            r
        };
        let sum: Summary = api("/api/summary?window=10m".into())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(sum.counts[&JobState::Done], 2);
        assert_eq!(sum.activity.done.iter().sum::<u64>(), 2);
        assert_eq!(sum.activity.bucket_ms, 10_000);
        assert_eq!((sum.batches.len(), sum.batches[0].name.as_str()), (1, "mc"));
        assert_eq!(sum.agents_online, 1);
        let r = s.get("/api/summary?window=often").await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);

        let ev: JobEvents = api(format!("/api/jobs/{}/events", ids[0]))
            .await
            .json()
            .await
            .unwrap();
        let states: Vec<JobState> = ev.events.iter().map(|e| e.to).collect();
        assert_eq!(
            states,
            [
                JobState::Queued,
                JobState::Assigned,
                JobState::Uploading,
                JobState::Done
            ]
        );
        let r = api(format!("/api/jobs/{}/files/histogram.csv", ids[0])).await;
        assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(
            r.headers()[CONTENT_SHA256_HEADER].to_str().unwrap(),
            Sha256::of(CSV.as_bytes()).to_string()
        );
        assert_eq!(r.text().await.unwrap(), CSV);
        let r = s.get(&format!("/api/jobs/{}/files/nope.csv", ids[0])).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(s.get("/api/jobs/99/events").await.status() == StatusCode::NOT_FOUND);

        let batch: BatchView = api("/api/batches/mc".into()).await.json().await.unwrap();
        assert_eq!(batch.jobs.len(), 2);
        assert_eq!(batch.plots.len(), 1);
        let plot = &batch.plots[0];
        assert_eq!(
            (plot.path.as_str(), plot.replicas.len()),
            ("histogram.csv", 2)
        );
        let sums: Vec<f64> = plot.sum.as_ref().unwrap().iter().map(|b| b.value).collect();
        assert_eq!(sums, [4.0, 6.0]);
        assert_eq!(
            s.get("/api/batches/m").await.status(),
            StatusCode::NOT_FOUND
        );

        let c: Contributions = api("/api/contributions".into()).await.json().await.unwrap();
        assert_eq!(c.hosts.len(), 1);
        assert_eq!((c.hosts[0].jobs_done, c.hosts[0].run_seconds), (2, 3.0));
        assert!(c.volunteers.is_empty());

        // The pages, with the bearer token.
        let page = |path: String| async move {
            let r = s.get(&path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            r.text().await.unwrap()
        };
        let job = page(format!("/ui/jobs/{}", ids[0])).await;
        assert!(job.contains("✓ verified"), "{job}");
        assert!(job.contains("data-series=\"1\" data-bins=\"2\""));
        assert!(job.contains("pi ~ 3.14"));
        assert!(job.contains(&format!("href=\"/ui/jobs/{}/files/histogram.csv\"", ids[0])));
        let batch = page("/ui/batches/mc".into()).await;
        assert!(
            batch.contains("data-series=\"3\" data-bins=\"2\""),
            "two replicas and the mean"
        );
        assert!(batch.contains("data-label=\"sum\" data-total=\"10\""));
        let work = page("/ui/".into()).await;
        assert!(work.contains("id=\"count-done\">2<"));
        assert!(work.contains("data-batch=\"mc\""));
        let partial = s
            .req(reqwest::Method::GET, "/ui/fleet")
            .header("x-copilot-partial", "1")
            .send()
            .await
            .unwrap();
        assert!(partial.headers().contains_key("x-copilot-stamp"));
        let body = partial.text().await.unwrap();
        assert!(body.starts_with("<h1>Fleet</h1>") && !body.contains("<html"));
        assert!(page("/ui/contributions".into())
            .await
            .contains("data-jobs-done=\"2\""));
        let r = s.get("/ui/jobs/77").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.text().await.unwrap().contains("there is no job 77"));
        let r = s.get(&format!("/ui/jobs/{}/output", ids[1])).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/gzip");
        let file: Vec<FileView> = s.shared.queue.job(ids[1]).unwrap().unwrap().files;
        assert_eq!(file.len(), 2);
    }

    #[tokio::test]
    async fn the_event_stream_says_when_something_changed() {
        use futures::StreamExt;
        let s = Server::start().await;
        let r = s.get("/ui/events").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut body = r.bytes_stream();
        let mut seen = String::new();
        let mut next_event = async || loop {
            if let Some(end) = seen.find("\n\n") {
                let ev: String = seen.drain(..end + 2).collect();
                if ev.contains("event: change") {
                    return ev;
                }
                continue;
            }
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), body.next())
                .await
                .expect("an event within 10 s")
                .expect("the stream goes on")
                .unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        };
        let first = next_event().await;
        assert!(first.contains("id: 0-"), "{first}");
        s.submit(vec![crate::http::tests::spec()]).await;
        let second = next_event().await;
        assert!(second.contains("id: 1-"), "{second}");
    }
}
