//! Faults of the authorization server, through the real daemon, against a loopback server that
//! misbehaves on command: a reset in the middle of the body, a slow drip, no answer at all, an
//! HTML error page, an empty body, a huge body, a body of the wrong type, malformed JSON, a
//! refused connection, TLS that fails. Each time the client keeps its still-valid token, says
//! what went wrong, backs off, and recovers by itself when the server does; a healthy client
//! beside it is not delayed.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(u8)]
enum Fault {
    None,
    ResetMidBody,
    SlowDrip,
    NoAnswer,
    HtmlPage,
    EmptyBody,
    HugeBody,
    WrongType,
    MalformedJson,
}

const FAULTS: [Fault; 8] = [
    Fault::ResetMidBody,
    Fault::SlowDrip,
    Fault::NoAnswer,
    Fault::HtmlPage,
    Fault::EmptyBody,
    Fault::HugeBody,
    Fault::WrongType,
    Fault::MalformedJson,
];

/// A token endpoint on 127.0.0.1 that answers as told.
struct FakeServer {
    port: u16,
    fault: Arc<AtomicU8>,
    served: Arc<AtomicUsize>,
}

impl FakeServer {
    fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let served = Arc::new(AtomicUsize::new(0));
        let (f, n) = (fault.clone(), served.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (f, n) = (f.clone(), n.clone());
                std::thread::spawn(move || answer(stream, &f, &n));
            }
        });
        FakeServer {
            port,
            fault,
            served,
        }
    }

    fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }
}

fn answer(mut s: TcpStream, fault: &AtomicU8, served: &AtomicUsize) {
    // Read the request head and its body (a small form).
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        // A TLS ClientHello: answer in plain HTTP, as a server without TLS does.
        if req.first() == Some(&0x16) {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n");
            return;
        }
    }
    let n = served.fetch_add(1, Ordering::SeqCst);
    let ok =
        format!("{{\"access_token\":\"token-{n}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}");
    let fault = FAULTS
        .iter()
        .copied()
        .find(|f| *f as u8 == fault.load(Ordering::SeqCst))
        .unwrap_or(Fault::None);
    let reply = |status: &str, ctype: &str, body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let _ = match fault {
        Fault::None => s.write_all(&reply("200 OK", "application/json", ok.as_bytes())),
        Fault::ResetMidBody => {
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"access_tok",
            );
            // SO_LINGER 0: the close is a reset.
            let sock = socket2_like_reset(&s);
            drop(sock);
            Ok(())
        }
        Fault::SlowDrip => {
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n",
            );
            for b in ok.bytes().take(30) {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            Ok(())
        }
        Fault::NoAnswer => {
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        }
        Fault::HtmlPage => s.write_all(&reply(
            "502 Bad Gateway",
            "text/html",
            b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        )),
        Fault::EmptyBody => s.write_all(&reply("200 OK", "application/json", b"")),
        Fault::HugeBody => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000000\r\n\r\n";
            let _ = s.write_all(head.as_bytes());
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..80 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
            Ok(())
        }
        Fault::WrongType => s.write_all(&reply("200 OK", "image/png", b"\x89PNG\r\n\x1a\n\0\0")),
        Fault::MalformedJson => s.write_all(&reply(
            "200 OK",
            "application/json",
            b"{\"access_token\": \"tok\", \"expires_in\": ",
        )),
    };
}

/// Closes `s` with a reset (SO_LINGER 0) rather than an orderly shutdown.
fn socket2_like_reset(s: &TcpStream) -> TcpStream {
    use std::os::fd::AsRawFd;
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor, and a pointer to a linger struct of the size given.
    unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_LINGER,
            (&linger as *const nix::libc::linger).cast(),
            std::mem::size_of::<nix::libc::linger>() as nix::libc::socklen_t,
        );
    }
    s.try_clone().unwrap()
}

