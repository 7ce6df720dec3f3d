//! Signed JWTs the daemon sends (RFC 7523): client assertions, where a private key replaces the
//! client secret (`private_key_jwt`, section 2.2), and the JWT bearer grant, where the assertion
//! is the grant itself (section 2.1: Google service accounts).
//!
//! This module owns the key (read and checked when the configuration loads) and the claims; the
//! engine decides where an assertion goes.

use crate::secret::Secret;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::fmt;

/// How long an assertion is valid: long enough for a slow request, short enough that a copy is
/// worth little (Google accepts up to an hour; oidc-provider allows 15 s of clock skew).
const ASSERTION_LIFETIME_SECS: i64 = 300;

/// The signature algorithms offered: the ones every server that takes RFC 7523 supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Alg {
    RS256,
    PS256,
    ES256,
}

impl Alg {
    fn jsonwebtoken(self) -> Algorithm {
        match self {
            Alg::RS256 => Algorithm::RS256,
            Alg::PS256 => Algorithm::PS256,
            Alg::ES256 => Algorithm::ES256,
        }
    }
}

/// A private key in PEM (PKCS#8, or PKCS#1 for RSA), checked by signing once at load.
#[derive(Clone, PartialEq)]
pub struct SigningKey {
    pem: Secret,
    pub alg: Alg,
    /// The `kid` header: which of the client's registered keys this is.
    pub kid: Option<String>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKey({:?}, kid {:?}, [redacted])",
            self.alg, self.kid
        )
    }
}

impl SigningKey {
    /// Reads `pem`; `alg` defaults to RS256 for an RSA key and ES256 for a P-256 key, and must
    /// fit the key. The error says what is wrong without quoting the key.
    pub fn load(pem: Secret, alg: Option<Alg>, kid: Option<String>) -> Result<SigningKey, String> {
        let text = pem.expose();
        let rsa = EncodingKey::from_rsa_pem(text.as_bytes()).ok();
        let ec = EncodingKey::from_ec_pem(text.as_bytes()).ok();
        let alg = match (alg, &rsa, &ec) {
            (Some(a @ (Alg::RS256 | Alg::PS256)), Some(_), _) => a,
            (Some(Alg::ES256), _, Some(_)) => Alg::ES256,
            (None, Some(_), _) => Alg::RS256,
            (None, None, Some(_)) => Alg::ES256,
            (None, None, None) => {
                return Err(
                    "not a PEM private key (expected \"-----BEGIN PRIVATE KEY-----\", PKCS#8, or an RSA key in PKCS#1)"
                        .into(),
                );
            }
            (Some(a), _, _) => return Err(format!("{a:?} does not fit this key's type")),
        };
        let key = SigningKey { pem, alg, kid };
        // A key that parses can still fail to sign (an EC key that is not P-256, a SEC1 EC
        // key): find out now, not at the first refresh.
        key.sign(&json!({ "check": true }))
            .map_err(|e| format!("cannot sign with this key as {alg:?}: {e} (EC keys must be P-256 in PKCS#8: `openssl pkcs8 -topk8 -nocrypt`)"))?;
        Ok(key)
    }

    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let bytes = self.pem.expose().as_bytes();
        let key = match self.alg {
            Alg::RS256 | Alg::PS256 => EncodingKey::from_rsa_pem(bytes),
            Alg::ES256 => EncodingKey::from_ec_pem(bytes),
        }
        .map_err(|e| e.to_string())?;
        let mut header = Header::new(self.alg.jsonwebtoken());
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
    }
}

/// A Google service account key file, the fields the JWT bearer grant needs.
#[derive(Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
}

impl ServiceAccount {
    pub fn parse(json: &str) -> Result<ServiceAccount, String> {
        serde_json::from_str(json).map_err(|e| {
            format!("not a service account key (JSON with client_email and private_key): {e}")
        })
    }
}

/// A client's JWT settings: its key, and the claims that name it.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    pub key: SigningKey,
    /// `iss`: the client id, or the service account's email.
    pub issuer: String,
    /// `sub` of a JWT bearer grant: the user to act for (Google's domain-wide delegation).
    pub subject: Option<String>,
    /// `aud`, when not the token endpoint URL.
    pub audience: Option<String>,
}

