//! A client's state and what each fact does to it: a new token, a failure, a removal, an
//! identity change, an authorization's end. Plain data and pure functions: no locks, no I/O, no
//! clock reads (every time is an argument), so that each rule is tested on its own.

use crate::config::ClientConfig;
use crate::oauth::queue::Urgency;
use crate::provider::RefreshMechanism;
use crate::scheduler;
use crate::store::ClientRow;
use crate::token::{TokenSet, now_ms};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The reason given when a config edit made a client's tokens stale; undoing the edit undoes it.
pub(super) const IDENTITY_CHANGED: &str =
    "client_id, token URL, scopes or grant changed: its tokens were issued for another identity";

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

    pub(super) fn parse(s: &str) -> Option<Status> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// Whether the client holds a grant the daemon may use without the user.
    pub(super) fn has_grant(self) -> bool {
        matches!(self, Status::Valid | Status::Refreshing | Status::Retrying)
    }
}

/// An optional time (or clock reading) in milliseconds, in 8 bytes where `Option<i64>` takes
/// 16: a client's state holds nine, which with 100,000 clients is 7 MB. `i64::MIN` stands for
/// none; no time or clock shift reads it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct MaybeTime(i64);

impl MaybeTime {
    pub(super) const NONE: MaybeTime = MaybeTime(i64::MIN);

    pub(super) fn some(at: i64) -> MaybeTime {
        debug_assert!(at != i64::MIN);
        MaybeTime(at)
    }

    pub(super) fn get(self) -> Option<i64> {
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
pub(super) struct ClientState {
    pub(super) status: Status,
    pub(super) token: Option<TokenSet>,
    /// Counts tokens stored for this client; a refresh that sees it move knows another finished.
    pub(super) generation: i64,
    /// Fingerprint of the configuration the token was issued under.
    pub(super) fingerprint: String,
    pub(super) reason: Option<String>,
    pub(super) failures: u32,
    pub(super) last_refresh_at: MaybeTime,
    pub(super) last_error: Option<String>,
    pub(super) next_refresh_at: MaybeTime,
    pub(super) removed_at: MaybeTime,
    /// When the user was told that only they can help; not again until the client recovers,
    /// or `notify.repeat` has passed.
    pub(super) reauth_notified_at: MaybeTime,
    /// When the user was told that refreshes keep failing.
    pub(super) error_notified_at: MaybeTime,
    /// The grant end (a refresh token's known expiry) the user was warned about.
    pub(super) warned_for: MaybeTime,
    /// The clock (`Registry::clock_shift`) this state's times were read on; `None` for what
    /// was read from the store at start.
    pub(super) clock: MaybeTime,
    /// The refresh intent: a request that may rotate the refresh token went out then, and
    /// its outcome is not saved yet. Stored before the request, cleared with the outcome.
    pub(super) refresh_started_at: MaybeTime,
    /// The intent found at start: the daemon stopped while that refresh was out. If the next
    /// refresh meets `invalid_grant`, the server had answered and its new refresh token was
    /// lost with the process; the user is told exactly that.
    pub(super) interrupted_at: MaybeTime,
    /// Since when the newest token is in memory only: the database refused it. No refresh
    /// that would replace its refresh token is sent until it is saved.
    pub(super) unsaved: MaybeTime,
    /// Until when the server asked to be left alone (Retry-After of the last failure): no
    /// refresh is sent before, whoever asks.
    pub(super) server_wait_until: MaybeTime,
}

impl ClientState {
    /// What storing a new token does to a client: valid, failures and reasons cleared, and the
    /// user may be told again at the next incident.
    pub(super) fn take_token(
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
    pub(super) fn mark_unsaved(&mut self, now: i64) -> bool {
        let new = self.unsaved.get().is_none();
        if new {
            self.unsaved = MaybeTime::some(now);
        }
        new
    }

    /// Notes that everything is saved; whether something was not.
    pub(super) fn mark_saved(&mut self) -> bool {
        let was = self.unsaved.get().is_some();
        self.unsaved = MaybeTime::NONE;
        was
    }

    pub(super) fn row(&self, name: &str) -> ClientRow {
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

/// The status a client comes back with (start-up, back in the config): transient statuses
/// (refreshing, authorizing) do not survive a restart.
pub(super) fn restored_status(st: &ClientState, cfg: &ClientConfig) -> Status {
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
pub(super) fn scheduled_urgency(st: &ClientState) -> Urgency {
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
pub(super) fn servable(st: &ClientState, cfg: &ClientConfig) -> bool {
    st.token.is_some()
        && cfg.has_fingerprint(&st.fingerprint)
        && !matches!(st.status, Status::Revoked | Status::Disabled)
        && (st.status != Status::NeedsReauth || cfg.grant.unattended())
}

/// Whether the daemon can get the next token without the user.
pub(super) fn can_renew(cfg: &ClientConfig, token: &TokenSet) -> bool {
    cfg.grant.unattended()
        || match cfg.profile.refresh_mechanism {
            RefreshMechanism::RefreshToken => token.refresh_token.is_some(),
            RefreshMechanism::FbExchangeToken => token.valid_for(now_ms(), Duration::ZERO),
            RefreshMechanism::None => false,
        }
}

/// When only the user can continue this client's grant, when known; a client that needs no
/// user has no such end.
pub(super) fn grant_end(cfg: &ClientConfig, token: &TokenSet) -> Option<i64> {
    (!cfg.grant.unattended())
        .then(|| scheduler::grant_end(token, &cfg.profile, can_renew(cfg, token)))
        .flatten()
}

/// Whether the user was warned about this end already. A countdown sent again with each refresh
/// (LinkedIn) lands a little apart each time: the same end within the warning window.
pub(super) fn warned(st: &ClientState, cfg: &ClientConfig, end: i64) -> bool {
    let window = cfg.refresh.warn_before.as_millis() as i64;
    st.warned_for
        .get()
        .is_some_and(|w| (w - end).abs() <= window)
}

/// Whether an incident told at `told_at` (if ever) is to be told now: the first time, and again
/// each `repeat` while it lasts.
pub(super) fn time_to_tell(told_at: Option<i64>, repeat: Option<Duration>, now: i64) -> bool {
    match (told_at, repeat) {
        (None, _) => true,
        (Some(at), Some(every)) => now >= at + every.as_millis() as i64,
        (Some(_), None) => false,
    }
}
