//! The 13 FPTT1001 title fields (ORDER_NO … BY2), declared once: the store reads and
//! writes them as `title_submissions` columns, `enqueue title --json` reads them under
//! their protocol names, the validator checks them and the title client renders them.
//!
//! `Debug` masks the buyer's phone and bank account, so a row can be logged as it is.

use std::fmt;

use serde::Deserialize;

/// The title fields of one submission, named after the protocol fields. Columns of
/// `title_submissions` by these names (`#[sqlx(flatten)]` in a row type); keys
/// `ORDER_NO` … `BY2` in JSON.
#[derive(Clone, PartialEq, Eq, Default, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct TitleFields {
    /// `ORDER_NO`: the merchant's order number.
    pub order_no: String,
    /// `INVOICETYPE`: `1` 普票 or `2` 专票.
    #[serde(rename = "INVOICETYPE")]
    pub invoice_type: String,
    /// `TTQQLSH`: the title request serial number, usable once. `None` until the worker
    /// generates one (it stores it before the first send).
    #[serde(default)]
    pub ttqqlsh: Option<String>,
    /// `ATTACH`: usually the tax device number.
    pub attach: String,
    /// `GMF_MC`: buyer name, i.e. the invoice title.
    pub gmf_mc: String,
    /// `GMF_NSRSBH`: buyer tax id.
    #[serde(default)]
    pub gmf_nsrsbh: Option<String>,
    /// `GMF_DZ`: buyer address.
    #[serde(default)]
    pub gmf_dz: Option<String>,
    /// `GMF_DH`: buyer phone (private; masked in `Debug` and logs).
    #[serde(default)]
    pub gmf_dh: Option<String>,
    /// `GMF_YHZH`: buyer bank and account (private; masked in `Debug` and logs).
    #[serde(default)]
    pub gmf_yhzh: Option<String>,
    /// `GMF_YHMC`: buyer bank name.
    #[serde(default)]
    pub gmf_yhmc: Option<String>,
    /// `REMARK`: shown in 开票精灵's list (e.g. a room number).
    #[serde(default)]
    pub remark: Option<String>,
    /// `BY1`: spare field 1.
    #[serde(default, rename = "BY1")]
    pub by1: Option<String>,
    /// `BY2`: spare field 2.
    #[serde(default, rename = "BY2")]
    pub by2: Option<String>,
}

impl fmt::Debug for TitleFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TitleFields")
            .field("order_no", &self.order_no)
            .field("invoice_type", &self.invoice_type)
            .field("ttqqlsh", &self.ttqqlsh)
            .field("attach", &self.attach)
            .field("gmf_mc", &self.gmf_mc)
            .field("gmf_nsrsbh", &self.gmf_nsrsbh)
            .field("gmf_dz", &self.gmf_dz)
            .field("gmf_dh", &self.gmf_dh.as_deref().map(mask_phone))
            .field("gmf_yhzh", &self.gmf_yhzh.as_deref().map(mask_account))
            .field("gmf_yhmc", &self.gmf_yhmc)
            .field("remark", &self.remark)
            .field("by1", &self.by1)
            .field("by2", &self.by2)
            .finish()
    }
}

impl TitleFields {
    /// The fields in protocol order under their protocol names; absent optional fields
    /// are empty strings, as in the doc's samples (`"REMARK":""`).
    pub fn elements(&self) -> [(&'static str, &str); 13] {
        [
            ("ORDER_NO", self.order_no.as_str()),
            ("INVOICETYPE", self.invoice_type.as_str()),
            ("TTQQLSH", opt(&self.ttqqlsh)),
            ("ATTACH", self.attach.as_str()),
            ("GMF_MC", self.gmf_mc.as_str()),
            ("GMF_NSRSBH", opt(&self.gmf_nsrsbh)),
            ("GMF_DZ", opt(&self.gmf_dz)),
            ("GMF_DH", opt(&self.gmf_dh)),
            ("GMF_YHZH", opt(&self.gmf_yhzh)),
            ("GMF_YHMC", opt(&self.gmf_yhmc)),
            ("REMARK", opt(&self.remark)),
            ("BY1", opt(&self.by1)),
            ("BY2", opt(&self.by2)),
        ]
    }
}

/// An optional field as sent: absent is the empty string.
fn opt(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("")
}

/// Keeps the last `keep` characters of `value` behind a fixed `****`, and nothing of values
/// so short that their tail would be most of them. The prefix has a fixed length so the
/// mask does not reveal the length either.
fn mask_tail(value: &str, keep: usize) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.is_empty() {
        return String::new();
    }
    // A tail longer than half the value would give most of it away.
    let keep = keep.min(chars.len() / 2);
    let mut out = String::from("****");
    out.extend(&chars[chars.len() - keep..]);
    out
}

/// A buyer phone number for logs and messages: `****` and its last 4 characters
/// (`13800138000` → `****8000`); short values are masked entirely.
pub fn mask_phone(phone: &str) -> String {
    mask_tail(phone, 4)
}

