//! Follows a file however it is deployed, and says when it may have changed: the configuration
//! (to reload it) and the socket (to bind it again).
//!
//! A configuration is rarely a plain file in a plain folder: editors save by renaming a new file
//! over it, GNU Stow and home-manager make it a link into another folder, Kubernetes mounts a
//! ConfigMap as `config.yaml -> ..data/config.yaml` with `..data` a link swapped atomically to
//! a new folder on each update, and folders get removed and made again. So the follower
//! watches the folder of every entry on the way to the file (each link, each folder that is a
//! link, the file itself) and the folder above each of those folders, and cares only for events
//! on those entries: anything else in those folders (the daemon's own log written there, an
//! editor's swap file) is dropped unread, so nothing the daemon does in reaction can feed it.
//! After each change the way is walked again and the watches that moved are armed again, with
//! a warning when a watched folder went away: it never goes silently deaf.

use notify::{RecursiveMode, Watcher};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long after the last relevant event the follower waits before it reports (editors and
/// Kubernetes write in bursts).
pub const SETTLE: Duration = Duration::from_millis(300);

/// What the follower watches for one file.
#[derive(Debug, Default, PartialEq)]
pub struct Interest {
    /// Folders watched, with their identity when armed (device, inode).
    folders: BTreeMap<PathBuf, (u64, u64)>,
    /// The entries whose events matter.
    entries: BTreeSet<PathBuf>,
}

impl Interest {
    /// The entries on the way to `file` and the folders to watch for them.
    pub fn of(file: &Path) -> Interest {
        let start = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let (target, links) = crate::files::resolve_noting_links(&start);
        let mut entries: BTreeSet<PathBuf> = links.into_iter().collect();
        entries.insert(start);
        entries.insert(target);
        // Each folder that holds an entry is itself an entry of the folder above it: its
        // removal or replacement is then seen too.
        let holders: Vec<PathBuf> = entries
            .iter()
            .filter_map(|e| e.parent().map(Path::to_path_buf))
            .collect();
        entries.extend(holders);
        let mut interest = Interest {
            folders: BTreeMap::new(),
            entries: BTreeSet::new(),
        };
        for entry in entries {
            // A missing folder is watched for at the nearest one that exists.
            let mut entry = entry;
            while let Some(parent) = entry.parent().map(Path::to_path_buf) {
                if let Ok(meta) = std::fs::metadata(&parent)
                    && meta.is_dir()
                {
                    interest.folders.insert(parent, (meta.dev(), meta.ino()));
                    interest.entries.insert(entry);
                    break;
                }
                entry = parent;
            }
        }
        interest
    }

    /// Whether an event on `path` may change the file or the way to it.
    fn concerns(&self, path: &Path) -> bool {
        self.entries.contains(path) || self.folders.contains_key(path)
    }
}

/// Why the follower reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An entry on the way to the file changed.
    Changed,
    /// Events were lost (the kernel's queue overflowed): anything may have changed.
    Lost,
}

/// What a watcher's handler is given: each event, or the error that stands for lost ones.
pub type Handler = Box<dyn Fn(&notify::Result<notify::Event>) + Send + Sync>;

/// One file watcher (one inotify instance, one thread) for everything the daemon follows: its
/// configuration, its state folder, its socket's folder. Each follower adds a handler that
/// picks its own events; a folder is watched while anyone wants it.
#[derive(Clone)]
pub struct Watches {
    inner: Arc<Mutex<Inner>>,
    handlers: Arc<std::sync::RwLock<Vec<Handler>>>,
}

struct Inner {
    watcher: notify::RecommendedWatcher,
    /// How many want each folder watched.
    wanted: BTreeMap<PathBuf, usize>,
}

impl Watches {
    pub fn new() -> Result<Watches, String> {
        let handlers: Arc<std::sync::RwLock<Vec<Handler>>> = Arc::default();
        let seen = handlers.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // On notify's thread. Handlers filter before they allocate or log anything.
            for handler in seen.read().unwrap_or_else(|p| p.into_inner()).iter() {
                handler(&event);
            }
        })
        .map_err(|e| format!("cannot watch files: {e}"))?;
        Ok(Watches {
            inner: Arc::new(Mutex::new(Inner {
                watcher,
                wanted: BTreeMap::new(),
            })),
            handlers,
        })
    }

    /// Stops every watch and drops every handler (with what they hold: the store, channels to
    /// followers, which then end).
    pub fn stop(&self) {
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for folder in std::mem::take(&mut inner.wanted).into_keys() {
            let _ = inner.watcher.unwatch(&folder);
        }
    }

    /// Adds a handler of every event from now on.
    pub fn on_event(&self, handler: Handler) {
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(handler);
    }

    /// Watches `folder` (not what is below it) for one more follower.
    pub fn watch(&self, folder: &Path) -> Result<(), String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let count = inner.wanted.get(folder).copied().unwrap_or(0);
        if count == 0 {
            inner
                .watcher
                .watch(folder, RecursiveMode::NonRecursive)
                .map_err(|e| e.to_string())?;
        }
        inner.wanted.insert(folder.to_path_buf(), count + 1);
        Ok(())
    }

    /// Watches `folder` anew, for the followers that want it: the folder at that path was
    /// replaced, and the old watch follows the old one.
    pub fn rewatch(&self, folder: &Path) -> Result<(), String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = inner.watcher.unwatch(folder);
        inner
            .watcher
            .watch(folder, RecursiveMode::NonRecursive)
            .map_err(|e| e.to_string())
    }

    /// One follower less wants `folder`; without any, it is no longer watched.
    pub fn unwatch(&self, folder: &Path) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let count = inner.wanted.get(folder).copied().unwrap_or(0);
        if count <= 1 {
            inner.wanted.remove(folder);
            let _ = inner.watcher.unwatch(folder);
        } else {
            inner.wanted.insert(folder.to_path_buf(), count - 1);
        }
    }
}

