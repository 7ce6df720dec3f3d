//! The socket cannot be starved, through the real daemon: a user holding many connections gets
//! only their share, a flood of refused connections costs a bounded pool, a peer that never
//! reads its answers is cut off, idle connections are closed, and meanwhile every other
//! consumer gets its token at once. The open-files limit is raised, and a socket file deleted
//! or replaced under the daemon is bound again (or, taken by something else, stops it).

use crate::common::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wiremock::MockServer;

fn clients(server: &MockServer, count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "  c{i}:\n    grant: client_credentials\n    provider: {{token_url: \"{}/token\"}}\n    client_id: c{i}\n    client_secret: s\n",
                server.uri()
            )
        })
        .collect()
}

/// The daemon's own user gets its token quickly, several times over.
fn consumers_are_served(daemon: &Daemon, what: &str) {
    for _ in 0..10 {
        let begun = Instant::now();
        let o = daemon.cli(&["token", "c0"]);
        assert_eq!(stdout(&o), "tok\n", "{what}: {}", stderr(&o));
        assert!(
            begun.elapsed() < Duration::from_secs(1),
            "{what}: took {:?}",
            begun.elapsed()
        );
    }
}

/// Runs `HOG` as `nobody` against the daemon's socket (opened to every user for it), with
/// `connections` and the seconds to hold them; it prints its findings, a line at a time.
fn hog_as_nobody(daemon: &Daemon, connections: usize, hold_secs: u64) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    for dir in [daemon.dir.path(), &daemon.path("run")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    Command::new("python3")
        .args(["-c", HOG])
        .arg(&daemon.socket)
        .args([connections.to_string(), hold_secs.to_string()])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the peers of another user")
}

/// Opens N connections, each asking for health and keeping the connection; prints how many
/// were answered 200, how many 503 or 403 or closed unanswered, then, after waiting, how many
/// of the held ones the daemon closed.
const HOG: &str = r#"
import socket, sys, time
path, n, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held, answers = [], {}
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(3)
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        line = s.recv(4096).split(b"\r\n")[0].decode() or "closed"
    except OSError:
        line = "closed"
    code = line.split(" ")[1] if line.startswith("HTTP/") else line
    answers[code] = answers.get(code, 0) + 1
    if code == "200":
        held.append(s)
print(" ".join(f"{k}={v}" for k, v in sorted(answers.items())), flush=True)
time.sleep(wait)
closed = 0
for s in held:
    s.settimeout(0.1)
    try:
        closed += s.recv(1) == b""
    except OSError:
        closed += 1
print(f"closed={closed}", flush=True)
"#;

fn read_line(child: &mut std::process::Child) -> String {
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    child.stdout = Some(out);
    String::from_utf8(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_gets_a_share_and_refused_floods_cost_a_bounded_pool() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    let server = fixed_token_endpoint("tok").await;
    let daemon = Daemon::start(
        "socket:\n  allow_users: [nobody]\nlimits:\n  max_connections: 64\n  max_connections_per_user: 8\n",
        &clients(&server, 1),
    );
    wait_for("c0's token", Duration::from_secs(10), || {
        daemon.status_of("c0") == "valid"
    });
    let mut hog = hog_as_nobody(&daemon, 60, 14);
    let answers = read_line(&mut hog);
    assert_eq!(answers, "200=8 503=52", "{}", daemon.log_text());
    consumers_are_served(&daemon, "while another user holds its share");
    // Idle connections are closed by the daemon (10 s without a request).
    assert_eq!(read_line(&mut hog), "closed=8");
    let _ = hog.wait();

    // A user the socket refuses, opening 300 connections as fast as it can: each is answered
    // 403 or closed, from a pool that holds no connection slot.
    let refused = Daemon::start("limits:\n  max_connections: 64\n", &clients(&server, 1));
    wait_for("c0's token", Duration::from_secs(10), || {
        refused.status_of("c0") == "valid"
    });
    let mut flood = hog_as_nobody(&refused, 300, 0);
    consumers_are_served(&refused, "during a flood of refused connections");
    let answers = read_line(&mut flood);
    assert!(!answers.contains("200"), "{answers}");
    assert!(answers.contains("403="), "{answers}");
    let _ = flood.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_off_and_delays_nobody() {
    let server = fixed_token_endpoint("tok").await;
    let daemon = Daemon::start("", &clients(&server, 60));
    wait_for("the tokens", Duration::from_secs(10), || {
        daemon.status_of("c59") == "valid"
    });
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    // Thousands of pipelined requests for the whole list, never reading an answer.
    let mut greedy = UnixStream::connect(&daemon.socket).unwrap();
    greedy.set_nonblocking(true).unwrap();
    let request = b"GET /v1/clients HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    let mut written = 0;
    let begun = Instant::now();
    while begun.elapsed() < Duration::from_secs(3) {
        match greedy.write(&request) {
            Ok(n) => written += n,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(
        written > 100_000,
        "the daemon read {written} bytes of requests"
    );
    consumers_are_served(&daemon, "beside a peer that never reads");
    // Past the write timeout (10 s), the daemon gives up on it.
    std::thread::sleep(Duration::from_secs(12));
    greedy.set_nonblocking(false).unwrap();
    greedy
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sink = Vec::new();
    let end = greedy.read_to_end(&mut sink);
    assert!(
        end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection was not closed: {end:?}"
    );
    wait_for(
        "its descriptor to be closed",
        Duration::from_secs(5),
        || fds() <= before,
    );
}

/// Waits for the daemon to answer on its socket again; says what its log says if it does not.
fn bound_again(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if daemon.get("/v1/health").is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the socket was not bound again:\n{}", daemon.log_text());
}

#[test]
fn the_open_files_limit_is_raised_and_a_lost_socket_is_bound_again() {
    let daemon = Daemon::start("", "");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    let (soft, hard) = (files[3], files[4]);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap();
    assert!(
        soft == hard || soft == nr_open.trim(),
        "soft {soft}, hard {hard}"
    );

    let mut daemon = daemon;
    // Deleted: listened on again.
    std::fs::remove_file(&daemon.socket).unwrap();
    bound_again(&daemon);
    assert!(daemon.log_text().contains("listening there again"));
    // Replaced by a dead socket file: removed and bound again.
    std::fs::remove_file(&daemon.socket).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&daemon.socket).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    bound_again(&daemon);
    // Replaced by a file that is not a socket: the daemon stops and says why.
    std::fs::remove_file(&daemon.socket).unwrap();
    std::fs::write(&daemon.socket, "not a socket").unwrap();
    let code = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{}", daemon.log_text());
    assert!(
        daemon
            .log_text()
            .contains("replaced by something that is not a socket")
    );
}
