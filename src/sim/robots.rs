//! Simulated alert robots: the WeCom (企业微信) group robot
//! `POST /robot/wecom/send?key=K`, the DingTalk (钉钉) custom robot
//! `POST /robot/dingtalk/send?access_token=T[&timestamp=&sign=]`, the Feishu (飞书) custom bot
//! `POST /robot/feishu/hook/{token}` and a plain JSON webhook `POST /robot/webhook/{name}`.
//!
//! Each reads the body in its robot's message format and checks a signature the way the real
//! server does, with its own HMAC code (not the crate's signer) and
//! [`super::SimOptions::robot_secret`]: DingTalk recomputes `sign` from the query's
//! `timestamp`, Feishu from the body's `timestamp`, the webhook from its
//! `X-Invoice-Worker-Timestamp` header and the raw body; a timestamp too far from the
//! server clock is refused like a wrong signature. A request without a signature passes
//! unless [`super::Simulator::require_robot_signature`] asks for one (WeCom never signs).
//! Only then is the key's scripted [`RobotBehavior`] applied. Refusals use the real robots'
//! codes where known (WeCom 93000 and 40058, DingTalk 310000, Feishu 19021, webhook HTTP 401).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::rebill::{final_status, typed_reply};
use super::{form, lock, Script, Shared};

/// The WeCom robot's route (`?key=`).
pub(super) const WECOM_PATH: &str = "/robot/wecom/send";
/// The DingTalk robot's route (`?access_token=`).
pub(super) const DINGTALK_PATH: &str = "/robot/dingtalk/send";
/// The Feishu bot's route, below which its token is the last segment.
pub(super) const FEISHU_PREFIX: &str = "/robot/feishu/hook";
/// The webhook's route, below which its name is the last segment.
pub(super) const WEBHOOK_PREFIX: &str = "/robot/webhook";

/// WeCom refuses text content over this many bytes.
const WECOM_MAX_BYTES: usize = 2048;
/// DingTalk and Feishu refuse a timestamp more than an hour from their clock.
const ROBOT_MAX_SKEW_MS: i64 = 3_600_000;
/// The webhook's receiver refuses a timestamp more than five minutes away (a replay window).
const WEBHOOK_MAX_SKEW_S: i64 = 300;

const JSON_CT: &str = "application/json;charset=UTF-8";

/// One scripted answer of a simulated robot (applied only to requests that passed
/// verification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RobotBehavior {
    /// Success in the robot's own format.
    Ok,
    /// A refusal in the robot's own format: `{"errcode":code,"errmsg":message}` (WeCom,
    /// DingTalk), `{"code":code,"msg":message}` (Feishu); the webhook answers HTTP 422 with
    /// `{"code":code,"message":message}`.
    Refuse {
        /// The error code.
        code: i64,
        /// The error message.
        message: String,
    },
    /// This HTTP status with a small plain-text body.
    Status(u16),
}

impl RobotBehavior {
    /// The behaviour's name as recorded in [`RobotMessage::answered`].
    pub fn name(&self) -> &'static str {
        match self {
            RobotBehavior::Ok => "Ok",
            RobotBehavior::Refuse { .. } => "Refuse",
            RobotBehavior::Status(_) => "Status",
        }
    }
}

/// One message a simulated robot received: every request whose body parsed in the robot's
/// format, also those refused for their key or signature (so tests can count attempts).
#[derive(Debug, Clone)]
pub struct RobotMessage {
    /// `"wecom"`, `"dingtalk"`, `"feishu"` or `"webhook"`.
    pub kind: &'static str,
    /// The robot's key: WeCom `key`, DingTalk `access_token`, the Feishu token or the
    /// webhook name.
    pub key: String,
    /// The message text (`text.content`, `content.text`, the webhook's `text` field).
    pub text: String,
    /// The whole JSON body.
    pub body: Value,
    /// True when the request carried a valid signature.
    pub signed: bool,
    /// The behaviour applied ([`RobotBehavior::name`]), or for refused requests one of
    /// `RejectedKey`, `RejectedLength`, `RejectedSign`, `RejectedEvent`.
    pub answered: &'static str,
}

