//! The access token and openID that every FPTT1001 call needs, fetched from the platform's
//! TokenAction and OpenAction services and cached.
//!
//! The platform does not document how long a token lives, so the cache renews after a
//! configured `token_ttl` and whenever a call is refused for token reasons. Renewal is
//! single-flight: however many jobs find the token stale at once, one fetch runs and the
//! others wait for its result (success or failure), so a burst of 401s cannot turn into a
//! burst of TokenAction calls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use url::Url;

use crate::clients::http::{self, excerpt, TransportError};
use crate::clients::title_payload::url_encode;
use crate::clients::title_reply::{parse_openid, parse_token, ReplyError};
use crate::secret::Secret;

/// A token and openID pair, with when it was fetched.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The access token for the `access_token` query parameter.
    pub access_token: Secret,
    /// The openID for the `openID` query parameter (fixed in config or from OpenAction).
    pub openid: String,
    /// When the token was fetched; it is renewed `token_ttl` later.
    pub fetched_at: Instant,
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The platform refused the client credentials (or the fresh token, at OpenAction):
    /// a configuration error. The caller pauses the queue rather than burn attempts.
    #[error("{endpoint} refused the client credentials: code {code}: {message}")]
    Refused {
        /// `TokenAction` or `OpenAction`.
        endpoint: &'static str,
        /// The reply code (or `HTTP 401` / `HTTP 403`).
        code: String,
        /// The reply message, with the secret and token scrubbed out.
        message: String,
    },
    /// Network trouble, a 5xx, an unreadable answer: try again later.
    #[error("token renewal failed: {0}")]
    Transient(String),
}

/// Replaces every occurrence of each non-empty `secret` in `text` with `***`, so a server
/// that echoes a credential back cannot get it into a message or log line.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        // A server that echoes its request line shows the values URL-encoded.
        let encoded = crate::clients::title_payload::url_encode(secret);
        for form in [secret.to_string(), encoded] {
            if out.contains(&form) {
                out = out.replace(&form, "***");
            }
        }
    }
    out
}

/// Words in a refusal that point at a passing fault on the platform rather than at the
/// credentials; such refusals are retried instead of pausing the queue.
const TRANSIENT_HINTS: &[&str] = &["繁忙", "超时", "系统异常", "稍后", "busy", "timeout"];

/// How long a refusal of the client credentials is reused before TokenAction is asked again.
const REFUSED_HOLD: Duration = Duration::from_secs(10);

/// How long a transient renewal failure is reused before TokenAction is asked again.
const TRANSIENT_HOLD: Duration = Duration::from_secs(1);

/// Settings of a [`TokenCache`].
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// The `…/Entoauth` base URL.
    pub base_url: Url,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// A fixed openID; when set, OpenAction is never called.
    pub openid: Option<String>,
    /// How long a token and openID are used before renewing them.
    pub token_ttl: Duration,
}

/// The last renewal failure, so that jobs that waited for a failing fetch share its result
/// instead of each trying again in turn.
#[derive(Debug, Clone)]
struct Failure {
    at: Instant,
    error: TokenError,
}

/// Cached access token and openID with single-flight renewal. Share it behind an `Arc`
/// (the [`crate::clients::title::TitleClient`] owns one).
#[derive(Debug)]
pub struct TokenCache {
    http: reqwest::Client,
    token_url: Url,
    open_url: Url,
    settings: TokenSettings,
    /// The current credentials; `None` before the first fetch and after an invalidation.
    current: StdMutex<Option<Arc<Credentials>>>,
    /// Held across a fetch, so only one runs at a time.
    renewing: tokio::sync::Mutex<Option<Failure>>,
    /// TokenAction calls made, for tests and metrics.
    fetches: AtomicU64,
}

/// `{base}/{name}` without the base's query or fragment, tolerating a trailing `/`.
pub(crate) fn endpoint(base: &Url, name: &str) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    // http(s) URLs can always be a base; config refuses other schemes.
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().push(name);
    }
    url
}

