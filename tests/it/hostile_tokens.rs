//! A broken or hostile authorization server, through the real daemon: tokens, token types,
//! refresh tokens and kept fields holding line breaks, NUL, quotes, `$(...)`, backquotes and
//! spaces are refused as failed refreshes (the previous token stays served and written, the
//! client retries and says why), and the token files are read back with the real consumers
//! (`sh`, `bash`, `env -S`, `curl -H @file`, and `systemd-run` where systemd runs) so that
//! each reads exactly the token and evaluates nothing.

use crate::common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// A token endpoint that answers whatever it is told to, every time.
#[derive(Clone)]
struct Answer(Arc<Mutex<Value>>);

impl Respond for Answer {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(self.0.lock().unwrap().clone())
    }
}

impl Answer {
    fn set(&self, body: Value) {
        *self.0.lock().unwrap() = body;
    }
}

fn token_answer(access_token: &str) -> Value {
    json!({"access_token": access_token, "token_type": "Bearer", "expires_in": 3600})
}

fn client(name: &str, server: &MockServer, profile_extra: &str, sinks: &str) -> String {
    format!(
        "  {name}:\n    provider: {{token_url: \"{}/token\"{profile_extra}}}\n    grant: client_credentials\n    client_id: {name}\n    client_secret: s3cret\n    sinks:\n{sinks}",
        server.uri()
    )
}

fn sinks(name: &str) -> String {
    ["raw", "header", "json", "env"]
        .iter()
        .map(|f| format!("      - {{path: tokens/{name}.{f}, format: {f}}}\n"))
        .collect()
}

fn read(daemon: &Daemon, name: &str, format: &str) -> String {
    std::fs::read_to_string(daemon.path(&format!("run/tokens/{name}.{format}"))).unwrap()
}

