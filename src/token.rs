//! `TokenSet`: what a grant request yields and what the daemon keeps, serves and writes out.
//! Times are Unix milliseconds of the wall clock, the unit the store and the API use too.

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
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
        let min = i64::try_from(min_valid.as_millis()).unwrap_or(i64::MAX);
        self.remaining(now).is_none_or(|left| left > min)
    }

    /// Whether the token is good enough for a consumer asking for `min_valid`: valid that much
    /// longer, or, when the server grants less than that (a new token would not be either),
    /// at least half its lifetime. A consumer asking for more than the server grants must not
    /// have every request refresh.
    pub fn serves(&self, now: i64, min_valid: Duration) -> bool {
        match self.lifetime() {
            Some(life) if i64::try_from(min_valid.as_millis()).unwrap_or(i64::MAX) >= life => {
                self.valid_for(now, Duration::from_millis((life / 2).max(0) as u64))
            }
            _ => self.valid_for(now, min_valid),
        }
    }

    /// Why the token cannot be valid `min_valid` longer however it is renewed, if so: the
    /// server grants less.
    pub fn short_of(&self, min_valid: Duration) -> Option<String> {
        let life = self.lifetime()?;
        (i64::try_from(min_valid.as_millis()).unwrap_or(i64::MAX) >= life).then(|| {
            format!(
                "the server grants tokens valid for {}; one valid for {} more cannot be had",
                crate::duration::show(Duration::from_millis(life.max(0) as u64)),
                crate::duration::show(min_valid)
            )
        })
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

/// The characters an access token may hold, set by the provider's profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenChars {
    /// RFC 6750's `b64token` (letters, digits, `-._~+/`, then `=` padding): what a bearer token
    /// is, and all that can go into an `Authorization` header without quoting.
    B64token,
    /// Any visible ASCII character (`!` to `~`): Salesforce session ids hold `!`, which RFC 6750
    /// does not allow but every HTTP header does. Still no space and no control character.
    Visible,
}

/// The most any one token may hold. Real ones are a few kilobytes at most (an Entra ID JWT
/// with its group claims is about 10 kB); the answer they come in is capped at 1 MiB.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// The most the kept response fields may take, written as JSON.
pub const MAX_KEPT_BYTES: usize = 64 * 1024;

/// Refuses a token whose bytes cannot be handed out safely: every consumer writes the access
/// token into an `Authorization` header, shells `source` the `env` token files, and no token,
/// type or kept field may hold a control character or a line break (one would forge a header
/// line or a second variable). The message names the field and the first offending byte's
/// place, never the value.
pub fn check_token_bytes(token: &TokenSet, chars: TokenChars) -> Result<(), String> {
    let access = token.access_token.expose();
    match chars {
        TokenChars::B64token => check_chars(
            access,
            "access_token",
            first_outside_b64token,
            "RFC 6750 allows in a bearer token (letters, digits and -._~+/, then = padding)",
        )?,
        TokenChars::Visible => check_chars(
            access,
            "access_token",
            |b| first_outside(b, b'!'..=b'~'),
            "the profile allows (visible ASCII, no space)",
        )?,
    }
    if let Some(rt) = &token.refresh_token {
        check_chars(
            rt.expose(),
            "refresh_token",
            |b| first_outside(b, b' '..=b'~'),
            "RFC 6749 allows in a refresh token (ASCII from space to ~)",
        )?;
    }
    if let Some(id) = &token.id_token {
        check_chars(
            id.expose(),
            "id_token",
            |b| first_outside(b, b'!'..=b'~'),
            "an ID token (a JWT) may hold",
        )?;
    }
    check_token_type(&token.token_type)?;
    if let Some(scope) = &token.scope {
        check_text(scope, "scope")?;
    }
    let mut kept = 0;
    for (key, value) in &token.extra {
        check_text(key, "a kept field's name")?;
        check_value(value, key)?;
        kept += key.len() + serde_json::to_string(value).map_or(0, |s| s.len());
    }
    if kept > MAX_KEPT_BYTES {
        return Err(format!(
            "the kept response fields take {kept} bytes, more than the {MAX_KEPT_BYTES} allowed"
        ));
    }
    Ok(())
}

/// Refuses a token type that is not an HTTP authentication scheme's name (RFC 9110 `token`,
/// at most 32 bytes).
pub fn check_token_type(token_type: &str) -> Result<(), String> {
    if token_type.len() > 32 {
        return Err("token_type is longer than 32 bytes".into());
    }
    check_chars(
        token_type,
        "token_type",
        |b| b.iter().position(|&c| !is_tchar(c)),
        "an HTTP authentication scheme may hold",
    )
}

