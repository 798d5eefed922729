//! The simulated fw199 gateway: `POST /gateway/nuonuo/invoice/rebillingnew`.
//!
//! A request is verified the way the gateway does it — form body, exactly the five fields,
//! appid, timestamp within ±300 s, the `Utils.Sign` signature, `request_data` a JSON object
//! with a string `orderno` — and only then answered with the order's scripted behaviour.
//! Refusals use the gateway's codes (`070301` appid, `70601` signature) and messages.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use md5::{Digest, Md5};
use serde_json::{json, Value};

use super::{form, lock, FlightGuard, RebillBehavior, RebillRecord, Shared};
use crate::clients::sign::sign;

/// The route of the rebilling endpoint.
pub(super) const PATH: &str = "/gateway/nuonuo/invoice/rebillingnew";

/// The fields a request must carry, no more and no fewer.
const FIELDS: [&str; 5] = ["appid", "timestamp", "tax_num", "request_data", "sign"];

/// How far a request's timestamp may be from the server clock.
const MAX_SKEW_SECS: i64 = 300;

const JSON_CT: &str = "application/json;charset=UTF-8";

/// The invoice number and PDF URL the simulator reports for an already issued order
/// ([`RebillBehavior::Issued`]): a 20-digit number and an HTTPS URL, both derived from
/// the orderno so tests can predict them.
pub fn issued_invoice(orderno: &str) -> (String, String) {
    let digest = Md5::digest(orderno.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let invoice_no = format!("{:020}", u64::from_be_bytes(first));
    let url = format!(
        "https://inv.sandbox.invalid/fp2/{}.pdf",
        hex::encode(digest)
    );
    (invoice_no, url)
}

/// A refused request: the record kind, the reply's `code` and `message`.
struct Reject {
    kind: &'static str,
    code: Value,
    message: String,
}

impl Reject {
    fn new(kind: &'static str, code: Value, message: impl Into<String>) -> Self {
        Reject {
            kind,
            code,
            message: message.into(),
        }
    }
}

/// The axum handler.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Instant::now();
    let (response, extra, guard) = process(&shared, &headers, &body, received_at);
    let wait = shared.opts.latency.saturating_add(extra);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    drop(guard);
    response
}