/// The follower of one file; dropping it stops the watching.
pub struct Follower {
    _task: tokio::task::JoinHandle<()>,
}

/// Starts following `file`: the receiver gets a `Change` after each burst of relevant events
/// has settled. Call from inside the runtime.
pub fn follow(watches: &Watches, file: PathBuf) -> (Follower, mpsc::UnboundedReceiver<Change>) {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Raw>();
    let interest = Arc::new(Mutex::new(Interest::default()));
    let seen = interest.clone();
    watches.on_event(Box::new(move |event| {
        // Filtered before anything is allocated or logged, so that events in the watched
        // folders that are not ours (a log file written there) cost nothing and cannot feed
        // themselves.
        let raw = match event {
            Err(_) => Raw::Lost,
            Ok(e) if e.need_rescan() => Raw::Lost,
            Ok(e) if e.kind.is_access() => return,
            Ok(e) => {
                let interest = seen.lock().unwrap_or_else(|p| p.into_inner());
                if !e.paths.iter().any(|p| interest.concerns(p)) {
                    return;
                }
                Raw::Relevant
            }
        };
        let _ = raw_tx.send(raw);
    }));
    let mut armed = Armed {
        watches: watches.clone(),
        interest,
        watched: BTreeMap::new(),
        file,
    };
    armed.arm(false);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(first) = raw_rx.recv().await {
            let mut lost = first == Raw::Lost;
            // Until the events have been quiet for a moment.
            loop {
                match tokio::time::timeout(SETTLE, raw_rx.recv()).await {
                    Ok(Some(more)) => lost |= more == Raw::Lost,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if lost {
                tracing::warn!(
                    "events about {} were lost; watching it again and looking at it again",
                    armed.file.display()
                );
            }
            armed.arm(true);
            let change = if lost { Change::Lost } else { Change::Changed };
            if tx.send(change).is_err() {
                return;
            }
        }
    });
    (Follower { _task: task }, rx)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    Relevant,
    Lost,
}

struct Armed {
    watches: Watches,
    /// What the event handler filters by, shared with notify's thread.
    interest: Arc<Mutex<Interest>>,
    /// The folders watched now, with their identity then.
    watched: BTreeMap<PathBuf, (u64, u64)>,
    file: PathBuf,
}

impl Armed {
    /// Walks the way to the file again and watches what it needs now: folders no longer on it
    /// are let go, new or replaced ones watched. A folder still on the way that went away or
    /// was replaced is said in a warning (a Kubernetes update letting an old folder go is not).
    fn arm(&mut self, again: bool) {
        let wanted = Interest::of(&self.file);
        let folders = wanted.folders.clone();
        let on_the_way = wanted.entries.clone();
        // The handler sees the new interest first; no lock is held while watching, which
        // waits for notify's thread, where the handler runs.
        *self.interest.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        for (folder, id) in std::mem::take(&mut self.watched) {
            let replaced = match folders.get(&folder) {
                Some(now) if *now == id => {
                    self.watched.insert(folder, id);
                    continue;
                }
                Some(now) => {
                    // The same path, another folder: the old watch follows the old one.
                    match self.watches.rewatch(&folder) {
                        Ok(()) => {
                            self.watched.insert(folder.clone(), *now);
                        }
                        Err(_) => self.watches.unwatch(&folder),
                    }
                    true
                }
                None => {
                    self.watches.unwatch(&folder);
                    on_the_way.contains(&folder)
                }
            };
            if again && replaced {
                tracing::warn!(
                    "the folder {} was removed or replaced; following {} there again",
                    folder.display(),
                    self.file.display()
                );
            }
        }
        for (folder, id) in folders {
            if self.watched.contains_key(&folder) {
                continue;
            }
            match self.watches.watch(&folder) {
                Ok(()) => {
                    self.watched.insert(folder, id);
                }
                Err(e) => tracing::warn!(
                    "cannot watch {} for changes to {}: {e}",
                    folder.display(),
                    self.file.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_on_the_way_to_the_file_is_watched() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        // The Kubernetes layout: config.yaml -> ..data/config.yaml, ..data -> ..2024_1.
        let cm = base.join("cm");
        std::fs::create_dir_all(cm.join("..2024_1")).unwrap();
        std::fs::write(cm.join("..2024_1/config.yaml"), "x").unwrap();
        std::os::unix::fs::symlink("..2024_1", cm.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.yaml", cm.join("config.yaml")).unwrap();
        let interest = Interest::of(&cm.join("config.yaml"));
        for entry in ["config.yaml", "..data", "..2024_1", "..2024_1/config.yaml"] {
            assert!(interest.concerns(&cm.join(entry)), "{entry}: {interest:?}");
        }
        assert!(interest.concerns(&cm), "the folder itself, in its parent");
        assert!(interest.folders.contains_key(&cm) && interest.folders.contains_key(&base));
        assert!(!interest.concerns(&cm.join("daemon.log")));
        assert!(!interest.concerns(&cm.join(".config.yaml.swp")));
        // A missing folder is watched for where it would appear.
        let later = Interest::of(&base.join("not/yet/config.yaml"));
        assert!(later.concerns(&base.join("not")));
        assert!(later.folders.contains_key(&base));
    }
}
