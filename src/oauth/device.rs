//! The device authorization grant (RFC 8628), for machines without a browser: asking the
//! server for a user code, and polling the token endpoint until the user has entered it.
//!
//! This module owns the protocol: the request, the answer, and what each polling answer means
//! (`authorization_pending`, `slow_down`, `expired_token`, `access_denied`). Storing the token
//! and telling the user are the registry's.

use crate::config::ClientConfig;
use crate::oauth::{self, Answer, Engine, ErrorClass, Grant, GrantError};
use crate::secret::Secret;
use crate::token::{TokenSet, now_ms};
use crate::wire::AuthFailure;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// RFC 8628 section 3.2: when the server names no interval, poll every 5 seconds.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Section 3.5: `slow_down` adds 5 seconds to the interval, for this and every later request.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// A server asking for more than this is misconfigured; the user would give up waiting.
const MAX_INTERVAL: Duration = Duration::from_secs(120);
/// Without `expires_in`, the code is assumed to live this long (Google and Microsoft: 15 min).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// A device authorization in progress: what the user is shown and what the daemon polls with.
/// Stored with the pending authorization, so that a restart goes on polling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceGrant {
    #[serde(with = "secret_string")]
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    pub expires_at: i64,
    /// The polling interval, in milliseconds; `slow_down` raises it.
    pub interval_ms: u64,
    /// The client's configuration fingerprint when it started: a token for another identity
    /// (scopes edited while the daemon was down) is not taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

