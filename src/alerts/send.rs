//! Posting one [`Event`] to one [`AlertTarget`], in the target's own wire format: the WeCom
//! (企业微信) group robot, the DingTalk (钉钉) custom robot with 加签, the Feishu (飞书) custom
//! bot with 签名校验, or a plain HMAC-signed JSON webhook.
//!
//! A [`Poster`] sends once and says what came back; retrying, rate limits and the outbox are
//! the deliverer's business. The robot URL carries the robot's key, so no error text repeats
//! the URL, a part of it or the signing secret.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Value};
use sha2::Sha256;

use super::event::Event;
use super::text::{sanitize, text};
use crate::clients::http::{self, build_client, HttpReply, TransportError};
use crate::clients::token::scrub;
use crate::config::{AlertKind, AlertTarget};

/// The header naming the event kind of a webhook post (`seller_paused`, …).
pub const HEADER_EVENT: &str = "X-Invoice-Worker-Event";
/// The header carrying a webhook post's timestamp (Unix seconds), part of the signature.
pub const HEADER_TIMESTAMP: &str = "X-Invoice-Worker-Timestamp";
/// The header carrying a webhook post's signature, `sha256=<hex>`.
pub const HEADER_SIGNATURE: &str = "X-Invoice-Worker-Signature";

/// WeCom refuses a text message over 2048 bytes (errcode 40058); a longer text is cut.
pub const WECOM_MAX_BYTES: usize = 2048;

/// What a query value may hold unescaped: RFC 3986 unreserved characters, so Base64's `+`,
/// `/` and `=` go out as `%2B`, `%2F`, `%3D` (DingTalk decodes a raw `+` as a space).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// URL parts shorter than this are not hidden in error texts: they would mask unrelated
/// words and reveal next to nothing.
const MIN_HIDDEN_CHARS: usize = 6;

/// Why a post did not go through. No variant's text carries the target's URL or secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// No answer could be read: timeout, connection trouble, a body over 1 MiB.
    #[error("no answer from the robot: {0}")]
    Transport(TransportError),
    /// An HTTP status outside 2xx.
    #[error("the robot answered HTTP {0}")]
    Status(u16),
    /// The robot answered and refused the message (`errcode` / `code` not 0).
    #[error("the robot refused the message with code {code}: {message}")]
    Refused {
        /// The robot's `errcode` (WeCom, DingTalk) or `code` / `StatusCode` (Feishu).
        code: i64,
        /// Its `errmsg` / `msg`, sanitised and capped.
        message: String,
    },
    /// A 2xx answer that is not the robot's JSON.
    #[error("the robot answered 2xx with a body that is not its JSON answer")]
    Unreadable,
}

impl PostError {
    /// True for HTTP 404 and 410: the URL no longer exists (a deleted robot). The caller still
    /// retries, but tells the operator, because no retry will fix it.
    pub fn is_permanent_status(&self) -> bool {
        matches!(self, PostError::Status(404 | 410))
    }
}

/// Posts alert messages (one shared HTTP client for every target).
#[derive(Debug, Clone)]
pub struct Poster {
    http: reqwest::Client,
}

/// HMAC-SHA256 of `message` under `key`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts a key of any length (a long one is hashed first): this cannot fail.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key).expect("HMAC-SHA256 takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// DingTalk's 加签 `sign` parameter for `timestamp_ms`: `Base64(HMAC-SHA256(key = secret,
/// message = "<timestamp>\n<secret>"))`, already percent-encoded for the query string.
pub fn sign_dingtalk(secret: &str, timestamp_ms: i64) -> String {
    let mac = hmac_sha256(
        secret.as_bytes(),
        format!("{timestamp_ms}\n{secret}").as_bytes(),
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(mac);
    utf8_percent_encode(&b64, QUERY_VALUE).to_string()
}

/// Feishu's `sign` field for `timestamp_s`: `Base64(HMAC-SHA256(key = "<timestamp>\n<secret>",
/// message = empty))`. Feishu really does use the text as the key and sign nothing.
pub fn sign_feishu(secret: &str, timestamp_s: i64) -> String {
    let mac = hmac_sha256(format!("{timestamp_s}\n{secret}").as_bytes(), b"");
    base64::engine::general_purpose::STANDARD.encode(mac)
}

/// The webhook's [`HEADER_SIGNATURE`] value: `sha256=` and the lowercase hex
/// `HMAC-SHA256(key = secret, message = "<timestamp>." + body)`. The timestamp is signed too,
/// so a captured post cannot be replayed later with a fresh timestamp.
pub fn sign_webhook(secret: &str, timestamp_s: i64, body: &[u8]) -> String {
    let mut message = format!("{timestamp_s}.").into_bytes();
    message.extend_from_slice(body);
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), &message))
    )
}

