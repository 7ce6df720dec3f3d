//! Each quirk dimension of a provider profile against a fake provider (wiremock) that behaves as
//! `../shared/provider-quirks.md` says the real one does, through the OAuth engine. The clients
//! are built from YAML like a user's, with the built-in profile and only its URLs pointed at the
//! fake server.

use oauth2mci::Secret;
use oauth2mci::config::{self, ClientConfig};
use oauth2mci::oauth::{Engine, ErrorClass};
use oauth2mci::token::{TokenSet, now_ms};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use url::Url;
use wiremock::matchers::{
    body_json, body_string, body_string_contains, header, method, path, query_param,
};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

fn client(provider: &str, extra: &str) -> ClientConfig {
    let yaml = format!(
        "clients:\n  c:\n    provider: {provider}\n    client_id: cid\n    client_secret: cs\n{extra}"
    );
    let config = config::parse(&yaml, Path::new("quirks.yaml")).unwrap_or_else(|e| panic!("{e}"));
    config.clients["c"].as_ref().clone()
}

/// A built-in profile with its endpoints moved to the fake server.
fn moved(base: &str, server: &MockServer, fields: &str) -> String {
    let uri = server.uri();
    format!(
        "{{base: {base}, authorize_url: \"{uri}/authorize\", token_url: \"{uri}/token\"{fields}}}"
    )
}

fn engine() -> Engine {
    Engine::new(Duration::from_secs(5)).unwrap()
}

fn token(at: &str, rt: Option<&str>) -> TokenSet {
    let now = now_ms();
    TokenSet {
        access_token: Secret::new(at),
        token_type: "Bearer".into(),
        refresh_token: rt.map(Secret::new),
        id_token: None,
        scope: None,
        expires_at: Some(now + 600_000),
        refresh_expires_at: None,
        obtained_at: now - 1000,
        granted_at: now - 5000,
        extra: Default::default(),
        refresh_expiry_slides: false,
    }
}

fn redirect() -> Url {
    Url::parse("http://127.0.0.1:8400/callback").unwrap()
}

fn form(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/x-www-form-urlencoded")
}

fn params(r: &Request) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(&r.body).into_owned().collect()
}

async fn last_request(server: &MockServer) -> Request {
    server
        .received_requests()
        .await
        .unwrap()
        .pop()
        .expect("a request")
}

#[tokio::test]
async fn github_answers_with_a_form_and_errors_with_200() {
    let server = MockServer::start().await;
    // GitHub OAuth apps: a form-encoded answer, comma-joined scopes, no expiry, no refresh token.
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(form("access_token=gho_16C7e42F292c6912E7710c838347Ae178B4a&scope=repo%2Cgist&token_type=bearer"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(form("error=bad_refresh_token&error_description=The+refresh+token+passed+is+incorrect+or+expired.&error_uri=https%3A%2F%2Fdocs.github.com"))
        .mount(&server)
        .await;
    let c = client(&moved("github", &server, ""), "");
    let t = engine()
        .exchange_code(&c, "code1", &redirect(), None, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(
        t.access_token.expose(),
        "gho_16C7e42F292c6912E7710c838347Ae178B4a"
    );
    assert_eq!(t.token_type, "Bearer", "lowercase bearer is normalised");
    assert_eq!(t.scope.as_deref(), Some("repo gist"));
    assert_eq!(t.expires_at, None, "GitHub OAuth app tokens do not expire");
    let req = last_request(&server).await;
    assert_eq!(req.headers.get("accept").unwrap(), "application/json");
    let p = params(&req);
    assert_eq!(
        (p["client_id"].as_str(), p["client_secret"].as_str()),
        ("cid", "cs")
    );

    let e = engine()
        .refresh(&c, &token("gho_old", Some("ghr_old")), now_ms())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::NeedsUser, "{}", e.message);
    assert!(
        e.message.contains("bad_refresh_token (= invalid_grant)"),
        "{}",
        e.message
    );
    assert!(!e.message.contains("ghr_old"));
}

#[tokio::test]
async fn github_app_numbers_as_strings_and_single_use_rotation() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("refresh_token=ghr_1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "ghu_2", "expires_in": "28800", "refresh_token": "ghr_2",
            "refresh_token_expires_in": "15811200", "scope": "", "token_type": "bearer"
        })))
        .mount(&server)
        .await;
    let c = client(&moved("github-app", &server, ""), "");
    let before = now_ms();
    let t = engine()
        .refresh(&c, &token("ghu_1", Some("ghr_1")), before)
        .await
        .unwrap();
    assert_eq!(t.refresh_token.unwrap().expose(), "ghr_2");
    let at = t.expires_at.unwrap();
    assert!((before + 28_800_000..before + 28_810_000).contains(&at));
    let rt_at = t.refresh_expires_at.unwrap();
    assert!((before + 15_811_200_000..before + 15_811_210_000).contains(&rt_at));
}

