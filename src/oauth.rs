//! The OAuth engine: builds authorization URLs and grant requests, and reads token responses, as
//! the client's profile says. It never looks at a provider's name and never stores anything:
//! callers get a `TokenSet` or a classified `GrantError` and decide what to do with it.

use crate::config::ClientConfig;
use crate::provider::{ClientAuth, RequestEncoding};
use crate::secret::Secret;
use crate::token::{TokenSet, now_ms};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;
use std::time::Duration;
use url::Url;

/// A token response larger than this is refused unread: real ones are a few kilobytes, and a
/// broken or hostile server must not make the daemon buffer without limit.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// What the scheduler does about a failed grant request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// May work later by itself (network, 5xx, 429, a garbled answer): retry with backoff.
    Transient,
    /// Only the user can fix it (revoked or expired grant): authorize again.
    NeedsUser,
    /// The configuration is wrong (bad client id or secret, bad scope): retry slowly, tell.
    Config,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrantError {
    pub class: ErrorClass,
    /// The OAuth `error` code when the server sent one (`invalid_grant`...).
    pub code: Option<String>,
    /// One line for the user; never holds a token or secret.
    pub message: String,
    /// The server's Retry-After, when it sent one.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GrantError {}

impl GrantError {
    /// A failure only a new authorization can cure, found without asking the server.
    pub fn needs_user(message: impl Into<String>) -> Self {
        GrantError {
            class: ErrorClass::NeedsUser,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    fn transient(message: String) -> Self {
        GrantError {
            class: ErrorClass::Transient,
            code: None,
            message,
            retry_after: None,
        }
    }
}

/// A PKCE verifier and its S256 challenge (RFC 7636).
pub struct Pkce {
    pub verifier: Secret,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        // 32 random bytes give the 43-character verifier RFC 7636 section 4.1 recommends.
        let verifier = random_token(32);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Pkce {
            verifier: Secret::new(verifier),
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// `bytes` random bytes, base64url without padding.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// The URL the user opens to authorize `client`.
pub fn authorize_url(
    client: &ClientConfig,
    redirect_uri: &Url,
    state: &str,
    challenge: Option<&str>,
) -> Option<Url> {
    let mut url = client.endpoints.authorize.clone()?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code");
        q.append_pair("client_id", &client.client_id);
        q.append_pair("redirect_uri", redirect_uri.as_str());
        if !client.scopes.is_empty() {
            q.append_pair(
                "scope",
                &client.scopes.join(&client.profile.scope_separator),
            );
        }
        q.append_pair("state", state);
        if let Some(c) = challenge {
            q.append_pair("code_challenge", c);
            q.append_pair("code_challenge_method", "S256");
        }
        for (k, v) in &client.authorize_params {
            q.append_pair(k, v);
        }
    }
    Some(url)
}

/// Sends grant requests. One per daemon: its connection pool is shared by every client.
#[derive(Clone)]
pub struct Engine {
    http: reqwest::Client,
}

impl Engine {
    pub fn new(request_timeout: Duration) -> Result<Engine, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(request_timeout))
            .timeout(request_timeout)
            // A token endpoint that redirects is misconfigured; following it could send the
            // client secret somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("oauth2mci/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Engine { http })
    }

    pub async fn exchange_code(
        &self,
        client: &ClientConfig,
        code: &str,
        redirect_uri: &Url,
        verifier: Option<&Secret>,
    ) -> Result<TokenSet, GrantError> {
        let mut params = vec![
            ("grant_type", "authorization_code".to_string()),
            ("code", code.to_string()),
            ("redirect_uri", redirect_uri.to_string()),
        ];
        if let Some(v) = verifier {
            params.push(("code_verifier", v.expose().to_string()));
        }
        self.token_request(client, params).await
    }

    pub async fn refresh(
        &self,
        client: &ClientConfig,
        refresh_token: &Secret,
    ) -> Result<TokenSet, GrantError> {
        let params = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", refresh_token.expose().to_string()),
        ];
        self.token_request(client, params).await
    }

    pub async fn client_credentials(&self, client: &ClientConfig) -> Result<TokenSet, GrantError> {
        let mut params = vec![("grant_type", "client_credentials".to_string())];
        if !client.scopes.is_empty() {
            params.push(("scope", client.scopes.join(" ")));
        }
        self.token_request(client, params).await
    }

    async fn token_request(
        &self,
        client: &ClientConfig,
        mut params: Vec<(&'static str, String)>,
    ) -> Result<TokenSet, GrantError> {
        let url = &client.endpoints.token;
        let mut req = self
            .http
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        match (client.client_auth(), &client.client_secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 section 2.3.1: both parts are form-urlencoded before Basic encoding.
                let id = form_encode(&client.client_id);
                let secret = form_encode(secret.expose());
                req = req.basic_auth(id, Some(secret));
            }
            (ClientAuth::Post, Some(secret)) => {
                params.push(("client_id", client.client_id.clone()));
                params.push(("client_secret", secret.expose().to_string()));
            }
            _ => params.push(("client_id", client.client_id.clone())),
        }
        for (k, v) in &client.profile.token_headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req = match client.profile.token_request {
            RequestEncoding::Form => req.form(&params),
            RequestEncoding::Json => {
                let body: Map<String, Value> = params
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Value::String(v)))
                    .collect();
                req.json(&body)
            }
        };
        let resp = req.send().await.map_err(|e| {
            GrantError::transient(format!(
                "cannot reach the token endpoint {url}: {}",
                error_chain(&e)
            ))
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = read_capped(resp)
            .await
            .map_err(|m| GrantError::transient(format!("token endpoint {url}: {m}")))?;
        interpret(
            url,
            status.as_u16(),
            &content_type,
            &body,
            retry_after,
            now_ms(),
        )
    }
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The cause chain of an HTTP error in one line ("connection refused" sits deep in it).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    if resp
        .content_length()
        .is_some_and(|n| n as usize > MAX_RESPONSE_BYTES)
    {
        return Err(format!(
            "response larger than {MAX_RESPONSE_BYTES} bytes refused"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading the response failed: {}", error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!(
                "response larger than {MAX_RESPONSE_BYTES} bytes refused"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Retry-After as seconds or as an HTTP date (RFC 9110 section 10.2.3).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Reads a token endpoint's answer: a `TokenSet`, or the error it carries, classified.
pub fn interpret(
    url: &Url,
    status: u16,
    content_type: &str,
    body: &[u8],
    retry_after: Option<Duration>,
    now: i64,
) -> Result<TokenSet, GrantError> {
    let fields = parse_body(content_type, body);
    let error_code = fields
        .as_ref()
        .and_then(|f| f.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string);
    if (200..300).contains(&status) && error_code.is_none() {
        let Some(fields) = fields else {
            return Err(GrantError::transient(format!(
                "token endpoint {url} answered {status} with a body that is neither JSON nor a form ({})",
                describe_body(content_type, body)
            )));
        };
        return token_from_fields(&fields, now)
            .map_err(|m| GrantError::transient(format!("token endpoint {url}: {m}")));
    }
    let description = fields
        .as_ref()
        .and_then(|f| f.get("error_description"))
        .and_then(Value::as_str)
        .map(|d| d.chars().take(300).collect::<String>());
    let class = match (error_code.as_deref(), status) {
        (Some("invalid_grant"), _) => ErrorClass::NeedsUser,
        (
            Some(
                "invalid_client"
                | "unauthorized_client"
                | "invalid_scope"
                | "unsupported_grant_type",
            ),
            _,
        ) => ErrorClass::Config,
        (_, 401) => ErrorClass::Config,
        _ => ErrorClass::Transient,
    };
    let mut message = format!("token endpoint {url} answered {status}");
    match (&error_code, &description) {
        (Some(code), Some(d)) => message.push_str(&format!(" {code}: {d}")),
        (Some(code), None) => message.push_str(&format!(" {code}")),
        (None, _) => message.push_str(&format!(" ({})", describe_body(content_type, body))),
    }
    Err(GrantError {
        class,
        code: error_code,
        message,
        retry_after,
    })
}

/// What a body that could not be read looks like, without quoting it (it might hold a secret).
fn describe_body(content_type: &str, body: &[u8]) -> String {
    let ct = if content_type.is_empty() {
        "no content type"
    } else {
        content_type
    };
    if body.is_empty() {
        format!("{ct}, empty body")
    } else {
        format!("{ct}, {} bytes", body.len())
    }
}

/// JSON, or a form-encoded body (what some servers send without `Accept: application/json`).
fn parse_body(content_type: &str, body: &[u8]) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        return Some(map);
    }
    let looks_like_form = content_type.starts_with("application/x-www-form-urlencoded")
        || content_type.starts_with("text/plain");
    let text = std::str::from_utf8(body).ok()?;
    if looks_like_form && text.contains('=') && !text.trim_start().starts_with('<') {
        let map: Map<String, Value> = url::form_urlencoded::parse(text.trim().as_bytes())
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        return Some(map);
    }
    None
}

/// A number that may come as a JSON number or as a numeric string.
fn number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn token_from_fields(f: &Map<String, Value>, now: i64) -> Result<TokenSet, String> {
    let text = |k: &str| {
        f.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let access_token = text("access_token").ok_or("the response has no access_token")?;
    let token_type = match text("token_type") {
        Some(t) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_string(),
        Some(t) => t,
        None => "Bearer".to_string(),
    };
    let expires_at = match f.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let secs =
                number(v).ok_or_else(|| format!("expires_in is not a number ({})", kind(v)))?;
            if secs < 0 {
                return Err(format!("expires_in is negative ({secs})"));
            }
            Some(now + secs.saturating_mul(1000))
        }
    };
    let refresh_expires_at = ["refresh_token_expires_in", "refresh_expires_in"]
        .iter()
        .find_map(|k| f.get(*k).and_then(number))
        // Keycloak sends 0 for offline tokens, meaning "no expiry".
        .filter(|s| *s > 0)
        .map(|s| now + s.saturating_mul(1000));
    let scope = match f.get("scope") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    };
    Ok(TokenSet {
        access_token: Secret::new(access_token),
        token_type,
        refresh_token: text("refresh_token").map(Secret::new),
        id_token: text("id_token").map(Secret::new),
        scope,
        expires_at,
        refresh_expires_at,
        obtained_at: now,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        Url::parse("https://as.example/token").unwrap()
    }

    #[test]
    fn reads_a_standard_response() {
        let body = br#"{"access_token":"a","token_type":"bearer","expires_in":3600,"refresh_token":"r","scope":"x y"}"#;
        let t = interpret(&url(), 200, "application/json", body, None, 1000).unwrap();
        assert_eq!(t.access_token.expose(), "a");
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(t.expires_at, Some(3_601_000));
        assert_eq!(t.refresh_token.unwrap().expose(), "r");
    }

    #[test]
    fn reads_numbers_as_strings_and_forms() {
        let t = interpret(
            &url(),
            200,
            "application/json",
            br#"{"access_token":"a","expires_in":"60"}"#,
            None,
            0,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(60_000));
        let t = interpret(
            &url(),
            200,
            "application/x-www-form-urlencoded",
            b"access_token=a&expires_in=5",
            None,
            0,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(5_000));
    }

    #[test]
    fn classifies_errors() {
        let e = interpret(
            &url(),
            400,
            "application/json",
            br#"{"error":"invalid_grant","error_description":"revoked"}"#,
            None,
            0,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsUser);
        assert!(e.message.contains("invalid_grant: revoked"));
        let e = interpret(
            &url(),
            200,
            "application/json",
            br#"{"error":"invalid_grant"}"#,
            None,
            0,
        )
        .unwrap_err();
        assert_eq!(
            e.class,
            ErrorClass::NeedsUser,
            "an error in a 200 is still an error"
        );
        let e = interpret(
            &url(),
            503,
            "text/html",
            b"<html>down</html>",
            Some(Duration::from_secs(7)),
            0,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert!(e.message.contains("text/html, 17 bytes"));
        let e = interpret(
            &url(),
            401,
            "application/json",
            br#"{"error":"invalid_client"}"#,
            None,
            0,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Config);
    }

    #[test]
    fn refuses_incomplete_answers_without_quoting_them() {
        let e = interpret(
            &url(),
            200,
            "application/json",
            br#"{"token":"secret-value"}"#,
            None,
            0,
        )
        .unwrap_err();
        assert!(e.message.contains("no access_token") && !e.message.contains("secret-value"));
        let e = interpret(
            &url(),
            200,
            "application/json",
            br#"{"access_token":"a","expires_in":"soon"}"#,
            None,
            0,
        )
        .unwrap_err();
        assert!(e.message.contains("expires_in is not a number"));
        let e = interpret(
            &url(),
            200,
            "text/html",
            b"<html>secret-value</html>",
            None,
            0,
        )
        .unwrap_err();
        assert!(!e.message.contains("secret-value"));
    }

    #[test]
    fn retry_after_in_both_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(d <= Duration::from_secs(30) && d >= Duration::from_secs(28));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn pkce_challenge_is_s256_of_the_verifier() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(
            URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::new();
        assert_eq!(p.verifier.expose().len(), 43);
    }
}
