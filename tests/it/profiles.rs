//! Each built-in profile against the reference (`../shared/provider-quirks.md`): the table below
//! was written from the reference alone, independently of `src/providers.yaml`, and each profile
//! must build the authorize URL, refresh request and revocation request it describes. Nothing
//! is sent: the requests are built and inspected.

use base64::Engine as _;
use oauth2mci::Secret;
use oauth2mci::config::{self, ClientConfig};
use oauth2mci::oauth::{self, Pkce};
use oauth2mci::token::{TokenSet, now_ms};
use std::collections::BTreeMap;
use std::path::Path;
use url::Url;

/// What the reference says each provider's requests look like.
struct Expect {
    /// Built-in profile name.
    provider: &'static str,
    /// Client settings the provider's URL templates need: (key, value), from: base_url, tenant, domain, realm, region, version. Use example values like ("domain", "dev-1.okta.com"), ("base_url", "https://aidbox.example"), ("realm", "acme").
    vars: &'static [(&'static str, &'static str)],
    /// The authorization endpoint with the vars filled, without query string.
    authorize: &'static str,
    /// Query parameters the authorization URL must carry besides the standard ones (offline params...), as (name, value).
    authorize_params: &'static [(&'static str, &'static str)],
    /// Scopes that must be requested whatever the client asks (offline_access...).
    offline_scopes: &'static [&'static str],
    /// Separator between scopes in the authorize request: " " or ",".
    scope_separator: &'static str,
    /// "required" | "supported" | "off" (PKCE; "off" for the providers section 3 item 6 lists as not supported / not documented).
    pkce: &'static str,
    /// The token endpoint with the vars filled, without query string.
    token_url: &'static str,
    /// "POST" or "GET".
    method: &'static str,
    /// Where the refresh-request parameters go: "form" | "json" | "query".
    encoding: &'static str,
    /// Where a confidential client's secret goes: "basic" (HTTP Basic only), "body" (client_id+client_secret as parameters), "basic+client_id" (Basic and client_id as parameter, X).
    secret: &'static str,
    /// Request headers the reference says are required on token requests (lowercase names), e.g. ("accept", "application/json").
    headers: &'static [(&'static str, &'static str)],
    /// Extra refresh parameters the reference says to send, e.g. Yahoo ("redirect_uri", "<the redirect uri>") — write "{redirect_uri}" for the client's redirect URI.
    refresh_params: &'static [(&'static str, &'static str)],
    /// "rfc7009" | "json" | "bearer" | "url" | "none" : revocation style (section 3 item 17; GitHub = "json" with DELETE, Dropbox/Slack/Aidbox/Facebook = "bearer", HubSpot = "url", none for Microsoft, Spotify, Amazon, Atlassian, Yahoo).
    revocation: &'static str,
    /// Revocation endpoint with vars filled, "" when none. GitHub's contains the client id: use client id "cid".
    revoke_url: &'static str,
}

