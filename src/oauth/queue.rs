//! One token endpoint's queue: how many requests go to it at once, how fast scheduled ones
//! start, and who goes next.
//!
//! The next permit goes to the most urgent waiter: someone waiting for the answer (a consumer's
//! `token`, `refresh`, an authorization), then scheduled refreshes of healthy clients by their
//! token's expiry, then those of clients whose last attempts failed, by theirs. Scheduled
//! starts are spaced `1/rate` apart, so an expiry wave reaches the server as a steady stream;
//! nothing a person waits for is spaced. A request that has been out for `SLOW_AFTER` gives its
//! permit back and goes on as a straggler, and retries of failing clients never hold the last
//! quarter of the permits: when many clients of one endpoint hang (a partial outage), their
//! requests cannot hold the permits, and the healthy clients beside them are still served
//! before their tokens expire. Stragglers stay bounded: a request starts only on a free
//! permit, so at most `concurrency` of them join each `SLOW_AFTER`, and each ends within
//! `limits.request_timeout` (16 × 30 s / 2 s = 240 out at most, with the defaults).

use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A request out this long stops counting against the endpoint's permits. Token endpoints
/// answer in well under a second; one that takes two is stuck or overloaded.
pub const SLOW_AFTER: Duration = Duration::from_secs(2);

/// Timers tick by the millisecond: a start slot due within one is taken now, or a rate above
/// 1,000/s could never be reached. At most a millisecond's worth goes together.
const SLACK: Duration = Duration::from_millis(1);

/// How much a request is waited for, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    /// Someone waits for the answer: a consumer, the user. Not paced.
    Waiting,
    /// A scheduled refresh of a healthy client whose token expires then (Unix ms). Paced.
    Due(i64),
    /// A scheduled refresh of a client whose last attempt failed. Paced, after the healthy.
    Retry(i64),
}

impl Urgency {
    fn paced(self) -> bool {
        !matches!(self, Urgency::Waiting)
    }
}

struct Waiter {
    urgency: Urgency,
    /// Arrival order, among equals.
    seq: u64,
    grant: oneshot::Sender<Permit>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Waiter) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Waiter) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    /// The heap's top is the most urgent, earliest arrival.
    fn cmp(&self, other: &Waiter) -> std::cmp::Ordering {
        (other.urgency, other.seq).cmp(&(self.urgency, self.seq))
    }
}

struct Queue {
    in_flight: usize,
    /// Of `in_flight`, retries of failing clients.
    retries_in_flight: usize,
    stragglers: usize,
    /// When the next paced start may be.
    next_start: Instant,
    waiters: BinaryHeap<Waiter>,
    seq: u64,
    /// A timer is set for `next_start`.
    pacer: bool,
}

/// One endpoint's queue. Made with its limits; a changed limit makes a new one.
pub struct Endpoint {
    concurrency: usize,
    rate: u32,
    queue: Mutex<Queue>,
}

