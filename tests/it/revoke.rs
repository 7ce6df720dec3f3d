//! `oauth2mci revoke NAME [--local]` through the real binary: revoked at oidc-provider (RFC
//! 7009) then forgotten with its token files; a server that cannot revoke keeps the tokens unless
//! `--local` is given.

use crate::common::*;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SINK: &str = "    sinks: [{path: mail.token}]\n";

fn provider_block(server: &AuthServer, revoke_url: Option<&str>) -> String {
    let revoke = revoke_url
        .map(|u| format!("      revoke_url: {u}\n"))
        .unwrap_or_default();
    format!(
        "  mail:\n    provider:\n      authorize_url: {iss}/auth\n      token_url: {iss}/token\n{revoke}    client_id: {CLIENT_ID}\n    client_secret: {CLIENT_SECRET}\n    scopes: [openid, offline_access]\n{SINK}",
        iss = server.issuer
    )
}

/// Whether the server still takes `token`.
async fn active(server: &AuthServer, token: &str) -> bool {
    server.introspect(token).await["active"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_grant_at_the_server_then_forgets_it_here() {
    let server = AuthServer::start(ServerOptions::default());
    let revoke_url = format!("{}/token/revocation", server.issuer);
    let daemon = Daemon::start("", &provider_block(&server, Some(&revoke_url)));
    authorize(&daemon, "mail").await;
    let token = stdout(&daemon.cli(&["token", "mail"])).trim().to_string();
    assert!(active(&server, &token).await);
    let sink = daemon.path("run/mail.token");
    assert!(sink.exists());

    // An authorization left waiting (started, never finished) must not outlive the revocation.
    let (_, waiting) = daemon
        .request("POST", "/v1/clients/mail/authorize")
        .unwrap();
    let state = waiting["state"].as_str().unwrap().to_string();

    let o = daemon.cli(&["revoke", "mail"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("revoked at the server"),
        "{}",
        stdout(&o)
    );
    let (_, outcome) = daemon
        .get(&format!("/v1/clients/mail/authorization?state={state}"))
        .unwrap();
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(outcome["error"], "cancelled", "{outcome}");
    // Revoking the refresh token ended the grant, its access token with it.
    assert!(!active(&server, &token).await);
    assert!(!sink.exists(), "the token file is removed");
    let info = daemon.client("mail");
    assert_eq!(info["status"], "revoked");
    assert_eq!(info["has_refresh_token"], false);
    let o = daemon.cli(&["token", "mail"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(
        stderr(&o).contains("oauth2mci authorize mail"),
        "{}",
        stderr(&o)
    );
    // Nothing left to revoke is not an error.
    let o = daemon.cli(&["revoke", "mail"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("nothing to revoke"), "{}", stdout(&o));
    // Authorizing again brings it back.
    authorize(&daemon, "mail").await;
    assert_eq!(daemon.status_of("mail"), "valid");
    assert!(sink.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_revoke_keeps_the_tokens_unless_local_is_asked() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &provider_block(&server, None));
    authorize(&daemon, "mail").await;
    let sink = daemon.path("run/mail.token");

    let o = daemon.cli(&["revoke", "mail"]);
    assert_eq!(o.status.code(), Some(6), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("offers no token revocation"), "{err}");
    assert!(err.contains("--local"), "{err}");
    assert_eq!(daemon.status_of("mail"), "valid");
    assert!(sink.exists());

    let o = daemon.cli(&["revoke", "mail", "--local"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("NOT revoked at the server"),
        "{}",
        stdout(&o)
    );
    assert_eq!(daemon.status_of("mail"), "revoked");
    assert!(!sink.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_revocation_endpoint_keeps_the_tokens() {
    let server = AuthServer::start(ServerOptions::default());
    let broken = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .respond_with(ResponseTemplate::new(503).set_body_string("<html>down</html>"))
        .expect(2)
        .mount(&broken)
        .await;
    let daemon = Daemon::start(
        "",
        &provider_block(&server, Some(&format!("{}/revoke", broken.uri()))),
    );
    authorize(&daemon, "mail").await;
    let o = daemon.cli(&["revoke", "mail"]);
    assert_eq!(o.status.code(), Some(6));
    let err = stderr(&o);
    assert!(err.contains("503"), "{err}");
    assert!(err.contains("tokens are kept"), "{err}");
    assert_eq!(daemon.status_of("mail"), "valid");
    assert_eq!(daemon.cli(&["token", "mail"]).status.code(), Some(0));
    // --local still tries the server first, then forgets anyway.
    let o = daemon.cli(&["revoke", "mail", "--local"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("503"), "{}", stdout(&o));
    assert_eq!(daemon.status_of("mail"), "revoked");
    let events = daemon.get("/v1/clients/mail/events").unwrap().1;
    assert!(
        events.to_string().contains("not revoked at the server"),
        "{events}"
    );
}