const EXPECTATIONS: &[Expect] = &[
    Expect {
        provider: "google",
        vars: &[],
        authorize: "https://accounts.google.com/o/oauth2/v2/auth", // golang/oauth2's older /o/oauth2/auth also works
        // access_type=offline is what issues an RT; prompt=consent is listed in s.3 item 2 as "(+prompt=consent)"
        // because Google only returns an RT on first consent (Nango hard-codes both).
        authorize_params: &[("access_type", "offline"), ("prompt", "consent")],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://oauth2.googleapis.com/token",
        method: "POST",
        encoding: "form",
        secret: "body", // basic also accepted (unverified)
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://oauth2.googleapis.com/revoke",
    },
    Expect {
        provider: "microsoft",
        vars: &[], // tenant defaults to "common"
        authorize: "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
        authorize_params: &[], // response_mode=query is a Nango choice (s.3 item 3), not required
        offline_scopes: &["offline_access"],
        scope_separator: " ",
        pkce: "supported", // required only for SPA redirect URIs; Nango sets disable_pkce
        token_url: "https://login.microsoftonline.com/common/oauth2/v2.0/token",
        method: "POST",
        encoding: "form",
        secret: "body", // either: post or basic (or private_key_jwt)
        headers: &[],
        refresh_params: &[], // `scope` on refresh is optional
        revocation: "none",  // no RFC 7009 endpoint; Graph revokeSignInSessions (unverified)
        revoke_url: "",
    },
    Expect {
        provider: "facebook",
        vars: &[], // version defaults to v21.0
        authorize: "https://www.facebook.com/v21.0/dialog/oauth",
        authorize_params: &[],
        offline_scopes: &[],  // no RTs at all
        scope_separator: ",", // spaces also accepted (unverified)
        pkce: "supported",    // (reported)
        token_url: "https://graph.facebook.com/v21.0/oauth/access_token",
        method: "GET", // documented GET; Nango POSTs with query params
        encoding: "query",
        secret: "body", // client_id + client_secret as query params
        headers: &[],
        // No RFC refresh: the still-valid AT is exchanged. "{access_token}" = the current access token.
        refresh_params: &[
            ("grant_type", "fb_exchange_token"),
            ("fb_exchange_token", "{access_token}"),
        ],
        revocation: "bearer", // Graph `DELETE /{user-id}/permissions`
        // The reference gives only the path `/{user-id}/permissions` (Graph); host + version assumed, `me` for {user-id}.
        revoke_url: "https://graph.facebook.com/v21.0/me/permissions",
    },
    Expect {
        provider: "github",
        vars: &[],
        authorize: "https://github.com/login/oauth/authorize",
        authorize_params: &[],
        offline_scopes: &[],  // OAuth apps get no RT
        scope_separator: " ", // response `scope` is comma-joined
        pkce: "supported",    // S256 only
        token_url: "https://github.com/login/oauth/access_token",
        method: "POST",
        encoding: "form",
        secret: "body",
        headers: &[("accept", "application/json")], // otherwise the response is form-encoded
        refresh_params: &[],
        revocation: "json", // DELETE, Basic with the app's credentials
        revoke_url: "https://api.github.com/applications/cid/token",
    },
    Expect {
        provider: "github-app",
        vars: &[],
        authorize: "https://github.com/login/oauth/authorize",
        authorize_params: &[],
        offline_scopes: &[], // RTs come from the app setting "expire user tokens"
        scope_separator: " ", // n/a for GitHub Apps (no scopes); space as for OAuth apps
        pkce: "supported",
        token_url: "https://github.com/login/oauth/access_token",
        method: "POST",
        encoding: "form",
        secret: "body", // secret not needed for device-flow tokens
        headers: &[("accept", "application/json")],
        refresh_params: &[],
        revocation: "json", // DELETE, Basic with the app's credentials
        revoke_url: "https://api.github.com/applications/cid/token",
    },
    Expect {
        provider: "gitlab",
        vars: &[], // gitlab.com
        authorize: "https://gitlab.com/oauth/authorize",
        authorize_params: &[],
        offline_scopes: &[], // RT always issued
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://gitlab.com/oauth/token",
        method: "POST",
        encoding: "form",
        secret: "body", // either: post (basic ok)
        headers: &[],
        // GitLab's docs send redirect_uri on refresh (unverified; "sending them is harmless").
        // code_verifier too for PKCE apps (unverified), not listed here.
        refresh_params: &[("redirect_uri", "{redirect_uri}")],
        revocation: "rfc7009",
        revoke_url: "https://gitlab.com/oauth/revoke",
    },
    Expect {
        provider: "dropbox",
        vars: &[],
        authorize: "https://www.dropbox.com/oauth2/authorize",
        authorize_params: &[("token_access_type", "offline")],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://api.dropboxapi.com/oauth2/token",
        method: "POST",
        encoding: "form",
        secret: "basic", // either: basic or post, but NEVER both
        headers: &[],
        refresh_params: &[],
        revocation: "bearer", // POST with Bearer AT
        revoke_url: "https://api.dropboxapi.com/2/auth/token/revoke",
    },
    Expect {
        provider: "slack",
        vars: &[],
        authorize: "https://slack.com/oauth/v2/authorize",
        authorize_params: &[], // user_scope is per client, not fixed
        offline_scopes: &[],   // RTs come from the app setting token_rotation_enabled
        scope_separator: ",",
        pkce: "supported", // GA 2026-03, opt-in and one-way; required for custom-scheme redirects; Nango disables it
        token_url: "https://slack.com/api/oauth.v2.access",
        method: "POST",
        encoding: "form",
        secret: "body", // either: post or basic
        headers: &[],
        refresh_params: &[],
        revocation: "bearer", // auth.revoke
        revoke_url: "https://slack.com/api/auth.revoke",
    },
    Expect {
        provider: "salesforce",
        vars: &[], // login.salesforce.com (test. / My Domain otherwise)
        authorize: "https://login.salesforce.com/services/oauth2/authorize",
        authorize_params: &[], // Nango adds prompt=consent (s.3 item 3, "other"), not needed for an RT
        offline_scopes: &["refresh_token"], // either: refresh_token or its alias offline_access
        scope_separator: " ",
        pkce: "supported", // can be required per app ("Require PKCE")
        token_url: "https://login.salesforce.com/services/oauth2/token",
        method: "POST",
        encoding: "form",
        secret: "body", // secret optional per app setting
        headers: &[],   // output format via `format=` or Accept is optional (JSON default)
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://login.salesforce.com/services/oauth2/revoke",
    },
    Expect {
        provider: "reddit",
        vars: &[],
        authorize: "https://www.reddit.com/api/v1/authorize",
        authorize_params: &[("duration", "permanent")],
        offline_scopes: &[],
        scope_separator: " ", // prawcore uses spaces; grant's default comma, both accepted (unverified)
        pkce: "off",          // not documented
        token_url: "https://www.reddit.com/api/v1/access_token",
        method: "POST",
        encoding: "form",
        secret: "basic", // Basic only
        // A unique, descriptive User-Agent is required; the value is per client, so check presence only.
        headers: &[("user-agent", "{user_agent}")],
        refresh_params: &[], // redirect_uri on refresh is only (reported) by python-social-auth
        revocation: "rfc7009", // with Basic
        revoke_url: "https://www.reddit.com/api/v1/revoke_token",
    },
    Expect {
        provider: "strava",
        vars: &[],
        authorize: "https://www.strava.com/oauth/authorize",
        authorize_params: &[], // approval_prompt is optional (default auto)
        offline_scopes: &[],   // RT always issued
        scope_separator: ",",
        pkce: "off",
        token_url: "https://www.strava.com/oauth/token",
        method: "POST",
        encoding: "query", // either: documented "in query"; form body also works
        secret: "body",    // client_id + client_secret as (query) params, no Basic
        headers: &[],
        refresh_params: &[],
        // Not listed in s.3 item 17: POST /oauth/deauthorize with `access_token` (param name is not RFC 7009's `token`).
        // Reviewed: Strava documents its parameters "in query", so the token goes in the URL.
        revocation: "url",
        revoke_url: "https://www.strava.com/oauth/deauthorize",
    },
    Expect {
        provider: "x",
        vars: &[],
        authorize: "https://x.com/i/oauth2/authorize",
        authorize_params: &[], // response_mode=query is a Nango choice only
        offline_scopes: &["offline.access"],
        scope_separator: " ",
        pkce: "required",
        token_url: "https://api.x.com/2/oauth2/token", // api.twitter.com works too
        method: "POST",
        encoding: "form",
        secret: "basic+client_id", // table 1b/grant; X docs/Nango: Basic for confidential clients
        headers: &[],
        refresh_params: &[], // client_id alongside Basic is covered by `secret`
        revocation: "rfc7009",
        revoke_url: "https://api.x.com/2/oauth2/revoke",
    },
    Expect {
        provider: "spotify",
        vars: &[],
        authorize: "https://accounts.spotify.com/authorize",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://accounts.spotify.com/api/token",
        method: "POST",
        encoding: "form", // Content-Type: application/x-www-form-urlencoded required (implied by form)
        secret: "basic",  // PKCE flow: client_id in body, no secret
        headers: &[],
        refresh_params: &[],
        revocation: "none",
        revoke_url: "",
    },
    Expect {
        provider: "linkedin",
        vars: &[],
        authorize: "https://www.linkedin.com/oauth/v2/authorization",
        authorize_params: &[],
        offline_scopes: &[], // RTs only for approved partners
        scope_separator: " ",
        pkce: "off", // native apps only (unverified); Nango disable_pkce
        token_url: "https://www.linkedin.com/oauth/v2/accessToken",
        method: "POST",
        encoding: "form",
        secret: "body",
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009", // not listed in s.3 item 17; endpoint from table 1a is (unverified)
        revoke_url: "https://www.linkedin.com/oauth/v2/revoke",
    },
    Expect {
        provider: "zoom",
        vars: &[],
        authorize: "https://zoom.us/oauth/authorize",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: ",", // per Nango only; scopes are usually set on the app
        pkce: "supported",
        token_url: "https://zoom.us/oauth/token",
        method: "POST",
        encoding: "form", // either: table "form / query"; the official examples use query params on the POST
        secret: "basic",
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009", // with Basic
        revoke_url: "https://zoom.us/oauth/revoke",
    },
    Expect {
        provider: "intuit",
        vars: &[],
        authorize: "https://appcenter.intuit.com/connect/oauth2",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "off", // (unverified)
        token_url: "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
        method: "POST",
        encoding: "form",
        secret: "basic",
        // x-include-refresh-token-hard-expires-in: true is optional, not listed.
        headers: &[("accept", "application/json")],
        refresh_params: &[],
        revocation: "rfc7009", // Basic, JSON body
        revoke_url: "https://developer.api.intuit.com/v2/oauth2/tokens/revoke",
    },
    Expect {
        provider: "xero",
        vars: &[],
        authorize: "https://login.xero.com/identity/connect/authorize",
        authorize_params: &[],
        offline_scopes: &["offline_access"],
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://identity.xero.com/connect/token",
        method: "POST",
        encoding: "form",
        secret: "basic", // either: table 1b says basic (web), s.3 item 5 lists Xero under "either"
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://identity.xero.com/connect/revocation",
    },
    Expect {
        provider: "notion",
        vars: &[],
        authorize: "https://api.notion.com/v1/oauth/authorize",
        authorize_params: &[("owner", "user")], // "Authorize adds owner=user"
        offline_scopes: &[],
        scope_separator: " ", // n/a: Notion has no scopes
        pkce: "off",
        token_url: "https://api.notion.com/v1/oauth/token",
        method: "POST",
        encoding: "json",
        secret: "basic",
        headers: &[],
        refresh_params: &[], // redirect_uri rule concerns the code exchange, not refresh
        revocation: "rfc7009",
        revoke_url: "https://api.notion.com/v1/oauth/revoke",
    },
    Expect {
        provider: "hubspot",
        vars: &[],
        authorize: "https://app.hubspot.com/oauth/authorize",
        authorize_params: &[], // optional_scope is per client
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "supported", // code_verifier accepted; secret still mandatory (reported)
        token_url: "https://api.hubapi.com/oauth/v3/token",
        method: "POST",
        encoding: "form", // v3: all params in the body
        secret: "body",
        headers: &[],
        refresh_params: &[],
        revocation: "url", // v1 DELETE with the RT in the path; {token} filled at call time
        revoke_url: "https://api.hubapi.com/oauth/v1/refresh-tokens/{token}",
    },
    Expect {
        provider: "box",
        vars: &[],
        authorize: "https://account.box.com/api/oauth2/authorize",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "off", // not documented
        token_url: "https://api.box.com/oauth2/token",
        method: "POST",
        encoding: "form",
        secret: "body",
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://api.box.com/oauth2/revoke",
    },
    Expect {
        provider: "okta",
        vars: &[("domain", "dev-1.okta.com")], // default custom authorization server
        authorize: "https://dev-1.okta.com/oauth2/default/v1/authorize",
        authorize_params: &[], // response_mode=query is a Nango choice only
        offline_scopes: &["offline_access"],
        scope_separator: " ",
        pkce: "supported", // required for public clients
        token_url: "https://dev-1.okta.com/oauth2/default/v1/token",
        method: "POST",
        encoding: "form",
        secret: "basic", // either: basic, post, private_key_jwt
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://dev-1.okta.com/oauth2/default/v1/revoke",
    },
    Expect {
        provider: "auth0",
        vars: &[("domain", "acme.us.auth0.com")],
        authorize: "https://acme.us.auth0.com/authorize",
        authorize_params: &[], // `audience` needed for API tokens, but its value is per client
        offline_scopes: &["offline_access"], // plus the API's "Allow Offline Access"
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://acme.us.auth0.com/oauth/token",
        method: "POST",
        encoding: "form", // either: form (JSON also accepted)
        secret: "basic",  // either: basic, post, private_key_jwt
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://acme.us.auth0.com/oauth/revoke",
    },
    Expect {
        provider: "keycloak",
        vars: &[("base_url", "https://keycloak.example"), ("realm", "acme")],
        authorize: "https://keycloak.example/realms/acme/protocol/openid-connect/auth",
        authorize_params: &[],
        offline_scopes: &["offline_access"],
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://keycloak.example/realms/acme/protocol/openid-connect/token",
        method: "POST",
        encoding: "form",
        secret: "basic", // either: basic, post, private_key_jwt
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://keycloak.example/realms/acme/protocol/openid-connect/revoke",
    },
    Expect {
        provider: "aidbox",
        vars: &[("base_url", "https://aidbox.example")],
        authorize: "https://aidbox.example/auth/authorize",
        authorize_params: &[],
        offline_scopes: &[], // RT from the Client's auth.authorization_code.refresh_token: true
        scope_separator: " ",
        pkce: "supported", // `pkce: true` flag on the Client
        token_url: "https://aidbox.example/auth/token",
        method: "POST",
        encoding: "json", // documented; older docs: Basic + form
        secret: "body",   // client_secret in the JSON body
        headers: &[],     // Content-Type: application/json implied by json
        refresh_params: &[],
        revocation: "bearer", // DELETE /Session with the Bearer AT
        revoke_url: "https://aidbox.example/Session",
    },
    Expect {
        provider: "amazon",
        vars: &[], // region .com (NA)
        authorize: "https://www.amazon.com/ap/oa",
        authorize_params: &[],
        offline_scopes: &[], // RT always issued, but only if client_secret is sent
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://api.amazon.com/auth/o2/token",
        method: "POST",
        encoding: "form",
        secret: "body", // either: post or basic
        headers: &[],
        refresh_params: &[],
        revocation: "none",
        revoke_url: "",
    },
    Expect {
        provider: "discord",
        vars: &[],
        authorize: "https://discord.com/oauth2/authorize",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "supported", // public clients (reported)
        token_url: "https://discord.com/api/oauth2/token",
        method: "POST",
        encoding: "form",
        secret: "body", // either: post or basic
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://discord.com/api/oauth2/token/revoke",
    },
    Expect {
        provider: "twitch",
        vars: &[],
        authorize: "https://id.twitch.tv/oauth2/authorize",
        authorize_params: &[], // force_verify is optional
        offline_scopes: &[],
        scope_separator: " ", // response `scope` is a JSON array
        pkce: "off",          // (unverified)
        token_url: "https://id.twitch.tv/oauth2/token",
        method: "POST",
        encoding: "form", // either: form or query (twurple uses query)
        secret: "body",
        headers: &[],
        refresh_params: &[],
        revocation: "rfc7009",
        revoke_url: "https://id.twitch.tv/oauth2/revoke",
    },
    Expect {
        provider: "atlassian",
        vars: &[],
        authorize: "https://auth.atlassian.com/authorize",
        authorize_params: &[("audience", "api.atlassian.com"), ("prompt", "consent")],
        offline_scopes: &["offline_access"],
        scope_separator: " ",
        pkce: "off", // not documented
        token_url: "https://auth.atlassian.com/oauth/token",
        method: "POST",
        encoding: "json", // either: JSON (documented) or form
        secret: "body",
        headers: &[],
        refresh_params: &[],
        revocation: "none",
        revoke_url: "",
    },
    Expect {
        provider: "fitbit",
        vars: &[],
        authorize: "https://www.fitbit.com/oauth2/authorize",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "supported",
        token_url: "https://api.fitbit.com/oauth2/token",
        method: "POST",
        encoding: "form",
        secret: "basic", // server apps; client-type apps: client_id in body
        headers: &[],
        refresh_params: &[], // `expires_in` is an optional request parameter
        revocation: "rfc7009",
        revoke_url: "https://api.fitbit.com/oauth2/revoke",
    },
    Expect {
        provider: "yahoo",
        vars: &[],
        authorize: "https://api.login.yahoo.com/oauth2/request_auth",
        authorize_params: &[],
        offline_scopes: &[],
        scope_separator: " ",
        pkce: "off",
        token_url: "https://api.login.yahoo.com/oauth2/get_token",
        method: "POST",
        encoding: "form",
        secret: "basic", // either: basic (post also used)
        headers: &[],
        refresh_params: &[("redirect_uri", "{redirect_uri}")], // `oob` or the registered URI
        revocation: "none",
        revoke_url: "",
    },
];

