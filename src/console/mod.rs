//! The operator console, served next to `/metrics` and `/healthz`: an overview of the
//! queues, pages of rows with filters, one row with its attempt history, and the actions an
//! operator takes (retry, cancel, pause, resume, retry a seller's failed rows), each through
//! the same store methods the CLI calls. Without `[http] console_token` it is read-only;
//! with it, actions need a login (see [`auth`]).

pub mod auth;
pub mod pages;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use maud::Markup;
use serde::Deserialize;

use crate::clock::Clock;
use crate::depths::Depths;
use crate::secret::Secret;
use crate::store::driver::PauseParams;
use crate::store::driver::{InspectStore as _, QueueStore as _};
use crate::store::page::RowFilter;
use crate::store::{Database, QueueName, StoreError};
use auth::{Gate, Refusal, SESSION_COOKIE};
use pages::{Flash, Visitor};

/// Rows per page of `GET /rows`.
const PAGE_ROWS: u32 = 50;

/// The chart covers this much time.
const CHART_SPAN_MS: i64 = 3_600_000;

/// What the console's handlers share.
pub struct Console {
    store: Database,
    depths: Depths,
    gate: Gate,
    clock: Clock,
    /// Served on a loopback address: only loopback `Host` names are answered.
    loopback_only: bool,
}

impl Console {
    /// A console over `store`, showing the counts `depths` keeps, with actions allowed to
    /// whoever logs in with `token` (none = read-only), served on `listen`.
    pub fn new(
        store: Database,
        depths: Depths,
        token: Option<Secret>,
        clock: Clock,
        listen: std::net::SocketAddr,
    ) -> Console {
        Console {
            store,
            depths,
            gate: Gate::new(token),
            clock,
            loopback_only: listen.ip().is_loopback(),
        }
    }

    fn visitor(&self, jar: &CookieJar) -> Visitor {
        if !self.gate.actions_enabled() {
            return Visitor::ReadOnly;
        }
        match self
            .gate
            .csrf_of(jar.get(SESSION_COOKIE).map(|c| c.value()))
        {
            Some(csrf) => Visitor::LoggedIn { csrf },
            None => Visitor::LoggedOut,
        }
    }

    /// The queue an action names, once the action may go ahead (else the page to answer
    /// with: a refusal, or a bad queue name).
    fn action_on(
        &self,
        jar: &CookieJar,
        csrf: &str,
        queue: &str,
    ) -> Result<QueueName, Box<Response>> {
        if let Some(refused) = self.refusal(jar, csrf) {
            return Err(Box::new(refused));
        }
        parse_queue(queue)
            .ok_or_else(|| Box::new(after_action("/", "queue must be rebill or title", true)))
    }

    /// The refusal page when the action with form token `csrf` may not go ahead.
    fn refusal(&self, jar: &CookieJar, csrf: &str) -> Option<Response> {
        self.gate
            .authorize(jar.get(SESSION_COOKIE).map(|c| c.value()), csrf)
            .err()
            .map(|refusal| self.refused(jar, refusal))
    }

    fn refused(&self, jar: &CookieJar, refusal: Refusal) -> Response {
        let status = match refusal {
            Refusal::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
            Refusal::WrongToken | Refusal::NotLoggedIn => StatusCode::UNAUTHORIZED,
            Refusal::ReadOnly | Refusal::BadCsrf => StatusCode::FORBIDDEN,
        };
        page(
            status,
            pages::message("Refused", &refusal.to_string(), &self.visitor(jar)),
        )
    }
}

/// Whether `host` (a `Host` header) names this machine's loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// On a loopback `listen`, refuses requests whose `Host` is another name: a web page the
/// operator visits could otherwise point its own name at 127.0.0.1 (DNS rebinding) and
/// read the console.
async fn host_guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    if console.loopback_only {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !is_loopback_host(host) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "this console answers only to localhost, 127.0.0.1 or [::1]\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// The console's routes, to merge beside `/metrics` and `/healthz`.
pub fn routes(console: Arc<Console>) -> Router {
    let guard = axum::middleware::from_fn_with_state(console.clone(), host_guard);
    Router::new()
        .route("/", get(overview))
        .route("/style.css", get(stylesheet))
        .route("/rows", get(rows))
        .route("/rows/{queue}/{id}", get(row))
        .route("/rows/{queue}/{id}/retry", post(retry_row))
        .route("/rows/{queue}/{id}/cancel", post(cancel_row))
        .route("/pauses/pause", post(pause))
        .route("/pauses/resume", post(resume))
        .route("/sellers/retry-failed", post(retry_seller))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .layer(guard)
        .with_state(console)
}

fn page(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // No scripts, no frames, nothing from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        markup.into_string(),
    )
        .into_response()
}