impl Endpoint {
    pub fn new(concurrency: usize, rate: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            concurrency: concurrency.max(1),
            rate: rate.max(1),
            queue: Mutex::new(Queue {
                in_flight: 0,
                retries_in_flight: 0,
                stragglers: 0,
                next_start: Instant::now(),
                waiters: BinaryHeap::new(),
                seq: 0,
                pacer: false,
            }),
        })
    }

    /// The limits it was made with.
    pub fn limits(&self) -> (usize, u32) {
        (self.concurrency, self.rate)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a permit to send one request, after the more urgent waiters (and, for a
    /// scheduled refresh, for its start slot).
    pub async fn acquire(self: &Arc<Self>, urgency: Urgency) -> Permit {
        let (grant, granted) = oneshot::channel();
        {
            let mut q = self.queue();
            q.seq += 1;
            let seq = q.seq;
            q.waiters.push(Waiter {
                urgency,
                seq,
                grant,
            });
            self.dispatch(&mut q);
        }
        match granted.await {
            Ok(permit) => permit,
            // The sender is only dropped with the queue, which this holds: never.
            Err(_) => Permit {
                endpoint: None,
                straggler: false,
                retry: false,
            },
        }
    }

    /// Hands out permits while some are free, to the most urgent waiters; a paced waiter whose
    /// slot has not come stops the round and sets a timer for it.
    fn dispatch(self: &Arc<Self>, q: &mut Queue) {
        while q.in_flight < self.concurrency {
            let Some(top) = q.waiters.peek() else { return };
            if top.grant.is_closed() {
                // Its caller went away.
                q.waiters.pop();
                continue;
            }
            let retry = matches!(top.urgency, Urgency::Retry(_));
            if retry && q.retries_in_flight >= self.retry_limit() {
                // Everything after it is a retry too.
                return;
            }
            let now = Instant::now();
            if top.urgency.paced() {
                if q.next_start > now + SLACK {
                    self.pace(q);
                    return;
                }
                let spacing = Duration::from_secs(1) / self.rate;
                q.next_start =
                    (q.next_start.max(now) + spacing).max(now.checked_sub(SLACK).unwrap_or(now));
            }
            let Some(waiter) = q.waiters.pop() else {
                return;
            };
            q.in_flight += 1;
            q.retries_in_flight += usize::from(retry);
            let permit = Permit {
                endpoint: Some(self.clone()),
                straggler: false,
                retry,
            };
            if let Err(mut unused) = waiter.grant.send(permit) {
                // Gone between the check and the send: taken back here, under the lock.
                unused.endpoint = None;
                q.in_flight -= 1;
                q.retries_in_flight -= usize::from(retry);
            }
        }
    }

    /// The permits retries may hold at once: all but a quarter (at least one), kept for
    /// healthy clients and people waiting.
    fn retry_limit(&self) -> usize {
        if self.concurrency == 1 {
            1
        } else {
            self.concurrency - (self.concurrency / 4).max(1)
        }
    }

    /// Sets a timer for the next paced start, if none is set.
    fn pace(self: &Arc<Self>, q: &mut Queue) {
        if q.pacer {
            return;
        }
        q.pacer = true;
        let at = q.next_start;
        let endpoint = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let mut q = endpoint.queue();
            q.pacer = false;
            endpoint.dispatch(&mut q);
        });
    }

    /// Requests out, counting against the permits, and stragglers.
    #[cfg(test)]
    fn out(&self) -> (usize, usize) {
        let q = self.queue();
        (q.in_flight, q.stragglers)
    }
}

/// Leave to send one request to the endpoint, until dropped.
pub struct Permit {
    endpoint: Option<Arc<Endpoint>>,
    straggler: bool,
    /// Counted among the retries in flight (until it becomes a straggler).
    retry: bool,
}

impl Permit {
    /// Runs `request` with this permit, giving the permit back for the next waiter if the
    /// request is still out after `SLOW_AFTER` (and there is room for one more straggler).
    pub async fn hold_while<F: std::future::Future>(&mut self, request: F) -> F::Output {
        tokio::pin!(request);
        tokio::select! {
            done = &mut request => return done,
            _ = tokio::time::sleep(SLOW_AFTER) => self.demote(),
        }
        request.await
    }

