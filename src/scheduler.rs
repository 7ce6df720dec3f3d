//! The scheduler: when each client's token is next refreshed, and the one timer structure that
//! fires those moments for every client.
//!
//! The math (`next_refresh`, `retry_delay`) is pure and takes the time as an argument, so it is
//! tested with any clock. The driver is one task holding an ordered set of deadlines: idle, it
//! sleeps until the earliest one, whatever the number of clients; nothing polls per client.
//! Deadlines are wall-clock milliseconds, and no sleep lasts longer than `MAX_SLEEP`, so a
//! machine that was suspended past a deadline fires it soon after waking up.

use crate::config::{BeforeExpiry, RefreshPolicy};
use crate::provider::{Profile, RefreshMechanism};
use crate::token::TokenSet;
use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Never refresh sooner than this after a token was obtained, so that a provider issuing
/// one-second tokens cannot drive a refresh storm.
pub const MIN_REFRESH_SPACING: Duration = Duration::from_secs(1);

/// The longest the driver sleeps before looking at the wall clock again. Monotonic timers stop
/// while the machine is suspended; this bounds how late a refresh can be after a resume.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);

/// When to refresh `token`, obtained at `token.obtained_at`; `None`: never by time.
///
/// The margin before expiry is the policy's (`before_expiry`, at least `min_before_expiry`), but
/// never more than half the lifetime: a token that lives 10 s is refreshed after about 5 s, not
/// immediately and again and again. Jitter only moves a refresh earlier, never past expiry.
/// A token refreshed only by inactivity rules (`at_least`, the profile's refresh-token idle
/// lifetime) is renewed before those run out. A token that cannot be renewed is looked at again
/// when it expires, so that the user hears of it then.
pub fn next_refresh(
    token: &TokenSet,
    policy: &RefreshPolicy,
    profile: &Profile,
    can_renew: bool,
    jitter_draw: f64,
) -> Option<i64> {
    if !can_renew {
        return token.expires_at;
    }
    let obtained = token.obtained_at;
    let earliest = obtained + MIN_REFRESH_SPACING.as_millis() as i64;
    let idle = profile
        .refresh_token_idle_lifetime
        .filter(|_| profile.refresh_mechanism == RefreshMechanism::RefreshToken)
        .map(|d| d.0.mul_f64(0.9));
    let by_inactivity = [policy.at_least, idle]
        .into_iter()
        .flatten()
        .min()
        .map(|d| obtained + d.as_millis() as i64);
    let Some(lifetime) = token.lifetime() else {
        return by_inactivity;
    };
    let lifetime = lifetime.max(0);
    let margin = match policy.before_expiry {
        BeforeExpiry::Share(p) => (lifetime as f64 * p.fraction()) as i64,
        BeforeExpiry::Fixed(d) => d.as_millis() as i64,
    };
    let margin = margin
        .max(policy.min_before_expiry.as_millis() as i64)
        .min(lifetime / 2);
    let jitter = (lifetime as f64 * policy.jitter * jitter_draw.clamp(0.0, 1.0)) as i64;
    let mut at = obtained + lifetime - margin - jitter.min(lifetime / 4);
    if let Some(within) = profile.reissue_within {
        // Earlier than this the server hands back the same token (Strava).
        at = at.max(obtained + lifetime - within.0.as_millis() as i64);
    }
    let at = at.max(earliest);
    Some(by_inactivity.map_or(at, |i| i.min(at)))
}

/// When the grant behind `token` ends for sure, so that only the user can continue: the refresh
/// token's known expiry (the server's word, or the profile's absolute lifetime counted from the
/// authorization), or, for a token that cannot be renewed, its own expiry.
///
/// The server's word counts once a refresh has shown that it does not move: many servers send
/// an idle timeout there (Keycloak's SSO idle, Intuit's rolling 100 days) that each refresh
/// pushes back, and warning about those would cry wolf after every authorization.
pub fn grant_end(token: &TokenSet, profile: &Profile, can_renew: bool) -> Option<i64> {
    if !can_renew {
        return token.expires_at;
    }
    if profile.refresh_mechanism != RefreshMechanism::RefreshToken {
        return None;
    }
    let by_profile = profile
        .refresh_token_max_lifetime
        .map(|d| token.granted_at.saturating_add(d.0.as_millis() as i64));
    let by_server = token
        .refresh_expires_at
        .filter(|_| !token.refresh_expiry_slides && token.obtained_at > token.granted_at);
    [by_server, by_profile].into_iter().flatten().min()
}

/// How long to wait before retry number `failures` (1 for the first): exponential from
/// `retry_initial`, capped at `retry_max`, drawn from the upper half of that span so that clients
/// failing together do not retry together. A server's Retry-After is a floor.
pub fn retry_delay(
    policy: &RefreshPolicy,
    failures: u32,
    retry_after: Option<Duration>,
    jitter_draw: f64,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let full = policy
        .retry_initial
        .saturating_mul(1u32 << exp.min(20))
        .min(policy.retry_max);
    let jittered = full.mul_f64(0.5 + 0.5 * jitter_draw.clamp(0.0, 1.0));
    let floor = retry_after
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(24 * 3600));
    jittered.max(floor)
}

