//! The daemon's use of the C allocator (glibc malloc), tuned for holding many small,
//! long-lived values: a configuration of 100,000 clients and their state.
//!
//! Parsing the configuration allocates several times what the clients keep, and frees it.
//! glibc keeps the freed pages, in the middle of its heaps, unless asked to hand them back.
//! The parser threads' heaps hold nothing else (`config::by_blocks` resolves the clients on
//! the loading thread), so nearly all of them goes back. A wave of refreshes is the other big
//! use: 100,000 at once leave 433 MiB resident against 138 MiB before, and about 290 MiB once
//! the wave has passed and its free pages are handed back (`release_after_waves`).

use crate::counters::Counters;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Hands the pages freed by a big, short-lived use of memory (parsing the configuration at
/// start-up or reload) back to the system.
pub fn release_free_pages() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim walks the allocator's own free lists under its locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// How often the pace of refreshes is looked at, while they run.
const WINDOW: Duration = Duration::from_secs(10);

/// Refreshes since the last release before a wave's end is worth a release.
const WAVE: u64 = 1_000;

/// Releases the heap's free pages once a wave of refreshes has passed: at least `WAVE` ended
/// since the last release, and in the last `WINDOW` fewer than a quarter as many as in the
/// busiest one. A steady pace never counts as a wave's end. Sleeps while no refresh ends.
pub async fn release_after_waves(counters: &Counters, shutdown: CancellationToken) {
    after_waves(counters, shutdown, release_free_pages).await
}

async fn after_waves(counters: &Counters, shutdown: CancellationToken, release: fn()) {
    let mut released_at = counters.refreshes_ended();
    // The count when last looked at: what ended while asleep belongs to the first window.
    let mut seen = released_at;
    let mut busiest = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = counters.refresh_ended.notified() => {}
        }
        // Window by window while refreshes end; back to sleep after one without any.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(WINDOW) => {}
            }
            let now = counters.refreshes_ended();
            let in_window = now - seen;
            seen = now;
            busiest = busiest.max(in_window);
            if now - released_at >= WAVE && in_window < busiest / 4 {
                // malloc_trim walks the whole heap: not on a runtime thread.
                let _ = tokio::task::spawn_blocking(release).await;
                tracing::debug!(
                    refreshes = now - released_at,
                    "free heap pages released after a wave of refreshes"
                );
                released_at = now;
                busiest = 0;
            }
            if in_window == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RELEASES: AtomicUsize = AtomicUsize::new(0);

    fn count_release() {
        RELEASES.fetch_add(1, Ordering::SeqCst);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wave_is_released_once_passed_and_a_steady_pace_is_not_a_wave() {
        let counters = Arc::new(Counters::default());
        let shutdown = CancellationToken::new();
        let watching = {
            let (counters, shutdown) = (counters.clone(), shutdown.clone());
            tokio::spawn(async move { after_waves(&counters, shutdown, count_release).await })
        };
        let end = |n: u64| {
            for _ in 0..n {
                counters.count_refresh(true);
            }
        };
        let released = || RELEASES.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(released(), 0, "nothing ended, nothing to release");

        // 5,000 within a second, then nothing: released one window after the wave.
        end(5_000);
        tokio::time::sleep(WINDOW * 3).await;
        assert_eq!(released(), 1);

        // A steady 50 a second for five minutes: the pace never falls, nothing released...
        for _ in 0..300 {
            end(50);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(released(), 1);
        // ...until it stops.
        tokio::time::sleep(WINDOW * 3).await;
        assert_eq!(released(), 2);

        // Fewer than a wave: not worth a release.
        end(WAVE - 1);
        tokio::time::sleep(WINDOW * 3).await;
        assert_eq!(released(), 2);

        shutdown.cancel();
        watching.await.expect("stops at shutdown");
    }
}