/// `url` with DingTalk's `timestamp` and `sign` parameters appended.
fn dingtalk_url(url: &str, secret: &str, timestamp_ms: i64) -> String {
    let separator = if !url.contains('?') {
        "?"
    } else if url.ends_with(['?', '&']) {
        ""
    } else {
        "&"
    };
    format!(
        "{url}{separator}timestamp={timestamp_ms}&sign={}",
        sign_dingtalk(secret, timestamp_ms)
    )
}

/// `text` cut to at most `max` bytes on a character boundary, `…` marking the cut.
fn fit_bytes(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let room = max.saturating_sub('…'.len_utf8());
    let mut end = room;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What must not appear in an error text for `target`: the URL, each of its query values and
/// path segments (one of them is the robot key), and the signing secret.
fn hidden(target: &AlertTarget) -> Vec<String> {
    let url = target.url.expose();
    let mut hide = vec![url.to_string()];
    if let Ok(parsed) = url::Url::parse(url) {
        hide.extend(parsed.query_pairs().map(|(_, v)| v.into_owned()));
        if let Some(segments) = parsed.path_segments() {
            hide.extend(segments.map(str::to_string));
        }
    }
    hide.retain(|v| v.chars().count() >= MIN_HIDDEN_CHARS);
    if let Some(secret) = target.secret.as_ref().filter(|s| !s.is_empty()) {
        hide.push(secret.expose().to_string());
    }
    // Longest first, so the whole URL goes before the key inside it.
    hide.sort_by_key(|v| std::cmp::Reverse(v.len()));
    hide
}

/// `error` with every text it carries cleaned of `hide`.
fn clean_error(error: PostError, hide: &[String]) -> PostError {
    let hide: Vec<&str> = hide.iter().map(String::as_str).collect();
    match error {
        PostError::Transport(e) => PostError::Transport(e.map_text(|t| scrub(t, &hide))),
        PostError::Refused { code, message } => PostError::Refused {
            code,
            message: sanitize(&scrub(&message, &hide)),
        },
        other => other,
    }
}

/// The JSON of a robot's 2xx answer.
fn robot_json(reply: &HttpReply) -> Result<Value, PostError> {
    if !(200..300).contains(&reply.status) {
        return Err(PostError::Status(reply.status));
    }
    serde_json::from_slice::<Value>(&reply.body).map_err(|_| PostError::Unreadable)
}

/// Reads a `{"errcode":0,"errmsg":"ok"}` answer (WeCom, DingTalk).
fn read_errcode(reply: &HttpReply) -> Result<(), PostError> {
    let answer = robot_json(reply)?;
    let code = answer
        .get("errcode")
        .and_then(Value::as_i64)
        .ok_or(PostError::Unreadable)?;
    refused_unless_zero(code, answer.get("errmsg"))
}

/// Reads a Feishu answer: `{"code":0,"msg":"success"}`, or from older bots
/// `{"StatusCode":0,"StatusMessage":"success"}`.
fn read_feishu(reply: &HttpReply) -> Result<(), PostError> {
    let answer = robot_json(reply)?;
    let field = |name: &str| answer.get(name).and_then(Value::as_i64);
    match (field("code"), field("StatusCode")) {
        (Some(code), _) => refused_unless_zero(code, answer.get("msg")),
        (None, Some(code)) => refused_unless_zero(code, answer.get("StatusMessage")),
        (None, None) => Err(PostError::Unreadable),
    }
}

fn refused_unless_zero(code: i64, message: Option<&Value>) -> Result<(), PostError> {
    if code == 0 {
        return Ok(());
    }
    let message = message.and_then(Value::as_str).unwrap_or("");
    Err(PostError::Refused {
        code,
        message: message.to_string(),
    })
}

/// A webhook succeeds with any 2xx; its body is not read.
fn read_webhook(reply: &HttpReply) -> Result<(), PostError> {
    if (200..300).contains(&reply.status) {
        Ok(())
    } else {
        Err(PostError::Status(reply.status))
    }
}

impl Poster {
    /// A poster whose every request is given up after `timeout`.
    pub fn new(timeout: Duration) -> reqwest::Result<Poster> {
        Ok(Poster {
            http: build_client(timeout)?,
        })
    }

    /// Posts `event` to `target` once, signed with `now_ms` (epoch milliseconds) where the
    /// target signs.
    pub async fn post(
        &self,
        target: &AlertTarget,
        event: &Event,
        now_ms: i64,
    ) -> Result<(), PostError> {
        self.post_raw(target, event, now_ms)
            .await
            .map_err(|e| clean_error(e, &hidden(target)))
    }

    async fn post_raw(
        &self,
        target: &AlertTarget,
        event: &Event,
        now_ms: i64,
    ) -> Result<(), PostError> {
        let content = text(event);
        let url = target.url.expose();
        let secret = target
            .secret
            .as_ref()
            .map(|s| s.expose())
            .filter(|s| !s.is_empty());
        let now_s = now_ms.div_euclid(1000);
        match target.kind {
            AlertKind::Wecom => {
                let body = json!({
                    "msgtype": "text",
                    "text": { "content": fit_bytes(&content, WECOM_MAX_BYTES) },
                });
                let reply = self.send(self.json(url, body.to_string())).await?;
                read_errcode(&reply)
            }
            AlertKind::Dingtalk => {
                let url = match secret {
                    Some(secret) => dingtalk_url(url, secret, now_ms),
                    None => url.to_string(),
                };
                let body = json!({ "msgtype": "text", "text": { "content": content } });
                let reply = self.send(self.json(&url, body.to_string())).await?;
                read_errcode(&reply)
            }
            AlertKind::Feishu => {
                let mut body = json!({ "msg_type": "text", "content": { "text": content } });
                if let (Some(secret), Value::Object(map)) = (secret, &mut body) {
                    map.insert("timestamp".into(), Value::String(now_s.to_string()));
                    map.insert("sign".into(), Value::String(sign_feishu(secret, now_s)));
                }
                let reply = self.send(self.json(url, body.to_string())).await?;
                read_feishu(&reply)
            }
            AlertKind::Webhook => {
                let mut fields = match serde_json::to_value(event) {
                    Ok(Value::Object(map)) => map,
                    // An Event is a struct of strings and numbers: serde_json always makes
                    // an object of it.
                    _ => serde_json::Map::new(),
                };
                fields.insert("text".into(), Value::String(content));
                let body = Value::Object(fields).to_string();
                let mut request = self
                    .json(url, body.clone())
                    .header(HEADER_EVENT, event.event.as_str())
                    .header(HEADER_TIMESTAMP, now_s.to_string());
                if let Some(secret) = secret {
                    request = request.header(
                        HEADER_SIGNATURE,
                        sign_webhook(secret, now_s, body.as_bytes()),
                    );
                }
                let reply = self.send(request).await?;
                read_webhook(&reply)
            }
        }
    }

    fn json(&self, url: &str, body: String) -> reqwest::RequestBuilder {
        self.http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<HttpReply, PostError> {
        http::send(request).await.map_err(PostError::Transport)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::alerts::EventKind;
    use crate::secret::Secret;

    fn mac_hex(key: &[u8], message: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(message);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn hmac_known_answer() {
        assert_eq!(
            hex::encode(hmac_sha256(
                b"key",
                b"The quick brown fox jumps over the lazy dog"
            )),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn dingtalk_signs_timestamp_and_secret_under_the_secret() {
        let (secret, ts) = ("SECabc123", 1_700_000_000_123_i64);
        let expected = mac_hex(secret.as_bytes(), b"1700000000123\nSECabc123");
        let sign = sign_dingtalk(secret, ts);
        let decoded = percent_encoding::percent_decode_str(&sign)
            .decode_utf8()
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(decoded.as_bytes())
            .unwrap();
        assert_eq!(hex::encode(raw), expected);
        assert!(
            sign.chars().all(|c| c.is_ascii_alphanumeric() || c == '%'),
            "{sign}"
        );
    }

    #[test]
    fn feishu_signs_nothing_under_timestamp_and_secret() {
        let (secret, ts) = ("feishu-secret", 1_700_000_000_i64);
        let expected = mac_hex(b"1700000000\nfeishu-secret", b"");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sign_feishu(secret, ts))
            .unwrap();
        assert_eq!(hex::encode(raw), expected);
        assert_ne!(
            expected,
            mac_hex(secret.as_bytes(), b"1700000000\nfeishu-secret")
        );
    }

    #[test]
    fn webhook_signs_timestamp_dot_body() {
        let body = br#"{"event":"test"}"#;
        let expected = mac_hex(b"hook-secret", b"1700000000.{\"event\":\"test\"}");
        assert_eq!(
            sign_webhook("hook-secret", 1_700_000_000, body),
            format!("sha256={expected}")
        );
        assert_eq!(
            sign_webhook("key", 0, b""),
            format!("sha256={}", mac_hex(b"key", b"0."))
        );
    }

    #[test]
    fn dingtalk_url_appends_with_the_right_separator() {
        let sign = sign_dingtalk("s", 5);
        assert_eq!(
            dingtalk_url("https://x/robot/send?access_token=T", "s", 5),
            format!("https://x/robot/send?access_token=T&timestamp=5&sign={sign}")
        );
        assert_eq!(
            dingtalk_url("https://x/robot/send", "s", 5),
            format!("https://x/robot/send?timestamp=5&sign={sign}")
        );
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let text = "告".repeat(1000);
        let cut = fit_bytes(&text, WECOM_MAX_BYTES);
        assert!(cut.len() <= WECOM_MAX_BYTES && cut.ends_with('…'));
        assert_eq!(fit_bytes("short", WECOM_MAX_BYTES), "short");
    }

    #[test]
    fn answers_are_read_per_robot() {
        let reply = |status: u16, body: &str| HttpReply {
            status,
            body: bytes::Bytes::from(body.to_string()),
            retry_after: None,
        };
        assert_eq!(
            read_errcode(&reply(200, r#"{"errcode":0,"errmsg":"ok"}"#)),
            Ok(())
        );
        assert_eq!(
            read_errcode(&reply(
                200,
                r#"{"errcode":93000,"errmsg":"invalid webhook url"}"#
            )),
            Err(PostError::Refused {
                code: 93000,
                message: "invalid webhook url".into()
            })
        );
        assert_eq!(
            read_errcode(&reply(200, "<html>")),
            Err(PostError::Unreadable)
        );
        assert_eq!(
            read_errcode(&reply(200, r#"{"code":0}"#)),
            Err(PostError::Unreadable)
        );
        assert_eq!(read_errcode(&reply(502, "")), Err(PostError::Status(502)));
        assert_eq!(
            read_feishu(&reply(200, r#"{"code":0,"msg":"success"}"#)),
            Ok(())
        );
        assert_eq!(read_feishu(&reply(200, r#"{"StatusCode":0}"#)), Ok(()));
        assert!(matches!(
            read_feishu(&reply(200, r#"{"code":19021,"msg":"sign match fail"}"#)),
            Err(PostError::Refused { code: 19021, .. })
        ));
        assert_eq!(read_webhook(&reply(204, "")), Ok(()));
        assert!(read_webhook(&reply(410, ""))
            .unwrap_err()
            .is_permanent_status());
        assert!(!PostError::Status(500).is_permanent_status());
    }

    #[test]
    fn refusals_are_cleaned_of_the_url_and_secret() {
        let target = AlertTarget {
            name: "ops".into(),
            kind: AlertKind::Wecom,
            url: Secret::new("https://qyapi.example/send?key=SECRETKEY-123"),
            secret: Some(Secret::new("SIGNING-SECRET")),
            events: None,
            rate_per_minute: 20,
        };
        let e = clean_error(
            PostError::Refused {
                code: 1,
                message: "bad key SECRETKEY-123 / SIGNING-SECRET\n@all".into(),
            },
            &hidden(&target),
        );
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains("SECRETKEY") && !shown.contains("SIGNING"),
            "{shown}"
        );
        assert!(!shown.contains('\n'), "{shown}");
    }

    #[tokio::test]
    async fn transport_errors_never_name_the_url() {
        let poster = Poster::new(Duration::from_secs(5)).unwrap();
        for kind in [
            AlertKind::Wecom,
            AlertKind::Dingtalk,
            AlertKind::Feishu,
            AlertKind::Webhook,
        ] {
            let target = AlertTarget {
                name: "closed".into(),
                kind,
                url: Secret::new("http://127.0.0.1:1/robot?key=SECRETKEY"),
                secret: Some(Secret::new("SIGNSECRET")),
                events: None,
                rate_per_minute: 20,
            };
            let event = Event::new(EventKind::Test, "", 1_700_000_000_000);
            let e = poster
                .post(&target, &event, 1_700_000_000_000)
                .await
                .unwrap_err();
            assert!(matches!(e, PostError::Transport(_)), "{e:?}");
            for shown in [e.to_string(), format!("{e:?}")] {
                assert!(!shown.contains("SECRETKEY"), "{shown}");
                assert!(!shown.contains("SIGNSECRET"), "{shown}");
                assert!(!shown.contains("127.0.0.1:1/robot"), "{shown}");
            }
        }
    }
}
