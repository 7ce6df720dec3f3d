//! The processes the daemon starts (notification hooks, secret commands): what they get, and
//! that none outlives its welcome.
//!
//! A child starts with a clean environment: `PATH`, `HOME`, the locale, the user's names, and
//! the variables a desktop notifier needs to reach the session, plus what the caller adds (the
//! documented `OAUTH2MCI_*` values of a hook). Never the daemon's own environment, which may hold
//! secrets read with `{env: VAR}`, `CREDENTIALS_DIRECTORY` and the like.
//!
//! Each child leads a process group of its own. At its timeout the whole group is killed, and at
//! shutdown every group still alive is, so that no background job or grandchild is left
//! behind (a grandchild that makes a session of its own, as agents like gpg-agent do, has left
//! on purpose). A finished child's output is read for a moment more and no longer: a grandchild
//! that keeps the pipe open does not hold the daemon.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::AsFd;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Passed on from the daemon's environment, when set: what a command needs to find programs
/// and files, speak the user's language, and reach the desktop session (notify-send needs
/// `DBUS_SESSION_BUS_ADDRESS`, `DISPLAY` or `WAYLAND_DISPLAY`, and `XDG_RUNTIME_DIR`).
pub const INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "DBUS_SESSION_BUS_ADDRESS",
    "XDG_RUNTIME_DIR",
    "XDG_SESSION_TYPE",
    "XDG_CURRENT_DESKTOP",
];

/// How long a finished child's pipes are read for what is left in them.
const DRAIN: Duration = Duration::from_millis(200);

/// The process groups started and not known to be empty.
static GROUPS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Set once `kill_all` began: no child starts after it (a reload queued behind the shutdown
/// would otherwise start a secret command that outlives the daemon).
static CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether children may still be started; say why not otherwise.
pub fn may_start() -> std::io::Result<()> {
    if CLOSED.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::other("the daemon is stopping"));
    }
    Ok(())
}

fn groups() -> std::sync::MutexGuard<'static, Option<HashSet<i32>>> {
    GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes `command` start in a clean environment with `env` added, in a process group of its
