//! What leaves the registry besides the store: notices to hooks, and token files.

use super::{Client, Registry};
use crate::config::{ClientConfig, SinkConfig};
use crate::notify::{self, Kind, Notice};
use crate::sink;
use crate::token::TokenSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Registry {
    /// A notice about `cfg`'s client, with the fields every event carries.
    pub(super) fn notice(&self, kind: Kind, cfg: &ClientConfig, message: &str) -> Notice {
        let mut n = Notice::new(kind, &cfg.name, message);
        n.provider = cfg.provider.to_string();
        n
    }

    /// Runs the hook for `notice`. A re-authorization notice first gets an authorization
    /// started (or the one waiting), so that it can say where to go.
    pub(super) fn tell(&self, client: &Arc<Client>, notice: Notice) {
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

    /// Writes the client's token files, noting a failure as its last error until a later write
    /// of every file succeeds.
    pub(super) async fn write_sinks(&self, name: &str, sinks: Vec<SinkConfig>, token: TokenSet) {
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

    pub(super) async fn clear_sinks(&self, name: &str, sinks: Vec<SinkConfig>) {
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
}

/// How a failure to write a token file starts as a client's last error, so that a later
/// complete write knows the error it clears is its own.
pub(super) const SINK_ERROR: &str = "cannot write a token file: ";
