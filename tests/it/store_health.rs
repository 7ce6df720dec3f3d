//! The store is checked, not assumed, through the real daemon: a damaged database is refused at
//! start with the way out (damaged indexes are rebuilt and said so); a write the database
//! refuses is visible in status, health, metrics and `token`, and no refresh that would replace
//! a refresh token goes out while the last one is unsaved; a database deleted or replaced under
//! the daemon is written again from what it holds, and a kill afterwards loses nothing.

use crate::common::*;
use oauth2mci::Secret;
use oauth2mci::store::{ClientRow, Store, Write};
use oauth2mci::token::{TokenSet, now_ms};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// A token endpoint: client credentials get `cc-N` (N counts every request), the N-th refresh
/// rotates to `at-N`/`rt-N`; slowly when told.
#[derive(Clone, Default)]
struct Endpoint {
    served: Arc<AtomicUsize>,
    refreshes: Arc<AtomicUsize>,
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl Respond for Endpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let answer = if body.contains("grant_type=refresh_token") {
            let n = self.refreshes.fetch_add(1, Ordering::SeqCst) + 1;
            serde_json::json!({"access_token": format!("at-{n}"), "refresh_token": format!("rt-{n}"), "token_type": "Bearer", "expires_in": 3600})
        } else {
            serde_json::json!({"access_token": format!("cc-{n}"), "token_type": "Bearer", "expires_in": 3600})
        };
        let delay = if self.slow.load(Ordering::SeqCst) {
            Duration::from_secs(2)
        } else {
            Duration::ZERO
        };
        ResponseTemplate::new(200)
            .set_body_json(answer)
            .set_delay(delay)
    }
}

fn clients(server: &MockServer) -> String {
    format!(
        "  c:\n    grant: client_credentials\n    provider: {{token_url: \"{0}/token\"}}\n    client_id: c\n    client_secret: s\n  r:\n    provider: {{token_url: \"{0}/token\", authorize_url: \"{0}/authorize\", refresh_token_rotation: always}}\n    client_id: r\n    client_secret: s\n    sinks:\n      - {{path: tokens/r, format: raw}}\n",
        server.uri()
    )
}

const SETTINGS: &str = "refresh:\n  retry: {initial: 1s, max: 2s}\n";

/// Stores a token for `r` as if it had been authorized.
async fn seed(daemon: &Daemon) {
    let config = oauth2mci::config::load(&daemon.config).unwrap();
    let (store, writer) = Store::open(
        &daemon.path("state/state.db"),
        oauth2mci::seal::Sealer::clear(),
    )
    .unwrap();
    let now = now_ms();
    let writes = vec![
        Write::Client(ClientRow {
            name: "r".into(),
            status: "valid".into(),
            fingerprint: config.clients["r"].fingerprint(),
            reason: None,
            last_refresh_at: Some(now),
            last_error: None,
            failures: 0,
            removed_at: None,
            updated_at: now,
            warned_for: None,
            refresh_started_at: None,
        }),
        Write::Token {
            client: "r".into(),
            token: Some((
                TokenSet {
                    access_token: Secret::new("at-0"),
                    token_type: "Bearer".into(),
                    refresh_token: Some(Secret::new("rt-0")),
                    id_token: None,
                    scope: None,
                    expires_at: Some(now + 3_600_000),
                    refresh_expires_at: None,
                    obtained_at: now,
                    granted_at: now,
                    extra: Default::default(),
                    refresh_expiry_slides: false,
                },
                1,
            )),
        },
    ];
    store.commit(writes).await.unwrap();
    drop(store);
    writer.join().unwrap();
}

async fn started() -> (MockServer, Endpoint, Daemon) {
    let server = MockServer::start().await;
    let endpoint = Endpoint::default();
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(endpoint.clone())
        .mount(&server)
        .await;
    let mut daemon = Daemon::prepare(SETTINGS, &clients(&server));
    seed(&daemon).await;
    daemon.spawn();
    wait_for("c's first token", Duration::from_secs(10), || {
        daemon.status_of("c") == "valid"
    });
    (server, endpoint, daemon)
}

