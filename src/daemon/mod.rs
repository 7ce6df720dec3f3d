//! The daemon's lifecycle: start-up (config, lock, store, socket), the background drivers
//! (signals, config watcher, cron jobs, systemd watchdog) and an orderly shutdown.
//!
//! Shutdown order matters: stop taking requests, let grant requests in flight finish (a rotated
//! refresh token that is not saved is lost), then close the store and remove the socket file.

pub(crate) mod watch;

use crate::api;
use crate::config::{self, Config};
use crate::registry::Registry;
use crate::seal::Sealer;
use crate::store::{Snapshot, Store, Write};
use futures::StreamExt;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the process groups of hooks and secret commands get between SIGTERM and SIGKILL
/// at shutdown.
const CHILD_GRACE: Duration = Duration::from_secs(1);

/// Why the daemon could not run; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Start(String),
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(config_file: &Path) -> Result<(), DaemonError> {
    let begun = std::time::Instant::now();
    // Until the runtime's handler takes over (`serve`): a secret command may run meanwhile.
    let early = crate::children::StopGuard::install();
    // First: every share of the descriptors is taken from the raised limit, and nothing the
    // daemon inherited reaches the programs it starts.
    crate::descriptors::raise_limit();
    crate::descriptors::keep_inherited_from_children();
    // With many clients, the store is opened and read while the clients are: both take long.
    let mut opening = None;
    let mut logging = false;
    let config = config::load_announcing(config_file, |settings, clients| {
        init_logging(settings);
        logging = true;
        if clients >= StateOpening::WORTH_A_THREAD {
            opening = StateOpening::start(settings);
        }
    });
    let config = match config {
        Ok(config) => Arc::new(config),
        Err(e) => {
            // Not left migrating the database while the process exits.
            if let Some(opening) = opening {
                let _ = opening.thread.join();
            }
            return Err(e.into());
        }
    };
    if !logging {
        init_logging(&config);
    }
    tracing::debug!(
        "configuration of {} clients read in {} ms",
        config.clients.len(),
        begun.elapsed().as_millis()
    );
    let state = match opening {
        Some(opening) if opening.paths == config.paths && opening.keys == config.encryption => {
            let opened = opening.thread.join().unwrap_or_else(|_| {
                Err("the thread opening the store stopped unexpectedly".into())
            });
            tracing::debug!("the store was read alongside the configuration");
            opened
        }
        other => {
            // Few clients, settings the whole file reads differently from its outside (which
            // the config fuzz target looks for), or no thread to open the store on.
            if let Some(opening) = other {
                let _ = opening.thread.join();
            }
            OpenState::open(&config.paths, &config.encryption)
        }
    }
    .map_err(DaemonError::Start)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("oauth2mci")
        .build()
        .map_err(|e| DaemonError::Start(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(serve(config, state, begun, early));
    // Hooks still running after the grace period are not worth waiting for.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// The store opened on a thread of its own, for `paths` and `keys`.
struct StateOpening {
    paths: config::Paths,
    keys: crate::seal::Keys,
    thread: std::thread::JoinHandle<Result<OpenState, String>>,
}

impl StateOpening {
    /// Below this many clients the store is read in milliseconds, and a thread's own heap
    /// would add half a MiB to a daemon of 10.
    const WORTH_A_THREAD: usize = 5_000;

    /// `None` when no thread can be started: the store is then opened after the config.
    fn start(settings: &Config) -> Option<StateOpening> {
        let paths = settings.paths.clone();
        let keys = settings.encryption.clone();
        let (p, k) = (paths.clone(), keys.clone());
        let thread = std::thread::Builder::new()
            .name("store-open".into())
            .spawn(move || OpenState::open(&p, &k))
            .ok()?;
        Some(StateOpening {
            paths,
            keys,
            thread,
        })
    }
}

/// The state folder locked, the store open and what it held read.
struct OpenState {
    _lock: nix::fcntl::Flock<std::fs::File>,
    store: Store,
    writer: std::thread::JoinHandle<()>,
    snapshot: Snapshot,
}

impl OpenState {
    fn open(paths: &config::Paths, keys: &crate::seal::Keys) -> Result<OpenState, String> {
        let begun = std::time::Instant::now();
        let lock = lock_state_dir(&paths.state_dir)?;
        let (store, writer) =
            Store::open(&paths.database(), Sealer::new(keys)).map_err(|e| e.to_string())?;
        let snapshot = store.snapshot().map_err(|e| e.to_string())?;
        tracing::debug!(
            "store opened and read in {} ms",
            begun.elapsed().as_millis()
        );
        Ok(OpenState {
            _lock: lock,
            store,
            writer,
            snapshot,
        })
    }
}

/// `filter` with the crates that narrate too much kept quiet unless named: the cron library
/// its start-up at info. And notify never at trace, even when named: it logs every file event
/// there, and a log written into a watched folder (the configuration's) would feed itself.
fn quieted(filter: &str) -> String {
    let targets = |directive: &str, target: &str| {
        directive
            .trim()
            .strip_prefix(target)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['=', '[', ':']))
    };
    let mut out: Vec<String> = filter
        .split(',')
        .map(|directive| {
            let trace = directive.trim().ends_with("=trace") || directive.trim() == "notify";
            if targets(directive, "notify") && trace {
                "notify=debug".to_string()
            } else {
                directive.to_string()
            }
        })
        .collect();
    for (noisy, level) in [("tokio_cron_scheduler", "warn"), ("notify", "info")] {
        if !out.iter().any(|d| targets(d, noisy)) {
            out.push(format!("{noisy}={level}"));
        }
    }
    out.join(",")
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("OAUTH2MCI_LOG")
        .ok()
        .or_else(|| config.log_level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = quieted(&filter);
    let filter = config::parse_log_filter(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Under systemd the journal stamps each line itself, and colours would be noise.
    let result = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .try_init()
    } else {
        use std::io::IsTerminal;
        builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    let _ = result;
}

async fn serve(
    config: Arc<Config>,
    state: OpenState,
    begun: std::time::Instant,
    early: Option<crate::children::StopGuard>,
) -> Result<(), DaemonError> {
    let start = |e: String| DaemonError::Start(e);
    let OpenState {
        _lock,
        store,
        writer,
        snapshot,
    } = state;
    let listener = api::bind(
        &config.paths.socket,
        config.socket.mode,
        config.socket.group.as_ref().map(|g| g.gid),
    )
    .map_err(start)?;
    // The state folder and the socket exist now: known by identity from here on.
    config.protected.refresh();
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let registry = Registry::start(
        config.clone(),
        store,
        snapshot,
        shutdown.clone(),
        tasks.clone(),
    )
    .map_err(start)?;
    let api = api::serve(
        listener,
        registry.clone(),
        descriptor_budget(&config.limits),
        shutdown.clone(),
        tasks.clone(),
    )
    .map_err(start)?;
    let stop_reason = Arc::new(std::sync::Mutex::new(None::<String>));
    let signals = signal_handler(registry.clone()).map_err(start)?;
    if let Some(early) = early {
        early.disarm();
    }
    // One watcher for the configuration, the state folder and the socket's folder.
    let watches = crate::daemon::watch::Watches::new().map_err(start)?;
    let watcher = watch_config(&watches, registry.clone());
    watch_socket(&watches, &api, &registry, stop_reason.clone());
    let lock = Arc::new(std::sync::Mutex::new(_lock));
    watch_state(
        &watches,
        &registry.config().paths.state_dir,
        registry.store().clone(),
        lock.clone(),
    );
    let cron = start_cron(registry.clone()).await.map_err(start)?;
    tracing::info!(
        config = %config.file.display(),
        socket = %config.paths.socket.display(),
        clients = config.clients.len(),
        "oauth2mci {} ready in {} ms",
        env!("CARGO_PKG_VERSION"),
        begun.elapsed().as_millis()
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    crate::heap::release_free_pages();
    let watchdog = tokio::spawn(watchdog(shutdown.clone()));
    let releaser = registry.clone();
    let after_waves = tokio::spawn(async move {
        crate::heap::release_after_waves(&releaser.counters, releaser.shutdown.clone()).await
    });

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Hooks and secret commands (a reload's) are not waited for: their process groups end now.
    let children = tokio::task::spawn_blocking(|| crate::children::kill_all(CHILD_GRACE));
    drop(watcher);
    // Its handlers hold the store, which must close below.
    watches.stop();
    signals.close();
    if let Some(mut cron) = cron {
        let _ = cron.shutdown().await;
    }
    let bound = api.bound_socket();
    api.stop().await;
    watchdog.abort();
    // It saw the shutdown too; it holds the registry, which must go before the store closes.
    let _ = after_waves.await;
    // A grant request in flight may rotate the refresh token: give it time to land in the store.
    tasks.close();
    let grace = registry.config().limits.request_timeout + Duration::from_secs(5);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("some tasks did not finish within {grace:?}; stopping anyway");
    }
    let _ = children.await;
    let socket = registry.config().paths.socket.clone();
    drop(registry);
    api::remove_socket_if_ours(&socket, bound);
    // Every commit was awaited, so this only lets the writer close the database cleanly.
    let joined = tokio::task::spawn_blocking(move || writer.join());
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::warn!("the database writer did not close in time");
    }
    tracing::info!("stopped");
    match stop_reason.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(reason) => Err(DaemonError::Start(reason)),
        None => Ok(()),
    }
}

/// Fits the socket's connections in the open-files limit (`descriptors`).
fn descriptor_budget(limits: &config::Limits) -> api::Connections {
    let soft = crate::descriptors::soft_limit();
    let max = limits
        .max_connections
        .min(crate::descriptors::for_sockets());
    if max < limits.max_connections {
        tracing::warn!(
            "limits.max_connections is {}, but {soft} open files (ulimit -n; LimitNOFILE= under systemd) leave room for {max}: serving at most {max} connections",
            limits.max_connections
        );
    }
    api::Connections {
        max,
        per_user: limits.max_connections_per_user.min(max),
    }
}

/// Notices the socket file deleted or replaced, and listens there again; if another process
/// now listens there, or something else than a socket was put there, stops the daemon with
/// that reason (systemd then restarts it, and the start says what is wrong).
fn watch_socket(
    watches: &crate::daemon::watch::Watches,
    api: &api::Server,
    registry: &Arc<Registry>,
    stop_reason: Arc<std::sync::Mutex<Option<String>>>,
) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let config = registry.config();
    let path = config.paths.socket.clone();
    let (mode, gid) = (
        config.socket.mode,
        config.socket.group.as_ref().map(|g| g.gid),
    );
    let id = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let mut ours = id(&path);
    // Followed as the configuration is: the file, and the folders on the way to it (a runtime
    // folder renamed away is seen too).
    let (follower, mut rx) = crate::daemon::watch::follow(watches, path.clone());
    let rebinder = api.rebinder();
    let shutdown = registry.shutdown.clone();
    tokio::spawn(async move {
        let _follower = follower;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            let now = id(&path);
            if now == ours && now.is_some() {
                continue;
            }
            let found = std::fs::symlink_metadata(&path).ok();
            let stop = |why: String| {
                tracing::error!("{why}; stopping");
                *stop_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                shutdown.cancel();
            };
            match found {
                Some(meta) if !meta.file_type().is_socket() => {
                    return stop(format!(
                        "the socket file {} was replaced by something that is not a socket, which the daemon does not remove",
                        path.display()
                    ));
                }
                Some(_) if std::os::unix::net::UnixStream::connect(&path).is_ok() => {
                    return stop(format!(
                        "another process now listens on the socket {}",
                        path.display()
                    ));
                }
                _ => {}
            }
            tracing::warn!(
                "the socket file {} was deleted or replaced; listening there again",
                path.display()
            );
            match rebinder.rebind(&path, mode, gid) {
                Ok(()) => ours = id(&path),
                Err(e) => return stop(format!("cannot listen on the socket again: {e}")),
            }
        }
    });
}

