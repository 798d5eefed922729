//! The fw199 `rebillingnew` client: builds the signed form, sends it, and reads the answer
//! into a [`RebillAnswer`] or says why there is none ([`RebillError`]) (SPEC §1).
//!
//! What an answer means for the row (done, retry, pause) is decided by
//! `jobs::rebill::classify`; this module only speaks the wire.

use std::time::Duration;

use serde_json::Value;
use url::Url;

use super::http::{self, HttpReply, TransportError};
use super::sign::sign;
use crate::secret::Secret;

/// What the rebill client needs to know.
#[derive(Debug, Clone)]
pub struct RebillSettings {
    /// The `rebillingnew` URL.
    pub endpoint: Url,
    /// Partner AppId.
    pub appid: String,
    /// Partner AppSecret (signs requests; never sent, never logged).
    pub app_secret: Secret,
    /// Whole-request timeout.
    pub timeout: Duration,
}

/// Sends rebilling requests. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct RebillClient {
    http: reqwest::Client,
    settings: RebillSettings,
}

/// A parsed gateway answer (HTTP 200 with a JSON object carrying a numeric `code`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebillAnswer {
    /// `code`, as sent (an integer or a numeric string).
    pub code: String,
    /// `code` as a number.
    pub code_num: i64,
    /// `message`.
    pub message: String,
    /// `invoice_no` (code 100).
    pub invoice_no: Option<String>,
    /// `invoice_down_url` (code 100).
    pub invoice_down_url: Option<String>,
}

/// Why a request produced no [`RebillAnswer`]. Texts never carry the request's signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebillError {
    /// No answer could be read: timeout, connection trouble, a body over 1 MiB.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// HTTP 429 or 503: the gateway asks us to slow down.
    #[error("HTTP {status}: server busy")]
    Busy {
        /// 429 or 503.
        status: u16,
        /// `Retry-After`, when the gateway sent one we can read.
        retry_after: Option<Duration>,
    },
    /// Any other status than 200.
    #[error("HTTP {status}: {excerpt}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// A short single-line excerpt of the body.
        excerpt: String,
    },
    /// HTTP 200 with a body that is not a usable answer (not JSON, no numeric `code`).
    #[error("{reason}")]
    Unreadable {
        /// What is wrong with the body, with an excerpt of it.
        reason: String,
    },
}

impl RebillError {
    /// The HTTP status of the answer, when one arrived.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            RebillError::Transport(_) => None,
            RebillError::Busy { status, .. } | RebillError::Status { status, .. } => Some(*status),
            RebillError::Unreadable { .. } => Some(200),
        }
    }
}

/// `request_data`: `{"orderno": …}` from a JSON serializer, so quotes and backslashes in an
/// order number cannot break the document.
pub fn request_data(orderno: &str) -> String {
    serde_json::json!({ "orderno": orderno }).to_string()
}

/// The five form fields of a request, signed.
pub fn signed_form(
    appid: &str,
    secret: &Secret,
    tax_num: &str,
    orderno: &str,
    timestamp: i64,
) -> Vec<(&'static str, String)> {
    let mut fields: Vec<(&'static str, String)> = vec![
        ("appid", appid.to_string()),
        ("timestamp", timestamp.to_string()),
        ("tax_num", tax_num.to_string()),
        ("request_data", request_data(orderno)),
    ];
    let signature = sign(
        fields.iter().map(|(k, v)| (*k, v.as_str())),
        secret.expose(),
    );
    fields.push(("sign", signature));
    fields
}

impl RebillClient {
    /// Builds the client (rustls, certificate verification, the configured timeout).
    pub fn new(settings: RebillSettings) -> reqwest::Result<Self> {
        Ok(RebillClient {
            http: http::build_client(settings.timeout)?,
            settings,
        })
    }

    /// Sends one rebilling request and reads what came back.
    pub async fn send(&self, tax_num: &str, orderno: &str) -> Result<RebillAnswer, RebillError> {
        let s = &self.settings;
        let form = signed_form(
            &s.appid,
            &s.app_secret,
            tax_num,
            orderno,
            chrono::Utc::now().timestamp(),
        );
        let signature = form.last().map(|(_, v)| v.clone()).unwrap_or_default();
        let request = self.http.post(s.endpoint.clone()).form(&form);
        read_reply(http::send(request).await?, &signature)
    }
}

/// `text` with every occurrence of `signature` replaced by `***`.
fn hide(text: &str, signature: &str) -> String {
    if signature.is_empty() {
        text.to_string()
    } else {
        text.replace(signature, "***")
    }
}

