//! The socket API and CLI without an authorization server: concurrency (a stalled client delays
//! nobody), JSON errors, exit codes, socket permissions, one daemon per state folder, metrics.

use crate::common::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

const CLIENTS: &str = "  a:\n    provider: {authorize_url: \"https://auth.example/a\", token_url: \"https://auth.example/t\"}\n    client_id: x\n";

#[test]
fn a_stalled_connection_delays_nobody() {
    let daemon = Daemon::start("", CLIENTS);
    // Two connections that never finish their request, and one idle keep-alive.
    let mut stalled = UnixStream::connect(&daemon.socket).unwrap();
    stalled
        .write_all(b"GET /v1/clients HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut half = UnixStream::connect(&daemon.socket).unwrap();
    half.write_all(b"GE").unwrap();
    let _idle = UnixStream::connect(&daemon.socket).unwrap();

    let workers: Vec<_> = (0..32)
        .map(|_| {
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                oauth2mci::cli::request(&socket, "GET", "/v1/clients", Duration::from_secs(10))
                    .map(|(s, _)| s)
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap().ok(), Some(200));
    }
    // The stalled request still completes when it finally ends its headers.
    stalled.write_all(b"Connection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stalled.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn errors_are_json_with_fitting_statuses() {
    let daemon = Daemon::start("", CLIENTS);
    let cases = [
        // Before the token request below, which starts an authorization for the user.
        ("GET", "/v1/clients/a/authorization", 400, "bad_request"),
        ("GET", "/v1/nothing", 404, "not_found"),
        ("GET", "/v1/clients/zz", 404, "unknown_client"),
        ("GET", "/v1/clients/a/token", 409, "needs_authorization"),
        (
            "GET",
            "/v1/clients/a/token?min_valid=soon",
            400,
            "bad_request",
        ),
        ("GET", "/v1/clients/a/token?min_vaild=5", 400, "bad_request"),
        ("DELETE", "/v1/clients", 405, "bad_request"),
        (
            "POST",
            "/v1/clients/a/authorize?method=carrier-pigeon",
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/clients/a/revoke?local=maybe",
            400,
            "bad_request",
        ),
    ];
    for (method, path, status, code) in cases {
        let (s, body) = daemon.request(method, path).unwrap();
        assert_eq!(
            (s, body["error"].as_str()),
            (status, Some(code)),
            "{method} {path}: {body}"
        );
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (s, health) = daemon.get("/v1/health").unwrap();
    assert_eq!(s, 200);
    assert_eq!(health["clients"], 1);
    let (status, metrics) =
        oauth2mci::cli::request(&daemon.socket, "GET", "/metrics", Duration::from_secs(5)).unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("oauth2mci_clients{status=\"unauthorized\"} 1"),
        "{metrics}"
    );
    // curl works too, where it is installed.
    if let Ok(o) = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&daemon.socket)
        .arg("http://localhost/v1/clients")
        .output()
    {
        let clients: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(clients[0]["name"], "a");
    }
}

#[test]
fn cli_exit_codes() {
    let daemon = Daemon::start("", CLIENTS);
    assert_eq!(mode_of(&daemon.socket), 0o600);
    let o = daemon.cli(&["token", "nobody"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("nobody"));
    let o = daemon.cli(&["token", "a"]);
    assert_eq!(o.status.code(), Some(5));
    let o = daemon.cli(&["token", "a", "--min-valid", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    let o = daemon.cli(&["status"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("a ") && stdout(&o).contains("unauthorized"),
        "{}",
        stdout(&o)
    );
    let o = daemon.cli(&["status", "a", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["status"], "unauthorized");
    let o = daemon.cli(&["refresh", "a"]);
    assert_eq!(o.status.code(), Some(5));
    let o = Command::new(BIN)
        .args(["status", "--socket", "/nonexistent/oauth2mci.sock"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("not running"));
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(stdout(&o).contains("3  the daemon is not running"));
}

#[test]
fn one_daemon_per_state_folder_and_the_socket_goes_at_exit() {
    let mut daemon = Daemon::start("", CLIENTS);
    let o = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("another oauth2mci daemon"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        daemon.get("/v1/health").unwrap().0,
        200,
        "the first daemon is untouched"
    );
    daemon.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(!daemon.socket.exists());
    // A socket file left by a crash is replaced.
    let _stale = std::os::unix::net::UnixListener::bind(&daemon.socket).unwrap();
    drop(_stale);
    daemon.spawn();
    assert_eq!(daemon.get("/v1/health").unwrap().0, 200);
}

/// Runs the CLI as `nobody` against this daemon.
fn cli_as_nobody(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(BIN)
        .args(args)
        .env("OAUTH2MCI_SOCKET", &daemon.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
fn the_socket_serves_only_the_users_it_allows() {
    // The check needs a second user: the suite runs as root in CI, which can act as `nobody`.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    // A socket opened to everyone behind the daemon's back (the config refuses such a
    // mode): the peer check still holds.
    let open_up = |d: &Daemon| {
        for dir in [d.dir.path(), &d.path("run")] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    };
    let daemon = Daemon::start("", CLIENTS);
    open_up(&daemon);
    let o = cli_as_nobody(&daemon, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("uid 65534 may not use this daemon's socket"),
        "{}",
        stderr(&o)
    );
    assert!(
        daemon
            .log_text()
            .contains("socket connection refused: uid 65534")
    );
    // The daemon's own user is served as before.
    assert_eq!(daemon.cli(&["status"]).status.code(), Some(0));

    let allowed = Daemon::start("socket:\n  allow_users: [nobody]\n", CLIENTS);
    open_up(&allowed);
    let o = cli_as_nobody(&allowed, &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // Shared with a group as configured, nothing opened by hand: the daemon gives the socket's
    // folder to the group (0710: enter, not list), so a member reaches the socket.
    let shared = Daemon::start("socket:\n  group: nogroup\n  mode: \"0660\"\n", CLIENTS);
    std::fs::set_permissions(shared.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = std::fs::metadata(shared.path("run")).unwrap();
    assert_eq!(run.permissions().mode() & 0o777, 0o710);
    let o = cli_as_nobody(&shared, &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Sends raw bytes on a new connection and reads what comes back (until close or 5 s).
fn raw(daemon: &Daemon, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The daemon may close before it has read everything: that is an answer too.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn malformed_requests_get_clean_errors_and_never_stop_the_daemon() {
    let daemon = Daemon::start("", CLIENTS);
    let long_path = format!(
        "GET /v1/clients/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(100_000)
    );
    let huge_header = format!(
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(1_000_000)
    );
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("garbage", b"\x00\x01\x02 not http at all\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        ("a path of 100 kB", long_path.into_bytes(), &["HTTP/1.1 414"]),
        ("a header of 1 MB", huge_header.into_bytes(), &["HTTP/1.1 431"]),
        (
            "an unknown method",
            b"BREW /v1/health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &["HTTP/1.1 405"],
        ),
        (
            "a NUL in the path",
            b"GET /v1/clients/%00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &["HTTP/1.1 404"],
        ),
        (
            "a body announced at 100 MB, 1 MB sent",
            [
                b"POST /v1/clients/a/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n".to_vec(),
                vec![b'x'; 1_000_000],
            ]
            .concat(),
            // The body is not needed, so not read: the answer is the refresh's own.
            &["HTTP/1.1 409"],
        ),
        (
            "an unknown query parameter",
            b"GET /v1/clients/a/token?min_valid=1&evil=1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &["HTTP/1.1 400"],
        ),
    ];
    for (what, bytes, expected) in cases {
        let answer = raw(&daemon, &bytes);
        assert!(
            expected.iter().any(|e| answer.starts_with(e)),
            "{what}: {}",
            answer.chars().take(200).collect::<String>()
        );
        // Still serving after each.
        let (status, _) = daemon.get("/v1/health").unwrap();
        assert_eq!(status, 200, "{what}");
    }
    assert_eq!(daemon.cli(&["status"]).status.code(), Some(0));
}

/// Slowloris: connections that trickle a header a byte at a time, for longer than the 10 s the
/// daemon gives a request head, and a body announced and trickled after a complete head. Others
/// are served at once meanwhile; each trickler is cut off by the header timeout, not held open.
#[test]
fn trickling_clients_are_cut_off_and_delay_nobody() {
    use std::time::Instant;
    let daemon = Daemon::start("", CLIENTS);
    let started = Instant::now();
    let tricklers: Vec<_> = (0..16)
        .map(|i| {
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                let head: &[u8] = if i % 2 == 0 {
                    b"GET /v1/clients HTTP/1.1\r\nX-Slow: "
                } else {
                    b"POST /v1/reload HTTP/1.1\r\nContent-Length: 1000\r\n\r\n"
                };
                s.write_all(head).unwrap();
                // A byte every 300 ms for up to 20 s: far past the header timeout.
                for _ in 0..66 {
                    std::thread::sleep(Duration::from_millis(300));
                    if s.write_all(b"a").is_err() {
                        break;
                    }
                }
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                (Instant::now() - started, answer)
            })
        })
        .collect();
    // Meanwhile others are served as if nothing were going on.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..50 {
        let asked = Instant::now();
        let (status, _) =
            oauth2mci::cli::request(&daemon.socket, "GET", "/v1/health", Duration::from_secs(5))
                .unwrap();
        assert_eq!(status, 200);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
    }
    for (i, t) in tricklers.into_iter().enumerate() {
        let (ended, answer) = t.join().unwrap();
        if i % 2 == 0 {
            // Cut off by the header timeout (10 s), well before the 20 s of trickling ended.
            assert!(
                ended < Duration::from_secs(16),
                "header trickler {i} held for {ended:?}"
            );
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
                "{answer}"
            );
        } else {
            // A complete head is answered at once; the trickled body is never waited for.
            assert!(
                answer.starts_with("HTTP/1.1 "),
                "body trickler {i}: {answer:?}"
            );
            assert!(
                ended < Duration::from_secs(16),
                "body trickler {i} held for {ended:?}"
            );
        }
    }
    assert_eq!(daemon.get("/v1/health").unwrap().0, 200);
}

/// Headers and JSON body of one HTTP answer; the `date` header and the token's remaining
/// seconds change from one answer to the next and are left out.
fn token_answer(answer: &str) -> (String, Vec<String>, serde_json::Value) {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let mut headers: Vec<String> = lines
        .map(str::to_ascii_lowercase)
        .filter(|h| !h.starts_with("date:"))
        .collect();
    headers.sort();
    let mut json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    json.as_object_mut()
        .expect("an object")
        .remove("expires_in");
    (status, headers, json)
}

/// A ready token is answered on the thread that accepts (`fast_path`); what a client reads is
/// what the full HTTP server answers (reached here by percent-encoding the name), and a
/// connection kept alive after it goes on to the full server.
#[test]
fn a_ready_token_reads_the_same_from_either_server() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(MockServer::start());
    runtime.block_on(
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": "ready-token", "token_type": "bearer", "expires_in": 3600,
                "scope": "read write", "id_token_hint": "kept as extra"
            })))
            .mount(&server),
    );
    let clients = format!(
        "  cc:\n    grant: client_credentials\n    provider: {{token_url: \"{}/token\"}}\n    client_id: cc\n    client_secret: s\n",
        server.uri()
    );
    let daemon = Daemon::start("", &clients);
    wait_for("the first token", Duration::from_secs(10), || {
        daemon.status_of("cc") == "valid"
    });

    let ask = |target: &str, min_valid: &str| {
        token_answer(&raw(
            &daemon,
            format!("GET {target}{min_valid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        ))
    };
    for min_valid in ["", "?min_valid=60"] {
        let fast = ask("/v1/clients/cc/token", min_valid);
        let full = ask("/v1/clients/%63c/token", min_valid);
        assert_eq!(fast, full);
        assert_eq!(fast.0, "HTTP/1.1 200 OK");
        assert_eq!(fast.2["access_token"], "ready-token");
        assert_eq!(fast.2["token_type"], "Bearer");
        assert!(fast.1.contains(&"cache-control: no-store".to_string()));
    }
    // Longer than the token lives: the full server refreshes, here with the same answer again.
    let long = ask("/v1/clients/cc/token", "?min_valid=2h");
    assert_eq!(long.0, "HTTP/1.1 200 OK", "{long:?}");

    // Kept alive: the next request on the connection is served too.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /v1/clients/cc/token HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&first).contains("ready-token") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&buf[..n]);
    }
    assert!(
        !String::from_utf8_lossy(&first).contains("connection: close"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut second = String::new();
    s.read_to_string(&mut second).unwrap();
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
}