#[tokio::test]
async fn slack_ok_false_and_the_nested_user_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "ok": true, "access_token": "xoxb-bot", "token_type": "bot", "scope": "commands",
            "bot_user_id": "U0BOT", "team": {"id": "T9TK3CUKW", "name": "Slack Softball Team"},
            "authed_user": {"id": "U1234", "scope": "chat:write", "access_token": "xoxe.xoxp-user",
                "token_type": "user", "refresh_token": "xoxe-1-user", "expires_in": 43200}
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": false, "error": "invalid_refresh_token"})),
        )
        .mount(&server)
        .await;
    let c = client(
        &moved("slack-user", &server, ""),
        "    scopes: [chat:write, channels:read]\n",
    );
    let url = oauth2mci::oauth::authorize_url(&c, &redirect(), "s", None).unwrap();
    let q: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(
        q["user_scope"], "chat:write,channels:read",
        "user scopes, comma-separated"
    );
    let t = engine()
        .exchange_code(&c, "code", &redirect(), None, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(t.access_token.expose(), "xoxe.xoxp-user");
    assert_eq!(t.refresh_token.as_ref().unwrap().expose(), "xoxe-1-user");
    assert!(t.expires_at.is_some());
    assert_eq!(t.extra["team.id"], "T9TK3CUKW");

    let e = engine().refresh(&c, &t, now_ms()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::NeedsUser, "{}", e.message);
    assert!(
        e.message.contains("answered 200 invalid_refresh_token"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn strava_query_parameters_and_absolute_expiry() {
    let server = MockServer::start().await;
    let expires_at = now_ms() / 1000 + 21_000;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(query_param("grant_type", "refresh_token"))
        .and(query_param("refresh_token", "rt1"))
        .and(query_param("client_secret", "cs"))
        .and(body_string(""))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer", "access_token": "a9b723", "expires_at": expires_at,
            "expires_in": 20_000, "refresh_token": "rt2"
        })))
        .mount(&server)
        .await;
    let c = client(&moved("strava", &server, ""), "");
    assert_eq!(
        c.profile.reissue_within.map(|d| d.0),
        Some(Duration::from_secs(3600))
    );
    let t = engine()
        .refresh(&c, &token("old", Some("rt1")), now_ms())
        .await
        .unwrap();
    assert_eq!(
        t.expires_at,
        Some(expires_at * 1000),
        "expires_at wins over expires_in"
    );
    assert_eq!(
        t.refresh_token.unwrap().expose(),
        "rt2",
        "a new refresh token replaces the old one"
    );
}

#[tokio::test]
async fn gitlab_missing_expires_in_falls_back_and_rotation_replaces_the_pair() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "glat-2", "token_type": "bearer", "refresh_token": "glrt-2",
            "created_at": 1_607_635_748, "scope": "api"
        })))
        .mount(&server)
        .await;
    let c = client(
        &moved("gitlab", &server, ""),
        "    redirect_uri: http://127.0.0.1:8400/callback\n",
    );
    let now = now_ms();
    let t = engine()
        .refresh(&c, &token("glat-1", Some("glrt-1")), now)
        .await
        .unwrap();
    let at = t.expires_at.unwrap();
    assert!(
        (now + 7_200_000..now + 7_210_000).contains(&at),
        "GitLab's 2 h default"
    );
    assert_eq!(t.refresh_token.unwrap().expose(), "glrt-2");
    assert_eq!(t.token_type, "Bearer");
}

#[tokio::test]
async fn google_keeps_the_refresh_token_a_refresh_omits() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "ya29.new", "expires_in": 3599, "token_type": "Bearer",
            "scope": "https://www.googleapis.com/auth/drive.metadata.readonly"
        })))
        .mount(&server)
        .await;
    let c = client(&moved("google", &server, ""), "");
    let old = token("ya29.old", Some("1//rt"));
    let t = engine().refresh(&c, &old, now_ms()).await.unwrap();
    assert_eq!(t.refresh_token.unwrap().expose(), "1//rt");
    assert_eq!(t.granted_at, old.granted_at, "the grant's age carries over");
    let p = params(&last_request(&server).await);
    assert_eq!(
        p.get("client_secret").map(String::as_str),
        Some("cs"),
        "Google takes the secret in the body"
    );
    // A profile that says an omitted refresh token is gone drops it.
    let c = client(
        &moved(
            "google",
            &server,
            ", keep_refresh_token: false, refresh_token_rotation: always",
        ),
        "",
    );
    let t = engine().refresh(&c, &old, now_ms()).await.unwrap();
    assert!(t.refresh_token.is_none());
}