fn process(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: &[u8],
    received_at: Instant,
) -> (Response, Duration, Option<FlightGuard>) {
    let mut rec = RebillRecord {
        orderno: String::new(),
        tax_num: String::new(),
        timestamp: String::new(),
        signature_ok: false,
        verified: false,
        received_at,
        answered: "",
        reject_reason: None,
    };
    match verify(shared, headers, body, &mut rec) {
        Err(reject) => {
            tracing::debug!(kind = reject.kind, message = %reject.message, "sim rebill: refused");
            let response = json_reply(
                StatusCode::OK,
                json!({"code": reject.code, "message": reject.message}).to_string(),
            );
            rec.answered = reject.kind;
            rec.reject_reason = Some(reject.message);
            lock(&shared.rebill_log).push(rec);
            (response, Duration::ZERO, None)
        }
        Ok(()) => {
            let guard = shared.enter(format!("{}\u{0}{}", rec.tax_num, rec.orderno));
            let behavior = shared.next_rebill(&rec.orderno);
            let (response, wait) = respond(&behavior, &rec.orderno);
            rec.verified = true;
            rec.answered = behavior.name();
            lock(&shared.rebill_log).push(rec);
            (response, wait, Some(guard))
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// True when the `Content-Type` is a UTF-8 (or charset-less) urlencoded form.
fn is_form(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = ct.split(';');
    let essence = parts.next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return false;
    }
    parts.all(|p| {
        let p = p.trim();
        match p.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("charset") => {
                let v = v.trim().trim_matches('"');
                v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
            }
            _ => true,
        }
    })
}

fn verify(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    rec: &mut RebillRecord,
) -> Result<(), Reject> {
    if !is_form(headers) {
        return Err(Reject::new(
            "RejectedForm",
            json!(10004),
            "请求格式错误: Content-Type必须为application/x-www-form-urlencoded;charset=UTF-8",
        ));
    }
    let pairs = form::parse(body)
        .map_err(|e| Reject::new("RejectedForm", json!(10004), format!("请求体解码失败({e})")))?;

    // Best-effort bookkeeping first, so refused requests are recorded with what they sent.
    let get = |name: &str| form::first(&pairs, name);
    rec.tax_num = get("tax_num").unwrap_or("").to_owned();
    rec.timestamp = get("timestamp").unwrap_or("").to_owned();
    let request_data: Option<Value> =
        get("request_data").and_then(|s| serde_json::from_str(s).ok());
    if let Some(orderno) = request_data
        .as_ref()
        .and_then(|v| v.get("orderno"))
        .and_then(Value::as_str)
    {
        rec.orderno = orderno.to_owned();
    }

    for field in FIELDS {
        if get(field).is_none() {
            return Err(Reject::new(
                "RejectedFields",
                json!(10001),
                format!("缺少必要参数: {field}"),
            ));
        }
    }
    for (i, (name, _)) in pairs.iter().enumerate() {
        if !FIELDS.contains(&name.as_str()) {
            return Err(Reject::new(
                "RejectedFields",
                json!(10002),
                format!("不支持的参数: {name}"),
            ));
        }
        if pairs[..i].iter().any(|(n, _)| n == name) {
            return Err(Reject::new(
                "RejectedFields",
                json!(10002),
                format!("参数重复: {name}"),
            ));
        }
    }
    let appid = get("appid").unwrap_or("");
    let timestamp = get("timestamp").unwrap_or("");
    let tax_num = get("tax_num").unwrap_or("");
    let data = get("request_data").unwrap_or("");
    let given_sign = get("sign").unwrap_or("");

    let expected = sign(
        [
            ("appid", appid),
            ("timestamp", timestamp),
            ("tax_num", tax_num),
            ("request_data", data),
        ],
        &shared.opts.rebill_secret,
    );
    rec.signature_ok = given_sign == expected;

    if appid != shared.opts.rebill_appid {
        return Err(Reject::new(
            "RejectedAppid",
            json!("070301"),
            "appid错误(appid不存在或未开通)",
        ));
    }
    let ts_ok = !timestamp.is_empty()
        && timestamp.len() <= 12
        && timestamp.bytes().all(|b| b.is_ascii_digit())
        && timestamp
            .parse::<i64>()
            .map(|ts| (now_secs() - ts).abs() <= MAX_SKEW_SECS)
            .unwrap_or(false);
    if !ts_ok {
        return Err(Reject::new(
            "RejectedTimestamp",
            json!(70602),
            format!("timestamp无效或与服务器时间相差超过{MAX_SKEW_SECS}秒(须为秒级Unix时间戳)"),
        ));
    }
    if !rec.signature_ok {
        return Err(Reject::new(
            "RejectedSign",
            json!(70601),
            "签名错误(sign error)",
        ));
    }
    let orderno_ok = match &request_data {
        Some(Value::Object(map)) => match map.get("orderno") {
            Some(Value::String(s)) if !s.is_empty() => Ok(()),
            Some(Value::String(_)) => Err("orderno不能为空"),
            Some(_) => Err("orderno必须为字符串"),
            None => Err("缺少orderno"),
        },
        Some(_) => Err("必须为JSON对象"),
        None => Err("不是有效的JSON"),
    };
    if let Err(why) = orderno_ok {
        return Err(Reject::new(
            "RejectedRequestData",
            json!(10003),
            format!("request_data格式错误: {why}"),
        ));
    }
    if tax_num.is_empty() {
        return Err(Reject::new(
            "RejectedFields",
            json!(10001),
            "tax_num不能为空",
        ));
    }
    Ok(())
}

fn json_reply(status: StatusCode, body: impl Into<Body>) -> Response {
    typed_reply(status, JSON_CT, body)
}

/// A response with `status`, `content_type` and `body`.
pub(super) fn typed_reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Body>,
) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A plain-text `status` answer asking the client to come back in `retry_after_secs`.
pub(super) fn busy_reply(
    status: StatusCode,
    retry_after_secs: u64,
    text: &'static str,
) -> Response {
    let mut r = typed_reply(status, "text/plain;charset=UTF-8", text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    r
}

/// A status for [`RebillBehavior::Status`]: the given one, or 500 if it cannot be a final
/// HTTP status.
pub(super) fn final_status(code: u16) -> StatusCode {
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A body that sends `head` and then fails, so the connection is aborted mid-response.
pub(super) fn reset_body(head: &'static [u8]) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(head)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated connection reset",
        )),
    ];
    Body::from_stream(futures::stream::iter(chunks))
}

