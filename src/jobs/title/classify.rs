//! What an FPTT1001 answer means for the row (SPEC §2): operator rules first, then the
//! built-in rules, turned into one [`Action`] and a capped message.

use crate::clients::title::{TitleError, TitleReply};
use crate::clients::title_reply::{is_success, mentions_duplicate, mentions_token, Reply};
use crate::queue::action::{Action, Attempted, Outcome};
use crate::queue::rules::{first_match, MessageRule, PauseDefaults};

/// Longest `last_message` this queue records; server messages beyond it are cut.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// Words of a server complaint about a field's value: the row is wrong and resending it
/// cannot help.
const FIELD_WORDS: &[&str] = &[
    "ORDER_NO",
    "INVOICETYPE",
    "INVOCIETYPE",
    "TTQQLSH",
    "ATTACH",
    "GMF_",
    "REMARK",
    "BY1",
    "BY2",
    "长度",
    "必填",
    "不能为空",
    "超长",
];

fn mentions_field(message: &str) -> bool {
    let upper = message.to_uppercase();
    FIELD_WORDS.iter().any(|w| upper.contains(w))
}

/// Cuts a message to [`MAX_MESSAGE_CHARS`].
fn cap(message: &str) -> String {
    let mut out: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    if message.chars().count() > MAX_MESSAGE_CHARS {
        out.push('…');
    }
    out
}

fn attempted(
    action: Action,
    status: Option<u16>,
    code: Option<String>,
    message: String,
) -> Attempted {
    Attempted {
        action,
        http_status: status,
        code,
        message,
        invoice_no: None,
        invoice_down_url: None,
    }
}

/// Turns what the title client returned into an action and what to record. `is_retry`:
/// an earlier attempt of this row may have reached the platform, so "serial already used"
/// means that attempt succeeded.
pub fn classify(
    result: Result<TitleReply, TitleError>,
    is_retry: bool,
    rules: &[MessageRule],
    pauses: PauseDefaults,
) -> Attempted {
    match result {
        Ok(reply) => classify_reply(&reply, is_retry, rules, pauses),
        Err(error) => classify_error(error, pauses),
    }
}

/// No answer from thirdApi: refused credentials pause the queue, loudly (a config mistake
/// must not burn every row's attempts); a payload that cannot be built fails the row; the
/// rest is retried.
fn classify_error(error: TitleError, pauses: PauseDefaults) -> Attempted {
    match error {
        TitleError::Refused { ref code, .. } => {
            let code = code.clone();
            let text = error.to_string();
            tracing::error!(
                queue = "title",
                pause = ?pauses.queue,
                "{text}; pausing the title queue"
            );
            attempted(
                Action::PauseQueue(pauses.queue),
                None,
                Some(code),
                cap(&text),
            )
        }
        TitleError::Payload(e) => attempted(Action::Fail, None, None, e.to_string()),
        TitleError::Transport(e) => Attempted::transient(None, e.to_string()),
        TitleError::TokenService(text) => Attempted::transient(None, cap(&text)),
    }
}

/// Classifies one FPTT1001 answer (after any token renewal).
///
/// In order: a success reply on 2xx → `done(sent)`; operator rules on the message (or on
/// an excerpt of an unreadable body); 429/503 → retry after `Retry-After`; serial already
/// used → `done(sent)` on a retry, `fail` on a first attempt; token trouble → retry;
/// a complaint about a field → `fail`; anything else → retry with backoff.
fn classify_reply(
    answer: &TitleReply,
    is_retry: bool,
    rules: &[MessageRule],
    pauses: PauseDefaults,
) -> Attempted {
    let status = answer.status;
    let done = |action, code, message| attempted(action, Some(status), code, message);
    if let Ok(reply) = &answer.body {
        if (200..300).contains(&status) && is_success(reply) {
            let message = match reply.detail() {
                "" => "sent".to_string(),
                text => cap(text),
            };
            return done(
                Action::Done(Outcome::Sent),
                Some(reply.code_for_record()),
                message,
            );
        }
    }
    let code = answer.body.as_ref().ok().map(Reply::code_for_record);
    let text = match &answer.body {
        Ok(reply) => reply.detail().to_string(),
        Err(unreadable) => unreadable.excerpt.clone(),
    };
    if let Some(action) = first_match(rules, &text, pauses) {
        let message = match &answer.body {
            Ok(_) => cap(&text),
            Err(u) => cap(&format!("HTTP {status}: {}: {text}", u.error)),
        };
        return done(action, code, message);
    }
    if status == 429 || status == 503 {
        let message = cap(&format!("HTTP {status}: platform busy: {text}"));
        let after = answer.retry_after;
        return done(Action::Retry { after }, code, message);
    }
    let reply = match &answer.body {
        Ok(reply) => reply,
        Err(u) => {
            let message = if status == 401 {
                format!("HTTP 401 again after renewing the access token: {text}")
            } else {
                format!("HTTP {status}: unreadable answer ({}): {text}", u.error)
            };
            return done(Action::Retry { after: None }, None, cap(&message));
        }
    };
    let (action, message) = judge(reply, status, is_retry);
    done(action, Some(reply.code_for_record()), cap(&message))
}