/// Reads an HTTP answer of the gateway. A gateway that echoes the request must not put
/// the signature in a message or log line, so `signature` is replaced by `***` in the body
/// before anything is taken from it (an excerpt could otherwise cut it where the
/// replacement no longer finds it).
pub fn read_reply(mut reply: HttpReply, signature: &str) -> Result<RebillAnswer, RebillError> {
    let text = String::from_utf8_lossy(&reply.body);
    if !signature.is_empty() && text.contains(signature) {
        reply.body = bytes::Bytes::from(hide(&text, signature));
    }
    if reply.status == 429 || reply.status == 503 {
        return Err(RebillError::Busy {
            status: reply.status,
            retry_after: reply.retry_after,
        });
    }
    if reply.status != 200 {
        return Err(RebillError::Status {
            status: reply.status,
            excerpt: http::excerpt(&reply.body),
        });
    }
    let mut answer =
        parse_answer(&reply.body).map_err(|reason| RebillError::Unreadable { reason })?;
    // JSON escapes (`\u0061`…) could spell the signature so the byte search missed it.
    answer.message = hide(&answer.message, signature);
    answer.invoice_no = answer.invoice_no.map(|v| hide(&v, signature));
    answer.invoice_down_url = answer.invoice_down_url.map(|v| hide(&v, signature));
    Ok(answer)
}

