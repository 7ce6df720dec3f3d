//! The registry: every client's live state, and the one place that changes it.
//!
//! Each client keeps its state behind a std mutex that is never held across an await, and a
//! single-flight lock: only one grant request per client is ever in flight, and whoever arrives
//! while one runs waits for it and takes its result. Every change is committed to the store before
//! it shows in memory, and a token reaches its sinks only after that.

use crate::config::{ClientConfig, Config, Grant, SinkConfig};
use crate::counters::Counters;
use crate::notify::{self, Kind, Notice};
use crate::oauth::device::{self, DeviceGrant};
use crate::oauth::queue::{Endpoint, Urgency};
use crate::oauth::redirect::{self, Arrival, Callback, Hub, PendingAuth};
use crate::oauth::{self, Engine, ErrorClass, GrantError, Pkce};
use crate::provider::{RefreshMechanism, Revocation, Rotation};
use crate::scheduler::{self, ClockEvent, Scheduler};
use crate::secret::Secret;
use crate::sink;
use crate::store::{ClientRow, Event, PendingRow, Snapshot, Store, Stored, Write};
use crate::token::{TokenSet, now_ms};
use crate::wire::{
    self, AuthFailure, AuthorizationOutcome, AuthorizeReply, ClientInfo, RevokeReply,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

/// The reason given when a config edit made a client's tokens stale; undoing the edit undoes it.
const IDENTITY_CHANGED: &str =
    "client_id, token URL, scopes or grant changed: its tokens were issued for another identity";

/// How a failure to write a token file starts as a client's last error, so that a later
/// complete write knows the error it clears is its own.
const SINK_ERROR: &str = "cannot write a token file: ";

/// Where a client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Unauthorized,
    Authorizing,
    Valid,
    Refreshing,
    Retrying,
    NeedsReauth,
    Revoked,
    Disabled,
    /// Shown, never stored: the client's newest token is held in memory only, because the
    /// database could not take it (it is served, and saved as soon as the database can).
    Unsaved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unauthorized => "unauthorized",
            Status::Authorizing => "authorizing",
            Status::Valid => "valid",
            Status::Refreshing => "refreshing",
            Status::Retrying => "retrying",
            Status::NeedsReauth => "needs_reauth",
            Status::Revoked => "revoked",
            Status::Disabled => "disabled",
            Status::Unsaved => "unsaved",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// Whether the client holds a grant the daemon may use without the user.
    fn has_grant(self) -> bool {
        matches!(self, Status::Valid | Status::Refreshing | Status::Retrying)
    }
}

/// Why a request to the registry failed; the API turns each into a status code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("no client named {0:?} in the configuration")]
    UnknownClient(String),
    #[error("{client} needs authorization: {reason}")]
    NeedsAuthorization {
        client: String,
        reason: String,
        /// An authorization waiting for the user, when the daemon could start one.
        action: Option<Box<AuthorizeReply>>,
    },
    #[error("{client}: {message}")]
    Server { client: String, message: String },
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Internal(String),
}

impl RegistryError {
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::UnknownClient(_) => wire::code::UNKNOWN_CLIENT,
            RegistryError::NeedsAuthorization { .. } => wire::code::NEEDS_AUTHORIZATION,
            RegistryError::Server { .. } => wire::code::SERVER_ERROR,
            RegistryError::NotSupported(_) => wire::code::NOT_SUPPORTED,
            RegistryError::BadRequest(_) => wire::code::BAD_REQUEST,
            RegistryError::ShuttingDown => wire::code::SHUTTING_DOWN,
            RegistryError::Internal(_) => wire::code::INTERNAL,
        }
    }
}

/// How the user authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The authorization code grant, back through a loopback redirect.
    Browser,
    /// The device authorization grant: a code typed on another device.
    Device,
}

/// An authorization started, before it is saved: what the user is told, what is stored, how
/// to stop it, and a device grant to poll.
struct Started {
    reply: AuthorizeReply,
    row: PendingRow,
    cancel: CancellationToken,
    device: Option<DeviceGrant>,
}

/// What made a refresh happen; it decides whether a refresh that just finished is good enough.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// The client's deadline came.
    Scheduled,
    /// A consumer needs a token valid for this long.
    Demand(Duration),
    /// `oauth2mci refresh`: a new token even if the current one is fine.
    Manual,
}

/// An optional time (or clock reading) in milliseconds, in 8 bytes where `Option<i64>` takes
/// 16: a client's state holds nine, which with 100,000 clients is 7 MB. `i64::MIN` stands for
/// none; no time or clock shift reads it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct MaybeTime(i64);

impl MaybeTime {
    const NONE: MaybeTime = MaybeTime(i64::MIN);

    fn some(at: i64) -> MaybeTime {
        debug_assert!(at != i64::MIN);
        MaybeTime(at)
    }

    fn get(self) -> Option<i64> {
        (self != MaybeTime::NONE).then_some(self.0)
    }
}

impl From<Option<i64>> for MaybeTime {
    /// Also for times read from the store: a row holding `i64::MIN` reads as none.
    fn from(at: Option<i64>) -> MaybeTime {
        at.map_or(MaybeTime::NONE, MaybeTime)
    }
}

impl std::fmt::Debug for MaybeTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

#[derive(Debug, Clone)]
struct ClientState {
    status: Status,
    token: Option<TokenSet>,
    /// Counts tokens stored for this client; a refresh that sees it move knows another finished.
    generation: i64,
    /// Fingerprint of the configuration the token was issued under.
    fingerprint: String,
    reason: Option<String>,
    failures: u32,
    last_refresh_at: MaybeTime,
    last_error: Option<String>,
    next_refresh_at: MaybeTime,
    removed_at: MaybeTime,
    /// When the user was told that only they can help; not again until the client recovers,
    /// or `notify.repeat` has passed.
    reauth_notified_at: MaybeTime,
    /// When the user was told that refreshes keep failing.
    error_notified_at: MaybeTime,
    /// The grant end (a refresh token's known expiry) the user was warned about.
    warned_for: MaybeTime,
    /// The clock (`Registry::clock_shift`) this state's times were read on; `None` for what
    /// was read from the store at start.
    clock: MaybeTime,
    /// The refresh intent: a request that may rotate the refresh token went out then, and
    /// its outcome is not saved yet. Stored before the request, cleared with the outcome.
    refresh_started_at: MaybeTime,
    /// The intent found at start: the daemon stopped while that refresh was out. If the next
    /// refresh meets `invalid_grant`, the server had answered and its new refresh token was
    /// lost with the process; the user is told exactly that.
    interrupted_at: MaybeTime,
    /// Since when the newest token is in memory only: the database refused it. No refresh
    /// that would replace its refresh token is sent until it is saved.
    unsaved: MaybeTime,
    /// Until when the server asked to be left alone (Retry-After of the last failure): no
    /// refresh is sent before, whoever asks.
    server_wait_until: MaybeTime,
}

impl ClientState {
    /// What storing a new token does to a client: valid, failures and reasons cleared, and the
    /// user may be told again at the next incident.
    fn take_token(
        &mut self,
        token: TokenSet,
        generation: i64,
        fingerprint: String,
        now: i64,
        clock: i64,
    ) {
        self.clock = MaybeTime::some(clock);
        self.server_wait_until = MaybeTime::NONE;
        self.refresh_started_at = MaybeTime::NONE;
        self.interrupted_at = MaybeTime::NONE;
        self.generation = generation;
        self.token = Some(token);
        self.status = Status::Valid;
        self.fingerprint = fingerprint;
        self.reason = None;
        self.failures = 0;
        self.last_error = None;
        self.last_refresh_at = MaybeTime::some(now);
        self.reauth_notified_at = MaybeTime::NONE;
        self.error_notified_at = MaybeTime::NONE;
    }

    /// Notes that the newest token is in memory only; whether that is new.
    fn mark_unsaved(&mut self, now: i64) -> bool {
        let new = self.unsaved.get().is_none();
        if new {
            self.unsaved = MaybeTime::some(now);
        }
        new
    }

    /// Notes that everything is saved; whether something was not.
    fn mark_saved(&mut self) -> bool {
        let was = self.unsaved.get().is_some();
        self.unsaved = MaybeTime::NONE;
        was
    }

    fn row(&self, name: &str) -> ClientRow {
        ClientRow {
            name: name.to_string(),
            status: self.status.as_str().to_string(),
            fingerprint: self.fingerprint.clone(),
            reason: self.reason.clone(),
            last_refresh_at: self.last_refresh_at.get(),
            last_error: self.last_error.clone(),
            failures: self.failures,
            removed_at: self.removed_at.get(),
            updated_at: now_ms(),
            warned_for: self.warned_for.get(),
            refresh_started_at: self.refresh_started_at.get(),
        }
    }
}

/// One client: its configuration, state, single-flight lock and authorization outcome.
pub struct Client {
    pub name: Arc<str>,
    config: RwLock<Arc<ClientConfig>>,
    state: Mutex<ClientState>,
    flight: tokio::sync::Mutex<()>,
    /// Made when first needed: most clients are never authorized through the daemon after
    /// the first time.
    authorization: std::sync::OnceLock<Box<Authorizing>>,
    /// The authorization waiting for the user, and how to stop its device polling.
    /// Boxed: 160 bytes that most clients never use.
    pending: Mutex<Option<Box<(AuthorizeReply, CancellationToken)>>>,
}

/// What a client needs while it is being authorized, about 300 bytes.
struct Authorizing {
    outcome: watch::Sender<Option<AuthorizationOutcome>>,
    /// Authorizations of this client start one at a time, so that one started for the user
    /// (a notice, `token`) and one the user asked for never replace each other half-way.
    starting: tokio::sync::Mutex<()>,
}

impl Client {
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current token, if it can be served as it is (no refresh to wait for) and stays
    /// valid `min_valid` longer.
    pub fn ready_token(&self, min_valid: Duration) -> Option<TokenSet> {
        self.ready(min_valid, false)
    }

    /// `ready_token`, unless the token is held in memory only (the full server then serves it
    /// with a warning): what the accepting thread may answer by itself, in one lock.
    pub fn saved_ready_token(&self, min_valid: Duration) -> Option<TokenSet> {
        self.ready(min_valid, true)
    }

    fn ready(&self, min_valid: Duration, saved_only: bool) -> Option<TokenSet> {
        let cfg = self.config();
        let st = self.state();
        let t = st.token.as_ref()?;
        let held = saved_only && st.unsaved.get().is_some();
        (!held && servable(&st, &cfg) && t.serves(now_ms(), min_valid)).then(|| t.clone())
    }

    /// Why the token served is held in memory only, if it is.
    pub fn unsaved_warning(&self) -> Option<String> {
        let st = self.state();
        st.unsaved.get().map(|since| {
            format!(
                "the token is held in memory only since {}: the database cannot take it ({}); it would be lost if the daemon stopped now",
                crate::token::show_time(since),
                st.last_error.as_deref().unwrap_or("a write failed")
            )
        })
    }

