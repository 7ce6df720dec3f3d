//! Files known by what they are, not by how their path is spelled: where a path leads (through
//! symbolic links, `..`, hard links and bind mounts), which files are the daemon's own (its
//! database and the files beside it, its socket, its configuration and every file that
//! configuration reads), and whether a folder is safe to keep a token file in.
//!
//! A token file must never be able to replace one of the daemon's own files, however its path is
//! written: two places are compared by their folder's device and inode and their name, and an
//! existing file by its own device and inode. This module decides; `sink` checks again through
//! the folder it is about to write into, so that a folder swapped after the configuration was
//! read changes nothing.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::RwLock;

/// A file or folder by identity: the same through every path that leads to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// A folder: by identity when it exists, else by the path it would have once created.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Folder {
    Known(FileId),
    ToBe(PathBuf),
}

/// What kind of file an existing target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Folder,
    Symlink,
    Fifo,
    Socket,
    Device,
}

impl Kind {
    fn of(meta: &Metadata) -> Kind {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Folder
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else if t.is_block_device() || t.is_char_device() {
            Kind::Device
        } else {
            Kind::Regular
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::Folder => "a folder",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::Device => "a device",
        }
    }
}

/// Where a file name stands: in which folder, under which name, and the file there now.
#[derive(Debug, Clone)]
pub struct Place {
    pub folder: Folder,
    pub name: OsString,
    /// The file at that name (not followed, if it is a link), when there is one.
    pub existing: Option<(FileId, Kind)>,
}

impl Place {
    /// Where `path` leads. Its folders are followed through links (existing or not); its last
    /// component is not.
    pub fn of(path: &Path) -> Result<Place, String> {
        let name = file_name(path)?;
        let folder_path = resolve(path.parent().unwrap_or(Path::new("/")));
        let (folder, existing) = match fs::metadata(&folder_path) {
            Ok(meta) if meta.is_dir() => {
                let existing = fs::symlink_metadata(folder_path.join(&name))
                    .ok()
                    .map(|m| (FileId::of(&m), Kind::of(&m)));
                (Folder::Known(FileId::of(&meta)), existing)
            }
            _ => (Folder::ToBe(folder_path), None),
        };
        Ok(Place {
            folder,
            name,
            existing,
        })
    }

    /// The place of `name` in the folder open as `folder` (checked through the descriptor the
    /// caller writes with, so that no path is resolved twice).
    pub fn in_open_folder(folder: &fs::File, name: &OsStr) -> std::io::Result<Place> {
        use std::os::fd::AsFd;
        let meta = folder.metadata()?;
        let existing = match nix::sys::stat::fstatat(
            folder.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Some((
                FileId {
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
                kind_of_mode(st.st_mode),
            )),
            Err(nix::errno::Errno::ENOENT) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Place {
            folder: Folder::Known(FileId::of(&meta)),
            name: name.to_os_string(),
            existing,
        })
    }

    /// Refuses a target that exists and is not a regular file: a device, a FIFO, a socket, a
    /// folder or a link is never replaced (nor removed).
    pub fn must_be_regular(&self) -> Result<(), String> {
        match self.existing {
            Some((_, kind)) if kind != Kind::Regular => Err(format!(
                "is {}, not a regular file; it is never replaced",
                kind.describe()
            )),
            _ => Ok(()),
        }
    }
}

fn kind_of_mode(mode: nix::libc::mode_t) -> Kind {
    use nix::libc::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFSOCK};
    match mode & S_IFMT {
        S_IFLNK => Kind::Symlink,
        S_IFDIR => Kind::Folder,
        S_IFIFO => Kind::Fifo,
        S_IFSOCK => Kind::Socket,
        S_IFBLK | S_IFCHR => Kind::Device,
        _ => Kind::Regular,
    }
}

fn file_name(path: &Path) -> Result<OsString, String> {
    match path.components().next_back() {
        Some(Component::Normal(name)) => Ok(name.to_os_string()),
        _ => Err(format!("{} names a folder, not a file", path.display())),
    }
}

/// The most links followed in one path, as the kernel's own limit (ELOOP).
const MAX_LINKS: usize = 40;

/// `path` made absolute with every link in it followed, whether what they lead to exists or
/// not, and `.` and `..` applied after each link as the kernel would: two spellings of one
/// place give the same path, even before the place exists.
pub fn resolve(path: &Path) -> PathBuf {
    resolve_noting_links(path).0
}

