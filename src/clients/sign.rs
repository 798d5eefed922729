//! The fw199 gateway signature (`Utils.Sign` of the gateway's SDK).

use md5::{Digest, Md5};

/// Signs a request the way the fw199 gateway checks it: every field except `sign`
/// (empty values included), sorted by key, concatenated as `key + value` without
/// separators, wrapped as `secret + … + secret`, MD5 of the UTF-8 bytes, lowercase hex.
pub fn sign<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>, secret: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = fields.into_iter().filter(|(k, _)| *k != "sign").collect();
    // The SDK sorts Java Strings (UTF-16 order); for the ASCII keys used here that equals
    // byte order, which is what `str`'s Ord gives.
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Md5::new();
    hasher.update(secret.as_bytes());
    for (key, value) in pairs {
        hasher.update(key.as_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.update(secret.as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_spec_vector() {
        let fields = [
            ("appid", "A1"),
            ("timestamp", "1700000000"),
            ("tax_num", "91310117568051222X"),
            ("request_data", r#"{"orderno": "订单-001 & x=1+2"}"#),
        ];
        assert_eq!(sign(fields, "S3cr3t!"), "e9bffb8a29e2b269660e9022dcfff51a");
    }

    #[test]
    fn field_order_does_not_matter_and_sign_is_ignored() {
        let a = sign([("b", "2"), ("a", "1")], "k");
        let b = sign([("a", "1"), ("sign", "whatever"), ("b", "2")], "k");
        assert_eq!(a, b);
    }

    #[test]
    fn equals_md5_of_the_concatenation() {
        // secret + "a1" + "b" (empty value kept) + "c中文" + secret
        let expected = hex::encode(Md5::digest("kka1bc中文kk".as_bytes()));
        assert_eq!(sign([("c", "中文"), ("b", ""), ("a", "1")], "kk"), expected);
        assert_eq!(expected.len(), 32);
    }

    #[test]
    fn empty_values_change_the_signature() {
        assert_ne!(sign([("a", "1")], "k"), sign([("a", "1"), ("b", "")], "k"));
    }
}