    fn state(&self) -> MutexGuard<'_, ClientState> {
        // A panic elsewhere must not take every later request down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_outcome(&self, outcome: AuthorizationOutcome) {
        self.authorization().outcome.send_replace(Some(outcome));
    }

    fn authorization(&self) -> &Authorizing {
        self.authorization.get_or_init(|| {
            Box::new(Authorizing {
                outcome: watch::Sender::new(None),
                starting: tokio::sync::Mutex::new(()),
            })
        })
    }

    fn pending(&self) -> MutexGuard<'_, Option<Box<(AuthorizeReply, CancellationToken)>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The authorization waiting for the user, unless it has expired.
    fn waiting(&self, now: i64) -> Option<AuthorizeReply> {
        self.pending()
            .as_deref()
            .filter(|(reply, _)| reply.expires_at > now)
            .map(|(reply, _)| reply.clone())
    }

    /// Drops the waiting authorization if it is `state`; says whether it was.
    fn take_pending(&self, state: &str) -> bool {
        let mut pending = self.pending();
        let current = pending.as_deref().is_some_and(|(r, _)| r.state == state);
        if current {
            pending.take();
        }
        current
    }
}

pub struct Registry {
    /// Itself, for work that must outlive the caller (a notice that starts an authorization).
    me: std::sync::Weak<Registry>,
    clients: RwLock<BTreeMap<Arc<str>, Arc<Client>>>,
    config: RwLock<Arc<Config>>,
    store: Store,
    engine: Engine,
    scheduler: Scheduler,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    pub(crate) redirects: Hub,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub counters: Counters,
    /// Reloads come from SIGHUP, the file watcher and the API; one at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// The sum of the wall-clock jumps seen since start (ms): the clock a time was read on.
    clock_shift: Arc<AtomicI64>,
    /// `clock_shift` as the clients' state last followed it.
    clock_followed: AtomicI64,
    /// Bumped after each applied configuration, for those who follow it (cron jobs).
    versions: watch::Sender<u64>,
}

