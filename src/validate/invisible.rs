//! Characters that print as nothing, or as something else: format characters (Unicode
//! category Cf: U+202E RIGHT-TO-LEFT OVERRIDE, U+200F, zero-width spaces, …) and private-use
//! characters (Co). In an order or tax number they make two different values look alike on
//! a screen, in the platform's console and in a log line, so identifiers refuse them and log
//! lines show them escaped.

use std::borrow::Cow;

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Whether `c` is a format (Cf) or private-use (Co) character.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Format | GeneralCategory::PrivateUse
    )
}

/// The first invisible character of `value` and its 1-based position.
pub fn first_invisible(value: &str) -> Option<(usize, char)> {
    value
        .chars()
        .enumerate()
        .find(|&(_, c)| is_invisible(c))
        .map(|(i, c)| (i + 1, c))
}

/// What a rejection says about an invisible character: its code point and position.
pub fn describe(c: char, position: usize) -> String {
    let kind = match c.general_category() {
        GeneralCategory::PrivateUse => "a private-use character",
        _ => "an invisible format character",
    };
    format!(
        "contains U+{:04X} ({kind}) at position {position}",
        c as u32
    )
}

/// `text` with control, format and private-use characters written as `\u{…}`, for log lines:
/// an RLO in an order number must not turn the rest of a log line around.
pub fn escape_for_log(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || is_invisible(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() || is_invisible(c) {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_private_use_characters_are_found_with_their_position() {
        assert_eq!(first_invisible("A1\u{202E}2"), Some((3, '\u{202E}')));
        assert_eq!(first_invisible("\u{200F}x"), Some((1, '\u{200F}')));
        assert_eq!(first_invisible("x\u{FEFF}"), Some((2, '\u{FEFF}')));
        assert_eq!(first_invisible("x\u{E000}"), Some((2, '\u{E000}')));
        assert_eq!(first_invisible("订单-001&x=1+2"), None);
        assert!(describe('\u{202E}', 3).contains("U+202E"));
        assert!(describe('\u{E000}', 1).contains("private-use"));
    }

    #[test]
    fn log_text_escapes_what_would_reorder_or_hide_text() {
        assert_eq!(escape_for_log("plain 订单"), "plain 订单");
        assert_eq!(escape_for_log("A\u{202E}B"), "A\\u{202e}B");
        assert_eq!(escape_for_log("a\nb"), "a\\u{000a}b");
    }
}