/// Which robot is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wecom,
    Dingtalk,
    Feishu,
    Webhook,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Wecom => "wecom",
            Kind::Dingtalk => "dingtalk",
            Kind::Feishu => "feishu",
            Kind::Webhook => "webhook",
        }
    }

    /// The answer to a verified request that the script says to answer with `behavior`.
    fn respond(self, behavior: &RobotBehavior) -> Response {
        match behavior {
            RobotBehavior::Ok => match self {
                Kind::Wecom | Kind::Dingtalk => errcode_reply(0, "ok"),
                // What today's Feishu bots answer: the new fields and the old ones.
                Kind::Feishu => json_reply(
                    StatusCode::OK,
                    json!({"StatusCode": 0, "StatusMessage": "success", "code": 0,
                           "data": {}, "msg": "success"}),
                ),
                Kind::Webhook => json_reply(StatusCode::OK, json!({"ok": true})),
            },
            RobotBehavior::Refuse { code, message } => match self {
                Kind::Wecom | Kind::Dingtalk => errcode_reply(*code, message),
                Kind::Feishu => feishu_reply(*code, message),
                Kind::Webhook => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"code": code, "message": message}),
                ),
            },
            RobotBehavior::Status(status) => typed_reply(
                final_status(*status),
                "text/plain;charset=UTF-8",
                format!("simulated HTTP {status}"),
            ),
        }
    }
}

fn json_reply(status: StatusCode, body: Value) -> Response {
    typed_reply(status, JSON_CT, body.to_string())
}

fn errcode_reply(code: i64, message: &str) -> Response {
    json_reply(StatusCode::OK, json!({"errcode": code, "errmsg": message}))
}

fn feishu_reply(code: i64, message: &str) -> Response {
    json_reply(
        StatusCode::OK,
        json!({"code": code, "msg": message, "data": {}}),
    )
}

/// A request that parsed, before its verdict.
struct Received {
    kind: Kind,
    key: String,
    text: String,
    body: Value,
}

