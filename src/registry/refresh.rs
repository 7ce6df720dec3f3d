//! Refreshing a token: the single flight, the endpoint's queue, the intent recorded before a
//! rotating request, the new token stored before it is served, and failures with their backoff.

use super::machine::*;
use super::{Client, Registry, RegistryError, Trigger, event};
use crate::config::{ClientConfig, Grant};
use crate::notify::Kind;
use crate::oauth::queue::{Endpoint, Urgency};
use crate::oauth::{ErrorClass, GrantError};
use crate::provider::{RefreshMechanism, Rotation};
use crate::scheduler;
use crate::store::Write;
use crate::token::{TokenSet, now_ms};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Registry {
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

    pub(super) async fn refresh_now(
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
    pub(super) fn cannot_refresh(
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
    pub(super) fn endpoint(&self, cfg: &ClientConfig) -> Arc<Endpoint> {
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
    pub(super) async fn accept(
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

    /// Saves a token held in memory only, then writes its token files; on failure, tries
    /// again later.
    pub(super) async fn save_unsaved(&self, client: &Arc<Client>) {
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

    pub(super) async fn refresh_failed(
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
}
