//! The fw199 `rebillingnew` client: builds the signed form, sends it, and classifies the
//! answer into an [`Action`] (SPEC §1).

use std::time::Duration;

use serde_json::Value;
use url::Url;

use super::http::{self, HttpReply, TransportError};
use super::sign::sign;
use crate::queue::action::{Action, Attempted, Outcome};
use crate::queue::rules::{first_match, MessageRule, PauseDefaults};
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
    /// Operator rules, checked before the built-in ones.
    pub rules: Vec<MessageRule>,
    /// Default pause lengths.
    pub pauses: PauseDefaults,
}

/// Sends rebilling requests. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct RebillClient {
    http: reqwest::Client,
    settings: RebillSettings,
}

/// A parsed gateway answer.
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

    /// Sends one rebilling request and classifies what came back.
    pub async fn send(&self, tax_num: &str, orderno: &str) -> Attempted {
        let s = &self.settings;
        let form = signed_form(
            &s.appid,
            &s.app_secret,
            tax_num,
            orderno,
            chrono::Utc::now().timestamp(),
        );
        let request = self.http.post(s.endpoint.clone()).form(&form);
        let signature = form.last().map(|(_, v)| v.clone()).unwrap_or_default();
        match http::send(request).await {
            Ok(reply) => {
                let mut attempted = classify(&reply, &s.rules, s.pauses, chrono::Utc::now());
                // A gateway that echoes the request must not put the signature in a log line.
                if !signature.is_empty() {
                    attempted.message = attempted.message.replace(&signature, "***");
                }
                attempted
            }
            Err(TransportError::TooLarge) => {
                Attempted::transient(None, "answer body larger than 1 MiB; ignored")
            }
            Err(e) => Attempted::transient(None, e.to_string()),
        }
    }
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

/// Turns an HTTP answer into an action (SPEC §1). `now` decides when a daily quota resets.
pub fn classify(
    reply: &HttpReply,
    rules: &[MessageRule],
    pauses: PauseDefaults,
    now: chrono::DateTime<chrono::Utc>,
) -> Attempted {
    if reply.status == 429 || reply.status == 503 {
        let mut a = Attempted::transient(
            Some(reply.status),
            format!("HTTP {}: server busy", reply.status),
        );
        a.action = Action::Retry {
            after: reply.retry_after,
        };
        return a;
    }
    if reply.status != 200 {
        return Attempted::transient(
            Some(reply.status),
            format!("HTTP {}: {}", reply.status, http::excerpt(&reply.body)),
        );
    }
    let answer = match parse_answer(&reply.body) {
        Ok(answer) => answer,
        Err(why) => return Attempted::transient(Some(200), why),
    };
    let action = match answer.code_num {
        0 => Action::Done(Outcome::Accepted),
        100 => Action::Done(Outcome::Issued),
        _ => {
            let haystack = format!("{} {}", answer.code, answer.message);
            first_match(rules, &haystack, pauses)
                .unwrap_or_else(|| default_rule(&answer.code, &answer.message, pauses, now))
        }
    };
    let message = if answer.message.is_empty() {
        format!("code {}", answer.code)
    } else {
        answer.message.clone()
    };
    Attempted {
        action,
        http_status: Some(200),
        code: Some(answer.code),
        message,
        invoice_no: answer.invoice_no,
        invoice_down_url: answer.invoice_down_url,
    }
}

const ALREADY_ISSUED: &[&str] = &["发票已生成", "发票已经生成", "不需要重复提交", "无需再重试"];
const IN_PROGRESS: &[&str] = &["开票中", "重试中", "签章中"];
const SELLER_MUST_ACT: &[&str] = &[
    "短信验证码",
    "需登录",
    "扫码登录",
    "实人认证",
    "授信额度",
    "未授权",
    "备案",
];
const RETRY_CAP: &[&str] = &["E9613", "20次"];
const BAD_CREDENTIALS: &[&str] = &["签名", "sign", "appid"];
const BAD_CREDENTIAL_CODES: &[&str] = &["070601", "070301"];
const QUOTA: &[&str] = &["额度", "调用量"];
const QUOTA_CODES: &[&str] = &["070201", "070204"];
const DAILY_QUOTA: &[&str] = &["日调用量", "今日", "当日", "每日"];
const DAILY_QUOTA_CODES: &[&str] = &["070201"];

