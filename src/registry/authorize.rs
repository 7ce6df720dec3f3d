//! Authorizing with the user: a browser and its loopback redirect, or a device code, started,
//! resumed, finished, failed or replaced.

use super::machine::*;
use super::{Client, Method, Registry, RegistryError, event};
use crate::config::{ClientConfig, Grant};
use crate::oauth::device::{self, DeviceGrant};
use crate::oauth::queue::Urgency;
use crate::oauth::redirect::{self, Callback, PendingAuth};
use crate::oauth::{self, Pkce};
use crate::secret::Secret;
use crate::store::{PendingRow, Write};
use crate::token::{TokenSet, now_ms};
use crate::wire::{AuthFailure, AuthorizationOutcome, AuthorizeReply};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Registry {
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
    pub(super) async fn start_authorization(
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
    pub(super) fn start_browser(
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
    pub(super) async fn start_device(
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
    pub(super) fn poll_device(
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

    pub(super) async fn take_device_token(
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

    pub(super) fn expire_later(
        self: &Arc<Self>,
        client: &Arc<Client>,
        state: &str,
        expires_at: i64,
    ) {
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
    pub(super) async fn complete_authorization(
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

    pub(super) async fn exchange(
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
    pub(super) async fn fail_authorization(&self, pending: &PendingAuth, why: AuthFailure) {
        if let Some(client) = self.client(&pending.client) {
            self.finish_authorization(&client, &pending.state, Err(why))
                .await;
        }
    }

    pub(super) async fn finish_authorization(
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
}

/// An authorization started, before it is saved: what the user is told, what is stored, how
/// to stop it, and a device grant to poll.
pub(super) struct Started {
    reply: AuthorizeReply,
    row: PendingRow,
    cancel: CancellationToken,
    device: Option<DeviceGrant>,
}

pub(super) fn device_reply(state: &str, grant: &DeviceGrant) -> AuthorizeReply {
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

pub(super) fn outcome(
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
pub(super) fn expected_issuer(cfg: &ClientConfig) -> Option<String> {
    cfg.profile.issuer.clone().or_else(|| {
        cfg.endpoints
            .authorize
            .as_ref()
            .map(|u| u.origin().ascii_serialization())
    })
}

pub(super) fn trim_slash(s: &str) -> &str {
    s.trim_end_matches('/')
}
