//! Encryption at rest through the real daemon: tokens obtained from oidc-provider are sealed in
//! the SQLite file, a start without the key is refused with its id and changes nothing, and a key
//! rotation (new key current, old key listed) completes at the next start with no authorization.

use crate::common::*;
use std::process::Command;
use std::time::Duration;

const KEY_1: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="; // 32 × 0x01
const KEY_2: &str = "0202020202020202020202020202020202020202020202020202020202020202";

/// The key id the daemon names a key by (see `seal::Key`).
fn key_id(key: &str) -> String {
    oauth2mci::seal::Key::parse(key).unwrap().id().to_string()
}

/// The stored access and refresh token columns of `client`, as written in the file.
fn stored(db: &std::path::Path, client: &str) -> (String, String) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT access_token, refresh_token FROM tokens WHERE client = ?1",
        [client],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

fn file_holds(db: &std::path::Path, text: &str) -> bool {
    let mut bytes = std::fs::read(db).unwrap();
    bytes.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

fn stop(daemon: &mut Daemon) {
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_encrypted_at_rest_and_keys_rotate_without_the_user() {
    let server = AuthServer::start(ServerOptions::default());
    let client = server.client_yaml("a", "");
    // Keys live apart from the state, as they would in a credential store.
    let keys = tempfile::tempdir().unwrap();
    write_file(&keys.path().join("key1"), KEY_1);
    write_file(&keys.path().join("key2"), &format!("{KEY_2}\n"));
    let key = |n: u8| {
        format!(
            "{{file: {}}}",
            keys.path().join(format!("key{n}")).display()
        )
    };
    let mut daemon = Daemon::start(&format!("encryption:\n  key: {}\n", key(1)), &client);
    authorize(&daemon, "a").await;
    let token = stdout(&daemon.cli(&["token", "a"])).trim().to_string();
    let db = daemon.path("state/state.db");

    // Sealed under key 1, bound to its row: neither token is anywhere in the file.
    let (access, refresh) = stored(&db, "a");
    let prefix = format!("oauth2mci:v1:{}:", key_id(KEY_1));
    assert!(
        access.starts_with(&prefix) && refresh.starts_with(&prefix),
        "{access}"
    );
    assert!(
        !file_holds(&db, &token),
        "the access token is in the database file"
    );
    let introspected = server.introspect(&token).await;
    assert_eq!(introspected["active"], true);
    stop(&mut daemon);

    // Without the key, the start is refused, naming the key, and the database is untouched.
    let head = daemon.config_text();
    let without = head.replace(&format!("encryption:\n  key: {}\n", key(1)), "");
    assert_ne!(without, head);
    std::fs::write(&daemon.config, &without).unwrap();
    let o = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("encrypted with key {}", key_id(KEY_1)))
            && err.contains("encryption.old_keys"),
        "{err}"
    );
    assert_eq!(stored(&db, "a"), (access.clone(), refresh.clone()));

    // Rotation: key 2 current, key 1 old. The values move to key 2 at start, the tokens are the
    // same, and no authorization is needed.
    let rotated = head.replace(
        &format!("encryption:\n  key: {}\n", key(1)),
        &format!("encryption:\n  key: {}\n  old_keys: [{}]\n", key(2), key(1)),
    );
    std::fs::write(&daemon.config, &rotated).unwrap();
    daemon.spawn();
    assert_eq!(daemon.status_of("a"), "valid");
    assert_eq!(stdout(&daemon.cli(&["token", "a"])).trim(), token);
    let (access2, _) = stored(&db, "a");
    assert!(access2.starts_with(&format!("oauth2mci:v1:{}:", key_id(KEY_2))));
    assert!(daemon.log_text().contains("stored secrets rewritten"));

    // A refresh is sealed under key 2 too; then key 1 can go.
    let o = daemon.cli(&["refresh", "a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let fresh = stdout(&daemon.cli(&["token", "a"])).trim().to_string();
    assert_ne!(fresh, token);
    assert!(!file_holds(&db, &fresh));
    stop(&mut daemon);
    std::fs::write(&daemon.config, head.replace(&key(1), &key(2))).unwrap();
    daemon.spawn();
    assert_eq!(stdout(&daemon.cli(&["token", "a"])).trim(), fresh);

    // A changed key on reload is not applied halfway: it waits for the restart, and says so.
    std::fs::write(&daemon.config, &rotated).unwrap();
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("encryption keys take effect at the next restart"),
        "{}",
        stdout(&o)
    );
}
