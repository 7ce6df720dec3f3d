//! Each client's one timer: the next refresh or retry, a reminder, a warning before the
//! grant ends, and the wall clock being set.

use super::machine::*;
use super::{Client, Registry, event};
use crate::notify::Kind;
use crate::scheduler;
use crate::store::{Event, Write};
use crate::token::now_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Registry {
    /// Sets the client's timer from its state: the next refresh, a retry, or nothing.
    ///
    /// The timer also wakes the client for a warning due before its grant ends, which is not a
    /// refresh: `next_refresh_at` keeps the refresh time alone.
    pub(super) fn schedule_from_state(&self, client: &Client) {
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
    pub(super) async fn warn_if_grant_ends_soon(&self, client: &Arc<Client>) {
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
    pub(super) async fn clock_jumped(&self) {
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

    /// Sets the client's timer to try saving its token again: sooner at first, then half as
    /// long as it has been unsaved, within the client's retry bounds.
    pub(super) fn retry_save_later(&self, client: &Client, now: i64) {
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

    /// Reminds the user, at `notify.repeat`, that a client still needs them.
    pub(super) async fn remind_if_due(&self, client: &Arc<Client>) {
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
}
