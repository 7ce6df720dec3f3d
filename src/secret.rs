//! `Secret`: a string that must never reach a log, an error message or `status`.
//!
//! Debug and Display print `[redacted]`; the only way to the value is `expose()`, so every place
//! that sends a secret over the wire or to a file is easy to find with grep.

use std::fmt;
use std::time::Duration;

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself: only for the wire, the store and the sinks.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// The most a secret command may print or a secret file may hold. Secrets are short (a Google
/// service-account key, the largest, is about 2.4 kB); more is a mistake (a command that prints
/// a file, `/dev/zero` named as the file) and is refused rather than read without end.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Reads a secret file (or systemd credential), the final newline trimmed, refusing one over
/// `MAX_SECRET_BYTES`.
pub fn from_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    // Non-blocking, so that a FIFO is refused below instead of waited on for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| cannot(&e))?;
    let meta = file.metadata().map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file (a FIFO, a device or a folder); a secret is read from a file",
            path.display()
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!(
            "{} holds more than {MAX_SECRET_BYTES} bytes; a secret file holds one secret",
            path.display()
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| cannot(&"not UTF-8 text"))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// Runs `argv` without a shell, in a clean environment and a process group of its own
/// (`children`), and returns what it prints on stdout, the final newline trimmed. Past
/// `timeout` its whole group is killed. Errors name the program and quote its stderr (the
/// first line), never its stdout.
pub fn from_command(argv: &[String], timeout: Duration) -> Result<String, String> {
    // The config fuzzer feeds arbitrary configs through the loader: it must never run them.
    if cfg!(fuzzing) {
        return Err("secret commands are not run under the fuzzer".into());
    }
    let (program, args) = argv.split_first().ok_or("the command is empty")?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    crate::children::prepare(&mut command, []);
    let out = crate::children::run_captured(&mut command, timeout, MAX_SECRET_BYTES as usize)
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let Some(status) = out.status else {
        return Err(format!(
            "{program:?} did not finish within {}; killed",
            crate::duration::show(timeout)
        ));
    };
    // First, as the cap stops the reading: the command may then die of SIGPIPE, and its exit
    // status would hide the reason.
    if out.stdout.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!(
            "{program:?} printed more than {MAX_SECRET_BYTES} bytes; a secret is one line"
        ));
    }
    if !status.success() {
        let first = String::from_utf8_lossy(&out.stderr);
        let first = first
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        return Err(format!("{program:?} failed ({status}): {first}"));
    }
    let text = String::from_utf8(out.stdout)
        .map_err(|_| format!("{program:?} printed something that is not UTF-8"))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_give_their_output_or_a_clear_error() {
        let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let long = Duration::from_secs(10);
        assert_eq!(
            from_command(&sh("printf 's3cret\\n'"), long).unwrap(),
            "s3cret"
        );
        let e = from_command(&sh("echo no vault >&2; exit 3"), long).unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.contains("no vault"),
            "{e}"
        );
        let e = from_command(&sh("sleep 5"), Duration::from_millis(100)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        let e = from_command(&["/nonexistent/vault".to_string()], long).unwrap_err();
        assert!(e.contains("cannot run"), "{e}");
        let e = from_command(&sh("head -c 100000 /dev/zero"), long).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        // stdout never shows in an error, even when the command fails after printing.
        let e = from_command(&sh("echo hunter2; exit 1"), long).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn files_give_their_first_secret_or_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "hunter2\n").unwrap();
        assert_eq!(from_file(&path).unwrap(), "hunter2");
        let e = from_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("is not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 100_000]).unwrap();
        let e = from_file(&big).unwrap_err();
        assert!(e.contains("more than 65536 bytes"), "{e}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = from_file(&fifo).unwrap_err();
        assert!(e.contains("is not a regular file"), "{e}");
        std::fs::write(&path, b"\xff\xfe").unwrap();
        assert!(from_file(&path).unwrap_err().contains("not UTF-8"));
        let e = from_file(&dir.path().join("none")).unwrap_err();
        assert!(
            e.starts_with("cannot read ") && e.contains("No such file"),
            "{e}"
        );
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
