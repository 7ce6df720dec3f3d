//! The OAuth engine: builds authorization URLs and grant requests, and reads token responses, as
//! the client's profile says. It never looks at a provider's name and never stores anything:
//! callers get a `TokenSet` or a classified `GrantError` and decide what to do with it.

pub mod device;
pub(crate) mod queue;
pub(crate) mod redirect;

use crate::config::ClientConfig;
use crate::provider::{
    ClientAuth, ExpiryField, Profile, RefreshMechanism, RequestEncoding, ResponseFormat, Revocation,
};
use crate::secret::Secret;
use crate::text;
use crate::token::{TokenSet, now_ms};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
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

    pub fn transient(message: String) -> Self {
        GrantError {
            class: ErrorClass::Transient,
            code: None,
            message,
            retry_after: None,
        }
    }

    /// The configuration cannot produce a valid request.
    pub fn config(message: String) -> Self {
        GrantError {
            class: ErrorClass::Config,
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
        let verifier = Secret::new(crate::random::token(32));
        Pkce {
            challenge: Pkce::challenge_of(&verifier),
            verifier,
        }
    }

    /// The S256 challenge of a verifier.
    pub fn challenge_of(verifier: &Secret) -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.expose().as_bytes()))
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
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
            q.append_pair(&client.profile.scope_param, &client.scope_string());
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

pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// One grant request to the token endpoint.
pub enum Grant<'a> {
    /// Authorization code exchange (RFC 6749 section 4.1.3).
    Code {
        code: &'a str,
        redirect_uri: &'a Url,
        verifier: Option<&'a Secret>,
    },
    /// Refresh (RFC 6749 section 6).
    Refresh { refresh_token: &'a Secret },
    /// A still-valid access token swapped for a fresh one (`fb_exchange_token`).
    Exchange { access_token: &'a Secret },
    /// Client credentials (RFC 6749 section 4.4).
    ClientCredentials,
    /// The device code the user approved, or is about to (RFC 8628 section 3.4).
    DeviceCode { device_code: &'a Secret },
    /// A signed JWT as the grant (RFC 7523 section 2.1).
    JwtBearer { assertion: String },
}

impl Grant<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Grant::Code { .. } => "authorization_code",
            Grant::Refresh { .. } => "refresh_token",
            Grant::Exchange { .. } => "fb_exchange_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::DeviceCode { .. } => DEVICE_CODE_GRANT,
            Grant::JwtBearer { .. } => JWT_BEARER_GRANT,
        }
    }
}

/// The request that renews `old`, by the profile's refresh mechanism; an error when only the
/// user can renew it.
pub fn renewal_grant<'t>(
    client: &ClientConfig,
    old: &'t TokenSet,
    now: i64,
) -> Result<Grant<'t>, GrantError> {
    match client.profile.refresh_mechanism {
        RefreshMechanism::RefreshToken => match &old.refresh_token {
            Some(rt) => Ok(Grant::Refresh { refresh_token: rt }),
            None => Err(GrantError::needs_user(
                "the server gave no refresh token, so only a new authorization can renew it",
            )),
        },
        RefreshMechanism::FbExchangeToken if old.valid_for(now, Duration::ZERO) => {
            Ok(Grant::Exchange {
                access_token: &old.access_token,
            })
        }
        RefreshMechanism::FbExchangeToken => Err(GrantError::needs_user(
            "the access token expired before it could be exchanged for a new one",
        )),
        RefreshMechanism::None => Err(GrantError::needs_user(
            "this provider cannot renew tokens without the user",
        )),
    }
}

/// Sends grant requests. One per daemon: its connection pool is shared by every client.
#[derive(Clone)]
pub struct Engine {
    http: std::sync::Arc<std::sync::RwLock<reqwest::Client>>,
    request_timeout: Duration,
    /// Requests out at once, every endpoint together: each holds a descriptor
    /// (`descriptors::for_requests`).
    outgoing: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Idle pooled connections are dropped sooner than the shortest keep-alive servers commonly
/// use (Node's 5 s), so a request never goes out on a connection the server may just have
/// closed: that fails after the request was written, and a refresh cannot be safely sent
/// twice. Bursts (an expiry wave) still share their connections.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

fn http_client(request_timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10).min(request_timeout))
        .timeout(request_timeout)
        // A token endpoint that redirects is misconfigured; following it could send the
        // client secret somewhere else.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("oauth2mci/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {e}"))
}

impl Engine {
    pub fn new(request_timeout: Duration) -> Result<Engine, String> {
        Ok(Engine {
            http: std::sync::Arc::new(std::sync::RwLock::new(http_client(request_timeout)?)),
            request_timeout,
            outgoing: std::sync::Arc::new(tokio::sync::Semaphore::new(
                crate::descriptors::for_requests(),
            )),
        })
    }

    /// Sends `request` once a descriptor is free for it, and reads the whole answer.
    async fn send(
        &self,
        request: reqwest::Request,
    ) -> Result<Result<Answer, String>, reqwest::Error> {
        // Never closed: the engine holds it.
        let _out = self.outgoing.acquire().await;
        let resp = self.http().execute(request).await?;
        Ok(read_answer(resp).await)
    }

