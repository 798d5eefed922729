//! The FPTT1001 (发票抬头发送) client: sends one buyer title to 开票精灵 and turns the answer
//! into an [`Attempted`].
//!
//! Every parameter travels in the query string, as the platform's doc shows. The query is
//! built here, once, with Java `URLEncoder` encoding, so `data` (Base64 with `+`, `/`, `=`)
//! reaches the server exactly as the platform's Java decoder expects; nothing downstream
//! encodes it again.
//!
//! A refused token (HTTP 401, or a message about the token) is renewed once and the title
//! resent within the same attempt; credentials refused by TokenAction pause the queue.
//! Messages never carry the client secret, the token, the query string, or the buyer's
//! phone and bank account.

use std::time::Duration;

use base64::Engine as _;
use url::Url;

use crate::clients::http::{self, build_client, excerpt, HttpReply, TransportError};
use crate::clients::title_payload::{
    encode_data, mask_account, mask_phone, payload, url_encode, TitleFields,
};
use crate::clients::title_reply::{is_success, parse_reply, Reply};
use crate::clients::token::{
    endpoint, scrub, with_query, Credentials, TokenCache, TokenError, TokenSettings,
};
use crate::config::DataType;
use crate::queue::action::{Action, Attempted, Outcome};
use crate::queue::rules::{first_match, MessageRule, PauseDefaults};
use crate::secret::Secret;

/// Longest `last_message` this client produces; server messages beyond it are cut.
const MAX_MESSAGE_CHARS: usize = 500;

/// Everything the title client needs, resolved from `[title]`.
#[derive(Debug, Clone)]
pub struct TitleSettings {
    /// The platform's `https://IP:PORT/Entoauth` base URL.
    pub base_url: Url,
    /// OAuth client id (应用 ID).
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// A fixed openID; when set, OpenAction is never called.
    pub openid: Option<String>,
    /// The `busiType` parameter (`SQM_KPJL`).
    pub busi_type: String,
    /// How long a token and openID are used before renewing them.
    pub token_ttl: Duration,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Operator rules, checked before the built-in ones.
    pub rules: Vec<MessageRule>,
    /// Pause lengths for rules without `after` and for refused credentials.
    pub pauses: PauseDefaults,
}

/// One title to send.
#[derive(Debug, Clone, Copy)]
pub struct TitleRequest<'a> {
    /// The row's fields (validated beforehand).
    pub fields: &'a TitleFields,
    /// The 开票精灵 authorisation code: the row's, or the configured default.
    pub sqm: &'a str,
    /// Payload format.
    pub data_type: DataType,
    /// True when an earlier attempt of this row may have reached the platform, so a
    /// "serial already used" answer means that attempt succeeded.
    pub is_retry: bool,
}

/// The FPTT1001 client. Holds a connection pool and the token cache; share it behind an
/// `Arc` across jobs.
#[derive(Debug)]
pub struct TitleClient {
    http: reqwest::Client,
    api_url: Url,
    tokens: TokenCache,
    client_id: String,
    client_secret: Secret,
    busi_type: String,
    rules: Vec<MessageRule>,
    pauses: PauseDefaults,
}

/// True when a message is about the token or openID.
fn mentions_token(message: &str) -> bool {
    let lower = message.to_lowercase();
    lower.contains("token") || lower.contains("openid") || message.contains("令牌")
}

/// True when a message says the serial number (TTQQLSH) was used already.
fn mentions_duplicate(message: &str) -> bool {
    message.contains("重复") || message.contains("已存在")
}

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

fn attempted(action: Action, status: u16, code: Option<String>, message: String) -> Attempted {
    Attempted {
        action,
        http_status: Some(status),
        code,
        message,
        invoice_no: None,
        invoice_down_url: None,
    }
}

/// True when an answer says the token was refused, so renewing it may help: HTTP 401, or
/// a non-success reply about the token (and not about a duplicate serial).
fn token_refused(http: &HttpReply) -> bool {
    if http.status == 401 {
        return true;
    }
    match parse_reply(&http.body) {
        Ok(reply) => {
            !is_success(&reply)
                && mentions_token(reply.detail())
                && !mentions_duplicate(reply.detail())
        }
        Err(_) => false,
    }
}

