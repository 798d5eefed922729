//! Lenient parsing of the 发票通 platform's answers (FPTT1001, TokenAction, OpenAction).
//!
//! The platform answers in several shapes, and not necessarily in the `dataType` that was
//! sent, so every answer is sniffed (a leading `<` means XML), turned into one tree and
//! searched with case-insensitive keys:
//!
//! - `{"head":{"service":{"replyCode":"0000","replyMsg":"success"}},"body":{"TTQQLSH":"…"}}`
//! - `{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":"0","REPLYMSG":"success"}},"BODY":{}}}`
//! - `<ROOT><HEAD><SERVICE><REPLYCODE>0000</REPLYCODE><REPLYMSG>…</REPLYMSG></SERVICE></HEAD><BODY>…</BODY></ROOT>`
//!
//! Codes may be strings or numbers. Anything else (HTML, empty, wrong types) is a
//! [`ReplyError`], which callers treat as a transient fault.

use quick_xml::events::Event;
use serde_json::{Map, Value};

/// Deepest XML nesting accepted; real answers are four levels deep, and a bound keeps a
/// hostile body from building a tree whose drop would overflow the stack.
const MAX_XML_DEPTH: usize = 32;

/// The service status of one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `REPLYCODE`, as text (`0000`, `0`, `1000`, …).
    pub code: String,
    /// `REPLYMSG`; empty when absent.
    pub message: String,
    /// `BODY/TTQQLSH`, when the answer echoes the serial number.
    pub ttqqlsh: Option<String>,
    /// `BODY/Code`: the business result when `code` is `1000` (接口调用成功).
    pub body_code: Option<String>,
    /// `BODY/Msg` (or `Message`): the business message that goes with `body_code`.
    pub body_message: Option<String>,
}

impl Reply {
    /// The text that explains this answer: the business message when the service call
    /// succeeded (`1000`) but the business result did not, else `REPLYMSG`.
    pub fn detail(&self) -> &str {
        if self.code == "1000" {
            if let Some(m) = self.body_message.as_deref().filter(|m| !m.is_empty()) {
                return m;
            }
        }
        &self.message
    }

    /// The code to record in `last_code`: `REPLYCODE`, or `1000/<BODY Code>` when the
    /// business result is nested.
    pub fn code_for_record(&self) -> String {
        match (&self.code[..], &self.body_code) {
            ("1000", Some(body)) => format!("1000/{body}"),
            _ => self.code.clone(),
        }
    }
}

/// Why an answer could not be read, or (for token and openID answers) was a refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// No bytes, or only whitespace.
    #[error("empty answer")]
    Empty,
    /// Neither JSON nor XML.
    #[error("answer is neither JSON nor XML")]
    NotStructured,
    /// JSON or XML that does not parse.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// Parsed, but without a usable `REPLYCODE` (missing or of a wrong type).
    #[error("answer has no REPLYCODE")]
    MissingCode,
    /// A token/openID answer without the expected value in `BODY`.
    #[error("answer has no BODY/{0}")]
    MissingField(&'static str),
    /// The platform answered with a non-success code.
    #[error("refused with code {code}: {message}")]
    Refused {
        /// `REPLYCODE` (or `1000/<BODY Code>`).
        code: String,
        /// `REPLYMSG` (or the business message).
        message: String,
    },
}

/// True for codes the platform uses for success.
fn success_code(code: &str) -> bool {
    matches!(code.trim(), "0000" | "0")
}

/// True when the answer means success: `REPLYCODE` `0000` or `0`, or `1000`
/// (接口调用成功) with `BODY/Code` `0000` (or `0`).
pub fn is_success(reply: &Reply) -> bool {
    let code = reply.code.trim();
    success_code(code) || (code == "1000" && reply.body_code.as_deref().is_some_and(success_code))
}

/// True when a message is about the access token or openID (token / 令牌 / access_token /
/// openID): the platform refused our token, and renewing it may help (SPEC §2).
pub fn mentions_token(message: &str) -> bool {
    let lower = message.to_lowercase();
    lower.contains("token") || lower.contains("openid") || message.contains("令牌")
}

