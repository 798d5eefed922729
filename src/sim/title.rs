//! The simulated 开票精灵 platform: `GET /Entoauth/TokenAction`, `GET /Entoauth/OpenAction`
//! and `POST /Entoauth/thirdApi` (FPTT1001, invoice title sending).
//!
//! `thirdApi` reads every parameter from the raw query string with servlet form decoding
//! (so an unencoded `+` in `data` turns into a space), decodes `data` as strict padded
//! standard Base64, parses the JSON (`dataType=0`) or XML (`dataType=1`) payload, checks the
//! credentials and the FPTT1001 field rules with its own code, refuses a serial it already
//! accepted, and only then applies the order's scripted behaviour. Answers come in the
//! request's format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use quick_xml::escape::escape;
use quick_xml::events::Event;
use serde_json::{json, Value};

use super::rebill::{busy_reply, final_status, reset_body, typed_reply as typed};
use super::{form, lock, FlightGuard, Shared, TitleBehavior, TitleRecord, TokenBehavior};

const JSON_CT: &str = "application/json;charset=UTF-8";
const XML_CT: &str = "application/xml;charset=UTF-8";

/// The reply code of a serial that was already used, and its message.
const DUP_CODE: &str = "9001";
const DUP_MSG: &str = "抬头请求流水号重复";

/// The payload fields FPTT1001 knows, with their maximum length in characters
/// (`None`: no limit).
const KNOWN_FIELDS: [(&str, Option<usize>); 13] = [
    ("ORDER_NO", None),
    ("INVOICETYPE", None),
    ("TTQQLSH", Some(20)),
    ("ATTACH", Some(20)),
    ("GMF_MC", Some(100)),
    ("GMF_NSRSBH", Some(20)),
    ("GMF_DZ", Some(100)),
    ("GMF_DH", Some(100)),
    ("GMF_YHZH", Some(100)),
    ("GMF_YHMC", Some(100)),
    ("REMARK", Some(200)),
    ("BY1", Some(200)),
    ("BY2", Some(200)),
];

const REQUIRED: [&str; 5] = ["ORDER_NO", "INVOICETYPE", "TTQQLSH", "ATTACH", "GMF_MC"];

fn known(name: &str) -> Option<&'static str> {
    KNOWN_FIELDS
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(k, _)| *k)
}

/// The format of a request's payload, and so of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fmt {
    Json,
    Xml,
}

/// `<?xml …?><ROOT><HEAD><SERVICE>…</SERVICE></HEAD><BODY>{body}</BODY></ROOT>`;
/// `body` must already be escaped.
fn xml_doc(code: &str, msg: &str, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><ROOT><HEAD><SERVICE><REPLYCODE>{}</REPLYCODE>\
         <REPLYMSG>{}</REPLYMSG></SERVICE></HEAD><BODY>{}</BODY></ROOT>",
        escape(code),
        escape(msg),
        body
    )
}

/// A thirdApi answer in the documented shape of `fmt`.
fn reply(fmt: Fmt, status: StatusCode, code: &str, msg: &str, ttqqlsh: Option<&str>) -> Response {
    match fmt {
        Fmt::Json => {
            let body = match ttqqlsh {
                Some(t) => json!({ "TTQQLSH": t }),
                None => json!({}),
            };
            let doc = json!({
                "head": {"service": {"replyCode": code, "replyMsg": msg}},
                "body": body,
            });
            typed(status, JSON_CT, doc.to_string())
        }
        Fmt::Xml => {
            let body = ttqqlsh
                .map(|t| format!("<TTQQLSH>{}</TTQQLSH>", escape(t)))
                .unwrap_or_default();
            typed(status, XML_CT, xml_doc(code, msg, &body))
        }
    }
}

fn xml_reply(status: StatusCode, code: &str, msg: &str, body: &str) -> Response {
    typed(status, XML_CT, xml_doc(code, msg, body))
}

