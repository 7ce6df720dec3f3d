//! Revoking a grant at the server and forgetting tokens here, with the authorizations that
//! were waiting.

use super::authorize::outcome;
use super::machine::*;
use super::{Client, Registry, RegistryError, event};
use crate::oauth::queue::Urgency;
use crate::provider::Revocation;
use crate::store::Write;
use crate::wire::{AuthorizeReply, RevokeReply};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Registry {
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
    pub(super) async fn forget(
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
    pub(super) fn cancel_authorizations(&self, client: &Arc<Client>) {
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
    pub(super) fn end_authorizations(
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
}
