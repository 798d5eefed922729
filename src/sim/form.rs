//! `application/x-www-form-urlencoded` decoding exactly as a Java servlet container does it.
//!
//! Both simulated servers read their parameters this way: the raw text is split on `&`,
//! each piece at its first `=`, a raw `+` becomes a space, then `%XX` escapes are turned
//! into bytes and the bytes are read as UTF-8. A client that forgot to percent-encode a
//! `+` in Base64 data therefore gets a space back, just as it would from the real server.

/// Why a form could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes of a name or value are not UTF-8.
    NotUtf8,
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormError::BadEscape => f.write_str("malformed %XX escape"),
            FormError::NotUtf8 => f.write_str("not UTF-8 after %XX decoding"),
        }
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one name or value: `+` → space, `%XX` → byte, then UTF-8.
pub(crate) fn decode_component(raw: &[u8]) -> Result<String, FormError> {
    if !raw.iter().any(|&b| b == b'+' || b == b'%') {
        return std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| FormError::NotUtf8);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = raw.get(i + 1).copied().and_then(hex_val);
                let lo = raw.get(i + 2).copied().and_then(hex_val);
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push(h * 16 + l),
                    _ => return Err(FormError::BadEscape),
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

/// Splits and decodes a whole form / query string into `(name, value)` pairs, in order,
/// duplicates kept. Empty pieces (`a=1&&b=2`) are skipped, as servlet containers do.
pub(crate) fn parse(raw: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let mut pairs = Vec::new();
    for piece in raw.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        let (name, value) = match piece.iter().position(|&b| b == b'=') {
            Some(eq) => (&piece[..eq], &piece[eq + 1..]),
            None => (piece, &piece[piece.len()..]),
        };
        pairs.push((decode_component(name)?, decode_component(value)?));
    }
    Ok(pairs)
}

/// The first value of `name` (what `ServletRequest.getParameter` returns).
pub(crate) fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_is_space_and_escapes_decode() {
        let p = parse(b"a=x+y&b=%2B%2F%3D&c=%E4%B8%AD&d&&e=").expect("decodes");
        assert_eq!(
            p,
            vec![
                ("a".into(), "x y".into()),
                ("b".into(), "+/=".into()),
                ("c".into(), "中".into()),
                ("d".into(), "".into()),
                ("e".into(), "".into()),
            ]
        );
    }

    #[test]
    fn value_keeps_later_equals_signs() {
        let p = parse(b"data=abc==").expect("decodes");
        assert_eq!(first(&p, "data"), Some("abc=="));
    }

    #[test]
    fn bad_escapes_and_bad_utf8_are_errors() {
        assert_eq!(parse(b"a=%zz"), Err(FormError::BadEscape));
        assert_eq!(parse(b"a=%4"), Err(FormError::BadEscape));
        assert_eq!(parse(b"a=%ff"), Err(FormError::NotUtf8));
        assert_eq!(parse(b"a=\xff"), Err(FormError::NotUtf8));
    }
}
