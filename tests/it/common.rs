//! Test harness: a real authorization server (oidc-provider under node), the real `oauth2mci`
//! binary as a daemon, its CLI, and its socket. Everything listens on 127.0.0.1 or a Unix socket
//! in a temporary folder, and every process is stopped when its handle drops.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_oauth2mci");

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

/// Installs the test server's npm packages once, whichever test binary gets here first.
fn npm_ci() {
    let dir = oidc_dir();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("oauth2mci-tests-npm.lock"))
        .expect("lock file for npm ci");
    let _guard =
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("npm lock");
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .expect("npm must be installed to run the integration tests (see .ci/run)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// oidc-provider on 127.0.0.1, on a free port.
pub struct AuthServer {
    pub issuer: String,
    child: Child,
    _dir: tempfile::TempDir,
}

pub struct ServerOptions {
    pub access_token_ttl: u64,
    pub rotate_refresh_token: bool,
    /// More clients (oidc-provider metadata) beside `app`.
    pub extra_clients: Vec<serde_json::Value>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            access_token_ttl: 3600,
            rotate_refresh_token: true,
            extra_clients: Vec::new(),
        }
    }
}

pub const CLIENT_ID: &str = "app";
pub const CLIENT_SECRET: &str = "app-secret-for-tests";

impl AuthServer {
    pub fn start(options: ServerOptions) -> AuthServer {
        npm_ci();
        let dir = tempfile::tempdir().unwrap();
        let mut clients = vec![serde_json::json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": ["http://127.0.0.1/callback"],
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        })];
        clients.extend(options.extra_clients);
        let config = serde_json::json!({
            "clients": clients,
            "access_token_ttl": options.access_token_ttl,
            "rotate_refresh_token": options.rotate_refresh_token,
            "exit_on_stdin_eof": true,
        });
        let path = dir.path().join("server.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let mut child = Command::new("node")
            .arg(oidc_dir().join("server.js"))
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node must be installed to run the integration tests");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("oidc server said {line:?}: {e}"));
        AuthServer {
            issuer: info["issuer"].as_str().unwrap().to_string(),
            child,
            _dir: dir,
        }
    }

    /// Token endpoint requests per grant type; `outcome` is "success" or "error".
    pub async fn stats(&self, outcome: &str) -> serde_json::Value {
        reqwest::get(format!(
            "{}/test/stats?client_id={CLIENT_ID}&outcome={outcome}",
            self.issuer
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
    }

    pub async fn refreshes(&self, outcome: &str) -> u64 {
        self.stats(outcome).await["refresh_token"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Revokes every grant and token of the client at the server: the user withdrew consent.
    pub async fn revoke_all(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/test/revoke?client_id={CLIENT_ID}", self.issuer))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// What the server says of a token (RFC 7662 introspection, as client `app`).
    pub async fn introspect(&self, token: &str) -> serde_json::Value {
        reqwest::Client::new()
            .post(format!("{}/token/introspection", self.issuer))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The YAML of a daemon client of this server.
    pub fn client_yaml(&self, name: &str, extra: &str) -> String {
        format!(
            "  {name}:\n    provider:\n      authorize_url: {iss}/auth\n      token_url: {iss}/token\n    client_id: {CLIENT_ID}\n    client_secret: {CLIENT_SECRET}\n    scopes: [openid, offline_access]\n{extra}",
            iss = self.issuer
        )
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real daemon, with its config, state and runtime folders in a temporary folder.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Set in the daemon's environment, besides the harness's own.
    pub env: Vec<(String, String)>,
    /// A program and arguments that run the daemon's command line (`sh -c 'exec "$@"'`), as a
    /// supervisor does; empty: it is started directly.
    pub launcher: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon whose config holds these settings (`paths` is added) and clients.
    pub fn start(settings: &str, clients: &str) -> Daemon {
        let mut d = Daemon::prepare(settings, clients);
        d.spawn();
        d
    }

    /// `start` without starting it: its folder and config are written, for the test to add
    /// files or environment first, then `spawn`.
    pub fn prepare(settings: &str, clients: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        let yaml =
            format!("paths:\n  state: state\n  runtime: run\n{settings}\nclients:\n{clients}\n");
        std::fs::write(&config, yaml).unwrap();
        Daemon {
            socket: dir.path().join("run/oauth2mci.sock"),
            log: dir.path().join("daemon.log"),
            config,
            dir,
            env: Vec::new(),
            launcher: Vec::new(),
            child: None,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["daemon", "--config"])
            .arg(&self.config)
            .env("OAUTH2MCI_LOG", "oauth2mci=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = self.get("/v1/health") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("the daemon exited with {status}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the daemon did not answer on its socket: {}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the daemon to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the daemon did not exit within {within:?}: {}",
            self.log_text()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("OAUTH2MCI_SOCKET", &self.socket)
            .output()
            .unwrap()
    }

    pub fn get(&self, path: &str) -> Result<(u16, serde_json::Value), String> {
        self.request("GET", path)
    }

    pub fn request(&self, method: &str, path: &str) -> Result<(u16, serde_json::Value), String> {
        let (status, body) =
            oauth2mci::cli::request(&self.socket, method, path, Duration::from_secs(60))
                .map_err(|f| f.message)?;
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    }

    pub fn client(&self, name: &str) -> serde_json::Value {
        self.get(&format!("/v1/clients/{name}")).unwrap().1
    }

    pub fn status_of(&self, name: &str) -> String {
        self.client(name)["status"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    /// Replaces the config as editors do: write a new file, rename it over the old one.
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".config.yaml.swp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `check` until it holds or `within` passes.
pub fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

/// `oauth2mci authorize NAME --no-browser` running in the background, with the URL it printed.
pub struct Authorize {
    child: Child,
    pub url: String,
}

impl Authorize {
    pub fn start(daemon: &Daemon, name: &str) -> Authorize {
        let mut child = Command::new(BIN)
            .args(["authorize", "--no-browser", name])
            .env("OAUTH2MCI_SOCKET", &daemon.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut url = String::new();
        for _ in 0..5 {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if line.starts_with("http") {
                url = line.trim().to_string();
                break;
            }
        }
        // Keep reading in the background so the CLI never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        });
        assert!(!url.is_empty(), "authorize printed no URL");
        Authorize { child, url }
    }

    pub fn param(&self, name: &str) -> String {
        url::Url::parse(&self.url)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    }

    /// Waits for the CLI; returns its exit code and stderr.
    pub fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (status.code().unwrap_or(-1), err);
            }
            assert!(Instant::now() < deadline, "authorize did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Plays the user's browser through oidc-provider's development login and consent pages; with
/// `consent: false` the user cancels. Returns the status and body of the last page (the
/// daemon's redirect listener's).
pub async fn browse(url: &str, consent: bool) -> (u16, String) {
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let mut response = http.get(url).send().await.unwrap();
    for _ in 0..6 {
        let at = response.url().clone();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        if !at.path().starts_with("/interaction/") {
            return (status, body);
        }
        if !consent {
            response = http
                .get(format!("{}/abort", at.as_str().trim_end_matches('/')))
                .send()
                .await
                .unwrap();
            continue;
        }
        let (action, form) = first_form(&body).unwrap_or_else(|| panic!("no form on {at}: {body}"));
        response = http.post(&action).form(&form).send().await.unwrap();
    }
    panic!("the authorization pages did not end");
}

/// The fields of the first form on a page: its action and its inputs (login "alice").
fn first_form(body: &str) -> Option<(String, Vec<(String, String)>)> {
    let form_at = body.find("<form")?;
    let body = &body[form_at..];
    let action = between(body, "action=\"", "\"")?;
    let end = body.find("</form>").unwrap_or(body.len());
    let mut form = Vec::new();
    let mut rest = &body[..end];
    while let Some(i) = rest.find("<input") {
        rest = &rest[i + 6..];
        let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
        if let Some(name) = between(tag, "name=\"", "\"") {
            let value = match name.as_str() {
                "login" => "alice".to_string(),
                "password" => "pw".to_string(),
                _ => between(tag, "value=\"", "\"").unwrap_or_default(),
            };
            form.push((name, value));
        }
    }
    Some((action, form))
}

/// Plays the user of the device flow (RFC 8628) on oidc-provider's pages: opens
/// `verification_uri_complete`, confirms the code, logs in and consents; with `consent: false`
/// aborts at the login. Returns whether the server said "Sign-in Success".
pub async fn enter_device_code(url: &str, consent: bool) -> bool {
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let mut response = http.get(url).send().await.unwrap();
    for _ in 0..10 {
        let at = response.url().clone();
        let body = response.text().await.unwrap();
        if body.contains("Sign-in Success") {
            return true;
        }
        if at.path().starts_with("/interaction/") && !consent {
            let abort = format!("{}/abort", at.as_str().trim_end_matches('/'));
            let _ = http.get(abort).send().await.unwrap().text().await;
            return false;
        }
        let Some((action, form)) = first_form(&body) else {
            return false;
        };
        let action = at.join(&action).unwrap();
        response = http.post(action).form(&form).send().await.unwrap();
    }
    false
}

fn between(s: &str, start: &str, end: &str) -> Option<String> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(s[i..j].to_string())
}

/// Authorizes `name` end to end and checks the CLI reports success.
pub async fn authorize(daemon: &Daemon, name: &str) {
    let auth = Authorize::start(daemon, name);
    let (status, body) = browse(&auth.url, true).await;
    assert_eq!(status, 200, "{body}");
    let (code, err) = auth.finish();
    assert_eq!(code, 0, "authorize failed: {err}\n{}", daemon.log_text());
}

pub fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn write_file(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A token endpoint on 127.0.0.1 (`POST {uri}/token`) that gives every request the same
/// hour-long `access_token`.
pub async fn fixed_token_endpoint(access_token: &str) -> wiremock::MockServer {
    use wiremock::matchers::{method, path};
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": access_token, "token_type": "Bearer", "expires_in": 3600
            })),
        )
        .mount(&server)
        .await;
    server
}