const REDIRECT: &str = "http://127.0.0.1:8400/callback";

fn client(e: &Expect) -> ClientConfig {
    let mut yaml = format!(
        "clients:\n  c:\n    provider: {}\n    client_id: cid\n    client_secret: cs\n    scopes: [a, b]\n    redirect_uri: {REDIRECT}\n",
        e.provider
    );
    for (k, v) in e.vars {
        yaml.push_str(&format!("    {k}: {v:?}\n"));
    }
    let config = config::parse(&yaml, Path::new("profiles.yaml"))
        .unwrap_or_else(|err| panic!("{}: {err}", e.provider));
    config.clients["c"].as_ref().clone()
}

fn old_token() -> TokenSet {
    let now = now_ms();
    TokenSet {
        access_token: Secret::new("AT"),
        token_type: "Bearer".into(),
        refresh_token: Some(Secret::new("RT")),
        id_token: None,
        scope: None,
        expires_at: Some(now + 3_600_000),
        refresh_expires_at: None,
        obtained_at: now,
        granted_at: now,
        extra: Default::default(),
        refresh_expiry_slides: false,
    }
}

fn base(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// The parameters of a request, wherever the profile put them.
fn params(req: &reqwest::Request) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = req.url().query_pairs().into_owned().collect();
    let body = req.body().and_then(|b| b.as_bytes()).unwrap_or_default();
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(body) {
        for (k, v) in m {
            out.insert(k, v.as_str().unwrap_or_default().to_string());
        }
    } else {
        out.extend(url::form_urlencoded::parse(body).into_owned());
    }
    out
}

