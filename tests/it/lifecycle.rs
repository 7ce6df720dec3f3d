//! One client's whole life against a real authorization server (oidc-provider): authorize,
//! tokens in files and over the socket, scheduled refresh without storms, restart after SIGTERM
//! and kill -9 without a new authorization, and clean shutdown.

use crate::common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_refresh_restart_and_stop() {
    // Tokens live 10 s: the daemon must refresh them in time, and not much more often.
    let server = AuthServer::start(ServerOptions {
        access_token_ttl: 10,
        ..ServerOptions::default()
    });
    let sinks = "    sinks:\n      - { path: tokens/mail, format: raw }\n      - { path: tokens/mail.json, format: json }\n      - { path: tokens/mail.env, format: env }\n      - { path: tokens/mail.header, format: header }\n";
    let mut daemon = Daemon::start("", &server.client_yaml("mail", sinks));

    assert_eq!(daemon.status_of("mail"), "unauthorized");
    let o = daemon.cli(&["token", "mail"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("oauth2mci authorize mail"));

    authorize(&daemon, "mail").await;
    let info = daemon.client("mail");
    assert_eq!(info["status"], "valid", "{info}");
    assert_eq!(info["has_refresh_token"], true);

    // The token over the CLI, and in each sink, mode 0600.
    let o = daemon.cli(&["token", "mail"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let token = stdout(&o).trim().to_string();
    assert!(token.len() > 20);
    let raw = daemon.path("run/tokens/mail");
    assert_eq!(std::fs::read_to_string(&raw).unwrap(), format!("{token}\n"));
    assert_eq!(mode_of(&raw), 0o600);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(daemon.path("run/tokens/mail.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["access_token"], token);
    assert!(
        std::fs::read_to_string(daemon.path("run/tokens/mail.env"))
            .unwrap()
            .starts_with(&format!(
                "MAIL_ACCESS_TOKEN='{token}'\nMAIL_TOKEN_TYPE='Bearer'\n"
            ))
    );
    assert_eq!(
        std::fs::read_to_string(daemon.path("run/tokens/mail.header")).unwrap(),
        format!("Authorization: Bearer {token}\n")
    );
    // Never in the log.
    assert!(!daemon.log_text().contains(&token));

    // Scheduled refresh: in 22 s a 10 s token is refreshed about 4 times (half-life), never
    // in a storm, and never twice with the same rotated refresh token (the server would revoke
    // the grant and count an error).
    tokio::time::sleep(Duration::from_secs(22)).await;
    let refreshed = server.refreshes("success").await;
    assert!(
        (2..=6).contains(&refreshed),
        "{refreshed} refreshes in 22 s of 10 s tokens"
    );
    assert_eq!(server.refreshes("error").await, 0, "{}", daemon.log_text());
    let newer = std::fs::read_to_string(&raw).unwrap();
    assert_ne!(newer.trim(), token, "the sink follows refreshes");
    assert_eq!(daemon.status_of("mail"), "valid");

    // `token --min-valid` longer than what is left forces a refresh that others join.
    let before = server.refreshes("success").await;
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                std::process::Command::new(BIN)
                    .args(["token", "mail", "--min-valid", "9s"])
                    .env("OAUTH2MCI_SOCKET", socket)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let outputs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for o in &outputs {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    }
    let after = server.refreshes("success").await;
    assert!(
        after - before <= 2,
        "5 concurrent demands made {} refreshes",
        after - before
    );
    assert_eq!(server.refreshes("error").await, 0);

    // kill -9, restart: no new authorization, the schedule resumes from the database.
    daemon.kill9();
    daemon.spawn();
    assert_eq!(daemon.status_of("mail"), "valid", "{}", daemon.log_text());
    let o = daemon.cli(&["token", "mail", "--min-valid", "1s"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let before = server.refreshes("success").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        server.refreshes("success").await > before,
        "refreshing resumes after a restart"
    );
    assert_eq!(server.refreshes("error").await, 0, "{}", daemon.log_text());

    // SIGTERM: clean exit, socket removed, and the next start needs no authorization either.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(40)), Some(0));
    assert!(
        !daemon.socket.exists(),
        "the socket file is removed at shutdown"
    );
    daemon.spawn();
    assert_eq!(daemon.status_of("mail"), "valid");
    let db = daemon.path("state/state.db");
    assert_eq!(mode_of(&db), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_needs_the_user_and_says_so_once() {
    let server = AuthServer::start(ServerOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes");
    let settings = format!(
        "notify:\n  on_reauth_needed: [\"sh\", \"-c\", \"echo \\\"$OAUTH2MCI_CLIENT {{event}}\\\" >> {}\"]\n",
        notes.display()
    );
    let daemon = Daemon::start(&settings, &server.client_yaml("crm", ""));
    authorize(&daemon, "crm").await;

    server.revoke_all().await;
    let o = daemon.cli(&["refresh", "crm"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid_grant"), "{}", stderr(&o));
    let info = daemon.client("crm");
    assert_eq!(info["status"], "needs_reauth");
    assert!(info["reason"].as_str().unwrap().contains("invalid_grant"));
    // The token is no longer handed out, and asking again does not ask the server again.
    let o = daemon.cli(&["token", "crm"]);
    assert_eq!(o.status.code(), Some(5));
    let o = daemon.cli(&["refresh", "crm"]);
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(server.refreshes("error").await, 1);

    wait_for("the hook", Duration::from_secs(10), || notes.exists());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "crm reauth_needed\n"
    );

    // Authorizing again heals it.
    authorize(&daemon, "crm").await;
    assert_eq!(daemon.status_of("crm"), "valid");
    assert_eq!(daemon.cli(&["token", "crm"]).status.code(), Some(0));
}

/// With thousands of clients the store is opened and read on a thread of its own while the
/// configuration is parsed (daemon.rs). What it read reaches every client after a restart, and
/// a bad client still stops the start, placed in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_configuration_restarts_with_the_tokens_it_stored() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CLIENTS: usize = 6_000;
    /// A new token for every grant request.
    struct Numbered(AtomicUsize);
    impl wiremock::Respond for Numbered {
        fn respond(&self, _: &wiremock::Request) -> wiremock::ResponseTemplate {
            let n = self.0.fetch_add(1, Ordering::Relaxed);
            wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": format!("machine-{n}"), "token_type": "Bearer", "expires_in": 86400
            }))
        }
    }
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(Numbered(AtomicUsize::new(0)))
        .mount(&server)
        .await;
    let clients: String = (0..CLIENTS)
        .map(|i| {
            format!(
                "  c{i}: {{grant: client_credentials, provider: {{token_url: \"{}/token\"}}, client_id: app{i}, client_secret: s}}\n",
                server.uri()
            )
        })
        .collect();
    let mut daemon = Daemon::start("", &clients);
    let sample = [
        "c0".to_string(),
        "c2999".into(),
        format!("c{}", CLIENTS - 1),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while server.received_requests().await.unwrap_or_default().len() < CLIENTS {
        assert!(
            std::time::Instant::now() < deadline,
            "not every client got a token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for(
        "the sampled clients' tokens",
        Duration::from_secs(10),
        || sample.iter().all(|c| daemon.status_of(c) == "valid"),
    );
    let token_of = |daemon: &Daemon, name: &str| {
        let o = daemon.cli(&["token", name]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        stdout(&o)
    };
    let served: Vec<String> = sample.iter().map(|c| token_of(&daemon, c)).collect();

    // Grants still out are saved before the daemon stops.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let obtained = server.received_requests().await.unwrap_or_default().len();
    assert_eq!(obtained, CLIENTS);
    daemon.spawn();
    assert!(
        daemon
            .log_text()
            .contains("the store was read alongside the configuration"),
        "{}",
        daemon.log_text()
    );
    let again: Vec<String> = sample.iter().map(|c| token_of(&daemon, c)).collect();
    assert_eq!(again, served);
    let (_, health) = daemon.get("/v1/health").unwrap();
    assert_eq!(health["clients"], CLIENTS, "{health}");
    // Every token came back from the store: no grant since the restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = server.received_requests().await.unwrap_or_default().len();
    assert_eq!(total, obtained);

    // A client wrong near the end: refused with its line, though the store was opened.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let text = daemon.config_text();
    let bad = format!("client_id: app{},", CLIENTS - 2);
    let line = text.lines().position(|l| l.contains(&bad)).unwrap() + 1;
    std::fs::write(
        &daemon.config,
        text.replacen(&bad, "client_id: app, pkce: maybe,", 1),
    )
    .unwrap();
    let o = std::process::Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("config.yaml:{line}:")) && err.lines().count() == 1,
        "{err}"
    );
    std::fs::write(&daemon.config, text).unwrap();
    daemon.spawn();
    assert_eq!(token_of(&daemon, "c0"), served[0]);
}
