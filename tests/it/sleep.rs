//! A daemon that sleeps past its tokens' expiry (SIGSTOP, then SIGCONT, as a suspended laptop
//! does to it) refreshes at once on waking, and never hands out the expired token meanwhile.
//! Clock jumps are tested with a fake clock in `scheduler`'s unit tests: setting this machine's
//! clock from a test would disturb everything else running on it.

use crate::common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_woken_after_expiry_refreshes_at_once() {
    let server = AuthServer::start(ServerOptions {
        access_token_ttl: 6,
        ..ServerOptions::default()
    });
    let daemon = Daemon::start(
        "",
        &server.client_yaml("mail", "    sinks: [{path: mail}]\n"),
    );
    authorize(&daemon, "mail").await;
    let before = stdout(&daemon.cli(&["token", "mail"])).trim().to_string();

    // Asleep for longer than the token lives, and past its refresh time.
    daemon.signal(Signal::SIGSTOP);
    let refreshes = server.refreshes("success").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(server.introspect(&before).await["active"], false);
    daemon.signal(Signal::SIGCONT);
    let woke = Instant::now();

    // The first consumer after waking gets a live token, never the expired one.
    let o = daemon.cli(&["token", "mail"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let after = stdout(&o).trim().to_string();
    assert_ne!(after, before);
    assert_eq!(server.introspect(&after).await["active"], true);
    // And the scheduler caught up by itself, without waiting for anyone to ask.
    wait_for("the refresh on waking", Duration::from_secs(5), || {
        std::fs::read_to_string(daemon.path("run/mail")).is_ok_and(|t| t.trim() != before)
    });
    assert!(woke.elapsed() < Duration::from_secs(5));
    assert!(server.refreshes("success").await > refreshes);
    assert_eq!(server.refreshes("error").await, 0, "{}", daemon.log_text());
    assert_eq!(daemon.status_of("mail"), "valid");
}
