//! The socket API: HTTP/1.1 + JSON over the daemon's Unix socket (`curl --unix-socket` works).
//!
//! Threads accept connections; a request for a ready token is answered on the accepting thread
//! (`fast_path`), any other by its own task, so a consumer that holds a connection open (or
//! waits for a slow refresh) delays nobody else. At most `limits.max_connections` are served at
//! once and more wait in the listen backlog. Errors are `{"error": code, "message": text}`.

pub(crate) mod conn;
pub(crate) mod fast_path;

use crate::api::conn::{Conn, Listener};
use crate::api::fast_path::Answered;
use crate::registry::{Method, Registry, RegistryError, Trigger};
use crate::token::now_ms;
use crate::wire::{self, ErrorReply, Health, ReloadReply, TokenReply};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The longest a request may wait for an authorization to finish (`?wait=`).
const MAX_WAIT: Duration = Duration::from_secs(300);
/// A connection that has not sent its request headers by then is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// An API error: a status and the JSON body.
pub struct ApiError(StatusCode, ErrorReply);

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError(
            status,
            ErrorReply {
                error: code.to_string(),
                message: message.into(),
                action: None,
            },
        )
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, wire::code::BAD_REQUEST, message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let action = match &e {
            RegistryError::NeedsAuthorization { action, .. } => action.clone(),
            _ => None,
        };
        let status = match &e {
            RegistryError::UnknownClient(_) => StatusCode::NOT_FOUND,
            RegistryError::NeedsAuthorization { .. } => StatusCode::CONFLICT,
            RegistryError::Server { .. } => StatusCode::BAD_GATEWAY,
            RegistryError::NotSupported(_) | RegistryError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            RegistryError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut error = ApiError::new(status, e.code(), e.to_string());
        error.1.action = action;
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(self.1)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/clients", get(list))
        .route("/v1/clients/{name}", get(show))
        .route("/v1/clients/{name}/token", get(token).delete(forget))
        .route("/v1/clients/{name}/refresh", post(refresh))
        .route("/v1/clients/{name}/revoke", post(revoke))
        .route("/v1/clients/{name}/authorize", post(authorize))
        .route("/v1/clients/{name}/authorization", get(authorization))
        .route("/v1/clients/{name}/events", get(events))
        .route("/v1/reload", post(reload))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                wire::code::NOT_FOUND,
                "no such endpoint; see GET /v1/health",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                wire::code::BAD_REQUEST,
                "this endpoint does not take that method",
            )
        })
        .with_state(registry)
}

/// Query parameters, refusing ones the endpoint does not know (a typo must not pass silently).
fn query(raw: Option<String>, known: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let mut params = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if !known.contains(&k.as_ref()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}; this endpoint takes: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        params.insert(k.into_owned(), v.into_owned());
    }
    Ok(params)
}

/// `60` (seconds) or a duration with a unit (`5m`).
fn duration_param(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<Duration>, ApiError> {
    let Some(v) = params.get(name) else {
        return Ok(None);
    };
    crate::duration::parse(v, crate::duration::Unitless::Seconds)
        .map(Some)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "{name}={v:?} is not a duration (seconds, or like 90s or 5m): {e}"
            ))
        })
}

async fn health(State(r): State<Arc<Registry>>) -> Json<Health> {
    let problems = r.problems();
    let status = if r.shutdown.is_cancelled() {
        "stopping"
    } else if problems.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    Json(Health {
        status: status.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        clients: r.count(),
        config: r.config().file.display().to_string(),
        problems,
    })
}

async fn list(State(r): State<Arc<Registry>>) -> Json<Vec<wire::ClientInfo>> {
    Json(r.list())
}

async fn show(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
) -> ApiResult<wire::ClientInfo> {
    Ok(Json(r.info(&name)?))
}

