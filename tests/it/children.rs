//! The processes the real daemon starts: hooks and secret commands get a clean environment (not
//! the daemon's own, which holds `{env:}` secrets), run in process groups of their own that are
//! killed at their timeout and at shutdown, grandchildren included; a secret command runs once
//! per load; and SIGTERM stops the daemon within seconds whatever a reload or the start-up is
//! waiting for.

use crate::common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the process `pid` is gone (or a zombie nobody waits for any more).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.contains(") Z "),
    }
}

fn pid_in(file: &Path) -> i32 {
    let mut pid = None;
    wait_for("a child to write its pid", Duration::from_secs(15), || {
        pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

fn sh(script: &str) -> String {
    serde_json::to_string(&["sh", "-c", script]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_get_a_clean_environment_and_their_groups_end_with_the_daemon() {
    let server = fixed_token_endpoint("tok").await;
    let dir = tempfile::tempdir().unwrap();
    let env_out = dir.path().join("env");
    let bg = dir.path().join("background.pid");
    let stuck = dir.path().join("stuck.pid");
    // The refresh hook leaves a background job; the warning hook hangs past its timeout.
    let settings = format!(
        "notify:\n  timeout: 1s\n  on_refresh: {}\n  on_error: {}\n  error_after: 1\n",
        sh(&format!(
            "env > {}; sleep 1000 & echo $! > {}",
            env_out.display(),
            bg.display()
        )),
        sh(&format!(
            "sleep 1000 & echo $! > {}; sleep 1000",
            stuck.display()
        ))
    );
    let clients = format!(
        "  a:\n    grant: client_credentials\n    provider: {{token_url: \"{0}/token\"}}\n    client_id: a\n    client_secret: {{env: OAUTH2MCI_TEST_SECRET}}\n  broken:\n    grant: client_credentials\n    provider: {{token_url: \"{0}/missing\"}}\n    client_id: b\n    client_secret: x\n",
        server.uri()
    );
    let mut daemon = Daemon::prepare(&settings, &clients);
    daemon
        .env
        .push(("OAUTH2MCI_TEST_SECRET".into(), "hunter2-env-secret".into()));
    daemon.spawn();
    let background = pid_in(&bg);
    let env = std::fs::read_to_string(&env_out).unwrap();
    assert!(
        !env.contains("hunter2-env-secret"),
        "the daemon's secret reached a hook: {env}"
    );
    assert!(
        !env.contains("OAUTH2MCI_LOG="),
        "the daemon's own variables reached a hook: {env}"
    );
    assert!(
        env.contains("OAUTH2MCI_CLIENT=a") && env.contains("OAUTH2MCI_EVENT=refresh"),
        "{env}"
    );
    assert!(env.contains("PATH="), "{env}");

    // The hung hook is killed at its timeout, with what it started.
    let grandchild = pid_in(&stuck);
    wait_for(
        "the hung hook's group to be killed",
        Duration::from_secs(10),
        || gone(grandchild),
    );
    assert!(daemon.log_text().contains("killed with its process group"));

    // The refresh hook's background job is still there, until the daemon stops.
    assert!(!gone(background));
    let begun = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "{:?}\n{}",
        begun.elapsed(),
        daemon.log_text()
    );
    wait_for("the background job to end", Duration::from_secs(5), || {
        gone(background)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_command_runs_once_per_load_and_sigterm_beats_a_hanging_one() {
    let server = fixed_token_endpoint("tok").await;
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("count");
    let key_command = sh(&format!(
        "echo . >> {}; echo {}",
        counter.display(),
        "ab".repeat(32)
    ));
    let client = |name: &str, secret: &str| {
        format!(
            "  {name}:\n    grant: client_credentials\n    provider: {{token_url: \"{}/token\"}}\n    client_id: {name}\n    client_secret: {secret}\n",
            server.uri()
        )
    };
    let shared = format!(
        "{{command: {}}}",
        sh(&format!("echo . >> {}; echo s3cret", counter.display()))
    );
    let settings = format!("encryption:\n  key: {{command: {key_command}}}\n");
    let clients = format!("{}{}", client("a", &shared), client("b", &shared));
    let daemon = Daemon::start(&settings, &clients);
    let runs = || std::fs::read_to_string(&counter).unwrap_or_default().len() / 2;
    assert_eq!(
        runs(),
        2,
        "the key command and the shared secret command, once each"
    );

    // A load the client blocks give up on (an error found in the last client once the others
    // are read) reads the settings and the other clients twice: each command still runs once.
    let bad = format!(
        "paths:\n  state: state\n  runtime: run\n{settings}\nclients:\n{clients}  c:\n    client_id: c\n    grant: client_credentials\n    provider: {{token_url: \"{}/token\"}}\n",
        server.uri()
    );
    std::fs::write(&daemon.config, bad).unwrap();
    let before = runs();
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(1));
    assert_eq!(runs() - before, 2, "one run of each command for the load");

    // A reload waiting for a secret command that hangs: SIGTERM stops the daemon at once, and
    // the command with it.
    let pidfile = dir.path().join("hang.pid");
    let hang = format!(
        "{{command: {}, timeout: 10m}}",
        sh(&format!("echo $$ > {}; exec sleep 1000", pidfile.display()))
    );
    let good = format!(
        "paths:\n  state: state\n  runtime: run\n{settings}\nclients:\n{}",
        client("h", &hang)
    );
    std::fs::write(&daemon.config, good).unwrap();
    let mut daemon = daemon;
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let command = pid_in(&pidfile);
    let begun = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        daemon.log_text()
    );
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "{:?}",
        begun.elapsed()
    );
    wait_for("the hanging command to end", Duration::from_secs(5), || {
        gone(command)
    });

    // The same at start-up, before the daemon is ready.
    std::fs::remove_file(&pidfile).unwrap();
    let mut starting = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&daemon.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let command = pid_in(&pidfile);
    let begun = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(starting.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = loop {
        if let Some(status) = starting.try_wait().unwrap() {
            break status;
        }
        assert!(begun.elapsed() < Duration::from_secs(5), "not stopped");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    wait_for(
        "the start-up's command to end",
        Duration::from_secs(5),
        || gone(command),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_the_daemon_inherited_never_reach_a_hook() {
    let server = fixed_token_endpoint("tok").await;
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let inherited = dir.path().join("inherited");
    std::fs::write(&inherited, "a file a supervisor left open").unwrap();
    let settings = format!(
        "notify:\n  on_refresh: {}\n",
        sh(&format!(
            "for fd in 7 8; do if [ -e /proc/$$/fd/$fd ]; then echo \"$fd open\"; else echo \"$fd closed\"; fi; done > {}",
            seen.display()
        ))
    );
    let clients = format!(
        "  a:\n    provider: {{token_url: \"{}/token\"}}\n    grant: client_credentials\n    client_id: a\n    client_secret: s\n",
        server.uri()
    );
    let mut daemon = Daemon::prepare(&settings, &clients);
    // A shell that leaves a file (7) and a pipe's end (8) open, as supervisors and shells do.
    daemon.launcher = [
        "sh",
        "-c",
        "exec 7<\"$0\" 8>/dev/null; exec \"$@\"",
        inherited.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    daemon.spawn();
    wait_for("the hook's report", Duration::from_secs(15), || {
        std::fs::read_to_string(&seen).is_ok_and(|t| t.lines().count() == 2)
    });
    // The daemon itself still holds them: only its children are kept from them.
    let fd7 = std::fs::read_link(format!("/proc/{}/fd/7", daemon.pid())).unwrap();
    assert_eq!(fd7, inherited);
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        "7 closed\n8 closed\n"
    );
}
