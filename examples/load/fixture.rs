//! What the scenarios run against: a fast loopback token endpoint (hyper, in this process), a
//! configuration of N clients, a database seeded with their tokens, and the real daemon binary.

use crate::client;
use oauth2mci::Secret;
use oauth2mci::store::{ClientRow, Store, Write};
use oauth2mci::token::TokenSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The token endpoint: answers every grant with a new token and records when each request
/// came, for the rate and burst figures.
pub struct TokenServer {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    _runtime: tokio::runtime::Runtime,
}

impl TokenServer {
    pub fn start() -> io::Result<TokenServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let issued = Arc::new(AtomicU64::new(0));
        let seen = arrivals.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (seen, issued) = (seen.clone(), issued.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Instant::now());
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        let body = format!(
                            r#"{{"access_token":"at-{n}-load","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-{n}-load"}}"#
                        );
                        async move {
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .header("cache-control", "no-store")
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(TokenServer {
            addr,
            arrivals,
            _runtime: runtime,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Forgets the arrivals so far, and returns them.
    pub fn take_arrivals(&self) -> Vec<Instant> {
        std::mem::take(&mut *self.arrivals.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The most requests seen in any window of `window` (arrivals sorted).
pub fn busiest(arrivals: &[Instant], window: Duration) -> usize {
    let mut most = 0;
    let mut start = 0;
    for (end, at) in arrivals.iter().enumerate() {
        while *at - arrivals[start] >= window {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

/// A folder with a configuration of `clients` clients of the token server.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub token_url: String,
    pub clients: usize,
    /// Extra top-level YAML (limits, refresh policy).
    pub preamble: String,
}

impl Setup {
    pub fn new(clients: usize, token_url: &str, preamble: &str) -> io::Result<Setup> {
        let dir = tempfile::Builder::new()
            .prefix("oauth2mci-load")
            .tempdir()?;
        let setup = Setup {
            config: dir.path().join("config.yaml"),
            socket: dir.path().join("run/oauth2mci.sock"),
            dir,
            token_url: token_url.to_string(),
            clients,
            preamble: preamble.to_string(),
        };
        setup.write_config(None)?;
        Ok(setup)
    }

    /// Writes the configuration; `changed` gets an extra scope (the reload scenario).
    pub fn write_config(&self, changed: Option<usize>) -> io::Result<()> {
        let mut yaml = String::with_capacity(self.clients * 160 + 512);
        yaml.push_str("paths: {state: state, runtime: run}\nlog: {level: warn}\n");
        yaml.push_str(&self.preamble);
        yaml.push_str("clients:\n");
        for i in 0..self.clients {
            let scopes = if changed == Some(i) {
                "[mail, extra]"
            } else {
                "[mail]"
            };
            yaml.push_str(&format!(
                "  c{i}: {{provider: {{authorize_url: \"{u}/authorize\", token_url: \"{u}/token\"}}, client_id: app{i}, scopes: {scopes}}}\n",
                u = self.token_url
            ));
        }
        // Replaced whole, as an editor would, so that a reload never reads half a file.
        let tmp = self.dir.path().join("config.yaml.new");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(tmp, &self.config)
    }

    pub fn database(&self) -> PathBuf {
        self.dir.path().join("state/state.db")
    }

    /// Stores a token for every client, as if each had been authorized: obtained at
    /// `obtained_at`, expiring `lifetime` later.
    pub fn seed(&self, obtained_at: i64, lifetime: Duration) -> Result<(), String> {
        let config = oauth2mci::config::load(&self.config).map_err(|e| e.to_string())?;
        let sealer = oauth2mci::seal::Sealer::new(&config.encryption);
        let (store, writer) = Store::open(&self.database(), sealer).map_err(|e| e.to_string())?;
        let mut writes = Vec::with_capacity(config.clients.len() * 2);
        for (name, cfg) in &config.clients {
            writes.push(Write::Client(ClientRow {
                name: name.to_string(),
                status: "valid".into(),
                fingerprint: cfg.fingerprint(),
                reason: None,
                last_refresh_at: Some(obtained_at),
                last_error: None,
                failures: 0,
                removed_at: None,
                updated_at: obtained_at,
                warned_for: None,
                refresh_started_at: None,
            }));
            let token = TokenSet {
                access_token: Secret::new(format!("seeded-access-{name}-0123456789abcdef")),
                token_type: "Bearer".into(),
                refresh_token: Some(Secret::new(format!("seeded-refresh-{name}"))),
                id_token: None,
                scope: Some("mail".into()),
                expires_at: Some(obtained_at + lifetime.as_millis() as i64),
                refresh_expires_at: None,
                obtained_at,
                granted_at: obtained_at,
                extra: Default::default(),
                refresh_expiry_slides: false,
            };
            writes.push(Write::Token {
                client: name.to_string(),
                token: Some((token, 1)),
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        runtime
            .block_on(store.commit(writes))
            .map_err(|e| e.to_string())?;
        drop(store);
        writer
            .join()
            .map_err(|_| "the store writer panicked".to_string())
    }
}

/// The release binaries beside this example, built as README.md says to install them: the
/// daemon `oauth2mcid`, and the client `oauth2mci` linked static. Returns the daemon's path;
/// the client is `client_binary` of it.
///
/// With `OAUTH2MCI_BENCH_BINARIES=DIR`, the binaries in DIR are measured instead and nothing is
/// built: to compare two builds, copy one aside.
pub fn daemon_binary() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("OAUTH2MCI_BENCH_BINARIES") {
        let bin = PathBuf::from(dir).join("oauth2mcid");
        return match [bin.clone(), client_binary(&bin)]
            .into_iter()
            .find(|b| !b.exists())
        {
            None => Ok(bin),
            Some(missing) => Err(format!("{} does not exist", missing.display())),
        };
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let builds: [&[&str]; 2] = [
        &["build", "--release", "--quiet", "--bin", "oauth2mcid"],
        &[
            "rustc",
            "--release",
            "--quiet",
            "--bin",
            "oauth2mci",
            "--",
            "-C",
            "target-feature=+crt-static",
        ],
    ];
    for args in builds {
        let status = Command::new(&cargo)
            .args(args)
            .status()
            .map_err(|e| format!("cannot run cargo to build the binaries: {e}"))?;
        if !status.success() {
            return Err(format!("cargo {} failed", args.join(" ")));
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/examples/load -> target/release/oauth2mcid
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("oauth2mcid"))
        .ok_or("cannot find the target folder")?;
    let missing = [bin.clone(), client_binary(&bin)]
        .into_iter()
        .find(|b| !b.exists());
    match missing {
        None => Ok(bin),
        Some(missing) => Err(format!("{} is missing after the build", missing.display())),
    }
}

/// The command line client beside the daemon binary.
pub fn client_binary(daemon: &Path) -> PathBuf {
    daemon.with_file_name("oauth2mci")
}

/// A running daemon; killed (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    /// From spawn to its first answer on the socket.
    pub started_in: Duration,
}

impl Daemon {
    pub fn start(bin: &Path, setup: &Setup) -> Result<Daemon, String> {
        let log = std::fs::File::create(setup.dir.path().join("daemon.log"))
            .map_err(|e| e.to_string())?;
        let begun = Instant::now();
        let child = Command::new(bin)
            .args(["daemon", "--config"])
            .arg(&setup.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut daemon = Daemon {
            child,
            started_in: Duration::ZERO,
        };
        let request = client::request_bytes("/v1/health", false);
        let mut buf = Vec::new();
        loop {
            if let Ok(200) = client::fresh(&setup.socket, &request, &mut buf) {
                daemon.started_in = begun.elapsed();
                return Ok(daemon);
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                let log = std::fs::read_to_string(setup.dir.path().join("daemon.log"))
                    .unwrap_or_default();
                return Err(format!("the daemon exited ({status}): {log}"));
            }
            if begun.elapsed() > Duration::from_secs(120) {
                return Err("the daemon did not answer within 120 s".into());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmRSS:").unwrap_or(0)
    }

    /// User + system CPU time used so far, in clock ticks (1/100 s).
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(&format!("/proc/{}/stat", self.pid())).unwrap_or(0)
    }

    /// Threads of the process.
    pub fn threads(&self) -> u64 {
        status_field(self.pid(), "Threads:").unwrap_or(0)
    }
}

/// User + system CPU time in a `/proc/.../stat` file, in clock ticks (1/100 s).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let s = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The number on the `key` line of `/proc/PID/status`.
fn status_field(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