/// The place of the first byte that makes `bytes` no `b64token` (RFC 6750 section 2.1):
/// `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn first_outside_b64token(bytes: &[u8]) -> Option<usize> {
    let body = bytes.iter().position(|&b| b == b'=').unwrap_or(bytes.len());
    if body == 0 {
        return Some(0);
    }
    let token_char = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/".contains(b);
    bytes[..body]
        .iter()
        .position(|b| !token_char(b))
        .or_else(|| {
            bytes[body..]
                .iter()
                .position(|&b| b != b'=')
                .map(|i| body + i)
        })
}

fn first_outside(bytes: &[u8], range: std::ops::RangeInclusive<u8>) -> Option<usize> {
    bytes.iter().position(|b| !range.contains(b))
}

/// RFC 9110's `tchar`: what an authentication scheme's name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks that `value` is 1 to `MAX_TOKEN_BYTES` bytes with no byte `first_bad` finds.
fn check_chars(
    value: &str,
    field: &str,
    first_bad: impl Fn(&[u8]) -> Option<usize>,
    rule: &str,
) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if value.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "{field} is {} bytes long, more than the {MAX_TOKEN_BYTES} a token may take",
            value.len()
        ));
    }
    let bytes = value.as_bytes();
    match first_bad(bytes) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{field} holds {} at byte {}, which is not what {rule}",
            describe_byte(bytes[i]),
            i + 1
        )),
    }
}

/// Text served beside a token (a scope, a kept field): anything but control characters and line
/// breaks, which would break a log line, a header or an `env` file, and the invisible marks that
/// reorder or hide what a terminal shows (a "Trojan Source" scope could read as another).
fn check_text(text: &str, field: &str) -> Result<(), String> {
    if text.len() > MAX_KEPT_BYTES {
        return Err(format!("{field} is longer than {MAX_KEPT_BYTES} bytes"));
    }
    match text.char_indices().find(|(_, c)| misleads_a_reader(*c)) {
        None => Ok(()),
        Some((i, c)) if c.is_control() => Err(format!(
            "{field} holds the control character U+{:04X} at byte {}",
            c as u32,
            i + 1
        )),
        Some((i, c)) => Err(format!(
            "{field} holds the invisible formatting character U+{:04X} at byte {}",
            c as u32,
            i + 1
        )),
    }
}

