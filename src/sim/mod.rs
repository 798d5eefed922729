//! Simulated remote servers: the fw199 `rebillingnew` gateway, 开票精灵's
//! `TokenAction` / `OpenAction` / `thirdApi` (FPTT1001) endpoints, and the alert robots
//! (WeCom, DingTalk, Feishu and a plain JSON webhook, see `robots`).
//!
//! One [`Simulator`] runs a single axum server on `127.0.0.1:0` that serves every route.
//! It is used by `invoice-worker sandbox`, the integration tests and the benchmark, so it
//! is part of the library and is built to be fast (a handful of short lock acquisitions
//! per request) and strict: requests are verified the way the real servers verify them
//! (form decoding like a Java servlet, the gateway signature, strict Base64, the FPTT1001
//! field rules) before any scripted behaviour is applied.
//!
//! Tests script answers per order number with [`Simulator::script_rebill`] and
//! [`Simulator::script_title`]: each request for that order consumes one step and the last
//! step repeats forever. Without a script, rebill answers `{"code":0,"message":"重试成功"}`
//! and the title server answers success. [`Simulator::script_token`] scripts TokenAction
//! the same way (one step per call), for a token service that is down or careless.
//!
//! Every request is recorded ([`RebillRecord`], [`TitleRecord`]) so tests can check what
//! actually went over the wire, which serials the title server accepted
//! ([`Simulator::accepted_serials`]) and whether the same order was ever sent twice at once
//! ([`Simulator::overlapping_sends`]).
//!
//! The robots verify their signatures with [`SimOptions::robot_secret`] (a signature is
//! optional unless [`Simulator::require_robot_signature`] asks for one), answer per robot
//! key as [`Simulator::script_robot`] says (success by default) and record every message
//! ([`Simulator::robot_messages`]).

mod form;
mod rebill;
mod robots;
mod title;

#[cfg(test)]
mod robot_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use md5::{Digest, Md5};

pub use rebill::issued_invoice;
pub use robots::{RobotBehavior, RobotMessage};

/// A configuration that points both queues at `sim` with the credentials `opts` gave it,
/// on the database `db`, housekeeping off. Callers adjust timings and limits.
pub fn config_for(
    sim: &Simulator,
    opts: &SimOptions,
    db: &std::path::Path,
) -> crate::config::Config {
    use crate::secret::Secret;
    let mut c = crate::config::Config::default();
    c.database.path = db.to_path_buf();
    c.housekeeping.enabled = false;
    c.rebill.endpoint = sim.rebill_url();
    c.rebill.appid = Some(opts.rebill_appid.clone());
    c.rebill.app_secret = Some(Secret::new(opts.rebill_secret.clone()));
    c.title.base_url = Some(sim.title_base_url());
    c.title.client_id = Some(opts.title_client_id.clone());
    c.title.client_secret = Some(Secret::new(opts.title_client_secret.clone()));
    c
}

/// Settings of a [`Simulator`].
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The partner AppId the rebill gateway accepts.
    pub rebill_appid: String,
    /// The AppSecret the rebill gateway signs with.
    pub rebill_secret: String,
    /// The `client_id` the title platform accepts.
    pub title_client_id: String,
    /// The `client_secret` the title platform accepts.
    pub title_client_secret: String,
    /// Added to every rebill and `thirdApi` answer (not to TokenAction / OpenAction).
    pub latency: Duration,
    /// Added to every TokenAction answer: a slow token service, so that jobs needing a
    /// token at once really do wait for the same renewal.
    pub token_latency: Duration,
    /// How `thirdApi` answers an invalid access token: HTTP 401 (`true`) or HTTP 200 with a
    /// reply whose REPLYMSG is `access_token无效` (`false`).
    pub token_reply_401: bool,
    /// The signing secret the DingTalk, Feishu and webhook robots verify signatures with.
    pub robot_secret: String,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            rebill_appid: "sandbox-appid".to_owned(),
            rebill_secret: "sandbox-secret".to_owned(),
            title_client_id: "sandbox-client".to_owned(),
            title_client_secret: "sandbox-client-secret".to_owned(),
            latency: Duration::ZERO,
            token_latency: Duration::ZERO,
            token_reply_401: false,
            robot_secret: "sandbox-robot-secret".to_owned(),
        }
    }
}

