//! Sinks: token files for consumers that read a file rather than the socket.
//!
//! A sink is written atomically: a temporary file in the same folder, with its final mode from
//! the start, written, fsynced, renamed over the old one, and the folder fsynced. A reader sees
//! the old token or the new one, never half of one. This module never sees a token that is not
//! yet committed to the store: `registry` calls it only after the commit returned.

use crate::config::{SinkConfig, SinkFormat};
pub use crate::files::make_dir;
use crate::files::{Place, Protected};
use crate::token::TokenSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {message}")]
pub struct SinkError {
    pub path: String,
    pub message: String,
}

/// The bytes of a sink file, or why this token cannot be written in this format. Each format
/// is unable to carry more than the token: `raw` and `header` are one line, `json` is JSON, and
/// `env` quotes every value so that `sh`'s `.`, bash's `source`, systemd's `EnvironmentFile=`
/// and `env -S` all read back exactly the value and evaluate nothing. Tokens are checked when
/// they arrive (`token::check_token_bytes`); these checks hold whatever reaches them.
pub fn render(format: SinkFormat, client: &str, token: &TokenSet) -> Result<String, String> {
    let at = token.access_token.expose();
    let one_line = |what: &str, v: &str| {
        if v.is_empty() || v.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            Err(format!(
                "the {what} is empty or holds a space or a control character; not written"
            ))
        } else {
            Ok(())
        }
    };
    one_line("access token", at)?;
    match format {
        SinkFormat::Raw => Ok(format!("{at}\n")),
        SinkFormat::Header => {
            one_line("token type", &token.token_type)?;
            Ok(format!("Authorization: {} {at}\n", token.token_type))
        }
        SinkFormat::Json => {
            let mut v = serde_json::json!({
                "access_token": at,
                "token_type": token.token_type,
                "expires_at": token.expires_at.map(|ms| ms / 1000),
                "scope": token.scope,
            });
            if !token.extra.is_empty()
                && let Some(map) = v.as_object_mut()
            {
                map.insert(
                    "extra".into(),
                    serde_json::Value::Object(token.extra.clone()),
                );
            }
            Ok(format!("{v}\n"))
        }
        SinkFormat::Env => {
            let prefix = crate::config::values::env_prefix(client);
            let mut out = format!(
                "{prefix}_ACCESS_TOKEN={}\n{prefix}_TOKEN_TYPE={}\n",
                env_quoted(at)?,
                env_quoted(&token.token_type)?
            );
            if let Some(exp) = token.expires_at {
                out.push_str(&format!("{prefix}_EXPIRES_AT='{}'\n", exp / 1000));
            }
            Ok(out)
        }
    }
}

/// `value` in single quotes, which `sh`, systemd's `EnvironmentFile=` and `env -S` all take
/// literally, `$`, backquotes and double quotes included. The two bytes they do not agree on
/// inside single quotes, `'` itself and `\` (an escape for `env -S`), and anything that is not
/// visible ASCII, cannot be written so that all three read the same: refused.
fn env_quoted(value: &str) -> Result<String, String> {
    match value
        .bytes()
        .find(|b| !matches!(b, b' '..=b'~') || matches!(b, b'\'' | b'\\'))
    {
        None => Ok(format!("'{value}'")),
        Some(_) => Err(
            "the token holds a quote, a backslash or a byte outside visible ASCII, which an env file cannot carry for every reader; not written (use the raw or json format)".into(),
        ),
    }
}

/// What a token file may not touch, and how strictly its folder is judged.
#[derive(Clone, Copy)]
pub struct Guard<'a> {
    pub protected: &'a Protected,
    /// Refuse a folder other users can write (`files::folder_is_safe`).
    pub strict: bool,
}

