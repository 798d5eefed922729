//! The FPTT1001 (发票抬头发送) request payload: the JSON and XML renderings of a row's
//! [`TitleFields`], and the `data` query parameter encoding (Base64, then Java-style URL
//! encoding).
//!
//! Payloads are built with serde_json and quick-xml's writer, never by pasting strings, so a
//! buyer name such as `A&B <公司> "引号"` arrives intact.

use base64::Engine as _;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;
use serde::ser::SerializeMap;
use serde::Serialize;

use crate::config::DataType;
use crate::title_fields::TitleFields;

/// Why a payload could not be rendered. Only a writer fault can cause it; callers treat
/// it as a permanent failure of the row.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// serde_json refused the value.
    #[error("cannot render JSON payload: {0}")]
    Json(#[from] serde_json::Error),
    /// quick-xml's writer failed.
    #[error("cannot render XML payload: {0}")]
    Xml(String),
}

/// The JSON document, `{"REQUEST":{"HEAD":"","BODY":{…}}}`, with the document's key order.
#[derive(Serialize)]
struct JsonDocument<'a> {
    #[serde(rename = "REQUEST")]
    request: JsonRequest<'a>,
}

#[derive(Serialize)]
struct JsonRequest<'a> {
    /// The doc's JSON sample sends `"HEAD":""`.
    #[serde(rename = "HEAD")]
    head: &'static str,
    #[serde(rename = "BODY")]
    body: JsonBody<'a>,
}

/// `BODY`: the fields as an object in protocol order (serde_json's own map would sort
/// the keys).
struct JsonBody<'a>(&'a TitleFields);

impl Serialize for JsonBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let elements = self.0.elements();
        let mut map = serializer.serialize_map(Some(elements.len()))?;
        for (name, value) in elements {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// The JSON payload (`dataType=0`):
/// `{"REQUEST":{"HEAD":"","BODY":{"ORDER_NO":…,…,"BY2":…}}}`.
pub fn json_payload(fields: &TitleFields) -> Result<String, PayloadError> {
    let doc = JsonDocument {
        request: JsonRequest {
            head: "",
            body: JsonBody(fields),
        },
    };
    Ok(serde_json::to_string(&doc)?)
}

/// The XML payload (`dataType=1`):
/// `<?xml version="1.0" encoding="utf-8"?><REQUEST><HEAD></HEAD><BODY><ORDER_NO>…</ORDER_NO>…</BODY></REQUEST>`,
/// text escaped (`&`, `<`, `>`, `'`, `"`). Empty elements are written as `<X></X>`, like
/// the doc's `<HEAD></HEAD>`.
pub fn xml_payload(fields: &TitleFields) -> Result<String, PayloadError> {
    let mut writer = Writer::new(Vec::new());
    let xml = |e: std::io::Error| PayloadError::Xml(e.to_string());
    writer
        .write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))
        .map_err(xml)?;
    writer
        .write_event(Event::Start(BytesStart::new("REQUEST")))
        .map_err(xml)?;
    writer
        .write_event(Event::Start(BytesStart::new("HEAD")))
        .map_err(xml)?;
    writer
        .write_event(Event::End(BytesEnd::new("HEAD")))
        .map_err(xml)?;
    writer
        .write_event(Event::Start(BytesStart::new("BODY")))
        .map_err(xml)?;
    for (name, value) in fields.elements() {
        writer
            .write_event(Event::Start(BytesStart::new(name)))
            .map_err(xml)?;
        // BytesText::new escapes all five XML special characters.
        writer
            .write_event(Event::Text(BytesText::new(value)))
            .map_err(xml)?;
        writer
            .write_event(Event::End(BytesEnd::new(name)))
            .map_err(xml)?;
    }
    writer
        .write_event(Event::End(BytesEnd::new("BODY")))
        .map_err(xml)?;
    writer
        .write_event(Event::End(BytesEnd::new("REQUEST")))
        .map_err(xml)?;
    String::from_utf8(writer.into_inner()).map_err(|e| PayloadError::Xml(e.to_string()))
}

/// The payload for `data_type`.
pub fn payload(fields: &TitleFields, data_type: DataType) -> Result<String, PayloadError> {
    match data_type {
        DataType::Json => json_payload(fields),
        DataType::Xml => xml_payload(fields),
    }
}

/// Bytes Java's `URLEncoder.encode(s, "UTF-8")` leaves alone: ASCII letters, digits and
/// `.` `-` `*` `_`. Everything else is percent-encoded (Java writes a space as `+`, which
/// never occurs in the values encoded here: Base64 text and identifiers).
pub const JAVA_URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'*')
    .remove(b'_');

/// Percent-encodes one query value as Java's `URLEncoder.encode(s, "UTF-8")` would, except
/// that a space becomes `%20` (which every decoder reads as a space too).
pub fn url_encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, JAVA_URL_ENCODE).to_string()
}