/// Classifies one FPTT1001 answer (after any token renewal). Pure: no I/O, no scrubbing.
///
/// In order: a success reply on 2xx → `done(sent)`; operator rules on the message (or on
/// an excerpt of an unreadable body); 429/503 → retry after `Retry-After`; serial already
/// used → `done(sent)` on a retry, `fail` on a first attempt; token trouble → retry;
/// a complaint about a field → `fail`; anything else → retry with backoff.
pub fn classify(
    http: &HttpReply,
    is_retry: bool,
    rules: &[MessageRule],
    pauses: PauseDefaults,
) -> Attempted {
    let status = http.status;
    let parsed = parse_reply(&http.body);
    if let Ok(reply) = &parsed {
        if (200..300).contains(&status) && is_success(reply) {
            let message = match reply.detail() {
                "" => "sent".to_string(),
                text => cap(text),
            };
            return attempted(
                Action::Done(Outcome::Sent),
                status,
                Some(reply.code_for_record()),
                message,
            );
        }
    }
    let code = parsed.as_ref().ok().map(Reply::code_for_record);
    let text = match &parsed {
        Ok(reply) => reply.detail().to_string(),
        Err(_) => excerpt(&http.body),
    };
    if let Some(action) = first_match(rules, &text, pauses) {
        let message = match &parsed {
            Ok(_) => cap(&text),
            Err(e) => cap(&format!("HTTP {status}: {e}: {text}")),
        };
        return attempted(action, status, code, message);
    }
    if status == 429 || status == 503 {
        let message = cap(&format!("HTTP {status}: platform busy: {text}"));
        return attempted(
            Action::Retry {
                after: http.retry_after,
            },
            status,
            code,
            message,
        );
    }
    let reply = match parsed {
        Ok(reply) => reply,
        Err(e) => {
            let message = if status == 401 {
                format!("HTTP 401 again after renewing the access token: {text}")
            } else {
                format!("HTTP {status}: unreadable answer ({e}): {text}")
            };
            return attempted(Action::Retry { after: None }, status, None, cap(&message));
        }
    };
    let detail = reply.detail();
    let code_text = reply.code_for_record();
    let (action, message) = if mentions_duplicate(detail) {
        if is_retry {
            (
                Action::Done(Outcome::Sent),
                format!(
                    "serial TTQQLSH already used: an earlier attempt of this row reached the platform (code {code_text}: {detail})"
                ),
            )
        } else {
            (
                Action::Fail,
                format!("serial TTQQLSH already used by another submission (code {code_text}: {detail})"),
            )
        }
    } else if status == 401 || mentions_token(detail) {
        (
            Action::Retry { after: None },
            format!(
                "token refused again after renewal (HTTP {status}, code {code_text}: {detail})"
            ),
        )
    } else if mentions_field(detail) {
        (
            Action::Fail,
            format!("platform refused a field (code {code_text}): {detail}"),
        )
    } else if is_success(&reply) {
        // A success body with a non-2xx status: do not trust it; the retry will tell.
        (
            Action::Retry { after: None },
            format!("HTTP {status} with a success reply (code {code_text}: {detail})"),
        )
    } else {
        (
            Action::Retry { after: None },
            format!("HTTP {status}, code {code_text}: {detail}"),
        )
    };
    attempted(action, status, Some(code_text), cap(&message))
}

impl TitleClient {
    /// A client for `settings`; fails only if the TLS backend cannot be initialised.
    pub fn new(settings: TitleSettings) -> Result<Self, reqwest::Error> {
        let http = build_client(settings.timeout)?;
        let tokens = TokenCache::new(
            http.clone(),
            TokenSettings {
                base_url: settings.base_url.clone(),
                client_id: settings.client_id.clone(),
                client_secret: settings.client_secret.clone(),
                openid: settings.openid.clone(),
                token_ttl: settings.token_ttl,
            },
        );
        Ok(TitleClient {
            api_url: endpoint(&settings.base_url, "thirdApi"),
            http,
            tokens,
            client_id: settings.client_id,
            client_secret: settings.client_secret,
            busi_type: settings.busi_type,
            rules: settings.rules,
            pauses: settings.pauses,
        })
    }

    /// The token cache (for metrics and tests).
    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    /// The query string of one FPTT1001 call, every value encoded exactly once.
    fn query(&self, req: &TitleRequest<'_>, creds: &Credentials, data: &str) -> String {
        format!(
            "sign=FPTT1001&client_id={}&access_token={}&openID={}&sqm={}&busiType={}&data={}&dataType={}",
            url_encode(&self.client_id),
            url_encode(creds.access_token.expose()),
            url_encode(&creds.openid),
            url_encode(req.sqm),
            url_encode(&self.busi_type),
            data,
            req.data_type.code(),
        )
    }

    async fn post(
        &self,
        req: &TitleRequest<'_>,
        creds: &Credentials,
        data: &str,
    ) -> Result<HttpReply, TransportError> {
        let url = with_query(&self.api_url, &self.query(req, creds, data));
        // An explicit empty body gives `Content-Length: 0`, which Java containers expect
        // on a POST.
        http::send(self.http.post(url).body(Vec::<u8>::new())).await
    }

