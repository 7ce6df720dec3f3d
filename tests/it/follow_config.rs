//! Live reload follows the configuration however it is deployed, through the real daemon: a link
//! into another folder (GNU Stow, home-manager), the Kubernetes ConfigMap layout (`..data`
//! swapped atomically, again and again), the config folder replaced or removed and made again;
//! and a log written into the config folder at trace level does not feed the watcher.

use crate::common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config(dir: &Path, clients: &[&str]) -> String {
    let mut yaml = format!(
        "paths:\n  state: {0}/state\n  runtime: {0}/run\nclients:\n",
        dir.display()
    );
    for name in clients {
        yaml.push_str(&format!(
            "  {name}:\n    client_id: {name}\n    provider: {{token_url: \"https://t.example/\", authorize_url: \"https://a.example/\"}}\n"
        ));
    }
    yaml
}

/// Writes `text` at `path` as an editor does: a new file renamed over the old one.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-save");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Running {
    child: std::process::Child,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Running {
    fn start(dir: &Path, config: &Path, log: &Path, level: &str) -> Running {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(config)
            .env("OAUTH2MCI_LOG", level)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let running = Running {
            child,
            socket: dir.join("run/oauth2mci.sock"),
            log: log.to_path_buf(),
        };
        wait_for("the daemon", Duration::from_secs(20), || {
            running.clients().is_some()
        });
        running
    }

    fn clients(&self) -> Option<Vec<String>> {
        let (status, body) =
            oauth2mci::cli::request(&self.socket, "GET", "/v1/clients", Duration::from_secs(5))
                .ok()?;
        let list: serde_json::Value = serde_json::from_slice(&body).ok()?;
        (status == 200).then(|| {
            list.as_array()
                .unwrap()
                .iter()
                .filter(|c| c["status"] != "disabled")
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
    }

    fn expect(&self, names: &[&str], what: &str) {
        let want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let log = self.log.clone();
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            last = self.clients();
            if last.as_ref() == Some(&want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{what}: clients {last:?}, expected {want:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn a_link_into_another_folder_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::create_dir_all(base.join("dotfiles/oauth2mci")).unwrap();
    std::fs::create_dir_all(base.join("home/.config")).unwrap();
    let target = base.join("dotfiles/oauth2mci/config.yaml");
    std::fs::write(&target, config(&base, &["a"])).unwrap();
    // Stow links the folder; home-manager links the file: both at once here.
    std::os::unix::fs::symlink(
        base.join("dotfiles/oauth2mci"),
        base.join("home/.config/oauth2mci"),
    )
    .unwrap();
    let link = base.join("home/.config/oauth2mci/config.yaml");
    let daemon = Running::start(&base, &link, &base.join("daemon.log"), "info");
    daemon.expect(&["a"], "at start");
    save(&target, &config(&base, &["a", "b"]));
    daemon.expect(&["a", "b"], "the linked file edited in its own folder");
    // The link itself moved to another copy.
    std::fs::create_dir_all(base.join("dotfiles2")).unwrap();
    std::fs::write(base.join("dotfiles2/config.yaml"), config(&base, &["c"])).unwrap();
    let tmp = base.join("home/.config/tmp-link");
    std::os::unix::fs::symlink(base.join("dotfiles2"), &tmp).unwrap();
    std::fs::rename(&tmp, base.join("home/.config/oauth2mci")).unwrap();
    daemon.expect(&["c"], "the folder link swapped");
    save(
        &base.join("dotfiles2/config.yaml"),
        &config(&base, &["c", "d"]),
    );
    daemon.expect(&["c", "d"], "an edit in the new folder");
}

#[test]
fn the_kubernetes_configmap_layout_is_followed_through_each_update() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let cm = base.join("configmap");
    let publish = |version: usize, names: &[&str]| {
        // What the kubelet does: a new timestamped folder, a `..data_tmp` link to it renamed
        // over `..data`, the old folder removed.
        let folder = format!("..2026_12_04_{version}");
        std::fs::create_dir_all(cm.join(&folder)).unwrap();
        std::fs::write(cm.join(&folder).join("config.yaml"), config(&base, names)).unwrap();
        std::os::unix::fs::symlink(&folder, cm.join("..data_tmp")).unwrap();
        std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
        if version > 0 {
            std::fs::remove_dir_all(cm.join(format!("..2026_12_04_{}", version - 1))).unwrap();
        }
    };
    publish(0, &["a"]);
    std::os::unix::fs::symlink("..data/config.yaml", cm.join("config.yaml")).unwrap();
    let daemon = Running::start(
        &base,
        &cm.join("config.yaml"),
        &base.join("daemon.log"),
        "info",
    );
    daemon.expect(&["a"], "at start");
    for (version, names) in [(1, vec!["a", "b"]), (2, vec!["b"]), (3, vec!["b", "c"])] {
        publish(version, &names);
        daemon.expect(&names, &format!("update {version}"));
    }
    assert!(
        !daemon.log_text().contains("was removed or replaced"),
        "a normal update is no incident"
    );
}

#[test]
fn a_config_folder_replaced_or_removed_and_made_again_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let folder = base.join("conf");
    std::fs::create_dir(&folder).unwrap();
    let file = folder.join("config.yaml");
    std::fs::write(&file, config(&base, &["a"])).unwrap();
    let daemon = Running::start(&base, &file, &base.join("daemon.log"), "info");
    daemon.expect(&["a"], "at start");
    // Replaced: moved away, a new one made.
    std::fs::rename(&folder, base.join("conf.old")).unwrap();
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(&file, config(&base, &["b"])).unwrap();
    daemon.expect(&["b"], "the folder replaced");
    // Edits in the old folder (still watched before, by its inode) are not the config's.
    save(&base.join("conf.old/config.yaml"), &config(&base, &["old"]));
    save(&file, &config(&base, &["b", "c"]));
    daemon.expect(&["b", "c"], "an edit in the new folder");
    // Removed, then made again later.
    std::fs::remove_dir_all(&folder).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(&file, config(&base, &["d"])).unwrap();
    daemon.expect(&["d"], "the folder made again");
    save(&file, &config(&base, &["d", "e"]));
    daemon.expect(&["d", "e"], "an edit after that");
    assert!(
        daemon.log_text().contains("was removed or replaced"),
        "the lost watch is told"
    );
}

#[test]
fn a_trace_log_in_the_config_folder_does_not_feed_itself() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let file = base.join("config.yaml");
    std::fs::write(&file, config(&base, &["a"])).unwrap();
    let log = base.join("daemon.log");
    let daemon = Running::start(&base, &file, &log, "trace");
    std::thread::sleep(Duration::from_secs(2));
    let size = || std::fs::metadata(&log).unwrap().len();
    let before = size();
    std::thread::sleep(Duration::from_secs(3));
    let grown = size() - before;
    assert!(
        grown < 20_000,
        "the log grew {grown} bytes in 3 s of idling:\n{}",
        &daemon.log_text()[..4000.min(daemon.log_text().len())]
    );
    // And the config is still followed.
    save(&file, &config(&base, &["a", "b"]));
    daemon.expect(&["a", "b"], "an edit");
}
