//! What a rebill answer means for the row (SPEC §1): operator rules first, then the
//! built-in message rules, turned into one [`Action`].

use std::time::Duration;

use crate::clients::http::TransportError;
use crate::clients::rebill::{RebillAnswer, RebillError};
use crate::queue::action::{Action, Attempted, Outcome};
use crate::queue::rules::{first_match, MessageRule, PauseDefaults};

/// Turns what the rebill client returned into an action and what to record (SPEC §1).
/// `now` decides when a daily quota resets.
pub fn classify(
    result: Result<RebillAnswer, RebillError>,
    rules: &[MessageRule],
    pauses: PauseDefaults,
    now: chrono::DateTime<chrono::Utc>,
) -> Attempted {
    let answer = match result {
        Ok(answer) => answer,
        Err(error) => return failed(error),
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
        answer.message
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

/// No usable answer: retry, after the `Retry-After` of a busy gateway.
fn failed(error: RebillError) -> Attempted {
    let status = error.http_status();
    match error {
        RebillError::Busy {
            retry_after: after, ..
        } => Attempted {
            action: Action::Retry { after },
            ..Attempted::transient(status, error.to_string())
        },
        RebillError::Transport(TransportError::TooLarge) => {
            Attempted::transient(None, "answer body larger than 1 MiB; ignored")
        }
        other => Attempted::transient(status, other.to_string()),
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

    /// An answer with `code` as the gateway sent it (`"070301"` keeps its zeros).
    fn answer(code: &str, message: &str) -> RebillAnswer {
        RebillAnswer {
            code: code.into(),
            code_num: code.parse().expect("numeric code"),
            message: message.into(),
            invoice_no: None,
            invoice_down_url: None,
        }
    }

    fn action_of(code: &str, message: &str) -> Action {
        classify(Ok(answer(code, message)), &[], PAUSES, now()).action
    }

    #[test]
    fn codes_zero_and_hundred_are_done() {
        assert_eq!(action_of("0", "重试成功"), Action::Done(Outcome::Accepted));
        let a = classify(
            Ok(RebillAnswer {
                invoice_no: Some("24312000000022669098".into()),
                invoice_down_url: Some("https://x/y.pdf".into()),
                ..answer("100", "发票已经生成,不需要重复提交")
            }),
            &[],
            PAUSES,
            now(),
        );
        assert_eq!(a.action, Action::Done(Outcome::Issued));
        assert_eq!(a.invoice_no.as_deref(), Some("24312000000022669098"));
        assert_eq!(a.invoice_down_url.as_deref(), Some("https://x/y.pdf"));
        assert_eq!(
            classify(Ok(answer("0", "")), &[], PAUSES, now()).message,
            "code 0"
        );
    }

    #[test]
    fn default_message_rules() {
        let day = Some(Duration::from_secs(86400));
        // Daily quota: until the next day in China (10:00 UTC = 18:00 CST → 6 h + 1 min).
        let until_tomorrow = Duration::from_secs(6 * 3600 + 60);
        let cases = [
            (
                "1",
                "发票已生成,无需再重试开票",
                Action::Done(Outcome::Issued),
            ),
            (
                "1",
                "开票中(重试中),请耐心等待开票结果",
                Action::Done(Outcome::InProgress),
            ),
            (
                "1",
                "本次操作需登录电子发票服务平台,请先使用短信验证码登录",
                Action::PauseSeller(PAUSES.seller),
            ),
            ("1", "授信额度不足", Action::PauseSeller(PAUSES.seller)),
            (
                "1",
                "E9613 该订单今日重试已达20次",
                Action::Retry { after: day },
            ),
            ("70601", "签名错误", Action::PauseQueue(PAUSES.queue)),
            ("070301", "invalid", Action::PauseQueue(PAUSES.queue)),
            ("1", "套餐调用量已用完", Action::PauseQueue(PAUSES.queue)),
            ("070201", "日调用量超限", Action::PauseQueue(until_tomorrow)),
            ("9", "系统繁忙", Action::Retry { after: None }),
        ];
        for (code, message, expected) in cases {
            assert_eq!(action_of(code, message), expected, "{code} {message}");
        }
    }

    #[test]
    fn codes_inside_other_numbers_are_not_codes() {
        assert_eq!(
            action_of("1", "订单 2024070301123 不存在"),
            Action::Retry { after: None }
        );
        assert_eq!(
            action_of("1", "错误码 070601"),
            Action::PauseQueue(PAUSES.queue)
        );
        assert_eq!(action_of("70204", "x"), Action::PauseQueue(PAUSES.queue));
    }

    #[test]
    fn operator_rules_come_first() {
        let rules = vec![MessageRule {
            contains: "开票中".into(),
            action: "retry".into(),
            after: Some(Duration::from_secs(5)),
        }];
        let a = classify(Ok(answer("1", "开票中")), &rules, PAUSES, now());
        assert_eq!(
            a.action,
            Action::Retry {
                after: Some(Duration::from_secs(5))
            }
        );
    }

    #[test]
    fn no_answer_is_transient() {
        let unreadable = RebillError::Unreadable {
            reason: "answer is not JSON: <html>".into(),
        };
        let a = classify(Err(unreadable), &[], PAUSES, now());
        assert_eq!(
            (a.action, a.http_status, a.message.as_str()),
            (
                Action::Retry { after: None },
                Some(200),
                "answer is not JSON: <html>"
            )
        );
        let status = RebillError::Status {
            status: 500,
            excerpt: "oops".into(),
        };
        let a = classify(Err(status), &[], PAUSES, now());
        assert_eq!(
            (a.action, a.http_status),
            (Action::Retry { after: None }, Some(500))
        );
        let timeout = RebillError::Transport(TransportError::Timeout("deadline".into()));
        let a = classify(Err(timeout), &[], PAUSES, now());
        assert_eq!(
            (a.action, a.http_status),
            (Action::Retry { after: None }, None)
        );
        let big = RebillError::Transport(TransportError::TooLarge);
        let a = classify(Err(big), &[], PAUSES, now());
        assert_eq!(a.message, "answer body larger than 1 MiB; ignored");
    }

    #[test]
    fn retry_after_is_honoured() {
        let busy = RebillError::Busy {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
        };
        let a = classify(Err(busy), &[], PAUSES, now());
        assert_eq!(
            a.action,
            Action::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            (a.http_status, a.message.as_str()),
            (Some(429), "HTTP 429: server busy")
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