/// `resolve`, with the path of every link met on the way, in order.
pub fn resolve_noting_links(path: &Path) -> (PathBuf, Vec<PathBuf>) {
    let mut out = PathBuf::from("/");
    let start = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest: VecDeque<OsString> = components(&start).into();
    let mut links = Vec::new();
    while let Some(part) = rest.pop_front() {
        if part == ".." {
            out.pop();
            continue;
        }
        let next = out.join(&part);
        let target = fs::symlink_metadata(&next)
            .ok()
            .filter(|meta| meta.file_type().is_symlink() && links.len() < MAX_LINKS)
            .and_then(|_| fs::read_link(&next).ok());
        let Some(target) = target else {
            out = next;
            continue;
        };
        links.push(next);
        if target.is_absolute() {
            out = PathBuf::from("/");
        }
        for part in components(&target).into_iter().rev() {
            rest.push_front(part);
        }
    }
    (out, links)
}

/// A path's parts that name something (`..` included), without the root and `.`.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// The daemon's own files and folders, which no token file may replace or remove: the
/// database with everything beside it (its whole folder), the socket, the configuration and
/// every file it reads. Kept by path, resolved when built and again with `refresh` (once the
/// state folder and the socket exist).
#[derive(Debug, Default)]
pub struct Protected {
    files: Vec<(PathBuf, String)>,
    folders: Vec<(PathBuf, String)>,
    resolved: RwLock<Resolved>,
}

#[derive(Debug, Default)]
struct Resolved {
    by_entry: HashMap<(Folder, OsString), usize>,
    by_file: HashMap<FileId, usize>,
    folders: HashMap<Folder, usize>,
}

impl PartialEq for Protected {
    /// Not a setting: what it protects follows from the settings compared beside it.
    fn eq(&self, _: &Protected) -> bool {
        true
    }
}

impl Protected {
    /// `files` (each with what it is, for messages) and `folders` whose every file is the
    /// daemon's. A file reached through a link is protected under both names.
    pub fn new(files: Vec<(PathBuf, String)>, folders: Vec<(PathBuf, String)>) -> Protected {
        let protected = Protected {
            files,
            folders,
            resolved: RwLock::default(),
        };
        protected.refresh();
        protected
    }

    /// Resolves every protected path again: files and folders created since (the database at
    /// the first start, the socket) are then known by identity too.
    pub fn refresh(&self) {
        let mut r = Resolved::default();
        for (i, (path, _)) in self.files.iter().enumerate() {
            for spelled in [path.clone(), resolve(path)] {
                if let Ok(place) = Place::of(&spelled) {
                    r.by_entry.insert((place.folder, place.name), i);
                    if let Some((id, _)) = place.existing {
                        r.by_file.insert(id, i);
                    }
                }
                // The file the link leads to, when it exists.
                if let Ok(meta) = fs::metadata(&spelled) {
                    r.by_file.insert(FileId::of(&meta), i);
                }
            }
        }
        for (i, (path, _)) in self.folders.iter().enumerate() {
            let resolved = resolve(path);
            let folder = match fs::metadata(&resolved) {
                Ok(meta) if meta.is_dir() => Folder::Known(FileId::of(&meta)),
                _ => Folder::ToBe(resolved),
            };
            r.folders.insert(folder, i);
        }
        *self.resolved.write().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// What of the daemon's own `place` would overwrite, if anything.
    pub fn clash(&self, place: &Place) -> Option<String> {
        let r = self.resolved.read().unwrap_or_else(|p| p.into_inner());
        if let Some(&i) = r.folders.get(&place.folder) {
            let (path, what) = &self.folders[i];
            return Some(format!("a file in {what} {}", path.display()));
        }
        let file = r
            .by_entry
            .get(&(place.folder.clone(), place.name.clone()))
            .or_else(|| place.existing.and_then(|(id, _)| r.by_file.get(&id)));
        file.map(|&i| {
            let (path, what) = &self.files[i];
            format!("{what} {}", path.display())
        })
    }

    /// Refuses a token file at `place`: one of the daemon's own files, or not a regular file.
    pub fn check_target(&self, place: &Place) -> Result<(), String> {
        if let Some(what) = self.clash(place) {
            return Err(format!("would overwrite {what}"));
        }
        place.must_be_regular()
    }
}

/// Refuses a folder that users other than this one (and root) could write, with the reason
/// (OpenSSH's StrictModes): whoever can write a token file's folder can replace the file, or
/// turn its name into a link that sends the next write elsewhere. The folder must be owned by
/// this user or root and writable by no one else; each folder above it likewise, except that a
/// folder with the sticky bit (`/tmp`) may be writable by all, as no one can then move another's
/// entries. A folder not yet made is judged by the folders above it: the daemon makes it 0700.
pub fn folder_is_safe(folder: &Path) -> Result<(), String> {
    let resolved = resolve(folder);
    match fs::metadata(&resolved) {
        Ok(meta) => {
            check_one_folder(&resolved, &meta, true)?;
            resolved.parent().map_or(Ok(()), folder_is_safe_above)
        }
        // Not made yet: the first existing folder above it is judged as a parent.
        Err(_) => folder_is_safe_above(&resolved),
    }
}

/// The folders from `dir` up, as parents of a token file's folder (already resolved).
pub fn folder_is_safe_above(dir: &Path) -> Result<(), String> {
    for above in dir.ancestors() {
        if let Ok(meta) = fs::metadata(above) {
            check_one_folder(above, &meta, false)?;
        }
    }
    Ok(())
}

/// The check of `folder_is_safe` for one folder; `own`: it holds the token file itself.
pub fn check_one_folder(dir: &Path, meta: &Metadata, own: bool) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let shown = || format!("{} (mode {mode:04o})", dir.display());
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "the folder {} belongs to {}, who could replace a token file in it",
            shown(),
            user_name(meta.uid())
        ));
    }
    let others_write = mode & 0o002 != 0 || (mode & 0o020 != 0 && !private_group(meta.gid()));
    let sticky = mode & 0o1000 != 0;
    if others_write && (own || !sticky) {
        return Err(format!(
            "the folder {} can be written by other users, who could replace a token file in it or redirect it",
            shown()
        ));
    }
    Ok(())
}