/// The answer to an invalid access token, per [`super::SimOptions::token_reply_401`].
fn token_invalid(shared: &Shared, fmt: Fmt, rec: Option<&mut TitleRecord>) -> Response {
    const MSG: &str = "access_token无效";
    let status = if shared.opts.token_reply_401 {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    if let Some(rec) = rec {
        rec.reply_code = if shared.opts.token_reply_401 {
            "HTTP 401".to_owned()
        } else {
            "1002".to_owned()
        };
    }
    reply(fmt, status, "1002", MSG, None)
}

fn query_params(uri: &Uri) -> Result<Vec<(String, String)>, form::FormError> {
    form::parse(uri.query().unwrap_or("").as_bytes())
}

/// Counts a TokenAction/OpenAction call in `calls` and decodes its query string.
fn action_params(calls: &AtomicUsize, uri: &Uri) -> Result<Vec<(String, String)>, form::FormError> {
    calls.fetch_add(1, Ordering::Relaxed);
    query_params(uri)
}

/// The XML refusal (code 1005) of a TokenAction/OpenAction query that does not decode.
fn undecodable(e: form::FormError) -> Response {
    xml_reply(
        StatusCode::OK,
        "1005",
        &format!("请求参数解码失败({e})"),
        "",
    )
}

/// `GET /Entoauth/TokenAction?sign=token&client_id=…&client_secret=…`.
pub(super) async fn token_action(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let params = match action_params(&shared.token_calls, &uri) {
        Ok(p) => p,
        Err(e) => return undecodable(e),
    };
    let behavior = shared.next_token();
    if !shared.opts.token_latency.is_zero() {
        tokio::time::sleep(shared.opts.token_latency).await;
    }
    if let TokenBehavior::Status(code) = behavior {
        let status = final_status(code);
        let text = format!("simulated HTTP {}", status.as_u16());
        return typed(status, "text/plain;charset=UTF-8", text);
    }
    let get = |n: &str| form::first(&params, n).unwrap_or("");
    if get("sign") != "token" {
        return xml_reply(StatusCode::OK, "1004", "sign参数错误(应为token)", "");
    }
    if get("client_id") != shared.opts.title_client_id
        || get("client_secret") != shared.opts.title_client_secret
    {
        let msg = match behavior {
            TokenBehavior::EchoSecret => {
                format!("client_id或client_secret({})错误", get("client_secret"))
            }
            _ => "client_id或client_secret错误".to_owned(),
        };
        return xml_reply(StatusCode::OK, "1001", &msg, "");
    }
    let token = hex::encode(rand::random::<[u8; 16]>());
    lock(&shared.tokens).insert(token.clone());
    let body = format!(
        "<access_token>{}</access_token><expires_in>7200</expires_in>",
        escape(&token)
    );
    xml_reply(StatusCode::OK, "0000", "success", &body)
}

/// `GET /Entoauth/OpenAction?sign=open&client_id=…&access_token=…`.
pub(super) async fn open_action(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let params = match action_params(&shared.open_calls, &uri) {
        Ok(p) => p,
        Err(e) => return undecodable(e),
    };
    let get = |n: &str| form::first(&params, n).unwrap_or("");
    if get("sign") != "open" {
        return xml_reply(StatusCode::OK, "1004", "sign参数错误(应为open)", "");
    }
    if get("client_id") != shared.opts.title_client_id {
        return xml_reply(StatusCode::OK, "1001", "client_id错误", "");
    }
    if !shared.token_valid(get("access_token")) {
        return token_invalid(&shared, Fmt::Xml, None);
    }
    let body = format!("<openID>{}</openID>", escape(&shared.open_id));
    xml_reply(StatusCode::OK, "0000", "success", &body)
}

/// `POST /Entoauth/thirdApi?sign=FPTT1001&…` (all parameters in the query string).
pub(super) async fn third_api(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let mut rec = TitleRecord {
        order_no: String::new(),
        ttqqlsh: String::new(),
        data_type: String::new(),
        gmf_mc: String::new(),
        sqm: String::new(),
        query: uri.query().unwrap_or("").to_owned(),
        payload: String::new(),
        payload_ok: false,
        reply_code: String::new(),
        answered: "Rejected",
        received_at: Instant::now(),
    };
    let (response, extra, guard) = process(&shared, &uri, &mut rec);
    if rec.answered == "Rejected" {
        tracing::debug!(code = %rec.reply_code, "sim thirdApi: refused");
    }
    lock(&shared.title_log).push(rec);
    let wait = shared.opts.latency.saturating_add(extra);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    drop(guard);
    response
}

/// A refusal: sets the record's reply code and builds the answer.
fn refuse(rec: &mut TitleRecord, fmt: Fmt, code: &str, msg: &str) -> Response {
    rec.reply_code = code.to_owned();
    reply(fmt, StatusCode::OK, code, msg, None)
}

fn process(
    shared: &Arc<Shared>,
    uri: &Uri,
    rec: &mut TitleRecord,
) -> (Response, Duration, Option<FlightGuard>) {
    let params = match query_params(uri) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("请求参数解码失败({e})");
            return (refuse(rec, Fmt::Json, "2000", &msg), Duration::ZERO, None);
        }
    };
    let get = |n: &str| form::first(&params, n);
    rec.data_type = get("dataType").unwrap_or("").to_owned();
    rec.sqm = get("sqm").unwrap_or("").to_owned();
    let fmt = if rec.data_type == "1" {
        Fmt::Xml
    } else {
        Fmt::Json
    };

    // Decode the payload up front so even refused requests are recorded with it.
    let payload = decode_payload(get("data"), &rec.data_type);
    if let Ok((text, fields)) = &payload {
        rec.payload = text.clone();
        let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
        rec.order_no = field("ORDER_NO");
        rec.ttqqlsh = field("TTQQLSH");
        rec.gmf_mc = field("GMF_MC");
    }

    let done = |r: Response| (r, Duration::ZERO, None);
    if get("sign") != Some("FPTT1001") {
        return done(refuse(rec, fmt, "1004", "sign参数错误(应为FPTT1001)"));
    }
    if get("client_id") != Some(shared.opts.title_client_id.as_str()) {
        return done(refuse(rec, fmt, "1001", "client_id错误"));
    }
    if !shared.token_valid(get("access_token").unwrap_or("")) {
        return done(token_invalid(shared, fmt, Some(rec)));
    }
    if get("openID") != Some(shared.open_id.as_str()) {
        return done(refuse(rec, fmt, "1003", "openID无效"));
    }
    if get("sqm").unwrap_or("").trim().is_empty() {
        return done(refuse(rec, fmt, "2001", "sqm(开票精灵授权码)不能为空"));
    }
    if get("busiType") != Some("SQM_KPJL") {
        return done(refuse(rec, fmt, "2002", "busiType错误(应为SQM_KPJL)"));
    }
    if rec.data_type != "0" && rec.data_type != "1" {
        return done(refuse(
            rec,
            fmt,
            "2003",
            "dataType错误(只能为0:json或1:xml)",
        ));
    }
    let fields = match payload {
        Ok((_, f)) => f,
        Err(e) => return done(refuse(rec, fmt, e.code, &e.message)),
    };
    if let Err(msg) = check_fields(&fields) {
        return done(refuse(rec, fmt, "2006", &msg));
    }
    rec.payload_ok = true;

    let guard = shared.enter(format!("{}\u{0}{}", rec.order_no, rec.ttqqlsh));
    let behavior = shared.next_title(&rec.order_no);
    if behavior == TitleBehavior::TokenExpired {
        rec.answered = behavior.name();
        return (
            token_invalid(shared, fmt, Some(rec)),
            Duration::ZERO,
            Some(guard),
        );
    }
    if shared.serial_accepted(&rec.ttqqlsh) {
        rec.answered = "DuplicateSerial";
        rec.reply_code = DUP_CODE.to_owned();
        let r = reply(fmt, StatusCode::OK, DUP_CODE, DUP_MSG, None);
        return (r, Duration::ZERO, Some(guard));
    }
    rec.answered = behavior.name();
    let serial = rec.ttqqlsh.clone();
    let mut wait = Duration::ZERO;
    let response = match &behavior {
        TitleBehavior::Ok | TitleBehavior::Late(_) => {
            shared.accept_serial(&serial);
            if let TitleBehavior::Late(d) = behavior {
                wait = d;
            }
            rec.reply_code = "0000".to_owned();
            reply(fmt, StatusCode::OK, "0000", "success", Some(&serial))
        }
        TitleBehavior::Duplicate => {
            shared.accept_serial(&serial);
            rec.reply_code = DUP_CODE.to_owned();
            reply(fmt, StatusCode::OK, DUP_CODE, DUP_MSG, None)
        }
        TitleBehavior::Fail { code, message } => {
            rec.reply_code = code.clone();
            reply(fmt, StatusCode::OK, code, message, None)
        }
        TitleBehavior::Status(code) => {
            let status = final_status(*code);
            rec.reply_code = format!("HTTP {}", status.as_u16());
            typed(
                status,
                "text/plain;charset=UTF-8",
                format!("simulated HTTP {}", status.as_u16()),
            )
        }
        TitleBehavior::Busy { retry_after_secs } => {
            rec.reply_code = "HTTP 503".to_owned();
            busy_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                *retry_after_secs,
                "Service Unavailable",
            )
        }
        TitleBehavior::EchoQuery => {
            rec.reply_code = "HTTP 400".to_owned();
            let page = format!(
                "<html><body><h1>HTTP Status 400 – Bad Request</h1><p>Bad data {} for {}: \
                 [/Entoauth/thirdApi?{}]</p></body></html>",
                get("data").unwrap_or(""),
                get("access_token").unwrap_or(""),
                rec.query,
            );
            typed(StatusCode::BAD_REQUEST, "text/html;charset=UTF-8", page)
        }
        TitleBehavior::TokenExpired => token_invalid(shared, fmt, Some(rec)),
        TitleBehavior::AltShape => {
            shared.accept_serial(&serial);
            rec.reply_code = "0".to_owned();
            let doc = json!({"ROOT": {
                "HEAD": {"SERVICE": {"REPLYCODE": "0", "REPLYMSG": "success"}},
                "BODY": {},
            }});
            typed(StatusCode::OK, JSON_CT, doc.to_string())
        }
        TitleBehavior::Code1000 => {
            shared.accept_serial(&serial);
            rec.reply_code = "1000".to_owned();
            match fmt {
                Fmt::Json => {
                    let doc = json!({"ROOT": {
                        "HEAD": {"SERVICE": {"REPLYCODE": "1000", "REPLYMSG": "接口调用成功"}},
                        "BODY": {"Code": "0000", "Message": "success", "TTQQLSH": serial},
                    }});
                    typed(StatusCode::OK, JSON_CT, doc.to_string())
                }
                Fmt::Xml => {
                    let body = format!(
                        "<Code>0000</Code><Message>success</Message><TTQQLSH>{}</TTQQLSH>",
                        escape(&serial)
                    );
                    xml_reply(StatusCode::OK, "1000", "接口调用成功", &body)
                }
            }
        }
        TitleBehavior::Garbage => {
            rec.reply_code = "garbage".to_owned();
            typed(
                StatusCode::OK,
                "text/plain;charset=UTF-8",
                "\u{1}garbage ]]> not a reply {",
            )
        }
        TitleBehavior::Reset => {
            rec.reply_code = "reset".to_owned();
            let head: &'static [u8] = match fmt {
                Fmt::Json => br#"{"head":{"service":{"replyCo"#,
                Fmt::Xml => b"<?xml version=\"1.0\" encoding=\"utf-8\"?><ROOT><HEAD>",
            };
            let ct = if fmt == Fmt::Json { JSON_CT } else { XML_CT };
            typed(StatusCode::OK, ct, reset_body(head))
        }
    };
    (response, wait, Some(guard))
}

