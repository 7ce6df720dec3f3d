//! Provider profiles: how one authorization server deviates from RFC 6749, as data.
//!
//! A profile is a set of values on the quirk dimensions of `../shared/provider-quirks.md`
//! (section 3); the OAuth engine (`oauth`) reads them and never looks at a provider's name.
//! Built-in profiles live in `providers.yaml`, embedded in the binary. A client's profile is built
//! in layers: `generic`, then the named base, then the client's own overrides; the result is
//! checked for impossible combinations before any client uses it. This module owns the layers,
//! their merge and that check; it does no I/O.

use crate::duration::Dur;
use crate::token::TokenChars;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// How the client authenticates at the token endpoint. A request never carries the secret in
/// two places (Dropbox refuses that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the client id and secret.
    Basic,
    /// `client_secret_post`: both in the request parameters.
    Post,
    /// HTTP Basic, and `client_id` in the parameters as well (X).
    BasicWithClientId,
    /// A public client: only `client_id` in the parameters.
    None,
    /// `private_key_jwt` (RFC 7523 section 2.2): a JWT signed with the client's key.
    PrivateKeyJwt,
}

/// Whether the authorization request carries a PKCE challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PkceMode {
    /// The server refuses requests without PKCE: clients cannot turn it off.
    Required,
    /// Used unless the client says `pkce: false`.
    Supported,
    /// The server rejects or mishandles PKCE parameters: never sent.
    Off,
}

/// Where a token request's parameters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestEncoding {
    /// `application/x-www-form-urlencoded` body (RFC 6749).
    Form,
    /// A JSON object body.
    Json,
    /// The URL's query string, with an empty body (Strava, Facebook's GET).
    Query,
}

/// An HTTP method a profile may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    pub fn as_reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// How a token response body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// By content type, then JSON, then form (what grant and golang/oauth2 do).
    Auto,
    /// JSON only.
    Json,
    /// `application/x-www-form-urlencoded` only, whatever the content type says.
    Form,
}

/// A response field that says when the access token expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryField {
    /// Seconds from now (RFC 6749).
    ExpiresIn,
    /// Seconds from now, under its legacy name (Facebook).
    Expires,
    /// Absolute Unix time in seconds (Strava).
    ExpiresAt,
    /// Absolute Unix time in seconds (Azure AD v1).
    ExpiresOn,
    /// The access token does not expire, whatever the response says.
    Never,
}

impl ExpiryField {
    pub fn key(self) -> &'static str {
        match self {
            ExpiryField::ExpiresIn => "expires_in",
            ExpiryField::Expires => "expires",
            ExpiryField::ExpiresAt => "expires_at",
            ExpiryField::ExpiresOn => "expires_on",
            ExpiryField::Never => "never",
        }
    }

    pub fn is_absolute(self) -> bool {
        matches!(self, ExpiryField::ExpiresAt | ExpiryField::ExpiresOn)
    }
}

/// What a refresh does to the refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotation {
    /// The same refresh token serves until revoked.
    Never,
    /// Every refresh returns a new one; the old one dies (at once or after a grace time).
    Always,
    /// A new one comes back sometimes.
    Sometimes,
}

/// How an access token is renewed without the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshMechanism {
    /// `grant_type=refresh_token` (RFC 6749 section 6).
    RefreshToken,
    /// Facebook: a still-valid access token is swapped for a new one
    /// (`grant_type=fb_exchange_token`); an expired one cannot be.
    FbExchangeToken,
    /// No way: a new authorization when the access token ends.
    None,
}

/// How a token is revoked at the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// RFC 7009: form `token` + `token_type_hint`, with the client's authentication.
    Rfc7009,
    /// A JSON body `{"access_token": …}` with the client's authentication (GitHub).
    Json,
    /// `Authorization: Bearer` with the access token, no body (Dropbox, Slack, Aidbox).
    Bearer,
    /// The token is part of the URL (`{refresh_token}` in `revoke_url`, HubSpot).
    Url,
    /// The server offers no revocation.
    None,
}

