//! Notification hooks: the commands the user configured for events (`notify.on_reauth_needed`...).
//!
//! A hook runs without a shell (argv as written), with `{client}`, `{event}`, `{error}` (also
//! `{reason}`), `{url}`, `{user_code}`, `{verification_uri}`, `{provider}` and `{failures}`
//! substituted in its arguments and every field in an `OAUTH2MCI_*` environment variable. The
//! access token travels only in `OAUTH2MCI_ACCESS_TOKEN` of a refresh event, and only for a
//! client that opts in (`notify_token: true`), never in argv (which `ps` shows to everyone).
//! A hook still running after the configured timeout is killed. Deciding *when* to notify
//! (once per incident, repeats) is the registry's job; this module only runs and reports.

use crate::config::NotifyConfig;
use crate::secret::Secret;
use std::process::Stdio;
use std::time::Duration;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only the user can help: authorize again.
    ReauthNeeded,
    /// Repeated failures that may need attention.
    Error,
    /// A new token was committed.
    Refreshed,
    Warning,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::ReauthNeeded => "reauth_needed",
            Kind::Error => "error",
            Kind::Refreshed => "refresh",
            Kind::Warning => "warning",
        }
    }

    fn command(self, cfg: &NotifyConfig) -> Option<&Vec<String>> {
        match self {
            Kind::ReauthNeeded => cfg.on_reauth_needed.as_ref(),
            Kind::Error => cfg.on_error.as_ref(),
            Kind::Refreshed => cfg.on_refresh.as_ref(),
            Kind::Warning => cfg.on_warning.as_ref(),
        }
    }
}

/// One event, as a hook sees it. Empty strings are fields that do not apply.
#[derive(Debug, Clone)]
pub struct Notice {
    pub kind: Kind,
    pub client: String,
    pub provider: String,
    /// The reason or error, one line.
    pub error: String,
    /// Where the user goes: an authorization URL, or the device verification URI.
    pub url: String,
    pub user_code: String,
    pub verification_uri: String,
    /// Consecutive failed attempts (error events).
    pub failures: u32,
    /// When the access token expires, Unix seconds (refresh events).
    pub expires_at: Option<i64>,
    /// Only for refresh events of clients with `notify_token: true`.
    pub access_token: Option<Secret>,
}

impl Notice {
    pub fn new(kind: Kind, client: &str, error: &str) -> Notice {
        Notice {
            kind,
            client: client.to_string(),
            provider: String::new(),
            error: error.to_string(),
            url: String::new(),
            user_code: String::new(),
            verification_uri: String::new(),
            failures: 0,
            expires_at: None,
            access_token: None,
        }
    }

    /// Where the user should go, from a started authorization.
    pub fn with_action(mut self, action: Option<&crate::wire::AuthorizeReply>) -> Notice {
        if let Some(a) = action {
            self.url = a.url.clone();
            self.user_code = a.user_code.clone().unwrap_or_default();
            self.verification_uri = a.verification_uri.clone().unwrap_or_default();
        }
        self
    }
}

/// Runs the hook for `notice`, if one is configured, as a tracked background task.
pub fn send(cfg: &NotifyConfig, notice: Notice, tasks: &TaskTracker) {
    let Some(argv) = notice.kind.command(cfg).cloned() else {
        return;
    };
    let timeout = cfg.timeout;
    tasks.spawn(async move {
        if let Err(message) = run(&argv, &notice, timeout).await {
            tracing::warn!(client = %notice.client, event = notice.kind.name(), "notification hook failed: {message}");
        }
    });
}

/// `arg` with each placeholder (`config::values::PLACEHOLDERS`) replaced by its value.
fn substitute(arg: &str, n: &Notice) -> String {
    let mut out = arg.to_string();
    for (placeholder, _) in crate::config::values::PLACEHOLDERS {
        if !out.contains(placeholder) {
            continue;
        }
        let value = match placeholder {
            "{client}" => n.client.clone(),
            "{event}" => n.kind.name().to_string(),
            "{provider}" => n.provider.clone(),
            "{failures}" => n.failures.to_string(),
            "{url}" => n.url.clone(),
            "{user_code}" => n.user_code.clone(),
            "{verification_uri}" => n.verification_uri.clone(),
            // {error} and {reason}: the same text.
            _ => n.error.clone(),
        };
        out = out.replace(placeholder, &value);
    }
    out
}