fn contains_any(text: &str, needles: &[&str]) -> bool {
    let lower = text.to_lowercase();
    needles.iter().any(|n| lower.contains(&n.to_lowercase()))
}

/// True when `text` holds `code` as a code of its own, not as part of a longer run of
/// letters or digits (an order number in a message must not look like 070601).
fn contains_code(text: &str, code: &str) -> bool {
    let glued = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    text.match_indices(code).any(|(i, _)| {
        let before = text.get(..i).and_then(|t| t.chars().next_back());
        let after = text.get(i + code.len()..).and_then(|t| t.chars().next());
        !glued(before) && !glued(after)
    })
}

/// The answer's `code` is one of `codes` (leading zeros ignored: the gateway may send
/// 070601 as the number 70601), or the message quotes one of them.
fn has_code(code: &str, message: &str, codes: &[&str]) -> bool {
    codes.iter().any(|c| {
        code.trim_start_matches('0') == c.trim_start_matches('0') || contains_code(message, c)
    })
}

/// The built-in message rules of SPEC §1, in order: the seller rules come before the quota
/// rules because 授信额度 (the seller's credit line) also contains 额度.
fn default_rule(
    code: &str,
    message: &str,
    pauses: PauseDefaults,
    now: chrono::DateTime<chrono::Utc>,
) -> Action {
    if contains_any(message, ALREADY_ISSUED) {
        Action::Done(Outcome::Issued)
    } else if contains_any(message, IN_PROGRESS) {
        Action::Done(Outcome::InProgress)
    } else if contains_any(message, SELLER_MUST_ACT) {
        Action::PauseSeller(pauses.seller)
    } else if contains_any(message, RETRY_CAP) || code == "E9613" {
        Action::Retry {
            after: Some(Duration::from_secs(24 * 3600)),
        }
    } else if contains_any(message, BAD_CREDENTIALS)
        || has_code(code, message, BAD_CREDENTIAL_CODES)
    {
        Action::PauseQueue(pauses.queue)
    } else if contains_any(message, QUOTA) || has_code(code, message, QUOTA_CODES) {
        if contains_any(message, DAILY_QUOTA) || has_code(code, message, DAILY_QUOTA_CODES) {
            Action::PauseQueue(until_next_china_day(now))
        } else {
            Action::PauseQueue(pauses.queue)
        }
    } else {
        Action::Retry { after: None }
    }
}

