//! The FPTT1001 (发票抬头发送) client: sends one buyer title to 开票精灵 and returns the
//! platform's answer as a [`TitleReply`], or why there is none ([`TitleError`]).
//!
//! Every parameter travels in the query string, as the platform's doc shows. The query is
//! built here, once, with Java `URLEncoder` encoding, so `data` (Base64 with `+`, `/`, `=`)
//! reaches the server exactly as the platform's Java decoder expects; nothing downstream
//! encodes it again.
//!
//! A refused token (HTTP 401, or a message about the token) is part of the protocol: the
//! client renews it once and resends within the same call. What an answer means for the
//! row is decided by `jobs::title::classify`. Nothing this client returns carries the
//! client secret, the token, `data` or the query string, and the buyer's phone and bank
//! account are masked, whatever the server echoed back.

use std::time::Duration;

use base64::Engine as _;
use url::Url;

use crate::clients::http::{self, build_client, excerpt, HttpReply, TransportError};
use crate::clients::title_payload::{encode_data, payload, url_encode, PayloadError};
use crate::clients::title_reply::{
    is_success, mentions_duplicate, mentions_token, parse_reply, Reply, ReplyError,
};
use crate::clients::token::{
    endpoint, scrub, with_query, Credentials, TokenCache, TokenError, TokenSettings,
};
use crate::config::DataType;
use crate::secret::Secret;
use crate::title_fields::{mask_account, mask_phone, TitleFields};

#[cfg(test)]
mod tests;

/// Everything the title client needs, resolved from `[title]`.
#[derive(Debug, Clone)]
pub struct TitleSettings {
    /// The platform's `https://IP:PORT/Entoauth` base URL.
    pub base_url: Url,
    /// OAuth client id (应用 ID).
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// A fixed openID; when set, OpenAction is never called.
    pub openid: Option<String>,
    /// The `busiType` parameter (`SQM_KPJL`).
    pub busi_type: String,
    /// How long a token and openID are used before renewing them.
    pub token_ttl: Duration,
    /// Whole-request timeout.
    pub timeout: Duration,
}

/// One title to send.
#[derive(Debug, Clone, Copy)]
pub struct TitleRequest<'a> {
    /// The row's fields (validated beforehand).
    pub fields: &'a TitleFields,
    /// The 开票精灵 authorisation code: the row's, or the configured default.
    pub sqm: &'a str,
    /// Payload format.
    pub data_type: DataType,
}

/// The platform's answer to one FPTT1001 call (after the one token renewal, if any),
/// already cleaned of secrets, tokens and `data`, with the buyer's phone and account masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TitleReply {
    /// The HTTP status.
    pub status: u16,
    /// `Retry-After`, when the server sent one we can read.
    pub retry_after: Option<Duration>,
    /// The parsed reply, or why the body could not be read.
    pub body: Result<Reply, Unreadable>,
}

/// A body that is not a reply (HTML, empty, wrong types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Why it could not be parsed.
    pub error: ReplyError,
    /// A short single-line excerpt of the (cleaned) body.
    pub excerpt: String,
}

impl TitleReply {
    /// Reads an answer body in any of the platform's shapes.
    pub fn read(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        TitleReply {
            status,
            retry_after,
            body: parse_reply(body).map_err(|error| Unreadable {
                error,
                excerpt: excerpt(body),
            }),
        }
    }
}

/// Why no [`TitleReply`] was had. Texts are cleaned like the reply's.
#[derive(Debug, thiserror::Error)]
pub enum TitleError {
    /// The payload could not be rendered; resending the same row cannot help.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// TokenAction or OpenAction refused the client credentials: a configuration error.
    #[error("{endpoint} refused client_id {client_id}: code {code}: {message}: check client_id/client_secret in [title]")]
    Refused {
        /// `TokenAction` or `OpenAction`.
        endpoint: &'static str,
        /// The client id that was refused.
        client_id: String,
        /// The reply code (or `HTTP 401` / `HTTP 403`).
        code: String,
        /// The reply message.
        message: String,
    },
    /// thirdApi could not be reached or its answer not read (timeout, reset, too large).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The token service is down or answered garbage; a later attempt may get a token.
    #[error("{0}")]
    TokenService(String),
}

/// The FPTT1001 client. Holds a connection pool and the token cache; share it behind an
/// `Arc` across jobs.
#[derive(Debug)]
pub struct TitleClient {
    http: reqwest::Client,
    api_url: Url,
    tokens: TokenCache,
    client_id: String,
    client_secret: Secret,
    busi_type: String,
}

/// True when an answer says the token was refused, so renewing it may help: HTTP 401, or
/// a non-success reply about the token (and not about a duplicate serial).
fn token_refused(http: &HttpReply) -> bool {
    if http.status == 401 {
        return true;
    }
    match parse_reply(&http.body) {
        Ok(reply) => {
            !is_success(&reply)
                && mentions_token(reply.detail())
                && !mentions_duplicate(reply.detail())
        }
        Err(_) => false,
    }
}

impl TitleClient {
    /// A client for `settings`; fails only if the TLS backend cannot be initialised.
    pub fn new(settings: TitleSettings) -> Result<Self, reqwest::Error> {
        let http = build_client(settings.timeout)?;
        let tokens = TokenCache::new(
            http.clone(),
            TokenSettings {
                base_url: settings.base_url.clone(),
                client_id: settings.client_id.clone(),
                client_secret: settings.client_secret.clone(),
                openid: settings.openid.clone(),
                token_ttl: settings.token_ttl,
            },
        );
        Ok(TitleClient {
            api_url: endpoint(&settings.base_url, "thirdApi"),
            http,
            tokens,
            client_id: settings.client_id,
            client_secret: settings.client_secret,
            busi_type: settings.busi_type,
        })
    }

