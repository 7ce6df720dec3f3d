//! The scheduler: when each client's token is next refreshed, and the one timer structure that
//! fires those moments for every client.
//!
//! The math (`next_refresh`, `retry_delay`) is pure and takes the time as an argument, so it is
//! tested with any clock. The driver is one task holding an ordered set of deadlines: idle, it
//! sleeps until the earliest one, whatever the number of clients; nothing polls per client.
//!
//! Deadlines are wall-clock milliseconds, and time is not always kind to them:
//! - A suspended machine: tokio's monotonic timers stop during suspend, so the driver also
//!   arms a wall-clock alarm (a `CLOCK_REALTIME` timerfd) at the earliest deadline. It goes off
//!   on resume when the deadline passed during the sleep. No sleep lasts longer than `MAX_SLEEP`
//!   either, in case the alarm cannot be had.
//! - A wall clock that is set (NTP's first sync on a machine with a wrong RTC, an admin's
//!   `date -s`): the driver compares the wall clock with `CLOCK_BOOTTIME`, which counts suspend
//!   but is never set. When they drift apart by more than `JUMP_THRESHOLD`, every deadline moves
//!   by the jump and the caller is told, so that token times move too: a forward jump does not
//!   make every token look expired at once (a refresh storm), and a backward jump does not
//!   put refreshes off by as much (a missed refresh). The alarm's `TFD_TIMER_CANCEL_ON_SET`
//!   wakes the driver as soon as the clock is set.

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
/// while the machine is suspended; this bounds how late a refresh can be after a resume, should
/// the wall-clock alarm be unavailable.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Where the wall-clock alarm is set while no deadline is: 2200-01-01, far but fixed, so that
/// it is not set again at each wake-up.
const IDLE_ALARM_AT: i64 = 7_258_118_400_000;

/// A wall clock that moved this much against the boot clock between two looks was set. NTP
/// slews far less than this (at most 0.5 ms a second).
pub const JUMP_THRESHOLD: Duration = Duration::from_secs(2);

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

    /// Moves every deadline by `delta` milliseconds (the wall clock was set).
    pub fn shift(&mut self, delta: i64) {
        let moved: Vec<(i64, Arc<str>)> = std::mem::take(&mut self.order)
            .into_iter()
            .map(|(at, name)| (at.saturating_add(delta), name))
            .collect();
        for (at, name) in moved {
            self.by_name.insert(name.clone(), at);
            self.order.insert((at, name));
        }
    }
}

/// The clocks the driver reads.
pub trait Clock: Send + 'static {
    /// The wall clock, Unix milliseconds: what deadlines are written in.
    fn wall_ms(&self) -> i64;
    /// A clock that counts suspended time but is never set (milliseconds, any origin).
    fn boot_ms(&self) -> i64;
    /// A clock that stops while the machine is suspended and is never set.
    fn mono_ms(&self) -> i64;
}

/// The machine's clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> i64 {
        crate::token::now_ms()
    }

    fn boot_ms(&self) -> i64 {
        clock_ms(nix::time::ClockId::CLOCK_BOOTTIME)
    }

    fn mono_ms(&self) -> i64 {
        clock_ms(nix::time::ClockId::CLOCK_MONOTONIC)
    }
}

fn clock_ms(id: nix::time::ClockId) -> i64 {
    nix::time::clock_gettime(id)
        .map(|t| t.tv_sec() * 1000 + t.tv_nsec() / 1_000_000)
        .unwrap_or_else(|_| crate::token::now_ms())
}

/// What the driver noticed about time, besides deadlines coming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockEvent {
    /// The wall clock was set by this many milliseconds; deadlines moved with it.
    Jumped(i64),
    /// The machine was suspended for about this many milliseconds.
    Resumed(i64),
}

/// Tells, from the gaps between three clocks, a wall clock that was set (wall against boot
/// time, which counts suspend but is never set) and a suspend (boot against monotonic time,
/// which stops during suspend).
#[derive(Default)]
pub struct ClockWatch {
    wall_boot: Option<i64>,
    boot_mono: Option<i64>,
}

