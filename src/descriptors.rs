//! The daemon's open files: the limit raised as far as allowed, and shared out, so that no
//! kind of use (socket connections, outgoing requests) can take the descriptors the others
//! need.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Kept for what is neither a socket connection nor an outgoing request: the store's files,
/// the watches, the log, token files being written, hooks' pipes.
pub const RESERVED: u64 = 256;

/// Raises the soft limit on open files to the hard one (within the kernel's own ceiling for an
/// unlimited hard limit); returns the soft limit in force.
pub fn raise_limit() -> u64 {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let wanted = hard.min(ceiling);
    if wanted > soft && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        tracing::debug!("open files: soft limit raised from {soft} to {wanted}");
        return wanted;
    }
    soft
}

/// Marks every descriptor the daemon inherited beyond stdin, stdout and stderr close-on-exec:
/// a shell or a supervisor may leave files, pipes or sockets open, and a hook or secret command
/// the daemon starts must not receive them (one could hold a lock or another user's socket).
/// The daemon's own descriptors are opened close-on-exec already; the inherited ones stay open
/// for the daemon itself, which may not know what they are for.
pub fn keep_inherited_from_children() {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::BorrowedFd;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: only the flags of a descriptor number are changed, nothing is read or closed;
        // a number that closed since it was listed (the listing's own) fails with EBADF.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl(borrowed, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(borrowed, FcntlArg::F_SETFD(flags));
        }
    }
}

/// The soft limit on open files in force.
pub fn soft_limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// How many socket connections fit: half of what is left after `RESERVED`.
pub fn for_sockets() -> usize {
    (soft_limit().saturating_sub(RESERVED) / 2).max(1) as usize
}

/// How many outgoing requests may be out at once, all endpoints together: half of the other
/// half (the rest is for the connections they leave pooled).
pub fn for_requests() -> usize {
    (soft_limit().saturating_sub(RESERVED) / 4).max(1) as usize
}