/// Holds the database's write lock, as another process could: every write of the daemon's
/// then fails after its busy timeout.
fn hold_write_lock(daemon: &Daemon) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(daemon.path("state/state.db")).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE;").unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_database_refuses_are_visible_and_hold_back_rotating_refreshes() {
    let (_server, endpoint, daemon) = started().await;
    assert_eq!(daemon.status_of("r"), "valid");

    // r's refresh is answered slowly; the database is locked meanwhile: its rotated token is
    // held in memory only.
    endpoint.slow.store(true, Ordering::SeqCst);
    let cli = {
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            std::process::Command::new(BIN)
                .args(["refresh", "r"])
                .env("OAUTH2MCI_SOCKET", socket)
                .output()
                .unwrap()
        })
    };
    wait_for("the refresh to go out", Duration::from_secs(10), || {
        endpoint.refreshes.load(Ordering::SeqCst) == 1
    });
    let lock = hold_write_lock(&daemon);
    let o = cli.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    endpoint.slow.store(false, Ordering::SeqCst);
    assert_eq!(daemon.status_of("r"), "unsaved");
    assert!(
        daemon.client("r")["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot save the token")
    );
    let o = daemon.cli(&["token", "r"]);
    assert_eq!(stdout(&o), "at-1\n", "the valid token is served");
    assert!(
        stderr(&o).contains("warning: r: the token is held in memory only"),
        "{}",
        stderr(&o)
    );
    let (_, health) = daemon.get("/v1/health").unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["problems"].to_string().contains("in memory only"),
        "{health}"
    );
    let metrics =
        oauth2mci::cli::request(&daemon.socket, "GET", "/metrics", Duration::from_secs(10))
            .unwrap()
            .1;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("oauth2mci_clients{status=\"unsaved\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("oauth2mci_store_failing 1"), "{metrics}");
    assert_eq!(
        std::fs::read_to_string(daemon.path("run/tokens/r")).ok(),
        None,
        "a token file gets only saved tokens"
    );

    // No refresh that would replace the unsaved refresh token goes out.
    let o = daemon.cli(&["refresh", "r"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the newest token is not saved yet"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        endpoint.refreshes.load(Ordering::SeqCst),
        1,
        "a refresh went out"
    );

    // The database takes writes again: the held token is saved by itself, then written out.
    drop(lock);
    wait_for("r saved", Duration::from_secs(20), || {
        daemon.status_of("r") == "valid"
    });
    wait_for("r's token file", Duration::from_secs(5), || {
        std::fs::read_to_string(daemon.path("run/tokens/r")).is_ok_and(|t| t == "at-1\n")
    });
    let (_, health) = daemon.get("/v1/health").unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    // And a kill now loses nothing: the rotated refresh token is the one used next.
    let mut daemon = daemon;
    daemon.kill9();
    daemon.spawn();
    assert_eq!(stdout(&daemon.cli(&["token", "r"])), "at-1\n");
    assert_eq!(daemon.cli(&["refresh", "r"]).status.code(), Some(0));
    assert_eq!(endpoint.refreshes.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_deleted_or_replaced_under_the_daemon_is_written_again() {
    let (_server, endpoint, mut daemon) = started().await;
    let db = daemon.path("state/state.db");
    let token = stdout(&daemon.cli(&["token", "c"]));
    std::fs::remove_file(&db).unwrap();
    let _ = std::fs::remove_file(daemon.path("state/state.db-wal"));
    wait_for(
        "the database written again",
        Duration::from_secs(10),
        || {
            db.exists()
                && daemon
                    .log_text()
                    .contains("was written again from what the daemon held")
        },
    );
    assert!(
        daemon
            .log_text()
            .contains("the database file was deleted under the running daemon")
    );
    daemon.kill9();
    daemon.spawn();
    assert_eq!(
        stdout(&daemon.cli(&["token", "c"])),
        token,
        "the token survived"
    );
    assert_eq!(stdout(&daemon.cli(&["token", "r"])), "at-0\n");
    let grants = endpoint.served.load(Ordering::SeqCst);

    // Replaced by a stranger's file: it is moved aside, ours put back.
    std::fs::write(daemon.path("stranger.db"), b"").unwrap();
    rusqlite::Connection::open(daemon.path("stranger.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    std::fs::rename(daemon.path("stranger.db"), &db).unwrap();
    wait_for("the stranger moved aside", Duration::from_secs(10), || {
        std::fs::read_dir(daemon.path("state"))
            .unwrap()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.db.replaced-")
            })
    });
    daemon.kill9();
    daemon.spawn();
    assert_eq!(stdout(&daemon.cli(&["token", "c"])), token);
    assert_eq!(
        endpoint.served.load(Ordering::SeqCst),
        grants,
        "no new grant was needed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_refused_at_start_and_damaged_indexes_are_rebuilt() {
    let (_server, _endpoint, mut daemon) = started().await;
    for _ in 0..20 {
        daemon.cli(&["refresh", "c"]);
    }
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(10));
    let db = daemon.path("state/state.db");

    // Two indexes of the history swap their trees: only the indexes are wrong.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let root = |name: &str| -> i64 {
            conn.query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
        };
        let (a, b) = (root("events_at"), root("events_client_at"));
        conn.execute_batch(&format!(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_master SET rootpage = {b} WHERE name = 'events_at';
             UPDATE sqlite_master SET rootpage = {a} WHERE name = 'events_client_at';"
        ))
        .unwrap();
    }
    daemon.spawn();
    assert!(
        daemon.log_text().contains("rebuilt with REINDEX"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(stdout(&daemon.cli(&["token", "r"])), "at-0\n");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(10));

    // A table's page overwritten: refused, with the way out, and nothing changed.
    let mut bytes = std::fs::read(&db).unwrap();
    for b in &mut bytes[4096 + 8..8192] {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let o = std::process::Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the database is damaged")
            && err.contains(&format!("mv {0} {0}.damaged", db.display())),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the damaged file was changed"
    );
}