/// A buyer bank account for logs and messages: `****` and its last 4 characters
/// (`招商银行 66454545` → `****4545`); short values are masked entirely.
pub fn mask_account(account: &str) -> String {
    mask_tail(account, 4)
}

/// A `title_submissions` column's value as it may be shown to an operator: the buyer's
/// phone (`gmf_dh`) and bank account (`gmf_yhzh`) masked, everything else as it is.
pub fn mask_column(column: &str, value: &str) -> String {
    match column {
        "gmf_dh" => mask_phone(value),
        "gmf_yhzh" => mask_account(value),
        _ => value.to_string(),
    }
}

/// A title whose fields need escaping in both payloads, with a phone and an account, for
/// the tests of the modules that use these fields.
#[cfg(test)]
pub(crate) fn sample() -> TitleFields {
    TitleFields {
        order_no: "ORD-1".into(),
        invoice_type: "1".into(),
        ttqqlsh: Some("IW2024000001".into()),
        attach: "661234567890".into(),
        gmf_mc: "A&B <公司> \"引号\"".into(),
        gmf_nsrsbh: Some("91110000600037341L".into()),
        gmf_dz: None,
        gmf_dh: Some("13800138000".into()),
        gmf_yhzh: Some("招商银行 66454545".into()),
        gmf_yhmc: None,
        remark: Some("房间 1".into()),
        by1: None,
        by2: Some("b2".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::admin::NewTitle;

    #[test]
    fn debug_masks_phone_and_account() {
        let dbg = format!("{:?}", sample());
        assert!(!dbg.contains("13800138000"));
        assert!(!dbg.contains("66454545"));
        assert!(dbg.contains("****8000"));
        assert!(dbg.contains("****4545"));
        assert!(dbg.contains("A&B"));
    }

    #[test]
    fn masks_keep_at_most_half_and_last_four() {
        assert_eq!(mask_phone("13800138000"), "****8000");
        assert_eq!(mask_account("招商银行 66454545"), "****4545");
        assert_eq!(mask_phone(""), "");
        assert_eq!(mask_phone("12"), "****2");
        assert_eq!(mask_phone("1"), "****");
        assert_eq!(mask_phone("123456"), "****456");
    }

    #[test]
    fn elements_follow_the_protocol_and_absent_is_empty() {
        let names: Vec<&str> = sample().elements().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "ORDER_NO",
                "INVOICETYPE",
                "TTQQLSH",
                "ATTACH",
                "GMF_MC",
                "GMF_NSRSBH",
                "GMF_DZ",
                "GMF_DH",
                "GMF_YHZH",
                "GMF_YHMC",
                "REMARK",
                "BY1",
                "BY2"
            ]
        );
        assert_eq!(sample().elements()[6], ("GMF_DZ", ""));
    }

    /// `enqueue title --json` reads these fields inside [`NewTitle`]: the protocol names,
    /// the two overrides, and an unknown key refused rather than ignored.
    #[test]
    fn json_uses_protocol_names_and_refuses_unknown_keys() {
        let t: NewTitle = serde_json::from_str(
            r#"{"ORDER_NO":"O1","INVOICETYPE":"2","ATTACH":"A","GMF_MC":"M","GMF_NSRSBH":"N",
                "TTQQLSH":"S1","BY1":"b1","BY2":"b2","SQM":"Q","DATATYPE":1}"#,
        )
        .expect("parses");
        assert_eq!(t.fields.order_no, "O1");
        assert_eq!(t.fields.invoice_type, "2");
        assert_eq!(t.fields.ttqqlsh.as_deref(), Some("S1"));
        assert_eq!(t.fields.gmf_nsrsbh.as_deref(), Some("N"));
        assert_eq!(
            (t.fields.by1.as_deref(), t.fields.by2.as_deref()),
            (Some("b1"), Some("b2"))
        );
        assert_eq!((t.sqm.as_deref(), t.data_type), (Some("Q"), Some(1)));
        let t: NewTitle = serde_json::from_str(
            r#"{"ORDER_NO":"O1","INVOICETYPE":"1","ATTACH":"A","GMF_MC":"M","sqm":"q","dataType":0}"#,
        )
        .expect("aliases");
        assert_eq!((t.sqm.as_deref(), t.data_type), (Some("q"), Some(0)));
        assert_eq!(t.fields.ttqqlsh, None);
        let unknown = serde_json::from_str::<NewTitle>(
            r#"{"ORDER_NO":"O1","INVOICETYPE":"1","ATTACH":"A","GMF_MC":"M","GMF_XX":"?"}"#,
        )
        .expect_err("unknown key");
        assert!(unknown.to_string().contains("GMF_XX"), "{unknown}");
        let missing =
            serde_json::from_str::<NewTitle>(r#"{"ORDER_NO":"O1"}"#).expect_err("missing field");
        assert!(missing.to_string().contains("INVOICETYPE"), "{missing}");
    }
}