/// Control characters, line and paragraph separators, direction marks and overrides, and the
/// zero-width characters and byte-order mark.
fn misleads_a_reader(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

fn check_value(value: &Value, key: &str) -> Result<(), String> {
    match value {
        Value::String(s) => check_text(s, &format!("kept field {key:?}")),
        Value::Array(items) => items.iter().try_for_each(|v| check_value(v, key)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_text(k, &format!("a name inside kept field {key:?}"))?;
            check_value(v, key)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// A byte as an error may show it: printable ones quoted, others by their code.
fn describe_byte(b: u8) -> String {
    match b {
        b' ' => "a space".into(),
        b'\n' => "a line feed".into(),
        b'\r' => "a carriage return".into(),
        0 => "a NUL byte".into(),
        b'!'..=b'~' => format!("{:?}", b as char),
        _ if b.is_ascii_control() => format!("the control character 0x{b:02X}"),
        _ => format!("the non-ASCII byte 0x{b:02X}"),
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
        // A minimum too large for milliseconds is never met, not wrapped around.
        assert!(!t.valid_for(0, Duration::MAX));
        assert!(!t.valid_for(0, Duration::from_secs(u64::MAX / 1000)));
    }

    #[test]
    fn a_minimum_longer_than_the_server_grants_does_not_refresh_every_time() {
        // A 10 s token (obtained at 0), asked for 60 s: fresh enough while half is left.
        let t = token(None, Some(10_000));
        assert!(t.serves(0, Duration::from_secs(60)));
        assert!(t.serves(4_999, Duration::from_secs(60)));
        assert!(!t.serves(5_000, Duration::from_secs(60)));
        assert!(t.short_of(Duration::from_secs(60)).is_some());
        // Within what the server grants, the minimum is the minimum.
        assert!(t.serves(0, Duration::from_secs(9)));
        assert!(!t.serves(1_500, Duration::from_secs(9)));
        assert_eq!(t.short_of(Duration::from_secs(9)), None);
        assert!(!t.serves(0, Duration::MAX) || t.short_of(Duration::MAX).is_some());
    }

    #[test]
    fn token_bytes_that_cannot_be_handed_out_are_refused_without_being_quoted() {
        let with = |at: &str| {
            let mut t = token(Some("rt"), None);
            t.access_token = Secret::new(at);
            t
        };
        for good in ["ya29.a0Af-_~+/x", "abc==", "00D!x", "Zm9v"] {
            let chars = if good.contains('!') {
                TokenChars::Visible
            } else {
                TokenChars::B64token
            };
            assert_eq!(check_token_bytes(&with(good), chars), Ok(()), "{good}");
        }
        let hostile = [
            ("ok\r\nX-Injected: 1", "a carriage return at byte 3"),
            ("ok\nmore", "a line feed at byte 3"),
            ("nul\0x", "a NUL byte at byte 4"),
            ("a b", "a space at byte 2"),
            ("$(touch pwned)", "'$' at byte 1"),
            ("x`id`", "'`' at byte 2"),
            ("q\"uote", "'\"' at byte 2"),
            ("s'q", "'\\'' at byte 2"),
            ("=abc", "'=' at byte 1"),
            ("ab=c", "'c' at byte 4"),
            ("caf\u{e9}", "the non-ASCII byte 0xC3 at byte 4"),
            ("", "access_token is empty"),
        ];
        for (value, fragment) in hostile {
            let e = check_token_bytes(&with(value), TokenChars::B64token).unwrap_err();
            assert!(e.contains(fragment), "{value:?}: {e}");
            assert!(e.starts_with("access_token"), "{e}");
            if value.len() > 3 {
                assert!(!e.contains(value), "the value is quoted: {e}");
            }
        }
        // The wider set still refuses spaces and control characters.
        for value in ["a b", "a\tb", "a\u{7f}b", "a\nb"] {
            assert!(check_token_bytes(&with(value), TokenChars::Visible).is_err());
        }
        assert!(check_token_bytes(&with("$(x)`y`\"z"), TokenChars::Visible).is_ok());
        assert!(
            check_token_bytes(
                &with(&"a".repeat(MAX_TOKEN_BYTES + 1)),
                TokenChars::B64token
            )
            .is_err()
        );

        // The other fields, each with its own rule.
        let mut t = with("fine");
        t.refresh_token = Some(Secret::new("rt with spaces is RFC 6749's VSCHAR"));
        assert_eq!(check_token_bytes(&t, TokenChars::B64token), Ok(()));
        t.refresh_token = Some(Secret::new("rt\r\n"));
        let e = check_token_bytes(&t, TokenChars::B64token).unwrap_err();
        assert!(
            e.starts_with("refresh_token holds a carriage return"),
            "{e}"
        );
        t.refresh_token = None;
        t.id_token = Some(Secret::new("eyJ.x y"));
        assert!(
            check_token_bytes(&t, TokenChars::B64token)
                .unwrap_err()
                .starts_with("id_token")
        );
        t.id_token = None;
        t.token_type = "Bearer\r\nX: y".into();
        assert!(
            check_token_bytes(&t, TokenChars::B64token)
                .unwrap_err()
                .starts_with("token_type")
        );
        t.token_type = "DPoP".into();
        t.scope = Some("a b\nc".into());
        assert!(
            check_token_bytes(&t, TokenChars::B64token)
                .unwrap_err()
                .starts_with("scope")
        );
        for hidden in [
            "\u{202E}", "\u{2066}", "\u{200B}", "\u{200F}", "\u{FEFF}", "\u{2069}",
        ] {
            t.scope = Some(format!("read{hidden} admin"));
            let e = check_token_bytes(&t, TokenChars::B64token).unwrap_err();
            assert!(
                e.starts_with("scope holds the invisible formatting character U+"),
                "{hidden:?}: {e}"
            );
        }
        t.scope = Some("a b c lecture:écrire 読む".into());
        assert_eq!(check_token_bytes(&t, TokenChars::B64token), Ok(()));
        for bad in [
            serde_json::json!("line\nbreak"),
            serde_json::json!({"nested": ["x", "\u{0}"]}),
            serde_json::json!({"k\r": 1}),
            serde_json::json!("\u{2028}"),
        ] {
            t.extra = Map::from_iter([("instance_url".to_string(), bad.clone())]);
            let e = check_token_bytes(&t, TokenChars::B64token).unwrap_err();
            assert!(e.contains("instance_url"), "{bad}: {e}");
        }
        t.extra = Map::from_iter([("big".to_string(), Value::String("x".repeat(MAX_KEPT_BYTES)))]);
        assert!(check_token_bytes(&t, TokenChars::B64token).is_err());
        t.extra = Map::from_iter([("team".to_string(), serde_json::json!({"id": "T1", "n": 3}))]);
        assert_eq!(check_token_bytes(&t, TokenChars::B64token), Ok(()));
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