fn header(req: &reqwest::Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn check(e: &Expect) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            wrong.push(format!("{}: {what}", e.provider));
        }
    };
    let c = client(e);
    let http = reqwest::Client::new();

    // The authorization request.
    let pkce = Pkce::new();
    let redirect = Url::parse(REDIRECT).unwrap();
    let challenge = c.pkce.then_some(pkce.challenge.as_str());
    let url = oauth::authorize_url(&c, &redirect, "STATE", challenge).expect("authorize URL");
    let q: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    expect(
        base(&url) == e.authorize,
        format!("authorize URL {} != {}", base(&url), e.authorize),
    );
    for (k, v) in e.authorize_params {
        expect(
            q.get(*k).map(String::as_str) == Some(*v),
            format!("authorize param {k}={v} missing: {q:?}"),
        );
    }
    let scope = q.get(&c.profile.scope_param).cloned().unwrap_or_default();
    let scopes: Vec<&str> = scope.split(e.scope_separator).collect();
    for s in ["a", "b"].iter().chain(e.offline_scopes) {
        expect(
            scopes.contains(s),
            format!(
                "scope {s:?} not in {scope:?} split by {:?}",
                e.scope_separator
            ),
        );
    }
    let sent_pkce = q.contains_key("code_challenge");
    expect(
        sent_pkce == (e.pkce != "off"),
        format!("PKCE sent: {sent_pkce}, reference: {}", e.pkce),
    );
    expect(
        format!("{:?}", c.profile.pkce).to_lowercase() == e.pkce,
        format!("pkce mode {:?} != {}", c.profile.pkce, e.pkce),
    );
    expect(
        q.get("state").map(String::as_str) == Some("STATE"),
        "state missing".into(),
    );

    // The refresh request.
    let old = old_token();
    let grant = oauth::renewal_grant(&c, &old, now_ms()).expect("renewable");
    let req = oauth::token_request(&http, &c, &grant).expect("token request");
    expect(
        base(req.url()) == e.token_url,
        format!("token URL {} != {}", base(req.url()), e.token_url),
    );
    expect(
        req.method().as_str() == e.method,
        format!("method {} != {}", req.method(), e.method),
    );
    let p = params(&req);
    let content_type = header(&req, "content-type").unwrap_or_default();
    let body_len = req.body().and_then(|b| b.as_bytes()).map_or(0, <[u8]>::len);
    let encoding_ok = match e.encoding {
        "form" => {
            content_type == "application/x-www-form-urlencoded" && req.url().query().is_none()
        }
        "json" => content_type == "application/json" && req.url().query().is_none(),
        "query" => req.url().query_pairs().any(|(k, _)| k == "grant_type") && body_len == 0,
        other => panic!("unknown encoding {other}"),
    };
    expect(
        encoding_ok,
        format!(
            "encoding is not {} (content type {content_type:?}, query {:?})",
            e.encoding,
            req.url().query()
        ),
    );
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("cid:cs")
    );
    let auth = header(&req, "authorization");
    let (want_basic, want_id, want_secret) = match e.secret {
        "basic" => (true, false, false),
        "body" => (false, true, true),
        "basic+client_id" => (true, true, false),
        other => panic!("unknown secret placement {other}"),
    };
    expect(
        (auth.as_deref() == Some(basic.as_str())) == want_basic,
        format!("Basic auth: {auth:?}, wanted: {want_basic}"),
    );
    expect(
        p.contains_key("client_id") == want_id,
        format!("client_id in params: {}", p.contains_key("client_id")),
    );
    expect(
        (p.get("client_secret").map(String::as_str) == Some("cs")) == want_secret,
        format!(
            "client_secret in params: {}",
            p.contains_key("client_secret")
        ),
    );
    for (k, v) in e.headers {
        expect(
            header(&req, k).as_deref() == Some(*v)
                || (v.starts_with('{') && header(&req, k).is_some()),
            format!("header {k}: {v} missing"),
        );
    }
    for (k, v) in e.refresh_params {
        let v = v
            .replace("{redirect_uri}", REDIRECT)
            .replace("{access_token}", "AT");
        expect(
            p.get(*k) == Some(&v),
            format!("refresh param {k}={v} missing: {:?}", p.keys()),
        );
    }
    let renewed_with = p.get("refresh_token").or(p.get("fb_exchange_token"));
    expect(
        renewed_with.is_some(),
        "neither refresh_token nor fb_exchange_token sent".into(),
    );

    // The revocation request.
    match (oauth::revoke_request(&http, &c, &old), e.revocation) {
        (Err(_), "none") => {}
        (Err(err), style) => expect(false, format!("no {style} revocation: {err}")),
        (Ok(req), "none") => expect(false, format!("revokes at {}, reference: none", req.url())),
        (Ok(req), style) => {
            let want = e.revoke_url.replace("{token}", "RT");
            expect(
                base(req.url()) == want,
                format!("revoke URL {} != {want}", base(req.url())),
            );
            let p = params(&req);
            let auth = header(&req, "authorization").unwrap_or_default();
            let ok = match style {
                "rfc7009" => p.get("token").map(String::as_str) == Some("RT"),
                "json" => {
                    p.get("access_token").map(String::as_str) == Some("AT")
                        && auth.starts_with("Basic ")
                }
                "bearer" => auth == "Bearer AT",
                "url" => {
                    req.url().path().ends_with("/RT")
                        || req
                            .url()
                            .query_pairs()
                            .any(|(k, v)| k == "access_token" && v == "AT")
                }
                other => panic!("unknown revocation {other}"),
            };
            expect(
                ok,
                format!(
                    "revocation is not {style}: {} {} params {:?}",
                    req.method(),
                    req.url(),
                    p.keys()
                ),
            );
        }
    }
    wrong
}

#[test]
fn every_builtin_profile_matches_the_reference() {
    let mut wrong = Vec::new();
    for e in EXPECTATIONS {
        wrong.extend(check(e));
    }
    assert!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn every_builtin_profile_has_an_entry_in_the_table() {
    let named: Vec<&str> = EXPECTATIONS.iter().map(|e| e.provider).collect();
    let missing: Vec<&str> = oauth2mci::provider::builtin_names()
        // google-service-account has no user and no authorize URL to check here: tests/jwt.rs
        // runs its grant against a verifying fake.
        .filter(|n| {
            !named.contains(n) && !["generic", "slack-user", "google-service-account"].contains(n)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "profiles without a reference entry: {missing:?}"
    );
}