/// One scripted answer of the rebill gateway (applied only to requests that passed
/// verification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebillBehavior {
    /// `{"code":0,"message":"重试成功"}`.
    Accepted,
    /// `code` 100 with `invoice_no` and `invoice_down_url` derived from the orderno
    /// (see [`issued_invoice`]).
    Issued,
    /// Any failure: `{"code":code,"message":message}`.
    Fail {
        /// The `code` field.
        code: i64,
        /// The `message` field.
        message: String,
    },
    /// Success with the code as a JSON string: `{"code":"0",…}`.
    CodeAsString,
    /// This HTTP status with a small plain-text body.
    Status(u16),
    /// HTTP 429 with `Retry-After: retry_after_secs`.
    TooMany {
        /// The `Retry-After` value in seconds.
        retry_after_secs: u64,
    },
    /// HTTP 200 with an HTML error page.
    Html,
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// HTTP 200 with an empty body.
    Empty,
    /// HTTP 200 with a 2 MiB body (chunked, no `Content-Length`) that would read as
    /// `{"code":0,…}` if a client did not cap the size.
    Oversized,
    /// HTTP 200 with `{"code":[1],"message":5}`.
    WrongTypes,
    /// Sleep this long, then answer code 0 (for client timeouts).
    Delay(Duration),
    /// Send the headers and part of the body, then abort the connection.
    Reset,
}

impl RebillBehavior {
    /// The behaviour's name as recorded in [`RebillRecord::answered`].
    pub fn name(&self) -> &'static str {
        match self {
            RebillBehavior::Accepted => "Accepted",
            RebillBehavior::Issued => "Issued",
            RebillBehavior::Fail { .. } => "Fail",
            RebillBehavior::CodeAsString => "CodeAsString",
            RebillBehavior::Status(_) => "Status",
            RebillBehavior::TooMany { .. } => "TooMany",
            RebillBehavior::Html => "Html",
            RebillBehavior::Garbage => "Garbage",
            RebillBehavior::Empty => "Empty",
            RebillBehavior::Oversized => "Oversized",
            RebillBehavior::WrongTypes => "WrongTypes",
            RebillBehavior::Delay(_) => "Delay",
            RebillBehavior::Reset => "Reset",
        }
    }
}

/// One scripted answer of the title platform's `thirdApi` (applied only to requests that
/// passed verification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TitleBehavior {
    /// Accept the serial and answer `0000` success in the request's format.
    Ok,
    /// Answer REPLYCODE `9001`, REPLYMSG `抬头请求流水号重复`. The serial counts as
    /// accepted (the server claims to have it already).
    Duplicate,
    /// Any failure reply (serial not accepted).
    Fail {
        /// The REPLYCODE.
        code: String,
        /// The REPLYMSG.
        message: String,
    },
    /// This HTTP status with a small plain-text body (serial not accepted).
    Status(u16),
    /// Treat the access token as invalid for this request, as if it had just expired
    /// (HTTP 401 or an `access_token无效` reply per [`SimOptions::token_reply_401`]).
    TokenExpired,
    /// Record the serial as accepted, sleep this long, then answer success: a send that
    /// times out at the client but did arrive.
    Late(Duration),
    /// Accept and answer success in the `{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":"0",…}}}}`
    /// JSON shape, whatever the request's `dataType`.
    AltShape,
    /// Accept and answer REPLYCODE `1000` with `BODY/Code` `0000`, in the request's format.
    Code1000,
    /// HTTP 200 with a body that is neither JSON nor XML (serial not accepted).
    Garbage,
    /// Send the headers and part of the body, then abort the connection (serial not
    /// accepted).
    Reset,
    /// HTTP 503 with `Retry-After: retry_after_secs` and a plain-text body: the platform
    /// is overloaded (serial not accepted).
    Busy {
        /// The `Retry-After` value in seconds.
        retry_after_secs: u64,
    },
    /// HTTP 400 with an HTML error page quoting the request, as a careless servlet
    /// container does: the decoded `data` and `access_token` parameters and the raw query
    /// string (serial not accepted). Tests check that clients repeat none of it.
    EchoQuery,
}