/// True when a message says the serial number (TTQQLSH) was used already (重复 / 已存在).
/// Such a reply is never a token problem, whatever else it mentions.
pub fn mentions_duplicate(message: &str) -> bool {
    message.contains("重复") || message.contains("已存在")
}

/// Parses an answer to FPTT1001 (or any service of the platform) in any of the accepted
/// shapes.
pub fn parse_reply(body: &[u8]) -> Result<Reply, ReplyError> {
    let tree = parse_tree(body)?;
    reply_from_tree(&tree)
}

/// Parses a TokenAction answer: the access token in `BODY/access_token`.
///
/// A present `REPLYCODE` that is not success is [`ReplyError::Refused`]; a missing code is
/// accepted when the token is there (the token service is not documented).
pub fn parse_token(body: &[u8]) -> Result<String, ReplyError> {
    parse_body_value(body, "access_token")
}

/// Parses an OpenAction answer: the openID in `BODY/openID`. Same rules as [`parse_token`].
pub fn parse_openid(body: &[u8]) -> Result<String, ReplyError> {
    parse_body_value(body, "openID")
}

fn parse_body_value(body: &[u8], key: &'static str) -> Result<String, ReplyError> {
    let tree = parse_tree(body)?;
    match reply_from_tree(&tree) {
        Ok(reply) if !is_success(&reply) => {
            return Err(ReplyError::Refused {
                code: reply.code_for_record(),
                message: reply.detail().to_string(),
            })
        }
        Ok(_) | Err(ReplyError::MissingCode) => {}
        Err(other) => return Err(other),
    }
    let root = unwrap_root(&tree);
    let found = get_ci(root, "body")
        .and_then(|b| get_ci(b, key))
        // Some deployments put the value at the top level, OAuth style.
        .or_else(|| get_ci(root, key))
        .and_then(scalar_text)
        .filter(|v| !v.trim().is_empty());
    found
        .map(|v| v.trim().to_string())
        .ok_or(ReplyError::MissingField(key))
}

/// Sniffs and parses a body into a tree: JSON as is, XML as nested objects keyed by
/// element name (leaf elements become strings).
fn parse_tree(body: &[u8]) -> Result<Value, ReplyError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        return Err(ReplyError::Empty);
    };
    let body = &body[start..];
    match body[0] {
        b'<' => parse_xml(body),
        b'{' => serde_json::from_slice::<Value>(body)
            .map_err(|e| ReplyError::Malformed(format!("JSON: {e}"))),
        _ => Err(ReplyError::NotStructured),
    }
}

/// One open element while reading XML: its children and its text.
struct Open {
    name: String,
    children: Map<String, Value>,
    text: String,
}

impl Open {
    fn new(name: String) -> Self {
        Open {
            name,
            children: Map::new(),
            text: String::new(),
        }
    }

    /// The element as a value: an object when it has children, else its trimmed text.
    fn into_value(self) -> (String, Value) {
        let value = if self.children.is_empty() {
            Value::String(self.text.trim().to_string())
        } else {
            Value::Object(self.children)
        };
        (self.name, value)
    }
}

/// Adds a finished element to its parent; a repeated name keeps its first occurrence
/// (none of the answers read here repeats an element).
fn attach(parent: &mut Open, name: String, value: Value) {
    parent.children.entry(name).or_insert(value);
}