/// Writes one sink atomically.
pub fn write(
    sink: &SinkConfig,
    client: &str,
    token: &TokenSet,
    protected: &Protected,
) -> Result<(), SinkError> {
    let bytes = render(sink.format, client, token).map_err(|m| err(&sink.path, m))?;
    let guard = Guard {
        protected,
        strict: sink.strict,
    };
    write_bytes(
        &sink.path,
        bytes.as_bytes(),
        sink.mode,
        sink.group.as_ref().map(|g| g.gid),
        guard,
    )
}

/// Removes a sink's file (after revocation or when a token may no longer be used): only a
/// regular file that is not one of the daemon's own, however the path now leads.
pub fn clear(sink: &SinkConfig, protected: &Protected) -> Result<(), SinkError> {
    let path = &sink.path;
    let (dir, name) = split(path)?;
    let folder = match open_folder(dir) {
        Ok(folder) => folder,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(path, format!("cannot open its folder: {e}"))),
    };
    let place = Place::in_open_folder(&folder, name)
        .map_err(|e| err(path, format!("cannot look at it: {e}")))?;
    if place.existing.is_none() {
        return Ok(());
    }
    protected
        .check_target(&place)
        .map_err(|m| err(path, format!("not removed: it {m}")))?;
    match nix::unistd::unlinkat(&folder, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(err(path, format!("cannot remove: {e}"))),
    }
}

fn err(path: &Path, message: String) -> SinkError {
    SinkError {
        path: path.display().to_string(),
        message,
    }
}

fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr), SinkError> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(err(path, "names no file in a folder".into())),
    }
}

fn open_folder(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY)
        .open(dir)
}