/// One daemon per state folder: two would refresh the same tokens and invalidate each other's
/// rotated refresh tokens.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::files::make_dir(dir, None)?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        format!(
            "another oauth2mci daemon is using the state folder {} ({e})",
            dir.display()
        )
    })
}

/// SIGTERM and SIGINT stop the daemon; SIGHUP reloads the config.
fn signal_handler(registry: Arc<Registry>) -> Result<signal_hook_tokio::Handle, String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let handle = signals.handle();
    // A SIGHUP while one waits to run is the same request: one more reload at most.
    let queued = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            if signal == SIGHUP {
                if queued.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                tracing::info!("SIGHUP: reloading the configuration");
                // In a task of its own: a SIGTERM during a slow reload (a secret command that
                // hangs) is taken at once.
                let (registry, queued) = (registry.clone(), queued.clone());
                tokio::spawn(async move {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                    let _ = registry
                        .reload_after(|| queued.store(false, std::sync::atomic::Ordering::SeqCst))
                        .await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                });
            } else {
                registry.shutdown.cancel();
                return;
            }
        }
    });
    Ok(handle)
}

/// Reloads when the configuration file changes, however it is deployed (`watch`).
fn watch_config(
    watches: &crate::daemon::watch::Watches,
    registry: Arc<Registry>,
) -> crate::daemon::watch::Follower {
    let (follower, mut changes) =
        crate::daemon::watch::follow(watches, registry.config().file.clone());
    let shutdown = registry.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.recv() => if change.is_none() { return },
            }
            tracing::info!("the configuration file changed: reloading");
            let _ = registry.reload().await;
        }
    });
    follower
}