impl TitleBehavior {
    /// The behaviour's name as recorded in [`TitleRecord::answered`].
    pub fn name(&self) -> &'static str {
        match self {
            TitleBehavior::Ok => "Ok",
            TitleBehavior::Duplicate => "Duplicate",
            TitleBehavior::Fail { .. } => "Fail",
            TitleBehavior::Status(_) => "Status",
            TitleBehavior::TokenExpired => "TokenExpired",
            TitleBehavior::Late(_) => "Late",
            TitleBehavior::AltShape => "AltShape",
            TitleBehavior::Code1000 => "Code1000",
            TitleBehavior::Garbage => "Garbage",
            TitleBehavior::Reset => "Reset",
            TitleBehavior::Busy { .. } => "Busy",
            TitleBehavior::EchoQuery => "EchoQuery",
        }
    }
}

/// One scripted answer of the title platform's `TokenAction` (see
/// [`Simulator::script_token`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenBehavior {
    /// Verify `sign`, `client_id` and `client_secret`; issue a token when they match,
    /// else refuse with REPLYCODE `1001` (the default).
    Issue,
    /// Like [`TokenBehavior::Issue`], but a refusal's REPLYMSG quotes the `client_secret`
    /// it was sent, as a careless server might (clients must not repeat it).
    EchoSecret,
    /// This HTTP status with a small plain-text body; no token is issued.
    Status(u16),
}

/// One request the rebill gateway received (also those that failed verification).
#[derive(Debug, Clone)]
pub struct RebillRecord {
    /// `request_data.orderno`, empty when it could not be read.
    pub orderno: String,
    /// The `tax_num` field, empty when absent.
    pub tax_num: String,
    /// The `timestamp` field as sent, empty when absent.
    pub timestamp: String,
    /// True when all signed fields were present and `sign` matched the recomputed one.
    pub signature_ok: bool,
    /// True when the request passed every check and a behaviour was applied.
    pub verified: bool,
    /// When the request arrived.
    pub received_at: Instant,
    /// The behaviour applied ([`RebillBehavior::name`]), or for refused requests one of
    /// `RejectedForm`, `RejectedFields`, `RejectedAppid`, `RejectedTimestamp`,
    /// `RejectedSign`, `RejectedRequestData`.
    pub answered: &'static str,
    /// Why the request was refused (`None` when verified).
    pub reject_reason: Option<String>,
}

/// One request `thirdApi` received (also those that failed verification).
#[derive(Debug, Clone)]
pub struct TitleRecord {
    /// `BODY/ORDER_NO`, empty when the payload could not be read.
    pub order_no: String,
    /// `BODY/TTQQLSH`, empty when the payload could not be read.
    pub ttqqlsh: String,
    /// The `dataType` parameter as sent (`"0"` JSON, `"1"` XML).
    pub data_type: String,
    /// The decoded buyer name `BODY/GMF_MC` (entities / escapes resolved).
    pub gmf_mc: String,
    /// The `sqm` parameter.
    pub sqm: String,
    /// The query string exactly as received (still percent-encoded).
    pub query: String,
    /// The payload text `data` decoded to (Base64, then UTF-8), when it also parsed as
    /// the `dataType`'s JSON or XML; empty otherwise.
    pub payload: String,
    /// True when `data` decoded (Base64, UTF-8, JSON/XML) and the fields passed the rules.
    pub payload_ok: bool,
    /// The REPLYCODE answered, or `HTTP nnn` for answers without one (401, scripted
    /// statuses), `garbage` / `reset` for those behaviours.
    pub reply_code: String,
    /// The behaviour applied ([`TitleBehavior::name`]), `DuplicateSerial` for a serial
    /// already accepted, or `Rejected` when verification failed.
    pub answered: &'static str,
    /// When the request arrived.
    pub received_at: Instant,
}