    /// The client to send with (a cheap handle on the shared pool).
    fn http(&self) -> reqwest::Client {
        self.http.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops every pooled connection: after a suspend they are dead (the idle timer does not
    /// run while the machine sleeps), and the network may have changed.
    pub fn reset_connections(&self) {
        match http_client(self.request_timeout) {
            Ok(fresh) => *self.http.write().unwrap_or_else(|p| p.into_inner()) = fresh,
            Err(e) => tracing::warn!("cannot renew the HTTP connection pool: {e}"),
        }
    }

    pub async fn exchange_code(
        &self,
        client: &ClientConfig,
        code: &str,
        redirect_uri: &Url,
        verifier: Option<&Secret>,
        callback: &BTreeMap<String, String>,
    ) -> Result<TokenSet, GrantError> {
        let grant = Grant::Code {
            code,
            redirect_uri,
            verifier,
        };
        let mut token = self.token(client, grant).await?;
        for field in &client.profile.callback_fields {
            if let Some(v) = callback.get(field) {
                token.extra.insert(field.clone(), Value::String(v.clone()));
            }
        }
        // What the redirect added is checked like the rest of the answer.
        crate::token::check_token_bytes(&token, client.profile.access_token_chars).map_err(
            |m| {
                GrantError::transient(format!(
                    "the authorization redirect: {m}; nothing was stored"
                ))
            },
        )?;
        Ok(token)
    }

    /// Renews `old` the way the profile says; the answer inherits what it does not replace.
    pub async fn refresh(
        &self,
        client: &ClientConfig,
        old: &TokenSet,
        now: i64,
    ) -> Result<TokenSet, GrantError> {
        let grant = renewal_grant(client, old, now)?;
        let token = self.token(client, grant).await?;
        Ok(token.carry_over(old, client.profile.keep_refresh_token))
    }

    /// A token for a client that needs no user: its own credentials, or a signed assertion.
    pub async fn unattended(
        &self,
        client: &ClientConfig,
        now: i64,
    ) -> Result<TokenSet, GrantError> {
        match (client.grant, &client.jwt) {
            (crate::config::Grant::JwtBearer, Some(jwt)) => {
                let scope = (!client.scopes.is_empty()).then(|| client.scope_string());
                let assertion = crate::jwt::grant_assertion(
                    jwt,
                    scope.as_deref(),
                    client.endpoints.token.as_str(),
                    now,
                )
                .map_err(|e| GrantError::config(format!("cannot sign the grant assertion: {e}")))?;
                self.token(client, Grant::JwtBearer { assertion }).await
            }
            _ => self.token(client, Grant::ClientCredentials).await,
        }
    }

    /// Asks a device authorization endpoint for a user code (RFC 8628 section 3.1): a form with
    /// the client's credentials, as for the token endpoint, and the scope.
    pub async fn device_authorization(
        &self,
        client: &ClientConfig,
        url: Url,
    ) -> Result<Answer, GrantError> {
        let mut params: Params = Vec::new();
        if !client.scopes.is_empty() {
            push(
                &mut params,
                &client.profile.scope_param,
                client.scope_string(),
            );
        }
        let basic = authenticate(client, &mut params, now_ms())?;
        let shown = shown_url(&url);
        let mut req = self
            .http()
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(secret) = basic {
            req = with_basic(req, &client.client_id, secret);
        }
        let mut request = req.form(&params).build().map_err(|e| {
            GrantError::config(format!(
                "cannot build the device authorization request: {}",
                http_error(e)
            ))
        })?;
        set_headers(&mut request, client);
        let answer = self.send(request).await.map_err(|e| {
            GrantError::transient(format!(
                "cannot reach the device authorization endpoint {shown}: {}",
                http_error(e)
            ))
        })?;
        answer.map_err(|m| {
            GrantError::transient(format!("device authorization endpoint {shown}: {m}"))
        })
    }

    /// Sends one grant request and reads the answer through the profile.
    pub async fn token(
        &self,
        client: &ClientConfig,
        grant: Grant<'_>,
    ) -> Result<TokenSet, GrantError> {
        let request = token_request(&self.http(), client, &grant)?;
        let url = request.url().clone();
        let shown = shown_url(&url);
        let answer = self
            .send(request)
            .await
            .map_err(|e| {
                GrantError::transient(format!(
                    "cannot reach the token endpoint {shown}: {}",
                    http_error(e)
                ))
            })?
            .map_err(|m| GrantError::transient(format!("token endpoint {shown}: {m}")))?;
        interpret(&client.profile, &shown, &answer, now_ms())
    }

    /// Revokes the client's grant at the server, the way its profile says.
    pub async fn revoke(&self, client: &ClientConfig, token: &TokenSet) -> Result<(), GrantError> {
        let request = revoke_request(&self.http(), client, token)?;
        // The template, not the request's URL: `revocation: url` puts the token in the path.
        let shown = client.endpoints.revoke.clone().unwrap_or_default();
        let answer = self
            .send(request)
            .await
            .map_err(|e| {
                GrantError::transient(format!(
                    "cannot reach the revocation endpoint {shown}: {}",
                    http_error(e)
                ))
            })?
            .map_err(|m| GrantError::transient(format!("revocation endpoint {shown}: {m}")))?;
        // Slack says `ok: false` with HTTP 200: a 2xx is a success only without an error in it.
        let fields = parse_body(
            client.profile.response_format,
            &answer.content_type,
            &answer.body,
        );
        let endpoint = format!("revocation endpoint {shown}");
        match answer_error(&client.profile, &endpoint, &answer, fields.as_ref()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A URL as shown in messages: without its query, which may carry a secret (Facebook's GET).
fn shown_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// What came back from an endpoint, read in full (and capped).
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
    pub retry_after: Option<Duration>,
}

async fn read_answer(resp: reqwest::Response) -> Result<Answer, String> {
    let status = resp.status().as_u16();
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
    let body = read_capped(resp).await?;
    Ok(Answer {
        status,
        content_type,
        body,
        retry_after,
    })
}

/// The parameters of a request, before the profile decides where they go.
type Params = Vec<(String, String)>;

fn push(params: &mut Params, k: &str, v: impl Into<String>) {
    params.push((k.to_string(), v.into()));
}

/// Builds a token request as the profile shapes it: endpoint, method, where the parameters go,
/// how the client authenticates, which headers. Nothing is sent.
pub fn token_request(
    http: &reqwest::Client,
    client: &ClientConfig,
    grant: &Grant<'_>,
) -> Result<reqwest::Request, GrantError> {
    let profile = &client.profile;
    let mut params: Params = Vec::new();
    push(&mut params, "grant_type", grant.type_name());
    match grant {
        Grant::Code {
            code,
            redirect_uri,
            verifier,
        } => {
            push(&mut params, "code", *code);
            push(&mut params, "redirect_uri", redirect_uri.as_str());
            if let Some(v) = verifier {
                push(&mut params, "code_verifier", v.expose());
            }
        }
        Grant::Refresh { refresh_token } => {
            push(&mut params, "refresh_token", refresh_token.expose());
        }
        Grant::Exchange { access_token } => {
            push(&mut params, "fb_exchange_token", access_token.expose());
        }
        Grant::ClientCredentials => {
            if !client.scopes.is_empty() {
                push(&mut params, "scope", client.scope_string());
            }
        }
        Grant::DeviceCode { device_code } => {
            push(&mut params, "device_code", device_code.expose());
        }
        Grant::JwtBearer { assertion } => {
            push(&mut params, "assertion", assertion.as_str());
            if !client.scopes.is_empty() && profile.jwt_scope_param {
                push(&mut params, "scope", client.scope_string());
            }
        }
    }
    let extra = profile.token_params.iter().chain(
        matches!(grant, Grant::Refresh { .. } | Grant::Exchange { .. })
            .then_some(&profile.refresh_params)
            .into_iter()
            .flatten(),
    );
    for (k, template) in extra {
        // Only {redirect_uri} can lack a value (no fixed redirect URI, no default in the
        // template): the parameter is then left out.
        let Ok(value) = client.param_value(template) else {
            continue;
        };
        params.retain(|(name, _)| name != k);
        push(&mut params, k, value);
    }
    let url = match grant {
        Grant::Refresh { .. } | Grant::Exchange { .. } => &client.endpoints.refresh,
        _ => &client.endpoints.token,
    };
    // The JWT bearer grant is its own proof; a client secret, if any, still authenticates.
    let basic = match grant {
        Grant::JwtBearer { .. } if client.client_secret.is_none() => None,
        _ => authenticate(client, &mut params, now_ms())?,
    };
    let mut url = url.clone();
    if profile.token_request == RequestEncoding::Query {
        url.query_pairs_mut().extend_pairs(&params);
    }
    let mut req = http
        .request(profile.token_method.as_reqwest(), url)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some(secret) = basic {
        req = with_basic(req, &client.client_id, secret);
    }
    req = match profile.token_request {
        RequestEncoding::Form => req.form(&params),
        RequestEncoding::Json => req.json(&json_object(params)),
        RequestEncoding::Query => req,
    };
    let mut request = req.build().map_err(|e| {
        GrantError::config(format!("cannot build the token request: {}", http_error(e)))
    })?;
    set_headers(&mut request, client);
    Ok(request)
}

/// Puts the client's credentials where its authentication method says: the parameters get
/// `client_id` (and the secret for `post`, or a signed assertion for `private_key_jwt`); the
/// secret to send with HTTP Basic is returned. Never both places for the secret (Dropbox
/// refuses that).
fn authenticate<'c>(
    client: &'c ClientConfig,
    params: &mut Params,
    now: i64,
) -> Result<Option<&'c Secret>, GrantError> {
    Ok(
        match (client.client_auth(), &client.client_secret, &client.jwt) {
            (ClientAuth::Basic, Some(secret), _) => Some(secret),
            (ClientAuth::BasicWithClientId, Some(secret), _) => {
                push(params, "client_id", &client.client_id);
                Some(secret)
            }
            (ClientAuth::Post, Some(secret), _) => {
                push(params, "client_id", &client.client_id);
                push(params, "client_secret", secret.expose());
                None
            }
            (ClientAuth::PrivateKeyJwt, _, Some(jwt)) => {
                let assertion = crate::jwt::client_assertion(
                    jwt,
                    &client.client_id,
                    client.endpoints.token.as_str(),
                    now,
                )
                .map_err(|e| {
                    GrantError::config(format!("cannot sign the client assertion: {e}"))
                })?;
                push(params, "client_id", &client.client_id);
                push(params, "client_assertion_type", CLIENT_ASSERTION_TYPE);
                push(params, "client_assertion", assertion);
                None
            }
            _ => {
                push(params, "client_id", &client.client_id);
                None
            }
        },
    )
}

/// RFC 7523 section 2.2.
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// RFC 6749 section 2.3.1: both parts are form-urlencoded before Basic encoding.
fn with_basic(
    req: reqwest::RequestBuilder,
    client_id: &str,
    secret: &Secret,
) -> reqwest::RequestBuilder {
    req.basic_auth(form_encode(client_id), Some(form_encode(secret.expose())))
}

fn json_object(params: Params) -> Map<String, Value> {
    params
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect()
}

/// The profile's headers replace the daemon's (a profile's `Accept` wins); their values may
/// use the token-parameter variables (Reddit's User-Agent names the client id).
fn set_headers(request: &mut reqwest::Request, client: &ClientConfig) {
    for (k, template) in &client.profile.token_headers {
        let value = client
            .param_value(template)
            .unwrap_or_else(|_| template.clone());
        // Names and templates were checked when the profile was resolved.
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            request.headers_mut().insert(name, value);
        }
    }
}

/// Builds the revocation request the profile describes. Nothing is sent.
pub fn revoke_request(
    http: &reqwest::Client,
    client: &ClientConfig,
    token: &TokenSet,
) -> Result<reqwest::Request, GrantError> {
    let profile = &client.profile;
    let Some(template) = client
        .endpoints
        .revoke
        .as_ref()
        .filter(|_| profile.revocation != Revocation::None)
    else {
        return Err(GrantError::config(format!(
            "provider {} offers no token revocation",
            client.provider
        )));
    };
    let (hint, value) = match &token.refresh_token {
        // Revoking the refresh token ends the whole grant (RFC 7009 section 2.1).
        Some(rt) => ("refresh_token", rt),
        None => ("access_token", &token.access_token),
    };
    let filled = template
        .replace("{refresh_token}", &form_encode(value.expose()))
        .replace("{access_token}", &form_encode(token.access_token.expose()));
    let url = Url::parse(&filled)
        .map_err(|e| GrantError::config(format!("the revocation URL is not a URL: {e}")))?;
    let mut req = http.request(profile.revoke_method.as_reqwest(), url);
    req = match profile.revocation {
        Revocation::Rfc7009 => {
            let mut params: Params = Vec::new();
            push(&mut params, "token", value.expose());
            push(&mut params, "token_type_hint", hint);
            if let Some(secret) = authenticate(client, &mut params, now_ms())? {
                req = with_basic(req, &client.client_id, secret);
            }
            match profile.revoke_request {
                RequestEncoding::Json => req.json(&json_object(params)),
                _ => req.form(&params),
            }
        }
        Revocation::Json => {
            let mut body = Map::new();
            body.insert(
                "access_token".into(),
                Value::String(token.access_token.expose().to_string()),
            );
            match &client.client_secret {
                Some(s) => req = with_basic(req, &client.client_id, s),
                None => {
                    body.insert("client_id".into(), Value::String(client.client_id.clone()));
                }
            }
            req.json(&body)
        }
        Revocation::Bearer => req.bearer_auth(token.access_token.expose()),
        Revocation::Url | Revocation::None => req,
    };
    let mut request = req
        .header(reqwest::header::ACCEPT, "application/json")
        .build()
        .map_err(|e| {
            GrantError::config(format!(
                "cannot build the revocation request: {}",
                http_error(e)
            ))
        })?;
    set_headers(&mut request, client);
    Ok(request)
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// An HTTP error in one line, without its URL: a query string may hold a secret (Facebook's
/// GET token request carries the client secret and the token).
fn http_error(e: reqwest::Error) -> String {
    error_chain(&e.without_url())
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
        .map_err(|e| format!("reading the response failed: {}", http_error(e)))?
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

/// Reads a token endpoint's answer through the profile: a `TokenSet`, or the error it carries,
/// classified. Messages name fields and shapes, never values (they may be secrets).
pub fn interpret(
    profile: &Profile,
    url: &str,
    answer: &Answer,
    now: i64,
) -> Result<TokenSet, GrantError> {
    let fields = checked_fields(profile, &format!("token endpoint {url}"), answer)?;
    token_from_fields(profile, &fields, now)
        .and_then(|token| {
            // A broken or hostile server's bytes go no further than here.
            crate::token::check_token_bytes(&token, profile.access_token_chars)?;
            Ok(token)
        })
        .map_err(|m| {
            GrantError::transient(format!(
                "token endpoint {url}: {m}; the previous token stays in use"
            ))
        })
}

/// The fields of a successful answer, or the error it carries (classified), or why it cannot be
/// read.
pub fn checked_fields(
    profile: &Profile,
    endpoint: &str,
    answer: &Answer,
) -> Result<Map<String, Value>, GrantError> {
    let fields = parse_body(profile.response_format, &answer.content_type, &answer.body);
    if let Some(e) = answer_error(profile, endpoint, answer, fields.as_ref()) {
        return Err(e);
    }
    fields.ok_or_else(|| {
        GrantError::transient(format!(
            "{endpoint} answered {} with a body that is not {} ({})",
            answer.status,
            match profile.response_format {
                ResponseFormat::Auto => "JSON or a form",
                ResponseFormat::Json => "JSON, as the profile expects",
                ResponseFormat::Form => "a form, as the profile expects",
            },
            describe_body(&answer.content_type, &answer.body)
        ))
    })
}

/// The error an answer carries, classified: a non-2xx status, an error field (in any status:
/// GitHub and Reddit answer 200), or a false success flag (Slack). `None`: a success.
fn answer_error(
    profile: &Profile,
    endpoint: &str,
    answer: &Answer,
    fields: Option<&Map<String, Value>>,
) -> Option<GrantError> {
    let status = answer.status;
    let raw_code = fields.and_then(|r| {
        profile
            .error_fields
            .iter()
            .find_map(|p| lookup(r, p).and_then(scalar_text))
            .map(|c| text::one_line(&c, 100))
    });
    let failed_flag = fields.is_some_and(|r| {
        profile
            .success_field
            .as_deref()
            .and_then(|p| lookup(r, p))
            .is_some_and(|v| v == &Value::Bool(false) || v.as_str() == Some("false"))
    });
    if (200..300).contains(&status) && raw_code.is_none() && !failed_flag {
        return None;
    }
    let description = fields.and_then(|r| {
        profile
            .error_description_fields
            .iter()
            .find_map(|p| lookup(r, p).and_then(scalar_text))
            .map(|d| text::one_line(&d, 300))
    });
    let error_code = raw_code.as_ref().map(|c| {
        profile
            .error_codes
            .get(c)
            .cloned()
            .unwrap_or_else(|| c.clone())
    });
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
    let mut message = format!("{endpoint} answered {status}");
    match (&raw_code, &error_code, &description) {
        (Some(raw), Some(code), d) => {
            message.push(' ');
            message.push_str(raw);
            if raw != code {
                message.push_str(&format!(" (= {code})"));
            }
            if let Some(d) = d {
                message.push_str(&format!(": {d}"));
            }
        }
        (_, _, Some(d)) if failed_flag => message.push_str(&format!(" with a failure: {d}")),
        _ if failed_flag => message.push_str(" with a failure and no error code"),
        _ => message.push_str(&format!(
            " ({})",
            describe_body(&answer.content_type, &answer.body)
        )),
    }
    Some(GrantError {
        class,
        code: error_code,
        message,
        retry_after: answer.retry_after,
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

/// The body as a map, the way the profile reads it.
fn parse_body(
    format: ResponseFormat,
    content_type: &str,
    body: &[u8],
) -> Option<Map<String, Value>> {
    let json = || match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    };
    let form = || {
        let text = std::str::from_utf8(body).ok()?.trim();
        if !text.contains('=') || text.starts_with('<') || text.starts_with('{') {
            return None;
        }
        Some(
            url::form_urlencoded::parse(text.as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect(),
        )
    };
    match format {
        ResponseFormat::Json => json(),
        ResponseFormat::Form => form(),
        ResponseFormat::Auto => {
            let looks_like_form = content_type.starts_with("application/x-www-form-urlencoded")
                || content_type.starts_with("text/plain");
            json().or_else(|| if looks_like_form { form() } else { None })
        }
    }
}

/// The value at a dotted path in a response; numeric segments index arrays
/// (`errors.0.errorType`).
fn lookup<'v>(root: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut segments = path.split('.');
    let first = root.get(segments.next()?)?;
    segments.try_fold(first, |v, seg| match v {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A code or description: a string, or a number written out.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A number that may come as a JSON number or, where the profile allows, a numeric string.
fn number(v: &Value, key: &str, strings_allowed: bool) -> Result<i64, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .ok_or_else(|| format!("{key} is out of range")),
        Value::String(s) if strings_allowed => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{key} is a string that is not a number")),
        Value::String(_) => Err(format!(
            "{key} is a string, and the profile says numbers come as numbers (numbers_as_strings: false)"
        )),
        other => Err(format!("{key} is not a number ({})", kind(other))),
    }
}

/// Longer than any token lives: a bigger value is a misreading (milliseconds taken for seconds)
/// or garbage, and would overflow the clock arithmetic.
const MAX_LIFETIME_SECS: i64 = 100 * 365 * 86_400;

/// `secs` from now, in milliseconds, refusing what cannot be a lifetime.
fn relative_ms(secs: i64, key: &str, now: i64) -> Result<i64, String> {
    if secs > MAX_LIFETIME_SECS {
        return Err(format!("{key} is more than 100 years ({secs}s)"));
    }
    Ok(now.saturating_add(secs * 1000))
}

/// A Unix time in seconds as milliseconds, refusing what cannot be a time.
fn absolute_ms(secs: i64, key: &str, now: i64) -> Result<i64, String> {
    if secs > now / 1000 + MAX_LIFETIME_SECS {
        return Err(format!("{key} is more than 100 years ahead ({secs})"));
    }
    let at = secs * 1000;
    if at < now - 60_000 {
        return Err(format!(
            "{key} is {}s in the past: the token would be born expired (is this machine's clock right?)",
            (now - at) / 1000
        ));
    }
    Ok(at)
}

fn token_from_fields(
    profile: &Profile,
    root: &Map<String, Value>,
    now: i64,
) -> Result<TokenSet, String> {
    let f = match &profile.token_path {
        Some(path) => match lookup(root, path) {
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(format!(
                    "`{path}` (the profile's token_path) is {}, not an object",
                    kind(other)
                ));
            }
            // A refresh answer may carry the token at the top (Slack's user-token refresh).
            None if root.get("access_token").is_some() => root,
            None => {
                return Err(format!(
                    "the response has no `{path}` (the profile's token_path)"
                ));
            }
        },
        None => root,
    };
    let text = |k: &str| {
        f.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let where_ = profile
        .token_path
        .as_ref()
        .filter(|_| !std::ptr::eq(f, root))
        .map(|p| format!(" in `{p}`"))
        .unwrap_or_default();
    let access_token = match f.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        None | Some(Value::Null) => {
            return Err(format!("the response has no access_token{where_}"));
        }
        Some(other) => {
            return Err(format!(
                "access_token{where_} is {}, not a non-empty string",
                kind(other)
            ));
        }
    };
    // The type as sent is checked before it is read: a garbled one is a garbled answer.
    if let Some(t) = text("token_type") {
        crate::token::check_token_type(&t)?;
    }
    // Slack says `bot` or `user`: not HTTP schemes, and its tokens are sent as Bearer.
    let token_type = match text("token_type") {
        Some(t) if ["dpop", "mac", "pop"].contains(&t.to_ascii_lowercase().as_str()) => t.into(),
        _ => "Bearer".into(),
    };
    let mut expires_at = None;
    for field in &profile.expiry {
        if *field == ExpiryField::Never {
            break;
        }
        let key = field.key();
        let Some(v) = f.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let n = number(v, key, profile.numbers_as_strings)?;
        if n < 0 {
            return Err(format!("{key} is negative ({n})"));
        }
        if n == 0 && !field.is_absolute() {
            // "0" means "not said" for some servers (requests-oauthlib's Mailchimp fix); taken
            // at its word it would have the token refreshed every second.
            continue;
        }
        expires_at = Some(if field.is_absolute() {
            absolute_ms(n, key, now)?
        } else {
            relative_ms(n, key, now)?
        });
        break;
    }
    if expires_at.is_none() && !profile.expiry.contains(&ExpiryField::Never) {
        expires_at = profile
            .default_expires_in
            .map(|d| now.saturating_add(d.0.as_millis().min(i64::MAX as u128) as i64));
    }
    let mut refresh_expires_at: Option<i64> = None;
    for key in &profile.refresh_expiry_fields {
        let Some(v) = f.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let secs = number(v, key, profile.numbers_as_strings)?;
        // Keycloak sends 0 for offline tokens, meaning "no expiry".
        if secs > 0 {
            let at = relative_ms(secs, key, now)?;
            refresh_expires_at = Some(refresh_expires_at.map_or(at, |old| old.min(at)));
        }
    }
    let scope = match f.get("scope") {
        // GitHub answers with commas whatever was asked.
        Some(Value::String(s)) if !s.contains(' ') && s.contains(',') => {
            Some(s.split(',').map(str::trim).collect::<Vec<_>>().join(" "))
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("scope is a list holding {}, not text", kind(v)))
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(" "),
        ),
        // Some servers answer `"scope": null` for "what you asked".
        None | Some(Value::Null) => None,
        Some(other) => {
            return Err(format!(
                "scope is {}, not the space-separated text RFC 6749 section 5.1 asks for",
                kind(other)
            ));
        }
    };
    let mut extra = Map::new();
    for path in &profile.keep_fields {
        if let Some(v) = lookup(root, path) {
            extra.insert(path.clone(), v.clone());
        }
    }
    Ok(TokenSet {
        access_token: Secret::new(access_token),
        token_type,
        refresh_token: text("refresh_token").map(Secret::new),
        id_token: text("id_token").map(Secret::new),
        scope,
        expires_at,
        refresh_expires_at,
        obtained_at: now,
        granted_at: now,
        extra,
        refresh_expiry_slides: false,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(s) if s.is_empty() => "an empty string",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ProfileSpec, resolve};

    fn profile(spec: &str) -> Profile {
        let spec = if spec.contains(':') {
            ProfileSpec::Layer(Box::new(serde_yaml::from_str(spec).unwrap()))
        } else {
            ProfileSpec::Named(spec.to_string())
        };
        resolve(&spec).unwrap().1
    }

    fn answer(status: u16, content_type: &str, body: &[u8]) -> Answer {
        Answer {
            status,
            content_type: content_type.into(),
            body: body.to_vec(),
            retry_after: None,
        }
    }

    fn read(p: &str, status: u16, ct: &str, body: &[u8]) -> Result<TokenSet, GrantError> {
        interpret(
            &profile(p),
            "https://as.example/token",
            &answer(status, ct, body),
            1_000_000,
        )
    }

    const JSON: &str = "application/json";

    #[test]
    fn reads_a_standard_response() {
        let body = br#"{"access_token":"a","token_type":"bearer","expires_in":3600,"refresh_token":"r","scope":"x y"}"#;
        let t = read("generic", 200, JSON, body).unwrap();
        assert_eq!(t.access_token.expose(), "a");
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(t.expires_at, Some(1_000_000 + 3_600_000));
        assert_eq!(t.refresh_token.unwrap().expose(), "r");
        assert_eq!(t.scope.as_deref(), Some("x y"));
    }

    #[test]
    fn numbers_as_strings_only_where_the_profile_allows() {
        let body = br#"{"access_token":"a","expires_in":"60"}"#;
        assert_eq!(
            read("generic", 200, JSON, body).unwrap().expires_at,
            Some(1_060_000)
        );
        let e = read("numbers_as_strings: false", 200, JSON, body).unwrap_err();
        assert!(
            e.message.contains("expires_in is a string"),
            "{}",
            e.message
        );
        assert!(e.message.contains("previous token stays"), "{}", e.message);
    }

    #[test]
    fn response_formats() {
        let form = b"access_token=a&expires_in=5&scope=repo%2Cgist&token_type=bearer";
        let t = read("generic", 200, "application/x-www-form-urlencoded", form).unwrap();
        assert_eq!(t.expires_at, Some(1_005_000));
        assert_eq!(
            t.scope.as_deref(),
            Some("repo gist"),
            "GitHub's commas become spaces"
        );
        // A form sent as text/html is read only by a profile that says responses are forms.
        assert!(read("generic", 200, "text/html", form).is_err());
        assert!(read("response_format: form", 200, "text/html", form).is_ok());
        // A profile that expects JSON refuses a form, and says so.
        let e = read(
            "response_format: json",
            200,
            "application/x-www-form-urlencoded",
            form,
        )
        .unwrap_err();
        assert!(
            e.message.contains("not JSON, as the profile expects"),
            "{}",
            e.message
        );
        // Twitch's scope array.
        let t = read(
            "generic",
            200,
            JSON,
            br#"{"access_token":"a","scope":["x","y"]}"#,
        )
        .unwrap();
        assert_eq!(t.scope.as_deref(), Some("x y"));
        let t = read(
            "generic",
            200,
            JSON,
            br#"{"access_token":"a","scope":null}"#,
        )
        .unwrap();
        assert_eq!(t.scope, None);
        for (body, why) in [
            (
                &br#"{"access_token":"a","scope":7}"#[..],
                "scope is a number",
            ),
            (
                br#"{"access_token":"a","scope":{"x":1}}"#,
                "scope is an object",
            ),
            (
                br#"{"access_token":"a","scope":["x",1]}"#,
                "a list holding a number",
            ),
        ] {
            let e = read("generic", 200, JSON, body).unwrap_err();
            assert!(e.message.contains(why), "{}", e.message);
        }
    }

    #[test]
    fn expiry_representations() {
        // Strava: absolute expires_at wins over expires_in.
        let strava = "expiry: [expires_at, expires_in]";
        let t = read(
            strava,
            200,
            JSON,
            br#"{"access_token":"a","expires_at":2000,"expires_in":5}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(2_000_000));
        let e = read(
            strava,
            200,
            JSON,
            br#"{"access_token":"a","expires_at":10}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("in the past"), "{}", e.message);
        // Facebook's legacy `expires`; Azure v1's `expires_on` as a string.
        let t = read(
            "expiry: [expires_in, expires]",
            200,
            JSON,
            br#"{"access_token":"a","expires":"100"}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(1_100_000));
        let t = read(
            "expiry: [expires_on]",
            200,
            JSON,
            br#"{"access_token":"a","expires_on":"1500"}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(1_500_000));
        // Missing: the profile's default, else no expiry; `never` ignores what is sent.
        let t = read(
            "default_expires_in: 2h",
            200,
            JSON,
            br#"{"access_token":"a"}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(1_000_000 + 7_200_000));
        assert_eq!(
            read("generic", 200, JSON, br#"{"access_token":"a"}"#)
                .unwrap()
                .expires_at,
            None
        );
        let t = read(
            "expiry: [never]",
            200,
            JSON,
            br#"{"access_token":"a","expires_in":5}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at, None);
        let e = read(
            "generic",
            200,
            JSON,
            br#"{"access_token":"a","expires_in":-5}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("negative"));
    }

    #[test]
    fn lifetimes_that_cannot_be_are_refused_or_ignored() {
        let e = read(
            "generic",
            200,
            JSON,
            br#"{"access_token":"a","expires_in":9223372036854775807}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("more than 100 years"), "{}", e.message);
        let e = read(
            "generic",
            200,
            JSON,
            br#"{"access_token":"a","expires_in":1e300}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("more than 100 years"), "{}", e.message);
        let e = read(
            "expiry: [expires_at]",
            200,
            JSON,
            br#"{"access_token":"a","expires_at":99999999999999}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("100 years ahead"), "{}", e.message);
        // 0 means "not said": the default applies, no refresh every second.
        let t = read(
            "default_expires_in: 1h",
            200,
            JSON,
            br#"{"access_token":"a","expires_in":0}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(1_000_000 + 3_600_000));
    }

    #[test]
    fn refresh_token_expiry_takes_the_smallest_known() {
        let intuit =
            "refresh_expiry_fields: [x_refresh_token_expires_in, x_refresh_token_hard_expires_in]";
        let body = br#"{"access_token":"a","x_refresh_token_expires_in":8640000,"x_refresh_token_hard_expires_in":1000}"#;
        assert_eq!(
            read(intuit, 200, JSON, body).unwrap().refresh_expires_at,
            Some(2_000_000)
        );
        let keycloak = br#"{"access_token":"a","refresh_expires_in":0}"#;
        assert_eq!(
            read("generic", 200, JSON, keycloak)
                .unwrap()
                .refresh_expires_at,
            None
        );
    }

    #[test]
    fn nested_tokens_and_kept_fields() {
        let slack =
            "token_path: authed_user\nkeep_fields: [team.id, bot_user_id]\nsuccess_field: ok";
        let body = br#"{"ok":true,"access_token":"xoxb-bot","team":{"id":"T1"},"bot_user_id":"U0",
            "authed_user":{"id":"U1","access_token":"xoxp-user","refresh_token":"xoxe-r","expires_in":43200}}"#;
        let t = read(slack, 200, JSON, body).unwrap();
        assert_eq!(t.access_token.expose(), "xoxp-user");
        assert_eq!(t.refresh_token.as_ref().unwrap().expose(), "xoxe-r");
        assert_eq!(t.extra.get("team.id"), Some(&Value::String("T1".into())));
        assert_eq!(
            t.extra.get("bot_user_id"),
            Some(&Value::String("U0".into()))
        );
        assert_eq!(
            t.token_type, "Bearer",
            "Slack's `user` is not an HTTP scheme"
        );
        // A refresh answer carries the user token at the top level.
        let t = read(slack, 200, JSON, br#"{"ok":true,"access_token":"xoxp-2","refresh_token":"r2","expires_in":43200,"token_type":"user"}"#).unwrap();
        assert_eq!(t.access_token.expose(), "xoxp-2");
        let e = read(slack, 200, JSON, br#"{"ok":true,"team":{"id":"T1"}}"#).unwrap_err();
        assert!(e.message.contains("no `authed_user`"), "{}", e.message);
    }

    #[test]
    fn errors_in_every_shape() {
        let e = read(
            "generic",
            400,
            JSON,
            br#"{"error":"invalid_grant","error_description":"revoked"}"#,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsUser);
        assert!(e.message.contains("invalid_grant: revoked"));
        // Server text cannot forge log lines (found by the token_response fuzz target).
        let e = read(
            "generic",
            400,
            JSON,
            br#"{"error":"bad\nINFO forged","error_description":"x\r\nERROR forged\u0000"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            r"token endpoint https://as.example/token answered 400 bad\nINFO forged: x\r\nERROR forged\u{0}"
        );
        // GitHub: HTTP 200, form-encoded, its own code.
        let github = "error_codes: {bad_refresh_token: invalid_grant}";
        let e = read(github, 200, "application/x-www-form-urlencoded", b"error=bad_refresh_token&error_description=The+refresh+token+passed+is+incorrect+or+expired.").unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsUser);
        assert_eq!(e.code.as_deref(), Some("invalid_grant"));
        assert!(
            e.message
                .contains("bad_refresh_token (= invalid_grant): The refresh token"),
            "{}",
            e.message
        );
        // Slack: ok:false with HTTP 200.
        let slack = "success_field: ok\nerror_codes: {invalid_refresh_token: invalid_grant}";
        let e = read(
            slack,
            200,
            JSON,
            br#"{"ok":false,"error":"invalid_refresh_token"}"#,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsUser);
        let e = read(slack, 200, JSON, br#"{"ok":false}"#).unwrap_err();
        assert!(
            e.message.contains("failure and no error code"),
            "{}",
            e.message
        );
        // Fitbit's array, Twitch's message.
        let fitbit = "error_fields: [error, errors.0.errorType]\nerror_description_fields: [errors.0.message]";
        let e = read(fitbit, 400, JSON, br#"{"errors":[{"errorType":"invalid_grant","message":"Refresh token invalid"}],"success":false}"#).unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsUser);
        assert!(e.message.contains("Refresh token invalid"));
        let twitch =
            "error_fields: [error, message]\nerror_codes: {Invalid refresh token: invalid_grant}";
        let e = read(
            twitch,
            400,
            JSON,
            br#"{"status":400,"message":"Invalid refresh token"}"#,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsUser);
        // Unknown shapes are transient and never quoted.
        let e = read("generic", 503, "text/html", b"<html>secret-value</html>").unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(e.message.contains("text/html, 25 bytes") && !e.message.contains("secret"));
        let e = read("generic", 401, JSON, br#"{"error":"invalid_client"}"#).unwrap_err();
        assert_eq!(e.class, ErrorClass::Config);
    }

    #[test]
    fn refuses_incomplete_answers_without_quoting_them() {
        let e = read("generic", 200, JSON, br#"{"token":"secret-value"}"#).unwrap_err();
        assert!(e.message.contains("no access_token") && !e.message.contains("secret-value"));
        let e = read(
            "generic",
            200,
            JSON,
            br#"{"access_token":"a","expires_in":"soon"}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("not a number"));
        let e = read("generic", 200, "text/html", b"<html>secret-value</html>").unwrap_err();
        assert!(!e.message.contains("secret-value"));
        let e = read("generic", 200, JSON, b"").unwrap_err();
        assert!(e.message.contains("empty body"), "{}", e.message);
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