/// A `private_key_jwt` client assertion (RFC 7523 section 3): `iss` and `sub` are the client.
pub fn client_assertion(
    jwt: &JwtSettings,
    client_id: &str,
    token_url: &str,
    now_ms: i64,
) -> Result<String, String> {
    let now = now_ms / 1000;
    jwt.key.sign(&json!({
        "iss": client_id,
        "sub": client_id,
        "aud": jwt.audience.as_deref().unwrap_or(token_url),
        "jti": crate::random::token(16),
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    }))
}

/// The assertion of a JWT bearer grant (RFC 7523 section 2.1). Google wants the scopes in it.
pub fn grant_assertion(
    jwt: &JwtSettings,
    scope: Option<&str>,
    token_url: &str,
    now_ms: i64,
) -> Result<String, String> {
    let now = now_ms / 1000;
    let mut claims = json!({
        "iss": jwt.issuer,
        "aud": jwt.audience.as_deref().unwrap_or(token_url),
        "jti": crate::random::token(16),
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    if let Some(sub) = &jwt.subject {
        claims["sub"] = Value::String(sub.clone());
    }
    if let Some(scope) = scope {
        claims["scope"] = Value::String(scope.to_string());
    }
    jwt.key.sign(&claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway 2048-bit RSA key and a P-256 key, for tests only.
    pub const RSA_PEM: &str = include_str!("../tests/keys/rsa.pem");
    pub const EC_PEM: &str = include_str!("../tests/keys/ec.pem");

    #[test]
    fn keys_pick_their_algorithm_and_refuse_misfits() {
        let rsa = SigningKey::load(Secret::new(RSA_PEM), None, None).unwrap();
        assert_eq!(rsa.alg, Alg::RS256);
        assert_eq!(
            SigningKey::load(Secret::new(RSA_PEM), Some(Alg::PS256), None)
                .unwrap()
                .alg,
            Alg::PS256
        );
        let ec = SigningKey::load(Secret::new(EC_PEM), None, None).unwrap();
        assert_eq!(ec.alg, Alg::ES256);
        let e = SigningKey::load(Secret::new(RSA_PEM), Some(Alg::ES256), None).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = SigningKey::load(Secret::new("hello"), None, None).unwrap_err();
        assert!(e.contains("not a PEM private key"), "{e}");
        assert!(!format!("{rsa:?}").contains("PRIVATE"));
    }

    #[test]
    fn assertions_carry_the_claims_rfc_7523_asks_for() {
        let jwt = JwtSettings {
            key: SigningKey::load(Secret::new(RSA_PEM), None, Some("k1".into())).unwrap(),
            issuer: "sa@example.iam".into(),
            subject: Some("alice@example.com".into()),
            audience: None,
        };
        let claims = |token: &str| -> Value {
            use base64::Engine as _;
            let payload = token.split('.').nth(1).unwrap();
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        };
        let header = jsonwebtoken::decode_header(
            &client_assertion(&jwt, "app", "https://as/token", 1_000_000).unwrap(),
        )
        .unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let c = claims(&client_assertion(&jwt, "app", "https://as/token", 1_000_000).unwrap());
        assert_eq!(
            (c["iss"].as_str(), c["sub"].as_str()),
            (Some("app"), Some("app"))
        );
        assert_eq!(c["aud"], "https://as/token");
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
        let a = client_assertion(&jwt, "app", "https://as/token", 1_000_000).unwrap();
        let b = client_assertion(&jwt, "app", "https://as/token", 1_000_000).unwrap();
        assert_ne!(
            claims(&a)["jti"],
            claims(&b)["jti"],
            "a fresh jti each time"
        );
        let g = claims(&grant_assertion(&jwt, Some("s1 s2"), "https://as/token", 0).unwrap());
        assert_eq!(g["iss"], "sa@example.iam");
        assert_eq!(g["sub"], "alice@example.com");
        assert_eq!(g["scope"], "s1 s2");
    }
}