/// A refusal of a parsed request: the answer and the name recorded for it.
type Refusal = (Response, &'static str);

impl Shared {
    fn next_robot(&self, key: &str) -> RobotBehavior {
        lock(&self.robot_scripts)
            .get_mut(key)
            .and_then(Script::next)
            .unwrap_or(RobotBehavior::Ok)
    }

    fn robot_signature_required(&self) -> bool {
        self.robot_signature_required.load(Ordering::Relaxed)
    }

    /// Records `received` and answers it: the refusal, or the key's next scripted step.
    /// `verdict` is whether a valid signature came along.
    fn finish(&self, received: Received, verdict: Result<bool, Refusal>) -> Response {
        let (response, signed, answered) = match verdict {
            Err((response, answered)) => (response, false, answered),
            Ok(signed) => {
                let behavior = self.next_robot(&received.key);
                (received.kind.respond(&behavior), signed, behavior.name())
            }
        };
        lock(&self.robot_log).push(RobotMessage {
            kind: received.kind.name(),
            key: received.key,
            text: received.text,
            body: received.body,
            signed,
            answered,
        });
        response
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// HMAC-SHA256, computed here independently of the crate's alert signer.
fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length; an empty MAC matches no signature.
        Err(_) => Vec::new(),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A body in the `{"msgtype":"text","text":{"content":…}}` shape (WeCom, DingTalk): its
/// JSON and content, or why not.
fn text_message(body: &[u8]) -> Result<(Value, String), &'static str> {
    let value: Value = serde_json::from_slice(body).map_err(|_| "body is not JSON")?;
    if value.get("msgtype").and_then(Value::as_str) != Some("text") {
        return Err("invalid message type");
    }
    let content = value
        .get("text")
        .and_then(|t| t.get("content"))
        .and_then(Value::as_str)
        .ok_or("text.content missing")?
        .to_string();
    Ok((value, content))
}

/// `POST /robot/wecom/send?key=K`: WeCom has no signature; an empty key is an invalid URL.
pub(super) async fn wecom(State(shared): State<Arc<Shared>>, uri: Uri, body: Bytes) -> Response {
    let (value, content) = match text_message(&body) {
        Ok(parsed) => parsed,
        Err("invalid message type") => return errcode_reply(40008, "invalid message type"),
        Err(why) => return errcode_reply(40035, &format!("invalid parameter: {why}")),
    };
    let params = form::parse(uri.query().unwrap_or("").as_bytes()).unwrap_or_default();
    let key = form::first(&params, "key").unwrap_or("").to_string();
    let verdict = if key.is_empty() {
        Err((errcode_reply(93000, "invalid webhook url"), "RejectedKey"))
    } else if content.len() > WECOM_MAX_BYTES {
        Err((
            errcode_reply(40058, "text.content exceed max length 2048"),
            "RejectedLength",
        ))
    } else {
        Ok(false)
    };
    let received = Received {
        kind: Kind::Wecom,
        key,
        text: content,
        body: value,
    };
    shared.finish(received, verdict)
}

/// `POST /robot/dingtalk/send?access_token=T[&timestamp=&sign=]`.
pub(super) async fn dingtalk(State(shared): State<Arc<Shared>>, uri: Uri, body: Bytes) -> Response {
    let (value, content) = match text_message(&body) {
        Ok(parsed) => parsed,
        Err(_) => return errcode_reply(40035, "缺少参数 json"),
    };
    // Servlet-style decoding: a client that forgot to encode Base64's '+' gets a space.
    let params = form::parse(uri.query().unwrap_or("").as_bytes()).unwrap_or_default();
    let param = |name: &str| form::first(&params, name).map(str::to_string);
    let key = param("access_token").unwrap_or_default();
    let sign_not_match = || (errcode_reply(310000, "sign not match"), "RejectedSign");
    let verdict = if key.is_empty() {
        Err((errcode_reply(300001, "token is not exist"), "RejectedKey"))
    } else {
        match (param("timestamp"), param("sign")) {
            (None, None) if !shared.robot_signature_required() => Ok(false),
            (Some(ts), Some(sign)) if dingtalk_sign_ok(&shared.opts.robot_secret, &ts, &sign) => {
                Ok(true)
            }
            _ => Err(sign_not_match()),
        }
    };
    let received = Received {
        kind: Kind::Dingtalk,
        key,
        text: content,
        body: value,
    };
    shared.finish(received, verdict)
}

/// Whether `timestamp`, an integer in units of `unit_ms` milliseconds, is within `max_ms`
/// of now (any integer, however hostile, is merely refused).
fn within_skew(timestamp: &str, unit_ms: i64, max_ms: i64) -> bool {
    timestamp
        .parse::<i64>()
        .is_ok_and(|ts| (now_ms() / unit_ms).abs_diff(ts) <= (max_ms / unit_ms).unsigned_abs())
}

/// DingTalk's check: the timestamp (ms) within an hour, and `sign` equal to
/// `Base64(HMAC-SHA256(secret, "<timestamp>\n<secret>"))`.
fn dingtalk_sign_ok(secret: &str, timestamp: &str, sign: &str) -> bool {
    if !within_skew(timestamp, 1, ROBOT_MAX_SKEW_MS) {
        return false;
    }
    let expected = b64(&hmac(
        secret.as_bytes(),
        format!("{timestamp}\n{secret}").as_bytes(),
    ));
    sign == expected
}

/// `POST /robot/feishu/hook/{token}`: the signature, when present, is in the body.
pub(super) async fn feishu(
    State(shared): State<Arc<Shared>>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({"code": 9499, "msg": "Bad Request", "data": {}}),
        );
    };
    let content = value
        .get("content")
        .and_then(|c| c.get("text"))
        .and_then(Value::as_str);
    let (true, Some(content)) = (
        value.get("msg_type").and_then(Value::as_str) == Some("text"),
        content,
    ) else {
        return feishu_reply(19002, "params error, msg_type need text with content.text");
    };
    let content = content.to_string();
    let sign_fail = || {
        (
            feishu_reply(
                19021,
                "sign match fail or timestamp is not within one hour from current time",
            ),
            "RejectedSign",
        )
    };
    let verdict = match (value.get("timestamp"), value.get("sign")) {
        (None, None) if !shared.robot_signature_required() => Ok(false),
        (Some(Value::String(ts)), Some(Value::String(sign)))
            if feishu_sign_ok(&shared.opts.robot_secret, ts, sign) =>
        {
            Ok(true)
        }
        _ => Err(sign_fail()),
    };
    let received = Received {
        kind: Kind::Feishu,
        key: token,
        text: content,
        body: value,
    };
    shared.finish(received, verdict)
}