async fn token(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = query(raw, &["min_valid"])?;
    let min_valid = duration_param(&params, "min_valid")?.unwrap_or(Duration::ZERO);
    let t = r.token(&name, min_valid).await?;
    let mut reply = TokenReply::of(&t, now_ms());
    let warnings: Vec<String> = [
        r.client(&name).and_then(|c| c.unsaved_warning()),
        t.short_of(min_valid),
    ]
    .into_iter()
    .flatten()
    .collect();
    reply.warning = (!warnings.is_empty()).then(|| warnings.join("; "));
    let mut response = Json(reply).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn refresh(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
) -> ApiResult<wire::ClientInfo> {
    let client = r
        .client(&name)
        .ok_or_else(|| RegistryError::UnknownClient(name.clone()))?;
    r.refresh(&client, Trigger::Manual).await?;
    Ok(Json(r.info(&name)?))
}

async fn authorize(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::AuthorizeReply> {
    let params = query(raw, &["method"])?;
    let method = match params.get("method").map(String::as_str) {
        None => None,
        Some("browser") => Some(Method::Browser),
        Some("device") => Some(Method::Device),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "method={other:?}: expected browser or device"
            )));
        }
    };
    Ok(Json(r.authorize(&name, method).await?))
}

async fn authorization(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::AuthorizationOutcome> {
    let params = query(raw, &["state", "wait"])?;
    let wait = duration_param(&params, "wait")?
        .unwrap_or(Duration::ZERO)
        .min(MAX_WAIT);
    Ok(Json(
        r.authorization(&name, params.get("state").map(String::as_str), wait)
            .await?,
    ))
}

async fn forget(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
) -> ApiResult<wire::ClientInfo> {
    r.forget_token(&name).await?;
    Ok(Json(r.info(&name)?))
}

async fn revoke(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::RevokeReply> {
    let params = query(raw, &["local"])?;
    let local = match params.get("local").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "local={v:?}: expected true or false"
            )));
        }
    };
    Ok(Json(r.revoke(&name, local).await?))
}

async fn events(
    State(r): State<Arc<Registry>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Vec<crate::store::Event>> {
    r.info(&name)?;
    let params = query(raw, &["limit"])?;
    let limit = match params.get("limit") {
        None => 50,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit={v:?}: expected a number from 1 to 10000"))
            })?,
    };
    let store = r.store().clone();
    let events = tokio::task::spawn_blocking(move || store.events(&name, limit))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                wire::code::INTERNAL,
                e.to_string(),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                wire::code::INTERNAL,
                e.to_string(),
            )
        })?;
    Ok(Json(events))
}

async fn reload(State(r): State<Arc<Registry>>) -> ApiResult<ReloadReply> {
    match r.reload().await {
        Ok(changes) => Ok(Json(ReloadReply { changes })),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            wire::code::CONFIG_ERROR,
            e,
        )),
    }
}

