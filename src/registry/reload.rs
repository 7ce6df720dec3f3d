//! A new configuration applied while the daemon runs: clients added, removed (kept disabled),
//! changed (an identity change stales the tokens), their token files moved.

use super::machine::*;
use super::startup::new_client;
use super::{Registry, Trigger, event};
use crate::config::{Config, SinkConfig};
use crate::store::{Stored, Write};
use crate::token::now_ms;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

impl Registry {
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
}