impl Registry {
    /// Builds the registry from the configuration and what the store held at start
    /// (`snapshot`), and starts the timers.
    pub fn start(
        config: Arc<Config>,
        store: Store,
        snapshot: Snapshot,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Arc<Registry>, String> {
        let begun = std::time::Instant::now();
        let engine = Engine::new(config.limits.request_timeout)?;
        let (fire_tx, mut fire_rx) = tokio::sync::mpsc::unbounded_channel::<Arc<str>>();
        let (clock_tx, mut clock_rx) = tokio::sync::mpsc::unbounded_channel::<ClockEvent>();
        let clock_shift = Arc::new(AtomicI64::new(0));
        let shift = clock_shift.clone();
        let (scheduler, _driver) = Scheduler::start(
            move |name| {
                let _ = fire_tx.send(name);
            },
            move |event| {
                // At once, not when the registry gets to it: a token landing meanwhile must
                // know which clock its times were read on.
                if let ClockEvent::Jumped(jump) = event {
                    shift.fetch_add(jump, Ordering::SeqCst);
                }
                let _ = clock_tx.send(event);
            },
            shutdown.clone(),
        );
        let (redirects, arrivals) = Hub::new(shutdown.clone());
        let registry = Arc::new_cyclic(|me| Registry {
            me: me.clone(),
            clients: RwLock::new(BTreeMap::new()),
            config: RwLock::new(config.clone()),
            store,
            engine,
            scheduler,
            endpoints: Mutex::new(HashMap::new()),
            redirects,
            tasks: tasks.clone(),
            shutdown,
            counters: Counters::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            versions: watch::Sender::new(0),
            clock_shift,
            clock_followed: AtomicI64::new(0),
        });
        registry.restore(&config, snapshot.clients);
        registry.resume_authorizations(snapshot.pending);
        tracing::debug!(
            "clients restored and scheduled in {} ms",
            begun.elapsed().as_millis()
        );
        registry.finish_arrivals(arrivals);
        let follower = registry.clone();
        tasks.spawn(async move {
            while let Some(event) = clock_rx.recv().await {
                match event {
                    ClockEvent::Jumped(_) => follower.clock_jumped().await,
                    // Pooled connections did not live through the suspend.
                    ClockEvent::Resumed(_) => follower.engine.reset_connections(),
                }
            }
        });
        let driver = registry.clone();
        tasks.spawn(async move {
            while let Some(name) = fire_rx.recv().await {
                let registry = driver.clone();
                driver.tasks.spawn(async move {
                    if let Some(client) = registry.client(&name) {
                        if client.state().unsaved.get().is_some() {
                            // Saving what is held comes first; its timer says when to retry.
                            registry.save_unsaved(&client).await;
                            if client.state().unsaved.get().is_some() {
                                return;
                            }
                        }
                        registry.warn_if_grant_ends_soon(&client).await;
                        registry.remind_if_due(&client).await;
                        let due = client
                            .state()
                            .next_refresh_at
                            .get()
                            .is_some_and(|at| at <= now_ms());
                        if due {
                            let _ = registry.refresh(&client, Trigger::Scheduled).await;
                        } else {
                            registry.schedule_from_state(&client);
                        }
                    }
                });
            }
        });
        Ok(registry)
    }

    /// Finishes the authorizations whose browser came back to a redirect listener. The task
    /// holds the registry weakly: the hub that feeds it belongs to the registry.
    fn finish_arrivals(self: &Arc<Self>, mut arrivals: UnboundedReceiver<Arrival>) {
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let arrival = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    arrival = arrivals.recv() => arrival,
                };
                let (Some(arrival), Some(registry)) = (arrival, me.upgrade()) else {
                    return;
                };
                match arrival {
                    Arrival::Matched {
                        pending,
                        callback,
                        done,
                    } => {
                        tokio::spawn(async move {
                            let outcome = registry.complete_authorization(pending, callback).await;
                            let _ = done.send(outcome);
                        });
                    }
                    Arrival::Refused { pending, why } => {
                        registry.fail_authorization(&pending, why).await;
                    }
                }
            }
        });
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn client(&self, name: &str) -> Option<Arc<Client>> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn known(&self, name: &str) -> Result<Arc<Client>, RegistryError> {
        self.client(name)
            .ok_or_else(|| RegistryError::UnknownClient(name.to_string()))
    }

    fn all(&self) -> Vec<Arc<Client>> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Counts of clients per status, for `/metrics` and health.
    pub fn status_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for c in self.all() {
            *counts.entry(effective_status(&c).as_str()).or_default() += 1;
        }
        counts
    }

    // ---------------------------------------------------------------------------------------
    // Start-up and reconfiguration.

    fn restore(&self, config: &Config, mut stored: Vec<Stored>) {
        // Both in name order, the rows are matched to the clients in one pass (the store
        // gives them in that order already, which the sort finds at once).
        stored.sort_unstable_by(|a, b| a.row.name.cmp(&b.row.name));
        let mut stored = stored.into_iter().peekable();
        let mut unnamed = Vec::new();
        let mut clients = BTreeMap::new();
        for (name, cfg) in &config.clients {
            while let Some(row) = stored.next_if(|s| *s.row.name < **name) {
                unnamed.push(row);
            }
            let own = stored.next_if(|s| *s.row.name == **name);
            let client = new_client(cfg.clone(), own);
            clients.insert(client.name.clone(), client);
        }
        unnamed.extend(stored);
        // Clients the config no longer names are kept (disabled) so that putting them back
        // needs no new authorization, until history.keep_removed forgets them.
        let mut writes = Vec::new();
        for s in unnamed {
            if s.row.status != Status::Disabled.as_str() || s.row.removed_at.is_none() {
                let mut row = s.row.clone();
                row.status = Status::Disabled.as_str().into();
                row.removed_at = Some(row.removed_at.unwrap_or_else(now_ms));
                writes.push(Write::Client(row));
            }
        }
        if !writes.is_empty() {
            let store = self.store.clone();
            self.tasks.spawn(async move {
                if let Err(e) = store.commit(writes).await {
                    tracing::error!("cannot record removed clients: {e}");
                }
            });
        }
        for client in clients.values() {
            self.schedule_from_state(client);
        }
        *self.clients.write().unwrap_or_else(|p| p.into_inner()) = clients;
    }

    /// Authorizations that were waiting for the browser when the daemon stopped listen again.
    fn resume_authorizations(self: &Arc<Self>, pending: Vec<PendingRow>) {
        let now = now_ms();
        for row in pending {
            let client = self.client(&row.client).filter(|_| row.expires_at > now);
            let Some(client) = client else {
                self.forget_pending(vec![row.state]);
                continue;
            };
            let cfg = client.config();
            // A row this version cannot read is dropped like an expired one.
            let device: Option<DeviceGrant> = row
                .device
                .as_ref()
                .and_then(|json| serde_json::from_str(json.expose()).ok());
            let resumed = match device {
                Some(grant) => {
                    let cancel = self.shutdown.child_token();
                    let reply = device_reply(&row.state, &grant);
                    *client.pending() = Some(Box::new((reply, cancel.clone())));
                    // Rows from before fingerprints were kept: the configuration of now.
                    let started_under = grant.fingerprint.clone().unwrap_or(cfg.fingerprint());
                    self.poll_device(&client, row.state.clone(), grant, started_under, cancel);
                    Ok(())
                }
                None => self.resume_browser(&client, &cfg, &row),
            };
            match resumed {
                Ok(()) => {
                    tracing::info!(client = %row.client, "waiting again for the user to finish an authorization started before the restart");
                    client.set_outcome(outcome(&row.state, "pending", None, None));
                }
                Err(e) => {
                    tracing::warn!(client = %row.client, "an authorization started before the restart cannot continue: {e}");
                    self.forget_pending(vec![row.state]);
                }
            }
        }
    }

    fn resume_browser(
        self: &Arc<Self>,
        client: &Arc<Client>,
        cfg: &ClientConfig,
        row: &PendingRow,
    ) -> Result<(), String> {
        let uri = Url::parse(&row.redirect_uri).map_err(|e| e.to_string())?;
        let pending = PendingAuth {
            client: client.name.clone(),
            state: row.state.clone(),
            verifier: row.pkce_verifier.clone(),
            redirect_uri: uri.clone(),
            fingerprint: cfg.fingerprint(),
        };
        self.redirects.register(&uri, pending)?;
        let challenge = row.pkce_verifier.as_ref().map(Pkce::challenge_of);
        if let Some(url) = oauth::authorize_url(cfg, &uri, &row.state, challenge.as_deref()) {
            let reply = AuthorizeReply {
                method: "browser".into(),
                url: url.to_string(),
                state: row.state.clone(),
                redirect_uri: Some(uri.to_string()),
                user_code: None,
                verification_uri: None,
                expires_at: row.expires_at,
            };
            *client.pending() = Some(Box::new((reply, CancellationToken::new())));
        }
        self.expire_later(client, &row.state, row.expires_at);
        Ok(())
    }

    /// Forgets saved authorizations, in one commit, in the background.
    fn forget_pending(&self, states: Vec<String>) {
        if states.is_empty() {
            return;
        }
        let store = self.store.clone();
        let writes = states
            .into_iter()
            .map(|state| Write::PendingDone { state })
            .collect();
        self.tasks.spawn(async move {
            let _ = store.commit(writes).await;
        });
    }

    /// Reads the configuration file again and applies it; a bad file changes nothing.
    pub async fn reload(self: &Arc<Self>) -> Result<Vec<String>, String> {
        self.reload_after(|| {}).await
    }

    /// `reload`, calling `started` once it is this reload's turn (requests that come after it
    /// need a reload of their own).
    pub async fn reload_after(
        self: &Arc<Self>,
        started: impl FnOnce(),
    ) -> Result<Vec<String>, String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        started();
        if self.shutdown.is_cancelled() {
            return Err("the daemon is stopping; the configuration is not read again".into());
        }
        let previous = self.config();
        let loaded =
            tokio::task::spawn_blocking(move || crate::config::reload(&previous.file, &previous))
                .await
                .map_err(|e| format!("the config loader failed: {e}"))?;
        match loaded {
            Ok(new) => {
                let changes = self.apply(Arc::new(new)).await;
                crate::heap::release_free_pages();
                self.counters.reloads.fetch_add(1, Ordering::Relaxed);
                if changes.is_empty() {
                    tracing::info!("configuration reloaded: nothing changed");
                }
                for change in &changes {
                    tracing::info!("configuration reloaded: {change}");
                }
                Ok(changes)
            }
            Err(e) => {
                self.counters.reload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("configuration not reloaded, the previous one keeps running: {e}");
                Err(e.to_string())
            }
        }
    }

    /// Applies a new configuration; returns what changed, for the log and `reload`.
    pub async fn apply(self: &Arc<Self>, new: Arc<Config>) -> Vec<String> {
        let old = self.config();
        let mut changes = Vec::new();
        if old.paths != new.paths || old.socket != new.socket {
            changes.push("paths and socket settings take effect at the next restart".into());
        }
        if old.encryption != new.encryption {
            // The store re-encrypts everything when it opens; halfway through a run, values
            // sealed under both key sets would mix.
            changes.push("encryption keys take effect at the next restart".into());
        }
        let mut writes = Vec::new();
        let now = now_ms();
        let existing = self.all();
        for client in &existing {
            if new.clients.contains_key(&*client.name) {
                continue;
            }
            let mut st = client.state();
            if st.status != Status::Disabled {
                st.status = Status::Disabled;
                st.removed_at = MaybeTime::some(now);
                st.next_refresh_at = MaybeTime::NONE;
                writes.push(Write::Client(st.row(&client.name)));
                writes.push(event(
                    &client.name,
                    "removed",
                    "removed from the configuration",
                ));
                self.scheduler.remove(client.name.clone());
                changes.push(format!(
                    "{}: removed (tokens kept, refresh stopped)",
                    client.name
                ));
            }
        }
        let mut added = Vec::new();
        let mut rewrite_sinks = Vec::new();
        let mut stored_rows: Option<HashMap<String, Stored>> = None;
        for (name, cfg) in &new.clients {
            let Some(client) = self.client(name) else {
                // A client seen before comes back with what the store kept; the store is read
                // once per reload, not once per added client.
                let rows = stored_rows.get_or_insert_with(|| {
                    let rows = self.store.load().unwrap_or_default();
                    rows.into_iter().map(|s| (s.row.name.clone(), s)).collect()
                });
                let stored = rows.remove(&**name);
                let client = new_client(cfg.clone(), stored);
                changes.push(format!("{name}: added"));
                writes.push(Write::Client(client.state().row(name)));
                added.push(client);
                continue;
            };
            let old_cfg = client.config();
            let was_disabled = client.state().status == Status::Disabled;
            // A client whose text did not change is the very same value (`config::reload`).
            if (Arc::ptr_eq(&old_cfg, cfg) || *old_cfg == **cfg) && !was_disabled {
                continue;
            }
            *client.config.write().unwrap_or_else(|p| p.into_inner()) = cfg.clone();
            let mut st = client.state();
            if was_disabled {
                st.removed_at = MaybeTime::NONE;
                st.status = restored_status(&st, cfg);
                changes.push(format!("{name}: back in the configuration"));
            }
            if !cfg.same_identity(&old_cfg) {
                if st.token.is_some()
                    && !cfg.has_fingerprint(&st.fingerprint)
                    && cfg.grant.unattended()
                {
                    // No user needed: the next timer fetches a token for the new identity.
                    st.status = Status::Unauthorized;
                    st.reason = None;
                    changes.push(format!("{name}: identity changed, fetching a new token"));
                } else if st.token.is_some() && !cfg.has_fingerprint(&st.fingerprint) {
                    st.status = Status::NeedsReauth;
                    st.reason = Some(IDENTITY_CHANGED.into());
                    changes.push(format!("{name}: identity changed, needs authorization"));
                } else if st.token.is_some() && st.reason.as_deref() == Some(IDENTITY_CHANGED) {
                    // The edit was undone: the stored grant fits again.
                    st.status = Status::Valid;
                    st.reason = None;
                    changes.push(format!("{name}: identity restored"));
                }
            } else if !was_disabled {
                changes.push(format!("{name}: settings changed"));
            }
            if old_cfg.sinks != cfg.sinks {
                rewrite_sinks.push((client.clone(), old_cfg.sinks.clone()));
            }
            // A client failing because of its settings gets a fresh attempt with the new ones.
            if st.status == Status::Retrying {
                st.failures = 0;
            }
            writes.push(Write::Client(st.row(name)));
            drop(st);
            self.schedule_from_state(&client);
        }
        {
            let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
            for client in &added {
                clients.insert(client.name.clone(), client.clone());
            }
        }
        for client in &added {
            self.schedule_from_state(client);
        }
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        self.versions.send_modify(|v| *v += 1);
        if !writes.is_empty()
            && let Err(e) = self.store.commit(writes).await
        {
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("cannot record the new configuration's clients: {e}");
        }
        for (client, old_sinks) in rewrite_sinks {
            let cfg = client.config();
            let gone: Vec<SinkConfig> = old_sinks
                .into_iter()
                .filter(|s| !cfg.sinks.iter().any(|n| n.path == s.path))
                .filter(|s| {
                    !new.clients
                        .values()
                        .any(|c| c.sinks.iter().any(|n| n.path == s.path))
                })
                .collect();
            // Under the flight lock, so that a refresh or a forget cannot interleave with it.
            let _flight = client.flight.lock().await;
            self.clear_sinks(&client.name, gone).await;
            let token = {
                let st = client.state();
                servable(&st, &cfg).then(|| st.token.clone()).flatten()
            };
            if let Some(token) = token {
                self.write_sinks(&client.name, cfg.sinks.clone(), token)
                    .await;
            }
            changes.push(format!("{}: sinks rewritten", client.name));
        }
        changes
    }

    /// Sets the client's timer from its state: the next refresh, a retry, or nothing.
    ///
    /// The timer also wakes the client for a warning due before its grant ends, which is not a
    /// refresh: `next_refresh_at` keeps the refresh time alone.
    fn schedule_from_state(&self, client: &Client) {
        let cfg = client.config();
        let mut st = client.state();
        let mut warn_at = None;
        let at = match st.status {
            Status::Valid | Status::Refreshing => match &st.token {
                Some(t) => {
                    let renew = can_renew(&cfg, t);
                    warn_at = grant_end(&cfg, t)
                        .filter(|end| !warned(&st, &cfg, *end))
                        .map(|end| end - cfg.refresh.warn_before.as_millis() as i64);
                    // A refresh cut short by a stop: find out now whether its token survived.
                    if st.interrupted_at.get().is_some() {
                        Some(now_ms())
                    } else {
                        scheduler::next_refresh(
                            t,
                            &cfg.refresh,
                            &cfg.profile,
                            renew,
                            scheduler::draw(),
                        )
                    }
                }
                None => None,
            },
            Status::Retrying => st.next_refresh_at.get().or_else(|| Some(now_ms())),
            // A client that needs no user gets its first token by itself.
            Status::Unauthorized if cfg.grant.unattended() => Some(now_ms()),
            _ => None,
        };
        st.next_refresh_at = at.into();
        // The next reminder that the user is still needed.
        let remind_at = match (
            st.status,
            st.reauth_notified_at.get(),
            self.config().notify.repeat,
        ) {
            (Status::NeedsReauth | Status::Unauthorized, Some(told), Some(every)) => {
                Some(told + every.as_millis() as i64)
            }
            _ => None,
        };
        let warn_at = [warn_at, remind_at].into_iter().flatten().min();
        let at = [at, warn_at].into_iter().flatten().min();
        match at {
            Some(at) => self.scheduler.set(client.name.clone(), at),
            None => self.scheduler.remove(client.name.clone()),
        }
    }

    /// Warns once (log, event, `notify.on_warning`) when the client's grant ends within
    /// `refresh.warn_before`: a refresh token with a known lifetime (LinkedIn 365 days, Google
    /// testing apps 7 days), or a token nothing can renew.
    async fn warn_if_grant_ends_soon(&self, client: &Arc<Client>) {
        let cfg = client.config();
        let now = now_ms();
        let (message, writes) = {
            let mut st = client.state();
            if !matches!(
                st.status,
                Status::Valid | Status::Refreshing | Status::Retrying
            ) {
                return;
            }
            let Some(t) = &st.token else { return };
            let Some(end) = grant_end(&cfg, t) else {
                return;
            };
            if warned(&st, &cfg, end) || end - cfg.refresh.warn_before.as_millis() as i64 > now {
                return;
            }
            st.warned_for = MaybeTime::some(end);
            let left = crate::duration::show(Duration::from_secs((end - now).max(0) as u64 / 1000));
            let message = format!(
                "the grant ends in {left} and only a new authorization extends it: run `oauth2mci authorize {}`",
                client.name
            );
            let writes = vec![
                Write::Client(st.row(&client.name)),
                event(&client.name, "warning", &message),
            ];
            (message, writes)
        };
        tracing::warn!(client = %client.name, "{message}");
        if let Err(e) = self.store.commit(writes).await {
            tracing::error!(client = %client.name, "cannot record the warning: {e}");
        }
        self.tell(client, self.notice(Kind::Warning, &cfg, &message));
    }

    /// The wall clock was set. Times read on the old clock during this run move with it, in
    /// memory and in the store; tokens read from the store at start are left as they are
    /// (written before this boot, most likely on a right clock: the usual jump is NTP's first
    /// sync correcting a wrong clock at boot). Every timer is then set again.
    async fn clock_jumped(&self) {
        let current = self.clock_shift.load(Ordering::SeqCst);
        // Retry and notice times are always this run's.
        let jump = current - self.clock_followed.swap(current, Ordering::SeqCst);
        let mut writes = Vec::new();
        for client in self.all() {
            {
                let mut st = client.state();
                let by = |t: i64| t + jump;
                st.next_refresh_at = st.next_refresh_at.get().map(by).into();
                st.reauth_notified_at = st.reauth_notified_at.get().map(by).into();
                st.error_notified_at = st.error_notified_at.get().map(by).into();
                let moved = st.clock.get().map_or(0, |read_on| current - read_on);
                let generation = st.generation;
                if moved != 0
                    && let Some(token) = st.token.as_mut()
                {
                    token.shift(moved);
                    writes.push(Write::Token {
                        client: client.name.to_string(),
                        token: Some((token.clone(), generation)),
                    });
                }
                if st.clock.get().is_some() {
                    st.clock = MaybeTime::some(current);
                }
            }
            self.schedule_from_state(&client);
        }
        writes.push(Write::Event(Event {
            at: now_ms(),
            client: None,
            kind: "clock_jump".into(),
            detail: format!(
                "the wall clock was set; times of {} token(s) obtained since start moved with it",
                writes.len()
            ),
        }));
        if let Err(e) = self.store.commit(writes).await {
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("cannot save token times after a clock change: {e}");
        }
    }

    pub fn config_versions(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// A client's `cron:` schedule came due.
    pub async fn cron_refresh(self: &Arc<Self>, name: &str) {
        let Some(client) = self.client(name) else {
            return;
        };
        let cfg = client.config();
        let renewable = {
            let st = client.state();
            cfg.grant.unattended() || (st.status.has_grant() && servable(&st, &cfg))
        };
        if renewable {
            let _ = self.refresh(&client, Trigger::Manual).await;
        }
    }

    /// The cron schedules of clients that asked for one (`cron:`); the daemon drives them.
    pub fn cron_clients(&self) -> Vec<(Arc<str>, String)> {
        self.all()
            .into_iter()
            .filter_map(|c| {
                c.config()
                    .cron
                    .as_ref()
                    .map(|e| (c.name.clone(), e.0.clone()))
            })
            .collect()
    }

    // ---------------------------------------------------------------------------------------
    // Tokens.

    /// A token valid for at least `min_valid`, refreshing first (or joining a refresh in
    /// flight) when the current one is not.
    pub async fn token(
        self: &Arc<Self>,
        name: &str,
        min_valid: Duration,
    ) -> Result<TokenSet, RegistryError> {
        let client = self.known(name)?;
        if let Some(t) = client.ready_token(min_valid) {
            return Ok(t);
        }
        match self.refresh(&client, Trigger::Demand(min_valid)).await {
            // The consumer (a mail client) shows this error to the user: say where to go.
            Err(RegistryError::NeedsAuthorization {
                client: c, reason, ..
            }) => Err(RegistryError::NeedsAuthorization {
                client: c,
                reason,
                action: self.user_action(&client).await.map(Box::new),
            }),
            other => other,
        }
    }

    /// Runs one grant request for `client`, or joins the one in flight.
    ///
    /// The work runs in its own tracked task: a caller that goes away (a consumer that hangs up,
    /// a connection closed at shutdown) must not cancel a request whose answer may hold the only
    /// valid refresh token, and shutdown waits for it.
    pub async fn refresh(
        self: &Arc<Self>,
        client: &Arc<Client>,
        trigger: Trigger,
    ) -> Result<TokenSet, RegistryError> {
        let registry = self.clone();
        let client = client.clone();
        let work = self
            .tasks
            .spawn(async move { registry.refresh_now(&client, trigger).await });
        work.await
            .unwrap_or_else(|e| Err(RegistryError::Internal(format!("the refresh failed: {e}"))))
    }

    async fn refresh_now(
        &self,
        client: &Arc<Client>,
        trigger: Trigger,
    ) -> Result<TokenSet, RegistryError> {
        let seen_generation = client.state().generation;
        let scheduled = matches!(trigger, Trigger::Scheduled);
        // A scheduled refresh waits for its turn before the flight lock: a consumer that needs
        // this client's token meanwhile refreshes it without waiting behind the queue, and this
        // refresh then finds it done.
        let early = if scheduled {
            let endpoint = self.endpoint(&client.config());
            let urgency = scheduled_urgency(&client.state());
            tokio::select! {
                permit = endpoint.acquire(urgency) => Some(permit),
                _ = self.shutdown.cancelled() => return Err(RegistryError::ShuttingDown),
            }
        } else {
            None
        };
        // Never wait for the flight lock holding a permit: whoever holds the lock may be
        // waiting for one.
        let (_flight, early) = match early {
            Some(permit) => match client.flight.try_lock() {
                Ok(flight) => (flight, Some(permit)),
                Err(_) => {
                    drop(permit);
                    (client.flight.lock().await, None)
                }
            },
            None => (client.flight.lock().await, None),
        };
        if self.shutdown.is_cancelled() {
            return Err(RegistryError::ShuttingDown);
        }
        let cfg = client.config();
        let now = now_ms();
        let old = {
            let mut st = client.state();
            let usable = servable(&st, &cfg);
            match (trigger, &st.token) {
                (Trigger::Demand(min), Some(t)) if usable && t.serves(now, min) => {
                    return Ok(t.clone());
                }
                (Trigger::Scheduled | Trigger::Demand(_), Some(t))
                    if usable
                        && st.generation != seen_generation
                        && t.valid_for(now, Duration::ZERO) =>
                {
                    return Ok(t.clone());
                }
                _ => {}
            }
            if let Some(err) = self.cannot_refresh(&client.name, &st, &cfg) {
                return Err(err);
            }
            // A consumer asking again and again must not defeat the backoff, and nobody
            // defeats a wait the server asked for (Retry-After).
            let backoff = match (trigger, st.status, st.next_refresh_at.get()) {
                (Trigger::Demand(_), Status::Retrying, Some(at)) => Some(at),
                _ => None,
            };
            let wait = [backoff, st.server_wait_until.get()]
                .into_iter()
                .flatten()
                .max()
                .filter(|&at| at > now && !matches!(trigger, Trigger::Scheduled));
            if let Some(at) = wait {
                return Err(RegistryError::Server {
                    client: client.name.to_string(),
                    message: format!(
                        "{} (next attempt in {}s)",
                        st.last_error
                            .clone()
                            .unwrap_or_else(|| "refresh failed".into()),
                        (at - now + 999) / 1000
                    ),
                });
            }
            if st.status == Status::Valid {
                st.status = Status::Refreshing;
            }
            st.token.clone()
        };
        let mut permit = match early {
            Some(permit) => permit,
            None => {
                let urgency = if scheduled {
                    scheduled_urgency(&client.state())
                } else {
                    Urgency::Waiting
                };
                self.endpoint(&cfg).acquire(urgency).await
            }
        };
        let rotates = cfg.profile.refresh_token_rotation != Rotation::Never
            && cfg.profile.refresh_mechanism == RefreshMechanism::RefreshToken
            && !cfg.grant.unattended()
            && old.as_ref().is_some_and(|t| t.refresh_token.is_some());
        let unsaved = client.state().unsaved.get().is_some();
        if rotates || unsaved {
            // The intent before a request that may rotate the refresh token, and the token
            // held in memory only, if any: a rotating refresh waits until that is saved.
            let writes = {
                let mut st = client.state();
                if rotates {
                    st.refresh_started_at = MaybeTime::some(now_ms());
                }
                let mut writes = vec![Write::Client(st.row(&client.name))];
                if unsaved {
                    writes.push(Write::Token {
                        client: client.name.to_string(),
                        token: st.token.clone().map(|t| (t, st.generation)),
                    });
                }
                writes
            };
            match self.store.commit(writes).await {
                Ok(()) if unsaved => {
                    let was = client.state().mark_saved();
                    self.counters.unsaved_changed(false, was);
                }
                Ok(()) => {}
                Err(e) if rotates && unsaved => {
                    // Not a failed refresh: none was sent. Saving is retried on its own timer.
                    drop(permit);
                    let mut st = client.state();
                    st.refresh_started_at = MaybeTime::NONE;
                    if st.status == Status::Refreshing {
                        st.status = Status::Valid;
                    }
                    return Err(RegistryError::Server {
                        client: client.name.to_string(),
                        message: format!(
                            "the newest token is not saved yet ({e}); no refresh that would replace its refresh token is sent until it is"
                        ),
                    });
                }
                Err(e) if rotates => {
                    drop(permit);
                    client.state().refresh_started_at = MaybeTime::NONE;
                    let e = GrantError::transient(format!(
                        "cannot record the refresh before sending it (its answer could not be saved either): {e}"
                    ));
                    return Err(Box::pin(self.refresh_failed(client, &cfg, e)).await);
                }
                Err(_) => {}
            }
        }
        let read_on = self.clock_shift.load(Ordering::SeqCst);
        let request = async {
            match (cfg.grant, old) {
                (Grant::ClientCredentials | Grant::JwtBearer, _) => {
                    self.engine.unattended(&cfg, now).await
                }
                (Grant::AuthorizationCode | Grant::DeviceCode, Some(old)) => {
                    self.engine.refresh(&cfg, &old, now).await
                }
                (Grant::AuthorizationCode | Grant::DeviceCode, None) => {
                    Err(GrantError::needs_user("no token yet"))
                }
            }
        };
        // Boxed: the request's future is kilobytes (reqwest's), and inline it would make every
        // refresh task that big while it waits in the endpoint's queue (100,000 due at once).
        let result = permit.hold_while(Box::pin(request)).await;
        drop(permit);
        match result {
            // Boxed, like the request: what follows it is hundreds of bytes of futures.
            Ok(token) => Box::pin(self.accept(client, &cfg, token, "refreshed", read_on)).await,
            Err(e) => Err(Box::pin(self.refresh_failed(client, &cfg, e)).await),
        }
    }

    /// Why the daemon cannot renew this client's token without the user, if it cannot.
    fn cannot_refresh(
        &self,
        name: &str,
        st: &ClientState,
        cfg: &ClientConfig,
    ) -> Option<RegistryError> {
        let needs = |reason: String| {
            Some(RegistryError::NeedsAuthorization {
                client: name.to_string(),
                reason,
                action: None,
            })
        };
        match st.status {
            Status::Disabled => Some(RegistryError::UnknownClient(name.to_string())),
            _ if cfg.grant.unattended() => None,
            Status::NeedsReauth | Status::Revoked => needs(
                st.reason
                    .clone()
                    .unwrap_or_else(|| format!("run `oauth2mci authorize {name}`")),
            ),
            Status::Unauthorized | Status::Authorizing if st.token.is_none() => needs(format!(
                "not authorized yet: run `oauth2mci authorize {name}`"
            )),
            _ if !cfg.has_fingerprint(&st.fingerprint) => {
                needs("its identity changed in the configuration".into())
            }
            _ => None,
        }
    }

    /// The limits of the client's token endpoint (by origin), made anew when a reload
    /// changed them.
    fn endpoint(&self, cfg: &ClientConfig) -> Arc<Endpoint> {
        let limits = &self.config().limits;
        let wanted = (limits.per_endpoint_concurrency, limits.per_endpoint_rate);
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(cfg.endpoints.token.origin().ascii_serialization())
            .or_insert_with(|| Endpoint::new(wanted.0, wanted.1));
        if entry.limits() != wanted {
            *entry = Endpoint::new(wanted.0, wanted.1);
        }
        entry.clone()
    }

    /// Stores a new token: database first, then memory and timer, then sinks, then the hook.
    /// `read_on` is the clock (`clock_shift`) when the request went out: a token whose times
    /// were read before a clock jump is moved with it here.
    async fn accept(
        &self,
        client: &Arc<Client>,
        issued_for: &ClientConfig,
        mut token: TokenSet,
        how: &str,
        read_on: i64,
    ) -> Result<TokenSet, RegistryError> {
        let clock = self.clock_shift.load(Ordering::SeqCst);
        token.shift(clock - read_on);
        let now = now_ms();
        let (writes, generation) = {
            let st = client.state();
            let mut next = st.clone();
            next.take_token(
                token.clone(),
                st.generation + 1,
                issued_for.fingerprint(),
                now,
                clock,
            );
            let detail = match token.remaining(now) {
                Some(ms) => format!("{how}; expires in {}s", ms / 1000),
                None => format!("{how}; no expiry given"),
            };
            (
                // The client's row first: a token row refers to it.
                vec![
                    Write::Client(next.row(&client.name)),
                    Write::Token {
                        client: client.name.to_string(),
                        token: Some((token.clone(), next.generation)),
                    },
                    event(&client.name, how, &detail),
                ],
                next.generation,
            )
        };
        let committed = self.store.commit(writes).await;
        let (disabled, identity_changed) = {
            let mut st = client.state();
            // A reload may have removed the client or changed its identity while the request
            // or the commit was out: the token is kept (stored under the fingerprint it was
            // issued for, so undoing the edit brings it back), but it is neither served, nor
            // refreshed, nor written out.
            let disabled = st.status == Status::Disabled;
            let now_config = client.config();
            let identity_changed = !now_config.same_identity(issued_for);
            st.take_token(
                token.clone(),
                generation,
                issued_for.fingerprint(),
                now,
                clock,
            );
            st.status = match (disabled, identity_changed) {
                (true, _) => Status::Disabled,
                (false, true) if now_config.grant.unattended() => Status::Unauthorized,
                (false, true) => Status::NeedsReauth,
                (false, false) => Status::Valid,
            };
            if let Err(e) = &committed {
                // Keep the token in memory (a rotated refresh token is the only one that works
                // now), serve it, say so, and save it as soon as the database takes it.
                st.last_error = Some(format!("cannot save the token: {e}"));
                let new = st.mark_unsaved(now);
                self.counters.unsaved_changed(new, false);
            } else {
                let was = st.mark_saved();
                self.counters.unsaved_changed(false, was);
            }
            if identity_changed && st.status == Status::NeedsReauth {
                st.reason = Some(IDENTITY_CHANGED.into());
            }
            (disabled, identity_changed)
        };
        if disabled || identity_changed {
            self.schedule_from_state(client);
            return Err(RegistryError::NeedsAuthorization {
                client: client.name.to_string(),
                reason: "the configuration changed while the token was being obtained".into(),
                action: None,
            });
        }
        if let Err(e) = committed {
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(client = %client.name, "token obtained but not saved: it is served from memory, its token files are not written, and no refresh that would replace its refresh token is sent until it is saved: {e}");
            self.retry_save_later(client, now_ms());
            return Ok(token);
        }
        self.counters.count_refresh(true);
        self.schedule_from_state(client);
        tracing::info!(client = %client.name, expires_in = token.remaining(now).map(|ms| ms / 1000), "{how}");
        // The sinks of now: a reload during the commit may have changed them.
        self.write_sinks(&client.name, client.config().sinks.clone(), token.clone())
            .await;
        let cfg = client.config();
        let mut notice = self.notice(Kind::Refreshed, &cfg, "");
        notice.expires_at = token.expires_at.map(|ms| ms / 1000);
        if cfg.notify_token {
            notice.access_token = Some(token.access_token.clone());
        }
        self.tell(client, notice);
        Ok(token)
    }

    /// Sets the client's timer to try saving its token again: sooner at first, then half as
    /// long as it has been unsaved, within the client's retry bounds.
    fn retry_save_later(&self, client: &Client, now: i64) {
        let policy = client.config().refresh.clone();
        let retry = {
            let mut st = client.state();
            let since = st.unsaved.get().unwrap_or(now);
            let wait = ((now - since) / 2).clamp(
                policy.retry_initial.as_millis() as i64,
                policy.retry_max.as_millis() as i64,
            );
            st.next_refresh_at = MaybeTime::some(now + wait);
            now + wait
        };
        self.scheduler.set(client.name.clone(), retry);
    }

    /// Saves a token held in memory only, then writes its token files; on failure, tries
    /// again later.
    async fn save_unsaved(&self, client: &Arc<Client>) {
        let _flight = client.flight.lock().await;
        let (writes, since) = {
            let st = client.state();
            let Some(since) = st.unsaved.get() else {
                return;
            };
            let writes = vec![
                Write::Client(st.row(&client.name)),
                Write::Token {
                    client: client.name.to_string(),
                    token: st.token.clone().map(|t| (t, st.generation)),
                },
            ];
            (writes, since)
        };
        if let Err(e) = self.store.commit(writes).await {
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            client.state().last_error = Some(format!("cannot save the token: {e}"));
            tracing::error!(client = %client.name, "the token held in memory since {} still cannot be saved: {e}", crate::token::show_time(since));
            self.retry_save_later(client, now_ms());
            return;
        }
        let token = {
            let mut st = client.state();
            let was = st.mark_saved();
            self.counters.unsaved_changed(false, was);
            st.last_error = None;
            st.token.clone()
        };
        tracing::info!(client = %client.name, "the token held in memory since {} is saved", crate::token::show_time(since));
        self.schedule_from_state(client);
        let cfg = client.config();
        let servable = servable(&client.state(), &cfg);
        if let Some(token) = token.filter(|_| servable) {
            self.write_sinks(&client.name, cfg.sinks.clone(), token)
                .await;
        }
    }

    async fn refresh_failed(
        &self,
        client: &Arc<Client>,
        cfg: &ClientConfig,
        e: GrantError,
    ) -> RegistryError {
        self.counters.count_refresh(false);
        let now = now_ms();
        let message = e.to_string();
        let mut e = e;
        if cfg.grant.unattended() && e.class == ErrorClass::NeedsUser {
            // No user can help a client that has none: an `invalid_grant` here is a bad key or
            // assertion (RFC 7523 section 3.1), a settings error to retry slowly and tell.
            e.class = ErrorClass::Config;
        }
        let repeat = self.config().notify.repeat;
        let error_after = self.config().notify.error_after;
        let (writes, notice, result) = {
            let mut st = client.state();
            let disabled = st.status == Status::Disabled;
            st.refresh_started_at = MaybeTime::NONE;
            let interrupted = st
                .interrupted_at
                .get()
                .filter(|_| e.class == ErrorClass::NeedsUser);
            let message = match interrupted {
                Some(at) => {
                    st.interrupted_at = MaybeTime::NONE;
                    format!(
                        "the daemon stopped during a refresh ({}) after the server answered and before the answer was saved; the server had already replaced the refresh token: {message}",
                        crate::token::show_time(at)
                    )
                }
                None => message,
            };
            st.last_error = Some(message.clone());
            let outcome = match e.class {
                ErrorClass::NeedsUser => {
                    st.status = if st.token.is_some() {
                        Status::NeedsReauth
                    } else {
                        Status::Unauthorized
                    };
                    st.reason = Some(message.clone());
                    st.next_refresh_at = MaybeTime::NONE;
                    let tell = time_to_tell(st.reauth_notified_at.get(), repeat, now);
                    if tell {
                        st.reauth_notified_at = MaybeTime::some(now);
                    }
                    tracing::warn!(client = %client.name, "needs authorization: {message}");
                    let kind = if interrupted.is_some() {
                        "refresh_lost"
                    } else {
                        "needs_reauth"
                    };
                    (
                        vec![
                            Write::Client(st.row(&client.name)),
                            event(&client.name, kind, &message),
                        ],
                        tell.then(|| self.notice(Kind::ReauthNeeded, cfg, &message)),
                        RegistryError::NeedsAuthorization {
                            client: client.name.to_string(),
                            reason: message.clone(),
                            action: None,
                        },
                    )
                }
                ErrorClass::Transient | ErrorClass::Config => {
                    st.failures += 1;
                    st.server_wait_until = e
                        .retry_after
                        .map(|wait| {
                            now.saturating_add(wait.as_millis().min(i64::MAX as u128) as i64)
                        })
                        .into();
                    st.status = Status::Retrying;
                    let delay = scheduler::retry_delay(
                        &cfg.refresh,
                        st.failures,
                        e.retry_after,
                        scheduler::draw(),
                    );
                    st.next_refresh_at = MaybeTime::some(now + delay.as_millis() as i64);
                    tracing::warn!(client = %client.name, failures = st.failures, retry_in = ?delay, "refresh failed: {message}");
                    // Settings errors are worth telling at once; passing outages after a few
                    // tries; either once per incident, or again after `notify.repeat`.
                    let tell = (e.class == ErrorClass::Config || st.failures >= error_after)
                        && time_to_tell(st.error_notified_at.get(), repeat, now);
                    if tell {
                        st.error_notified_at = MaybeTime::some(now);
                    }
                    let notice = tell.then(|| {
                        let mut n = self.notice(Kind::Error, cfg, &message);
                        n.failures = st.failures;
                        n
                    });
                    (
                        vec![
                            Write::Client(st.row(&client.name)),
                            event(&client.name, "refresh_failed", &message),
                        ],
                        notice,
                        RegistryError::Server {
                            client: client.name.to_string(),
                            message: message.clone(),
                        },
                    )
                }
            };
            if disabled {
                // Removed from the config while the request was out: stays removed, untold.
                st.status = Status::Disabled;
                st.next_refresh_at = MaybeTime::NONE;
                (outcome.0, None, outcome.2)
            } else {
                outcome
            }
        };
        if let Err(err) = self.store.commit(writes).await {
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(client = %client.name, "cannot record the failure: {err}");
        }
        self.schedule_from_state(client);
        if let Some(n) = notice {
            self.tell(client, n);
        }
        result
    }

    /// A notice about `cfg`'s client, with the fields every event carries.
    fn notice(&self, kind: Kind, cfg: &ClientConfig, message: &str) -> Notice {
        let mut n = Notice::new(kind, &cfg.name, message);
        n.provider = cfg.provider.to_string();
        n
    }

    /// Runs the hook for `notice`. A re-authorization notice first gets an authorization
    /// started (or the one waiting), so that it can say where to go.
    fn tell(&self, client: &Arc<Client>, notice: Notice) {
        if notice.kind != Kind::ReauthNeeded {
            notify::send(&self.config().notify, notice, &self.tasks);
            return;
        }
        let Some(registry) = self.me.upgrade() else {
            return;
        };
        let client = client.clone();
        self.tasks.spawn(async move {
            let action = registry.user_action(&client).await;
            let notice = notice.with_action(action.as_ref());
            notify::send(&registry.config().notify, notice, &registry.tasks);
        });
    }

    /// Reminds the user, at `notify.repeat`, that a client still needs them.
    async fn remind_if_due(&self, client: &Arc<Client>) {
        let cfg = client.config();
        let repeat = self.config().notify.repeat;
        let now = now_ms();
        let notice = {
            let mut st = client.state();
            let waiting = matches!(st.status, Status::NeedsReauth | Status::Unauthorized)
                && st.reauth_notified_at.get().is_some();
            if !waiting || !time_to_tell(st.reauth_notified_at.get(), repeat, now) {
                return;
            }
            st.reauth_notified_at = MaybeTime::some(now);
            let reason = st.reason.clone().unwrap_or_else(|| "not authorized".into());
            self.notice(
                Kind::ReauthNeeded,
                &cfg,
                &format!("still waiting: {reason}"),
            )
        };
        tracing::warn!(client = %client.name, "still needs authorization: {}", notice.error);
        self.tell(client, notice);
    }

    /// Writes the client's token files, noting a failure as its last error until a later write
    /// of every file succeeds.
    async fn write_sinks(&self, name: &str, sinks: Vec<SinkConfig>, token: TokenSet) {
        if sinks.is_empty() {
            return;
        }
        let client = name.to_string();
        let protected = self.config().protected.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            sinks
                .iter()
                .filter_map(|s| sink::write(s, &client, &token, &protected).err())
                .collect::<Vec<_>>()
        })
        .await;
        let errors: Vec<String> = match outcome {
            Ok(errors) => errors.into_iter().map(|e| e.to_string()).collect(),
            Err(e) => vec![format!("sink writer failed: {e}")],
        };
        if errors.is_empty() {
            // Every file written: an earlier failure to write one is over.
            if let Some(c) = self.client(name) {
                let mut st = c.state();
                if st
                    .last_error
                    .as_ref()
                    .is_some_and(|e| e.starts_with(SINK_ERROR))
                {
                    st.last_error = None;
                }
            }
        }
        for e in errors {
            self.counters.sink_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(client = %name, "{SINK_ERROR}{e}");
            if let Some(c) = self.client(name) {
                c.state().last_error = Some(format!("{SINK_ERROR}{e}"));
            }
        }
    }

    async fn clear_sinks(&self, name: &str, sinks: Vec<SinkConfig>) {
        if sinks.is_empty() {
            return;
        }
        let protected = self.config().protected.clone();
        let errors = tokio::task::spawn_blocking(move || {
            sinks
                .iter()
                .filter_map(|s| sink::clear(s, &protected).err())
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for e in errors {
            tracing::warn!(client = %name, "cannot remove a token file no longer configured: {e}");
        }
    }

    // ---------------------------------------------------------------------------------------
    // Authorization (authorization code grant with a loopback redirect).

    /// Starts an authorization: returns what the user must do (open a URL, or enter a code at
    /// a page). `method` defaults to the client's grant: `device_code` clients use the device
    /// flow, others the browser.
    pub async fn authorize(
        self: &Arc<Self>,
        name: &str,
        method: Option<Method>,
    ) -> Result<AuthorizeReply, RegistryError> {
        self.start_authorization(name, method, true).await
    }

    /// Starts an authorization; one started on the user's behalf (`asked: false`, for a notice
    /// or `token`) leaves the client's status as it is: it is an offer, not a step taken.
    async fn start_authorization(
        self: &Arc<Self>,
        name: &str,
        method: Option<Method>,
        asked: bool,
    ) -> Result<AuthorizeReply, RegistryError> {
        let client = self.known(name)?;
        let _one_at_a_time = client.authorization().starting.lock().await;
        let cfg = client.config();
        let now = now_ms();
        if !asked {
            // One waits for the user already: send them there, whatever its method.
            if let Some(reply) = client.waiting(now) {
                return Ok(reply);
            }
        }
        let before_status = client.state().status;
        if before_status == Status::Disabled {
            return Err(RegistryError::UnknownClient(name.to_string()));
        }
        if cfg.grant.unattended() {
            return Err(RegistryError::NotSupported(format!(
                "{name} uses the {} grant: it needs no authorization, its tokens come by themselves",
                cfg.grant.as_str()
            )));
        }
        let method = method.unwrap_or(match cfg.grant {
            Grant::DeviceCode => Method::Device,
            _ => Method::Browser,
        });
        let Started {
            reply,
            row,
            cancel,
            device,
        } = match method {
            Method::Browser => self.start_browser(&client, &cfg)?,
            Method::Device => self.start_device(&client, &cfg).await?,
        };
        let state = reply.state.clone();
        // One authorization per client at a time: a new one replaces those before (after it
        // registered, so that a fixed port keeps its listener).
        self.end_authorizations(&client, &state, Some((reply.clone(), cancel.clone())));
        let writes = {
            let mut st = client.state();
            if asked && !st.status.has_grant() {
                st.status = Status::Authorizing;
            }
            let how = if asked {
                ""
            } else {
                ", for the user to finish"
            };
            vec![
                Write::Pending(row),
                Write::Client(st.row(name)),
                event(
                    name,
                    "authorizing",
                    &format!("authorization started ({}{how})", reply.method),
                ),
            ]
        };
        if let Err(e) = self.store.commit(writes).await {
            self.redirects.take(&state);
            cancel.cancel();
            client.take_pending(&state);
            let mut st = client.state();
            if st.status == Status::Authorizing {
                st.status = before_status;
            }
            return Err(RegistryError::Internal(format!(
                "cannot save the authorization: {e}"
            )));
        }
        client.set_outcome(outcome(&state, "pending", None, None));
        // A reminder that came due while the user was busy is set again from here.
        self.schedule_from_state(&client);
        match device {
            Some(grant) => self.poll_device(&client, state, grant, cfg.fingerprint(), cancel),
            None => self.expire_later(&client, &state, reply.expires_at),
        }
        tracing::info!(client = %name, method = %reply.method, "authorization started: {}", reply.instructions());
        Ok(reply)
    }

    /// Registers a loopback redirect and builds the authorization URL.
    fn start_browser(
        self: &Arc<Self>,
        client: &Arc<Client>,
        cfg: &ClientConfig,
    ) -> Result<Started, RegistryError> {
        let requested = cfg
            .redirect_uri
            .as_deref()
            .cloned()
            .unwrap_or_else(redirect::default_redirect_uri);
        let state = crate::random::token(32);
        let pkce = cfg.pkce.then(Pkce::new);
        let expires_at = now_ms() + cfg.authorize_timeout.as_millis() as i64;
        if cfg.endpoints.authorize.is_none() {
            return Err(RegistryError::NotSupported(format!(
                "{} has no authorization endpoint: use the device flow (--device) or set provider.authorize_url",
                client.name
            )));
        }
        let pending = PendingAuth {
            client: client.name.clone(),
            state: state.clone(),
            verifier: pkce.as_ref().map(|p| p.verifier.clone()),
            redirect_uri: requested.clone(),
            fingerprint: cfg.fingerprint(),
        };
        let redirect_uri = self
            .redirects
            .register(&requested, pending)
            .map_err(RegistryError::BadRequest)?;
        let Some(url) = oauth::authorize_url(
            cfg,
            &redirect_uri,
            &state,
            pkce.as_ref().map(|p| p.challenge.as_str()),
        ) else {
            self.redirects.take(&state);
            return Err(RegistryError::NotSupported(format!(
                "{} has no authorization endpoint",
                client.name
            )));
        };
        let row = PendingRow {
            state: state.clone(),
            client: client.name.to_string(),
            pkce_verifier: pkce.map(|p| p.verifier),
            redirect_uri: redirect_uri.to_string(),
            created_at: now_ms(),
            expires_at,
            device: None,
        };
        let reply = AuthorizeReply {
            method: "browser".into(),
            url: url.to_string(),
            state,
            redirect_uri: Some(redirect_uri.to_string()),
            user_code: None,
            verification_uri: None,
            expires_at,
        };
        Ok(Started {
            reply,
            row,
            cancel: CancellationToken::new(),
            device: None,
        })
    }

    /// Asks the server for a device code (RFC 8628); polling starts once it is saved.
    async fn start_device(
        &self,
        client: &Arc<Client>,
        cfg: &ClientConfig,
    ) -> Result<Started, RegistryError> {
        if cfg.endpoints.device_authorization.is_none() {
            return Err(RegistryError::NotSupported(format!(
                "provider {} has no device authorization endpoint: set provider.device_authorization_url, or authorize in a browser",
                cfg.provider
            )));
        }
        let mut permit = self.endpoint(cfg).acquire(Urgency::Waiting).await;
        let started = permit.hold_while(device::start(&self.engine, cfg)).await;
        drop(permit);
        let mut grant = started.map_err(|e| RegistryError::Server {
            client: client.name.to_string(),
            message: format!("cannot start a device authorization: {e}"),
        })?;
        grant.fingerprint = Some(cfg.fingerprint());
        let state = crate::random::token(16);
        let reply = device_reply(&state, &grant);
        let row = PendingRow {
            state,
            client: client.name.to_string(),
            pkce_verifier: None,
            redirect_uri: String::new(),
            created_at: now_ms(),
            expires_at: grant.expires_at,
            // Serialising plain data cannot fail.
            device: serde_json::to_string(&grant).ok().map(Secret::new),
        };
        Ok(Started {
            reply,
            row,
            cancel: self.shutdown.child_token(),
            device: Some(grant),
        })
    }

    /// Polls for the device authorization `state` in a tracked task until it ends. A restart
    /// (shutdown cancels the poll) leaves it saved, and the next start polls again.
    fn poll_device(
        self: &Arc<Self>,
        client: &Arc<Client>,
        state: String,
        mut grant: DeviceGrant,
        fingerprint: String,
        cancel: CancellationToken,
    ) {
        let registry = self.clone();
        let client = client.clone();
        self.tasks.spawn(async move {
            let cfg = client.config();
            let polled = device::poll(&registry.engine, &cfg, &mut grant, &cancel).await;
            let read_on = registry.clock_shift.load(Ordering::SeqCst);
            if cancel.is_cancelled() {
                // Superseded (the new one forgot this one) or shutting down (kept for later).
                return;
            }
            let result = match polled {
                Ok(token) => {
                    registry
                        .take_device_token(&client, &fingerprint, token, read_on)
                        .await
                }
                Err(e) => Err(e),
            };
            registry.finish_authorization(&client, &state, result).await;
        });
    }

    async fn take_device_token(
        &self,
        client: &Arc<Client>,
        fingerprint: &str,
        token: TokenSet,
        read_on: i64,
    ) -> Result<(), AuthFailure> {
        let _flight = client.flight.lock().await;
        let cfg = client.config();
        if !cfg.has_fingerprint(fingerprint) {
            return Err(AuthFailure::new(
                "config_changed",
                "the client's configuration changed during the authorization; start again",
            ));
        }
        self.counters.authorizations.fetch_add(1, Ordering::Relaxed);
        self.accept(client, &cfg, token, "authorized", read_on)
            .await
            .map(|_| ())
            .map_err(|e| AuthFailure::new("not_stored", e.to_string()))
    }

    /// What the user must do for this client now: the authorization waiting for them, or one
    /// started for the purpose (`auto_authorize`). `None` when there is nothing they can open.
    pub async fn user_action(self: &Arc<Self>, client: &Arc<Client>) -> Option<AuthorizeReply> {
        let cfg = client.config();
        let status = client.state().status;
        // A revoked client waits for the user's own `authorize`: nothing is offered.
        if cfg.grant.unattended() || matches!(status, Status::Disabled | Status::Revoked) {
            return None;
        }
        if !cfg.auto_authorize {
            return client.waiting(now_ms());
        }
        // The one waiting, if any (checked under the client's start lock), else a new one.
        match self.start_authorization(&client.name, None, false).await {
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::warn!(client = %client.name, "cannot start an authorization for the user: {e}");
                None
            }
        }
    }

    fn expire_later(self: &Arc<Self>, client: &Arc<Client>, state: &str, expires_at: i64) {
        let registry = self.clone();
        let client = client.clone();
        let state = state.to_string();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let wait = Duration::from_millis((expires_at - now_ms()).max(0) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {
                    if registry.redirects.take(&state).is_some() {
                        registry.finish_authorization(&client, &state, Err(AuthFailure::new("timeout", "the browser did not come back in time"))).await;
                    }
                }
            }
        });
    }

    /// The redirect listener hands over a callback that matched a pending authorization.
    async fn complete_authorization(
        self: &Arc<Self>,
        pending: PendingAuth,
        callback: Callback,
    ) -> Result<(), AuthFailure> {
        let Some(client) = self.client(&pending.client) else {
            return Err(AuthFailure::new(
                "unknown_client",
                "the client was removed from the configuration",
            ));
        };
        // Like a refresh, the exchange must outlive the browser's connection.
        let registry = self.clone();
        let work = self.tasks.spawn(async move {
            let result = registry.exchange(&client, &pending, callback).await;
            registry
                .finish_authorization(&client, &pending.state, result.clone())
                .await;
            result
        });
        work.await.unwrap_or_else(|e| {
            Err(AuthFailure::new(
                "internal",
                format!("the exchange failed: {e}"),
            ))
        })
    }

    async fn exchange(
        &self,
        client: &Arc<Client>,
        pending: &PendingAuth,
        callback: Callback,
    ) -> Result<(), AuthFailure> {
        let code = match callback {
            Callback::Error { error, description } => {
                let message = description.map_or_else(
                    || "the authorization server refused".into(),
                    |d| crate::text::one_line(&d, 300),
                );
                return Err(AuthFailure::new(
                    crate::text::one_line(&error, 100),
                    message,
                ));
            }
            Callback::Code { code, iss, params } => {
                let cfg = client.config();
                if let Some(iss) = iss {
                    let expected = expected_issuer(&cfg);
                    if expected.as_deref().map(trim_slash) != Some(trim_slash(&iss)) {
                        return Err(AuthFailure::new(
                            "issuer_mismatch",
                            format!(
                                "the response names issuer {iss:?}, expected {:?} (RFC 9207): possible mix-up attack",
                                expected.unwrap_or_default()
                            ),
                        ));
                    }
                }
                (code, params)
            }
        };
        let (code, callback_params) = code;
        let _flight = client.flight.lock().await;
        let cfg = client.config();
        if !cfg.has_fingerprint(&pending.fingerprint) {
            return Err(AuthFailure::new(
                "config_changed",
                "the client's configuration changed during the authorization; start again",
            ));
        }
        let mut permit = self.endpoint(&cfg).acquire(Urgency::Waiting).await;
        let read_on = self.clock_shift.load(Ordering::SeqCst);
        let exchange = self.engine.exchange_code(
            &cfg,
            &code,
            &pending.redirect_uri,
            pending.verifier.as_ref(),
            &callback_params,
        );
        let result = permit.hold_while(exchange).await;
        drop(permit);
        match result {
            Ok(token) => {
                self.counters.authorizations.fetch_add(1, Ordering::Relaxed);
                self.accept(client, &cfg, token, "authorized", read_on)
                    .await
                    .map(|_| ())
                    .map_err(|e| AuthFailure::new("not_stored", e.to_string()))
            }
            Err(e) => Err(AuthFailure::new(
                e.code
                    .clone()
                    .unwrap_or_else(|| "token_request_failed".into()),
                e.message.clone(),
            )),
        }
    }

    /// A callback that cannot belong to the authorization (wrong `state`) ends it.
    async fn fail_authorization(&self, pending: &PendingAuth, why: AuthFailure) {
        if let Some(client) = self.client(&pending.client) {
            self.finish_authorization(&client, &pending.state, Err(why))
                .await;
        }
    }

    async fn finish_authorization(
        &self,
        client: &Arc<Client>,
        state: &str,
        result: Result<(), AuthFailure>,
    ) {
        let mut writes = vec![Write::PendingDone {
            state: state.to_string(),
        }];
        if !client.take_pending(state) {
            // Replaced while it finished: its token (if any) was stored, but the outcome and
            // the status belong to the authorization that replaced it.
            if let Err(why) = &result {
                tracing::info!(client = %client.name, "a replaced authorization ended: {}: {}", why.error, why.message);
            }
            if let Err(e) = self.store.commit(writes).await {
                tracing::error!(client = %client.name, "cannot record the authorization's end: {e}");
            }
            return;
        }
        match &result {
            Ok(()) => client.set_outcome(outcome(state, "done", None, None)),
            Err(AuthFailure { error, message }) => {
                tracing::warn!(client = %client.name, "authorization failed: {error}: {message}");
                client.set_outcome(outcome(
                    state,
                    "failed",
                    Some(error.clone()),
                    Some(message.clone()),
                ));
                let mut st = client.state();
                if st.status == Status::Authorizing {
                    st.status = if st.token.is_some() {
                        Status::NeedsReauth
                    } else {
                        Status::Unauthorized
                    };
                }
                writes.push(Write::Client(st.row(&client.name)));
                writes.push(event(
                    &client.name,
                    "authorization_failed",
                    &format!("{error}: {message}"),
                ));
            }
        }
        if let Err(e) = self.store.commit(writes).await {
            tracing::error!(client = %client.name, "cannot record the authorization's end: {e}");
        }
        self.schedule_from_state(client);
    }

    /// The latest authorization's outcome; with `wait`, waits up to that long while it is pending.
    pub async fn authorization(
        &self,
        name: &str,
        state: Option<&str>,
        wait: Duration,
    ) -> Result<AuthorizationOutcome, RegistryError> {
        let client = self.known(name)?;
        let mut rx = client.authorization().outcome.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let current = rx.borrow_and_update().clone();
            let Some(current) = current else {
                return Err(RegistryError::BadRequest(format!(
                    "no authorization was started for {name}"
                )));
            };
            if let Some(s) = state
                && s != current.state
            {
                return Ok(outcome(
                    s,
                    "failed",
                    Some("superseded".into()),
                    Some("another authorization replaced this one".into()),
                ));
            }
            if current.status != "pending" {
                return Ok(current);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Ok(current) },
                _ = tokio::time::sleep_until(deadline) => return Ok(current),
                _ = self.shutdown.cancelled() => return Err(RegistryError::ShuttingDown),
            }
        }
    }

    /// Forgets the client's tokens here only (`DELETE /v1/clients/{name}/token`).
    pub async fn forget_token(&self, name: &str) -> Result<(), RegistryError> {
        let client = self.known(name)?;
        let _flight = client.flight.lock().await;
        self.forget(&client, "forgotten", "tokens deleted on request")
            .await
    }

    /// Revokes the client's grant at the server, then forgets it here and clears its token
    /// files. When the server cannot revoke (no revocation in the profile, or it failed), the
    /// tokens are kept unless `local` says to forget them anyway.
    pub async fn revoke(&self, name: &str, local: bool) -> Result<RevokeReply, RegistryError> {
        let client = self.known(name)?;
        // The flight lock: a refresh in flight may be rotating the refresh token to revoke.
        let _flight = client.flight.lock().await;
        let cfg = client.config();
        let token = client.state().token.clone();
        let Some(token) = token else {
            return Ok(RevokeReply {
                client: name.to_string(),
                revoked_at_server: false,
                message: format!("{name} holds no tokens: nothing to revoke"),
            });
        };
        let attempt = if cfg.profile.revocation == Revocation::None
            || cfg.endpoints.revoke.is_none()
        {
            Err(format!(
                "provider {} offers no token revocation; remove the app's access in your account settings at the provider",
                cfg.provider
            ))
        } else {
            let mut permit = self.endpoint(&cfg).acquire(Urgency::Waiting).await;
            let result = permit.hold_while(self.engine.revoke(&cfg, &token)).await;
            drop(permit);
            result.map_err(|e| e.message)
        };
        match attempt {
            Ok(()) => {
                tracing::info!(client = %name, "revoked at the server");
                self.forget(&client, "revoked", "revoked at the server on request")
                    .await?;
                Ok(RevokeReply {
                    client: name.to_string(),
                    revoked_at_server: true,
                    message: format!(
                        "{name}: revoked at the server; tokens and token files deleted"
                    ),
                })
            }
            Err(why) if local => {
                tracing::warn!(client = %name, "not revoked at the server, forgetting locally as asked: {why}");
                self.forget(
                    &client,
                    "forgotten",
                    &format!("not revoked at the server ({why}); deleted locally on request"),
                )
                .await?;
                Ok(RevokeReply {
                    client: name.to_string(),
                    revoked_at_server: false,
                    message: format!(
                        "{name}: NOT revoked at the server ({why}); tokens and token files deleted here only"
                    ),
                })
            }
            Err(why) => Err(RegistryError::Server {
                client: name.to_string(),
                message: format!(
                    "not revoked: {why}; the tokens are kept (add --local to delete them here anyway)"
                ),
            }),
        }
    }

    /// Drops the client's tokens: store first, then timer, pending authorizations and files.
    /// The caller holds the flight lock.
    async fn forget(
        &self,
        client: &Arc<Client>,
        kind: &str,
        detail: &str,
    ) -> Result<(), RegistryError> {
        let name = &*client.name;
        let writes = {
            let mut st = client.state();
            st.token = None;
            st.status = Status::Revoked;
            st.reason = Some(format!(
                "{detail}: run `oauth2mci authorize {name}` to use it again"
            ));
            st.next_refresh_at = MaybeTime::NONE;
            st.failures = 0;
            vec![
                Write::Client(st.row(name)),
                Write::Token {
                    client: name.to_string(),
                    token: None,
                },
                event(name, kind, detail),
            ]
        };
        self.scheduler.remove(client.name.clone());
        self.store
            .commit(writes)
            .await
            .map_err(|e| RegistryError::Internal(e.to_string()))?;
        // A token that was held in memory only is gone on purpose.
        let was = client.state().mark_saved();
        self.counters.unsaved_changed(false, was);
        self.cancel_authorizations(client);
        self.clear_sinks(name, client.config().sinks.clone()).await;
        Ok(())
    }

    /// Ends every authorization waiting for this client (its tokens were just dropped on
    /// request: a code entered later must not bring them back).
    fn cancel_authorizations(&self, client: &Arc<Client>) {
        if let Some(reply) = self.end_authorizations(client, "", None) {
            client.set_outcome(outcome(
                &reply.state,
                "failed",
                Some("cancelled".into()),
                Some("the client's tokens were deleted on request; start again".into()),
            ));
        }
    }

    /// Ends the authorizations waiting for this client, except `keep`, and puts `next` in
    /// their place: device polling stops, redirect listeners close, and their saved rows are
    /// forgotten, each once. Returns the one that was waiting.
    fn end_authorizations(
        &self,
        client: &Client,
        keep: &str,
        next: Option<(AuthorizeReply, CancellationToken)>,
    ) -> Option<AuthorizeReply> {
        let before = std::mem::replace(&mut *client.pending(), next.map(Box::new)).map(|ended| {
            let (reply, cancel) = *ended;
            cancel.cancel();
            reply
        });
        let mut ended = self.redirects.cancel_client(&client.name, keep);
        if let Some(reply) = &before
            && reply.state != keep
            && !ended.contains(&reply.state)
        {
            ended.push(reply.state.clone());
        }
        self.forget_pending(ended);
        before
    }

    // ---------------------------------------------------------------------------------------
    // Views.

    pub fn info(&self, name: &str) -> Result<ClientInfo, RegistryError> {
        self.known(name).map(|c| info(&c))
    }

    pub fn list(&self) -> Vec<ClientInfo> {
        self.all().iter().map(|c| info(c)).collect()
    }

    /// As many clients as `list` gives, without building the list: health checks come often,
    /// and with 100,000 clients the list is tens of megabytes.
    pub fn count(&self) -> usize {
        self.clients.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What is wrong while the daemon serves on, for health: the database failing, tokens
    /// held in memory only. Cheap: health is asked often.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(why) = self.store.health().failing {
            problems.push(format!("the database's last write failed: {why}"));
        }
        let unsaved = self.counters.unsaved.load(Ordering::Relaxed);
        if unsaved > 0 {
            problems.push(format!(
                "{unsaved} client(s) hold their newest token in memory only (status unsaved)"
            ));
        }
        problems
    }
}