/// 2 MiB of `{"code":0,"message":"xxxx…"}`, built once.
fn oversized_bytes() -> Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| {
        const SIZE: usize = 2 * 1024 * 1024;
        let head = br#"{"code":0,"message":""#;
        let tail = br#""}"#;
        let mut v = Vec::with_capacity(SIZE);
        v.extend_from_slice(head);
        v.resize(SIZE - tail.len(), b'x');
        v.extend_from_slice(tail);
        Bytes::from(v)
    })
    .clone()
}

/// A chunked (no `Content-Length`) body of 2 MiB.
fn oversized_body() -> Body {
    const CHUNK: usize = 64 * 1024;
    let all = oversized_bytes();
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..all.len())
        .step_by(CHUNK)
        .map(|start| Ok(all.slice(start..(start + CHUNK).min(all.len()))))
        .collect();
    Body::from_stream(futures::stream::iter(chunks))
}

const HTML_PAGE: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>502 Bad Gateway</title></head>\
<body><center><h1>502 Bad Gateway</h1></center><hr><center>网关错误,请稍后再试</center></body></html>\n";

/// The answer for a verified request and how long to wait before sending it.
fn respond(behavior: &RebillBehavior, orderno: &str) -> (Response, Duration) {
    const ACCEPTED: &str = r#"{"code":0,"message":"重试成功"}"#;
    let response = match behavior {
        RebillBehavior::Accepted => json_reply(StatusCode::OK, ACCEPTED),
        RebillBehavior::Delay(d) => return (json_reply(StatusCode::OK, ACCEPTED), *d),
        RebillBehavior::Issued => {
            let (invoice_no, url) = issued_invoice(orderno);
            json_reply(
                StatusCode::OK,
                json!({
                    "code": 100,
                    "invoice_down_url": url,
                    "invoice_no": invoice_no,
                    "message": "发票已经生成,不需要重复提交",
                })
                .to_string(),
            )
        }
        RebillBehavior::Fail { code, message } => json_reply(
            StatusCode::OK,
            json!({"code": code, "message": message}).to_string(),
        ),
        RebillBehavior::CodeAsString => {
            json_reply(StatusCode::OK, r#"{"code":"0","message":"重试成功"}"#)
        }
        RebillBehavior::Status(code) => {
            let status = final_status(*code);
            typed_reply(
                status,
                "text/plain;charset=UTF-8",
                format!("simulated HTTP {}", status.as_u16()),
            )
        }
        RebillBehavior::TooMany { retry_after_secs } => busy_reply(
            StatusCode::TOO_MANY_REQUESTS,
            *retry_after_secs,
            "Too Many Requests",
        ),
        RebillBehavior::Html => typed_reply(StatusCode::OK, "text/html;charset=UTF-8", HTML_PAGE),
        RebillBehavior::Garbage => json_reply(StatusCode::OK, "\u{1}garbage}{ not json <<"),
        RebillBehavior::Empty => json_reply(StatusCode::OK, Body::empty()),
        RebillBehavior::Oversized => json_reply(StatusCode::OK, oversized_body()),
        RebillBehavior::WrongTypes => json_reply(StatusCode::OK, r#"{"code":[1],"message":5}"#),
        RebillBehavior::Reset => json_reply(StatusCode::OK, reset_body(br#"{"code":0,"mess"#)),
    };
    (response, Duration::ZERO)
}
