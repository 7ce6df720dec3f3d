//! The device authorization grant (RFC 8628) through the real binary: against oidc-provider end
//! to end (a code typed at the provider's page), and against wiremock for the polling answers a
//! real server rarely gives (`slow_down`, `expired_token`).

use crate::common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn device_client(server: &AuthServer, name: &str) -> String {
    format!(
        "  {name}:\n    grant: device_code\n    provider:\n      token_url: {iss}/token\n      device_authorization_url: {iss}/device/auth\n    client_id: {CLIENT_ID}\n    client_secret: {CLIENT_SECRET}\n    scopes: [openid, offline_access]\n    sinks: [{{path: {name}.token}}]\n",
        iss = server.issuer
    )
}

/// `oauth2mci authorize NAME [--device]` in the background; returns the child and, once
/// printed, the page with the code in it (`verification_uri_complete`) or else the code.
fn start_cli(daemon: &Daemon, args: &[&str]) -> (Cli, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("OAUTH2MCI_SOCKET", &daemon.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        let found = match line.trim().strip_prefix("(or open ") {
            Some(rest) => Some(rest.trim_end_matches(" directly)").to_string()),
            // Without a page that holds the code, the code line is the last thing printed.
            None if line.starts_with("    ") && printed.contains("example.com/device ") => {
                Some(line.trim().to_string())
            }
            None => None,
        };
        if let Some(found) = found {
            // Keep reading, so that the CLI can print its last line.
            let rest = std::thread::spawn(move || {
                let mut rest = String::new();
                let _ = std::io::Read::read_to_string(&mut out, &mut rest);
                rest
            });
            return (Cli { child, rest }, found);
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the CLI printed no device page: {printed}");
}

struct Cli {
    child: std::process::Child,
    rest: std::thread::JoinHandle<String>,
}

fn finish(cli: Cli) -> (i32, String) {
    let Cli { mut child, rest } = cli;
    let status = child.wait().unwrap();
    let _ = rest.join();
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_machine_authorizes_with_a_code_typed_elsewhere() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &device_client(&server, "tv"));

    // A consumer asking before anything was authorized is told exactly what to do, and the
    // daemon has started the authorization that the user then finishes.
    let o = daemon.cli(&["token", "tv"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let err = stderr(&o);
    let page = format!("{}/device", server.issuer);
    assert!(
        err.contains(&format!("open {page} and enter the code ")),
        "{err}"
    );
    let code: String = err
        .split("enter the code ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    assert_eq!(code.len(), 9, "{err}");
    // Asking again gives the same code: one authorization waits for the user, not one per ask.
    let again = stderr(&daemon.cli(&["token", "tv"]));
    assert!(again.contains(&code), "{again}");
    assert_eq!(
        daemon.client("tv")["pending_authorization"]["user_code"],
        code.as_str()
    );
    let status = stdout(&daemon.cli(&["status"]));
    assert!(
        status.contains(&format!("enter the code {code}")),
        "{status}"
    );

    assert!(enter_device_code(&format!("{page}?user_code={code}"), true).await);
    // The daemon polls every 5 s (the RFC's default: oidc-provider names no interval).
    wait_for("the device grant", Duration::from_secs(20), || {
        daemon.status_of("tv") == "valid"
    });
    let o = daemon.cli(&["token", "tv"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The token file is written just after the token is committed (and served).
    wait_for("the token file", Duration::from_secs(10), || {
        std::fs::read_to_string(daemon.path("run/tv.token"))
            .is_ok_and(|t| t.trim() == stdout(&o).trim())
    });
    assert_eq!(daemon.client("tv")["has_refresh_token"], true);
    assert_eq!(daemon.client("tv")["grant"], "device_code");
    // Refreshes need no device: the refresh token does it.
    let o = daemon.cli(&["refresh", "tv"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(server.refreshes("success").await, 1);

    // `authorize` shows the code and the page, waits, and reports.
    let (child, complete) = start_cli(&daemon, &["authorize", "tv"]);
    assert!(
        complete.starts_with(&format!("{page}?user_code=")),
        "{complete}"
    );
    assert!(enter_device_code(&complete, true).await);
    let (code, err) = finish(child);
    assert_eq!(code, 0, "{err}\n{}", daemon.log_text());
    assert_eq!(daemon.status_of("tv"), "valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_refuses_at_the_device_page() {
    let server = AuthServer::start(ServerOptions::default());
    // A browser client may use the device flow too (`--device`) when its provider offers it.
    let clients = format!(
        "  laptop:\n    provider:\n      authorize_url: {iss}/auth\n      token_url: {iss}/token\n      device_authorization_url: {iss}/device/auth\n    client_id: {CLIENT_ID}\n    client_secret: {CLIENT_SECRET}\n    scopes: [openid, offline_access]\n",
        iss = server.issuer
    );
    let daemon = Daemon::start("", &clients);
    let (child, complete) = start_cli(&daemon, &["authorize", "laptop", "--device"]);
    assert!(!enter_device_code(&complete, false).await);
    let (code, err) = finish(child);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("access_denied"), "{err}");
    assert_eq!(daemon.status_of("laptop"), "unauthorized");
}

async fn fake_device_server(token_answers: Vec<ResponseTemplate>) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/device"))
        .and(body_string_contains("client_id=tv"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "device_code": "dev-code-1",
            "user_code": "WDJB-MJHT",
            "verification_uri": "https://example.com/device",
            "expires_in": 60,
            "interval": 1,
        })))
        .mount(&server)
        .await;
    for (i, answer) in token_answers.into_iter().enumerate() {
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(body_string_contains("device_code=dev-code-1"))
            .and(body_string_contains(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code",
            ))
            .respond_with(answer)
            .up_to_n_times(1)
            .with_priority((i + 1) as u8)
            .mount(&server)
            .await;
    }
    server
}

fn fake_client(server: &MockServer) -> String {
    format!(
        "  tv:\n    grant: device_code\n    provider:\n      token_url: {u}/token\n      device_authorization_url: {u}/device\n    client_id: tv\n",
        u = server.uri()
    )
}

fn oauth_error(code: &str) -> ResponseTemplate {
    ResponseTemplate::new(400).set_body_json(serde_json::json!({ "error": code }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_waits_while_pending_and_slows_down_when_asked() {
    let server = fake_device_server(vec![
        oauth_error("authorization_pending"),
        oauth_error("slow_down"),
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "at-1", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "rt-1"
        })),
    ])
    .await;
    let daemon = Daemon::start("", &fake_client(&server));
    let started = Instant::now();
    let (child, code) = start_cli(&daemon, &["authorize", "tv"]);
    assert_eq!(code, "WDJB-MJHT");
    let (code, err) = finish(child);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}\n{}", daemon.log_text());
    // 1 s, 1 s, then 1 + 5 s after slow_down: never sooner than the server allows.
    assert!(took >= Duration::from_secs(7), "{took:?}");
    let polls = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/token")
        .count();
    assert_eq!(polls, 3);
    assert_eq!(stdout(&daemon.cli(&["token", "tv"])).trim(), "at-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_ends_the_authorization_with_a_clear_reason() {
    let server = fake_device_server(vec![oauth_error("expired_token")]).await;
    let daemon = Daemon::start("", &fake_client(&server));
    let (child, _) = start_cli(&daemon, &["authorize", "tv"]);
    let (code, err) = finish(child);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("expired_token"), "{err}");
    assert!(err.contains("expired before it was entered"), "{err}");
    assert_eq!(daemon.status_of("tv"), "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_authorization_goes_on_polling_after_a_restart() {
    let server = fake_device_server(vec![
        oauth_error("authorization_pending"),
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "at-2", "token_type": "Bearer", "expires_in": 3600
        })),
    ])
    .await;
    let mut daemon = Daemon::start("", &fake_client(&server));
    let (status, reply) = daemon.request("POST", "/v1/clients/tv/authorize").unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["user_code"], "WDJB-MJHT");
    assert_eq!(reply["method"], "device");
    daemon.kill9();
    daemon.spawn();
    wait_for("polling after the restart", Duration::from_secs(15), || {
        daemon.status_of("tv") == "valid"
    });
    assert_eq!(stdout(&daemon.cli(&["token", "tv"])).trim(), "at-2");
}