fn new_client(cfg: Arc<ClientConfig>, stored: Option<Stored>) -> Arc<Client> {
    let mut st = ClientState {
        status: Status::Unauthorized,
        token: None,
        generation: 0,
        // The stored one, or this configuration's.
        fingerprint: String::new(),
        reason: None,
        failures: 0,
        last_refresh_at: MaybeTime::NONE,
        last_error: None,
        next_refresh_at: MaybeTime::NONE,
        removed_at: MaybeTime::NONE,
        reauth_notified_at: MaybeTime::NONE,
        error_notified_at: MaybeTime::NONE,
        warned_for: MaybeTime::NONE,
        clock: MaybeTime::NONE,
        refresh_started_at: MaybeTime::NONE,
        interrupted_at: MaybeTime::NONE,
        unsaved: MaybeTime::NONE,
        server_wait_until: MaybeTime::NONE,
    };
    if let Some(s) = stored {
        st.fingerprint = s.row.fingerprint;
        st.warned_for = s.row.warned_for.into();
        st.refresh_started_at = s.row.refresh_started_at.into();
        st.interrupted_at = s.row.refresh_started_at.into();
        st.reason = s.row.reason;
        st.failures = s.row.failures;
        st.last_refresh_at = s.row.last_refresh_at.into();
        st.last_error = s.row.last_error;
        st.status = Status::parse(&s.row.status).unwrap_or(Status::Unauthorized);
        // Only the user can change these; being told once per incident is enough, even
        // across restarts.
        st.reauth_notified_at = matches!(st.status, Status::NeedsReauth).then(now_ms).into();
        if let Some((mut token, generation)) = s.token {
            if let Err(why) =
                crate::token::check_token_bytes(&token, cfg.profile.access_token_chars)
            {
                // Stored by a version that did not check, or written into the database by
                // hand: never served, and renewed at once where it can be.
                tracing::warn!(client = %cfg.name, "the stored token is not served: {why}");
                token.expires_at = Some(0);
            }
            st.token = Some(token);
            st.generation = generation;
        }
        st.status = restored_status(&st, &cfg);
        if st.token.is_some() && !cfg.has_fingerprint(&st.fingerprint) && cfg.grant.unattended() {
            st.status = Status::Unauthorized;
        } else if st.token.is_some() && !cfg.has_fingerprint(&st.fingerprint) {
            st.status = Status::NeedsReauth;
            st.reason = Some(IDENTITY_CHANGED.into());
        } else if st.token.is_some() && st.reason.as_deref() == Some(IDENTITY_CHANGED) {
            // The edit was undone while the daemon was stopped.
            st.status = Status::Valid;
            st.reason = None;
        }
    } else {
        st.fingerprint = cfg.fingerprint();
    }
    Arc::new(Client {
        name: cfg.name.clone(),
        config: RwLock::new(cfg),
        state: Mutex::new(st),
        flight: tokio::sync::Mutex::new(()),
        authorization: std::sync::OnceLock::new(),
        pending: Mutex::new(None),
    })
}