/// A per-order list of behaviours; the last one repeats forever.
struct Script<B>(VecDeque<B>);

impl<B: Clone> Script<B> {
    fn next(&mut self) -> Option<B> {
        if self.0.len() > 1 {
            self.0.pop_front()
        } else {
            self.0.front().cloned()
        }
    }
}

/// Locks a mutex, ignoring poisoning (nothing here panics while holding a lock, and a
/// simulator must keep answering regardless).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the handlers and the [`Simulator`] handle.
struct Shared {
    opts: SimOptions,
    open_id: String,
    rebill_scripts: Mutex<HashMap<String, Script<RebillBehavior>>>,
    title_scripts: Mutex<HashMap<String, Script<TitleBehavior>>>,
    token_script: Mutex<Option<Script<TokenBehavior>>>,
    rebill_log: Mutex<Vec<RebillRecord>>,
    title_log: Mutex<Vec<TitleRecord>>,
    tokens: Mutex<HashSet<String>>,
    token_calls: AtomicUsize,
    open_calls: AtomicUsize,
    accepted: Mutex<Accepted>,
    in_flight: Mutex<HashMap<String, usize>>,
    overlaps: AtomicUsize,
    robot_scripts: Mutex<HashMap<String, Script<RobotBehavior>>>,
    robot_log: Mutex<Vec<RobotMessage>>,
    robot_signature_required: AtomicBool,
}

#[derive(Default)]
struct Accepted {
    set: HashSet<String>,
    order: Vec<String>,
}

impl Shared {
    fn next_rebill(&self, orderno: &str) -> RebillBehavior {
        let mut scripts = lock(&self.rebill_scripts);
        scripts
            .get_mut(orderno)
            .and_then(Script::next)
            .unwrap_or(RebillBehavior::Accepted)
    }

    fn next_token(&self) -> TokenBehavior {
        lock(&self.token_script)
            .as_mut()
            .and_then(Script::next)
            .unwrap_or(TokenBehavior::Issue)
    }

    fn next_title(&self, order_no: &str) -> TitleBehavior {
        let mut scripts = lock(&self.title_scripts);
        scripts
            .get_mut(order_no)
            .and_then(Script::next)
            .unwrap_or(TitleBehavior::Ok)
    }