    /// Sends one title and classifies the result. Never fails: every problem becomes an
    /// [`Attempted`] (a refused token is renewed and the title resent once first).
    pub async fn send(&self, req: &TitleRequest<'_>) -> Attempted {
        let body = match payload(req.fields, req.data_type) {
            Ok(body) => body,
            Err(e) => {
                return Attempted {
                    action: Action::Fail,
                    http_status: None,
                    code: None,
                    message: e.to_string(),
                    invoice_no: None,
                    invoice_down_url: None,
                }
            }
        };
        let data = encode_data(&body);
        // Everything that must not reach the message even if a server echoes the request
        // back (error pages quoting the URL): `data` carries the buyer's phone and account.
        let mut hide = vec![
            self.client_secret.expose().to_string(),
            url_encode(self.client_secret.expose()),
            base64::engine::general_purpose::STANDARD.encode(body.as_bytes()),
            data.clone(),
        ];
        let attempt = self.send_inner(req, &data, &mut hide).await;
        Self::sanitize(attempt, req.fields, &hide)
    }

    async fn send_inner(
        &self,
        req: &TitleRequest<'_>,
        data: &str,
        hide: &mut Vec<String>,
    ) -> Attempted {
        let creds = match self.tokens.get().await {
            Ok(creds) => creds,
            Err(e) => return self.token_failure(e),
        };
        hide.push(creds.access_token.expose().to_string());
        hide.push(url_encode(creds.access_token.expose()));
        let first = match self.post(req, &creds, data).await {
            Ok(reply) => reply,
            Err(e) => return Attempted::transient(None, e.to_string()),
        };
        let answer = if token_refused(&first) {
            tracing::info!(
                http_status = first.status,
                "title: access token refused; renewing it and resending once"
            );
            self.tokens.invalidate(&creds.access_token);
            let renewed = match self.tokens.get().await {
                Ok(creds) => creds,
                Err(e) => return self.token_failure(e),
            };
            hide.push(renewed.access_token.expose().to_string());
            hide.push(url_encode(renewed.access_token.expose()));
            match self.post(req, &renewed, data).await {
                Ok(reply) => reply,
                Err(e) => return Attempted::transient(None, e.to_string()),
            }
        } else {
            first
        };
        let answer = Self::clean_body(answer, req.fields, hide);
        classify(&answer, req.is_retry, &self.rules, self.pauses)
    }

    /// A token that could not be had: refused credentials pause the queue, loudly; the
    /// rest is retried.
    fn token_failure(&self, error: TokenError) -> Attempted {
        match error {
            TokenError::Refused {
                endpoint,
                code,
                message,
            } => {
                let text = format!(
                    "{endpoint} refused client_id {}: code {code}: {message}: check client_id/client_secret in [title]",
                    self.client_id
                );
                tracing::error!(
                    queue = "title",
                    pause = ?self.pauses.queue,
                    "{text}; pausing the title queue"
                );
                Attempted {
                    action: Action::PauseQueue(self.pauses.queue),
                    http_status: None,
                    code: Some(code),
                    message: cap(&text),
                    invoice_no: None,
                    invoice_down_url: None,
                }
            }
            TokenError::Transient(text) => Attempted::transient(None, cap(&text)),
        }
    }

    /// `text` without the secret, tokens and `data`, and with the buyer's phone and bank
    /// account masked, whatever the server echoed back.
    fn clean_text(text: &str, fields: &TitleFields, hide: &[String]) -> String {
        let hide: Vec<&str> = hide.iter().map(String::as_str).collect();
        let mut text = scrub(text, &hide);
        // Very short values would mask unrelated text and reveal next to nothing.
        if let Some(phone) = fields.gmf_dh.as_deref().filter(|p| p.chars().count() >= 3) {
            text = text.replace(phone, &mask_phone(phone));
        }
        if let Some(account) = fields
            .gmf_yhzh
            .as_deref()
            .filter(|a| a.chars().count() >= 3)
        {
            text = text.replace(account, &mask_account(account));
        }
        text
    }

    /// Cleans the answer body before it is classified: an error page quoting the request
    /// must not leak through the excerpt, which could otherwise cut a value in half where
    /// [`scrub`] no longer recognises it.
    fn clean_body(mut reply: HttpReply, fields: &TitleFields, hide: &[String]) -> HttpReply {
        let text = String::from_utf8_lossy(&reply.body);
        let cleaned = Self::clean_text(&text, fields, hide);
        if cleaned != text {
            reply.body = bytes::Bytes::from(cleaned);
        }
        reply
    }

