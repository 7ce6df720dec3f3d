//! Keys instead of secrets (RFC 7523), through the real binary: `private_key_jwt` client
//! authentication checked by oidc-provider, and the JWT bearer grant of Google service accounts
//! against a fake token endpoint that verifies the signature and claims as Google documents.

use crate::common::*;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

fn key(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn jwk() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(key("rsa.jwk.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_proves_itself_with_a_signed_assertion() {
    let jwk = jwk();
    let server = AuthServer::start(ServerOptions {
        extra_clients: vec![serde_json::json!({
            "client_id": "signer",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": { "keys": [jwk.clone()] },
            "grant_types": ["client_credentials"],
            "redirect_uris": [],
            "response_types": [],
        })],
        access_token_ttl: 4,
        ..ServerOptions::default()
    });
    let client = |name: &str, pem: &str| {
        format!(
            "  {name}:\n    grant: client_credentials\n    provider: {{token_url: {iss}/token}}\n    client_id: signer\n    private_key: {{file: {pem}}}\n    key_id: {kid}\n",
            iss = server.issuer,
            pem = key(pem),
            kid = jwk["kid"].as_str().unwrap()
        )
    };
    // The registered key, and a key the server does not know.
    let clients = format!(
        "{}    sinks: [{{path: svc}}]\n{}",
        client("svc", "rsa.pem"),
        client("impostor", "ec.pem")
    );
    let daemon = Daemon::start("", &clients);
    // Fetched at start, and renewed before it expires with nobody asking (the client
    // credentials grant needs no user, ever).
    let sink = daemon.path("run/svc");
    wait_for("the first token", Duration::from_secs(10), || sink.exists());
    let first = std::fs::read_to_string(&sink).unwrap();
    wait_for("a renewal", Duration::from_secs(10), || {
        std::fs::read_to_string(&sink).is_ok_and(|t| t != first)
    });
    assert_eq!(daemon.client("svc")["status"], "valid");
    let o = daemon.cli(&["token", "svc"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&o),
        daemon.log_text()
    );
    assert!(!stdout(&o).trim().is_empty());
    // Each request signs a new assertion (oidc-provider refuses a replayed jti).
    let o = daemon.cli(&["refresh", "svc"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    wait_for("the impostor's refusal", Duration::from_secs(10), || {
        daemon.client("impostor")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid_client"))
    });
    assert_eq!(daemon.status_of("impostor"), "retrying");
    // Nothing secret reaches the log.
    let pem = std::fs::read_to_string(key("rsa.pem")).unwrap();
    let line = pem.lines().nth(1).unwrap();
    assert!(!daemon.log_text().contains(line));
}

/// A token endpoint that checks a JWT bearer grant as Google does: RS256 with the service
/// account's key, `iss` the account, `aud` the token URL, the scopes in the `scope` claim.
fn google_like(token_url: String) -> impl Fn(&Request) -> ResponseTemplate + Send + Sync {
    let jwk = jwk();
    move |req: &Request| {
        let form: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(&req.body)
                .into_owned()
                .collect();
        if form.get("grant_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
            || form.contains_key("scope")
        {
            return ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({"error": "unsupported_grant_type"}));
        }
        let key = jsonwebtoken::DecodingKey::from_rsa_components(
            jwk["n"].as_str().unwrap(),
            jwk["e"].as_str().unwrap(),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&[token_url.as_str()]);
        validation.set_issuer(&["robot@project.iam.gserviceaccount.com"]);
        let verified = jsonwebtoken::decode::<serde_json::Value>(
            form.get("assertion").map(String::as_str).unwrap_or(""),
            &key,
            &validation,
        );
        match verified {
            Ok(data)
                if data.claims["scope"] == "https://www.googleapis.com/auth/drive.readonly"
                    && data.claims["sub"] == "alice@example.com"
                    && data.header.kid.as_deref() == Some("key-42") =>
            {
                ResponseTemplate::new(200).set_body_json(serde_json::json!({
                    "access_token": "ya29.service", "token_type": "Bearer", "expires_in": 3599
                }))
            }
            other => ResponseTemplate::new(400).set_body_json(serde_json::json!({
                "error": "invalid_grant",
                "error_description": format!("{:?}", other.map(|d| d.claims)),
            })),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_gets_tokens_with_no_user_ever() {
    let google = MockServer::start().await;
    let token_url = format!("{}/token", google.uri());
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(google_like(token_url.clone()))
        .mount(&google)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("robot.json");
    std::fs::write(
        &sa,
        serde_json::json!({
            "type": "service_account",
            "client_email": "robot@project.iam.gserviceaccount.com",
            "private_key_id": "key-42",
            "private_key": std::fs::read_to_string(key("rsa.pem")).unwrap(),
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string(),
    )
    .unwrap();
    let clients = format!(
        "  drive:\n    provider: {{base: google-service-account, token_url: \"{token_url}\"}}\n    grant: jwt_bearer\n    service_account_key: {{file: {}}}\n    subject: alice@example.com\n    scopes: [\"https://www.googleapis.com/auth/drive.readonly\"]\n    sinks: [{{path: drive}}]\n",
        sa.display()
    );
    let daemon = Daemon::start("", &clients);
    // Fetched at start, without anyone asking.
    wait_for("the first token", Duration::from_secs(10), || {
        daemon.path("run/drive").exists()
    });
    assert_eq!(
        std::fs::read_to_string(daemon.path("run/drive"))
            .unwrap()
            .trim(),
        "ya29.service"
    );
    let info = daemon.client("drive");
    assert_eq!(info["grant"], "jwt_bearer");
    assert_eq!(info["status"], "valid", "{info}");
    // Renewed like any other token, by a new assertion.
    let o = daemon.cli(&["refresh", "drive"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(google.received_requests().await.unwrap().len(), 2);
    // There is nothing for a user to do.
    let o = daemon.cli(&["authorize", "drive"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("needs no authorization"),
        "{}",
        stderr(&o)
    );
}
