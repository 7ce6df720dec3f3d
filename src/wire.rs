//! The socket API's messages: plain data shared by the daemon (which sends them) and the CLI
//! (which reads them). Times are unix milliseconds; durations are whole seconds.

use serde::{Deserialize, Serialize};

/// One client as `GET /v1/clients[/{name}]` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientInfo {
    pub name: String,
    pub provider: String,
    pub grant: String,
    pub status: String,
    /// Why the client is in its status, when that needs explaining (needs_reauth, retrying...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Seconds until the access token expires (negative: expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    pub has_refresh_token: bool,
    /// When only a new authorization can continue, when known (a refresh token's lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_ends_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub failures: u32,
    pub scopes: Vec<String>,
    pub sinks: Vec<String>,
    /// An authorization waiting for the user: where to go, or the code to enter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_authorization: Option<Box<AuthorizeReply>>,
}

/// `GET /v1/clients/{name}/token`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenReply {
    pub access_token: String,
    pub token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// What the provider's profile keeps besides the token (`instance_url`, `realmId`...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Why this valid token is not as safe as it looks: held in memory only, the database
    /// refusing it. The CLI prints it on stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl TokenReply {
    /// The answer to a token request for `t`, at `now` (Unix ms).
    pub fn of(t: &crate::token::TokenSet, now: i64) -> TokenReply {
        TokenReply {
            access_token: t.access_token.expose().to_string(),
            token_type: t.token_type.to_string(),
            expires_at: t.expires_at,
            expires_in: t.remaining(now).map(|ms| ms.div_euclid(1000)),
            scope: t.scope.clone(),
            extra: t.extra.clone(),
            warning: None,
        }
    }
}

/// Why an authorization ended without tokens: an OAuth-style code (`access_denied`,
/// `state_mismatch`, `timeout`...) and one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub error: String,
    pub message: String,
}

impl AuthFailure {
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> AuthFailure {
        AuthFailure {
            error: error.into(),
            message: message.into(),
        }
    }
}

/// `POST /v1/clients/{name}/authorize[?method=device]`: what the user must do. Also the
/// `action` of a `needs_authorization` error, when the daemon could start one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthorizeReply {
    /// `browser` (authorization code) or `device` (RFC 8628).
    pub method: String,
    /// The page to open: the authorization URL, or the device verification page (with the code
    /// in it when the server offers `verification_uri_complete`).
    pub url: String,
    pub state: String,
    /// Where the browser comes back (browser method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    /// The code the user types at `verification_uri` (device method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri: Option<String>,
    pub expires_at: i64,
}

impl AuthorizeReply {
    /// What to tell the user, one line.
    pub fn instructions(&self) -> String {
        match (&self.user_code, &self.verification_uri) {
            (Some(code), Some(page)) => format!("open {page} and enter the code {code}"),
            _ => format!("open {}", self.url),
        }
    }
}

/// `GET /v1/clients/{name}/authorization`: how the latest authorization went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthorizationOutcome {
    pub state: String,
    /// `pending`, `done` or `failed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /v1/clients/{name}/revoke[?local=true]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevokeReply {
    pub client: String,
    /// False when the tokens were only forgotten here (`local`), or there were none.
    pub revoked_at_server: bool,
    pub message: String,
}

/// `POST /v1/reload`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadReply {
    pub changes: Vec<String>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// `ok`, `degraded` (see `problems`) or `stopping`.
    pub status: String,
    pub version: String,
    pub clients: usize,
    pub config: String,
    /// What is wrong while the daemon serves on: the database failing, tokens held in memory
    /// only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Every error the API returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorReply {
    pub error: String,
    pub message: String,
    /// For `needs_authorization`: an authorization the daemon started (or had waiting) for
    /// the user to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Box<AuthorizeReply>>,
}

/// Error codes of `ErrorReply::error` that callers act on.
pub mod code {
    pub const UNKNOWN_CLIENT: &str = "unknown_client";
    pub const NEEDS_AUTHORIZATION: &str = "needs_authorization";
    pub const SERVER_ERROR: &str = "server_error";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const NOT_SUPPORTED: &str = "not_supported";
    pub const CONFIG_ERROR: &str = "config_error";
    pub const NOT_FOUND: &str = "not_found";
    pub const FORBIDDEN: &str = "forbidden";
    /// Too many connections from one user (`limits.max_connections_per_user`).
    pub const BUSY: &str = "busy";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    pub const INTERNAL: &str = "internal";
}