/// Writes `bytes` to `path` atomically: a new file beside it, written and synced, renamed over
/// the old one, and the folder synced. Every step goes through the folder opened once, which
/// is checked first (`guard`): a folder or link swapped meanwhile cannot send the write
/// elsewhere.
pub fn write_bytes(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    gid: Option<u32>,
    guard: Guard,
) -> Result<(), SinkError> {
    let (dir, name) = split(path)?;
    make_dir(dir, gid).map_err(|m| err(path, m))?;
    let folder = open_folder(dir).map_err(|e| err(path, format!("cannot open its folder: {e}")))?;
    if guard.strict {
        check_open_folder(&folder, dir).map_err(|m| {
            err(
                path,
                format!("{m}; not written (strict_modes: false allows it)"),
            )
        })?;
    }
    let place = Place::in_open_folder(&folder, name)
        .map_err(|e| err(path, format!("cannot look at it: {e}")))?;
    guard
        .protected
        .check_target(&place)
        .map_err(|m| err(path, format!("not written: it {m}")))?;
    let tmp = format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        crate::random::token(6)
    );
    let result = write_in(&folder, &tmp, name, bytes, mode, gid).map_err(|m| err(path, m));
    if result.is_err() {
        let _ = nix::unistd::unlinkat(
            &folder,
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    result
}

/// The folder open as `folder` (found at `dir`) and the folders above it, judged as
/// `files::folder_is_safe` does: the open one by its descriptor.
fn check_open_folder(folder: &File, dir: &Path) -> Result<(), String> {
    let meta = folder
        .metadata()
        .map_err(|e| format!("cannot read its folder: {e}"))?;
    crate::files::check_one_folder(dir, &meta, true)?;
    match crate::files::resolve(dir).parent() {
        Some(above) => crate::files::folder_is_safe_above(above),
        None => Ok(()),
    }
}

fn write_in(
    folder: &File,
    tmp: &str,
    name: &std::ffi::OsStr,
    bytes: &[u8],
    mode: u32,
    gid: Option<u32>,
) -> Result<(), String> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsFd;
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(
        folder.as_fd(),
        tmp,
        flags,
        nix::sys::stat::Mode::from_bits_truncate(mode),
    )
    .map_err(|e| format!("cannot create {tmp}: {e}"))?;
    let mut f = File::from(fd);
    // The umask may have narrowed the mode given to open(); set it exactly.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| format!("cannot set mode: {e}"))?;
    if let Some(gid) = gid {
        std::os::unix::fs::fchown(&f, None, Some(gid))
            .map_err(|e| format!("cannot give the file to group {gid}: {e}"))?;
    }
    f.write_all(bytes)
        .map_err(|e| format!("write failed: {e}"))?;
    f.sync_all().map_err(|e| format!("fsync failed: {e}"))?;
    nix::fcntl::renameat(folder.as_fd(), tmp, folder.as_fd(), name)
        .map_err(|e| format!("rename failed: {e}"))?;
    // The rename is durable only once the folder itself is synced.
    folder
        .sync_all()
        .map_err(|e| format!("folder fsync failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn token() -> TokenSet {
        TokenSet {
            access_token: Secret::new("AT"),
            token_type: "Bearer".into(),
            refresh_token: Some(Secret::new("RT")),
            id_token: None,
            scope: Some("a b".into()),
            expires_at: Some(1_700_000_000_000),
            refresh_expires_at: None,
            obtained_at: 0,
            granted_at: 0,
            extra: Default::default(),
            refresh_expiry_slides: false,
        }
    }

    #[test]
    fn formats() {
        let t = token();
        let render = |f, c, t| render(f, c, t).unwrap();
        assert_eq!(render(SinkFormat::Raw, "x", &t), "AT\n");
        assert_eq!(
            render(SinkFormat::Header, "x", &t),
            "Authorization: Bearer AT\n"
        );
        assert_eq!(
            render(SinkFormat::Env, "gmail-work", &t),
            "GMAIL_WORK_ACCESS_TOKEN='AT'\nGMAIL_WORK_TOKEN_TYPE='Bearer'\nGMAIL_WORK_EXPIRES_AT='1700000000'\n"
        );
        assert!(render(SinkFormat::Env, "2fa", &t).starts_with("_2FA_ACCESS_TOKEN="));
        let json: serde_json::Value =
            serde_json::from_str(&render(SinkFormat::Json, "x", &t)).unwrap();
        assert_eq!(json["expires_at"], 1_700_000_000);
        assert!(
            !render(SinkFormat::Json, "x", &t).contains("RT"),
            "sinks never carry the refresh token"
        );
    }

    #[test]
    fn no_format_carries_more_than_the_token() {
        let mut t = token();
        for bad in ["a\nB=1", "a\rb", "a b", "a\0b", ""] {
            t.access_token = Secret::new(bad);
            for format in [
                SinkFormat::Raw,
                SinkFormat::Header,
                SinkFormat::Env,
                SinkFormat::Json,
            ] {
                assert!(
                    super::render(format, "x", &t).is_err(),
                    "{bad:?} as {format:?}"
                );
            }
        }
        // Visible ASCII that shells would evaluate is quoted; what cannot be quoted for every
        // reader is refused.
        t.access_token = Secret::new("$(id)`id`\"x\"");
        assert_eq!(
            super::render(SinkFormat::Env, "x", &t)
                .unwrap()
                .lines()
                .next(),
            Some("X_ACCESS_TOKEN='$(id)`id`\"x\"'")
        );
        for bad in ["it's", "back\\slash", "caf\u{e9}"] {
            t.access_token = Secret::new(bad);
            assert!(super::render(SinkFormat::Env, "x", &t).is_err(), "{bad:?}");
        }
        t.access_token = Secret::new("AT");
        t.token_type = "Bearer\r\nX-Injected: 1".into();
        assert!(super::render(SinkFormat::Header, "x", &t).is_err());
        assert!(super::render(SinkFormat::Env, "x", &t).is_err());
    }

    #[test]
    fn atomic_write_replaces_with_exact_mode_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep/er/tok");
        let protected = Protected::default();
        let guard = Guard {
            protected: &protected,
            strict: true,
        };
        write_bytes(&path, b"one", 0o600, None, guard).unwrap();
        write_bytes(&path, b"two", 0o640, None, guard).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }
}
