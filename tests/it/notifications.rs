//! Notification hooks through the real binary: a re-authorization notice that says where to go
//! (an authorization the daemon started), once per incident; `on_error` after N failures in a
//! row, not once per retry; `on_refresh` for consumers that reload, with the token only for a
//! client that opts in.

use crate::common::*;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A hook that appends one line per run: `client|event|url|reason|failures|token`.
fn hook(notes: &std::path::Path) -> String {
    format!(
        "[\"sh\", \"-c\", \"printf '%s|%s|%s|%s|%s|%s\\\\n' \\\"$OAUTH2MCI_CLIENT\\\" \\\"$OAUTH2MCI_EVENT\\\" \\\"$OAUTH2MCI_URL\\\" \\\"$OAUTH2MCI_REASON\\\" \\\"$OAUTH2MCI_FAILURES\\\" \\\"${{OAUTH2MCI_ACCESS_TOKEN:-none}}\\\" >> {}\"]",
        notes.display()
    )
}

fn lines(notes: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(notes)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauthorization_notice_says_where_to_go_once_per_incident() {
    let server = AuthServer::start(ServerOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes");
    let settings = format!("notify:\n  on_reauth_needed: {}\n", hook(&notes));
    let daemon = Daemon::start(&settings, &server.client_yaml("mail", ""));
    authorize(&daemon, "mail").await;

    server.revoke_all().await;
    assert_eq!(daemon.cli(&["refresh", "mail"]).status.code(), Some(5));
    wait_for("the notice", Duration::from_secs(10), || {
        !lines(&notes).is_empty()
    });
    // A mail client asking again and again is told where to go each time, the same place.
    let mut shown = Vec::new();
    for _ in 0..3 {
        let o = daemon.cli(&["token", "mail"]);
        assert_eq!(o.status.code(), Some(5));
        let err = stderr(&o);
        let url = err
            .split("To authorize, open ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("no URL in {err}"))
            .to_string();
        shown.push(url);
    }
    assert!(shown.windows(2).all(|w| w[0] == w[1]), "{shown:?}");
    std::thread::sleep(Duration::from_millis(500));
    let told = lines(&notes);
    assert_eq!(told.len(), 1, "one notice per incident: {told:?}");
    let note = &told[0];
    assert_eq!(note[0], "mail");
    assert_eq!(note[1], "reauth_needed");
    assert!(note[3].contains("invalid_grant"), "{note:?}");
    assert_eq!(
        note[2], shown[0],
        "the notice and `token` point to the same authorization"
    );
    assert!(note[2].starts_with(&format!("{}/auth?", server.issuer)));
    assert_eq!(note[5], "none", "a notice never carries the token");
    // The status stays what it is: the daemon's offer is not the user's step.
    assert_eq!(daemon.status_of("mail"), "needs_reauth");

    // The user follows the link from the notice: the daemon was listening for it.
    let (status, body) = browse(&note[2], true).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the new grant", Duration::from_secs(10), || {
        daemon.status_of("mail") == "valid"
    });
    assert_eq!(daemon.cli(&["token", "mail"]).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_told_after_n_failures_and_refreshes_to_hooks_that_opt_in() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let errors = dir.path().join("errors");
    let refreshes = dir.path().join("refreshes");
    let settings = format!(
        "notify:\n  error_after: 2\n  on_error: {}\n  on_refresh: {}\nrefresh:\n  retry: {{initial: 100ms, max: 300ms}}\n",
        hook(&errors),
        hook(&refreshes)
    );
    let client = |name: &str, extra: &str| {
        format!(
            "  {name}:\n    grant: client_credentials\n    provider:\n      token_url: {}/token\n    client_id: {name}\n    client_secret: s3cret\n{extra}",
            provider.uri()
        )
    };
    let clients = format!(
        "{}{}",
        client("feed", "    notify_token: true\n"),
        client("quiet", "")
    );
    let daemon = Daemon::start(&settings, &clients);
    wait_for("several failures", Duration::from_secs(20), || {
        daemon.client("feed")["failures"].as_u64().unwrap_or(0) >= 5
    });
    std::thread::sleep(Duration::from_millis(300));
    let told = lines(&errors);
    let feed: Vec<_> = told.iter().filter(|l| l[0] == "feed").collect();
    assert_eq!(feed.len(), 1, "one notice per incident: {told:?}");
    assert_eq!(feed[0][1], "error");
    assert_eq!(feed[0][4], "2", "told after error_after failures");
    assert!(feed[0][3].contains("503"), "{told:?}");

    // The server recovers: each client gets a token, and refresh hooks run.
    provider.reset().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "fresh-token", "token_type": "Bearer", "expires_in": 3600
        })))
        .mount(&provider)
        .await;
    wait_for("both tokens", Duration::from_secs(10), || {
        lines(&refreshes).len() >= 2
    });
    let refreshed = lines(&refreshes);
    let by = |name: &str| {
        refreshed
            .iter()
            .find(|l| l[0] == name)
            .unwrap_or_else(|| panic!("{name}: {refreshed:?}"))
            .clone()
    };
    assert_eq!(by("feed")[1], "refresh");
    assert_eq!(by("feed")[5], "fresh-token", "opted in");
    assert_eq!(by("quiet")[5], "none", "not opted in");
    assert_eq!(daemon.status_of("feed"), "valid");
}
