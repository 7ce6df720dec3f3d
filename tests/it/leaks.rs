//! No token or secret reaches a log, an error, `status`, the history or the metrics: a whole
//! life (authorize, refreshes with rotation, a revoked grant, errors) with debug logging, then
//! every token the database ever held and the client secret are looked for everywhere the
//! daemon writes words.

use crate::common::*;

/// The tokens the daemon holds now, from its database.
fn tokens_in_db(daemon: &Daemon) -> Vec<String> {
    let db = rusqlite::Connection::open(daemon.path("state/state.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT access_token, refresh_token, id_token FROM tokens")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok([
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ])
        })
        .unwrap();
    rows.flat_map(|r| r.unwrap()).flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_secret_is_ever_written_where_people_read() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &server.client_yaml("mail", ""));
    let mut secrets = vec![CLIENT_SECRET.to_string()];
    let mut words = Vec::new();

    authorize(&daemon, "mail").await;
    secrets.extend(tokens_in_db(&daemon));
    for _ in 0..2 {
        let o = daemon.cli(&["refresh", "mail"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        words.push(stdout(&o) + &stderr(&o));
        secrets.extend(tokens_in_db(&daemon));
    }
    // A revoked grant: errors from the server, the needs-authorization path.
    server.revoke_all().await;
    for args in [
        &["refresh", "mail"][..],
        &["token", "mail"],
        &["status"],
        &["status", "mail", "--json"],
        &["revoke", "mail"],
    ] {
        let o = daemon.cli(args);
        words.push(stdout(&o) + &stderr(&o));
    }
    words.push(
        daemon
            .get("/v1/clients/mail/events?limit=1000")
            .unwrap()
            .1
            .to_string(),
    );
    words.push(daemon.get("/v1/clients").unwrap().1.to_string());
    let (_, metrics) = oauth2mci::cli::request(
        &daemon.socket,
        "GET",
        "/metrics",
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    words.push(String::from_utf8_lossy(&metrics).into_owned());
    words.push(daemon.log_text());

    secrets.sort();
    secrets.dedup();
    // Two tokens per refresh at least (rotation), plus the secret.
    assert!(secrets.len() >= 7, "{} secrets collected", secrets.len());
    let all = words.join("\n");
    assert!(all.contains("invalid_grant"), "the errors were seen");
    for secret in &secrets {
        assert!(
            !all.contains(secret.as_str()),
            "a secret of {} characters was written out",
            secret.len()
        );
    }
}
