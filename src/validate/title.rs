//! Checks a `title_submissions` row against the FPTT1001 field rules before it is sent, so
//! a row the platform would refuse becomes `rejected` with a precise reason instead of
//! using up attempts.
//!
//! Lengths are counted in characters (the doc's limits are characters, and titles are
//! Chinese). Reasons name the protocol field and the rule; they never echo the buyer's
//! phone or bank account.

use crate::title_fields::TitleFields;
use crate::validate::uscc::uscc_check_digit_ok;
use crate::validate::Rejection;

/// True for values that count as absent for a required field: empty or whitespace-only.
fn blank(value: &str) -> bool {
    value.trim().is_empty()
}

/// The first control character a field may not hold, with its 1-based position.
///
/// `strict` refuses every control character (identifiers); otherwise tab, line feed and
/// carriage return pass, since addresses and remarks may be multi-line and XML 1.0 allows
/// them, while the other C0 controls cannot appear in an XML payload at all.
fn control_char(value: &str, strict: bool) -> Option<(usize, char)> {
    value
        .chars()
        .enumerate()
        .find(|&(_, c)| {
            if strict {
                c.is_control()
            } else {
                (c.is_control() && !matches!(c, '\t' | '\n' | '\r') && (c as u32) < 0x80)
                    || matches!(c, '\u{FFFE}' | '\u{FFFF}')
            }
        })
        .map(|(i, c)| (i + 1, c))
}

