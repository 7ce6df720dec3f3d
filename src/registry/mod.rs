//! The registry: every client's live state, and the one place that changes it.
//!
//! Each client keeps its state behind a std mutex that is never held across an await, and a
//! single-flight lock: only one grant request per client is ever in flight, and whoever arrives
//! while one runs waits for it and takes its result. Every change is committed to the store before
//! it shows in memory, and a token reaches its sinks only after that.

use crate::config::{ClientConfig, Config};
use crate::counters::Counters;
use crate::oauth::Engine;
use crate::oauth::queue::Endpoint;
use crate::oauth::redirect::Hub;
use crate::scheduler::Scheduler;
use crate::store::{Event, Store, Write};
use crate::token::{TokenSet, now_ms};
use crate::wire::{self, AuthorizationOutcome, AuthorizeReply, ClientInfo};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod authorize;
mod machine;
mod outputs;
mod refresh;
mod reload;
mod revoke;
mod schedule;
mod startup;

pub use machine::Status;
use machine::*;

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

    // ---------------------------------------------------------------------------------------
    // Tokens.

    // ---------------------------------------------------------------------------------------
    // Authorization (authorization code grant with a loopback redirect).

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