    fn demote(&mut self) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        let endpoint = endpoint.clone();
        let mut q = endpoint.queue();
        if self.straggler {
            return;
        }
        self.straggler = true;
        q.in_flight -= 1;
        q.retries_in_flight -= usize::from(self.retry);
        self.retry = false;
        q.stragglers += 1;
        endpoint.dispatch(&mut q);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(endpoint) = self.endpoint.take() else {
            return;
        };
        let mut q = endpoint.queue();
        if self.straggler {
            q.stragglers -= 1;
        } else {
            q.in_flight -= 1;
            q.retries_in_flight -= usize::from(self.retry);
        }
        endpoint.dispatch(&mut q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn scheduled_starts_are_spaced_by_the_rate_limit() {
        let endpoint = Endpoint::new(16, 200);
        let begun = Instant::now();
        let starts = futures::future::join_all((0..400).map(|i| {
            let endpoint = endpoint.clone();
            async move {
                let permit = endpoint.acquire(Urgency::Due(i)).await;
                drop(permit);
                Instant::now() - begun
            }
        }))
        .await;
        let mut starts: Vec<Duration> = starts;
        starts.sort();
        for (i, at) in starts.iter().enumerate() {
            // Start i comes i × 5 ms after the first: 200 a second, never two at once.
            assert_eq!(*at, Duration::from_millis(5) * i as u32, "start {i}");
        }
        // After a quiet spell there is no backlog to catch up on: one start, then the pace.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let quiet = Instant::now();
        drop(endpoint.acquire(Urgency::Due(0)).await);
        drop(endpoint.acquire(Urgency::Due(0)).await);
        assert_eq!(Instant::now() - quiet, Duration::from_millis(5));
        // What someone waits for is not paced.
        let now = Instant::now();
        for _ in 0..10 {
            drop(endpoint.acquire(Urgency::Waiting).await);
        }
        assert_eq!(Instant::now(), now);
    }

    /// The order permits are given in when one is out and `waiting` queue behind it.
    async fn order_of(waiting: &[(&'static str, Urgency)]) -> Vec<&'static str> {
        let endpoint = Endpoint::new(1, 1_000_000);
        let first = endpoint.acquire(Urgency::Waiting).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = waiting
            .iter()
            .map(|&(who, urgency)| {
                let (endpoint, order) = (endpoint.clone(), order.clone());
                tokio::spawn(async move {
                    let permit = endpoint.acquire(urgency).await;
                    order.lock().unwrap().push(who);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    drop(permit);
                })
            })
            .collect();
        // Every waiter queued before the permit comes back.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        order.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_urgent_goes_first() {
        let order = order_of(&[
            ("failing, expiring first", Urgency::Retry(10)),
            ("healthy, expiring late", Urgency::Due(500)),
            ("consumer", Urgency::Waiting),
            ("healthy, expiring soon", Urgency::Due(20)),
            ("second consumer", Urgency::Waiting),
        ])
        .await;
        assert_eq!(
            order,
            [
                "consumer",
                "second consumer",
                "healthy, expiring soon",
                "healthy, expiring late",
                "failing, expiring first"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_waits_behind_one_request_not_the_backlog() {
        let mut waiting = vec![("scheduled", Urgency::Due(0)); 10];
        waiting.push(("consumer", Urgency::Waiting));
        let order = order_of(&waiting).await;
        assert_eq!(order[0], "consumer", "{order:?}");
        assert_eq!(order.len(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn hung_requests_give_their_permits_back_and_healthy_ones_go_on() {
        let endpoint = Endpoint::new(2, 1_000_000);
        // Twenty requests that hang for a minute.
        let hung: Vec<_> = (0..20)
            .map(|_| {
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let mut permit = endpoint.acquire(Urgency::Retry(0)).await;
                    permit
                        .hold_while(tokio::time::sleep(Duration::from_secs(60)))
                        .await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(31)).await;
        // Retries hold one of the two permits at most, leaving one for the healthy; one
        // straggler joined every two seconds.
        assert_eq!(endpoint.out(), (1, 15));
        // A healthy refresh still goes out within the time a hung one is let to hang.
        let begun = Instant::now();
        let mut permit = endpoint.acquire(Urgency::Due(1)).await;
        permit.hold_while(async {}).await;
        assert!(
            Instant::now() - begun <= SLOW_AFTER,
            "{:?}",
            Instant::now() - begun
        );
        drop(permit);
        for task in hung {
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_gives_nothing_up() {
        let endpoint = Endpoint::new(1, 1_000);
        let held = endpoint.acquire(Urgency::Waiting).await;
        let gone = tokio::spawn({
            let endpoint = endpoint.clone();
            async move { endpoint.acquire(Urgency::Waiting).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        // The permit went neither to the one that left nor nowhere.
        let permit = endpoint.acquire(Urgency::Waiting).await;
        assert_eq!(endpoint.out(), (1, 0));
        drop(permit);
        assert_eq!(endpoint.out(), (0, 0));
    }
}