/// Declares the profile fields once: the override layer (`ProfileLayer`, every field optional,
/// as written in YAML) and the resolved `Profile` are both generated from this list, so a new
/// quirk dimension is one line here.
macro_rules! profile_fields {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr ;)*) => {
        /// One layer of a profile as written in YAML: a built-in entry or a client's override.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ProfileLayer {
            /// The built-in profile this layer starts from (default `generic`).
            pub base: Option<String>,
            $( $(#[$doc])* pub $name: Option<$ty>, )*
        }

        /// A resolved profile: every dimension has a value.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub struct Profile {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl ProfileLayer {
            /// `self` wins where it has a value.
            fn over(self, below: ProfileLayer) -> ProfileLayer {
                ProfileLayer {
                    base: self.base.or(below.base),
                    $( $name: self.$name.or(below.$name), )*
                }
            }

            fn resolve(self) -> Profile {
                Profile { $( $name: self.$name.unwrap_or_else(|| $default), )* }
            }
        }
    };
}

profile_fields! {
    /// One line for `oauth2mci providers`.
    description: String = String::new();
    /// Where the facts come from.
    documentation: Option<String> = None;

    // 1. Endpoints. Templates may use {base_url}, {tenant}, {domain}, {realm}, {region} and
    // {version}, with a default after a colon: `{tenant:common}`.
    /// Authorization endpoint template.
    authorize_url: Option<String> = None;
    /// Token endpoint template.
    token_url: Option<String> = None;
    /// Where refresh requests go when not the token endpoint.
    refresh_url: Option<String> = None;
    /// Revocation endpoint template; may also use {client_id} and, with `revocation: url`,
    /// {refresh_token} or {access_token}.
    revoke_url: Option<String> = None;
    /// Device authorization endpoint template (RFC 8628).
    device_authorization_url: Option<String> = None;
    /// The issuer identifier, checked against `iss` in the authorization response (RFC 9207).
    issuer: Option<String> = None;

    // 2-3. What makes the server issue a refresh token, and other authorize parameters.
    /// Extra query parameters of the authorization request.
    authorize_params: BTreeMap<String, String> = BTreeMap::new();
    /// Scopes always requested, whatever the client names, because without them the server
    /// issues no refresh token (`offline_access`).
    offline_scopes: Vec<String> = Vec::new();

    // 4. Scopes.
    /// Scopes requested when the client names none.
    default_scopes: Vec<String> = Vec::new();
    /// Separator of scopes in requests.
    scope_separator: String = " ".to_string();
    /// The authorize parameter that carries the scopes (`user_scope` for Slack user tokens).
    scope_param: String = "scope".to_string();

    // 5-6. Client authentication and PKCE.
    /// Client authentication at the token endpoint, for a client with a secret.
    client_auth: ClientAuth = ClientAuth::Basic;
    /// PKCE S256 use.
    pkce: PkceMode = PkceMode::Supported;
    /// Whether a JWT bearer grant sends the scopes as a `scope` parameter too (RFC 7523);
    /// they are always in the assertion's `scope` claim, where Google reads them.
    jwt_scope_param: bool = true;

    // 7. Token request transport.
    /// Where the parameters of a token request go.
    token_request: RequestEncoding = RequestEncoding::Form;
    /// The token request's HTTP method.
    token_method: Method = Method::Post;
    /// Extra headers on every token request (`Accept`, `User-Agent`...); values may use
    /// {client_id} and {scope}.
    token_headers: BTreeMap<String, String> = BTreeMap::new();
    /// Extra parameters of every token request; values may use {client_id}, {redirect_uri}
    /// and {scope}.
    token_params: BTreeMap<String, String> = BTreeMap::new();
    /// Extra parameters of refresh requests only (Yahoo's `redirect_uri`), same templates; a
    /// parameter whose {redirect_uri} has no value (no fixed redirect URI, no default) is left out.
    refresh_params: BTreeMap<String, String> = BTreeMap::new();

    // 8. Response parsing.
    /// How the response body is read.
    response_format: ResponseFormat = ResponseFormat::Auto;
    /// Whether numbers may come as strings (`"expires_in": "28800"`).
    numbers_as_strings: bool = true;

    // 9. Where the token lives, and what else to keep.
    /// Dotted path of the object holding the token fields (`authed_user` for Slack user
    /// tokens); the top level when unset.
    token_path: Option<String> = None;
    /// Dotted paths of response fields kept with the token and served with it
    /// (`instance_url`, `team.id`...).
    keep_fields: Vec<String> = Vec::new();
    /// Query parameters of the authorization redirect kept with the token (`realmId`).
    callback_fields: Vec<String> = Vec::new();
    /// The characters an access token may hold; a token with any other is refused like a
    /// garbled answer. RFC 6750's `b64token` unless the server is known to go beyond it.
    access_token_chars: TokenChars = TokenChars::B64token;

    // 10. Access-token expiry.
    /// The fields that say when the access token expires, first found wins.
    expiry: Vec<ExpiryField> = vec![ExpiryField::ExpiresIn];
    /// Access-token lifetime to assume when a response gives none.
    default_expires_in: Option<Dur> = None;

    // 11. Refresh-token expiry.
    /// Response fields giving the refresh token's remaining lifetime in seconds; the smallest
    /// wins, 0 means none.
    refresh_expiry_fields: Vec<String> =
        vec!["refresh_token_expires_in".to_string(), "refresh_expires_in".to_string()];

    // 12. Errors.
    /// Dotted paths that hold the error code, first found wins; checked in every answer,
    /// including HTTP 200 (GitHub, Reddit).
    error_fields: Vec<String> = vec!["error".to_string()];
    /// Dotted paths that hold the error's description.
    error_description_fields: Vec<String> = vec!["error_description".to_string()];
    /// A boolean field that is `false` on failure (Slack's `ok`).
    success_field: Option<String> = None;
    /// The provider's error codes mapped to RFC 6749 ones (`bad_refresh_token: invalid_grant`).
    error_codes: BTreeMap<String, String> = BTreeMap::new();

    // 13. Refresh-token rotation.
    /// What a refresh does to the refresh token.
    refresh_token_rotation: Rotation = Rotation::Sometimes;
    /// When a refresh answer carries no refresh token, keep the old one (false: the grant ends
    /// with the access token).
    keep_refresh_token: bool = true;

    // 14. Refresh-token lifetime.
    /// The refresh token dies after this long unused; the daemon refreshes before then.
    refresh_token_idle_lifetime: Option<Dur> = None;
    /// The grant ends this long after the authorization, however often it is refreshed; the
    /// daemon warns `refresh.warn_before` ahead.
    refresh_token_max_lifetime: Option<Dur> = None;

    // 15. Refresh semantics that affect scheduling.
    /// The server issues a new access token only when the current one has less than this
    /// left (Strava: 1h); refreshing earlier is pointless.
    reissue_within: Option<Dur> = None;

    // 16. How tokens are renewed.
    /// The refresh mechanism.
    refresh_mechanism: RefreshMechanism = RefreshMechanism::RefreshToken;

    // 17. Revocation.
    /// How tokens are revoked.
    revocation: Revocation = Revocation::Rfc7009;
    /// The revocation request's HTTP method.
    revoke_method: Method = Method::Post;
    /// The body of an RFC 7009 revocation: form (the RFC) or json (Intuit, Notion).
    revoke_request: RequestEncoding = RequestEncoding::Form;
}