/// The status a client comes back with (start-up, back in the config): transient statuses
/// (refreshing, authorizing) do not survive a restart.
fn restored_status(st: &ClientState, cfg: &ClientConfig) -> Status {
    match (st.status, &st.token) {
        (Status::NeedsReauth | Status::Revoked, _) => st.status,
        (Status::Retrying, Some(_)) => Status::Retrying,
        (_, Some(_)) => Status::Valid,
        (Status::Retrying, None) if cfg.grant.unattended() => Status::Retrying,
        (_, None) => Status::Unauthorized,
    }
}

/// How urgent a client's scheduled refresh is: by its token's expiry (none yet: at once), and
/// after the healthy clients when its last attempts failed.
fn scheduled_urgency(st: &ClientState) -> Urgency {
    let expiry = match &st.token {
        None => 0,
        Some(t) => t.expires_at.unwrap_or(i64::MAX),
    };
    if st.status == Status::Retrying {
        Urgency::Retry(expiry)
    } else {
        Urgency::Due(expiry)
    }
}

/// Whether the daemon may hand out the client's current token.
fn servable(st: &ClientState, cfg: &ClientConfig) -> bool {
    st.token.is_some()
        && cfg.has_fingerprint(&st.fingerprint)
        && !matches!(st.status, Status::Revoked | Status::Disabled)
        && (st.status != Status::NeedsReauth || cfg.grant.unattended())
}