/// Reads `code`, `message`, `invoice_no` and `invoice_down_url` from a JSON body.
pub fn parse_answer(body: &[u8]) -> Result<RebillAnswer, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| format!("answer is not JSON: {}", http::excerpt(body)))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("answer is not a JSON object: {}", http::excerpt(body)))?;
    let (code, code_num) = match obj.get("code") {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => (i.to_string(), i),
            None => return Err(format!("code {n} is not an integer")),
        },
        Some(Value::String(s)) => match s.trim().parse::<i64>() {
            Ok(i) => (s.trim().to_string(), i),
            Err(_) => return Err(format!("code {s:?} is not numeric")),
        },
        Some(other) => {
            return Err(format!(
                "code has the wrong type: {}",
                http::excerpt(other.to_string().as_bytes())
            ))
        }
        None => return Err(format!("answer has no code: {}", http::excerpt(body))),
    };
    let text = |key: &str| match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(RebillAnswer {
        code,
        code_num,
        message: text("message").unwrap_or_default(),
        invoice_no: text("invoice_no"),
        invoice_down_url: text("invoice_down_url"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{RebillBehavior, SimOptions, Simulator};
    use bytes::Bytes;

    fn reply(status: u16, body: &str) -> HttpReply {
        HttpReply {
            status,
            body: Bytes::from(body.to_string()),
            retry_after: None,
        }
    }

    #[test]
    fn request_data_is_serialized_json() {
        assert_eq!(request_data(r#"a"b\c"#), r#"{"orderno":"a\"b\\c"}"#);
        assert_eq!(request_data("订单-1"), r#"{"orderno":"订单-1"}"#);
    }

    #[test]
    fn form_is_signed_over_the_four_fields() {
        let secret = Secret::new("S3cr3t!");
        let form = signed_form("A1", &secret, "91310117568051222X", "X1", 1_700_000_000);
        let names: Vec<&str> = form.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            ["appid", "timestamp", "tax_num", "request_data", "sign"]
        );
        let expected = sign(
            [
                ("appid", "A1"),
                ("timestamp", "1700000000"),
                ("tax_num", "91310117568051222X"),
                ("request_data", r#"{"orderno":"X1"}"#),
            ],
            "S3cr3t!",
        );
        assert_eq!(form[4].1, expected);
    }

    #[test]
    fn codes_as_numbers_and_strings() {
        let a = parse_answer(r#"{"code":0,"message":"重试成功"}"#.as_bytes()).expect("answer");
        assert_eq!((a.code.as_str(), a.code_num), ("0", 0));
        let a = parse_answer(r#"{"code":"0","message":"重试成功"}"#.as_bytes()).expect("answer");
        assert_eq!((a.code.as_str(), a.code_num), ("0", 0));
        // A string code keeps its leading zeros; the number does not have any.
        let a =
            parse_answer(r#"{"code":"070301","message":"invalid"}"#.as_bytes()).expect("answer");
        assert_eq!((a.code.as_str(), a.code_num), ("070301", 70301));
        let a = parse_answer(r#"{"code":70601,"message":"签名错误"}"#.as_bytes()).expect("answer");
        assert_eq!((a.code.as_str(), a.message.as_str()), ("70601", "签名错误"));
        let a = parse_answer(
            r#"{"code":100,"invoice_no":"24312000000022669098","invoice_down_url":"https://x/y.pdf","message":"发票已经生成,不需要重复提交"}"#.as_bytes(),
        )
        .expect("answer");
        assert_eq!(a.code_num, 100);
        assert_eq!(a.invoice_no.as_deref(), Some("24312000000022669098"));
        assert_eq!(a.invoice_down_url.as_deref(), Some("https://x/y.pdf"));
    }

    #[test]
    fn bad_bodies_are_unreadable() {
        for body in [
            "",
            "<html>502 Bad Gateway</html>",
            "null",
            "[1]",
            r#"{"code":[1]}"#,
            r#"{"code":"abc"}"#,
            r#"{"message":"x"}"#,
            r#"{"code":1.5}"#,
        ] {
            let e = read_reply(reply(200, body), "").expect_err(body);
            assert!(matches!(e, RebillError::Unreadable { .. }), "{body}: {e:?}");
            assert_eq!(e.http_status(), Some(200));
        }
        let e = read_reply(reply(500, "oops"), "").expect_err("500");
        assert_eq!(
            e,
            RebillError::Status {
                status: 500,
                excerpt: "oops".into()
            }
        );
        assert_eq!(e.to_string(), "HTTP 500: oops");
    }

    #[test]
    fn busy_answers_carry_retry_after() {
        let mut r = reply(429, "");
        r.retry_after = Some(Duration::from_secs(7));
        assert_eq!(
            read_reply(r, ""),
            Err(RebillError::Busy {
                status: 429,
                retry_after: Some(Duration::from_secs(7))
            })
        );
        let e = read_reply(reply(503, "busy"), "").expect_err("503");
        assert_eq!(e.to_string(), "HTTP 503: server busy");
    }

    #[test]
    fn an_echoed_signature_is_hidden() {
        const SIG: &str = "e9bffb8a29e2b269660e9022dcfff51a";
        let a = read_reply(
            reply(200, &format!(r#"{{"code":1,"message":"sign {SIG} 错误"}}"#)),
            SIG,
        )
        .expect("answer");
        assert_eq!(a.message, "sign *** 错误");
        // An error page quoting the signature past the excerpt's cut cannot leak a prefix.
        let page = format!("<html>{} sign={SIG}</html>", "x".repeat(100));
        let e = read_reply(reply(502, &page), SIG).expect_err("502");
        assert!(!e.to_string().contains(&SIG[..8]), "{e}");
        let e = read_reply(reply(200, &format!("<html>{SIG}</html>")), SIG).expect_err("html");
        assert!(!e.to_string().contains(SIG), "{e}");
    }

    #[tokio::test]
    async fn answers_over_the_wire_are_typed() {
        let opts = SimOptions::default();
        let sim = Simulator::start(opts.clone()).await.expect("sim");
        let client = RebillClient::new(RebillSettings {
            endpoint: Url::parse(&sim.rebill_url()).expect("url"),
            appid: opts.rebill_appid.clone(),
            app_secret: Secret::new(opts.rebill_secret.clone()),
            timeout: Duration::from_secs(5),
        })
        .expect("client");
        const TAX: &str = "91310117568051222X";
        let a = client.send(TAX, "OK-1").await.expect("answer");
        assert_eq!((a.code_num, a.message.as_str()), (0, "重试成功"));
        sim.script_rebill("ISSUED-1", vec![RebillBehavior::Issued]);
        let a = client.send(TAX, "ISSUED-1").await.expect("answer");
        assert_eq!(a.code_num, 100);
        assert!(
            a.invoice_no.is_some() && a.invoice_down_url.is_some(),
            "{a:?}"
        );
        sim.script_rebill(
            "BUSY-1",
            vec![RebillBehavior::TooMany {
                retry_after_secs: 9,
            }],
        );
        assert_eq!(
            client.send(TAX, "BUSY-1").await,
            Err(RebillError::Busy {
                status: 429,
                retry_after: Some(Duration::from_secs(9))
            })
        );
        sim.script_rebill("BIG-1", vec![RebillBehavior::Oversized]);
        assert_eq!(
            client.send(TAX, "BIG-1").await,
            Err(RebillError::Transport(TransportError::TooLarge))
        );
        assert!(sim.rebill_requests().iter().all(|r| r.verified));
    }
}