/// The embedded built-in profiles, as layers.
fn builtins() -> &'static BTreeMap<String, ProfileLayer> {
    static BUILTINS: OnceLock<BTreeMap<String, ProfileLayer>> = OnceLock::new();
    BUILTINS.get_or_init(|| {
        // The file is part of the binary and every entry is resolved and checked by a unit test,
        // so a failure here is a build defect, not bad input.
        serde_yaml::from_str(include_str!("providers.yaml"))
            .expect("src/providers.yaml is checked by the test suite")
    })
}

/// Names of the built-in profiles, sorted.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    builtins().keys().map(String::as_str)
}

/// The profile a client asked for: a name, or a layer over a base.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProfileSpec {
    Named(String),
    Layer(Box<ProfileLayer>),
}

impl Default for ProfileSpec {
    fn default() -> Self {
        ProfileSpec::Named("generic".into())
    }
}

impl<'de> Deserialize<'de> for ProfileSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ProfileSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a built-in provider name, or a map of profile fields")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ProfileSpec, E> {
                Ok(ProfileSpec::Named(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<ProfileSpec, A::Error> {
                ProfileLayer::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(|l| ProfileSpec::Layer(Box::new(l)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Why a profile cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("unknown provider {0:?}; built-in providers are: {1}")]
    Unknown(String, String),
    /// A field's value, alone or with another, cannot work.
    #[error("{message}")]
    Invalid {
        /// The profile field at fault, for locating it in the file.
        field: &'static str,
        message: String,
    },
}

/// Builds a client's profile: `generic` ← named base ← the client's layer, then checks it.
pub fn resolve(spec: &ProfileSpec) -> Result<(String, Profile), ProfileError> {
    let (base_name, layer) = match spec {
        ProfileSpec::Named(name) => (name.clone(), ProfileLayer::default()),
        ProfileSpec::Layer(l) => (
            l.base.clone().unwrap_or_else(|| "generic".into()),
            (**l).clone(),
        ),
    };
    let builtins = builtins();
    let unknown = |name: &str| {
        ProfileError::Unknown(
            name.to_string(),
            builtin_names().collect::<Vec<_>>().join(", "),
        )
    };
    // A built-in may itself start from another (`slack-user` from `slack`).
    let mut merged = layer;
    let mut next = Some(base_name.clone());
    let mut seen: Vec<String> = Vec::new();
    while let Some(name) = next.take() {
        if seen.contains(&name) {
            return Err(ProfileError::Invalid {
                field: "base",
                message: format!("profiles {} start from each other", seen.join(" -> ")),
            });
        }
        let below = builtins.get(&name).cloned().ok_or_else(|| unknown(&name))?;
        next = below.base.clone().filter(|b| b != "generic");
        merged = merged.over(ProfileLayer {
            base: None,
            ..below
        });
        seen.push(name);
    }
    let generic = builtins.get("generic").cloned().unwrap_or_default();
    let label = match spec {
        ProfileSpec::Named(_) => base_name,
        ProfileSpec::Layer(_) => format!("{base_name}+custom"),
    };
    let profile = merged.over(generic).resolve();
    profile.check()?;
    Ok((label, profile))
}

/// Resolved profiles, one per distinct spec: the clients of a provider share one `Profile`
/// (680 bytes and its strings) instead of each holding a copy, which is most of a client's
/// configuration when there are 100,000 of them.
#[derive(Default)]
pub struct Profiles {
    // foldhash: a spec is hashed for every client at start-up, and the file is trusted input.
    resolved: HashMap<ProfileSpec, (Arc<str>, Arc<Profile>), foldhash::fast::RandomState>,
}

impl Profiles {
    /// `resolve`, once per distinct spec.
    pub fn resolve(
        &mut self,
        spec: &ProfileSpec,
    ) -> Result<(Arc<str>, Arc<Profile>), ProfileError> {
        if let Some((label, profile)) = self.resolved.get(spec) {
            return Ok((label.clone(), profile.clone()));
        }
        let (label, profile) = resolve(spec)?;
        let (label, profile): (Arc<str>, _) = (label.into(), Arc::new(profile));
        self.resolved
            .insert(spec.clone(), (label.clone(), profile.clone()));
        Ok((label, profile))
    }
}

/// The standard error codes of RFC 6749 section 5.2 (and RFC 8628), which `error_codes` may map to.
pub const STANDARD_ERRORS: [&str; 10] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "access_denied",
    "server_error",
    "temporarily_unavailable",
    "expired_token",
];

/// Parameters the daemon sets itself; `token_params`/`refresh_params` may not.
const RESERVED_TOKEN_PARAMS: [&str; 7] = [
    "grant_type",
    "code",
    "code_verifier",
    "refresh_token",
    "client_id",
    "client_secret",
    "fb_exchange_token",
];

/// Headers the daemon sets itself; `token_headers` may not.
const RESERVED_HEADERS: [&str; 5] = [
    "authorization",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
];

/// The variables a token-request parameter value may use.
const PARAM_VARIABLES: [&str; 3] = ["client_id", "redirect_uri", "scope"];

impl Profile {
    /// Refuses values that cannot work, alone or together.
    pub fn check(&self) -> Result<(), ProfileError> {
        let bad =
            |field: &'static str, message: String| Err(ProfileError::Invalid { field, message });
        if self.token_method == Method::Get && self.token_request != RequestEncoding::Query {
            return bad(
                "token_method",
                "a GET token request carries its parameters in the URL: set `token_request: query`"
                    .into(),
            );
        }
        if self.token_method == Method::Delete {
            return bad("token_method", "a token request is a POST or a GET".into());
        }
        if self.revoke_method == Method::Get {
            return bad(
                "revoke_method",
                "a revocation is a POST or a DELETE, never a GET (it would be cached or replayed)"
                    .into(),
            );
        }
        if self.revoke_request == RequestEncoding::Query {
            return bad(
                "revoke_request",
                "a revocation body is a form or JSON; a token in the URL is `revocation: url`"
                    .into(),
            );
        }
        if self.revocation == Revocation::Rfc7009 && self.revoke_method == Method::Delete {
            return bad(
                "revoke_method",
                "an RFC 7009 revocation is a POST (a body on a DELETE is often dropped)".into(),
            );
        }
        if self.response_format == ResponseFormat::Form && !self.numbers_as_strings {
            return bad(
                "numbers_as_strings",
                "every value of a form is a string: a form response needs `numbers_as_strings: true`".into(),
            );
        }
        if self.expiry.is_empty() {
            return bad("expiry", "name at least one field, or `[never]`".into());
        }
        if self.expiry.contains(&ExpiryField::Never) && self.expiry.len() > 1 {
            return bad(
                "expiry",
                "`never` cannot be combined with other fields".into(),
            );
        }
        if self.expiry.contains(&ExpiryField::Never) && self.default_expires_in.is_some() {
            return bad(
                "default_expires_in",
                "a token that never expires has no default lifetime: remove one of them".into(),
            );
        }
        if self.default_expires_in.is_some_and(|d| d.0.as_secs() == 0) {
            return bad("default_expires_in", "must be at least 1s".into());
        }
        if self.scope_separator.is_empty() {
            return bad("scope_separator", "may not be empty".into());
        }
        if self.scope_param.trim().is_empty() {
            return bad("scope_param", "may not be empty".into());
        }
        let paths = std::iter::once(("token_path", self.token_path.as_slice())).chain([
            ("keep_fields", self.keep_fields.as_slice()),
            ("error_fields", self.error_fields.as_slice()),
            (
                "error_description_fields",
                self.error_description_fields.as_slice(),
            ),
            ("success_field", self.success_field.as_slice()),
            (
                "refresh_expiry_fields",
                self.refresh_expiry_fields.as_slice(),
            ),
            ("callback_fields", self.callback_fields.as_slice()),
        ]);
        for (field, list) in paths {
            if let Some(p) = list.iter().find(|p| p.split('.').any(str::is_empty)) {
                return bad(field, format!("{p:?} is not a dotted path like `team.id`"));
            }
        }
        if self.error_fields.is_empty() {
            return bad(
                "error_fields",
                "name at least one field (usually `error`)".into(),
            );
        }
        if let Some((code, to)) = self
            .error_codes
            .iter()
            .find(|(_, to)| !STANDARD_ERRORS.contains(&to.as_str()))
        {
            return bad(
                "error_codes",
                format!(
                    "{code:?} maps to {to:?}, which is not a standard code ({})",
                    STANDARD_ERRORS.join(", ")
                ),
            );
        }
        if self.refresh_mechanism == RefreshMechanism::None
            && self.refresh_token_rotation == Rotation::Always
        {
            return bad(
                "refresh_token_rotation",
                "a provider without refresh (`refresh_mechanism: none`) cannot rotate refresh tokens".into(),
            );
        }
        if !self.keep_refresh_token && self.refresh_token_rotation == Rotation::Never {
            return bad(
                "keep_refresh_token",
                "a refresh token that never rotates is the one to keep: set `keep_refresh_token: true` or change `refresh_token_rotation`".into(),
            );
        }
        if let (Some(idle), Some(max)) = (
            self.refresh_token_idle_lifetime,
            self.refresh_token_max_lifetime,
        ) && idle > max
        {
            return bad(
                "refresh_token_idle_lifetime",
                "is longer than refresh_token_max_lifetime".into(),
            );
        }
        if let Some(url) = &self.revoke_url {
            let has_token = url.contains("{refresh_token}") || url.contains("{access_token}");
            match (self.revocation, has_token) {
                (Revocation::Url, false) => {
                    return bad(
                        "revoke_url",
                        "`revocation: url` needs {refresh_token} or {access_token} in revoke_url"
                            .into(),
                    );
                }
                (Revocation::Url, true) => {}
                (_, true) => {
                    return bad(
                        "revoke_url",
                        "a token in the URL needs `revocation: url` (and is logged by proxies)"
                            .into(),
                    );
                }
                (_, false) => {}
            }
        }
        for (name, value) in &self.token_headers {
            let Ok(header) = reqwest::header::HeaderName::from_bytes(name.as_bytes()) else {
                return bad(
                    "token_headers",
                    format!("{name:?} is not a valid header name"),
                );
            };
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return bad(
                    "token_headers",
                    format!("{name:?} is set by the daemon itself"),
                );
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return bad(
                    "token_headers",
                    format!("the value of {name:?} is not a valid header value"),
                );
            }
            // {redirect_uri} may have no value, and a header cannot be left out like a parameter.
            if let Err(m) = check_template(value, &["client_id", "scope"]) {
                return bad("token_headers", format!("{name}: {m}"));
            }
        }
        for (field, params) in [
            ("token_params", &self.token_params),
            ("refresh_params", &self.refresh_params),
        ] {
            for (k, v) in params {
                if RESERVED_TOKEN_PARAMS.contains(&k.as_str()) {
                    return bad(field, format!("{k:?} is set by the daemon itself"));
                }
                if let Err(m) = check_template(v, &PARAM_VARIABLES) {
                    return bad(field, format!("{k}: {m}"));
                }
            }
        }
        Ok(())
    }
}

/// Fills `{base_url}`, `{tenant:common}`... in a template; a variable without a value takes
/// its default or is named in the error. Variables in `late` are left for later.
pub fn fill_template(
    template: &str,
    vars: &BTreeMap<String, String>,
    late: &[&str],
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in template {template:?}"))?;
        let inner = &after[..close];
        let (var, default) = match inner.split_once(':') {
            Some((v, d)) => (v, Some(d)),
            None => (inner, None),
        };
        if late.contains(&var) {
            out.push('{');
            out.push_str(inner);
            out.push('}');
        } else {
            let value = vars
                .get(var)
                .map(String::as_str)
                .or(default)
                .ok_or_else(|| {
                    format!("template {template:?} needs `{var}`: set `{var}:` on the client")
                })?;
            out.push_str(value.trim_end_matches('/'));
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks that a template uses only `allowed` variables.
fn check_template(template: &str, allowed: &[&str]) -> Result<(), String> {
    let empty = BTreeMap::new();
    fill_template(template, &empty, allowed)
        .map(|_| ())
        .map_err(|_| {
            format!(
                "{template:?} uses a variable other than {{{}}}",
                allowed.join("}, {")
            )
        })
}

/// A built-in profile, resolved, as YAML for `oauth2mci providers NAME`.
pub fn show(name: &str) -> Result<String, ProfileError> {
    let (_, profile) = resolve(&ProfileSpec::Named(name.to_string()))?;
    serde_yaml::to_string(&profile).map_err(|e| ProfileError::Invalid {
        field: "description",
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(yaml: &str) -> ProfileSpec {
        ProfileSpec::Layer(Box::new(serde_yaml::from_str(yaml).unwrap()))
    }

    #[test]
    fn embedded_profiles_parse_resolve_and_pass_the_checks() {
        assert!(builtin_names().any(|n| n == "generic"));
        for name in builtin_names() {
            let (_, p) = resolve(&ProfileSpec::Named(name.into()))
                .unwrap_or_else(|e| panic!("built-in profile {name}: {e}"));
            assert!(!p.description.is_empty(), "{name} has no description");
            assert!(show(name).unwrap().contains("token_request"));
        }
    }

    #[test]
    fn layers_override_base_and_generic() {
        let (label, p) =
            resolve(&layer("token_url: https://x/token\ntoken_request: json\n")).unwrap();
        assert_eq!(label, "generic+custom");
        assert_eq!(p.token_request, RequestEncoding::Json);
        assert_eq!(p.client_auth, ClientAuth::Basic);
        assert_eq!(p.token_url.as_deref(), Some("https://x/token"));
    }

    #[test]
    fn unknown_fields_and_providers_are_refused() {
        let e = serde_yaml::from_str::<ProfileLayer>("tokn_url: x").unwrap_err();
        assert!(e.to_string().contains("unknown field `tokn_url`"));
        let e = resolve(&ProfileSpec::Named("gogle".into())).unwrap_err();
        assert!(e.to_string().contains("unknown provider \"gogle\""));
        let e = serde_yaml::from_str::<ProfileLayer>("client_auth: both").unwrap_err();
        assert!(e.to_string().contains("unknown variant `both`"), "{e}");
    }

    #[test]
    fn impossible_combinations_are_refused_with_the_field() {
        let cases = [
            ("token_method: GET", "token_method", "token_request: query"),
            ("token_method: DELETE", "token_method", "POST or a GET"),
            ("revoke_method: GET", "revoke_method", "never a GET"),
            ("expiry: []", "expiry", "at least one"),
            (
                "expiry: [never, expires_in]",
                "expiry",
                "cannot be combined",
            ),
            (
                "expiry: [never]\ndefault_expires_in: 1h",
                "default_expires_in",
                "never expires",
            ),
            (
                "default_expires_in: 0s",
                "default_expires_in",
                "at least 1s",
            ),
            ("scope_separator: ''", "scope_separator", "empty"),
            ("token_path: 'a..b'", "token_path", "dotted path"),
            (
                "error_codes: {bad: nope}",
                "error_codes",
                "not a standard code",
            ),
            (
                "refresh_mechanism: none\nrefresh_token_rotation: always",
                "refresh_token_rotation",
                "cannot rotate",
            ),
            (
                "refresh_token_rotation: never\nkeep_refresh_token: false",
                "keep_refresh_token",
                "the one to keep",
            ),
            (
                "refresh_token_idle_lifetime: 90d\nrefresh_token_max_lifetime: 30d",
                "refresh_token_idle_lifetime",
                "longer",
            ),
            (
                "revocation: url\nrevoke_url: https://x/revoke",
                "revoke_url",
                "needs {refresh_token}",
            ),
            (
                "revoke_url: https://x/r/{refresh_token}",
                "revoke_url",
                "needs `revocation: url`",
            ),
            (
                "token_headers: {'bad header': x}",
                "token_headers",
                "not a valid header name",
            ),
            (
                "token_headers: {Authorization: x}",
                "token_headers",
                "set by the daemon",
            ),
            (
                "token_params: {grant_type: x}",
                "token_params",
                "set by the daemon",
            ),
            ("revoke_request: query", "revoke_request", "form or JSON"),
            (
                "revoke_method: DELETE",
                "revoke_method",
                "RFC 7009 revocation is a POST",
            ),
            (
                "response_format: form\nnumbers_as_strings: false",
                "numbers_as_strings",
                "every value of a form",
            ),
            (
                "token_headers: {X-R: '{redirect_uri}'}",
                "token_headers",
                "variable other than",
            ),
            (
                "refresh_params: {redirect_uri: '{secret}'}",
                "refresh_params",
                "variable other than",
            ),
        ];
        for (yaml, field, words) in cases {
            match resolve(&layer(yaml)) {
                Err(ProfileError::Invalid { field: f, message }) => {
                    assert_eq!(f, field, "{yaml}");
                    assert!(message.contains(words), "{yaml}: {message}");
                }
                other => panic!("{yaml}: expected a refusal, got {other:?}"),
            }
        }
        // The same fields with values that work are accepted.
        resolve(&layer(
            "token_method: GET\ntoken_request: query\nrevocation: url\nrevoke_url: https://x/r/{refresh_token}\nrevoke_method: DELETE\nrefresh_params: {redirect_uri: '{redirect_uri}'}",
        ))
        .unwrap();
    }

    #[test]
    fn templates_fill_defaults_and_name_missing_vars() {
        let vars = BTreeMap::from([("base_url".to_string(), "https://fhir.example/".to_string())]);
        assert_eq!(
            fill_template("{base_url}/auth/token", &vars, &[]).unwrap(),
            "https://fhir.example/auth/token"
        );
        assert_eq!(
            fill_template("https://login.example/{tenant:common}/token", &vars, &[]).unwrap(),
            "https://login.example/common/token"
        );
        assert_eq!(
            fill_template("{base_url:https://gitlab.com}/oauth", &BTreeMap::new(), &[]).unwrap(),
            "https://gitlab.com/oauth"
        );
        assert_eq!(
            fill_template(
                "https://x/{client_id}/{refresh_token}",
                &BTreeMap::from([("client_id".into(), "c".into())]),
                &["refresh_token"]
            )
            .unwrap(),
            "https://x/c/{refresh_token}"
        );
        let e = fill_template("https://{tenant}/x", &vars, &[]).unwrap_err();
        assert!(e.contains("`tenant`"), "{e}");
        assert!(
            fill_template("https://{tenant/x", &vars, &[])
                .unwrap_err()
                .contains("unclosed")
        );
    }
}