/// Whether `event` makes one of `names` appear, go or change places (not a write into it).
fn names_come_or_go<N: AsRef<std::ffi::OsStr>>(event: &notify::Event, names: &[N]) -> bool {
    use notify::EventKind;
    matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(notify::event::ModifyKind::Name(_))
    ) && event.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| names.iter().any(|m| n == m.as_ref()))
    })
}

/// Tells the store when one of its files is removed, renamed or made in the state folder, so
/// that a database deleted or replaced under an idle daemon is seen at once (a busy one sees
/// it at its next write anyway; when the folder cannot be watched, only writes look). The
/// state folder's lock is taken again if its file is removed.
fn watch_state(
    watches: &crate::daemon::watch::Watches,
    dir: &Path,
    store: crate::store::Store,
    lock: Arc<std::sync::Mutex<nix::fcntl::Flock<std::fs::File>>>,
) {
    const NAMES: [&str; 3] = ["state.db", "state.db-wal", "state.db-shm"];
    let folder = dir.to_path_buf();
    watches.on_event(Box::new(move |event| {
        let Ok(event) = event else {
            store.check_files();
            return;
        };
        // Writes change the files all the time; only their names going or coming matter.
        if names_come_or_go(event, &NAMES) {
            store.check_files();
        }
        let lock_gone = names_come_or_go(event, &["lock"]) && !folder.join("lock").exists();
        if lock_gone {
            // A second daemon could now take the folder: take its lock again first.
            match lock_state_dir(&folder) {
                Ok(new) => {
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) = new;
                    tracing::warn!("the state folder's lock file was removed; it is made and held again");
                }
                Err(e) => tracing::error!(
                    "the state folder's lock file was removed and cannot be taken again ({e}): two daemons may be using {}",
                    folder.display()
                ),
            }
        }
    }));
    if let Err(e) = watches.watch(dir) {
        tracing::warn!(
            "cannot watch the state folder {}: {e}; a database deleted under the daemon is seen at its next write",
            dir.display()
        );
    }
}

