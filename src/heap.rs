//! The daemon's use of the C allocator (glibc malloc), tuned for holding many small,
//! long-lived values: a configuration of 100,000 clients and their state.
//!
//! Parsing the configuration allocates several times what the clients keep, and frees it.
//! glibc keeps the freed pages, in the middle of its heaps, unless asked to hand them back.
//! The parser threads' heaps hold nothing else (`config::by_blocks` resolves the clients on
//! the loading thread), so nearly all of them goes back.

/// Hands the pages freed by a big, short-lived use of memory (parsing the configuration at
/// start-up or reload) back to the system.
pub fn release_free_pages() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim walks the allocator's own free lists under its locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