#[tokio::test]
async fn facebook_exchanges_a_valid_token_with_a_get() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/token"))
        .and(query_param("grant_type", "fb_exchange_token"))
        .and(query_param("fb_exchange_token", "EAAshort"))
        .and(query_param("client_id", "cid"))
        .and(query_param("client_secret", "cs"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "EAAlong", "token_type": "bearer", "expires_in": 5_183_944
        })))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&moved("facebook", &server, ""), "");
    let t = engine()
        .refresh(&c, &token("EAAshort", None), now_ms())
        .await
        .unwrap();
    assert_eq!(t.access_token.expose(), "EAAlong");
    let mut expired = token("EAAshort", None);
    expired.expires_at = Some(now_ms() - 1);
    let e = engine().refresh(&c, &expired, now_ms()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::NeedsUser);
    assert!(e.message.contains("expired before it could be exchanged"));
    // A server error names the URL without its query, which holds the secret.
    let unreachable = "{base: facebook, token_url: \"http://127.0.0.1:9/token\"}";
    let e = engine()
        .refresh(&client(unreachable, ""), &token("EAAshort", None), now_ms())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient);
    assert!(
        e.message.contains("http://127.0.0.1:9/token"),
        "{}",
        e.message
    );
    assert!(
        !e.message.contains("EAAshort") && !e.message.contains("client_secret"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn basic_only_providers_never_put_the_secret_in_the_body() {
    for base in ["reddit", "zoom", "intuit", "fitbit", "spotify", "dropbox"] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(header("authorization", "Basic Y2lkOmNz"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"access_token": "a", "expires_in": 3600})),
            )
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_client"})),
            )
            .mount(&server)
            .await;
        let c = client(&moved(base, &server, ""), "");
        engine()
            .refresh(&c, &token("a0", Some("r0")), now_ms())
            .await
            .unwrap_or_else(|e| panic!("{base}: {e}"));
        let p = params(&last_request(&server).await);
        assert!(
            !p.contains_key("client_secret"),
            "{base} sent the secret twice"
        );
        // Dropbox refuses a request with credentials in both places (golang/oauth2).
        assert!(
            !p.contains_key("client_id"),
            "{base} sent client_id beside Basic"
        );
    }
}

#[tokio::test]
async fn notion_wants_basic_and_a_json_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(header("authorization", "Basic Y2lkOmNz"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({"grant_type": "authorization_code", "code": "c0", "redirect_uri": "http://127.0.0.1:8400/callback"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "ntn_1", "token_type": "bearer", "refresh_token": "nrt_1",
            "bot_id": "b1", "workspace_id": "w1", "workspace_name": "Acme", "owner": {"type": "user"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&moved("notion", &server, ""), "");
    let t = engine()
        .exchange_code(&c, "c0", &redirect(), None, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(t.extra["workspace_id"], "w1");
    assert_eq!(t.extra["bot_id"], "b1");
    assert_eq!(t.expires_at, None);
}

#[tokio::test]
async fn salesforce_has_no_expiry_and_an_instance_url() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "00Dxx!AQ", "signature": "sig", "scope": "refresh_token api",
            "instance_url": "https://acme.my.salesforce.com", "id": "https://login.salesforce.com/id/00D/005",
            "token_type": "Bearer", "issued_at": "1700000000000"
        })))
        .mount(&server)
        .await;
    let c = client(&moved("salesforce", &server, ""), "");
    assert!(
        c.scopes.contains(&"refresh_token".to_string()),
        "{:?}",
        c.scopes
    );
    let now = now_ms();
    let t = engine()
        .refresh(&c, &token("old", Some("5Aep")), now)
        .await
        .unwrap();
    assert_eq!(t.extra["instance_url"], "https://acme.my.salesforce.com");
    let at = t.expires_at.expect("a default lifetime");
    assert!(at > now && at <= now + 2 * 3_600_000 + 10_000);
    assert_eq!(
        t.refresh_token.unwrap().expose(),
        "5Aep",
        "no rotation by default"
    );
}