fn client(name: &str, token_url: &str) -> String {
    format!(
        "  {name}:\n    grant: client_credentials\n    provider: {{token_url: \"{token_url}\"}}\n    client_id: {name}\n    client_secret: s\n    refresh: {{retry: {{initial: 200ms, max: 400ms}}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_keeps_the_token_says_why_and_heals() {
    let faulty = FakeServer::start();
    let healthy = FakeServer::start();
    let settings = "limits:\n  request_timeout: 2s\n";
    let clients = format!(
        "{}{}",
        client("faulty", &format!("http://127.0.0.1:{}/token", faulty.port)),
        client(
            "healthy",
            &format!("http://127.0.0.1:{}/token", healthy.port)
        )
    );
    let daemon = Daemon::start(settings, &clients);
    wait_for("first tokens", Duration::from_secs(10), || {
        daemon.status_of("faulty") == "valid" && daemon.status_of("healthy") == "valid"
    });
    let mut seen = Vec::new();
    for fault in FAULTS {
        let held = stdout(&daemon.cli(&["token", "faulty"])).trim().to_string();
        faulty.set(fault);
        // A refresh forced now meets the fault...
        let started = Instant::now();
        let forced = std::thread::spawn({
            let socket = daemon.socket.clone();
            move || {
                oauth2mci::cli::request(
                    &socket,
                    "POST",
                    "/v1/clients/faulty/refresh",
                    Duration::from_secs(30),
                )
            }
        });
        // ...while the healthy client is served at its usual pace.
        std::thread::sleep(Duration::from_millis(100));
        let quick = Instant::now();
        let o = daemon.cli(&["refresh", "healthy"]);
        assert_eq!(o.status.code(), Some(0), "{fault:?}: {}", stderr(&o));
        assert!(
            quick.elapsed() < Duration::from_secs(1),
            "{fault:?}: {:?}",
            quick.elapsed()
        );
        let (status, body) = forced.join().unwrap().unwrap();
        assert_eq!(status, 502, "{fault:?}: {}", String::from_utf8_lossy(&body));
        let message = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{fault:?}: bounded by the request timeout ({:?})",
            started.elapsed()
        );
        // The still-valid token is kept and served.
        let o = daemon.cli(&["token", "faulty"]);
        assert_eq!(o.status.code(), Some(0), "{fault:?}: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), held, "{fault:?}");
        assert_eq!(daemon.status_of("faulty"), "retrying", "{fault:?}");
        seen.push(format!("{fault:?}: {message}"));
        // The server heals; so does the client, by itself.
        faulty.set(Fault::None);
        wait_for("recovery", Duration::from_secs(10), || {
            daemon.status_of("faulty") == "valid"
        });
        assert_ne!(stdout(&daemon.cli(&["token", "faulty"])).trim(), held);
    }
    let all = seen.join("\n");
    for expected in [
        "reading the response failed",
        "timed out",
        "502",
        "empty body",
        "larger than 1048576 bytes",
        "image/png",
    ] {
        assert!(all.contains(expected), "no {expected:?} in:\n{all}");
    }
    assert!(faulty.served.load(Ordering::SeqCst) > FAULTS.len() * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_failed_tls_are_transient_and_clear() {
    // A port nobody listens on, and TLS spoken to a plain HTTP server.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let plain = FakeServer::start();
    let clients = format!(
        "{}{}",
        client("refused", &format!("http://127.0.0.1:{closed}/token")),
        client("tls", &format!("https://127.0.0.1:{}/token", plain.port))
    );
    let daemon = Daemon::start("limits:\n  request_timeout: 2s\n", &clients);
    for (name, expected) in [("refused", "Connection refused"), ("tls", "cannot reach")] {
        let o = daemon.cli(&["refresh", name]);
        assert_eq!(o.status.code(), Some(6), "{name}");
        assert!(stderr(&o).contains(expected), "{name}: {}", stderr(&o));
        assert_eq!(daemon.status_of(name), "retrying");
    }
}