fn store_failed(console: &Console, jar: &CookieJar, e: &StoreError) -> Response {
    tracing::warn!(error = %e, "console: the database refused a request");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        pages::message(
            "Database unavailable",
            &format!("the database did not answer: {e}"),
            &console.visitor(jar),
        ),
    )
}

fn parse_queue(text: &str) -> Option<QueueName> {
    text.parse().ok()
}

/// `?msg=…&error=1&sig=…` after an action, shown at the top of the page it redirects to.
#[derive(Debug, Default, Deserialize)]
struct FlashQuery {
    msg: Option<String>,
    error: Option<String>,
    sig: Option<String>,
}

impl FlashQuery {
    /// The message, if this console wrote it (a link from elsewhere cannot make the console
    /// say something in its own voice).
    fn flash(&self) -> Option<Flash> {
        use hmac::Mac;
        let text = self.msg.as_ref()?;
        let error = self.error.is_some();
        let sig = self.sig.as_deref()?;
        let mac = flash_mac(text, error);
        hex::decode(sig)
            .ok()
            .filter(|sig| sig.len() == FLASH_SIG_BYTES && mac.verify_truncated_left(sig).is_ok())?;
        Some(Flash {
            text: text.chars().take(300).collect(),
            error,
        })
    }
}

/// Bytes of the flash signature kept in the URL.
const FLASH_SIG_BYTES: usize = 16;

/// The MAC of a flash message under this process's random key.
fn flash_mac(text: &str, error: bool) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(if error { b"e:" } else { b"o:" });
    mac.update(text.as_bytes());
    mac
}

/// A redirect to `to` that shows `msg` there.
fn after_action(to: &str, msg: &str, error: bool) -> Response {
    use hmac::Mac;
    let sig = hex::encode(&flash_mac(msg, error).finalize().into_bytes()[..FLASH_SIG_BYTES]);
    let mut pairs = vec![("msg", msg)];
    if error {
        pairs.push(("error", "1"));
    }
    pairs.push(("sig", &sig));
    let sep = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{sep}{}", pages::query(&pairs))).into_response()
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("style.css"),
    )
        .into_response()
}

async fn overview(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Query(flash): Query<FlashQuery>,
) -> Response {
    let now = console.clock.now_ms();
    let mut snapshot = console.depths.latest();
    // Pauses are few and read by key: fresh, so an action's result shows at once.
    match console.store.pauses(now).await {
        Ok(pauses) => snapshot.pauses = pauses,
        Err(e) => return store_failed(&console, &jar, &e),
    }
    let mut charts = Vec::with_capacity(QueueName::ALL.len());
    for queue in QueueName::ALL {
        match console
            .store
            .attempts_per_minute(queue, now - CHART_SPAN_MS)
            .await
        {
            Ok(minutes) => charts.push((queue, minutes)),
            Err(e) => return store_failed(&console, &jar, &e),
        }
    }
    let visitor = console.visitor(&jar);
    page(
        StatusCode::OK,
        pages::overview(&snapshot, &charts, now, &visitor, flash.flash().as_ref()),
    )
}

/// `GET /rows` query.
#[derive(Debug, Default, Deserialize)]
struct RowsQuery {
    queue: Option<String>,
    status: Option<String>,
    seller: Option<String>,
    q: Option<String>,
    after: Option<String>,
}