/// Why `data` could not be turned into fields.
struct PayloadError {
    code: &'static str,
    message: String,
}

fn payload_err(code: &'static str, message: impl Into<String>) -> PayloadError {
    PayloadError {
        code,
        message: message.into(),
    }
}

/// The decoded payload text and the known BODY fields read from it.
type Decoded = (String, HashMap<&'static str, String>);

/// `data` → strict Base64 → UTF-8 → JSON or XML → the known BODY fields.
fn decode_payload(data: Option<&str>, data_type: &str) -> Result<Decoded, PayloadError> {
    let data = match data {
        Some(d) if !d.is_empty() => d,
        _ => return Err(payload_err("2004", "data不能为空")),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.as_bytes())
        .map_err(|e| payload_err("2004", format!("data不是有效的Base64编码({e})")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| payload_err("2005", "data报文解析失败: 不是UTF-8文本"))?;
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let fields = match data_type {
        "1" => parse_xml(body),
        _ => parse_json(body),
    }
    .map_err(|why| payload_err("2005", format!("data报文解析失败: {why}")))?;
    Ok((text, fields))
}

fn parse_json(text: &str) -> Result<HashMap<&'static str, String>, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| format!("JSON格式错误({e})"))?;
    let body = root
        .get("REQUEST")
        .ok_or("缺少REQUEST节点")?
        .get("BODY")
        .ok_or("缺少REQUEST/BODY节点")?
        .as_object()
        .ok_or("REQUEST/BODY必须为JSON对象")?;
    let mut fields = HashMap::new();
    for (name, value) in body {
        let Some(name) = known(name) else { continue };
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Null => continue,
            _ => return Err(format!("{name}的类型错误(应为字符串)")),
        };
        fields.insert(name, value);
    }
    Ok(fields)
}

