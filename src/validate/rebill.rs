//! Checks on a `rebill_orders` row before it is sent.

use super::{invisible, Rejection};

/// Longest order number accepted (Nuonuo's orderNo is at most 64 characters).
pub const MAX_ORDERNO_CHARS: usize = 64;

/// Validates `orderno` and `tax_num`; the error names the column and the rule.
pub fn check(orderno: &str, tax_num: &str) -> Result<(), Rejection> {
    let chars = orderno.chars().count();
    if chars == 0 {
        return Err(Rejection::new("orderno", "is empty"));
    }
    if chars > MAX_ORDERNO_CHARS {
        return Err(Rejection::new(
            "orderno",
            format!("{chars} characters, at most {MAX_ORDERNO_CHARS} allowed"),
        ));
    }
    if let Some((position, c)) = invisible::first_invisible(orderno) {
        return Err(Rejection::new("orderno", invisible::describe(c, position)));
    }
    if let Some(c) = orderno
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Rejection::new(
            "orderno",
            format!("contains whitespace or a control character ({:?})", c),
        ));
    }
    check_tax_num(tax_num)
}

/// A seller tax number: 15 to 20 characters, digits and capital letters only.
pub fn check_tax_num(tax_num: &str) -> Result<(), Rejection> {
    if let Some((position, c)) = invisible::first_invisible(tax_num) {
        return Err(Rejection::new("tax_num", invisible::describe(c, position)));
    }
    let len = tax_num.chars().count();
    if !(15..=20).contains(&len) {
        return Err(Rejection::new(
            "tax_num",
            format!("{tax_num:?} has {len} characters; a tax number has 15 to 20"),
        ));
    }
    if let Some(c) = tax_num
        .chars()
        .find(|c| !(c.is_ascii_digit() || c.is_ascii_uppercase()))
    {
        return Err(Rejection::new(
            "tax_num",
            format!("{tax_num:?} contains {c:?}; only digits and capital letters are allowed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAX: &str = "91310117568051222X";

    #[test]
    fn accepts_normal_rows() {
        assert_eq!(check("20240122150518179381", TAX), Ok(()));
        assert_eq!(check("订单-001&x=1+2", "123456789012345"), Ok(()));
    }

    #[test]
    fn rejects_bad_orderno_naming_the_field() {
        for (orderno, want) in [
            ("", "empty"),
            ("a b", "whitespace"),
            ("a\u{7}", "control"),
            ("a\n", "whitespace"),
        ] {
            let err = check(orderno, TAX).unwrap_err();
            assert_eq!(err.field, "orderno");
            assert!(err.reason.contains(want), "{err}");
        }
        let long = "x".repeat(65);
        assert!(check(&long, TAX)
            .unwrap_err()
            .reason
            .contains("65 characters"));
        assert_eq!(check(&"x".repeat(64), TAX), Ok(()));
    }

    #[test]
    fn invisible_characters_are_refused_naming_the_code_point() {
        let err = check("A2024\u{202E}001", TAX).unwrap_err();
        assert_eq!(err.field, "orderno");
        assert!(err.reason.contains("U+202E"), "{err}");
        assert!(
            !err.reason.contains('\u{202E}'),
            "the character itself is not quoted"
        );
        let err = check("A1", "9131011756805\u{200F}1222X").unwrap_err();
        assert_eq!(err.field, "tax_num");
        assert!(err.reason.contains("U+200F"), "{err}");
        let err = check("A\u{E000}", TAX).unwrap_err();
        assert!(err.reason.contains("private-use"), "{err}");
    }

    #[test]
    fn rejects_bad_tax_numbers() {
        for bad in [
            "12345",
            "123456789012345678901",
            "91310117568051222x",
            "9131011756805122-X",
            "９１３１０１１７５６８０５１２２２",
        ] {
            let err = check("o1", bad).unwrap_err();
            assert_eq!(err.field, "tax_num", "{bad}");
        }
        for good in ["123456789012345", "12345678901234567890", TAX] {
            assert_eq!(check_tax_num(good), Ok(()));
        }
    }
}
