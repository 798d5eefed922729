//! What both remote clients share: a rustls HTTP client, a capped body reader, `Retry-After`
//! parsing and error texts that never carry a URL (title URLs hold the access token).

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// Largest answer body the worker reads; anything longer is treated as garbage.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// An HTTP answer, read in full (up to [`MAX_BODY_BYTES`]).
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Bytes,
    /// `Retry-After`, when the server sent one we can read.
    pub retry_after: Option<Duration>,
}

/// Why no answer could be read. The text never contains the request URL or its query.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// Timed out (connect or whole request).
    #[error("timed out: {0}")]
    Timeout(String),
    /// Connection refused, reset, TLS failure and the like.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The body was larger than [`MAX_BODY_BYTES`].
    #[error("answer body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// Anything else reqwest reports.
    #[error("request failed: {0}")]
    Other(String),
}

impl TransportError {
    /// The same error with its text passed through `f` (a client scrubbing what it must
    /// not repeat).
    pub fn map_text(self, f: impl Fn(&str) -> String) -> Self {
        match self {
            TransportError::Timeout(t) => TransportError::Timeout(f(&t)),
            TransportError::Connect(t) => TransportError::Connect(f(&t)),
            TransportError::TooLarge => TransportError::TooLarge,
            TransportError::Other(t) => TransportError::Other(f(&t)),
        }
    }
}

/// Builds the HTTP client a remote API uses: rustls with certificate verification,
/// a whole-request timeout, no redirects (a redirect from a payment gateway is a fault).
pub fn build_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .user_agent(concat!("invoice-worker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends a request and reads its answer, refusing bodies over [`MAX_BODY_BYTES`].
pub async fn send(request: reqwest::RequestBuilder) -> Result<HttpReply, TransportError> {
    let mut response = request.send().await.map_err(describe)?;
    let status = response.status().as_u16();
    let retry_after = parse_retry_after(response.headers());
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(TransportError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(TransportError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpReply {
        status,
        body: Bytes::from(body),
        retry_after,
    })
}

/// Turns a reqwest error into a URL-free description.
fn describe(error: reqwest::Error) -> TransportError {
    let timeout = error.is_timeout();
    let connect = error.is_connect();
    // without_url: the title API carries access_token in its query string.
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if timeout {
        TransportError::Timeout(text)
    } else if connect {
        TransportError::Connect(text)
    } else {
        TransportError::Other(text)
    }
}

/// Reads `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_parse(value)?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn httpdate_parse(value: &str) -> Option<std::time::SystemTime> {
    chrono::DateTime::parse_from_rfc2822(value).ok().map(|dt| {
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(dt.timestamp().max(0) as u64)
    })
}

/// A short, single-line excerpt of a body for `last_message` (bodies may be HTML pages).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(120).collect();
    if flat.chars().count() > 120 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(120)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("later"));
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn excerpt_flattens_and_truncates() {
        let html = format!("<html>\n<body>{}</body></html>", "x".repeat(500));
        let e = excerpt(html.as_bytes());
        assert!(!e.contains('\n'));
        assert!(e.chars().count() <= 121);
    }
}