impl ClockWatch {
    /// What changed since the last look.
    pub fn look(&mut self, wall_ms: i64, boot_ms: i64, mono_ms: i64) -> Vec<ClockEvent> {
        let threshold = JUMP_THRESHOLD.as_millis() as i64;
        let mut events = Vec::new();
        let gap = boot_ms - mono_ms;
        if let Some(before) = self.boot_mono.replace(gap)
            && gap - before >= threshold
        {
            events.push(ClockEvent::Resumed(gap - before));
        }
        let offset = wall_ms - boot_ms;
        if let Some(before) = self.wall_boot.replace(offset)
            && (offset - before).abs() >= threshold
        {
            events.push(ClockEvent::Jumped(offset - before));
        }
        events
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
    /// Starts the driver on the machine's clocks: `fire` is called with each client whose
    /// deadline has come, `clock` with what happened to time (a wall-clock jump, after the
    /// deadlines moved by it; a resume from suspend).
    pub fn start(
        fire: impl Fn(Arc<str>) + Send + 'static,
        jumped: impl Fn(ClockEvent) + Send + 'static,
        shutdown: CancellationToken,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let alarm = WallAlarm::new()
            .map_err(|e| tracing::warn!("no wall-clock alarm ({e}): after a suspend, refreshes may come up to {MAX_SLEEP:?} late"))
            .ok();
        Scheduler::start_with(fire, jumped, SystemClock, alarm, shutdown)
    }

    /// Starts the driver on any clock (tests).
    pub fn start_with(
        fire: impl Fn(Arc<str>) + Send + 'static,
        jumped: impl Fn(ClockEvent) + Send + 'static,
        clock: impl Clock,
        alarm: Option<WallAlarm>,
        shutdown: CancellationToken,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(rx, fire, jumped, clock, alarm, shutdown));
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

/// A `CLOCK_REALTIME` timerfd armed at an absolute wall-clock time, cancelled when the clock is
/// set: it wakes the driver after a suspend and at a clock change.
pub struct WallAlarm {
    fd: tokio::io::unix::AsyncFd<TimerFdIo>,
    armed_at: Option<i64>,
}

/// A timerfd as tokio's `AsyncFd` takes it.
struct TimerFdIo(nix::sys::timerfd::TimerFd);

impl std::os::fd::AsRawFd for TimerFdIo {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl WallAlarm {
    pub fn new() -> std::io::Result<WallAlarm> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let fd = TimerFd::new(
            ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: TimerFdIo owns the timerfd and always returns that same open descriptor; it
        // is closed only when the AsyncFd (and the TimerFdIo in it) is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                TimerFdIo(fd),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(WallAlarm { fd, armed_at: None })
    }

    /// Arms the alarm at `at` (wall milliseconds); a far deadline still wakes at a clock change.
    fn arm(&mut self, at: i64) {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        if self.armed_at == Some(at) {
            return;
        }
        let when = TimeSpec::from_duration(Duration::from_millis(at.max(1) as u64));
        let flags =
            TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET;
        match self.fd.get_ref().0.set(Expiration::OneShot(when), flags) {
            Ok(()) => self.armed_at = Some(at),
            Err(e) => tracing::debug!("cannot arm the wall-clock alarm: {e}"),
        }
    }

    /// Waits until the alarm goes off or the clock is set.
    async fn rings(&mut self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let read = guard.try_io(|fd| {
                fd.get_ref().0.wait().map_err(|e| match e {
                    nix::errno::Errno::EAGAIN => std::io::ErrorKind::WouldBlock.into(),
                    other => std::io::Error::from(other),
                })
            });
            match read {
                // Gone off, or cancelled by a clock change: re-armed by the next round.
                Ok(_) => {
                    self.armed_at = None;
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    }
}

async fn ring(alarm: &mut Option<WallAlarm>) {
    match alarm {
        Some(a) => a.rings().await,
        None => std::future::pending().await,
    }
}

/// Looks at the clocks; after a jump, moves every deadline with it; says what happened.
fn follow(
    watch: &mut ClockWatch,
    timers: &mut Timers,
    clock: &impl Clock,
    told: &impl Fn(ClockEvent),
) {
    let shown = |ms: i64| crate::duration::show(Duration::from_millis(ms.unsigned_abs()));
    for event in watch.look(clock.wall_ms(), clock.boot_ms(), clock.mono_ms()) {
        match event {
            ClockEvent::Jumped(jump) => {
                tracing::warn!(
                    "the wall clock was set {} by {}: deadlines move with it",
                    if jump > 0 { "forward" } else { "back" },
                    shown(jump)
                );
                timers.shift(jump);
            }
            ClockEvent::Resumed(slept) => {
                tracing::info!("resumed after about {} of suspend", shown(slept));
            }
        }
        told(event);
    }
}

async fn drive(
    mut rx: mpsc::UnboundedReceiver<Command>,
    fire: impl Fn(Arc<str>),
    jumped: impl Fn(ClockEvent),
    clock: impl Clock,
    mut alarm: Option<WallAlarm>,
    shutdown: CancellationToken,
) {
    let mut timers = Timers::default();
    let mut detector = ClockWatch::default();
    // The first look only takes the clocks' bearings.
    follow(&mut detector, &mut timers, &clock, &jumped);
    loop {
        let now = clock.wall_ms();
        for name in timers.pop_due(now) {
            fire(name);
        }
        let next = timers.next_deadline();
        let sleep = match next {
            Some(at) => Duration::from_millis((at - now).max(0) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        if let Some(a) = alarm.as_mut() {
            // Without a deadline, a fixed far one: the alarm still hears of clock changes.
            a.arm(next.unwrap_or(IDLE_ALARM_AT));
        }
        let command = tokio::select! {
            _ = shutdown.cancelled() => return,
            cmd = rx.recv() => match cmd {
                Some(cmd) => Some(cmd),
                None => return,
            },
            _ = tokio::time::sleep(sleep) => None,
            _ = ring(&mut alarm) => None,
        };
        // Deadlines set before a jump are in the old clock and move with it; a command sent
        // after it is in the new one: so the clocks are looked at before it is applied.
        follow(&mut detector, &mut timers, &clock, &jumped);
        match command {
            Some(Command::Set(name, at)) => timers.set(name, at),
            Some(Command::Remove(name)) => timers.remove(&name),
            None => {}
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
        let (s, task) = Scheduler::start(move |n| drop(tx.send(n)), |_| {}, shutdown.clone());
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

    #[test]
    fn a_set_clock_is_a_jump_and_a_stopped_monotonic_clock_a_suspend() {
        let mut w = ClockWatch::default();
        assert_eq!(w.look(1_000_000, 5_000, 5_000), vec![]);
        // Time passing is nothing.
        assert_eq!(w.look(1_060_000, 65_000, 65_000), vec![]);
        // A suspend: wall and boot time go on, monotonic time does not.
        assert_eq!(
            w.look(4_660_000, 3_665_000, 66_000),
            vec![ClockEvent::Resumed(3_599_000)]
        );
        // NTP's slewing is nothing either.
        assert_eq!(w.look(4_661_500, 3_666_000, 67_000), vec![]);
        assert_eq!(
            w.look(4_662_000 - 86_400_000, 3_667_000, 68_000),
            vec![ClockEvent::Jumped(-86_400_500)]
        );
    }

    /// The machine's clocks, with the wall clock set and the machine suspended at will.
    #[derive(Clone, Default)]
    struct FakeClock {
        wall_set: Arc<std::sync::atomic::AtomicI64>,
        suspended: Arc<std::sync::atomic::AtomicI64>,
    }

    impl Clock for FakeClock {
        fn wall_ms(&self) -> i64 {
            use std::sync::atomic::Ordering::SeqCst;
            crate::token::now_ms() + self.wall_set.load(SeqCst) + self.suspended.load(SeqCst)
        }
        fn boot_ms(&self) -> i64 {
            crate::token::now_ms() + self.suspended.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn mono_ms(&self) -> i64 {
            crate::token::now_ms()
        }
    }

    struct Driven {
        clock: FakeClock,
        scheduler: Scheduler,
        fired: mpsc::UnboundedReceiver<Arc<str>>,
        events: mpsc::UnboundedReceiver<ClockEvent>,
        _stop: tokio_util::sync::DropGuard,
    }

    fn driven() -> Driven {
        let clock = FakeClock::default();
        let (tx, fired) = mpsc::unbounded_channel();
        let (jtx, events) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let (scheduler, _) = Scheduler::start_with(
            move |n| drop(tx.send(n)),
            move |j| {
                let _ = jtx.send(j);
            },
            clock.clone(),
            None,
            shutdown.clone(),
        );
        Driven {
            clock,
            scheduler,
            fired,
            events,
            _stop: shutdown.drop_guard(),
        }
    }

    impl Driven {
        /// Sets two deadlines, 300 and 600 ms ahead on the fake wall clock, and lets the
        /// driver take them (and a first look at the clocks) before the test moves time.
        async fn two_deadlines(&self) {
            let now = self.clock.wall_ms();
            self.scheduler.set("a".into(), now + 300);
            self.scheduler.set("b".into(), now + 600);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        /// Wakes the driver, as any command does.
        fn poke(&self) {
            let far = self.clock.wall_ms() + 86_400_000;
            self.scheduler.set("poke".into(), far);
        }

        async fn next_fired(&mut self, within: Duration) -> Option<Arc<str>> {
            tokio::time::timeout(within, self.fired.recv())
                .await
                .ok()
                .flatten()
        }

        /// Sets the wall clock by `by` ms; returns the jump the driver reported.
        async fn set_wall_clock(&mut self, by: i64) -> i64 {
            self.clock
                .wall_set
                .fetch_add(by, std::sync::atomic::Ordering::SeqCst);
            self.poke();
            match self.events.recv().await {
                Some(ClockEvent::Jumped(jump)) => jump,
                other => panic!("expected a jump, got {other:?}"),
            }
        }

        /// Both deadlines fire, in order, each within `within`.
        async fn both_fire(&mut self, within: Duration) {
            for name in ["a", "b"] {
                assert_eq!(self.next_fired(within).await.as_deref(), Some(name));
            }
        }
    }

    #[tokio::test]
    async fn a_clock_set_forward_moves_deadlines_instead_of_firing_them_all() {
        let mut d = driven();
        d.two_deadlines().await;
        let jump = d.set_wall_clock(86_400_000).await;
        assert!((jump - 86_400_000).abs() < 100, "{jump}");
        // No storm: nothing is due just because the clock says a day has passed.
        assert_eq!(d.next_fired(Duration::from_millis(150)).await, None);
        // Each deadline comes when its real time comes.
        d.both_fire(Duration::from_secs(2)).await;
    }

    #[tokio::test]
    async fn a_clock_set_back_does_not_put_refreshes_off() {
        let mut d = driven();
        d.two_deadlines().await;
        let jump = d.set_wall_clock(-86_400_000).await;
        assert!((jump + 86_400_000).abs() < 100, "{jump}");
        // Not a day late: on time.
        d.both_fire(Duration::from_secs(2)).await;
    }

    #[tokio::test]
    async fn deadlines_passed_during_a_suspend_fire_at_once_on_wake() {
        let mut d = driven();
        d.two_deadlines().await;
        // An hour of suspend: both clocks move on, which is no clock change.
        d.clock
            .suspended
            .fetch_add(3_600_000, std::sync::atomic::Ordering::SeqCst);
        d.poke();
        d.both_fire(Duration::from_millis(100)).await;
        let told = d.events.try_recv().unwrap();
        assert!(
            matches!(told, ClockEvent::Resumed(ms) if (ms - 3_600_000).abs() < 100),
            "{told:?}"
        );
        assert!(
            d.events.try_recv().is_err(),
            "a suspend is not a clock change"
        );
    }

    #[tokio::test]
    async fn the_wall_alarm_rings_at_its_wall_clock_time() {
        let Ok(mut alarm) = WallAlarm::new() else {
            return; // No timerfd here (not Linux): the driver falls back to MAX_SLEEP.
        };
        // The idle time is one the kernel takes.
        alarm.arm(IDLE_ALARM_AT);
        assert_eq!(alarm.armed_at, Some(IDLE_ALARM_AT));
        let at = crate::token::now_ms() + 100;
        alarm.arm(at);
        tokio::time::timeout(Duration::from_secs(2), alarm.rings())
            .await
            .expect("the alarm rings");
        assert!(crate::token::now_ms() >= at);
    }
}