/// Whether the daemon can get the next token without the user.
fn can_renew(cfg: &ClientConfig, token: &TokenSet) -> bool {
    cfg.grant.unattended()
        || match cfg.profile.refresh_mechanism {
            RefreshMechanism::RefreshToken => token.refresh_token.is_some(),
            RefreshMechanism::FbExchangeToken => token.valid_for(now_ms(), Duration::ZERO),
            RefreshMechanism::None => false,
        }
}

/// When only the user can continue this client's grant, when known; a client that needs no
/// user has no such end.
fn grant_end(cfg: &ClientConfig, token: &TokenSet) -> Option<i64> {
    (!cfg.grant.unattended())
        .then(|| scheduler::grant_end(token, &cfg.profile, can_renew(cfg, token)))
        .flatten()
}

/// Whether the user was warned about this end already. A countdown sent again with each refresh
/// (LinkedIn) lands a little apart each time: the same end within the warning window.
fn warned(st: &ClientState, cfg: &ClientConfig, end: i64) -> bool {
    let window = cfg.refresh.warn_before.as_millis() as i64;
    st.warned_for
        .get()
        .is_some_and(|w| (w - end).abs() <= window)
}

/// Whether an incident told at `told_at` (if ever) is to be told now: the first time, and again
/// each `repeat` while it lasts.
fn time_to_tell(told_at: Option<i64>, repeat: Option<Duration>, now: i64) -> bool {
    match (told_at, repeat) {
        (None, _) => true,
        (Some(at), Some(every)) => now >= at + every.as_millis() as i64,
        (Some(_), None) => false,
    }
}