/// Feishu's check: the timestamp (s, a string) within an hour, and `sign` equal to
/// `Base64(HMAC-SHA256(key = "<timestamp>\n<secret>", message = empty))`.
fn feishu_sign_ok(secret: &str, timestamp: &str, sign: &str) -> bool {
    if !within_skew(timestamp, 1000, ROBOT_MAX_SKEW_MS) {
        return false;
    }
    sign == b64(&hmac(format!("{timestamp}\n{secret}").as_bytes(), b""))
}

/// `POST /robot/webhook/{name}`: a JSON object with `event` and `text`, the event kind
/// repeated in `X-Invoice-Worker-Event`, an optional HMAC of timestamp and raw body.
pub(super) async fn webhook(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let is_json = header_text(header::CONTENT_TYPE.as_str()).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/json",
        );
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return plain(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let (Some(event), Some(text)) = (
        value.get("event").and_then(Value::as_str),
        value.get("text").and_then(Value::as_str),
    ) else {
        return plain(StatusCode::BAD_REQUEST, "event and text are required");
    };
    let event = event.to_string();
    let text = text.to_string();
    let timestamp = header_text("x-invoice-worker-timestamp");
    let signature = header_text("x-invoice-worker-signature");
    let bad_sign = || {
        (
            plain(StatusCode::UNAUTHORIZED, "bad signature"),
            "RejectedSign",
        )
    };
    let verdict = if header_text("x-invoice-worker-event").as_deref() != Some(event.as_str()) {
        Err((
            plain(
                StatusCode::BAD_REQUEST,
                "X-Invoice-Worker-Event does not match the body",
            ),
            "RejectedEvent",
        ))
    } else {
        match (timestamp, signature) {
            (_, None) if !shared.robot_signature_required() => Ok(false),
            (Some(ts), Some(sig))
                if webhook_sign_ok(&shared.opts.robot_secret, &ts, &sig, &body) =>
            {
                Ok(true)
            }
            _ => Err(bad_sign()),
        }
    };
    let received = Received {
        kind: Kind::Webhook,
        key: name,
        text,
        body: value,
    };
    shared.finish(received, verdict)
}

/// The webhook receiver's check: the timestamp (s) within five minutes, and the signature
/// `sha256=` + hex `HMAC-SHA256(secret, "<timestamp>." + body)`.
fn webhook_sign_ok(secret: &str, timestamp: &str, signature: &str, body: &[u8]) -> bool {
    if !within_skew(timestamp, 1000, WEBHOOK_MAX_SKEW_S * 1000) {
        return false;
    }
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    signature == format!("sha256={}", hex::encode(hmac(secret.as_bytes(), &message)))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    typed_reply(status, "text/plain;charset=UTF-8", text)
}

#[cfg(test)]
mod skew_tests {
    use super::*;

    #[test]
    fn timestamps_are_judged_without_overflow_whatever_they_hold() {
        let now = now_ms();
        assert!(within_skew(&now.to_string(), 1, ROBOT_MAX_SKEW_MS));
        assert!(within_skew(
            &(now / 1000).to_string(),
            1000,
            ROBOT_MAX_SKEW_MS
        ));
        assert!(!within_skew(
            &(now - 2 * ROBOT_MAX_SKEW_MS).to_string(),
            1,
            ROBOT_MAX_SKEW_MS
        ));
        for hostile in [
            i64::MIN.to_string(),
            i64::MAX.to_string(),
            "-0".into(),
            "9".repeat(40),
            "1e3".into(),
            String::new(),
        ] {
            assert!(!within_skew(&hostile, 1, ROBOT_MAX_SKEW_MS), "{hostile}");
            assert!(
                !within_skew(&hostile, 1000, WEBHOOK_MAX_SKEW_S * 1000),
                "{hostile}"
            );
        }
    }
}