/// The `data` query parameter: `URLEncoder.encode(Base64(payload), "UTF-8")`, so Base64's
/// `+`, `/` and `=` go out as `%2B`, `%2F` and `%3D` (the server decodes a raw `+` as a
/// space). Insert the result into the query string as it is; encoding it again would
/// corrupt it.
pub fn encode_data(payload: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload.as_bytes());
    url_encode(&b64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::title_fields::sample;

    /// Java's URLDecoder: `%XX` decoded, `+` read as a space.
    fn java_url_decode(s: &str) -> String {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|c| c.into_owned())
            .unwrap_or_default()
    }

    #[test]
    fn json_has_doc_order_and_escaping() {
        let json = json_payload(&sample()).expect("json");
        assert_eq!(
            json,
            concat!(
                r#"{"REQUEST":{"HEAD":"","BODY":{"ORDER_NO":"ORD-1","INVOICETYPE":"1","#,
                r#""TTQQLSH":"IW2024000001","ATTACH":"661234567890","#,
                r#""GMF_MC":"A&B <公司> \"引号\"","GMF_NSRSBH":"91110000600037341L","#,
                r#""GMF_DZ":"","GMF_DH":"13800138000","GMF_YHZH":"招商银行 66454545","#,
                r#""GMF_YHMC":"","REMARK":"房间 1","BY1":"","BY2":"b2"}}}"#
            )
        );
        let back: serde_json::Value = serde_json::from_str(&json).expect("parse");
        assert_eq!(back["REQUEST"]["BODY"]["GMF_MC"], "A&B <公司> \"引号\"");
    }

    #[test]
    fn xml_has_declaration_elements_and_escaping() {
        let xml = xml_payload(&sample()).expect("xml");
        assert!(xml.starts_with(
            r#"<?xml version="1.0" encoding="utf-8"?><REQUEST><HEAD></HEAD><BODY><ORDER_NO>ORD-1</ORDER_NO><INVOICETYPE>1</INVOICETYPE>"#
        ));
        assert!(xml.contains("<GMF_MC>A&amp;B &lt;公司&gt; &quot;引号&quot;</GMF_MC>"));
        assert!(xml.contains("<GMF_DZ></GMF_DZ>"));
        assert!(xml.ends_with("<BY1></BY1><BY2>b2</BY2></BODY></REQUEST>"));
        // Element order follows the protocol (pinned in `title_fields`).
        let names: Vec<&str> = sample().elements().iter().map(|(k, _)| *k).collect();
        let positions: Vec<usize> = names
            .iter()
            .map(|n| xml.find(&format!("<{n}>")).expect("element present"))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn xml_text_reads_back_unescaped() {
        let xml = xml_payload(&sample()).expect("xml");
        let mut reader = quick_xml::Reader::from_str(&xml);
        let mut in_mc = false;
        let mut got = None;
        loop {
            match reader.read_event().expect("well-formed") {
                Event::Start(e) if e.name().as_ref() == b"GMF_MC" => in_mc = true,
                Event::Text(t) if in_mc => {
                    got = Some(t.unescape().expect("unescape").into_owned());
                    in_mc = false;
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(got.as_deref(), Some("A&B <公司> \"引号\""));
    }

    #[test]
    fn data_encodes_plus_slash_and_equals() {
        // Found by search: its Base64 has `+` (from 引号), `/` (from `??`) and `==` padding.
        let payload = r#"{"GMF_MC":"A&B <公司> 引号 0??~"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(payload.as_bytes());
        assert_eq!(b64, "eyJHTUZfTUMiOiJBJkIgPOWFrOWPuD4g5byV5Y+3IDA/P34ifQ==");
        let encoded = encode_data(payload);
        assert_eq!(
            encoded,
            "eyJHTUZfTUMiOiJBJkIgPOWFrOWPuD4g5byV5Y%2B3IDA%2FP34ifQ%3D%3D"
        );
        assert!(encoded.contains("%2B"), "{encoded}");
        assert!(encoded.contains("%2F"), "{encoded}");
        assert!(encoded.contains("%3D"), "{encoded}");
        assert!(!encoded.contains('+') && !encoded.contains('/') && !encoded.contains('='));
        // Round trip exactly as the Java server decodes it.
        let decoded_b64 = java_url_decode(&encoded);
        assert_eq!(decoded_b64, b64);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(decoded_b64)
            .expect("base64");
        assert_eq!(String::from_utf8(bytes).expect("utf8"), payload);
    }

    #[test]
    fn data_round_trips_both_payloads() {
        for dt in [DataType::Json, DataType::Xml] {
            let p = payload(&sample(), dt).expect("payload");
            let enc = encode_data(&p);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(java_url_decode(&enc))
                .expect("base64");
            assert_eq!(String::from_utf8(raw).expect("utf8"), p);
        }
    }

    #[test]
    fn url_encode_matches_java_unreserved_set() {
        assert_eq!(url_encode("aZ09.-*_"), "aZ09.-*_");
        assert_eq!(url_encode("a+b/c=d e~"), "a%2Bb%2Fc%3Dd%20e%7E");
        assert_eq!(url_encode("授权"), "%E6%8E%88%E6%9D%83");
    }
}