/// A uniform draw in [0, 1) for the functions above.
pub fn draw() -> f64 {
    rand::rng().random::<f64>()
}

/// Deadlines of every client, ordered. Replacing or removing a deadline is O(log n).
#[derive(Default)]
pub struct Timers {
    order: BTreeSet<(i64, Arc<str>)>,
    by_name: HashMap<Arc<str>, i64>,
}

impl Timers {
    pub fn set(&mut self, name: Arc<str>, at: i64) {
        if let Some(old) = self.by_name.insert(name.clone(), at) {
            self.order.remove(&(old, name.clone()));
        }
        self.order.insert((at, name));
    }

    pub fn remove(&mut self, name: &str) {
        if let Some((name, at)) = self.by_name.remove_entry(name) {
            self.order.remove(&(at, name));
        }
    }

    pub fn next_deadline(&self) -> Option<i64> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Removes and returns the clients whose deadline is at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: i64) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.order.first() {
            if *at > now {
                break;
            }
            if let Some((_, name)) = self.order.pop_first() {
                self.by_name.remove(&name);
                due.push(name);
            }
        }
        due
    }

    pub fn get(&self, name: &str) -> Option<i64> {
        self.by_name.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

enum Command {
    Set(Arc<str>, i64),
    Remove(Arc<str>),
}

/// Tells the driver about deadlines; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Command>,
}

impl Scheduler {
    /// Starts the driver: `fire` is called with each client whose deadline has come.
    pub fn start(
        fire: impl Fn(Arc<str>) + Send + 'static,
        now: impl Fn() -> i64 + Send + 'static,
        shutdown: CancellationToken,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(rx, fire, now, shutdown));
        (Scheduler { tx }, task)
    }

    pub fn set(&self, name: Arc<str>, at: i64) {
        // The driver only stops at shutdown, when deadlines no longer matter.
        let _ = self.tx.send(Command::Set(name, at));
    }

    pub fn remove(&self, name: Arc<str>) {
        let _ = self.tx.send(Command::Remove(name));
    }
}