/// `url` with `query` as its query string, which must already be percent-encoded.
pub(crate) fn with_query(url: &Url, query: &str) -> Url {
    let mut url = url.clone();
    // set_query leaves `%XX` and the characters url_encode emits unchanged, so nothing is
    // encoded twice (tested in title.rs against what the server receives).
    url.set_query(Some(query));
    url
}

impl TokenCache {
    /// A cache fetching through `http` (share the title client's connection pool).
    pub fn new(http: reqwest::Client, settings: TokenSettings) -> Self {
        TokenCache {
            token_url: endpoint(&settings.base_url, "TokenAction"),
            open_url: endpoint(&settings.base_url, "OpenAction"),
            http,
            settings,
            current: StdMutex::new(None),
            renewing: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        }
    }

    /// How many times TokenAction has been called.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The cached credentials while younger than `token_ttl`.
    fn fresh(&self) -> Option<Arc<Credentials>> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|c| c.fetched_at.elapsed() < self.settings.token_ttl)
            .cloned()
    }

    /// Credentials younger than `token_ttl`, renewing them first if needed. When several
    /// callers need a renewal at once, one fetch runs and all get its result.
    pub async fn get(&self) -> Result<Arc<Credentials>, TokenError> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let waiting_since = Instant::now();
        let mut last_failure = self.renewing.lock().await;
        // Someone else may have renewed (or failed to) while we waited for the lock.
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        if let Some(failure) = last_failure.as_ref() {
            // Jobs that queued behind a failing fetch share its result, and a fresh
            // failure is reused for a moment, so a refused client_id costs one TokenAction
            // call per hold rather than one per job.
            let hold = match failure.error {
                TokenError::Refused { .. } => REFUSED_HOLD,
                TokenError::Transient(_) => TRANSIENT_HOLD,
            };
            if failure.at >= waiting_since || failure.at.elapsed() < hold {
                return Err(failure.error.clone());
            }
        }
        match self.fetch().await {
            Ok(creds) => {
                let creds = Arc::new(creds);
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(creds.clone());
                *last_failure = None;
                tracing::info!(
                    client_id = %self.settings.client_id,
                    "title: access token renewed"
                );
                Ok(creds)
            }
            Err(error) => {
                *last_failure = Some(Failure {
                    at: Instant::now(),
                    error: error.clone(),
                });
                Err(error)
            }
        }
    }

    /// Marks the credentials stale after the platform refused `seen_token`, unless they
    /// were already replaced: of N calls refused with the same token, the first
    /// invalidation forces one renewal and the rest find the new token.
    pub fn invalidate(&self, seen_token: &Secret) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current
            .as_ref()
            .is_some_and(|c| c.access_token == *seen_token)
        {
            *current = None;
        }
    }

    /// Calls TokenAction and, unless an openID is configured, OpenAction.
    async fn fetch(&self) -> Result<Credentials, TokenError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let s = &self.settings;
        let query = format!(
            "sign=token&client_id={}&client_secret={}",
            url_encode(&s.client_id),
            url_encode(s.client_secret.expose()),
        );
        let fetched_at = Instant::now();
        let body = self
            .call("TokenAction", with_query(&self.token_url, &query), &[])
            .await?;
        let token = parse_token(&body).map_err(|e| self.reply_error("TokenAction", e, &[]))?;
        let token = Secret::new(token);
        let openid = match &s.openid {
            Some(fixed) => fixed.clone(),
            None => {
                let query = format!(
                    "sign=open&client_id={}&access_token={}",
                    url_encode(&s.client_id),
                    url_encode(token.expose()),
                );
                let hide = [token.expose()];
                let body = self
                    .call("OpenAction", with_query(&self.open_url, &query), &hide)
                    .await?;
                parse_openid(&body).map_err(|e| self.reply_error("OpenAction", e, &hide))?
            }
        };
        Ok(Credentials {
            access_token: token,
            openid,
            fetched_at,
        })
    }

    /// GETs `url` and returns the body of an answer that may hold a reply; 401/403 are
    /// refusals, other failures transient.
    async fn call(
        &self,
        endpoint: &'static str,
        url: Url,
        hide: &[&str],
    ) -> Result<bytes::Bytes, TokenError> {
        let reply = http::send(self.http.get(url))
            .await
            .map_err(|e: TransportError| {
                TokenError::Transient(self.clean(&format!("{endpoint}: {e}"), hide))
            })?;
        // Scrub before cutting the excerpt, so a secret split by the cut cannot leak a prefix.
        let shown = || {
            excerpt(
                self.clean(&String::from_utf8_lossy(&reply.body), hide)
                    .as_bytes(),
            )
        };
        match reply.status {
            200..=299 => Ok(reply.body),
            401 | 403 => Err(TokenError::Refused {
                endpoint,
                code: format!("HTTP {}", reply.status),
                message: shown(),
            }),
            // A 4xx other than 401/403 may still carry a readable refusal; let the parser
            // decide. 5xx and the rest are the platform's trouble.
            400..=499 => Ok(reply.body),
            status => Err(TokenError::Transient(format!(
                "{endpoint}: HTTP {status}: {}",
                shown()
            ))),
        }
    }

    /// Turns a parse failure into a refusal (the platform said no) or a transient error.
    fn reply_error(&self, endpoint: &'static str, error: ReplyError, hide: &[&str]) -> TokenError {
        match error {
            ReplyError::Refused { code, message } => {
                let message = self.clean(&message, hide);
                let lower = message.to_lowercase();
                if TRANSIENT_HINTS.iter().any(|h| lower.contains(h)) {
                    TokenError::Transient(format!("{endpoint}: code {code}: {message}"))
                } else {
                    TokenError::Refused {
                        endpoint,
                        code,
                        message,
                    }
                }
            }
            other => TokenError::Transient(self.clean(&format!("{endpoint}: {other}"), hide)),
        }
    }

    /// Scrubs the client secret and any `hide` values from a message.
    fn clean(&self, text: &str, hide: &[&str]) -> String {
        let mut secrets = vec![self.settings.client_secret.expose()];
        secrets.extend_from_slice(hide);
        scrub(text, &secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_handles_trailing_slash_and_query() {
        let base = Url::parse("https://10.0.0.1:8443/Entoauth").expect("url");
        assert_eq!(
            endpoint(&base, "TokenAction").as_str(),
            "https://10.0.0.1:8443/Entoauth/TokenAction"
        );
        let base = Url::parse("https://10.0.0.1:8443/Entoauth/?x=1#f").expect("url");
        assert_eq!(
            endpoint(&base, "thirdApi").as_str(),
            "https://10.0.0.1:8443/Entoauth/thirdApi"
        );
    }

    #[test]
    fn with_query_keeps_encoded_text() {
        let base = Url::parse("http://127.0.0.1:1/Entoauth/thirdApi").expect("url");
        let q = "a=%2B%2F%3D&b=x.y-z*_&c=%E6%8E%88";
        assert_eq!(with_query(&base, q).query(), Some(q));
    }

    #[test]
    fn scrub_hides_every_secret() {
        assert_eq!(
            scrub("bad secret s3cr3t for tok s3cr3t", &["s3cr3t", "", "tok"]),
            "bad secret *** for *** ***"
        );
        assert_eq!(
            scrub("GET /TokenAction?client_secret=a%2Bb%3D%3D", &["a+b=="]),
            "GET /TokenAction?client_secret=***"
        );
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_token_it_names() {
        let cache = TokenCache::new(
            reqwest::Client::new(),
            TokenSettings {
                base_url: Url::parse("http://127.0.0.1:9/Entoauth").expect("url"),
                client_id: "c".into(),
                client_secret: Secret::new("s"),
                openid: Some("o".into()),
                token_ttl: Duration::from_secs(60),
            },
        );
        *cache.current.lock().expect("lock") = Some(Arc::new(Credentials {
            access_token: Secret::new("new"),
            openid: "o".into(),
            fetched_at: Instant::now(),
        }));
        cache.invalidate(&Secret::new("old"));
        assert!(cache.fresh().is_some());
        cache.invalidate(&Secret::new("new"));
        assert!(cache.fresh().is_none());
    }
}