#[tokio::test]
async fn intuit_keeps_realm_id_from_the_redirect_and_the_refresh_token_lifetime() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(header("accept", "application/json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "bearer", "expires_in": 3600, "refresh_token": "AB11",
            "x_refresh_token_expires_in": 8_726_400, "access_token": "eyJ"
        })))
        .mount(&server)
        .await;
    let c = client(&moved("intuit", &server, ""), "");
    let callback = BTreeMap::from([
        ("realmId".to_string(), "4620816365".to_string()),
        ("other".to_string(), "ignored".to_string()),
    ]);
    let now = now_ms();
    let t = engine()
        .exchange_code(&c, "code", &redirect(), None, &callback)
        .await
        .unwrap();
    assert_eq!(t.extra["realmId"], "4620816365");
    assert!(!t.extra.contains_key("other"));
    let rt_at = t.refresh_expires_at.unwrap();
    assert!((now + 8_726_400_000..now + 8_726_410_000).contains(&rt_at));
    // realmId survives refreshes, which do not repeat it.
    let t2 = engine().refresh(&c, &t, now_ms()).await.unwrap();
    assert_eq!(t2.extra["realmId"], "4620816365");
}

#[tokio::test]
async fn provider_error_shapes_are_classified() {
    let server = MockServer::start().await;
    let cases = [
        // (profile, status, body, class, words)
        (
            "fitbit",
            400,
            json!({"errors": [{"errorType": "invalid_grant", "message": "Refresh token invalid: abc"}], "success": false}),
            ErrorClass::NeedsUser,
            "Refresh token invalid",
        ),
        (
            "atlassian",
            403,
            json!({"error": "invalid_grant", "error_description": "Unknown or invalid refresh token."}),
            ErrorClass::NeedsUser,
            "403",
        ),
        (
            "x",
            400,
            json!({"error": "invalid_request", "error_description": "Value passed for the token was invalid."}),
            ErrorClass::NeedsUser,
            "invalid_request (= invalid_grant)",
        ),
        (
            "twitch",
            400,
            json!({"status": 400, "message": "Invalid refresh token"}),
            ErrorClass::NeedsUser,
            "Invalid refresh token",
        ),
        (
            "hubspot",
            400,
            json!({"status": "BAD_REFRESH_TOKEN", "message": "missing or unknown refresh token"}),
            ErrorClass::NeedsUser,
            "BAD_REFRESH_TOKEN",
        ),
        (
            "google",
            400,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
            ErrorClass::NeedsUser,
            "expired or revoked",
        ),
        (
            "google",
            401,
            json!({"error": "invalid_client", "error_description": "Unauthorized"}),
            ErrorClass::Config,
            "invalid_client",
        ),
        (
            "google",
            500,
            json!({"error": "internal_failure"}),
            ErrorClass::Transient,
            "500",
        ),
    ];
    for (base, status, body, class, words) in cases {
        server.reset().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
        let c = client(&moved(base, &server, ""), "");
        let e = engine()
            .refresh(&c, &token("a", Some("r")), now_ms())
            .await
            .unwrap_err();
        assert_eq!(e.class, class, "{base}: {}", e.message);
        assert!(e.message.contains(words), "{base}: {}", e.message);
    }
}

#[tokio::test]
async fn yahoo_sends_the_redirect_uri_with_refreshes_and_x_sends_client_id_beside_basic() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "a", "expires_in": 3600, "xoauth_yahoo_guid": "G1"}),
        ))
        .mount(&server)
        .await;
    let c = client(&moved("yahoo", &server, ""), "");
    engine()
        .refresh(&c, &token("a0", Some("r0")), now_ms())
        .await
        .unwrap();
    let p = params(&last_request(&server).await);
    assert_eq!(
        p.get("redirect_uri").map(String::as_str),
        Some("oob"),
        "{p:?}"
    );

    let c = client(&moved("x", &server, ""), "");
    engine()
        .refresh(&c, &token("a0", Some("r0")), now_ms())
        .await
        .unwrap();
    let req = last_request(&server).await;
    assert_eq!(req.headers.get("authorization").unwrap(), "Basic Y2lkOmNz");
    let p = params(&req);
    assert_eq!(p.get("client_id").map(String::as_str), Some("cid"));
    assert!(!p.contains_key("client_secret"));
}