/// The status shown: a token that expired without a way to renew it needs the user.
fn effective_status(c: &Client) -> Status {
    let cfg = c.config();
    let st = c.state();
    if st.unsaved.get().is_some() {
        return Status::Unsaved;
    }
    match &st.token {
        Some(t)
            if st.status == Status::Valid
                && !can_renew(&cfg, t)
                && !t.valid_for(now_ms(), Duration::ZERO) =>
        {
            Status::NeedsReauth
        }
        _ => st.status,
    }
}

fn info(c: &Client) -> ClientInfo {
    let cfg = c.config();
    let status = effective_status(c);
    let st = c.state();
    let now = now_ms();
    let token = st.token.as_ref();
    ClientInfo {
        name: c.name.to_string(),
        provider: cfg.provider.to_string(),
        grant: cfg.grant.as_str().into(),
        status: status.as_str().into(),
        reason: st.reason.clone(),
        expires_at: token.and_then(|t| t.expires_at),
        expires_in: token
            .and_then(|t| t.remaining(now))
            .map(|ms| ms.div_euclid(1000)),
        has_refresh_token: token.is_some_and(|t| t.refresh_token.is_some()),
        grant_ends_at: token.and_then(|t| grant_end(&cfg, t)),
        last_refresh_at: st.last_refresh_at.get(),
        next_refresh_at: st.next_refresh_at.get(),
        last_error: st.last_error.clone(),
        failures: st.failures,
        scopes: cfg.scopes.to_vec(),
        sinks: cfg
            .sinks
            .iter()
            .map(|s| s.path.display().to_string())
            .collect(),
        pending_authorization: c.waiting(now).map(Box::new),
    }
}