/// Cron jobs: history pruning, and the `cron:` refresh schedules of clients, kept in step with
/// reloads.
async fn start_cron(registry: Arc<Registry>) -> Result<Option<JobScheduler>, String> {
    let scheduler = JobScheduler::new()
        .await
        .map_err(|e| format!("cannot start the cron scheduler: {e}"))?;
    let history = registry.config().history.clone();
    // Jobs hold the registry weakly: the cron scheduler may outlive it, and the registry's
    // store must close at shutdown.
    let pruner = Arc::downgrade(&registry);
    let prune = Job::new_async(history.prune_schedule.0.as_str(), move |_, _| {
        let registry = pruner.upgrade();
        Box::pin(async move {
            if let Some(registry) = registry {
                prune_history(&registry).await;
            }
        })
    })
    .map_err(|e| format!("history.prune_schedule: {e}"))?;
    scheduler.add(prune).await.map_err(|e| e.to_string())?;
    scheduler
        .start()
        .await
        .map_err(|e| format!("cannot start the cron scheduler: {e}"))?;
    prune_history(&registry).await;

    let jobs = scheduler.clone();
    let mut versions = registry.config_versions();
    tokio::spawn(async move {
        let mut current: HashMap<Arc<str>, (String, uuid::Uuid)> = HashMap::new();
        loop {
            sync_client_cron(&jobs, &registry, &mut current).await;
            tokio::select! {
                _ = registry.shutdown.cancelled() => return,
                changed = versions.changed() => if changed.is_err() { return },
            }
        }
    });
    Ok(Some(scheduler))
}