/// An empty form field means "any".
fn given(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

async fn rows(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Query(q): Query<RowsQuery>,
) -> Response {
    let visitor = console.visitor(&jar);
    let queue = match q.queue.as_deref().map(parse_queue) {
        None => QueueName::Rebill,
        Some(Some(queue)) => queue,
        Some(None) => {
            return page(
                StatusCode::BAD_REQUEST,
                pages::message("Bad request", "queue must be rebill or title", &visitor),
            )
        }
    };
    let status = given(q.status);
    if let Some(s) = &status {
        if !crate::depths::STATUSES.contains(&s.as_str()) {
            return page(
                StatusCode::BAD_REQUEST,
                pages::message(
                    "Bad request",
                    &format!("status {s:?} does not exist"),
                    &visitor,
                ),
            );
        }
    }
    let filter = RowFilter {
        status,
        seller: given(q.seller),
        text: given(q.q),
    };
    let after = given(q.after).and_then(|a| pages::parse_cursor(&a));
    match console
        .store
        .rows_page(queue, &filter, after, PAGE_ROWS)
        .await
    {
        Ok(found) => page(
            StatusCode::OK,
            pages::rows(queue, &filter, &found, &visitor),
        ),
        Err(e) => store_failed(&console, &jar, &e),
    }
}

async fn row(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Path((queue, id)): Path<(String, i64)>,
    Query(flash): Query<FlashQuery>,
) -> Response {
    let visitor = console.visitor(&jar);
    let Some(queue) = parse_queue(&queue) else {
        return page(
            StatusCode::NOT_FOUND,
            pages::message("Not found", "no such queue", &visitor),
        );
    };
    match console.store.show(queue, id).await {
        Ok(Some(detail)) => page(
            StatusCode::OK,
            pages::row_detail(&detail, &visitor, flash.flash().as_ref()),
        ),
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            pages::message(
                "Not found",
                &format!("no row {id} in the {} queue", queue.as_str()),
                &visitor,
            ),
        ),
        Err(e) => store_failed(&console, &jar, &e),
    }
}

/// The form of every action: its CSRF token.
#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Retry or cancel one row.
async fn row_action(
    console: &Console,
    jar: &CookieJar,
    queue: &str,
    id: i64,
    csrf: &str,
    retry: bool,
) -> Response {
    let queue = match console.action_on(jar, csrf, queue) {
        Ok(queue) => queue,
        Err(answer) => return *answer,
    };
    let back = format!("/rows/{}/{id}", queue.as_str());
    let changed = if retry {
        console.store.retry(queue, &[id]).await
    } else {
        console.store.cancel(queue, &[id]).await
    };
    let (verb, allowed) = if retry {
        ("pending again", "failed, rejected or cancelled")
    } else {
        ("cancelled", "pending")
    };
    match changed {
        Ok(ids) if ids.contains(&id) => {
            tracing::info!(
                queue = queue.as_str(),
                row_id = id,
                action = verb,
                "console action"
            );
            after_action(&back, &format!("row {id} is {verb}"), false)
        }
        Ok(_) => after_action(
            &back,
            &format!("row {id} was not changed: only {allowed} rows can be"),
            true,
        ),
        Err(e) => after_action(&back, &format!("not done: {e}"), true),
    }
}

async fn retry_row(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Path((queue, id)): Path<(String, i64)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    row_action(&console, &jar, &queue, id, &form.csrf, true).await
}

async fn cancel_row(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Path((queue, id)): Path<(String, i64)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    row_action(&console, &jar, &queue, id, &form.csrf, false).await
}

/// Pause or resume a seller (or `*`, the whole queue).
#[derive(Debug, Deserialize)]
struct PauseForm {
    #[serde(default)]
    csrf: String,
    queue: String,
    scope: String,
    #[serde(rename = "for")]
    duration: Option<String>,
}

async fn pause(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Form(form): Form<PauseForm>,
) -> Response {
    let queue = match console.action_on(&jar, &form.csrf, &form.queue) {
        Ok(queue) => queue,
        Err(answer) => return *answer,
    };
    let scope = form.scope.trim();
    if scope.is_empty() {
        return after_action("/", "name a seller, or * for the whole queue", true);
    }
    let text = form.duration.as_deref().unwrap_or("1h").trim();
    let duration = match humantime::parse_duration(text) {
        Ok(d) if d >= Duration::from_secs(1) => d,
        _ => {
            return after_action(
                "/",
                &format!("for: {text:?} is not a duration such as 30m or 2h"),
                true,
            )
        }
    };
    let until = i64::try_from(duration.as_millis())
        .ok()
        .and_then(|ms| console.clock.now_ms().checked_add(ms))
        .unwrap_or(i64::MAX);
    match console
        .store
        .pause(PauseParams {
            queue,
            scope,
            until,
            reason: "paused by operator (console)",
            now: console.clock.now_ms(),
        })
        .await
    {
        Ok(()) => {
            tracing::info!(queue = queue.as_str(), scope, "console action: paused");
            after_action(
                "/",
                &format!(
                    "{} {scope} paused for {}",
                    queue.as_str(),
                    humantime::format_duration(duration)
                ),
                false,
            )
        }
        Err(e) => after_action("/", &format!("not paused: {e}"), true),
    }
}