/// The built-in rules for a readable reply that is not a plain success.
fn judge(reply: &Reply, status: u16, is_retry: bool) -> (Action, String) {
    let detail = reply.detail();
    let code = reply.code_for_record();
    let retry = Action::Retry { after: None };
    if mentions_duplicate(detail) {
        if is_retry {
            (
                Action::Done(Outcome::Sent),
                format!(
                    "serial TTQQLSH already used: an earlier attempt of this row reached the platform (code {code}: {detail})"
                ),
            )
        } else {
            (
                Action::Fail,
                format!(
                    "serial TTQQLSH already used by another submission (code {code}: {detail})"
                ),
            )
        }
    } else if status == 401 || mentions_token(detail) {
        (
            retry,
            format!("token refused again after renewal (HTTP {status}, code {code}: {detail})"),
        )
    } else if mentions_field(detail) {
        (
            Action::Fail,
            format!("platform refused a field (code {code}): {detail}"),
        )
    } else if is_success(reply) {
        // A success body with a non-2xx status: do not trust it; the retry will tell.
        (
            retry,
            format!("HTTP {status} with a success reply (code {code}: {detail})"),
        )
    } else {
        (retry, format!("HTTP {status}, code {code}: {detail}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::http::TransportError;
    use crate::clients::title::Unreadable;
    use crate::clients::title_reply::ReplyError;
    use std::time::Duration;

    const PAUSES: PauseDefaults = PauseDefaults {
        seller: Duration::from_secs(1800),
        queue: Duration::from_secs(600),
    };

    const RETRY: Action = Action::Retry { after: None };

    fn reply(code: &str, message: &str) -> Reply {
        Reply {
            code: code.into(),
            message: message.into(),
            ttqqlsh: None,
            body_code: None,
            body_message: None,
        }
    }

    /// The platform answered `reply` with HTTP `status`.
    fn answer(status: u16, reply: Reply) -> TitleReply {
        TitleReply {
            status,
            retry_after: None,
            body: Ok(reply),
        }
    }

    /// The platform answered `body`, which is not a reply, with HTTP `status`.
    fn unreadable(status: u16, body: &str) -> TitleReply {
        let read = TitleReply::read(status, None, body.as_bytes());
        assert!(read.body.is_err(), "{body} reads as a reply");
        read
    }

    fn run(answer: TitleReply, is_retry: bool, rules: &[MessageRule]) -> Attempted {
        classify(Ok(answer), is_retry, rules, PAUSES)
    }

    fn action(answer: TitleReply, is_retry: bool) -> Action {
        run(answer, is_retry, &[]).action
    }

    fn rule(contains: &str, action: &str) -> MessageRule {
        MessageRule {
            contains: contains.into(),
            action: action.into(),
            after: None,
        }
    }

    #[test]
    fn success_codes() {
        let code_1000 = Reply {
            body_code: Some("0000".into()),
            ..reply("1000", "接口调用成功")
        };
        for r in [reply("0000", "success"), reply("0", "success"), code_1000] {
            let a = run(answer(200, r.clone()), false, &[]);
            assert_eq!(a.action, Action::Done(Outcome::Sent), "{r:?}");
            assert_eq!(a.http_status, Some(200));
            assert!(a.code.is_some());
        }
    }

    #[test]
    fn success_body_on_error_status_is_not_trusted() {
        assert_eq!(action(answer(500, reply("0000", "success")), false), RETRY);
    }

    #[test]
    fn duplicate_serial_depends_on_retry() {
        let dup = answer(200, reply("9001", "抬头请求流水号重复"));
        assert_eq!(action(dup.clone(), false), Action::Fail);
        let a = run(dup, true, &[]);
        assert_eq!(a.action, Action::Done(Outcome::Sent));
        assert!(a.message.contains("already used"), "{}", a.message);
        assert_eq!(a.code.as_deref(), Some("9001"));
        let exists = answer(200, reply("9002", "TTQQLSH已存在"));
        assert_eq!(action(exists.clone(), true), Action::Done(Outcome::Sent));
        assert_eq!(action(exists, false), Action::Fail);
    }

    #[test]
    fn operator_rules_come_first() {
        let dup = answer(200, reply("9001", "流水号重复"));
        assert_eq!(run(dup, false, &[rule("重复", "retry")]).action, RETRY);
        let rules = [rule("维护", "pause_queue")];
        let maint = answer(200, reply("9999", "系统维护中"));
        assert_eq!(
            run(maint, false, &rules).action,
            Action::PauseQueue(Duration::from_secs(600))
        );
        // Rules also see an excerpt of an unreadable body.
        let html = unreadable(502, "<html><body>系统维护中</body></html>");
        assert_eq!(
            run(html, false, &rules).action,
            Action::PauseQueue(Duration::from_secs(600))
        );
    }

    #[test]
    fn busy_honours_retry_after() {
        let mut r = unreadable(429, "too many");
        r.retry_after = Some(Duration::from_secs(7));
        assert_eq!(
            action(r, false),
            Action::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        let mut r = answer(503, reply("9999", "GMF_MC busy"));
        r.retry_after = Some(Duration::from_secs(3));
        assert_eq!(
            action(r, false),
            Action::Retry {
                after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(action(unreadable(503, ""), false), RETRY);
    }

    #[test]
    fn transient_faults_retry() {
        for (status, body) in [
            (500, "Internal Server Error"),
            (
                502,
                "<html><head><title>502</title></head><body>bad gateway<br></body></html>",
            ),
            (200, ""),
            (200, "{\"head\":5}"),
            (200, "[1,2]"),
            (200, "{\"head\":"),
            (404, "not found"),
            (401, ""),
        ] {
            let a = run(unreadable(status, body), false, &[]);
            assert_eq!(a.action, RETRY, "{status} {body}");
            assert_eq!(a.http_status, Some(status));
        }
    }

    #[test]
    fn unknown_codes_retry_and_token_trouble_retries() {
        for (code, message) in [
            ("9999", "系统错误"),
            ("8001", "access_token已过期"),
            ("8002", "令牌无效"),
            ("8003", "openID不能为空"),
        ] {
            assert_eq!(
                action(answer(200, reply(code, message)), false),
                RETRY,
                "{message}"
            );
        }
    }

    #[test]
    fn field_complaints_fail() {
        for msg in [
            "GMF_MC长度不能超过100",
            "购买方名称必填",
            "ATTACH不能为空",
            "gmf_nsrsbh format error",
        ] {
            let a = run(answer(200, reply("9100", msg)), false, &[]);
            assert_eq!(a.action, Action::Fail, "{msg}");
            assert!(a.message.contains(msg));
        }
    }

    #[test]
    fn long_messages_are_capped() {
        let long = "错".repeat(2000);
        let a = run(answer(200, reply("9999", &long)), false, &[]);
        assert!(a.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn refused_credentials_pause_the_queue() {
        let refused = TitleError::Refused {
            endpoint: "TokenAction",
            client_id: "client-1".into(),
            code: "1001".into(),
            message: "client_id或client_secret(***)错误".into(),
        };
        let a = classify(Err(refused), false, &[], PAUSES);
        assert_eq!(a.action, Action::PauseQueue(Duration::from_secs(600)));
        assert_eq!(a.code.as_deref(), Some("1001"));
        assert_eq!(a.http_status, None);
        assert!(
            a.message.contains("TokenAction refused client_id client-1"),
            "{}",
            a.message
        );
        assert!(a.message.contains("check client_id/client_secret"));
    }

    #[test]
    fn no_answer_retries_and_a_payload_fault_fails() {
        let down = TitleError::TokenService("TokenAction: HTTP 500: boom".into());
        let a = classify(Err(down), false, &[], PAUSES);
        assert_eq!(
            (a.action, a.http_status, a.message.as_str()),
            (RETRY, None, "TokenAction: HTTP 500: boom")
        );
        let timeout = TitleError::Transport(TransportError::Timeout("deadline".into()));
        let a = classify(Err(timeout), true, &[], PAUSES);
        assert_eq!((a.action, a.http_status), (RETRY, None));
        let payload = TitleError::Payload(crate::clients::title_payload::PayloadError::Xml(
            "writer".into(),
        ));
        assert_eq!(
            classify(Err(payload), false, &[], PAUSES).action,
            Action::Fail
        );
    }

    #[test]
    fn unreadable_bodies_name_the_parse_error() {
        let page = TitleReply {
            status: 400,
            retry_after: None,
            body: Err(Unreadable {
                error: ReplyError::NotStructured,
                excerpt: "<html>Bad data *** for ***</html>".into(),
            }),
        };
        let a = run(page, false, &[]);
        assert_eq!(a.action, RETRY);
        assert_eq!(
            a.message,
            "HTTP 400: unreadable answer (answer is neither JSON nor XML): <html>Bad data *** for ***</html>"
        );
    }
}
