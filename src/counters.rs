//! The daemon's counters, for `/metrics`, health and the heap's release after waves. A leaf:
//! the registry counts, others read.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub refresh_ok: AtomicU64,
    pub refresh_failed: AtomicU64,
    /// Told when a refresh ends, either way (`heap::release_after_waves` waits for it).
    pub refresh_ended: tokio::sync::Notify,
    pub authorizations: AtomicU64,
    pub sink_errors: AtomicU64,
    pub store_errors: AtomicU64,
    /// Clients whose newest token is in memory only (the database refused it).
    pub unsaved: AtomicI64,
    pub reloads: AtomicU64,
    pub reload_errors: AtomicU64,
}

impl Counters {
    /// Follows a client's state from unsaved to saved or back.
    pub fn unsaved_changed(&self, became_unsaved: bool, became_saved: bool) {
        if became_unsaved {
            self.unsaved.fetch_add(1, Ordering::Relaxed);
        }
        if became_saved {
            self.unsaved.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Counts a refresh that ended, and tells whoever waits for one.
    pub fn count_refresh(&self, ok: bool) {
        let counter = if ok {
            &self.refresh_ok
        } else {
            &self.refresh_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.refresh_ended.notify_one();
    }

    /// Refreshes ended so far, either way.
    pub fn refreshes_ended(&self) -> u64 {
        self.refresh_ok.load(Ordering::Relaxed) + self.refresh_failed.load(Ordering::Relaxed)
    }
}