fn parse_xml(text: &str) -> Result<HashMap<&'static str, String>, String> {
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<String> = Vec::new();
    let mut saw_root = false;
    let mut saw_body = false;
    let mut current: Option<String> = None;
    let mut fields: HashMap<&'static str, String> = HashMap::new();
    let in_head = |stack: &[String]| stack.len() >= 2 && stack[1] == "HEAD";
    let in_field =
        |stack: &[String]| stack.len() == 3 && stack[0] == "REQUEST" && stack[1] == "BODY";
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("XML格式错误({e})"))?;
        match event {
            Event::Start(_) | Event::Empty(_) if stack.is_empty() && saw_root => {
                return Err("XML只能有一个根节点".to_owned());
            }
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if stack.is_empty() {
                    if name != "REQUEST" {
                        return Err(format!("根节点必须为REQUEST(实际为{name})"));
                    }
                    saw_root = true;
                }
                if in_field(&stack) {
                    return Err(format!("字段{}中不能包含子节点", stack[2]));
                }
                stack.push(name);
                if stack.len() == 2 && stack[1] == "BODY" {
                    saw_body = true;
                }
                if in_field(&stack) {
                    current = Some(String::new());
                }
            }
            Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if stack.is_empty() {
                    if name != "REQUEST" {
                        return Err(format!("根节点必须为REQUEST(实际为{name})"));
                    }
                    saw_root = true;
                    continue;
                }
                if in_field(&stack) {
                    return Err(format!("字段{}中不能包含子节点", stack[2]));
                }
                if stack.len() == 1 && name == "BODY" {
                    saw_body = true;
                }
                if stack.len() == 2 && stack[1] == "BODY" {
                    if let Some(k) = known(&name) {
                        if fields.insert(k, String::new()).is_some() {
                            return Err(format!("字段{k}重复"));
                        }
                    }
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|e| format!("XML实体无效({e})"))?;
                if let Some(cur) = current.as_mut() {
                    cur.push_str(&s);
                } else if in_head(&stack) || s.trim().is_empty() {
                    // Whitespace between elements, or anything inside HEAD: ignored.
                } else {
                    return Err("XML中存在位置错误的文本".to_owned());
                }
            }
            Event::CData(c) => {
                let s = c.decode().map_err(|e| format!("XML编码错误({e})"))?;
                if let Some(cur) = current.as_mut() {
                    cur.push_str(&s);
                } else if !in_head(&stack) {
                    return Err("XML中存在位置错误的CDATA".to_owned());
                }
            }
            Event::End(_) => {
                if in_field(&stack) {
                    let value = current.take().unwrap_or_default();
                    if let Some(k) = known(&stack[2]) {
                        if fields.insert(k, value).is_some() {
                            return Err(format!("字段{k}重复"));
                        }
                    }
                }
                stack.pop();
            }
            Event::DocType(_) => return Err("不支持DOCTYPE".to_owned()),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !saw_root {
        return Err("缺少REQUEST根节点".to_owned());
    }
    if !stack.is_empty() {
        return Err("XML未闭合".to_owned());
    }
    if !saw_body {
        return Err("缺少REQUEST/BODY节点".to_owned());
    }
    Ok(fields)
}