/// Checks the length and characters of one field value.
fn check_text(
    field: &'static str,
    value: &str,
    max: Option<usize>,
    strict: bool,
) -> Result<(), Rejection> {
    if let Some(max) = max {
        let len = value.chars().count();
        if len > max {
            return Err(Rejection::new(
                field,
                format!("{len} characters, at most {max} allowed"),
            ));
        }
    }
    if strict {
        if let Some((position, c)) = super::invisible::first_invisible(value) {
            return Err(Rejection::new(
                field,
                super::invisible::describe(c, position),
            ));
        }
    }
    if let Some((pos, c)) = control_char(value, strict) {
        return Err(Rejection::new(
            field,
            format!(
                "contains control character U+{:04X} at position {pos}",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// A required field: present (not blank), then length and characters.
fn required(
    field: &'static str,
    value: &str,
    max: Option<usize>,
    strict: bool,
) -> Result<(), Rejection> {
    if blank(value) {
        return Err(Rejection::new(field, "required but empty"));
    }
    check_text(field, value, max, strict)
}

/// An optional field: length and characters when present.
fn optional(field: &'static str, value: Option<&str>, max: usize) -> Result<(), Rejection> {
    match value {
        Some(v) => check_text(field, v, Some(max), false),
        None => Ok(()),
    }
}

/// Checks the buyer tax id (`GMF_NSRSBH`): required for 专票, and when given it must be
/// 15, 17, 18 or 20 digits and capital letters, and an 18-character one must carry a valid
/// GB 32100-2015 check digit unless `lenient`.
fn check_tax_id(invoice_type: &str, value: Option<&str>, lenient: bool) -> Result<(), Rejection> {
    const FIELD: &str = "GMF_NSRSBH";
    // An empty string is how many writers say "none"; treat it like NULL.
    let value = value.filter(|v| !v.is_empty());
    let Some(id) = value else {
        if invoice_type == "2" {
            return Err(Rejection::new(
                FIELD,
                "required for INVOICETYPE 2 (专票) but empty",
            ));
        }
        return Ok(());
    };
    if invoice_type == "2" && blank(id) {
        return Err(Rejection::new(
            FIELD,
            "required for INVOICETYPE 2 (专票) but empty",
        ));
    }
    let len = id.chars().count();
    if len > 20 {
        return Err(Rejection::new(
            FIELD,
            format!("{len} characters, at most 20 allowed"),
        ));
    }
    let shape_ok = matches!(len, 15 | 17 | 18 | 20)
        && id
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase());
    if !shape_ok {
        let hint = if id.chars().any(|c| c.is_ascii_lowercase()) {
            " (letters must be capitals)"
        } else {
            ""
        };
        return Err(Rejection::new(
            FIELD,
            format!(
                "{id:?} is not a tax id: expected 15, 17, 18 or 20 digits and capital letters, got {len} characters{hint}"
            ),
        ));
    }
    if len == 18 && !lenient && !uscc_check_digit_ok(id) {
        return Err(Rejection::new(
            FIELD,
            format!(
                "{id} fails the GB 32100-2015 check digit of an 18-character Unified Social Credit Code (set [title] lenient_tax_id = true to accept sandbox tax numbers)"
            ),
        ));
    }
    Ok(())
}

/// Checks every FPTT1001 field rule; the first failure, in protocol field order, is
/// returned. `lenient_tax_id` accepts 18-character buyer tax ids whose check digit fails.
pub fn check(fields: &TitleFields, lenient_tax_id: bool) -> Result<(), Rejection> {
    // ORDER_NO has no documented length limit, but it is an identifier: no control chars.
    required("ORDER_NO", &fields.order_no, None, true)?;
    if !matches!(fields.invoice_type.as_str(), "1" | "2") {
        let reason = if blank(&fields.invoice_type) {
            "required but empty; expected 1 (普票) or 2 (专票)".to_string()
        } else {
            format!(
                "{:?} is not an invoice type; expected 1 (普票) or 2 (专票)",
                fields.invoice_type
            )
        };
        return Err(Rejection::new("INVOICETYPE", reason));
    }
    required(
        "TTQQLSH",
        fields.ttqqlsh.as_deref().unwrap_or(""),
        Some(20),
        true,
    )?;
    required("ATTACH", &fields.attach, Some(20), true)?;
    required("GMF_MC", &fields.gmf_mc, Some(100), false)?;
    check_tax_id(
        &fields.invoice_type,
        fields.gmf_nsrsbh.as_deref(),
        lenient_tax_id,
    )?;
    optional("GMF_DZ", fields.gmf_dz.as_deref(), 100)?;
    optional("GMF_DH", fields.gmf_dh.as_deref(), 100)?;
    optional("GMF_YHZH", fields.gmf_yhzh.as_deref(), 100)?;
    optional("GMF_YHMC", fields.gmf_yhmc.as_deref(), 100)?;
    optional("REMARK", fields.remark.as_deref(), 200)?;
    optional("BY1", fields.by1.as_deref(), 200)?;
    optional("BY2", fields.by2.as_deref(), 200)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> TitleFields {
        TitleFields {
            order_no: "ORD-1".into(),
            invoice_type: "1".into(),
            ttqqlsh: Some("IW20240101000001".into()),
            attach: "661234567890".into(),
            gmf_mc: "北京某某科技有限公司".into(),
            gmf_nsrsbh: Some("91110000600037341L".into()),
            gmf_dz: Some("北京市海淀区\n某路1号".into()),
            gmf_dh: Some("13800138000".into()),
            gmf_yhzh: Some("招商银行 66454545".into()),
            gmf_yhmc: Some("招商银行".into()),
            remark: Some("房间 1".into()),
            by1: None,
            by2: None,
        }
    }

    fn rejected(f: &TitleFields) -> Rejection {
        check(f, false).expect_err("should be rejected")
    }

    #[test]
    fn a_valid_row_passes() {
        assert_eq!(check(&valid(), false), Ok(()));
        let minimal = TitleFields {
            gmf_nsrsbh: None,
            gmf_dz: None,
            gmf_dh: None,
            gmf_yhzh: None,
            gmf_yhmc: None,
            remark: None,
            ..valid()
        };
        assert_eq!(check(&minimal, false), Ok(()));
    }

    #[test]
    fn order_no_required_and_no_control_chars() {
        let r = rejected(&TitleFields {
            order_no: "  ".into(),
            ..valid()
        });
        assert_eq!(r.field, "ORDER_NO");
        assert!(r.reason.contains("required"));
        let r = rejected(&TitleFields {
            order_no: "ORD\n1".into(),
            ..valid()
        });
        assert_eq!(r.field, "ORDER_NO");
        assert!(r.reason.contains("U+000A at position 4"), "{}", r.reason);
        let r = rejected(&TitleFields {
            order_no: "ORD\u{85}".into(),
            ..valid()
        });
        assert_eq!(r.field, "ORDER_NO");
    }

    #[test]
    fn invoice_type_is_1_or_2() {
        for bad in ["", "3", " 1", "01", "普票"] {
            let r = rejected(&TitleFields {
                invoice_type: bad.into(),
                ..valid()
            });
            assert_eq!(r.field, "INVOICETYPE", "{bad:?}");
        }
    }

    #[test]
    fn serial_and_attach_required_and_at_most_20() {
        for (name, set) in [
            (
                "TTQQLSH",
                (|f: &mut TitleFields, v: String| f.ttqqlsh = Some(v))
                    as fn(&mut TitleFields, String),
            ),
            ("ATTACH", |f: &mut TitleFields, v: String| f.attach = v),
        ] {
            let mut f = valid();
            set(&mut f, "".into());
            assert_eq!(rejected(&f).field, name);
            set(&mut f, " \t".into());
            assert_eq!(rejected(&f).field, name);
            set(&mut f, "流".repeat(20));
            assert_eq!(check(&f, false), Ok(()));
            set(&mut f, "A".repeat(21));
            let r = rejected(&f);
            assert_eq!(r.field, name);
            assert_eq!(r.reason, "21 characters, at most 20 allowed");
        }
        // A serial not generated yet counts as empty.
        let r = rejected(&TitleFields {
            ttqqlsh: None,
            ..valid()
        });
        assert_eq!(
            (r.field, r.reason.as_str()),
            ("TTQQLSH", "required but empty")
        );
    }

    #[test]
    fn title_required_and_at_most_100_characters() {
        let r = rejected(&TitleFields {
            gmf_mc: "".into(),
            ..valid()
        });
        assert_eq!(r.field, "GMF_MC");
        assert_eq!(
            check(
                &TitleFields {
                    gmf_mc: "公".repeat(100),
                    ..valid()
                },
                false
            ),
            Ok(())
        );
        let r = rejected(&TitleFields {
            gmf_mc: "公".repeat(101),
            ..valid()
        });
        assert_eq!(r.to_string(), "GMF_MC: 101 characters, at most 100 allowed");
        let r = rejected(&TitleFields {
            gmf_mc: "A\u{0}B".into(),
            ..valid()
        });
        assert_eq!(r.field, "GMF_MC");
    }

    #[test]
    fn tax_id_required_for_special_invoices() {
        for none in [None, Some(""), Some("   ")] {
            let r = rejected(&TitleFields {
                invoice_type: "2".into(),
                gmf_nsrsbh: none.map(str::to_string),
                ..valid()
            });
            assert_eq!(r.field, "GMF_NSRSBH", "{none:?}");
            assert!(r.reason.contains("INVOICETYPE 2"));
        }
        // Optional for 普票.
        for none in [None, Some("")] {
            let f = TitleFields {
                gmf_nsrsbh: none.map(str::to_string),
                ..valid()
            };
            assert_eq!(check(&f, false), Ok(()));
        }
    }

    #[test]
    fn tax_id_shape() {
        for ok in [
            "110101123456789",
            "11010112345678901",
            "91110000600037341L",
            "9144030071526726XG",
            "91310115MA1K3BTP2B",
            "1101011234567890123A",
        ] {
            let f = TitleFields {
                invoice_type: "2".into(),
                gmf_nsrsbh: Some(ok.into()),
                ..valid()
            };
            assert_eq!(check(&f, false), Ok(()), "{ok}");
        }
        for bad in [
            "1234",
            "1101011234567890",
            "1101011234567890123",
            "91110000600037341l",
            "91110000-00037341L",
            " 91110000600037341L",
            "   ",
        ] {
            let r = rejected(&TitleFields {
                gmf_nsrsbh: Some(bad.into()),
                ..valid()
            });
            assert_eq!(r.field, "GMF_NSRSBH", "{bad:?}");
            assert!(r.reason.contains("15, 17, 18 or 20"), "{}", r.reason);
        }
        let r = rejected(&TitleFields {
            gmf_nsrsbh: Some("9".repeat(21)),
            ..valid()
        });
        assert_eq!(r.reason, "21 characters, at most 20 allowed");
        let r = rejected(&TitleFields {
            gmf_nsrsbh: Some("91110000600037341l".into()),
            ..valid()
        });
        assert!(r.reason.contains("capitals"));
    }

    #[test]
    fn uscc_check_digit_unless_lenient() {
        let f = TitleFields {
            gmf_nsrsbh: Some("91110000600037341N".into()),
            ..valid()
        };
        let r = check(&f, false).expect_err("bad check digit");
        assert_eq!(r.field, "GMF_NSRSBH");
        assert!(r.reason.contains("GB 32100-2015"));
        assert!(r.reason.contains("lenient_tax_id"));
        assert_eq!(check(&f, true), Ok(()));
        // Lenient does not accept a wrong shape.
        let f = TitleFields {
            gmf_nsrsbh: Some("9111000060003734".into()),
            ..valid()
        };
        assert!(check(&f, true).is_err());
    }

    #[test]
    fn optional_limits() {
        type Set = fn(&mut TitleFields, Option<String>);
        let cases: [(&str, usize, Set); 7] = [
            ("GMF_DZ", 100, |f, v| f.gmf_dz = v),
            ("GMF_DH", 100, |f, v| f.gmf_dh = v),
            ("GMF_YHZH", 100, |f, v| f.gmf_yhzh = v),
            ("GMF_YHMC", 100, |f, v| f.gmf_yhmc = v),
            ("REMARK", 200, |f, v| f.remark = v),
            ("BY1", 200, |f, v| f.by1 = v),
            ("BY2", 200, |f, v| f.by2 = v),
        ];
        for (name, max, set) in cases {
            let mut f = valid();
            set(&mut f, Some("字".repeat(max)));
            assert_eq!(check(&f, false), Ok(()), "{name}");
            set(&mut f, Some("字".repeat(max + 1)));
            let r = rejected(&f);
            assert_eq!(r.field, name);
            assert_eq!(
                r.reason,
                format!("{} characters, at most {max} allowed", max + 1)
            );
            set(&mut f, None);
            assert_eq!(check(&f, false), Ok(()), "{name}");
            set(&mut f, Some("a\u{1}b".into()));
            assert_eq!(rejected(&f).field, name);
        }
    }

    #[test]
    fn private_values_are_never_echoed() {
        let phone = format!("1380013800{}", "0".repeat(95));
        let r = rejected(&TitleFields {
            gmf_dh: Some(phone.clone()),
            ..valid()
        });
        assert_eq!(r.field, "GMF_DH");
        assert!(!r.to_string().contains("13800138"));
        let r = rejected(&TitleFields {
            gmf_yhzh: Some("招商银行 66454545\u{7}".into()),
            ..valid()
        });
        assert_eq!(r.field, "GMF_YHZH");
        assert!(!r.to_string().contains("66454545"));
    }
}