mod secret_string {
    use crate::secret::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Secret, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Asks the device authorization endpoint for a user code.
pub async fn start(engine: &Engine, client: &ClientConfig) -> Result<DeviceGrant, GrantError> {
    let Some(url) = client.endpoints.device_authorization.clone() else {
        return Err(GrantError::config(format!(
            "provider {} has no device authorization endpoint: set provider.device_authorization_url",
            client.provider
        )));
    };
    let shown = url.to_string();
    let answer = engine.device_authorization(client, url).await?;
    read_start(&client.profile, &shown, &answer, now_ms())
}

/// Reads a device authorization answer (RFC 8628 section 3.2). Google's older endpoint says
/// `verification_url`; the rest is the RFC's.
pub fn read_start(
    profile: &crate::provider::Profile,
    url: &str,
    answer: &Answer,
    now: i64,
) -> Result<DeviceGrant, GrantError> {
    let fields = oauth::checked_fields(
        profile,
        &format!("device authorization endpoint {url}"),
        answer,
    )?;
    let text = |keys: &[&str]| {
        keys.iter().find_map(|k| {
            fields
                .get(*k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
    };
    let seconds = |key: &str| match fields.get(key) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let missing = |what: &str| {
        GrantError::transient(format!(
            "device authorization endpoint {url}: the answer has no {what}"
        ))
    };
    let device_code = text(&["device_code"]).ok_or_else(|| missing("device_code"))?;
    let user_code = text(&["user_code"]).ok_or_else(|| missing("user_code"))?;
    let verification_uri = text(&["verification_uri", "verification_url"])
        .ok_or_else(|| missing("verification_uri"))?;
    let lifetime = seconds("expires_in")
        .filter(|s| *s > 0)
        .map_or(DEFAULT_LIFETIME, Duration::from_secs)
        .min(Duration::from_secs(24 * 3600));
    let interval = seconds("interval")
        .filter(|s| *s > 0)
        .map_or(DEFAULT_INTERVAL, Duration::from_secs)
        .min(MAX_INTERVAL);
    Ok(DeviceGrant {
        device_code: Secret::new(device_code),
        user_code,
        verification_uri,
        verification_uri_complete: text(&["verification_uri_complete"]),
        expires_at: now + lifetime.as_millis() as i64,
        interval_ms: interval.as_millis() as u64,
        fingerprint: None,
    })
}

/// What to do after one polling answer.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Ask again after the (possibly raised) interval.
    Wait,
    /// The user approved: the token.
    Done(TokenSet),
    /// It is over without a token: an error code and a line for the user.
    Fail(String, String),
}

/// Reads one polling answer. `slow_down` raises the interval for good (section 3.5); a failure
/// that may pass (network, 5xx, 429, with or without an error code) is waited out like
/// `authorization_pending`, with the interval doubled, as section 3.5 asks of a client that
/// meets a connection timeout.
pub fn step(grant: &mut DeviceGrant, result: Result<TokenSet, GrantError>) -> Step {
    let e = match result {
        Ok(token) => return Step::Done(token),
        Err(e) => e,
    };
    let raise = |grant: &mut DeviceGrant, by: Duration| {
        grant.interval_ms = (Duration::from_millis(grant.interval_ms) + by)
            .min(MAX_INTERVAL)
            .as_millis() as u64;
    };
    match e.code.as_deref() {
        Some("authorization_pending") => Step::Wait,
        Some("slow_down") => {
            raise(grant, SLOW_DOWN_STEP);
            Step::Wait
        }
        Some("expired_token") => Step::Fail(
            "expired_token".into(),
            "the user code expired before it was entered; start again".into(),
        ),
        Some("access_denied") => Step::Fail(
            "access_denied".into(),
            "the user denied the authorization".into(),
        ),
        // A network failure, a 5xx or a 429 (`server_error`, `temporarily_unavailable`...)
        // passes: wait longer.
        _ if e.class == ErrorClass::Transient => {
            let current = Duration::from_millis(grant.interval_ms);
            raise(grant, current);
            Step::Wait
        }
        code => Step::Fail(
            code.unwrap_or("token_request_failed").to_string(),
            e.message,
        ),
    }
}

/// Polls until the user approves, refuses, the code expires, or `cancel` fires; the grant is
/// updated as it goes (`slow_down`), so that the caller may save it.
pub async fn poll(
    engine: &Engine,
    client: &ClientConfig,
    grant: &mut DeviceGrant,
    cancel: &CancellationToken,
) -> Result<TokenSet, AuthFailure> {
    loop {
        let now = now_ms();
        let wait = Duration::from_millis(grant.interval_ms);
        if now + wait.as_millis() as i64 > grant.expires_at {
            return Err(AuthFailure::new(
                "expired_token",
                "the user code expired before it was entered; start again",
            ));
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                return Err(AuthFailure::new("cancelled", "the authorization was cancelled"));
            }
            _ = tokio::time::sleep(wait) => {}
        }
        let device_code = grant.device_code.clone();
        let result = engine
            .token(
                client,
                Grant::DeviceCode {
                    device_code: &device_code,
                },
            )
            .await;
        match step(grant, result) {
            Step::Wait => continue,
            Step::Done(token) => return Ok(token),
            Step::Fail(code, message) => return Err(AuthFailure::new(code, message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ProfileSpec, resolve};

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            content_type: "application/json".into(),
            body: body.as_bytes().to_vec(),
            retry_after: None,
        }
    }

    fn generic() -> crate::provider::Profile {
        resolve(&ProfileSpec::Named("generic".into())).unwrap().1
    }

    fn grant() -> DeviceGrant {
        read_start(
            &generic(),
            "u",
            &answer(
                200,
                r#"{"device_code":"d","user_code":"ABCD-EFGH","verification_uri":"https://x/device","expires_in":600}"#,
            ),
            1_000,
        )
        .unwrap()
    }

    fn error(code: Option<&str>, class: ErrorClass) -> GrantError {
        GrantError {
            class,
            code: code.map(str::to_string),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn reads_the_start_with_rfc_defaults_and_google_names() {
        let g = grant();
        assert_eq!(g.user_code, "ABCD-EFGH");
        assert_eq!(g.interval_ms, 5_000);
        assert_eq!(g.expires_at, 601_000);
        let google = read_start(
            &generic(),
            "u",
            &answer(
                200,
                r#"{"device_code":"d","user_code":"X","verification_url":"https://g/device","interval":"9"}"#,
            ),
            0,
        )
        .unwrap();
        assert_eq!(google.verification_uri, "https://g/device");
        assert_eq!(google.interval_ms, 9_000);
        assert_eq!(google.expires_at, 900_000);
        let e = read_start(&generic(), "u", &answer(200, r#"{"device_code":"d"}"#), 0).unwrap_err();
        assert!(e.message.contains("no user_code"), "{e}");
        let e = read_start(
            &generic(),
            "u",
            &answer(400, r#"{"error":"invalid_client"}"#),
            0,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Config);
    }

    #[test]
    fn polling_answers_wait_slow_down_or_end() {
        let mut g = grant();
        let pending = error(Some("authorization_pending"), ErrorClass::Transient);
        assert_eq!(step(&mut g, Err(pending)), Step::Wait);
        assert_eq!(g.interval_ms, 5_000);
        assert_eq!(
            step(&mut g, Err(error(Some("slow_down"), ErrorClass::Transient))),
            Step::Wait
        );
        assert_eq!(g.interval_ms, 10_000);
        // A network failure doubles the interval, up to the cap.
        for code in [None, Some("temporarily_unavailable")]
            .into_iter()
            .cycle()
            .take(10)
        {
            assert_eq!(
                step(&mut g, Err(error(code, ErrorClass::Transient))),
                Step::Wait
            );
        }
        assert_eq!(g.interval_ms, MAX_INTERVAL.as_millis() as u64);
        for (code, class) in [
            ("expired_token", ErrorClass::Transient),
            ("access_denied", ErrorClass::Transient),
            ("invalid_client", ErrorClass::Config),
            ("invalid_grant", ErrorClass::NeedsUser),
        ] {
            match step(&mut g, Err(error(Some(code), class))) {
                Step::Fail(c, _) => assert_eq!(c, code),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_pending_device_grant_survives_a_round_trip_through_json() {
        let g = grant();
        let text = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<DeviceGrant>(&text).unwrap(), g);
    }
}