#[tokio::test]
async fn aidbox_as_documented_json_requests_userinfo_and_delete_session() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "grant_type": "authorization_code", "code": "c1",
            "redirect_uri": "http://127.0.0.1:8400/callback", "code_verifier": "v1",
            "client_id": "cid", "client_secret": "cs"
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer", "access_token": "ab1", "refresh_token": "rb1", "expires_in": 3600,
            "userinfo": {"id": "u1", "email": "u1@example.com", "resourceType": "User"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .and(body_json(json!({
            "grant_type": "refresh_token", "refresh_token": "rb1", "client_id": "cid", "client_secret": "cs"
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "ab2", "expires_in": 3600})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/Session"))
        .and(header("authorization", "Bearer ab2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    let c = client("aidbox", &format!("    base_url: {}\n", server.uri()));
    assert!(c.pkce, "Aidbox clients may use PKCE");
    let verifier = Secret::new("v1");
    let t = engine()
        .exchange_code(&c, "c1", &redirect(), Some(&verifier), &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(t.extra["userinfo"]["email"], "u1@example.com");
    let t2 = engine().refresh(&c, &t, now_ms()).await.unwrap();
    assert_eq!(t2.access_token.expose(), "ab2");
    assert_eq!(
        t2.refresh_token.as_ref().unwrap().expose(),
        "rb1",
        "no refresh token in the answer: the old one stays"
    );
    assert_eq!(t2.extra["userinfo"]["id"], "u1");
    engine().revoke(&c, &t2).await.unwrap();
}

#[tokio::test]
async fn revocation_styles() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .and(body_string_contains("token=r1"))
        .and(body_string_contains("token_type_hint=refresh_token"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/revoke"))
        .and(header("authorization", "Basic Y2lkOmNz"))
        .and(body_json(json!({"access_token": "a1"})))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .and(header("authorization", "Bearer a1"))
        .respond_with(ResponseTemplate::new(200).set_body_string("null"))
        .expect(1)
        .mount(&server)
        .await;
    let t = token("a1", Some("r1"));
    let revoke = format!(", revoke_url: \"{}/revoke\"", server.uri());
    engine()
        .revoke(&client(&moved("google", &server, &revoke), ""), &t)
        .await
        .unwrap();
    engine()
        .revoke(&client(&moved("github", &server, &revoke), ""), &t)
        .await
        .unwrap();
    engine()
        .revoke(&client(&moved("dropbox", &server, &revoke), ""), &t)
        .await
        .unwrap();
    // HubSpot: the refresh token in the path, DELETE.
    Mock::given(method("DELETE"))
        .and(path("/refresh-tokens/r1"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let hubspot = format!(
        "{{base: hubspot, revoke_url: \"{}/refresh-tokens/{{refresh_token}}\"}}",
        server.uri()
    );
    engine().revoke(&client(&hubspot, ""), &t).await.unwrap();
    // Slack answers 200 with ok:false when it did not revoke.
    Mock::given(method("POST"))
        .and(path("/slack-revoke"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"ok": false, "error": "invalid_auth"})),
        )
        .mount(&server)
        .await;
    let slack = format!(
        "{{base: slack, revoke_url: \"{}/slack-revoke\"}}",
        server.uri()
    );
    let e = engine().revoke(&client(&slack, ""), &t).await.unwrap_err();
    assert!(e.message.contains("invalid_auth"), "{}", e.message);
    // A token in the URL never shows in a message.
    Mock::given(method("DELETE"))
        .and(path("/gone/r1"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let gone = format!(
        "{{base: hubspot, revoke_url: \"{}/gone/{{refresh_token}}\"}}",
        server.uri()
    );
    let e = engine().revoke(&client(&gone, ""), &t).await.unwrap_err();
    assert!(
        e.message.contains("404") && e.message.contains("{refresh_token}"),
        "{}",
        e.message
    );
    assert!(!e.message.contains("r1"), "{}", e.message);
    // A provider without revocation says so.
    let e = engine()
        .revoke(&client("microsoft", ""), &t)
        .await
        .unwrap_err();
    assert!(
        e.message.contains("offers no token revocation"),
        "{}",
        e.message
    );
    // A refusal is reported with its code.
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"error": "unsupported_token_type"})),
        )
        .mount(&server)
        .await;
    let e = engine()
        .revoke(&client(&moved("google", &server, &revoke), ""), &t)
        .await
        .unwrap_err();
    assert!(
        e.message.contains("revocation endpoint") && e.message.contains("unsupported_token_type"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn keycloak_urls_come_from_base_url_and_realm() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/realms/acme/protocol/openid-connect/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "k1", "expires_in": 300, "refresh_expires_in": 1800, "refresh_token": "kr2",
            "token_type": "Bearer", "not-before-policy": 0, "session_state": "s", "scope": "openid offline_access"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(
        "keycloak",
        &format!("    base_url: {}/\n    realm: acme\n", server.uri()),
    );
    assert!(c.scopes.contains(&"offline_access".to_string()));
    let now = now_ms();
    let t = engine()
        .refresh(&c, &token("k0", Some("kr1")), now)
        .await
        .unwrap();
    let rt_at = t.refresh_expires_at.unwrap();
    assert!((now + 1_800_000..now + 1_810_000).contains(&rt_at));
}