fn parse_xml(body: &[u8]) -> Result<Value, ReplyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ReplyError::Malformed(format!("XML is not UTF-8: {e}")))?;
    let mut reader = quick_xml::Reader::from_str(text);
    let malformed = |e: quick_xml::Error| ReplyError::Malformed(format!("XML: {e}"));
    // The document itself is the bottom of the stack, so the root element ends up as
    // `{"ROOT": …}` like the JSON shape.
    let mut stack: Vec<Open> = vec![Open::new(String::new())];
    loop {
        match reader.read_event().map_err(malformed)? {
            Event::Start(e) => {
                if stack.len() > MAX_XML_DEPTH {
                    return Err(ReplyError::Malformed("XML nested too deeply".into()));
                }
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                stack.push(Open::new(name));
            }
            Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if let Some(top) = stack.last_mut() {
                    attach(top, name, Value::String(String::new()));
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(malformed)?;
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&s);
                }
            }
            Event::CData(c) => {
                let s = String::from_utf8_lossy(&c).into_owned();
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&s);
                }
            }
            Event::End(_) => {
                // quick-xml checks that end names match, so this pops the matching start.
                let Some(done) = stack.pop() else {
                    return Err(ReplyError::Malformed("XML: unbalanced end tag".into()));
                };
                let (name, value) = done.into_value();
                match stack.last_mut() {
                    Some(parent) => attach(parent, name, value),
                    None => return Err(ReplyError::Malformed("XML: unbalanced end tag".into())),
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if stack.len() != 1 {
        return Err(ReplyError::Malformed("XML: unclosed element".into()));
    }
    let document = stack.pop().map(|d| d.children).unwrap_or_default();
    if document.is_empty() {
        return Err(ReplyError::Malformed("XML: no element".into()));
    }
    Ok(Value::Object(document))
}

/// Looks up `key` in an object, ignoring ASCII case; `None` for non-objects.
fn get_ci<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    let map = value.as_object()?;
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// A string or number as text; `None` for objects, arrays, booleans and null.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The object holding HEAD and BODY: `ROOT` when the answer is wrapped in one.
fn unwrap_root(tree: &Value) -> &Value {
    match get_ci(tree, "root") {
        Some(root) if root.is_object() => root,
        _ => tree,
    }
}

fn reply_from_tree(tree: &Value) -> Result<Reply, ReplyError> {
    let root = unwrap_root(tree);
    let head = get_ci(root, "head");
    // HEAD/SERVICE/REPLYCODE as documented; HEAD/REPLYCODE and a bare REPLYCODE are
    // accepted too, since the platform's services are not uniform.
    let service = head
        .and_then(|h| get_ci(h, "service"))
        .filter(|s| s.is_object())
        .or(head.filter(|h| h.is_object()))
        .unwrap_or(root);
    let code = get_ci(service, "replycode")
        .and_then(scalar_text)
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .ok_or(ReplyError::MissingCode)?;
    let message = get_ci(service, "replymsg")
        .and_then(scalar_text)
        .unwrap_or_default();
    let body = get_ci(root, "body");
    let body_text = |key: &str| body.and_then(|b| get_ci(b, key)).and_then(scalar_text);
    Ok(Reply {
        code,
        message,
        ttqqlsh: body_text("ttqqlsh"),
        body_code: body_text("code").map(|c| c.trim().to_string()),
        body_message: body_text("msg").or_else(|| body_text("message")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lower_camel_shape() {
        let r = parse_reply(
            br#"{"head":{"service":{"replyCode":"0000","replyMsg":"success"}},"body":{"TTQQLSH":"IW1"}}"#,
        )
        .expect("parse");
        assert_eq!(r.code, "0000");
        assert_eq!(r.message, "success");
        assert_eq!(r.ttqqlsh.as_deref(), Some("IW1"));
        assert!(is_success(&r));
    }

    #[test]
    fn json_root_shape() {
        let r = parse_reply(
            br#"{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":"0","REPLYMSG":"success"}},"BODY":{}}}"#,
        )
        .expect("parse");
        assert_eq!(r.code, "0");
        assert!(is_success(&r));
        assert_eq!(r.ttqqlsh, None);
    }

    #[test]
    fn xml_shape_with_declaration_and_whitespace() {
        let body = "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<ROOT>\n <HEAD> <SERVICE> <REPLYCODE>0000</REPLYCODE> <REPLYMSG>成功 &amp; ok</REPLYMSG> </SERVICE> </HEAD>\n <BODY> <TTQQLSH>IW2</TTQQLSH> </BODY> </ROOT>";
        let r = parse_reply(body.as_bytes()).expect("parse");
        assert_eq!(r.code, "0000");
        assert_eq!(r.message, "成功 & ok");
        assert_eq!(r.ttqqlsh.as_deref(), Some("IW2"));
        assert!(is_success(&r));
    }

    #[test]
    fn keys_are_case_insensitive_in_xml_too() {
        let r = parse_reply(
            b"<root><Head><Service><ReplyCode>9999</ReplyCode><replymsg>TTQQLSH\xE9\x87\x8D\xE5\xA4\x8D</replymsg></Service></Head><body/></root>",
        )
        .expect("parse");
        assert_eq!(r.code, "9999");
        assert_eq!(r.message, "TTQQLSH重复");
        assert!(!is_success(&r));
    }

    #[test]
    fn numeric_codes() {
        let r = parse_reply(br#"{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":0,"REPLYMSG":"ok"}}}}"#)
            .expect("parse");
        assert_eq!(r.code, "0");
        assert!(is_success(&r));
        let r = parse_reply(br#"{"head":{"service":{"replyCode":9001,"replyMsg":"bad"}}}"#)
            .expect("parse");
        assert_eq!(r.code, "9001");
        assert!(!is_success(&r));
    }

    #[test]
    fn code_1000_needs_body_code() {
        let ok = parse_reply(
            r#"{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":"1000","REPLYMSG":"接口调用成功"}},"BODY":{"Code":"0000","Msg":"ok"}}}"#.as_bytes(),
        )
        .expect("parse");
        assert!(is_success(&ok));
        let bad = parse_reply(
            r#"{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":"1000","REPLYMSG":"接口调用成功"}},"BODY":{"Code":"9999","Msg":"GMF_MC必填"}}}"#.as_bytes(),
        )
        .expect("parse");
        assert!(!is_success(&bad));
        assert_eq!(bad.detail(), "GMF_MC必填");
        assert_eq!(bad.code_for_record(), "1000/9999");
        let bare = parse_reply(
            b"<ROOT><HEAD><SERVICE><REPLYCODE>1000</REPLYCODE></SERVICE></HEAD><BODY></BODY></ROOT>",
        )
        .expect("parse");
        assert!(!is_success(&bare));
    }

    #[test]
    fn missing_message_is_empty() {
        let r = parse_reply(br#"{"head":{"service":{"replyCode":"0000"}}}"#).expect("parse");
        assert_eq!(r.message, "");
    }

    #[test]
    fn wrong_types_are_errors_not_panics() {
        for body in [
            &br#"{"head":5}"#[..],
            br#"{"head":{"service":[1,2]}}"#,
            br#"{"head":{"service":{"replyCode":["0000"]}}}"#,
            br#"{"head":{"service":{"replyCode":true}}}"#,
            br#"{"head":{"service":{"replyCode":null}}}"#,
            br#"{"head":{"service":{"replyCode":{"x":1}}}}"#,
            br#"{"ROOT":[]}"#,
            br#"{"ROOT":"0000"}"#,
            br#"{}"#,
        ] {
            assert_eq!(parse_reply(body), Err(ReplyError::MissingCode), "{body:?}");
        }
        assert_eq!(parse_reply(b"[1,2,3]"), Err(ReplyError::NotStructured));
        assert_eq!(parse_reply(b"\"0000\""), Err(ReplyError::NotStructured));
        assert_eq!(parse_reply(b"0000"), Err(ReplyError::NotStructured));
    }

    #[test]
    fn garbage_html_and_empty() {
        assert_eq!(parse_reply(b""), Err(ReplyError::Empty));
        assert_eq!(parse_reply(b"  \r\n "), Err(ReplyError::Empty));
        assert_eq!(
            parse_reply(b"Internal Server Error"),
            Err(ReplyError::NotStructured)
        );
        assert!(matches!(
            parse_reply(b"{\"head\":"),
            Err(ReplyError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"<ROOT><HEAD>"),
            Err(ReplyError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"\xff\xfe<\x00R"),
            Err(ReplyError::NotStructured)
        ));
        assert!(matches!(
            parse_reply(b"<ROOT>\xff</ROOT>"),
            Err(ReplyError::Malformed(_))
        ));
        let html = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>502</h1><br></body></html>";
        assert!(parse_reply(html).is_err());
        let html_ok = b"<html><head><title>x</title></head><body>down</body></html>";
        assert_eq!(parse_reply(html_ok), Err(ReplyError::MissingCode));
    }

    #[test]
    fn deep_xml_is_refused() {
        let body = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000));
        assert!(matches!(
            parse_reply(body.as_bytes()),
            Err(ReplyError::Malformed(_))
        ));
        let deep_json = format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        assert!(matches!(
            parse_reply(deep_json.as_bytes()),
            Err(ReplyError::Malformed(_))
        ));
    }

    #[test]
    fn token_xml_and_json() {
        let xml = b"<?xml version=\"1.0\"?><ROOT><HEAD><SERVICE><REPLYCODE>0</REPLYCODE><REPLYMSG>success</REPLYMSG></SERVICE></HEAD><BODY><access_token>tok-123</access_token></BODY></ROOT>";
        assert_eq!(parse_token(xml), Ok("tok-123".to_string()));
        let json = br#"{"ROOT":{"HEAD":{"SERVICE":{"REPLYCODE":"0000"}},"BODY":{"ACCESS_TOKEN":"tok-9"}}}"#;
        assert_eq!(parse_token(json), Ok("tok-9".to_string()));
        // No status at all, only the token.
        assert_eq!(
            parse_token(b"<ROOT><BODY><access_token> t </access_token></BODY></ROOT>"),
            Ok("t".to_string())
        );
        assert_eq!(
            parse_token(br#"{"access_token":"flat"}"#),
            Ok("flat".to_string())
        );
    }

    #[test]
    fn token_refusal_carries_code_and_message() {
        let xml = "<ROOT><HEAD><SERVICE><REPLYCODE>9001</REPLYCODE><REPLYMSG>client_secret错误</REPLYMSG></SERVICE></HEAD><BODY></BODY></ROOT>";
        assert_eq!(
            parse_token(xml.as_bytes()),
            Err(ReplyError::Refused {
                code: "9001".into(),
                message: "client_secret错误".into()
            })
        );
    }

    #[test]
    fn token_missing_or_wrong_type() {
        let ok_no_token =
            b"<ROOT><HEAD><SERVICE><REPLYCODE>0</REPLYCODE></SERVICE></HEAD><BODY></BODY></ROOT>";
        assert_eq!(
            parse_token(ok_no_token),
            Err(ReplyError::MissingField("access_token"))
        );
        assert_eq!(
            parse_token(br#"{"ROOT":{"BODY":{"access_token":{"v":1}}}}"#),
            Err(ReplyError::MissingField("access_token"))
        );
        assert_eq!(parse_token(b""), Err(ReplyError::Empty));
        assert_eq!(
            parse_token(b"<html>oops</html>"),
            Err(ReplyError::MissingField("access_token"))
        );
    }

    #[test]
    fn openid_shapes() {
        let xml = b"<ROOT><HEAD><SERVICE><REPLYCODE>0000</REPLYCODE></SERVICE></HEAD><BODY><openID>oid-1</openID></BODY></ROOT>";
        assert_eq!(parse_openid(xml), Ok("oid-1".to_string()));
        let json = br#"{"head":{"service":{"replyCode":0}},"body":{"openid":"oid-2"}}"#;
        assert_eq!(parse_openid(json), Ok("oid-2".to_string()));
        let refused =
            r#"{"head":{"service":{"replyCode":"8001","replyMsg":"access_token无效"}}}"#.as_bytes();
        assert!(matches!(
            parse_openid(refused),
            Err(ReplyError::Refused { .. })
        ));
    }
}