/// own.
pub fn prepare<'a>(
    command: &mut Command,
    env: impl IntoIterator<Item = (&'a str, String)>,
) -> &mut Command {
    use std::os::unix::process::CommandExt;
    command.env_clear();
    for name in INHERITED {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(env).process_group(0)
}

/// Records a child's process group, so that `kill_all` reaches it; kills it at once if the
/// daemon began stopping while it started.
pub fn track(pid: u32) {
    let pgid = pid as i32;
    let mut groups = groups();
    if CLOSED.load(std::sync::atomic::Ordering::SeqCst) {
        kill_group(pid);
        return;
    }
    let set = groups.get_or_insert_with(HashSet::new);
    // Groups whose every process has ended are forgotten (their number may be reused).
    set.retain(|&g| alive(g));
    set.insert(pgid);
}

fn alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

/// Kills a child's whole process group.
pub fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Ends every process group a child started that still has processes in it: SIGTERM, and
/// SIGKILL for what is left after `grace`. Called at shutdown.
pub fn kill_all(grace: Duration) {
    let pending: Vec<i32> = {
        let mut groups = groups();
        // Under the lock `track` takes: a child tracked after this is killed by `track`.
        CLOSED.store(true, std::sync::atomic::Ordering::SeqCst);
        groups.take()
    }
    .unwrap_or_default()
    .into_iter()
    .filter(|&g| alive(g))
    .collect();
    if pending.is_empty() {
        return;
    }
    tracing::info!(
        "stopping {} process group(s) started by hooks or secret commands",
        pending.len()
    );
    for &g in &pending {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(g),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pending.iter().any(|&g| alive(g)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &g in &pending {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(g),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Until dropped (`disarm`), SIGTERM and SIGINT end the process the way the daemon's
/// own handler does once it runs: every child's process group first. For the time before that
/// handler (loading the configuration, which may run secret commands) and for `check-config`:
/// without it the signal would end the process and leave its children running.
pub struct StopGuard {
    handle: signal_hook::iterator::Handle,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StopGuard {
    /// `None` when the handlers cannot be installed (the default action then stays).
    pub fn install() -> Option<StopGuard> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).ok()?;
        let handle = signals.handle();
        let armed = std::sync::Arc::new(AtomicBool::new(true));
        let watching = armed.clone();
        std::thread::Builder::new()
            .name("early-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next()
                    && watching.load(Ordering::SeqCst)
                {
                    kill_all(Duration::from_secs(1));
                    eprintln!("oauth2mci: stopped by signal {signal} before it was ready");
                    std::process::exit(128 + signal);
                }
            })
            .ok()?;
        Some(StopGuard { handle, armed })
    }

    /// From now on another handler takes the signals.
    pub fn disarm(self) {}
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.handle.close();
    }
}

/// What a command that ran to its end (or was killed) gave.
pub struct Finished {
    /// `None`: killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `command` (already `prepare`d) with stdin closed, reading at most `cap` bytes of each
/// output, for at most `timeout`, without threads: one poll loop over both pipes. Past the
/// timeout its group is killed. Blocking: call off the async runtime.
pub fn run_captured(
    command: &mut Command,
    timeout: Duration,
    cap: usize,
) -> std::io::Result<Finished> {
    may_start()?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    track(child.id());
    let as_file = |fd: std::os::fd::OwnedFd| Pipe::new(std::fs::File::from(fd));
    let mut pipes = [
        child.stdout.take().map(|p| as_file(p.into())),
        child.stderr.take().map(|p| as_file(p.into())),
    ];
    let deadline = Instant::now() + timeout;
    let mut drain_until: Option<Instant> = None;
    let mut status = None;
    loop {
        if status.is_none() {
            status = child.try_wait()?;
            if status.is_some() {
                drain_until = Some(Instant::now() + DRAIN);
            }
        }
        let open = pipes.iter().any(|p| p.as_ref().is_some_and(|p| !p.closed));
        let now = Instant::now();
        if status.is_some() && (!open || drain_until.is_some_and(|d| now >= d)) {
            break;
        }
        if status.is_none() && now >= deadline {
            kill_group(child.id());
            let _ = child.wait();
            return Ok(Finished {
                status: None,
                stdout: pipes[0].take().map(|p| p.bytes).unwrap_or_default(),
                stderr: pipes[1].take().map(|p| p.bytes).unwrap_or_default(),
            });
        }
        // Wake for output, the child's end (checked each 10 ms) or the deadline.
        let wait = Duration::from_millis(10);
        poll_pipes(&mut pipes, wait, cap)?;
    }
    // Whatever the child left running in its group has no reason to stay.
    kill_group(child.id());
    Ok(Finished {
        status,
        stdout: pipes[0].take().map(|p| p.bytes).unwrap_or_default(),
        stderr: pipes[1].take().map(|p| p.bytes).unwrap_or_default(),
    })
}

struct Pipe<R> {
    reader: R,
    bytes: Vec<u8>,
    closed: bool,
}

impl<R: Read + AsFd> Pipe<R> {
    fn new(reader: R) -> Pipe<R> {
        Pipe {
            reader,
            bytes: Vec::new(),
            closed: false,
        }
    }
}

fn poll_pipes<R: Read + AsFd>(
    pipes: &mut [Option<Pipe<R>>; 2],
    wait: Duration,
    cap: usize,
) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ready: Vec<bool> = {
        let mut fds: Vec<PollFd> = pipes
            .iter()
            .flatten()
            .filter(|p| !p.closed)
            .map(|p| PollFd::new(p.reader.as_fd(), PollFlags::POLLIN))
            .collect();
        if fds.is_empty() {
            std::thread::sleep(wait);
            return Ok(());
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        fds.iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect()
    };
    let mut flags = ready.into_iter();
    for pipe in pipes.iter_mut().flatten().filter(|p| !p.closed) {
        if !flags.next().unwrap_or(false) {
            continue;
        }
        let mut buf = [0u8; 4096];
        match pipe.reader.read(&mut buf) {
            Ok(0) => pipe.closed = true,
            Ok(n) => {
                // Past the cap, read on (so that the child is not blocked) but keep no more.
                let room = (cap + 1).saturating_sub(pipe.bytes.len());
                pipe.bytes.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => pipe.closed = true,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        prepare(&mut c, [("OAUTH2MCI_EVENT", "test".to_string())]);
        c
    }

    #[test]
    fn children_get_a_clean_environment() {
        // cargo sets this for the test process: the daemon's own, never the child's.
        assert!(
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            "run by cargo"
        );
        let out = run_captured(&mut sh("env"), Duration::from_secs(5), 1 << 16).unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        assert!(!env.contains("CARGO_MANIFEST_DIR="), "{env}");
        assert!(env.contains("OAUTH2MCI_EVENT=test"), "{env}");
        for line in env.lines() {
            let name = line.split('=').next().unwrap();
            assert!(
                INHERITED.contains(&name)
                    || name == "OAUTH2MCI_EVENT"
                    || name == "PWD"
                    || name == "SHLVL"
                    || name == "_",
                "{name} reached the child"
            );
        }
    }

    #[test]
    fn a_timeout_kills_the_whole_group_and_a_finished_child_does_not_hold_its_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
        let begun = Instant::now();
        let out = run_captured(&mut sh(&script), Duration::from_millis(300), 100).unwrap();
        assert!(out.status.is_none());
        assert!(begun.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "the background sleep survived: {state}"
        );
        // The leader exits at once, a background job keeps stdout open: not waited for.
        let begun = Instant::now();
        let out = run_captured(
            &mut sh("echo s3cret; sleep 100 &"),
            Duration::from_secs(30),
            100,
        )
        .unwrap();
        assert!(out.status.is_some_and(|s| s.success()));
        assert_eq!(out.stdout, b"s3cret\n");
        assert!(
            begun.elapsed() < Duration::from_secs(5),
            "{:?}",
            begun.elapsed()
        );
    }
}