/// Every sink of `name`, read back by the consumer each format is for; each must give exactly
/// `token`, and nothing may have been evaluated (no `pwned` file in the folder).
async fn consumers_read(daemon: &Daemon, name: &str, token: &str, echo: &MockServer) {
    let dir = daemon.path("run/tokens");
    let var = format!("{}_ACCESS_TOKEN", name.to_ascii_uppercase());
    assert_eq!(read(daemon, name, "raw"), format!("{token}\n"));
    let json: Value = serde_json::from_str(&read(daemon, name, "json")).unwrap();
    assert_eq!(json["access_token"], token);
    let env_file = dir.join(format!("{name}.env"));
    let shell = |program: &str, source: &str| {
        let script = format!("{source} \"$1\" && printf %s \"${var}\"");
        let out = Command::new(program)
            .args(["-c", &script, program])
            .arg(&env_file)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{program}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(shell("sh", "."), token, "sh .");
    assert_eq!(shell("bash", "source"), token, "bash source");
    // `env -S` splits one line as systemd does an EnvironmentFile: the file's lines, joined.
    let assignments = std::fs::read_to_string(&env_file)
        .unwrap()
        .lines()
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("env")
        .arg("-S")
        .arg(format!("{assignments} printenv {var}"))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "env -S: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{token}\n"), "env -S");
    if systemd_runs() {
        let out = Command::new("systemd-run")
            .args(["--user", "--wait", "--pipe", "--quiet"])
            .arg(format!("--property=EnvironmentFile={}", env_file.display()))
            .args(["printenv", &var])
            .output()
            .unwrap();
        assert_eq!(
            stdout(&out),
            format!("{token}\n"),
            "systemd EnvironmentFile="
        );
    }
    // curl sends the header file's line as it is; the server sees exactly the token.
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("@{}", dir.join(format!("{name}.header")).display()))
        .arg(format!("{}/echo", echo.uri()))
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "200", "curl -H @file: {}", stderr(&out));
    assert!(
        !dir.join("pwned").exists() && !Path::new("pwned").exists(),
        "a consumer evaluated part of a token"
    );
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").exists()
        && Command::new("systemd-run")
            .args(["--user", "--wait", "--quiet", "true"])
            .status()
            .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_bytes_are_refused_and_sinks_read_back_exactly() {
    let server = MockServer::start().await;
    let answer = Answer(Arc::new(Mutex::new(token_answer("good-1.x_y~z+/=="))));
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(answer.clone())
        .mount(&server)
        .await;
    let echo = MockServer::start().await;
    let clients = format!(
        "{}{}",
        client(
            "api",
            &server,
            ", keep_fields: [instance_url]",
            &sinks("api")
        ),
        client("sf", &server, ", access_token_chars: visible", &sinks("sf"))
    );
    let daemon = Daemon::start("", &clients);
    wait_for(
        "both clients' first tokens",
        std::time::Duration::from_secs(10),
        || daemon.status_of("api") == "valid" && daemon.status_of("sf") == "valid",
    );
    // Their token files are written just after the tokens are committed.
    wait_for(
        "their token files",
        std::time::Duration::from_secs(10),
        || {
            ["api", "sf"].iter().all(|n| {
                ["raw", "header", "json", "env"]
                    .iter()
                    .all(|f| daemon.path(&format!("run/tokens/{n}.{f}")).exists())
            })
        },
    );
    let good = "good-1.x_y~z+/==";
    Mock::given(method("GET"))
        .and(path("/echo"))
        .and(header("authorization", format!("Bearer {good}").as_str()))
        .respond_with(ResponseTemplate::new(200))
        .mount(&echo)
        .await;
    consumers_read(&daemon, "api", good, &echo).await;

    // Each hostile answer is a failed refresh: refused with the field and the reason, never
    // quoted; the good token is still served and still in every file.
    let hostile: Vec<(Value, &str)> = vec![
        (
            token_answer("evil\r\nX-Injected: 1"),
            "access_token holds a carriage return",
        ),
        (
            token_answer("evil\nAPI_ACCESS_TOKEN=other"),
            "access_token holds a line feed",
        ),
        (
            token_answer("evil\u{0}nul"),
            "access_token holds a NUL byte",
        ),
        (token_answer("evil token"), "access_token holds a space"),
        (token_answer("e'vil"), "access_token holds '\\''"),
        (token_answer("e\"vil"), "access_token holds '\"'"),
        (
            token_answer("$(touch${IFS}pwned)"),
            "access_token holds '$'",
        ),
        (token_answer("`touch pwned`"), "access_token holds '`'"),
        (
            json!({"access_token": "fine", "token_type": "Bearer\r\nX-Injected: 1", "expires_in": 60}),
            "token_type holds a carriage return",
        ),
        (
            json!({"access_token": "fine", "refresh_token": "rt\nx", "expires_in": 60}),
            "refresh_token holds a line feed",
        ),
        (
            json!({"access_token": "fine", "expires_in": 60, "instance_url": "https://x\r\nSet-Cookie: a"}),
            "kept field \"instance_url\" holds the control character U+000D",
        ),
    ];
    for (body, why) in &hostile {
        answer.set(body.clone());
        let o = daemon.cli(&["refresh", "api"]);
        assert_eq!(o.status.code(), Some(6), "{body}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{body}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("the previous token stays in use"),
            "{}",
            stderr(&o)
        );
        assert_eq!(daemon.status_of("api"), "retrying");
        assert_eq!(stdout(&daemon.cli(&["token", "api"])), format!("{good}\n"));
        consumers_read(&daemon, "api", good, &echo).await;
    }
    let log = daemon.log_text();
    for (body, _) in &hostile {
        let at = body["access_token"].as_str().unwrap();
        if at != "fine" {
            assert!(!log.contains(at), "the log quotes a refused token: {at:?}");
        }
    }

    // A profile that allows visible ASCII (Salesforce's `!`) takes `$(...)`, backquotes and
    // double quotes: every file still reads back exactly, and no consumer runs any of it.
    let visible = "X$(touch${IFS}pwned)`touch${IFS}pwned`\"Y\"!";
    answer.set(token_answer(visible));
    let o = daemon.cli(&["refresh", "sf"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    Mock::given(method("GET"))
        .and(path("/echo"))
        .and(header(
            "authorization",
            format!("Bearer {visible}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200))
        .mount(&echo)
        .await;
    consumers_read(&daemon, "sf", visible, &echo).await;
    // Spaces and line breaks stay refused there too.
    answer.set(token_answer("X\nSF_ACCESS_TOKEN=other"));
    assert_eq!(daemon.cli(&["refresh", "sf"]).status.code(), Some(6));
    consumers_read(&daemon, "sf", visible, &echo).await;

    // The server heals: the next refresh is taken and written.
    answer.set(token_answer("good-2"));
    assert_eq!(daemon.cli(&["refresh", "api"]).status.code(), Some(0));
    assert_eq!(daemon.status_of("api"), "valid");
    Mock::given(method("GET"))
        .and(path("/echo"))
        .and(header("authorization", "Bearer good-2"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&echo)
        .await;
    consumers_read(&daemon, "api", "good-2", &echo).await;
}