/// Whether group `gid` holds no user but this one: a user-private group, where a writable
/// folder is writable by its owner alone.
fn private_group(gid: u32) -> bool {
    let me = nix::unistd::getegid().as_raw();
    if gid != me {
        return false;
    }
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name);
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => group.mem.iter().all(|m| Some(m) == user.as_ref()),
        _ => false,
    }
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("user {} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Creates `dir` and its missing parents, private to the daemon's user (0700). With `group`, the
/// folders this call creates are given to that group with mode 0710: members can open a file
/// whose name they know (the socket, a token file shared with them) but cannot list the folder.
/// Folders that already exist are left as their owner set them; if the group cannot enter the
/// last one, a warning says what to change.
pub fn make_dir(dir: &Path, group: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    if missing.is_empty() {
        // The common case (every sink write after the first): nothing to create.
        if let Some(gid) = group {
            let meta =
                fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let group_enters = meta.gid() == gid && meta.mode() & 0o010 != 0;
            if !group_enters && meta.mode() & 0o001 == 0 {
                tracing::warn!(
                    "group {gid} cannot enter {} (mode {:o}, group {}): run `chgrp {gid} {0}; chmod g+x {0}` to share what is in it",
                    dir.display(),
                    meta.mode() & 0o7777,
                    meta.gid()
                );
            }
        }
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
    let Some(gid) = group else {
        return Ok(());
    };
    for created in &missing {
        std::os::unix::fs::chown(created, None, Some(gid)).map_err(|e| {
            format!(
                "cannot give folder {} to group {gid}: {e}",
                created.display()
            )
        })?;
        fs::set_permissions(created, fs::Permissions::from_mode(0o710))
            .map_err(|e| format!("cannot set the mode of {}: {e}", created.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn folders_are_shared_with_a_group_only_when_created_here() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getegid().as_raw();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        // Created here: every new folder is the group's, 0710.
        let nested = dir.path().join("new/sub");
        make_dir(&nested, Some(gid)).unwrap();
        assert_eq!(
            (mode(&dir.path().join("new")), mode(&nested)),
            (0o710, 0o710)
        );
        assert_eq!(std::fs::metadata(&nested).unwrap().gid(), gid);
        // Already there: left as its owner set it.
        let existing = dir.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o750)).unwrap();
        make_dir(&existing, Some(gid)).unwrap();
        assert_eq!(mode(&existing), 0o750);
        // Without a group: private.
        let private = dir.path().join("private/x");
        make_dir(&private, None).unwrap();
        assert_eq!(mode(&private), 0o700);
    }

    #[test]
    fn every_spelling_of_a_place_resolves_alike() {
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(base.join("state")).unwrap();
        std::os::unix::fs::symlink(base.join("state"), base.join("alias")).unwrap();
        std::os::unix::fs::symlink("../state", base.join("state/up")).unwrap();
        // A link to a folder that does not exist yet still resolves to where it would be.
        std::os::unix::fs::symlink(base.join("later"), base.join("dangling")).unwrap();
        let db = base.join("state/state.db");
        for spelled in [
            base.join("alias/state.db"),
            base.join("state/./state.db"),
            base.join("alias/../state/state.db"),
            base.join("state/up/state.db"),
            PathBuf::from(format!("{}//state/state.db", base.display())),
        ] {
            assert_eq!(resolve(&spelled), db, "{}", spelled.display());
        }
        assert_eq!(resolve(&base.join("dangling/x")), base.join("later/x"));
        // `..` after a link climbs from where the link leads, as the kernel does.
        fs::create_dir_all(base.join("deep/er")).unwrap();
        std::os::unix::fs::symlink(base.join("deep/er"), base.join("hop")).unwrap();
        assert_eq!(resolve(&base.join("hop/../x")), base.join("deep/x"));
        // A loop ends.
        std::os::unix::fs::symlink(base.join("loop"), base.join("loop")).unwrap();
        let _ = resolve(&base.join("loop/x"));
    }

    #[test]
    fn protected_files_are_found_through_links_hard_links_and_missing_folders() {
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(base.join("state")).unwrap();
        fs::write(base.join("config.yaml"), "x").unwrap();
        fs::write(base.join("secret"), "s").unwrap();
        let protected = Protected::new(
            vec![
                (base.join("config.yaml"), "the configuration".into()),
                (base.join("secret"), "a secret file".into()),
                (base.join("run/oauth2mci.sock"), "the socket".into()),
            ],
            vec![(base.join("state"), "the state folder".into())],
        );
        let check = |p: &Path| protected.check_target(&Place::of(p).unwrap());
        std::os::unix::fs::symlink(&base, base.join("again")).unwrap();
        fs::hard_link(base.join("secret"), base.join("linked")).unwrap();
        for (sink, what) in [
            (base.join("state/state.db-wal"), "state folder"),
            (base.join("again/state/lock"), "state folder"),
            (base.join("again/config.yaml"), "the configuration"),
            (base.join("linked"), "a secret file"),
            (base.join("run/../run/oauth2mci.sock"), "the socket"),
        ] {
            let e = check(&sink).unwrap_err();
            assert!(e.contains(what), "{}: {e}", sink.display());
        }
        assert!(check(&base.join("run/tokens/mail")).is_ok());
        // The socket's folder made later: it is then known by identity, through any alias.
        fs::create_dir(base.join("run")).unwrap();
        protected.refresh();
        std::os::unix::fs::symlink(base.join("run"), base.join("runtime")).unwrap();
        assert!(check(&base.join("runtime/oauth2mci.sock")).is_err());
        // What is not a regular file is never replaced.
        assert!(check(&base.join("state")).is_err());
        let e = check(Path::new("/dev/null")).unwrap_err();
        assert!(e.contains("a device"), "{e}");
        nix::unistd::mkfifo(&base.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(check(&base.join("fifo")).unwrap_err().contains("a FIFO"));
        std::os::unix::fs::symlink(base.join("x"), base.join("link")).unwrap();
        assert!(
            check(&base.join("link"))
                .unwrap_err()
                .contains("symbolic link")
        );
    }

    #[test]
    fn folders_others_can_write_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        let set =
            |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        let shared = base.join("shared");
        fs::create_dir(&shared).unwrap();
        set(&shared, 0o777);
        let e = folder_is_safe(&shared).unwrap_err();
        assert!(
            e.contains("can be written by other users") && e.contains("0777"),
            "{e}"
        );
        // Sticky: fine above the token's folder, not as its folder.
        set(&shared, 0o1777);
        assert!(folder_is_safe(&shared).is_err());
        let private = shared.join("mine");
        fs::create_dir(&private).unwrap();
        set(&private, 0o700);
        assert_eq!(folder_is_safe(&private), Ok(()));
        // Not made yet: judged by the folders above it.
        assert_eq!(folder_is_safe(&private.join("new/deeper")), Ok(()));
        set(&shared, 0o777);
        assert!(
            folder_is_safe(&private).is_err(),
            "a writable parent lets others move it"
        );
        assert!(folder_is_safe(&shared.join("new")).is_err());
    }
}
