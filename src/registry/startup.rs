//! Start-up: the clients built from the configuration and what the store held, the timers
//! started, and the authorizations that were waiting for the user resumed.

use super::authorize::{device_reply, outcome};
use super::machine::*;
use super::{Client, Registry, Trigger};
use crate::config::{ClientConfig, Config};
use crate::counters::Counters;
use crate::oauth::device::DeviceGrant;
use crate::oauth::redirect::{Arrival, Hub, PendingAuth};
use crate::oauth::{self, Engine, Pkce};
use crate::scheduler::{ClockEvent, Scheduler};
use crate::store::{PendingRow, Snapshot, Store, Stored, Write};
use crate::token::now_ms;
use crate::wire::AuthorizeReply;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

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
    pub(super) fn finish_arrivals(self: &Arc<Self>, mut arrivals: UnboundedReceiver<Arrival>) {
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

    pub(super) fn restore(&self, config: &Config, mut stored: Vec<Stored>) {
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
    pub(super) fn resume_authorizations(self: &Arc<Self>, pending: Vec<PendingRow>) {
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

    pub(super) fn resume_browser(
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
    pub(super) fn forget_pending(&self, states: Vec<String>) {
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
}

pub(super) fn new_client(cfg: Arc<ClientConfig>, stored: Option<Stored>) -> Arc<Client> {
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
