//! Failures and backoff against a fake token endpoint (wiremock): Retry-After is honoured, a
//! consumer asking again and again does not defeat the backoff, and recovery is automatic. Uses
//! the client_credentials grant, which needs no user, so the daemon starts on its own.

use crate::common::*;
use std::time::{Duration, Instant};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_honours_retry_after_and_recovers() {
    let server = MockServer::start().await;
    // Busy for the first two requests, then fine.
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=client_credentials"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "3"))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "machine-token-1", "token_type": "Bearer", "expires_in": 3600
        })))
        .mount(&server)
        .await;
    let clients = format!(
        "  reports:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: reports\n    client_secret: s\n    refresh: {{retry: {{initial: 1s, max: 10s}}}}\n    sinks: [{{path: tokens/reports}}]\n",
        server.uri()
    );
    let started = Instant::now();
    let daemon = Daemon::start("", &clients);
    wait_for("the first failure", Duration::from_secs(10), || {
        daemon.status_of("reports") == "retrying"
    });
    // Asking now returns the failure without another request to the server.
    let o = daemon.cli(&["token", "reports"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("503") && stderr(&o).contains("next attempt in"),
        "{}",
        stderr(&o)
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    // Nor does a manual refresh: the server asked for the wait.
    let o = daemon.cli(&["refresh", "reports"]);
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stderr(&o).contains("next attempt in"), "{}", stderr(&o));
    assert_eq!(server.received_requests().await.unwrap().len(), 1);

    wait_for("recovery", Duration::from_secs(20), || {
        daemon.status_of("reports") == "valid"
    });
    let elapsed = started.elapsed();
    // Two waits of at least Retry-After (3 s) each.
    assert!(
        elapsed >= Duration::from_secs(6),
        "recovered after {elapsed:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    // The token file is written just after the token is committed (and the status shown).
    wait_for("the token file", Duration::from_secs(5), || {
        std::fs::read_to_string(daemon.path("run/tokens/reports"))
            .is_ok_and(|t| t == "machine-token-1\n")
    });
    let o = daemon.cli(&["token", "reports"]);
    assert_eq!(stdout(&o), "machine-token-1\n");
    let info = daemon.client("reports");
    assert_eq!(info["failures"], 0);
    assert!(info["next_refresh_at"].as_i64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_is_told_once_and_never_hammers_the_server() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "error": "invalid_client", "error_description": "bad secret"
        })))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes");
    let settings = format!(
        "notify:\n  on_error: [\"sh\", \"-c\", \"echo {{client}}: \\\"$OAUTH2MCI_ERROR\\\" >> {}\"]\n",
        notes.display()
    );
    let clients = format!(
        "  reports:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: reports\n    client_secret: wrong\n    refresh: {{retry: {{initial: 1s, max: 2s}}}}\n",
        server.uri()
    );
    let daemon = Daemon::start(&settings, &clients);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let requests = server.received_requests().await.unwrap().len();
    // 1 s, then about 1-2 s apart: 3 to 6 in 6 s, never a storm.
    assert!((2..=7).contains(&requests), "{requests} requests in 6 s");
    let info = daemon.client("reports");
    assert_eq!(info["status"], "retrying");
    assert!(
        info["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{info}"
    );
    let told = std::fs::read_to_string(&notes).unwrap();
    assert_eq!(told.lines().count(), 1, "{told}");
    assert!(
        told.starts_with("reports: ") && told.contains("invalid_client"),
        "{told}"
    );
    assert!(!told.contains("wrong"), "the secret never reaches a hook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_refreshes_tokens_without_expiry() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "no-expiry", "token_type": "Bearer"
        })))
        .mount(&server)
        .await;
    // Every two seconds (six fields: seconds first).
    let clients = format!(
        "  feed:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: feed\n    client_secret: s\n    cron: \"*/2 * * * * *\"\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    wait_for("the first token", Duration::from_secs(10), || {
        daemon.status_of("feed") == "valid"
    });
    tokio::time::sleep(Duration::from_secs(7)).await;
    let requests = server.received_requests().await.unwrap().len();
    // The first token, then one per cron tick: 3 or 4 ticks in 7 s.
    assert!((3..=6).contains(&requests), "{requests} requests");
    assert!(daemon.client("feed")["expires_at"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_hanging_up_does_not_cancel_its_refresh() {
    let server = MockServer::start().await;
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = counter.clone();
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(move |_: &wiremock::Request| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            ResponseTemplate::new(200)
                .set_delay(Duration::from_millis(1500))
                .set_body_json(serde_json::json!({
                    "access_token": format!("slow-{n}"), "token_type": "Bearer", "expires_in": 3600
                }))
        })
        .mount(&server)
        .await;
    let clients = format!(
        "  slow:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: slow\n    client_secret: s\n    sinks: [{{path: tokens/slow}}]\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    wait_for("the first token", Duration::from_secs(10), || {
        daemon.status_of("slow") == "valid"
    });
    // Ask for a refresh and hang up long before the server answers.
    let socket = daemon.socket.clone();
    let gave_up = oauth2mci::cli::request(
        &socket,
        "POST",
        "/v1/clients/slow/refresh",
        Duration::from_millis(300),
    );
    assert!(gave_up.is_err(), "the consumer gave up");
    wait_for(
        "the refresh to land anyway",
        Duration::from_secs(10),
        || std::fs::read_to_string(daemon.path("run/tokens/slow")).is_ok_and(|t| t == "slow-2\n"),
    );
    assert_eq!(daemon.status_of("slow"), "valid");
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(
        !daemon.log_text().contains("not saved"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_user_backs_off_on_invalid_grant() {
    // RFC 7523's answer to a bad assertion, or a server that says it to client credentials:
    // no user can help, so it is a settings error retried slowly, not a loop.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(serde_json::json!({"error": "invalid_grant"})),
        )
        .mount(&server)
        .await;
    let clients = format!(
        "  reports:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: reports\n    client_secret: s\n    refresh: {{retry: {{initial: 1s, max: 10s}}}}\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    std::thread::sleep(Duration::from_secs(3));
    let requests = server.received_requests().await.unwrap().len();
    assert!((1..=3).contains(&requests), "{requests} requests in 3 s");
    let info = daemon.client("reports");
    assert_eq!(info["status"], "retrying", "{info}");
    assert!(
        info["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_grant")
    );
}

/// A consumer asking for a token valid longer than the server ever grants gets one valid for
/// half its lifetime or more, with a warning, instead of a refresh on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_more_than_the_server_grants_does_not_refresh_every_time() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "short-lived", "token_type": "Bearer", "expires_in": 600
        })))
        .mount(&server)
        .await;
    let clients = format!(
        "  short:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: short\n    client_secret: s\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    wait_for("the first token", Duration::from_secs(10), || {
        daemon.status_of("short") == "valid"
    });
    for _ in 0..20 {
        let o = daemon.cli(&["token", "short", "--min-valid", "2h"]);
        assert_eq!(stdout(&o), "short-lived\n", "{}", stderr(&o));
        assert!(
            stderr(&o).contains("the server grants tokens valid for 10m"),
            "{}",
            stderr(&o)
        );
    }
    let (code, reply) = daemon
        .get("/v1/clients/short/token?min_valid=7200")
        .unwrap();
    assert_eq!(code, 200, "{reply}");
    assert!(
        reply["warning"].as_str().unwrap_or("").contains("10m"),
        "{reply}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