/// The FPTT1001 field rules (lengths in characters).
fn check_fields(fields: &HashMap<&'static str, String>) -> Result<(), String> {
    let value = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
    for name in REQUIRED {
        if value(name).trim().is_empty() {
            return Err(format!("{name}为必填字段,不能为空"));
        }
    }
    let invoice_type = value("INVOICETYPE");
    if invoice_type != "1" && invoice_type != "2" {
        return Err(format!(
            "INVOICETYPE取值错误({invoice_type}),只能为1(普票)或2(专票)"
        ));
    }
    for (name, max) in KNOWN_FIELDS {
        let Some(max) = max else { continue };
        let len = value(name).chars().count();
        if len > max {
            return Err(format!("{name}长度超过{max}个字符(实际{len}个)"));
        }
    }
    if invoice_type == "2" && value("GMF_NSRSBH").trim().is_empty() {
        return Err("INVOICETYPE为2(专票)时GMF_NSRSBH(购买方纳税人识别号)必填".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn xml_payload_unescapes_entities_and_cdata() {
        let xml = "<?xml version=\"1.0\" encoding=\"utf-8\"?><REQUEST><HEAD/><BODY>\
                   <ORDER_NO>o&amp;1</ORDER_NO><GMF_MC>A &lt;B&gt; &quot;C&quot; &#x4E2D;<![CDATA[&x]]></GMF_MC>\
                   <REMARK/><UNKNOWN>zz</UNKNOWN></BODY></REQUEST>";
        let f = parse_xml(xml).expect("parses");
        assert_eq!(f.get("ORDER_NO").map(String::as_str), Some("o&1"));
        assert_eq!(
            f.get("GMF_MC").map(String::as_str),
            Some("A <B> \"C\" 中&x")
        );
        assert_eq!(f.get("REMARK").map(String::as_str), Some(""));
        assert!(!f.contains_key("UNKNOWN"));
    }

    #[test]
    fn bad_xml_is_refused() {
        for bad in [
            "",
            "<ROOT/>",
            "<REQUEST><BODY><GMF_MC>a</BODY></REQUEST>",
            "<REQUEST><BODY><GMF_MC><b/></GMF_MC></BODY></REQUEST>",
            "<REQUEST><HEAD/></REQUEST>",
            "<REQUEST><BODY><GMF_MC>&bogus;</GMF_MC></BODY></REQUEST>",
            "<REQUEST><BODY></BODY></REQUEST><REQUEST/>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><REQUEST><BODY/></REQUEST>",
            "<REQUEST><BODY><ORDER_NO>1</ORDER_NO><ORDER_NO>2</ORDER_NO></BODY></REQUEST>",
            "<REQUEST><BODY>",
        ] {
            assert!(parse_xml(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn json_payload_rules() {
        let f = parse_json(
            r#"{"REQUEST":{"HEAD":"","BODY":{"ORDER_NO":"1","INVOICETYPE":2,"GMF_DZ":null}}}"#,
        )
        .expect("parses");
        assert_eq!(f.get("INVOICETYPE").map(String::as_str), Some("2"));
        assert!(!f.contains_key("GMF_DZ"));
        assert!(parse_json(r#"{"REQUEST":{"BODY":{"GMF_MC":{"x":1}}}}"#).is_err());
        assert!(parse_json(r#"{"REQUEST":{"BODY":[]}}"#).is_err());
        assert!(parse_json(r#"{"BODY":{}}"#).is_err());
        assert!(parse_json("not json").is_err());
    }

    fn valid() -> HashMap<&'static str, String> {
        [
            ("ORDER_NO", "o1"),
            ("INVOICETYPE", "1"),
            ("TTQQLSH", "ABC123"),
            ("ATTACH", "661234567890"),
            ("GMF_MC", "某某公司"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect()
    }

    #[test]
    fn field_rules_name_the_field() {
        assert!(check_fields(&valid()).is_ok());
        let cases: Vec<(&'static str, String, &str)> = vec![
            ("ORDER_NO", String::new(), "ORDER_NO"),
            ("INVOICETYPE", "3".into(), "INVOICETYPE"),
            ("TTQQLSH", "X".repeat(21), "TTQQLSH"),
            ("ATTACH", " ".into(), "ATTACH"),
            ("GMF_MC", "中".repeat(101), "GMF_MC"),
            ("GMF_NSRSBH", "1".repeat(21), "GMF_NSRSBH"),
            ("GMF_YHZH", "1".repeat(101), "GMF_YHZH"),
            ("BY2", "b".repeat(201), "BY2"),
        ];
        for (field, value, named) in cases {
            let mut f = valid();
            f.insert(field, value);
            let err = check_fields(&f).expect_err(field);
            assert!(err.contains(named), "{err}");
        }
        let mut f = valid();
        f.insert("GMF_MC", "中".repeat(100));
        f.insert("REMARK", "r".repeat(200));
        assert!(check_fields(&f).is_ok());
        f.insert("INVOICETYPE", "2".into());
        assert!(check_fields(&f).expect_err("专票").contains("GMF_NSRSBH"));
        f.insert("GMF_NSRSBH", "91110000600037341L".into());
        assert!(check_fields(&f).is_ok());
    }
}
