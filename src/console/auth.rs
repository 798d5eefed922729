//! Who may act in the console: one login token (`[http] console_token`), cookie sessions
//! (HttpOnly, SameSite=Strict) and a CSRF token per session that every action form carries.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::Secret;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "iw_session";

/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Most sessions kept at once; the oldest goes first.
const MAX_SESSIONS: usize = 64;

/// One logged-in browser.
#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    expires: Instant,
}

/// Why an action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `console_token` is configured: the console only shows.
    #[error("the console is read-only: set [http] console_token to allow actions")]
    ReadOnly,
    /// No valid session cookie.
    #[error("log in first")]
    NotLoggedIn,
    /// The form's CSRF token does not belong to the session.
    #[error("the form is stale or was not sent by this console (CSRF token mismatch); reload and try again")]
    BadCsrf,
    /// The login token was wrong.
    #[error("wrong token")]
    WrongToken,
    /// Too many login attempts.
    #[error("too many login attempts; wait a moment")]
    TooManyAttempts,
}

/// The login token and the sessions it opened.
pub struct Gate {
    token: Option<Secret>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Login attempts per client address: one guesser cannot lock out everyone else.
    logins: DefaultKeyedRateLimiter<std::net::IpAddr>,
}

/// 32 random bytes as hex.
fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The token as a MAC key applied to a fixed message: comparing two of these compares the
/// tokens in constant time without keeping either around in the clear twice.
fn login_mac(token: &str) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).ok()?;
    mac.update(b"invoice-worker console login");
    Some(mac)
}

impl Gate {
    /// A gate for `token` (none = read-only console).
    pub fn new(token: Option<Secret>) -> Gate {
        let per_second = NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN);
        Gate {
            token,
            sessions: Mutex::new(HashMap::new()),
            logins: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Whether actions are possible at all.
    pub fn actions_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks `candidate`, sent from `client`, against the token; on success opens a
    /// session and returns its cookie value.
    pub fn login(&self, client: std::net::IpAddr, candidate: &str) -> Result<String, Refusal> {
        let Some(token) = &self.token else {
            return Err(Refusal::ReadOnly);
        };
        if self.logins.len() > 4096 {
            self.logins.retain_recent();
        }
        if self.logins.check_key(&client).is_err() {
            return Err(Refusal::TooManyAttempts);
        }
        let expected = login_mac(token.expose()).map(|m| m.finalize().into_bytes());
        let given = login_mac(candidate);
        let matches = match (expected, given) {
            (Some(expected), Some(given)) => given.verify_slice(&expected).is_ok(),
            _ => false,
        };
        if !matches {
            tracing::warn!(%client, "console login refused: wrong token");
            return Err(Refusal::WrongToken);
        }
        let id = random_hex();
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: random_hex(),
                expires: now + SESSION_TTL,
            },
        );
        tracing::info!(%client, "console login");
        Ok(id)
    }

    /// Ends the session `cookie` names, if any.
    pub fn logout(&self, cookie: Option<&str>) {
        if let Some(id) = cookie {
            self.lock().remove(id);
        }
    }

    /// The CSRF token of the live session `cookie` names: `Some` = logged in.
    pub fn csrf_of(&self, cookie: Option<&str>) -> Option<String> {
        let id = cookie?;
        let sessions = self.lock();
        sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    /// Whether an action with session `cookie` and form token `csrf` may go ahead.
    pub fn authorize(&self, cookie: Option<&str>, csrf: &str) -> Result<(), Refusal> {
        if self.token.is_none() {
            return Err(Refusal::ReadOnly);
        }
        let expected = self.csrf_of(cookie).ok_or(Refusal::NotLoggedIn)?;
        // Both are random and of one length; compared through a MAC all the same.
        let same = login_mac(&expected)
            .zip(login_mac(csrf))
            .is_some_and(|(a, b)| b.verify_slice(&a.finalize().into_bytes()).is_ok());
        if same {
            Ok(())
        } else {
            Err(Refusal::BadCsrf)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        match self.sessions.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "correct-horse-battery-staple";
    const HERE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const THERE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    #[test]
    fn only_the_token_opens_a_session_and_only_its_csrf_authorizes() {
        let gate = Gate::new(Some(Secret::new(TOKEN.to_string())));
        assert_eq!(gate.login(HERE, "wrong"), Err(Refusal::WrongToken));
        assert_eq!(gate.login(HERE, ""), Err(Refusal::WrongToken));
        let session = gate.login(HERE, TOKEN).expect("login");
        let csrf = gate.csrf_of(Some(&session)).expect("logged in");
        assert_eq!(gate.authorize(Some(&session), &csrf), Ok(()));
        assert_eq!(
            gate.authorize(Some(&session), "forged"),
            Err(Refusal::BadCsrf)
        );
        assert_eq!(gate.authorize(None, &csrf), Err(Refusal::NotLoggedIn));
        assert_eq!(
            gate.authorize(Some("made-up-session"), &csrf),
            Err(Refusal::NotLoggedIn)
        );
        gate.logout(Some(&session));
        assert_eq!(
            gate.authorize(Some(&session), &csrf),
            Err(Refusal::NotLoggedIn)
        );
    }

    #[test]
    fn without_a_token_nothing_is_allowed() {
        let gate = Gate::new(None);
        assert!(!gate.actions_enabled());
        assert_eq!(gate.login(HERE, TOKEN), Err(Refusal::ReadOnly));
        assert_eq!(gate.authorize(None, "x"), Err(Refusal::ReadOnly));
    }

    #[test]
    fn guessing_is_rate_limited() {
        let gate = Gate::new(Some(Secret::new(TOKEN.to_string())));
        let refusals: Vec<Refusal> = (0..40)
            .filter_map(|_| gate.login(THERE, "guess").err())
            .collect();
        assert!(refusals.contains(&Refusal::TooManyAttempts), "{refusals:?}");
        // Another client is not locked out by the guesser.
        assert!(gate.login(HERE, TOKEN).is_ok());
    }
}
