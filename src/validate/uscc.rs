//! The GB 32100-2015 check digit of an 18-character Unified Social Credit Code (统一社会信用代码).
//!
//! Every real USCC passes this check, so a buyer tax id that fails it was mistyped; the title
//! validator rejects it unless `[title] lenient_tax_id` is set (sandbox tax numbers fail it).

/// The code's alphabet in value order: digits, then capital letters without I, O, Z, S, V
/// (they are too easily confused with 1, 0, 2, 5, U).
const ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// Weight of each of the first 17 positions: 3^i mod 31.
const WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// The value (0..=30) of one code character, or `None` outside the alphabet.
fn value(c: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u32)
}

/// True when `code` is 18 characters of the USCC alphabet whose last character is the
/// GB 32100-2015 check digit of the first 17.
///
/// The check digit is `31 - (Σ value·weight mod 31)`, with 31 written as `0`.
pub fn uscc_check_digit_ok(code: &str) -> bool {
    let bytes = code.as_bytes();
    if bytes.len() != 18 {
        return false;
    }
    let mut sum = 0u32;
    for (&c, &w) in bytes[..17].iter().zip(WEIGHTS.iter()) {
        match value(c) {
            Some(v) => sum += v * w,
            None => return false,
        }
    }
    let expected = (31 - sum % 31) % 31;
    value(bytes[17]) == Some(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        assert!(uscc_check_digit_ok("91110000600037341L"));
        assert!(uscc_check_digit_ok("9144030071526726XG"));
        assert!(uscc_check_digit_ok("91310115MA1K3BTP2B"));
        assert!(!uscc_check_digit_ok("91110000600037341N"));
    }

    #[test]
    fn every_wrong_check_digit_fails() {
        let base = "91110000600037341";
        let good = ALPHABET
            .iter()
            .filter(|&&c| uscc_check_digit_ok(&format!("{base}{}", c as char)))
            .count();
        assert_eq!(good, 1);
    }

    #[test]
    fn wrong_length_and_charset_fail() {
        assert!(!uscc_check_digit_ok(""));
        assert!(!uscc_check_digit_ok("91110000600037341"));
        assert!(!uscc_check_digit_ok("91110000600037341LL"));
        // lower case and letters outside the alphabet
        assert!(!uscc_check_digit_ok("91110000600037341l"));
        assert!(!uscc_check_digit_ok("9111000060003734IL"));
        // multi-byte characters must not be mistaken for 18 characters
        assert!(!uscc_check_digit_ok("九1110000600037341"));
    }

    #[test]
    fn check_value_31_is_written_as_zero() {
        // Find a 17-character prefix whose weighted sum is a multiple of 31: its check is 0.
        let prefix = "00000000000000000";
        assert!(uscc_check_digit_ok(&format!("{prefix}0")));
    }
}
