//! Sinks: token files for consumers that read a file rather than the socket.
//!
//! A sink is written atomically: a temporary file in the same folder, with its final mode from
//! the start, written, fsynced, renamed over the old one, and the folder fsynced. A reader sees
//! the old token or the new one, never half of one. This module never sees a token that is not
//! yet committed to the store: `registry` calls it only after the commit returned.

use crate::config::{SinkConfig, SinkFormat};
use crate::token::TokenSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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
            let prefix = env_prefix(client);
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

/// The variables' prefix: the client's name in capitals, anything but letters and digits as `_`
/// (a name may start with a digit, which no variable may).
fn env_prefix(client: &str) -> String {
    let name: String = client
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{name}")
    } else {
        name
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

/// Creates `dir` and its missing parents, private to the daemon's user (0700). With `group`, the
/// folders this call creates are given to that group with mode 0710: members can open a file
/// whose name they know (the socket, a token file shared with them) but cannot list the folder.
/// Folders that already exist are left as their owner set them; if the group cannot enter the
/// last one, a warning says what to change.
pub fn make_dir(dir: &Path, group: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

/// Writes one sink atomically.
pub fn write(sink: &SinkConfig, client: &str, token: &TokenSet) -> Result<(), SinkError> {
    let bytes = render(sink.format, client, token).map_err(|m| err(&sink.path, m))?;
    write_bytes(
        &sink.path,
        bytes.as_bytes(),
        sink.mode,
        sink.group.as_ref().map(|g| g.gid),
    )
}

/// Removes a sink's file (after revocation or when a token may no longer be used).
pub fn clear(sink: &SinkConfig) -> Result<(), SinkError> {
    match fs::remove_file(&sink.path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(&sink.path, format!("cannot remove: {e}"))),
    }
}

fn err(path: &Path, message: String) -> SinkError {
    SinkError {
        path: path.display().to_string(),
        message,
    }
}

pub fn write_bytes(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    gid: Option<u32>,
) -> Result<(), SinkError> {
    let dir = path
        .parent()
        .ok_or_else(|| err(path, "has no parent folder".into()))?;
    make_dir(dir, gid).map_err(|m| err(path, m))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("token");
    let tmp = dir.join(format!(".{name}.{}.tmp", crate::oauth::random_token(6)));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| err(path, format!("cannot create {}: {e}", tmp.display())))?;
        // The umask may have narrowed the mode given to open(); set it exactly.
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| err(path, format!("cannot set mode: {e}")))?;
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&f, None, Some(gid))
                .map_err(|e| err(path, format!("cannot give the file to group {gid}: {e}")))?;
        }
        f.write_all(bytes)
            .map_err(|e| err(path, format!("write failed: {e}")))?;
        f.sync_all()
            .map_err(|e| err(path, format!("fsync failed: {e}")))?;
        fs::rename(&tmp, path).map_err(|e| err(path, format!("rename failed: {e}")))?;
        // The rename is durable only once the folder itself is synced.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(path, format!("folder fsync failed: {e}")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
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
        write_bytes(&path, b"one", 0o600, None).unwrap();
        write_bytes(&path, b"two", 0o640, None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }
}