async fn prune_history(registry: &Registry) {
    let history = registry.config().history.clone();
    let now = crate::token::now_ms();
    let writes = vec![
        Write::PruneEvents {
            before: now - history.retention.as_millis() as i64,
        },
        Write::ForgetRemoved {
            before: now - history.keep_removed.as_millis() as i64,
        },
    ];
    if let Err(e) = registry.store().commit(writes).await {
        tracing::error!("cannot prune the history: {e}");
    }
}

async fn sync_client_cron(
    jobs: &JobScheduler,
    registry: &Arc<Registry>,
    current: &mut HashMap<Arc<str>, (String, uuid::Uuid)>,
) {
    let wanted: HashMap<Arc<str>, String> = registry.cron_clients().into_iter().collect();
    let stale: Vec<Arc<str>> = current
        .iter()
        .filter(|(name, (expr, _))| wanted.get(*name) != Some(expr))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some((_, id)) = current.remove(&name) {
            let _ = jobs.remove(&id).await;
        }
    }
    for (name, expr) in wanted {
        if current.contains_key(&name) {
            continue;
        }
        let weak = Arc::downgrade(registry);
        let client = name.clone();
        let job = Job::new_async(expr.as_str(), move |_, _| {
            let registry = weak.upgrade();
            let client = client.clone();
            Box::pin(async move {
                if let Some(registry) = registry {
                    // Tracked, so that shutdown waits for a grant request in flight.
                    let tasks = registry.tasks.clone();
                    let _ = tasks
                        .spawn(async move { registry.cron_refresh(&client).await })
                        .await;
                }
            })
        });
        match job {
            Ok(job) => match jobs.add(job).await {
                Ok(id) => {
                    current.insert(name, (expr, id));
                }
                Err(e) => tracing::error!(client = %name, "cannot schedule the cron refresh: {e}"),
            },
            Err(e) => tracing::error!(client = %name, "cron {expr:?}: {e}"),
        }
    }
}

/// Tells systemd we are alive, if it asked (WatchdogSec=).
async fn watchdog(shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noisy_crates_are_kept_quiet_and_notify_never_traces() {
        assert_eq!(
            quieted("info"),
            "info,tokio_cron_scheduler=warn,notify=info"
        );
        assert_eq!(
            quieted("trace"),
            "trace,tokio_cron_scheduler=warn,notify=info"
        );
        assert_eq!(
            quieted("info,notify=trace"),
            "info,notify=debug,tokio_cron_scheduler=warn"
        );
        assert_eq!(
            quieted("notify,tokio_cron_scheduler=debug"),
            "notify=debug,tokio_cron_scheduler=debug"
        );
        // Our own module named notify is not the crate.
        assert_eq!(
            quieted("oauth2mci::notify=trace"),
            "oauth2mci::notify=trace,tokio_cron_scheduler=warn,notify=info"
        );
    }
}
