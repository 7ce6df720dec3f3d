//! `TokenSet`: what a grant request yields and what the daemon keeps, serves and writes out.
//! Times are Unix milliseconds of the wall clock, the unit the store and the API use too.

use crate::secret::Secret;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A Unix-millisecond time for people: UTC, RFC 3339, to the second.
pub fn show_time(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A token type as kept in memory: the usual `Bearer` is not allocated for each client.
pub fn token_type(read: String) -> Cow<'static, str> {
    if read == "Bearer" {
        Cow::Borrowed("Bearer")
    } else {
        Cow::Owned(read)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenSet {
    pub access_token: Secret,
    /// As the server wrote it, except `bearer` normalised to `Bearer`; `Bearer` is one
    /// static string for every client (`token_type`).
    pub token_type: Cow<'static, str>,
    pub refresh_token: Option<Secret>,
    pub id_token: Option<Secret>,
    /// Space-separated granted scopes, when the server said.
    pub scope: Option<String>,
    /// When the access token expires; `None`: the server gave no lifetime.
    pub expires_at: Option<i64>,
    /// When the refresh token expires, when the server said.
    pub refresh_expires_at: Option<i64>,
    pub obtained_at: i64,
    /// When the user authorized the grant this token descends from: a refresh token's
    /// absolute lifetime (LinkedIn 365 days) counts from here.
    pub granted_at: i64,
    /// Fields the profile keeps besides the token (`instance_url`, `realmId`...).
    pub extra: Map<String, Value>,
    /// A refresh moved the refresh token's expiry later: it is an idle timeout (Keycloak's SSO
    /// idle, Intuit's rolling 100 days), not the grant's end.
    pub refresh_expiry_slides: bool,
}

impl TokenSet {
    /// How long the access token stays valid after `now`; `None` for a token without expiry.
    pub fn remaining(&self, now: i64) -> Option<i64> {
        self.expires_at.map(|at| at - now)
    }

    /// Whether the access token is still valid `min_valid` after `now`.
    pub fn valid_for(&self, now: i64, min_valid: Duration) -> bool {
        self.remaining(now)
            .is_none_or(|left| left > min_valid.as_millis() as i64)
    }

    /// Moves every time by `delta` ms: they were read on a wall clock that was then set.
    pub fn shift(&mut self, delta: i64) {
        let by = |t: i64| t.saturating_add(delta);
        self.expires_at = self.expires_at.map(by);
        self.refresh_expires_at = self.refresh_expires_at.map(by);
        self.obtained_at = by(self.obtained_at);
        self.granted_at = by(self.granted_at);
    }

    /// The lifetime the server granted, when it gave one.
    pub fn lifetime(&self) -> Option<i64> {
        self.expires_at.map(|at| at - self.obtained_at)
    }

    /// What a renewal answer inherits from the token it renews. A refresh response may omit the
    /// refresh token (Google, Dropbox...), which then stays the one we have: keep it rather than
    /// lose the grant, unless the profile says an omitted one is gone (`keep_refresh_token`).
    pub fn carry_over(mut self, previous: &TokenSet, keep_refresh_token: bool) -> TokenSet {
        self.granted_at = previous.granted_at;
        self.refresh_expiry_slides = previous.refresh_expiry_slides
            || matches!((self.refresh_expires_at, previous.refresh_expires_at),
                (Some(new), Some(old)) if new > old + 60_000);
        let mut extra = previous.extra.clone();
        extra.append(&mut self.extra);
        self.extra = extra;
        if self.refresh_token.is_none() && keep_refresh_token {
            self.refresh_token = previous.refresh_token.clone();
            if self.refresh_expires_at.is_none() {
                self.refresh_expires_at = previous.refresh_expires_at;
            }
        }
        if self.id_token.is_none() {
            self.id_token = previous.id_token.clone();
        }
        if self.scope.is_none() {
            self.scope = previous.scope.clone();
        }
        self
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(rt: Option<&str>, expires_at: Option<i64>) -> TokenSet {
        TokenSet {
            access_token: Secret::new("at"),
            token_type: "Bearer".into(),
            refresh_token: rt.map(Secret::new),
            id_token: None,
            scope: None,
            expires_at,
            refresh_expires_at: None,
            obtained_at: 0,
            granted_at: 0,
            extra: Map::new(),
            refresh_expiry_slides: false,
        }
    }

    #[test]
    fn validity() {
        let t = token(None, Some(10_000));
        assert!(t.valid_for(0, Duration::from_secs(9)));
        assert!(!t.valid_for(0, Duration::from_secs(10)));
        assert!(token(None, None).valid_for(i64::MAX, Duration::from_secs(3600)));
    }

    #[test]
    fn refresh_token_is_kept_when_omitted_and_replaced_when_rotated() {
        let old = token(Some("rt1"), Some(1));
        assert_eq!(
            token(None, None).carry_over(&old, true).refresh_token,
            Some(Secret::new("rt1"))
        );
        assert_eq!(
            token(None, None).carry_over(&old, false).refresh_token,
            None
        );
        assert_eq!(
            token(Some("rt2"), None)
                .carry_over(&old, true)
                .refresh_token,
            Some(Secret::new("rt2"))
        );
    }
}
