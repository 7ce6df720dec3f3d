//! Configuration through the real binary: `check-config`, refusal at start-up, and live reload
//! (file watcher with editor-style renames, SIGHUP, `oauth2mci reload`), where a bad edit changes
//! nothing and good edits add, remove, rewrite sinks and catch identity changes.

use crate::common::*;
use std::process::Command;
use std::time::Duration;

fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn shipped_configs_are_valid() {
    for name in ["config/example.yaml", "config/minimal.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
        let o = check_config(&path);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
    }
}

/// The client binary holds no daemon code: it hands daemon-side commands to `oauth2mcid`
/// beside it (or on PATH), and says so plainly when there is none.
#[test]
fn the_client_hands_daemon_commands_to_the_daemon_binary() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("oauth2mci");
    std::fs::copy(BIN, &alone).unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    let o = Command::new(&alone)
        .arg("check-config")
        .arg(&example)
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot run the daemon binary oauth2mcid (it is neither beside this program nor on PATH)"),
        "{}",
        stderr(&o)
    );

    // Beside it, the daemon binary answers with its own output and exit code.
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_oauth2mcid"),
        dir.path().join("oauth2mcid"),
    )
    .unwrap();
    let o = Command::new(&alone)
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok, 2 client(s)"));
    let o = Command::new(&alone)
        .args(["providers", "no-such-provider"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn bad_configs_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    let cases = [
        (
            "clients:\n  a:\n    client_id: x\n    scopez: [a]\n",
            ":4:5: ",
            "unknown field `scopez`",
        ),
        (
            "refresh:\n  before_expiry: 90\nclients: {}\n",
            ":2:18: ",
            "before_expiry",
        ),
        (
            "clients:\n  a: {client_id: x, provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}}\n  a: {client_id: y}\n",
            ":3:3: ",
            "defined twice",
        ),
        (
            "clients:\n  a:\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            ":3:5: ",
            "missing field `client_id`",
        ),
        (
            "refresh:\n  jitter: lots\nclients: {}\n",
            ":2:11: ",
            "percentage",
        ),
    ];
    for (yaml, position, message) in cases {
        write_file(&file, yaml);
        let o = check_config(&file);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{yaml}");
        assert!(
            err.contains(&format!("{}{position}", file.display())) && err.contains(message),
            "for\n{yaml}\nexpected {position} {message:?}, got {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // The daemon refuses to start on the same file with the same message.
    let o = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(":2:11: "), "{}", stderr(&o));
    let o = check_config(&dir.path().join("missing.yaml"));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.yaml"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_reload_live_and_bad_edits_change_nothing() {
    let server = AuthServer::start(ServerOptions::default());
    let a = server.client_yaml("a", "    sinks:\n      - { path: tokens/a, format: raw }\n");
    let daemon = Daemon::start("", &a);
    authorize(&daemon, "a").await;
    let token = std::fs::read_to_string(daemon.path("run/tokens/a")).unwrap();
    let head = "paths:\n  state: state\n  runtime: run\nclients:\n";

    // Add a client, saved the way editors save (rename over the file): the watcher sees it.
    let b = server.client_yaml("b", "");
    daemon.rewrite_config(&format!("{head}{a}{b}"));
    wait_for("client b to appear", Duration::from_secs(10), || {
        daemon.get("/v1/clients/b").is_ok_and(|(s, _)| s == 200)
    });
    assert_eq!(daemon.status_of("b"), "unauthorized");

    // A bad edit is refused with its position, and everything keeps running as it was.
    let good = format!("{head}{a}{b}");
    let at = format!("config.yaml:{}:16", good.lines().count() + 2);
    daemon.rewrite_config(&format!("{good}  c:\n    client_id: [oops]\n"));
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        daemon.log_text().contains(&at)
    });
    assert!(daemon.log_text().contains("previous one keeps running"));
    assert_eq!(daemon.get("/v1/clients/c").unwrap().0, 404);
    assert_eq!(daemon.status_of("a"), "valid");
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&at), "{}", stderr(&o));

    // A changed sink is written at once; SIGHUP reloads too.
    let a2 = server.client_yaml(
        "a",
        "    sinks:\n      - { path: tokens/a.json, format: json }\n",
    );
    let yaml = format!("{head}{a2}{b}");
    // Written in place (no rename) and announced with SIGHUP.
    std::fs::write(&daemon.config, yaml).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the new sink", Duration::from_secs(10), || {
        daemon.path("run/tokens/a.json").exists()
    });
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(daemon.path("run/tokens/a.json")).unwrap())
            .unwrap();
    assert_eq!(json["access_token"].as_str().unwrap(), token.trim());
    wait_for("the old sink to go", Duration::from_secs(5), || {
        !daemon.path("run/tokens/a").exists()
    });

    // A removed client stops (disabled, tokens kept); putting it back needs no authorization.
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    daemon.rewrite_config(&format!("{head}{b}"));
    wait_for("a to be disabled", Duration::from_secs(10), || {
        daemon.status_of("a") == "disabled"
    });
    assert_eq!(daemon.cli(&["token", "a"]).status.code(), Some(4));
    daemon.rewrite_config(&format!("{head}{a2}{b}"));
    wait_for("a to come back", Duration::from_secs(10), || {
        daemon.status_of("a") == "valid"
    });
    assert_eq!(daemon.cli(&["token", "a"]).status.code(), Some(0));

    // An identity change (scopes) makes the tokens stale; undoing it restores them.
    let a3 = a2.replace(
        "[openid, offline_access]",
        "[openid, offline_access, email]",
    );
    daemon.rewrite_config(&format!("{head}{a3}{b}"));
    wait_for("a to need authorization", Duration::from_secs(10), || {
        daemon.status_of("a") == "needs_reauth"
    });
    let o = daemon.cli(&["token", "a"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    daemon.rewrite_config(&format!("{head}{a2}{b}"));
    wait_for("a to be valid again", Duration::from_secs(10), || {
        daemon.status_of("a") == "valid"
    });
    assert_eq!(server.refreshes("error").await, 0);
}