async fn metrics(State(r): State<Arc<Registry>>) -> Response {
    let mut out = String::new();
    let c = &r.counters;
    let counter = |out: &mut String, name: &str, help: &str, values: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in values {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter(
        &mut out,
        "oauth2mci_grant_requests_total",
        "Token requests by outcome.",
        &[
            ("{outcome=\"ok\"}", load(&c.refresh_ok)),
            ("{outcome=\"failed\"}", load(&c.refresh_failed)),
        ],
    );
    counter(
        &mut out,
        "oauth2mci_authorizations_total",
        "Authorizations completed.",
        &[("", load(&c.authorizations))],
    );
    counter(
        &mut out,
        "oauth2mci_sink_errors_total",
        "Token files that could not be written.",
        &[("", load(&c.sink_errors))],
    );
    counter(
        &mut out,
        "oauth2mci_store_errors_total",
        "Database writes that failed.",
        &[("", load(&c.store_errors))],
    );
    counter(
        &mut out,
        "oauth2mci_store_rescues_total",
        "Times the database's files were found deleted or replaced and were written again.",
        &[("", r.store().health().rescues)],
    );
    let _ = writeln!(
        out,
        "# HELP oauth2mci_store_failing Whether the database's last write failed (1) or not (0).\n# TYPE oauth2mci_store_failing gauge\noauth2mci_store_failing {}",
        u8::from(r.store().health().failing.is_some())
    );
    counter(
        &mut out,
        "oauth2mci_reloads_total",
        "Configuration reloads by outcome.",
        &[
            ("{outcome=\"ok\"}", load(&c.reloads)),
            ("{outcome=\"refused\"}", load(&c.reload_errors)),
        ],
    );
    let _ = writeln!(
        out,
        "# HELP oauth2mci_clients Clients by status.\n# TYPE oauth2mci_clients gauge"
    );
    for (status, n) in r.status_counts() {
        let _ = writeln!(out, "oauth2mci_clients{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP oauth2mci_token_expires_in_seconds Seconds until each client's access token expires.\n# TYPE oauth2mci_token_expires_in_seconds gauge"
    );
    for info in r.list() {
        if let Some(s) = info.expires_in {
            let _ = writeln!(
                out,
                "oauth2mci_token_expires_in_seconds{{client=\"{}\"}} {s}",
                info.name
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Binds the socket: refuses if a daemon already answers there, replaces a stale socket file,
/// and gives it `mode` (and `gid`) before anyone can connect.
pub fn bind(path: &FsPath, mode: u32, gid: Option<u32>) -> Result<Listener, String> {
    if let Some(dir) = path.parent() {
        crate::files::make_dir(dir, gid)?;
    }
    if let Ok(found) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket nobody listens on is removed: anything else at the path is not ours.
        if !found.file_type().is_socket() {
            return Err(format!(
                "{} is there and is not a socket; the daemon does not remove it: move it, or set paths.socket",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another oauth2mci daemon is already listening on {}",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    // The socket is created with the umask's permissions; make them the strictest until chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot give {} to group {gid}: {e}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Listener::new(listener).map_err(|e| e.to_string())
}

/// Who may use the socket, checked on each connection with SO_PEERCRED: the daemon's own user,
/// root, `socket.allow_users`, and members of `socket.group`. The socket file's mode is the
/// first gate; this one holds even when the mode is opened wider than meant.
pub struct PeerPolicy {
    own: u32,
    allowed: Vec<u32>,
    group: Option<u32>,
    /// Whether a uid is in `group` through its supplementary groups, looked up once.
    members: std::sync::Mutex<HashMap<u32, bool>>,
}

impl PeerPolicy {
    pub fn new(access: &crate::config::SocketAccess) -> PeerPolicy {
        PeerPolicy {
            own: nix::unistd::geteuid().as_raw(),
            allowed: access.allow_uids.clone(),
            group: access.group.as_ref().map(|g| g.gid),
            members: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == self.own || uid == 0 || self.allowed.contains(&uid) {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if gid == group {
            return true;
        }
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        *members
            .entry(uid)
            .or_insert_with(|| in_group(uid, gid, group))
    }
}

fn in_group(uid: u32, primary: u32, group: u32) -> bool {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(primary))
        .is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == group))
}

/// How long a refused connection is given to send its request and read the answer: it holds
/// no connection slot, but one of the `MAX_REFUSALS`.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Refused connections answered at once; more are closed unanswered. A flood of connections
/// from a user the socket refuses (or one past their share) costs this many tasks at most.
const MAX_REFUSALS: usize = 64;

/// Answers `status` with an error body and closes. The request head is read first (bounded in
/// size and time), so that the client is done writing and reads the answer.
async fn answer_and_close(mut stream: Conn, status: &str, code: &str, message: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = serde_json::to_string(&ErrorReply {
        error: code.into(),
        message,
        action: None,
    })
    .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, stream.write_all(answer.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Connections held per user (uid), each within `limits.max_connections_per_user`.
struct Shares {
    per_user: usize,
    held: std::sync::Mutex<HashMap<u32, usize>>,
}

/// One connection's place in its user's share; given back when dropped.
struct Share {
    shares: Arc<Shares>,
    uid: u32,
}

impl Shares {
    fn take(self: &Arc<Self>, uid: u32) -> Option<Share> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(uid).or_default();
        if *n >= self.per_user {
            return None;
        }
        *n += 1;
        Some(Share {
            shares: self.clone(),
            uid,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// What a served connection holds until it closes: a slot, and a place in its user's share.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _share: Share,
}

/// The API being served: threads that accept connections, and tasks for those that need the
/// runtime.
pub struct Server {
    acceptor: Arc<Acceptor>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What every accepting thread shares.
struct Acceptor {
    /// Replaced when the socket file is lost and bound again (`Server::rebind`).
    listener: std::sync::RwLock<Arc<Listener>>,
    /// The socket file bound, by device and inode: only that one is ever removed.
    bound: std::sync::Mutex<Option<(u64, u64)>>,
    registry: Arc<Registry>,
    app: Router,
    /// One permit for each connection being served, fast or not.
    slots: Arc<Semaphore>,
    shares: Arc<Shares>,
    /// One permit for each refused connection being answered.
    refusals: Arc<Semaphore>,
    peers: PeerPolicy,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
}

/// Serves the API until `shutdown`: call from inside the runtime, then `Server::stop`.
///
/// Connections are accepted by blocking threads, as many as there are cores (at most four):
/// each answers a ready token itself (`fast_path`) and passes any other request to a task
/// served by hyper. So a consumer that holds a connection open, trickles its request, or waits
/// for a slow refresh delays nobody else.
pub fn serve(
    listener: Listener,
    registry: Arc<Registry>,
    connections: Connections,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> Result<Server, String> {
    let peers = PeerPolicy::new(&registry.config().socket);
    let acceptor = Arc::new(Acceptor {
        listener: std::sync::RwLock::new(Arc::new(listener)),
        bound: std::sync::Mutex::new(file_id(&registry.config().paths.socket)),
        app: router(registry.clone()),
        registry,
        slots: Arc::new(Semaphore::new(connections.max.max(1))),
        shares: Arc::new(Shares {
            per_user: connections.per_user.max(1),
            held: std::sync::Mutex::new(HashMap::new()),
        }),
        refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
        peers,
        shutdown,
        tasks,
        runtime: tokio::runtime::Handle::current(),
    });
    let count = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut server = Server {
        acceptor: acceptor.clone(),
        threads: Vec::new(),
    };
    for i in 0..count {
        let acceptor = acceptor.clone();
        let thread = std::thread::Builder::new()
            .name(format!("socket-accept-{i}"))
            .spawn(move || acceptor.run())
            .map_err(|e| format!("cannot start a thread to accept connections: {e}"));
        match thread {
            Ok(thread) => server.threads.push(thread),
            Err(e) => {
                server.wake();
                return Err(e);
            }
        }
    }
    Ok(server)
}

/// How many socket connections are served at once, and from one user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Connections {
    pub max: usize,
    pub per_user: usize,
}

/// Binds the socket again for a running server.
pub struct Rebinder {
    acceptor: Arc<Acceptor>,
}

impl Rebinder {
    /// Binds the socket again at `path` after its file was deleted or replaced by a dead one,
    /// and accepts there from now on.
    pub fn rebind(&self, path: &FsPath, mode: u32, gid: Option<u32>) -> Result<(), String> {
        let fresh = Arc::new(bind(path, mode, gid)?);
        *self
            .acceptor
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = file_id(path);
        let old = std::mem::replace(
            &mut *self
                .acceptor
                .listener
                .write()
                .unwrap_or_else(|p| p.into_inner()),
            fresh,
        );
        // The accepting threads wake on the old one and go on with the new one.
        old.wake_all().map_err(|e| e.to_string())
    }
}

/// A file's device and inode, not following a link.
fn file_id(path: &FsPath) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the socket file at `path` if it is `bound` (`Server::bound_socket`): a file put
/// there by someone else is left alone.
pub fn remove_socket_if_ours(path: &FsPath, bound: Option<(u64, u64)>) {
    if bound.is_none() || file_id(path) != bound {
        return;
    }
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove the socket {}: {e}", path.display());
    }
}

impl Server {
    /// The socket file bound now, by device and inode.
    pub fn bound_socket(&self) -> Option<(u64, u64)> {
        *self
            .acceptor
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn rebinder(&self) -> Rebinder {
        Rebinder {
            acceptor: self.acceptor.clone(),
        }
    }

    /// Stops accepting (the shutdown token must be cancelled already, or be soon) and waits for
    /// the accepting threads; connections in tasks finish with the other tasks.
    pub async fn stop(mut self) {
        self.wake();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }

    fn wake(&self) {
        if let Err(e) = self.acceptor.listener().wake_all() {
            tracing::warn!("cannot stop accepting on the socket: {e}");
        }
    }
}

impl Acceptor {
    fn listener(&self) -> Arc<Listener> {
        self.listener
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn run(&self) {
        let mut first = Vec::new();
        loop {
            let Some(permit) = self.slot() else { return };
            let listener = self.listener();
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(_) if self.shutdown.is_cancelled() => return,
                // Bound again elsewhere (`Server::rebind`): accept there.
                Err(_) if !Arc::ptr_eq(&listener, &self.listener()) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("socket accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let (uid, refused) = match &peer {
                Ok((uid, gid)) if self.peers.allows(*uid, *gid) => (*uid, None),
                Ok((uid, _)) => (*uid, Some(format!("uid {uid}"))),
                Err(e) => (
                    0,
                    Some(format!("a peer whose credentials cannot be read ({e})")),
                ),
            };
            if let Some(who) = refused {
                tracing::warn!("socket connection refused: {who} is not allowed");
                drop(permit);
                self.refuse(
                    stream,
                    "403 Forbidden",
                    wire::code::FORBIDDEN,
                    format!(
                        "{who} may not use this daemon's socket (socket.allow_users or socket.group in its configuration)"
                    ),
                );
                continue;
            }
            let Some(share) = self.shares.take(uid) else {
                tracing::debug!(
                    "socket connection refused: uid {uid} holds its whole share of connections"
                );
                drop(permit);
                self.refuse(
                    stream,
                    "503 Service Unavailable",
                    wire::code::BUSY,
                    format!(
                        "uid {uid} holds {} connections already (limits.max_connections_per_user); close some",
                        self.shares.per_user
                    ),
                );
                continue;
            };
            let slot = Slot {
                _permit: permit,
                _share: share,
            };
            if let Err(e) = crate::api::conn::read_first(&mut stream, &mut first) {
                tracing::debug!("socket connection: {e}");
                continue;
            }
            let answered = match crate::api::fast_path::parse(&first) {
                None => Ok(None),
                Some(request) => {
                    crate::api::fast_path::answer(&mut stream, &request, &self.registry)
                        .map(|answered| answered.map(|a| (a, request.close)))
                }
            };
            match answered {
                Ok(None) => {
                    let conn = Conn::after_first_read(stream, std::mem::take(&mut first));
                    self.hand_over(conn, Vec::new(), false, slot);
                }
                Ok(Some((Answered::Done, true))) => {}
                Ok(Some((Answered::Done, false))) => {
                    self.hand_over(Conn::answered(stream), Vec::new(), false, slot)
                }
                Ok(Some((Answered::Partly(rest), close))) => {
                    self.hand_over(Conn::answered(stream), rest, close, slot)
                }
                Err(e) => tracing::debug!("socket connection: {e}"),
            }
        }
    }

    /// Answers a refused connection and closes it, in a task of the refusals' own pool; when
    /// that is full, closes it at once.
    fn refuse(
        &self,
        stream: std::os::unix::net::UnixStream,
        status: &'static str,
        code: &'static str,
        message: String,
    ) {
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            return;
        };
        self.tasks.spawn_on(
            async move {
                let _permit = permit;
                answer_and_close(Conn::new(stream), status, code, message).await;
            },
            &self.runtime,
        );
    }

    /// A permit to serve one more connection, waiting while `max_connections` are served;
    /// `None` at shutdown.
    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.shutdown.cancelled() => None,
                permit = self.slots.clone().acquire_owned() => permit.ok(),
            }
        })
    }

    /// Serves `conn` in a task: first the rest of an answer begun on the accepting thread (if
    /// any), then HTTP for as long as the client keeps the connection.
    fn hand_over(&self, mut conn: Conn, rest: Vec<u8>, close: bool, slot: Slot) {
        let (app, shutdown) = (self.app.clone(), self.shutdown.clone());
        self.tasks.spawn_on(
            async move {
                use tokio::io::AsyncWriteExt;
                let _slot = slot;
                if !rest.is_empty() {
                    match tokio::time::timeout(HEADER_TIMEOUT, conn.write_all(&rest)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return tracing::debug!("socket connection: {e}"),
                        Err(_) => {
                            return tracing::debug!(
                                "socket connection: the client did not read its answer"
                            );
                        }
                    }
                }
                if !close {
                    serve_connection(app, conn, shutdown).await;
                }
            },
            &self.runtime,
        );
    }
}

/// Serves HTTP on one connection until it closes; at shutdown it gets a moment to finish.
async fn serve_connection(app: Router, conn: Conn, shutdown: CancellationToken) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client that shuts its side down once the request is written (`nc -N`) still gets
        // the answer.
        .half_close(true)
        .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("socket connection: {e}");
            }
        }
        _ = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), served).await;
        }
    }
}
