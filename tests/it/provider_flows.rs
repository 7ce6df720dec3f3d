//! Provider profiles through the real daemon: a provider that answers as Aidbox documents
//! (JSON token requests, `userinfo` kept and served), the warning before a grant's known end,
//! a token nothing can renew, and an answer no reading of the profile can parse. The
//! authorization server is wiremock; the browser's part is a request to the daemon's redirect
//! listener with the code, as the server would redirect it.

use crate::common::*;
use serde_json::json;
use std::time::Duration;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The user consents at once: the browser is sent to the redirect URI with a code.
async fn consent(auth: &Authorize, code: &str) -> u16 {
    let mut url = url::Url::parse(&auth.param("redirect_uri")).unwrap();
    url.query_pairs_mut()
        .append_pair("code", code)
        .append_pair("state", &auth.param("state"));
    reqwest::get(url).await.unwrap().status().as_u16()
}

async fn authorize_with_code(daemon: &Daemon, name: &str) {
    let auth = Authorize::start(daemon, name);
    assert_eq!(consent(&auth, "c1").await, 200);
    let (code, err) = auth.finish();
    assert_eq!(code, 0, "authorize failed: {err}\n{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aidbox_authorization_and_refresh_through_the_daemon() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .and(body_partial_json(json!({
            "grant_type": "authorization_code", "code": "c1", "client_id": "webapp", "client_secret": "s3cret"
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer", "access_token": "aidbox-at-1", "refresh_token": "aidbox-rt-1",
            "expires_in": 3600, "userinfo": {"id": "u1", "email": "u1@example.com"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    // The documented refresh answer carries no refresh token: the first one must be kept.
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .and(body_partial_json(
            json!({"grant_type": "refresh_token", "refresh_token": "aidbox-rt-1"}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "aidbox-at-2", "expires_in": 3600})),
        )
        .expect(2)
        .mount(&server)
        .await;
    let clients = format!(
        "  fhir:\n    provider: aidbox\n    base_url: {}\n    client_id: webapp\n    client_secret: s3cret\n    sinks: [{{path: tokens/fhir.json, format: json}}]\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    authorize_with_code(&daemon, "fhir").await;
    assert_eq!(
        stdout(&daemon.cli(&["token", "fhir"])).trim(),
        "aidbox-at-1"
    );
    let (status, reply) = daemon.get("/v1/clients/fhir/token").unwrap();
    assert_eq!(status, 200);
    assert_eq!(reply["extra"]["userinfo"]["email"], "u1@example.com");
    for _ in 0..2 {
        let o = daemon.cli(&["refresh", "fhir"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(
        stdout(&daemon.cli(&["token", "fhir"])).trim(),
        "aidbox-at-2"
    );
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(daemon.path("run/tokens/fhir.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(file["access_token"], "aidbox-at-2");
    assert_eq!(
        file["extra"]["userinfo"]["id"], "u1",
        "kept across refreshes"
    );
    assert_eq!(daemon.client("fhir")["has_refresh_token"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_is_warned_once_before_a_grant_ends() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "li-at", "expires_in": 5_184_000, "refresh_token": "li-rt"
        })))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let warnings = dir.path().join("warnings");
    let settings = format!(
        "notify:\n  on_warning: [sh, -c, 'echo \"$OAUTH2MCI_CLIENT: $OAUTH2MCI_ERROR\" >> {}']\n",
        warnings.display()
    );
    // A LinkedIn-like grant that lasts 2 h from the authorization, however often refreshed.
    let clients = format!(
        "  li:\n    provider: {{base: generic, authorize_url: \"{0}/authorize\", token_url: \"{0}/token\", refresh_token_max_lifetime: 2h}}\n    client_id: c\n    client_secret: s\n    refresh: {{warn_before: 3h}}\n",
        server.uri()
    );
    let mut daemon = Daemon::start(&settings, &clients);
    authorize_with_code(&daemon, "li").await;
    wait_for("the warning", Duration::from_secs(10), || {
        std::fs::read_to_string(&warnings).is_ok_and(|w| w.contains("li: the grant ends in"))
    });
    let info = daemon.client("li");
    let ends = info["grant_ends_at"]
        .as_i64()
        .expect("grant_ends_at in status");
    let now = oauth2mci::token::now_ms();
    assert!(
        (now + 7_000_000..now + 7_200_001).contains(&ends),
        "{ends} vs {now}"
    );
    // Said once: not again after a refresh, nor after a restart.
    assert!(daemon.cli(&["refresh", "li"]).status.success());
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon
        .wait_exit(Duration::from_secs(20))
        .expect("daemon stops");
    daemon.spawn();
    wait_for("restart", Duration::from_secs(10), || {
        daemon.status_of("li") == "valid"
    });
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(&warnings).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_nothing_can_renew_is_watched_until_it_ends() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "short", "expires_in": 3})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hooks");
    let settings = format!(
        "notify:\n  on_warning: [sh, -c, 'echo \"$OAUTH2MCI_EVENT\" >> {0}']\n  on_reauth_needed: [sh, -c, 'echo \"$OAUTH2MCI_EVENT\" >> {0}']\n",
        log.display()
    );
    let clients = format!(
        "  fb:\n    provider: {{base: generic, authorize_url: \"{0}/authorize\", token_url: \"{0}/token\", refresh_mechanism: none}}\n    client_id: c\n    client_secret: s\n",
        server.uri()
    );
    let daemon = Daemon::start(&settings, &clients);
    authorize_with_code(&daemon, "fb").await;
    wait_for("warning, then the end", Duration::from_secs(15), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l == "warning\nreauth_needed\n")
    });
    assert_eq!(daemon.status_of("fb"), "needs_reauth");
    let o = daemon.cli(&["token", "fb"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_answer_keeps_the_old_token_and_says_what_was_wrong() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "good-1", "expires_in": 3600})),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": 12345, "refresh_token": "leak-me"})),
        )
        .mount(&server)
        .await;
    let clients = format!(
        "  svc:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: c\n    client_secret: s\n    sinks: [{{path: tokens/svc}}]\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    wait_for("the first token", Duration::from_secs(10), || {
        daemon.status_of("svc") == "valid"
    });
    let o = daemon.cli(&["refresh", "svc"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("access_token is a number, not a non-empty string"),
        "{err}"
    );
    assert!(err.contains("the previous token stays in use"), "{err}");
    assert!(!err.contains("12345") && !err.contains("leak-me"), "{err}");
    assert_eq!(stdout(&daemon.cli(&["token", "svc"])).trim(), "good-1");
    assert_eq!(
        std::fs::read_to_string(daemon.path("run/tokens/svc")).unwrap(),
        "good-1\n"
    );
    assert!(!daemon.log_text().contains("leak-me"));
}