async fn drive(
    mut rx: mpsc::UnboundedReceiver<Command>,
    fire: impl Fn(Arc<str>),
    now: impl Fn() -> i64,
    shutdown: CancellationToken,
) {
    let mut timers = Timers::default();
    loop {
        let sleep = match timers.next_deadline() {
            Some(at) => Duration::from_millis((at - now()).max(0) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            cmd = rx.recv() => match cmd {
                Some(Command::Set(name, at)) => timers.set(name, at),
                Some(Command::Remove(name)) => timers.remove(&name),
                None => return,
            },
            _ = tokio::time::sleep(sleep) => {
                for name in timers.pop_due(now()) {
                    fire(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::Percent;
    use crate::secret::Secret;

    fn policy() -> RefreshPolicy {
        RefreshPolicy {
            before_expiry: BeforeExpiry::Share(Percent(10.0)),
            min_before_expiry: Duration::from_secs(60),
            at_least: Some(Duration::from_secs(86400)),
            jitter: 0.05,
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(900),
            warn_before: Duration::from_secs(3 * 86400),
        }
    }

    fn profile(layer: &str) -> Profile {
        let spec =
            crate::provider::ProfileSpec::Layer(Box::new(serde_yaml::from_str(layer).unwrap()));
        crate::provider::resolve(&spec).unwrap().1
    }

    fn generic() -> Profile {
        profile("description: test")
    }

    fn token(obtained_at: i64, lifetime_s: Option<i64>) -> TokenSet {
        TokenSet {
            access_token: Secret::new("a"),
            token_type: "Bearer".into(),
            refresh_token: Some(Secret::new("r")),
            id_token: None,
            scope: None,
            expires_at: lifetime_s.map(|s| obtained_at + s * 1000),
            refresh_expires_at: None,
            obtained_at,
            granted_at: 0,
            extra: Default::default(),
            refresh_expiry_slides: false,
        }
    }

    #[test]
    fn an_hour_token_is_refreshed_six_minutes_early_minus_jitter() {
        let t = token(0, Some(3600));
        assert_eq!(
            next_refresh(&t, &policy(), &generic(), true, 0.0),
            Some(3_240_000)
        );
        let jittered = next_refresh(&t, &policy(), &generic(), true, 1.0).unwrap();
        assert_eq!(jittered, 3_240_000 - 180_000);
    }

    #[test]
    fn short_tokens_refresh_at_half_life_not_in_a_storm() {
        // min_before_expiry (60 s) exceeds the lifetime: the margin is capped at half of it.
        let t = token(0, Some(10));
        let at = next_refresh(&t, &policy(), &generic(), true, 0.0).unwrap();
        assert_eq!(at, 5_000);
        // Even a token that is already expired is not refreshed sooner than the spacing.
        let t = token(0, Some(0));
        assert_eq!(
            next_refresh(&t, &policy(), &generic(), true, 0.0),
            Some(1_000)
        );
    }

    #[test]
    fn tokens_without_expiry_follow_at_least() {
        let t = token(0, None);
        assert_eq!(
            next_refresh(&t, &policy(), &generic(), true, 0.5),
            Some(86_400_000)
        );
        let mut p = policy();
        p.at_least = None;
        assert_eq!(next_refresh(&t, &p, &generic(), true, 0.5), None);
        // One that cannot be renewed is looked at when it expires, to tell the user.
        assert_eq!(
            next_refresh(&token(0, Some(60)), &policy(), &generic(), false, 0.0),
            Some(60_000)
        );
    }

    #[test]
    fn long_tokens_are_refreshed_at_least_daily() {
        let t = token(0, Some(90 * 86400));
        assert_eq!(
            next_refresh(&t, &policy(), &generic(), true, 0.0),
            Some(86_400_000)
        );
    }

    #[test]
    fn a_server_that_reissues_late_is_not_asked_early() {
        // Strava: 6 h tokens, a new one only within the last hour.
        let strava = profile("reissue_within: 1h");
        let mut p = policy();
        p.before_expiry = BeforeExpiry::Share(Percent(50.0));
        let t = token(0, Some(6 * 3600));
        assert_eq!(
            next_refresh(&t, &p, &generic(), true, 0.0),
            Some(3 * 3_600_000)
        );
        assert_eq!(
            next_refresh(&t, &p, &strava, true, 0.0),
            Some(5 * 3_600_000)
        );
    }

    #[test]
    fn idle_lifetimes_are_beaten_by_a_refresh() {
        let mut p = policy();
        p.at_least = None;
        let idle = profile("refresh_token_idle_lifetime: 10d");
        let t = token(0, None);
        assert_eq!(next_refresh(&t, &p, &generic(), true, 0.0), None);
        assert_eq!(next_refresh(&t, &p, &idle, true, 0.0), Some(9 * 86_400_000));
    }

    #[test]
    fn a_grant_ends_at_the_earliest_known_limit() {
        let g = generic();
        let mut t = token(5_000, Some(3600));
        assert_eq!(grant_end(&t, &g, true), None);
        t.refresh_expires_at = Some(100 * 86_400_000);
        assert_eq!(grant_end(&t, &g, true), Some(100 * 86_400_000));
        // Not before a refresh showed it fixed, and not once a refresh moved it.
        t.granted_at = t.obtained_at;
        assert_eq!(grant_end(&t, &g, true), None);
        t.granted_at = 0;
        t.refresh_expiry_slides = true;
        assert_eq!(grant_end(&t, &g, true), None);
        t.refresh_expiry_slides = false;
        let linkedin = profile("refresh_token_max_lifetime: 365d");
        t.refresh_expires_at = None;
        t.granted_at = 1_000;
        assert_eq!(
            grant_end(&t, &linkedin, true),
            Some(1_000 + 365 * 86_400_000)
        );
        // Without a way to renew, the access token's own end is the grant's.
        assert_eq!(grant_end(&t, &linkedin, false), t.expires_at);
    }

    #[test]
    fn retries_back_off_exponentially_with_a_cap_and_honour_retry_after() {
        let p = policy();
        assert_eq!(retry_delay(&p, 1, None, 1.0), Duration::from_secs(5));
        assert_eq!(retry_delay(&p, 1, None, 0.0), Duration::from_millis(2500));
        assert_eq!(retry_delay(&p, 4, None, 1.0), Duration::from_secs(40));
        assert_eq!(retry_delay(&p, 40, None, 1.0), Duration::from_secs(900));
        assert_eq!(
            retry_delay(&p, 1, Some(Duration::from_secs(120)), 1.0),
            Duration::from_secs(120)
        );
    }

    #[test]
    fn timers_keep_one_deadline_per_client_in_order() {
        let mut t = Timers::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        t.set(a.clone(), 50);
        t.set(b.clone(), 20);
        t.set(a.clone(), 10);
        assert_eq!(t.len(), 2);
        assert_eq!(t.next_deadline(), Some(10));
        assert_eq!(t.pop_due(20), vec![a.clone(), b.clone()]);
        assert!(t.is_empty());
        t.set(a.clone(), 5);
        t.remove("a");
        assert_eq!(t.pop_due(100), Vec::<Arc<str>>::new());
    }

    #[tokio::test]
    async fn the_driver_fires_due_clients() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let (s, task) = Scheduler::start(
            move |n| drop(tx.send(n)),
            crate::token::now_ms,
            shutdown.clone(),
        );
        let now = crate::token::now_ms();
        s.set("late".into(), now + 200);
        s.set("soon".into(), now + 20);
        s.set("gone".into(), now + 10);
        s.remove("gone".into());
        assert_eq!(&*rx.recv().await.unwrap(), "soon");
        assert_eq!(&*rx.recv().await.unwrap(), "late");
        shutdown.cancel();
        task.await.unwrap();
    }
}
