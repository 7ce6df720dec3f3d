//! A token file can never replace or remove one of the daemon's own files, however its path is
//! spelled, through the real daemon: the database and everything beside it, the socket, the
//! configuration and every file it reads, reached through links, `..`, `//`, hard links and
//! folders swapped after the configuration was read. A target that is not a regular file is
//! never replaced, and a folder other users can write is refused unless `strict_modes: false`.

use crate::common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wiremock::MockServer;

fn client(server: &MockServer, sinks: &str) -> String {
    format!(
        "  a:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: a\n    client_secret: {{file: secret}}\n    sinks:\n{sinks}  b:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: b\n    client_secret: {{credential: b-secret}}\n",
        server.uri(),
        server.uri()
    )
}

const SETTINGS: &str = "encryption:\n  key: {file: key}\n";

/// Identity and bytes of a file, to see that nothing replaced or changed it.
fn fingerprint(path: &Path) -> (u64, u64, Vec<u8>) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let bytes = if meta.is_file() {
        std::fs::read(path).unwrap()
    } else {
        Vec::new()
    };
    (meta.dev(), meta.ino(), bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_sink_path_reaches_the_daemons_own_files() {
    let server = fixed_token_endpoint("tok-1").await;
    let mut daemon = Daemon::prepare(
        SETTINGS,
        &client(&server, "      - {path: tokens/a, format: raw}\n"),
    );
    let dir = std::fs::canonicalize(daemon.dir.path()).unwrap();
    std::fs::write(dir.join("secret"), "s3cret\n").unwrap();
    std::fs::write(dir.join("key"), format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::create_dir(dir.join("creds")).unwrap();
    std::fs::write(dir.join("creds/b-secret"), "other\n").unwrap();
    daemon.env.push((
        "CREDENTIALS_DIRECTORY".into(),
        dir.join("creds").display().to_string(),
    ));
    daemon.spawn();
    wait_for("the first tokens", Duration::from_secs(10), || {
        daemon.status_of("a") == "valid" && daemon.status_of("b") == "valid"
    });
    let good = daemon.config_text();

    // Ways to name the daemon's own files, prepared on disk.
    std::os::unix::fs::symlink(dir.join("state"), dir.join("to-state")).unwrap();
    std::os::unix::fs::symlink(&dir, dir.join("again")).unwrap();
    std::fs::hard_link(dir.join("secret"), dir.join("hard-secret")).unwrap();
    std::fs::hard_link(dir.join("state/state.db"), dir.join("hard-db")).unwrap();
    nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let _other = std::os::unix::net::UnixListener::bind(dir.join("other.sock")).unwrap();
    std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("a-link")).unwrap();
    std::fs::create_dir(dir.join("shared")).unwrap();
    std::fs::set_permissions(
        dir.join("shared"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let own: Vec<PathBuf> = [
        "state/state.db",
        "state/state.db-wal",
        "state/state.db-shm",
        "state/lock",
        "run/oauth2mci.sock",
        "secret",
        "key",
        "creds/b-secret",
        "fifo",
        "other.sock",
    ]
    .iter()
    .map(|p| dir.join(p))
    .collect();
    // (The configuration is rewritten by the test itself.)
    let before: Vec<_> = own.iter().map(|p| fingerprint(p)).collect();

    let d = dir.display();
    let cases: Vec<(String, &str)> = vec![
        (format!("{d}/state/state.db"), "state folder"),
        (format!("{d}/run/../state/state.db-wal"), "state folder"),
        (format!("{d}/to-state/state.db-shm"), "state folder"),
        (format!("{d}//again/./state/lock"), "state folder"),
        (format!("{d}/hard-db"), "the database"),
        (
            format!("{d}/again/run/oauth2mci.sock"),
            "the daemon's own socket",
        ),
        (format!("{d}/again/config.yaml"), "the configuration"),
        (format!("{d}/to-state/../secret"), "clients.a.client_secret"),
        (format!("{d}/hard-secret"), "clients.a.client_secret"),
        (format!("{d}/again/key"), "encryption.key"),
        (
            format!("{d}/creds/../creds/b-secret"),
            "clients.b.client_secret",
        ),
        (format!("{d}/fifo"), "is a FIFO, not a regular file"),
        (format!("{d}/other.sock"), "is a socket, not a regular file"),
        (format!("{d}/run"), "is a folder, not a regular file"),
        ("/dev/null".to_string(), "is a device, not a regular file"),
        (
            format!("{d}/a-link"),
            "is a symbolic link, not a regular file",
        ),
        (format!("{d}/shared/tok"), "can be written by other users"),
    ];
    let file = daemon.config.display().to_string();
    for (sink, why) in &cases {
        let sinks = format!(
            "      - {{path: tokens/a, format: raw}}\n      - {{path: \"{sink}\", format: raw}}\n"
        );
        let yaml = format!(
            "paths:\n  state: state\n  runtime: run\n{SETTINGS}\nclients:\n{}\n",
            client(&server, &sinks)
        );
        // Written in place: the watcher may see it too, and must refuse it alike.
        std::fs::write(&daemon.config, &yaml).unwrap();
        let o = std::process::Command::new(BIN)
            .arg("check-config")
            .arg(&daemon.config)
            .env("CREDENTIALS_DIRECTORY", dir.join("creds"))
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{sink}: check-config accepted it");
        let line = yaml
            .lines()
            .position(|l| l.contains(sink.as_str()))
            .unwrap()
            + 1;
        assert!(
            err.contains(&format!(":{line}:")) && err.contains(why),
            "{sink}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        // The running daemon refuses it too, and keeps serving.
        let o = daemon.cli(&["reload"]);
        assert_eq!(o.status.code(), Some(1), "{sink}: reload accepted it");
        assert!(
            stderr(&o).contains(&format!("{file}:{line}:")),
            "{}",
            stderr(&o)
        );
        assert!(stderr(&o).contains(why), "{sink}: {}", stderr(&o));
        assert_eq!(stdout(&daemon.cli(&["token", "a"])), "tok-1\n");
    }
    std::fs::write(&daemon.config, &good).unwrap();
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(0));
    let after: Vec<_> = own.iter().map(|p| fingerprint(p)).collect();
    for ((path, b), a) in own.iter().zip(&before).zip(&after) {
        // The database changes as the daemon works, but stays the same file.
        if path.starts_with(dir.join("state")) {
            assert_eq!((b.0, b.1), (a.0, a.1), "{} was replaced", path.display());
        } else {
            assert_eq!(b, a, "{} was changed", path.display());
        }
    }

    // `strict_modes: false` on the sink says the shared folder is meant.
    let sinks = format!(
        "      - {{path: tokens/a, format: raw}}\n      - {{path: \"{d}/shared/tok\", format: raw, strict_modes: false}}\n"
    );
    daemon.rewrite_config(&format!(
        "paths:\n  state: state\n  runtime: run\n{SETTINGS}\nclients:\n{}\n",
        client(&server, &sinks)
    ));
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    wait_for(
        "the token in the shared folder",
        Duration::from_secs(10),
        || std::fs::read_to_string(dir.join("shared/tok")).is_ok_and(|t| t == "tok-1\n"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_swapped_after_loading_cannot_redirect_a_write_or_a_removal() {
    let server = fixed_token_endpoint("tok-1").await;
    let sinks =
        "      - {path: out/lock, format: raw}\n      - {path: out/state.db, format: raw}\n";
    let mut daemon = Daemon::prepare("", &client(&server, sinks));
    let dir = std::fs::canonicalize(daemon.dir.path()).unwrap();
    std::fs::write(dir.join("secret"), "s3cret\n").unwrap();
    std::fs::create_dir(dir.join("creds")).unwrap();
    std::fs::write(dir.join("creds/b-secret"), "other\n").unwrap();
    daemon.env.push((
        "CREDENTIALS_DIRECTORY".into(),
        dir.join("creds").display().to_string(),
    ));
    daemon.spawn();
    wait_for("the token files", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("run/out/lock")).is_ok_and(|t| t == "tok-1\n")
    });
    let lock = fingerprint(&dir.join("state/lock"));
    let db = fingerprint(&dir.join("state/state.db"));
    // The token files' folder becomes a link to the state folder, where `lock` and `state.db`
    // are the daemon's own.
    std::fs::rename(dir.join("run/out"), dir.join("run/out.old")).unwrap();
    std::os::unix::fs::symlink(dir.join("state"), dir.join("run/out")).unwrap();
    let o = daemon.cli(&["refresh", "a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    wait_for(
        "the refused writes to be logged",
        Duration::from_secs(10),
        || {
            daemon
                .log_text()
                .matches("not written: it would overwrite a file in the state folder")
                .count()
                >= 2
        },
    );
    // Forgetting the tokens removes the token files: not through the link.
    let (status, _) = daemon.request("DELETE", "/v1/clients/a/token").unwrap();
    assert_eq!(status, 200);
    wait_for(
        "the refused removals to be logged",
        Duration::from_secs(10),
        || {
            daemon
                .log_text()
                .matches("not removed: it would overwrite a file in the state folder")
                .count()
                >= 2
        },
    );
    assert_eq!(
        fingerprint(&dir.join("state/lock")),
        lock,
        "the lock was touched"
    );
    let now = fingerprint(&dir.join("state/state.db"));
    assert_eq!((now.0, now.1), (db.0, db.1), "the database was replaced");
    assert_eq!(
        stdout(&daemon.cli(&["token", "b"])),
        "tok-1\n",
        "the daemon serves on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_could_not_be_written_is_reported_until_it_is() {
    let server = fixed_token_endpoint("sink-token").await;
    let clients = |mode: &str| {
        format!(
            "  a:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: a\n    client_secret: s\n    sinks: [{{path: a.token, mode: \"{mode}\"}}]\n",
            server.uri()
        )
    };
    let daemon = Daemon::start("", &clients("0600"));
    let file = daemon.path("run/a.token");
    wait_for("the token file", Duration::from_secs(10), || file.exists());
    // A folder where the file was: no rename can replace it, not even root's.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let o = daemon.cli(&["refresh", "a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let error = daemon.client("a")["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(error.starts_with("cannot write a token file: "), "{error}");
    // The folder goes; the next write, here one a reload makes, clears the error.
    std::fs::remove_dir(&file).unwrap();
    let yaml = daemon.config_text().replace("0600", "0640");
    daemon.rewrite_config(&yaml);
    wait_for("the file written again", Duration::from_secs(10), || {
        file.is_file() && mode_of(&file) == 0o640
    });
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "sink-token\n");
    wait_for("the error cleared", Duration::from_secs(5), || {
        daemon.client("a")["last_error"].is_null()
    });
    assert_eq!(daemon.status_of("a"), "valid");
}

/// The socket is bound where its path says, in place of a stale socket: never in place of the
/// database, a token file or a stranger's file, and at shutdown only the daemon's own is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_never_replaces_a_file_and_removes_only_its_own() {
    let server = fixed_token_endpoint("sock-token").await;
    let clients = format!(
        "  a:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: a\n    client_secret: s\n    sinks: [{{path: a.token}}]\n",
        server.uri()
    );
    let mut daemon = Daemon::start("", &clients);
    let db = daemon.path("state/state.db");
    wait_for("the token file", Duration::from_secs(10), || {
        daemon.path("run/a.token").exists()
    });
    let held = fingerprint(&db);
    let check = |socket: &str| {
        let yaml = daemon.config_text().replacen(
            "  runtime: run\n",
            &format!("  runtime: run\n  socket: {socket}\n"),
            1,
        );
        let file = daemon.path("other.yaml");
        std::fs::write(&file, yaml).unwrap();
        let o = std::process::Command::new(BIN)
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{socket}: {}", stdout(&o));
        stderr(&o)
    };
    for (socket, why) in [
        ("state/state.db", "would replace a file in the state folder"),
        (
            "state//./state.db-wal",
            "would replace a file in the state folder",
        ),
        (
            "state/../state/lock",
            "would replace a file in the state folder",
        ),
        ("run/a.token", "is a regular file, not a socket"),
        ("other.yaml", "would replace the configuration"),
        ("config.yaml", "is a regular file, not a socket"),
    ] {
        let e = check(socket);
        assert!(
            e.contains(why) && e.contains("paths.socket"),
            "{socket}: {e}"
        );
    }
    assert_eq!(fingerprint(&db), held);

    // A stranger's file put at the socket's path while the daemon runs is left as it is at
    // shutdown, and so is a socket someone else bound there.
    std::fs::remove_file(&daemon.socket).unwrap();
    std::fs::write(&daemon.socket, "not the daemon's").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(
        std::fs::read_to_string(&daemon.socket).unwrap(),
        "not the daemon's"
    );
    // And a start-up with that file there refuses instead of removing it.
    let o = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("is a regular file, not a socket"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&daemon.socket).unwrap(),
        "not the daemon's"
    );
}