    /// Marks `key` as being answered; counts an overlap if it already was.
    fn enter(self: &Arc<Self>, key: String) -> FlightGuard {
        let mut map = lock(&self.in_flight);
        let n = map.entry(key.clone()).or_insert(0);
        if *n > 0 {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        *n += 1;
        FlightGuard {
            shared: Arc::clone(self),
            key,
        }
    }

    /// Records a serial as accepted; false if it already was.
    fn accept_serial(&self, serial: &str) -> bool {
        let mut acc = lock(&self.accepted);
        if acc.set.contains(serial) {
            return false;
        }
        acc.set.insert(serial.to_owned());
        acc.order.push(serial.to_owned());
        true
    }

    fn serial_accepted(&self, serial: &str) -> bool {
        lock(&self.accepted).set.contains(serial)
    }

    fn token_valid(&self, token: &str) -> bool {
        !token.is_empty() && lock(&self.tokens).contains(token)
    }
}

/// Held while a request for one order is being answered (including its sleeps); dropping it
/// (also when the client disconnects and the handler is cancelled) ends the flight.
struct FlightGuard {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.in_flight);
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Stops the server when the last [`Simulator`] clone is dropped.
struct ServerGuard {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A running simulator: a cheap, cloneable handle. The server stops on
/// [`Simulator::shutdown`] or when the last clone is dropped.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    guard: Arc<ServerGuard>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// `value` percent-encoded for a URL's query or path segment (RFC 3986 unreserved kept).
fn query_value(value: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, UNRESERVED).to_string()
}

/// The openID OpenAction hands out for a client: stable, derived from the `client_id`.
fn open_id_for(client_id: &str) -> String {
    let digest = Md5::digest(format!("sim-openid:{client_id}").as_bytes());
    format!("oSIM{}", &hex::encode(digest)[..24])
}

impl Simulator {
    /// Starts one axum server on `127.0.0.1:0` serving the rebill gateway, the title
    /// platform and the alert robots. Must be called inside a tokio runtime; the server runs on a spawned task.
    pub async fn start(opts: SimOptions) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            open_id: open_id_for(&opts.title_client_id),
            opts,
            rebill_scripts: Mutex::new(HashMap::new()),
            title_scripts: Mutex::new(HashMap::new()),
            token_script: Mutex::new(None),
            rebill_log: Mutex::new(Vec::new()),
            title_log: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashSet::new()),
            token_calls: AtomicUsize::new(0),
            open_calls: AtomicUsize::new(0),
            accepted: Mutex::new(Accepted::default()),
            in_flight: Mutex::new(HashMap::new()),
            overlaps: AtomicUsize::new(0),
            robot_scripts: Mutex::new(HashMap::new()),
            robot_log: Mutex::new(Vec::new()),
            robot_signature_required: AtomicBool::new(false),
        });
        let app = Router::new()
            .route(rebill::PATH, post(rebill::handle))
            .route("/Entoauth/TokenAction", get(title::token_action))
            .route("/Entoauth/OpenAction", get(title::open_action))
            .route("/Entoauth/thirdApi", post(title::third_api))
            .route(robots::WECOM_PATH, post(robots::wecom))
            .route(robots::DINGTALK_PATH, post(robots::dingtalk))
            .route(
                &format!("{}/{{token}}", robots::FEISHU_PREFIX),
                post(robots::feishu),
            )
            .route(
                &format!("{}/{{name}}", robots::WEBHOOK_PREFIX),
                post(robots::webhook),
            )
            .with_state(Arc::clone(&shared));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "simulator server stopped with an error");
            }
        });
        Ok(Simulator {
            shared,
            addr,
            guard: Arc::new(ServerGuard { stop }),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/gateway/nuonuo/invoice/rebillingnew`.
    pub fn rebill_url(&self) -> String {
        format!("http://{}{}", self.addr, rebill::PATH)
    }

    /// `http://127.0.0.1:PORT/Entoauth`, the base of TokenAction, OpenAction and thirdApi.
    pub fn title_base_url(&self) -> String {
        format!("http://{}/Entoauth", self.addr)
    }

    /// The openID OpenAction issues (stable for the simulator's `client_id`), for configs
    /// that fix `openid`.
    pub fn open_id(&self) -> String {
        self.shared.open_id.clone()
    }

    /// Scripts the answers for one rebill `orderno`: one step per verified request, the
    /// last step repeating forever. Replaces any earlier script; an empty list removes it.
    pub fn script_rebill(&self, orderno: &str, steps: Vec<RebillBehavior>) {
        let mut scripts = lock(&self.shared.rebill_scripts);
        if steps.is_empty() {
            scripts.remove(orderno);
        } else {
            scripts.insert(orderno.to_owned(), Script(steps.into()));
        }
    }

    /// Scripts the answers for one title `ORDER_NO`: one step per verified request, the
    /// last step repeating forever. Replaces any earlier script; an empty list removes it.
    pub fn script_title(&self, order_no: &str, steps: Vec<TitleBehavior>) {
        let mut scripts = lock(&self.shared.title_scripts);
        if steps.is_empty() {
            scripts.remove(order_no);
        } else {
            scripts.insert(order_no.to_owned(), Script(steps.into()));
        }
    }

    /// Scripts TokenAction's answers: one step per call, the last step repeating forever.
    /// Replaces any earlier script; an empty list restores [`TokenBehavior::Issue`].
    pub fn script_token(&self, steps: Vec<TokenBehavior>) {
        *lock(&self.shared.token_script) = (!steps.is_empty()).then(|| Script(steps.into()));
    }

    /// Every request the rebill gateway received, in arrival order.
    pub fn rebill_requests(&self) -> Vec<RebillRecord> {
        lock(&self.shared.rebill_log).clone()
    }

    /// Every request `thirdApi` received, in arrival order.
    pub fn title_requests(&self) -> Vec<TitleRecord> {
        lock(&self.shared.title_log).clone()
    }

    /// Forgets the recorded rebill and title requests and robot messages (the logs grow
    /// with every request; a long benchmark may clear them between runs). Counters, tokens,
    /// scripts and accepted serials are kept.
    pub fn clear_requests(&self) {
        lock(&self.shared.rebill_log).clear();
        lock(&self.shared.title_log).clear();
        lock(&self.shared.robot_log).clear();
    }

    /// How many TokenAction calls arrived.
    pub fn token_requests(&self) -> usize {
        self.shared.token_calls.load(Ordering::Relaxed)
    }

    /// How many OpenAction calls arrived.
    pub fn open_requests(&self) -> usize {
        self.shared.open_calls.load(Ordering::Relaxed)
    }

    /// Invalidates every access token issued so far (clients must call TokenAction again).
    pub fn expire_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    /// The TTQQLSH serials the title server accepted, in the order it accepted them.
    pub fn accepted_serials(&self) -> Vec<String> {
        lock(&self.shared.accepted).order.clone()
    }

    /// How many times a request for an order arrived while another request for the same
    /// order was still being answered. Rebill orders are keyed by `(tax_num, orderno)`,
    /// titles by `(ORDER_NO, TTQQLSH)` — i.e. the same queue row. Only requests that got
    /// far enough to name their order count.
    pub fn overlapping_sends(&self) -> usize {
        self.shared.overlaps.load(Ordering::Relaxed)
    }

    /// `http://127.0.0.1:PORT/robot/wecom/send?key=KEY`.
    pub fn wecom_url(&self, key: &str) -> String {
        format!(
            "http://{}{}?key={}",
            self.addr,
            robots::WECOM_PATH,
            query_value(key)
        )
    }

    /// `http://127.0.0.1:PORT/robot/dingtalk/send?access_token=TOKEN`.
    pub fn dingtalk_url(&self, token: &str) -> String {
        format!(
            "http://{}{}?access_token={}",
            self.addr,
            robots::DINGTALK_PATH,
            query_value(token)
        )
    }

    /// `http://127.0.0.1:PORT/robot/feishu/hook/TOKEN`.
    pub fn feishu_url(&self, token: &str) -> String {
        format!(
            "http://{}{}/{}",
            self.addr,
            robots::FEISHU_PREFIX,
            query_value(token)
        )
    }

    /// `http://127.0.0.1:PORT/robot/webhook/NAME`.
    pub fn webhook_url(&self, name: &str) -> String {
        format!(
            "http://{}{}/{}",
            self.addr,
            robots::WEBHOOK_PREFIX,
            query_value(name)
        )
    }

    /// Whether the DingTalk, Feishu and webhook robots refuse a message that carries no
    /// signature (off by default; a signature that is present is always checked). WeCom
    /// never signs.
    pub fn require_robot_signature(&self, required: bool) {
        self.shared
            .robot_signature_required
            .store(required, Ordering::Relaxed);
    }

    /// Scripts the answers of the robot with this key (WeCom `key`, DingTalk
    /// `access_token`, Feishu token, webhook name): one step per verified request, the last
    /// step repeating forever. Replaces any earlier script; an empty list removes it.
    pub fn script_robot(&self, key: &str, steps: Vec<RobotBehavior>) {
        let mut scripts = lock(&self.shared.robot_scripts);
        if steps.is_empty() {
            scripts.remove(key);
        } else {
            scripts.insert(key.to_owned(), Script(steps.into()));
        }
    }

    /// Every message the robots received, in arrival order.
    pub fn robot_messages(&self) -> Vec<RobotMessage> {
        lock(&self.shared.robot_log).clone()
    }

    /// Stops accepting connections and lets in-flight requests finish (graceful). Returns
    /// at once; the server task ends in the background.
    pub fn shutdown(&self) {
        let _ = self.guard.stop.send(true);
    }
}