/// Time until the next midnight in China Standard Time (UTC+8), when daily quotas reset.
pub fn until_next_china_day(now: chrono::DateTime<chrono::Utc>) -> Duration {
    const DAY: i64 = 86_400;
    let local = now.timestamp() + 8 * 3600;
    let next_midnight_local = (local.div_euclid(DAY) + 1) * DAY;
    Duration::from_secs((next_midnight_local - local) as u64 + 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use chrono::TimeZone;

    const PAUSES: PauseDefaults = PauseDefaults {
        seller: Duration::from_secs(1800),
        queue: Duration::from_secs(600),
    };

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::Utc
            .with_ymd_and_hms(2026, 11, 22, 10, 0, 0)
            .single()
            .expect("valid date")
    }

    fn reply(status: u16, body: &str) -> HttpReply {
        HttpReply {
            status,
            body: Bytes::from(body.to_string()),
            retry_after: None,
        }
    }

    fn action_of(body: &str) -> Action {
        classify(&reply(200, body), &[], PAUSES, now()).action
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
    fn codes_zero_and_hundred_are_done() {
        assert_eq!(
            action_of(r#"{"code":0,"message":"重试成功"}"#),
            Action::Done(Outcome::Accepted)
        );
        assert_eq!(
            action_of(r#"{"code":"0","message":"重试成功"}"#),
            Action::Done(Outcome::Accepted)
        );
        let a = classify(
            &reply(
                200,
                r#"{"code":100,"invoice_no":"24312000000022669098","invoice_down_url":"https://x/y.pdf","message":"发票已经生成,不需要重复提交"}"#,
            ),
            &[],
            PAUSES,
            now(),
        );
        assert_eq!(a.action, Action::Done(Outcome::Issued));
        assert_eq!(a.invoice_no.as_deref(), Some("24312000000022669098"));
        assert_eq!(a.invoice_down_url.as_deref(), Some("https://x/y.pdf"));
    }

    #[test]
    fn default_message_rules() {
        assert_eq!(
            action_of(r#"{"code":1,"message":"发票已生成,无需再重试开票"}"#),
            Action::Done(Outcome::Issued)
        );
        assert_eq!(
            action_of(r#"{"code":1,"message":"开票中(重试中),请耐心等待开票结果"}"#),
            Action::Done(Outcome::InProgress)
        );
        assert_eq!(
            action_of(
                r#"{"code":1,"message":"本次操作需登录电子发票服务平台,请先使用短信验证码登录"}"#
            ),
            Action::PauseSeller(PAUSES.seller)
        );
        assert_eq!(
            action_of(r#"{"code":1,"message":"授信额度不足"}"#),
            Action::PauseSeller(PAUSES.seller)
        );
        assert_eq!(
            action_of(r#"{"code":1,"message":"E9613 该订单今日重试已达20次"}"#),
            Action::Retry {
                after: Some(Duration::from_secs(86400))
            }
        );
        assert_eq!(
            action_of(r#"{"code":70601,"message":"签名错误"}"#),
            Action::PauseQueue(PAUSES.queue)
        );
        assert_eq!(
            action_of(r#"{"code":"070301","message":"invalid"}"#),
            Action::PauseQueue(PAUSES.queue)
        );
        assert_eq!(
            action_of(r#"{"code":1,"message":"套餐调用量已用完"}"#),
            Action::PauseQueue(PAUSES.queue)
        );
        // Daily quota: until the next day in China (10:00 UTC = 18:00 CST → 6 h + 1 min).
        assert_eq!(
            action_of(r#"{"code":"070201","message":"日调用量超限"}"#),
            Action::PauseQueue(Duration::from_secs(6 * 3600 + 60))
        );
        assert_eq!(
            action_of(r#"{"code":9,"message":"系统繁忙"}"#),
            Action::Retry { after: None }
        );
    }

    #[test]
    fn codes_inside_other_numbers_are_not_codes() {
        assert_eq!(
            action_of(r#"{"code":1,"message":"订单 2024070301123 不存在"}"#),
            Action::Retry { after: None }
        );
        assert_eq!(
            action_of(r#"{"code":1,"message":"错误码 070601"}"#),
            Action::PauseQueue(PAUSES.queue)
        );
        assert_eq!(
            action_of(r#"{"code":70204,"message":"x"}"#),
            Action::PauseQueue(PAUSES.queue)
        );
    }

    #[test]
    fn operator_rules_come_first() {
        let rules = vec![MessageRule {
            contains: "开票中".into(),
            action: "retry".into(),
            after: Some(Duration::from_secs(5)),
        }];
        let a = classify(
            &reply(200, r#"{"code":1,"message":"开票中"}"#),
            &rules,
            PAUSES,
            now(),
        );
        assert_eq!(
            a.action,
            Action::Retry {
                after: Some(Duration::from_secs(5))
            }
        );
    }

    #[test]
    fn bad_answers_are_transient() {
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
            let a = classify(&reply(200, body), &[], PAUSES, now());
            assert_eq!(a.action, Action::Retry { after: None }, "{body}");
        }
        let a = classify(&reply(500, "oops"), &[], PAUSES, now());
        assert_eq!(
            (a.action, a.http_status),
            (Action::Retry { after: None }, Some(500))
        );
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut r = reply(429, "");
        r.retry_after = Some(Duration::from_secs(7));
        assert_eq!(
            classify(&r, &[], PAUSES, now()).action,
            Action::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn china_day_boundary() {
        let just_before = chrono::Utc
            .with_ymd_and_hms(2026, 11, 22, 15, 59, 0)
            .single()
            .expect("date");
        assert_eq!(
            until_next_china_day(just_before),
            Duration::from_secs(60 + 60)
        );
    }
}
