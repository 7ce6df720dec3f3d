//! Every malformed configuration in `tests/data/bad_configs.rs` (the table the unit test parses
//! in-process) sent to a running daemon: each is refused with file:line:column in one line, and
//! the configuration that was running keeps serving its token throughout.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_config_is_refused_while_the_running_one_keeps_serving() {
    let cases: &[(&str, &str, &str)] = include!("../data/bad_configs.rs");
    assert!(cases.len() >= 60, "the table shrank to {}", cases.len());

    let server = AuthServer::start(ServerOptions::default());
    let a = server.client_yaml("a", "    sinks:\n      - { path: tokens/a, format: raw }\n");
    let daemon = Daemon::start("", &a);
    authorize(&daemon, "a").await;
    let good = daemon.config_text();
    let token = stdout(&daemon.cli(&["token", "a"]));
    assert!(!token.trim().is_empty());
    let file = daemon.config.display().to_string();

    let mut wrong = Vec::new();
    for (yaml, position, fragment) in cases {
        // Written in place: the watcher may pick the file up too, and must refuse it the same way.
        std::fs::write(&daemon.config, yaml).unwrap();
        let o = daemon.cli(&["reload"]);
        let err = stderr(&o);
        if o.status.code() != Some(1)
            || !err.contains(&format!("{file}:{position}: "))
            || !err.contains(fragment)
            || err.lines().count() != 1
        {
            wrong.push(format!(
                "config {yaml:?}\n  expected exit 1, {position} and {fragment:?}\n  got {:?}: {err}",
                o.status.code()
            ));
        }
        let served = daemon.cli(&["token", "a"]);
        assert_eq!(
            (served.status.code(), stdout(&served)),
            (Some(0), token.clone()),
            "after {yaml:?} the running client stopped serving: {}",
            stderr(&served)
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Bytes that are not UTF-8 are placed too.
    std::fs::write(&daemon.config, b"clients:\n  a: {client_id: \"\xff\"}\n").unwrap();
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("{file}:2:19: the file is not valid UTF-8")),
        "{}",
        stderr(&o)
    );

    // Nothing changed underneath: the same client, the same token file, and the good file
    // reloads cleanly.
    assert_eq!(daemon.status_of("a"), "valid");
    assert_eq!(
        std::fs::read_to_string(daemon.path("run/tokens/a")).unwrap(),
        token
    );
    std::fs::write(&daemon.config, good).unwrap();
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&daemon.cli(&["token", "a"])), token);
}