    /// The token cache (for metrics and tests).
    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    /// The query string of one FPTT1001 call, every value encoded exactly once.
    fn query(&self, req: &TitleRequest<'_>, creds: &Credentials, data: &str) -> String {
        format!(
            "sign=FPTT1001&client_id={}&access_token={}&openID={}&sqm={}&busiType={}&data={}&dataType={}",
            url_encode(&self.client_id),
            url_encode(creds.access_token.expose()),
            url_encode(&creds.openid),
            url_encode(req.sqm),
            url_encode(&self.busi_type),
            data,
            req.data_type.code(),
        )
    }

    async fn post(
        &self,
        req: &TitleRequest<'_>,
        creds: &Credentials,
        data: &str,
    ) -> Result<HttpReply, TransportError> {
        let url = with_query(&self.api_url, &self.query(req, creds, data));
        // An explicit empty body gives `Content-Length: 0`, which Java containers expect
        // on a POST.
        http::send(self.http.post(url).body(Vec::<u8>::new())).await
    }

    /// Sends one title and reads the answer (a refused token is renewed and the title
    /// resent once first).
    pub async fn send(&self, req: &TitleRequest<'_>) -> Result<TitleReply, TitleError> {
        let body = payload(req.fields, req.data_type)?;
        let data = encode_data(&body);
        // Everything that must not reach a message even if a server echoes the request
        // back (error pages quoting the URL): `data` carries the buyer's phone and account.
        let mut clean = Cleaner {
            fields: req.fields,
            hide: vec![
                self.client_secret.expose().to_string(),
                url_encode(self.client_secret.expose()),
                base64::engine::general_purpose::STANDARD.encode(body.as_bytes()),
                data.clone(),
            ],
        };
        match self.exchange(req, &data, &mut clean).await {
            // Cleaned before it is parsed: an excerpt could otherwise cut a value in half
            // where the scrubber no longer recognises it.
            Ok(http) => {
                let text = String::from_utf8_lossy(&http.body);
                let cleaned = clean.text(&text);
                // Unchanged bodies are read as they came (not as lossy UTF-8).
                let body = if cleaned == text {
                    &http.body[..]
                } else {
                    cleaned.as_bytes()
                };
                Ok(TitleReply::read(http.status, http.retry_after, body))
            }
            Err(error) => Err(clean.error(error)),
        }
    }

    /// Gets a token, posts, and on a refused token renews it and posts once more. Every
    /// token used is added to `clean`.
    async fn exchange(
        &self,
        req: &TitleRequest<'_>,
        data: &str,
        clean: &mut Cleaner<'_>,
    ) -> Result<HttpReply, TitleError> {
        let creds = self.tokens.get().await.map_err(|e| self.token_error(e))?;
        clean.hide_token(&creds.access_token);
        let first = self.post(req, &creds, data).await?;
        if !token_refused(&first) {
            return Ok(first);
        }
        tracing::info!(
            http_status = first.status,
            "title: access token refused; renewing it and resending once"
        );
        self.tokens.invalidate(&creds.access_token);
        let renewed = self.tokens.get().await.map_err(|e| self.token_error(e))?;
        clean.hide_token(&renewed.access_token);
        Ok(self.post(req, &renewed, data).await?)
    }

    /// A token that could not be had: refused credentials, or a token service in trouble.
    fn token_error(&self, error: TokenError) -> TitleError {
        match error {
            TokenError::Refused {
                endpoint,
                code,
                message,
            } => TitleError::Refused {
                endpoint,
                client_id: self.client_id.clone(),
                code,
                message,
            },
            TokenError::Transient(text) => TitleError::TokenService(text),
        }
    }
}

/// Cleans what the client returns: the values in `hide` become `***` and the buyer's
/// phone and bank account are masked.
struct Cleaner<'a> {
    fields: &'a TitleFields,
    hide: Vec<String>,
}

impl Cleaner<'_> {
    /// Adds a token, raw and URL-encoded, to the values to hide.
    fn hide_token(&mut self, token: &Secret) {
        self.hide.push(token.expose().to_string());
        self.hide.push(url_encode(token.expose()));
    }

    /// `text` without the hidden values, with the phone and account masked.
    fn text(&self, text: &str) -> String {
        let hide: Vec<&str> = self.hide.iter().map(String::as_str).collect();
        let mut text = scrub(text, &hide);
        // Very short values would mask unrelated text and reveal next to nothing.
        let long_enough = |v: &&str| v.chars().count() >= 3;
        if let Some(phone) = self.fields.gmf_dh.as_deref().filter(long_enough) {
            text = text.replace(phone, &mask_phone(phone));
        }
        if let Some(account) = self.fields.gmf_yhzh.as_deref().filter(long_enough) {
            text = text.replace(account, &mask_account(account));
        }
        text
    }

    /// The error with every text it carries cleaned. A payload error holds no field value
    /// (serde_json and quick-xml name no values), so it passes unchanged.
    fn error(&self, error: TitleError) -> TitleError {
        match error {
            TitleError::Payload(e) => TitleError::Payload(e),
            TitleError::Refused {
                endpoint,
                client_id,
                code,
                message,
            } => TitleError::Refused {
                endpoint,
                client_id: self.text(&client_id),
                code: self.text(&code),
                message: self.text(&message),
            },
            TitleError::Transport(e) => TitleError::Transport(e.map_text(|t| self.text(t))),
            TitleError::TokenService(text) => TitleError::TokenService(self.text(&text)),
        }
    }
}
