//! One slow client cannot starve its neighbours, through the real daemon: when many clients of
//! one token endpoint hang (a partial outage), the healthy clients of that endpoint are still
//! refreshed before their tokens expire, and a consumer waiting in `token` goes before the
//! scheduled work.

use crate::common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// Healthy clients' tokens live this long.
const LIFETIME_SECS: u64 = 20;

#[derive(Clone, Default)]
struct Healthy(Arc<AtomicUsize>);

impl Respond for Healthy {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": format!("ok-{n}"), "token_type": "Bearer", "expires_in": LIFETIME_SECS
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_clients_are_refreshed_beside_many_that_hang() {
    let server = MockServer::start().await;
    // The clients whose secret is `hang` get their answer after the request timeout.
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("client_secret=hang"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"access_token": "late", "expires_in": 3600}))
                .set_delay(Duration::from_secs(30)),
        )
        .mount(&server)
        .await;
    let healthy = Healthy::default();
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(healthy.clone())
        .mount(&server)
        .await;
    let client = |name: &str, secret: &str| {
        format!(
            "  {name}:\n    grant: client_credentials\n    provider: {{token_url: \"{}/token\", client_auth: post}}\n    client_id: {name}\n    client_secret: {secret}\n",
            server.uri()
        )
    };
    let mut clients: String = (0..30)
        .map(|i| client(&format!("hang{i}"), "hang"))
        .collect();
    clients.extend((0..4).map(|i| client(&format!("ok{i}"), "ok")));
    let settings = "limits:\n  per_endpoint_concurrency: 4\n  request_timeout: 15s\nrefresh:\n  before_expiry: 10s\n  min_before_expiry: 1s\n  jitter: 0%\n  retry: {initial: 1s, max: 5s}\n";
    let daemon = Daemon::start(settings, &clients);
    let healthy_valid = || (0..4).all(|i| daemon.status_of(&format!("ok{i}")) == "valid");
    wait_for(
        "the healthy clients' first tokens",
        Duration::from_secs(30),
        healthy_valid,
    );

    // For longer than the hung requests' timeout, with their retries: every healthy token is
    // renewed before it expires, again and again.
    let begun = Instant::now();
    let before = healthy.0.load(Ordering::SeqCst);
    while begun.elapsed() < Duration::from_secs(25) {
        for i in 0..4 {
            let info = daemon.client(&format!("ok{i}"));
            let left = info["expires_in"].as_i64().unwrap_or(-1);
            assert!(
                left > 0,
                "ok{i} let expire at {:?}: {info}",
                begun.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let renewed = healthy.0.load(Ordering::SeqCst) - before;
    assert!(
        renewed >= 4 * 2,
        "only {renewed} refreshes of the healthy clients in 25 s"
    );

    // A consumer that needs a fresh token gets it at once, before the scheduled work.
    for i in 0..4 {
        let begun = Instant::now();
        let o = daemon.cli(&[
            "token",
            &format!("ok{i}"),
            "--min-valid",
            &format!("{}s", LIFETIME_SECS - 1),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(
            begun.elapsed() < Duration::from_secs(3),
            "a consumer waited {:?}",
            begun.elapsed()
        );
    }
}