    /// The final message check, for texts that did not come from the body (transport and
    /// token errors).
    fn sanitize(attempt: Attempted, fields: &TitleFields, hide: &[String]) -> Attempted {
        Attempted {
            message: Self::clean_text(&attempt.message, fields, hide),
            ..attempt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const PAUSES: PauseDefaults = PauseDefaults {
        seller: Duration::from_secs(1800),
        queue: Duration::from_secs(600),
    };

    fn reply(status: u16, body: &str) -> HttpReply {
        HttpReply {
            status,
            body: Bytes::from(body.to_string()),
            retry_after: None,
        }
    }

    fn json(code: &str, msg: &str) -> String {
        serde_json::json!({"head":{"service":{"replyCode":code,"replyMsg":msg}},"body":{"TTQQLSH":"IW1"}})
            .to_string()
    }

    fn xml(code: &str, msg: &str) -> String {
        format!("<ROOT><HEAD><SERVICE><REPLYCODE>{code}</REPLYCODE><REPLYMSG>{msg}</REPLYMSG></SERVICE></HEAD><BODY></BODY></ROOT>")
    }

    fn rule(contains: &str, action: &str) -> MessageRule {
        MessageRule {
            contains: contains.into(),
            action: action.into(),
            after: None,
        }
    }

    fn action(http: &HttpReply, is_retry: bool) -> Action {
        classify(http, is_retry, &[], PAUSES).action
    }

    const RETRY: Action = Action::Retry { after: None };

    #[test]
    fn success_shapes() {
        for body in [
            json("0000", "success"),
            xml("0000", "success"),
            xml("0", "success"),
            r#"{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":1000,"REPLYMSG":"接口调用成功"}},"BODY":{"Code":"0000"}}}"#.to_string(),
        ] {
            let a = classify(&reply(200, &body), false, &[], PAUSES);
            assert_eq!(a.action, Action::Done(Outcome::Sent), "{body}");
            assert_eq!(a.http_status, Some(200));
            assert!(a.code.is_some());
        }
    }

    #[test]
    fn success_body_on_error_status_is_not_trusted() {
        assert_eq!(action(&reply(500, &json("0000", "success")), false), RETRY);
    }

    #[test]
    fn duplicate_serial_depends_on_retry() {
        let dup = reply(200, &json("9001", "抬头请求流水号重复"));
        assert_eq!(action(&dup, false), Action::Fail);
        let a = classify(&dup, true, &[], PAUSES);
        assert_eq!(a.action, Action::Done(Outcome::Sent));
        assert!(a.message.contains("already used"), "{}", a.message);
        assert_eq!(a.code.as_deref(), Some("9001"));
        let exists = reply(200, &xml("9002", "TTQQLSH已存在"));
        assert_eq!(action(&exists, true), Action::Done(Outcome::Sent));
        assert_eq!(action(&exists, false), Action::Fail);
    }

    #[test]
    fn operator_rules_come_first() {
        let dup = reply(200, &json("9001", "流水号重复"));
        let rules = [rule("重复", "retry")];
        assert_eq!(classify(&dup, false, &rules, PAUSES).action, RETRY);
        let maint = reply(200, &json("9999", "系统维护中"));
        let rules = [rule("维护", "pause_queue")];
        assert_eq!(
            classify(&maint, false, &rules, PAUSES).action,
            Action::PauseQueue(Duration::from_secs(600))
        );
        // Rules also see an excerpt of an unreadable body.
        let html = reply(502, "<html><body>系统维护中</body></html>");
        assert_eq!(
            classify(&html, false, &rules, PAUSES).action,
            Action::PauseQueue(Duration::from_secs(600))
        );
    }

    #[test]
    fn busy_honours_retry_after() {
        let mut r = reply(429, "too many");
        r.retry_after = Some(Duration::from_secs(7));
        assert_eq!(
            action(&r, false),
            Action::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        let mut r = reply(503, &json("9999", "GMF_MC busy"));
        r.retry_after = Some(Duration::from_secs(3));
        assert_eq!(
            action(&r, false),
            Action::Retry {
                after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(action(&reply(503, ""), false), RETRY);
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
            let a = classify(&reply(status, body), false, &[], PAUSES);
            assert_eq!(a.action, RETRY, "{status} {body}");
            assert_eq!(a.http_status, Some(status));
        }
    }

    #[test]
    fn unknown_codes_retry_and_token_trouble_retries() {
        assert_eq!(action(&reply(200, &json("9999", "系统错误")), false), RETRY);
        assert_eq!(
            action(&reply(200, &json("8001", "access_token已过期")), false),
            RETRY
        );
        assert_eq!(action(&reply(200, &xml("8002", "令牌无效")), false), RETRY);
        assert_eq!(
            action(&reply(200, &json("8003", "openID不能为空")), false),
            RETRY
        );
    }

    #[test]
    fn field_complaints_fail() {
        for msg in [
            "GMF_MC长度不能超过100",
            "购买方名称必填",
            "ATTACH不能为空",
            "gmf_nsrsbh format error",
        ] {
            let a = classify(&reply(200, &json("9100", msg)), false, &[], PAUSES);
            assert_eq!(a.action, Action::Fail, "{msg}");
            assert!(a.message.contains(msg));
        }
    }

    #[test]
    fn token_refusal_detection() {
        assert!(token_refused(&reply(401, "")));
        assert!(token_refused(&reply(
            200,
            &json("8001", "access_token无效")
        )));
        assert!(token_refused(&reply(200, &xml("8001", "openID错误"))));
        assert!(!token_refused(&reply(200, &json("0000", "token ok"))));
        assert!(!token_refused(&reply(200, &json("9001", "流水号重复"))));
        assert!(!token_refused(&reply(500, "token")));
    }

    #[test]
    fn long_messages_are_capped() {
        let long = "错".repeat(2000);
        let a = classify(&reply(200, &json("9999", &long)), false, &[], PAUSES);
        assert!(a.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    /// A loopback stand-in for the platform: TokenAction, OpenAction and thirdApi, with
    /// switches for the faults the tests need.
    mod stub {
        use std::collections::HashMap;
        use std::net::SocketAddr;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        use std::time::Duration;

        use axum::extract::{RawQuery, State};
        use axum::http::StatusCode;
        use axum::response::{IntoResponse, Response};
        use axum::routing::{get, post};
        use axum::Router;
        use base64::Engine as _;

        pub const CLIENT_ID: &str = "client-1";
        pub const SECRET: &str = "s3cr3t+/=";

        /// What thirdApi answers after accepting the token.
        #[derive(Clone, Debug)]
        pub enum Api {
            Ok,
            Reply(u16, String),
            Busy(u64),
            Slow(Duration),
            /// A 400 error page quoting the request line, as Tomcat does.
            EchoQuery,
        }

        pub struct Stub {
            pub token_calls: AtomicUsize,
            pub open_calls: AtomicUsize,
            pub api_calls: AtomicUsize,
            pub token_delay: Mutex<Duration>,
            /// Tokens numbered below this are refused with 401.
            pub revoked_below: AtomicUsize,
            /// Every thirdApi call answers 401.
            pub always_401: AtomicBool,
            /// TokenAction answers 500.
            pub token_500: AtomicBool,
            issued: AtomicUsize,
            pub api: Mutex<Api>,
            pub last_query: Mutex<Option<String>>,
            pub last_payload: Mutex<Option<String>>,
            pub last_params: Mutex<HashMap<String, String>>,
        }

        fn params(q: &Option<String>) -> HashMap<String, String> {
            // form_urlencoded decodes `+` as a space, exactly like Java's URLDecoder.
            url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
                .into_owned()
                .collect()
        }

        fn xml(code: &str, msg: &str, body: &str) -> String {
            format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><ROOT><HEAD><SERVICE><REPLYCODE>{code}</REPLYCODE><REPLYMSG>{msg}</REPLYMSG></SERVICE></HEAD><BODY>{body}</BODY></ROOT>")
        }

        fn token_number(token: &str) -> Option<usize> {
            token.strip_prefix("tok-")?.parse().ok()
        }

        async fn token(State(s): State<Arc<Stub>>, RawQuery(q): RawQuery) -> Response {
            s.token_calls.fetch_add(1, Ordering::SeqCst);
            let delay = *s.token_delay.lock().expect("lock");
            tokio::time::sleep(delay).await;
            if s.token_500.load(Ordering::SeqCst) {
                return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
            }
            let p = params(&q);
            if p.get("sign").map(String::as_str) != Some("token")
                || p.get("client_id").map(String::as_str) != Some(CLIENT_ID)
                || p.get("client_secret").map(String::as_str) != Some(SECRET)
            {
                // Echo the secret back, as a careless server might.
                let msg = format!(
                    "client_secret {} 错误",
                    p.get("client_secret").cloned().unwrap_or_default()
                );
                return xml("9001", &msg, "").into_response();
            }
            let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
            xml(
                "0",
                "success",
                &format!("<access_token>tok-{n}</access_token>"),
            )
            .into_response()
        }

        async fn open(State(s): State<Arc<Stub>>, RawQuery(q): RawQuery) -> Response {
            s.open_calls.fetch_add(1, Ordering::SeqCst);
            let p = params(&q);
            match p.get("access_token").and_then(|t| token_number(t)) {
                Some(n) => {
                    xml("0000", "success", &format!("<openID>oid-{n}</openID>")).into_response()
                }
                None => xml("8001", "access_token无效", "").into_response(),
            }
        }

        async fn api(State(s): State<Arc<Stub>>, RawQuery(q): RawQuery) -> Response {
            s.api_calls.fetch_add(1, Ordering::SeqCst);
            *s.last_query.lock().expect("lock") = q.clone();
            let p = params(&q);
            *s.last_params.lock().expect("lock") = p.clone();
            let n = p.get("access_token").and_then(|t| token_number(t));
            let valid = n.is_some_and(|n| n >= s.revoked_below.load(Ordering::SeqCst));
            let open_ok = match (n, p.get("openID")) {
                (Some(n), Some(o)) => *o == format!("oid-{n}") || o == "fixed-oid",
                _ => false,
            };
            if s.always_401.load(Ordering::SeqCst) || !valid {
                return (StatusCode::UNAUTHORIZED, "").into_response();
            }
            if !open_ok {
                return xml("8002", "openID错误", "").into_response();
            }
            let data = p.get("data").cloned().unwrap_or_default();
            let payload = match base64::engine::general_purpose::STANDARD.decode(data) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(_) => return xml("9000", "data解码失败", "").into_response(),
            };
            *s.last_payload.lock().expect("lock") = Some(payload);
            let mode = s.api.lock().expect("lock").clone();
            match mode {
                Api::Ok => {
                    let body = serde_json::json!({"head":{"service":{"replyCode":"0000","replyMsg":"success"}},"body":{"TTQQLSH":"x"}});
                    body.to_string().into_response()
                }
                Api::Reply(status, body) => {
                    (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response()
                }
                Api::Busy(secs) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", secs.to_string())],
                    "busy",
                )
                    .into_response(),
                Api::EchoQuery => (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "<html><body>Bad data {} for {}: [/Entoauth/thirdApi?{}]</body></html>",
                        p.get("data").cloned().unwrap_or_default(),
                        p.get("access_token").cloned().unwrap_or_default(),
                        q.unwrap_or_default(),
                    ),
                )
                    .into_response(),
                Api::Slow(d) => {
                    tokio::time::sleep(d).await;
                    xml("0000", "success", "").into_response()
                }
            }
        }

        pub async fn start() -> (Arc<Stub>, SocketAddr) {
            let stub = Arc::new(Stub {
                token_calls: AtomicUsize::new(0),
                open_calls: AtomicUsize::new(0),
                api_calls: AtomicUsize::new(0),
                token_delay: Mutex::new(Duration::from_millis(50)),
                revoked_below: AtomicUsize::new(0),
                always_401: AtomicBool::new(false),
                token_500: AtomicBool::new(false),
                issued: AtomicUsize::new(0),
                api: Mutex::new(Api::Ok),
                last_query: Mutex::new(None),
                last_payload: Mutex::new(None),
                last_params: Mutex::new(HashMap::new()),
            });
            let app = Router::new()
                .route("/Entoauth/TokenAction", get(token))
                .route("/Entoauth/OpenAction", get(open))
                .route("/Entoauth/thirdApi", post(api))
                .with_state(stub.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            (stub, addr)
        }
    }

    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use stub::{Api, CLIENT_ID, SECRET};

    fn settings(addr: std::net::SocketAddr, secret: &str, ttl: Duration) -> TitleSettings {
        TitleSettings {
            base_url: Url::parse(&format!("http://{addr}/Entoauth")).expect("url"),
            client_id: CLIENT_ID.into(),
            client_secret: Secret::new(secret),
            openid: None,
            busi_type: "SQM_KPJL".into(),
            token_ttl: ttl,
            timeout: Duration::from_secs(5),
            rules: Vec::new(),
            pauses: PAUSES,
        }
    }

    fn fields() -> TitleFields {
        TitleFields {
            order_no: "ORD-1 & x=1+2".into(),
            invoice_type: "1".into(),
            ttqqlsh: "IW0001".into(),
            attach: "661234567890".into(),
            gmf_mc: "A&B <公司> \"引号\"".into(),
            gmf_dh: Some("13800138000".into()),
            gmf_yhzh: Some("招商银行 66454545".into()),
            remark: Some("房间 1 ???>>>".into()),
            ..TitleFields::default()
        }
    }

    fn request(fields: &TitleFields, data_type: DataType) -> TitleRequest<'_> {
        TitleRequest {
            fields,
            sqm: "SQM/1+2",
            data_type,
            is_retry: false,
        }
    }

    /// A shareable client of the stub at `addr`.
    fn client(addr: std::net::SocketAddr, secret: &str, ttl: Duration) -> Arc<TitleClient> {
        Arc::new(TitleClient::new(settings(addr, secret, ttl)).expect("client"))
    }

    /// `n` sends of `f` as `data_type` started at once; their results.
    async fn send_concurrently(
        client: &Arc<TitleClient>,
        f: &Arc<TitleFields>,
        n: usize,
        data_type: DataType,
    ) -> Vec<Attempted> {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let client = client.clone();
                let f = f.clone();
                tokio::spawn(async move { client.send(&request(&f, data_type)).await })
            })
            .collect();
        let mut results = Vec::with_capacity(n);
        for h in handles {
            results.push(h.await.expect("join"));
        }
        results
    }

    /// A stub counter's value.
    fn calls(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    /// What the stub's thirdApi answers from now on.
    fn answer(stub: &stub::Stub, api: Api) {
        *stub.api.lock().expect("lock") = api;
    }

    fn assert_clean(a: &Attempted) {
        for bad in [
            SECRET,
            "tok-",
            "13800138000",
            "66454545",
            "data=",
            "client_secret=",
        ] {
            assert!(!a.message.contains(bad), "{bad:?} in {:?}", a.message);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wire_format_is_what_was_built() {
        let (stub, addr) = stub::start().await;
        let client = client(addr, SECRET, Duration::from_secs(60));
        let f = fields();
        for dt in [DataType::Json, DataType::Xml] {
            let a = client.send(&request(&f, dt)).await;
            assert_eq!(a.action, Action::Done(Outcome::Sent), "{a:?}");
            assert_clean(&a);
            let expected_payload = payload(&f, dt).expect("payload");
            assert_eq!(
                stub.last_payload.lock().expect("lock").as_deref(),
                Some(expected_payload.as_str())
            );
            let q = stub
                .last_query
                .lock()
                .expect("lock")
                .clone()
                .expect("query");
            let expected = format!(
                "sign=FPTT1001&client_id={CLIENT_ID}&access_token=tok-1&openID=oid-1&sqm=SQM%2F1%2B2&busiType=SQM_KPJL&data={}&dataType={}",
                encode_data(&expected_payload),
                dt.code()
            );
            assert_eq!(q, expected);
            // The sample's Base64 needs the Java-style escapes, so decoding them on the
            // stub side (where `+` reads as a space) really tested something.
            let data = encode_data(&expected_payload);
            assert!(data.contains("%2B") && data.contains("%2F"), "{data}");
            let p = stub.last_params.lock().expect("lock").clone();
            assert_eq!(p.get("sqm").map(String::as_str), Some("SQM/1+2"));
        }
        assert_eq!(calls(&stub.token_calls), 1);
        assert_eq!(calls(&stub.open_calls), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_share_one_renewal() {
        let (stub, addr) = stub::start().await;
        let client = client(addr, SECRET, Duration::from_secs(1));
        let f = Arc::new(fields());
        let burst = || async {
            for a in send_concurrently(&client, &f, 20, DataType::Json).await {
                assert_eq!(a.action, Action::Done(Outcome::Sent), "{a:?}");
            }
        };
        // Cold start: 20 jobs, one TokenAction call.
        burst().await;
        assert_eq!(calls(&stub.token_calls), 1);
        // After the TTL, again exactly one.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        burst().await;
        assert_eq!(calls(&stub.token_calls), 2);
        assert_eq!(calls(&stub.open_calls), 2);
        assert_eq!(client.tokens().fetch_count(), 2);
        assert_eq!(calls(&stub.api_calls), 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_401_renews_once_and_resends() {
        let (stub, addr) = stub::start().await;
        let client = client(addr, SECRET, Duration::from_secs(3600));
        let f = Arc::new(fields());
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, Action::Done(Outcome::Sent));
        // The platform drops tok-1 long before our TTL; ten jobs meet the 401 at once.
        stub.revoked_below.store(2, Ordering::SeqCst);
        for a in send_concurrently(&client, &f, 10, DataType::Xml).await {
            assert_eq!(a.action, Action::Done(Outcome::Sent), "{a:?}");
            assert_clean(&a);
        }
        assert_eq!(calls(&stub.token_calls), 2);
        // Each job sent once or, if it met the 401, twice; a job that started after the
        // renewal needed no resend, so the exact count depends on scheduling.
        let api_calls = calls(&stub.api_calls);
        assert!(
            (1 + 10 + 1..=1 + 10 + 10).contains(&api_calls),
            "{api_calls} thirdApi calls"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_message_renews_and_a_persistent_401_retries() {
        let (stub, addr) = stub::start().await;
        let client = client(addr, SECRET, Duration::from_secs(3600));
        let f = fields();
        assert_eq!(
            client.send(&request(&f, DataType::Json)).await.action,
            Action::Done(Outcome::Sent)
        );
        answer(&stub, Api::Reply(200, xml("8001", "access_token已失效")));
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, RETRY, "{a:?}");
        assert_eq!(calls(&stub.token_calls), 2);
        assert_eq!(calls(&stub.api_calls), 3);
        assert_clean(&a);

        answer(&stub, Api::Ok);
        stub.always_401.store(true, Ordering::SeqCst);
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, RETRY, "{a:?}");
        assert_eq!(a.http_status, Some(401));
        // One renewal and one resend, no more.
        assert_eq!(calls(&stub.token_calls), 3);
        assert_eq!(calls(&stub.api_calls), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_credentials_pause_the_queue() {
        let (stub, addr) = stub::start().await;
        let client = client(addr, "wrong-secret", Duration::from_secs(3600));
        let f = Arc::new(fields());
        for a in send_concurrently(&client, &f, 8, DataType::Json).await {
            assert_eq!(
                a.action,
                Action::PauseQueue(Duration::from_secs(600)),
                "{a:?}"
            );
            assert!(
                a.message.contains("TokenAction refused client_id client-1"),
                "{}",
                a.message
            );
            assert!(a.message.contains("check client_id/client_secret"));
            assert!(!a.message.contains("wrong-secret"), "{}", a.message);
            assert_eq!(a.code.as_deref(), Some("9001"));
        }
        assert_eq!(calls(&stub.api_calls), 0);
        // Jobs that waited for the refused fetch share its answer.
        assert_eq!(calls(&stub.token_calls), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_service_failure_retries_with_one_call() {
        let (stub, addr) = stub::start().await;
        stub.token_500.store(true, Ordering::SeqCst);
        *stub.token_delay.lock().expect("lock") = Duration::from_millis(100);
        let client = client(addr, SECRET, Duration::from_secs(3600));
        let f = Arc::new(fields());
        for a in send_concurrently(&client, &f, 20, DataType::Json).await {
            assert_eq!(a.action, RETRY, "{a:?}");
            assert!(a.message.contains("TokenAction"), "{}", a.message);
        }
        assert_eq!(calls(&stub.token_calls), 1);
        // An attempt after the short hold tries again.
        stub.token_500.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, Action::Done(Outcome::Sent));
        assert_eq!(calls(&stub.token_calls), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fixed_openid_skips_open_action() {
        let (stub, addr) = stub::start().await;
        let mut s = settings(addr, SECRET, Duration::from_secs(3600));
        s.openid = Some("fixed-oid".into());
        let client = TitleClient::new(s).expect("client");
        let a = client.send(&request(&fields(), DataType::Json)).await;
        assert_eq!(a.action, Action::Done(Outcome::Sent), "{a:?}");
        assert_eq!(calls(&stub.open_calls), 0);
        let p = stub.last_params.lock().expect("lock").clone();
        assert_eq!(p.get("openID").map(String::as_str), Some("fixed-oid"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_answers_are_classified_and_scrubbed() {
        let (stub, addr) = stub::start().await;
        let mut s = settings(addr, SECRET, Duration::from_secs(3600));
        s.timeout = Duration::from_millis(500);
        let client = TitleClient::new(s).expect("client");
        let f = fields();

        answer(&stub, Api::Busy(9));
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(
            a.action,
            Action::Retry {
                after: Some(Duration::from_secs(9))
            }
        );

        // A server echoing the buyer's phone and account: masked in the message.
        answer(
            &stub,
            Api::Reply(
                200,
                xml(
                    "9100",
                    "GMF_DH 13800138000 与 GMF_YHZH 招商银行 66454545 格式错误",
                ),
            ),
        );
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, Action::Fail, "{a:?}");
        assert_clean(&a);
        assert!(a.message.contains("****8000"), "{}", a.message);

        answer(&stub, Api::Reply(200, json("9001", "流水号重复")));
        let mut retry = request(&f, DataType::Json);
        retry.is_retry = true;
        assert_eq!(
            client.send(&retry).await.action,
            Action::Done(Outcome::Sent)
        );
        assert_eq!(
            client.send(&request(&f, DataType::Json)).await.action,
            Action::Fail
        );

        answer(&stub, Api::EchoQuery);
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, RETRY, "{a:?}");
        assert_eq!(a.http_status, Some(400));
        assert!(a.message.contains("Bad data *** for ***"), "{}", a.message);
        assert_clean(&a);

        answer(&stub, Api::Slow(Duration::from_secs(2)));
        let a = client.send(&request(&f, DataType::Json)).await;
        assert_eq!(a.action, RETRY, "{a:?}");
        assert_eq!(a.http_status, None);
        assert_clean(&a);
    }
}