async fn resume(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Form(form): Form<PauseForm>,
) -> Response {
    let queue = match console.action_on(&jar, &form.csrf, &form.queue) {
        Ok(queue) => queue,
        Err(answer) => return *answer,
    };
    let scope = form.scope.trim();
    match console
        .store
        .resume(queue, scope, console.clock.now_ms())
        .await
    {
        Ok(true) => {
            tracing::info!(queue = queue.as_str(), scope, "console action: resumed");
            after_action("/", &format!("{} {scope} resumed", queue.as_str()), false)
        }
        Ok(false) => after_action(
            "/",
            &format!("{} {scope} was not paused", queue.as_str()),
            true,
        ),
        Err(e) => after_action("/", &format!("not resumed: {e}"), true),
    }
}

/// Retry every failed row of one seller.
#[derive(Debug, Deserialize)]
struct SellerForm {
    #[serde(default)]
    csrf: String,
    queue: String,
    seller: String,
}

async fn retry_seller(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Form(form): Form<SellerForm>,
) -> Response {
    let queue = match console.action_on(&jar, &form.csrf, &form.queue) {
        Ok(queue) => queue,
        Err(answer) => return *answer,
    };
    let back = format!(
        "/rows?{}",
        pages::query(&[("queue", queue.as_str()), ("seller", &form.seller)])
    );
    match console.store.retry_failed(queue, Some(&form.seller)).await {
        Ok(n) => {
            tracing::info!(queue = queue.as_str(), seller = %form.seller, rows = n, "console action: retried failed rows");
            after_action(
                &back,
                &format!("{n} failed rows of {} are pending again", form.seller),
                false,
            )
        }
        Err(e) => after_action(&back, &format!("not done: {e}"), true),
    }
}

/// `GET /login?next=…`.
#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only a path on this console may follow a login (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    // Browsers drop tabs and newlines from a Location and read `\` as `/`, so `/\t/evil`
    // would become `//evil`: only plain path characters are kept.
    let plain = |n: &str| n.chars().all(|c| c.is_ascii_graphic() && c != '\\');
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && plain(n) => n.to_string(),
        _ => "/".to_string(),
    }
}

async fn login_page(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    page(
        StatusCode::OK,
        pages::login(&next, None, &console.visitor(&jar)),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    next: Option<String>,
}

async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(client): ConnectInfo<std::net::SocketAddr>,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    match console.gate.login(client.ip(), &form.token) {
        Ok(session) => {
            let cookie = Cookie::build((SESSION_COOKIE, session))
                .path("/")
                .http_only(true)
                .same_site(SameSite::Strict)
                .build();
            (jar.add(cookie), Redirect::to(&next)).into_response()
        }
        Err(refusal) => {
            let status = match refusal {
                Refusal::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
                Refusal::ReadOnly => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            page(
                status,
                pages::login(&next, Some(&refusal.to_string()), &console.visitor(&jar)),
            )
        }
    }
}

async fn logout(
    State(console): State<Arc<Console>>,
    jar: CookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = console.refusal(&jar, &form.csrf) {
        return refused;
    }
    console
        .gate
        .logout(jar.get(SESSION_COOKIE).map(|c| c.value()));
    let jar = jar.remove(Cookie::build(SESSION_COOKIE).path("/"));
    (jar, Redirect::to("/")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_other_names() {
        for host in [
            "localhost",
            "localhost:9187",
            "127.0.0.1:9187",
            "127.0.0.2",
            "[::1]:9187",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9187",
            "",
            "10.0.0.1:9187",
            "[2001:db8::1]:80",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn only_local_paths_follow_a_login() {
        assert_eq!(safe_next(Some("/rows/rebill/1")), "/rows/rebill/1");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/ /evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