fn event(client: &str, kind: &str, detail: &str) -> Write {
    Write::Event(Event {
        at: now_ms(),
        client: Some(client.to_string()),
        kind: kind.to_string(),
        detail: detail.to_string(),
    })
}

fn device_reply(state: &str, grant: &DeviceGrant) -> AuthorizeReply {
    AuthorizeReply {
        method: "device".into(),
        url: grant
            .verification_uri_complete
            .clone()
            .unwrap_or_else(|| grant.verification_uri.clone()),
        state: state.to_string(),
        redirect_uri: None,
        user_code: Some(grant.user_code.clone()),
        verification_uri: Some(grant.verification_uri.clone()),
        expires_at: grant.expires_at,
    }
}

fn outcome(
    state: &str,
    status: &str,
    error: Option<String>,
    message: Option<String>,
) -> AuthorizationOutcome {
    AuthorizationOutcome {
        state: state.to_string(),
        status: status.to_string(),
        error,
        message,
    }
}

/// The issuer an RFC 9207 `iss` must name: the profile's, else the authorization server that
/// the user was sent to.
fn expected_issuer(cfg: &ClientConfig) -> Option<String> {
    cfg.profile.issuer.clone().or_else(|| {
        cfg.endpoints
            .authorize
            .as_ref()
            .map(|u| u.origin().ascii_serialization())
    })
}

fn trim_slash(s: &str) -> &str {
    s.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maybe_time_is_half_an_optional_one_and_reads_back() {
        assert_eq!(std::mem::size_of::<MaybeTime>(), 8);
        for at in [None, Some(0), Some(-5), Some(1_764_460_800_000)] {
            assert_eq!(MaybeTime::from(at).get(), at);
        }
        // A stored row can hold anything: the one value taken for none reads as none.
        assert_eq!(MaybeTime::from(Some(i64::MIN)).get(), None);
    }

    /// The size of what `make` would return, without calling it.
    fn future_size<'a, F: std::future::Future + 'a>(
        _make: impl FnOnce(&'a Registry, &'a Arc<Client>) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_waiting_refresh_is_small() {
        // Every client due at once waits in its endpoint's queue as one of these: 808 bytes
        // with the request and what follows it boxed, 2,192 before the queue came and more
        // after (100,000 of them, 300 MB more after a wave).
        let size = future_size(|r, c| r.refresh_now(c, Trigger::Scheduled));
        assert!(size < 1024, "a refresh's future takes {size} bytes");
    }

    #[test]
    fn an_incident_is_told_once_then_at_each_repeat() {
        let day = Some(Duration::from_secs(86_400));
        assert!(time_to_tell(None, day, 0));
        assert!(!time_to_tell(Some(1_000), day, 1_000 + 86_399_999));
        assert!(time_to_tell(Some(1_000), day, 1_000 + 86_400_000));
        // `repeat: never`: once.
        assert!(time_to_tell(None, None, 0));
        assert!(!time_to_tell(Some(0), None, i64::MAX / 2));
    }
}