fn environment(n: &Notice) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("OAUTH2MCI_EVENT", n.kind.name().to_string()),
        ("OAUTH2MCI_CLIENT", n.client.clone()),
        ("OAUTH2MCI_PROVIDER", n.provider.clone()),
        ("OAUTH2MCI_ERROR", n.error.clone()),
        ("OAUTH2MCI_REASON", n.error.clone()),
        ("OAUTH2MCI_URL", n.url.clone()),
        ("OAUTH2MCI_USER_CODE", n.user_code.clone()),
        ("OAUTH2MCI_VERIFICATION_URI", n.verification_uri.clone()),
        ("OAUTH2MCI_FAILURES", n.failures.to_string()),
        (
            "OAUTH2MCI_EXPIRES_AT",
            n.expires_at.map(|t| t.to_string()).unwrap_or_default(),
        ),
    ];
    if let Some(t) = &n.access_token {
        env.push(("OAUTH2MCI_ACCESS_TOKEN", t.expose().to_string()));
    }
    env
}

async fn run(argv: &[String], n: &Notice, timeout: Duration) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let args: Vec<String> = argv.iter().map(|a| substitute(a, n)).collect();
    let (program, rest) = args.split_first().ok_or("empty command")?;
    crate::children::may_start().map_err(|e| format!("{program:?} not started: {e}"))?;
    let mut command = std::process::Command::new(program);
    command.args(rest);
    crate::children::prepare(&mut command, environment(n));
    let mut child = tokio::process::Command::from(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let pid = child.id().unwrap_or(0);
    crate::children::track(pid);
    let stderr = child.stderr.take();
    // Read beside the wait: a hook that fills the pipe must not block on it.
    let reader = tokio::spawn(async move {
        let mut err = String::new();
        if let Some(s) = stderr {
            let _ = s.take(4096).read_to_string(&mut err).await;
        }
        err
    });
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Err(_) => {
            crate::children::kill_group(pid);
            let _ = child.wait().await;
            reader.abort();
            return Err(format!(
                "{program:?} still running after {}; killed with its process group",
                crate::duration::show(timeout)
            ));
        }
        Ok(Err(e)) => return Err(format!("{program:?}: {e}")),
        Ok(Ok(status)) => status,
    };
    if status.success() {
        reader.abort();
        return Ok(());
    }
    // What is left in the pipe, for a moment: a background job of the hook may hold it open.
    let err = match tokio::time::timeout(Duration::from_millis(200), reader).await {
        Ok(Ok(err)) => err,
        _ => String::new(),
    };
    Err(format!(
        "{program:?} exited with {status}: {}",
        crate::text::one_line(err.trim(), 300)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice() -> Notice {
        let mut n = Notice::new(Kind::ReauthNeeded, "mail", "invalid_grant");
        n.url = "http://x".into();
        n.user_code = "ABCD-EFGH".into();
        n
    }

    #[tokio::test]
    async fn runs_without_a_shell_with_substitutions_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            format!(
                "echo \"$0 $1 $OAUTH2MCI_EVENT $OAUTH2MCI_ERROR $OAUTH2MCI_USER_CODE ${{OAUTH2MCI_ACCESS_TOKEN-none}}\" > {}",
                out.display()
            ),
            "{client}".to_string(),
            "{url}".to_string(),
        ];
        run(&argv, &notice(), Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "mail http://x reauth_needed invalid_grant ABCD-EFGH none\n"
        );
    }

    #[tokio::test]
    async fn reports_failures_and_kills_slow_hooks() {
        let e = run(&["false".to_string()], &notice(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.contains("exited with"));
        let e = run(
            &["sleep".to_string(), "10".to_string()],
            &notice(),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(e.contains("killed with its process group"), "{e}");
        let e = run(
            &["/nonexistent/x".to_string()],
            &notice(),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(e.contains("cannot start"));
    }
}
