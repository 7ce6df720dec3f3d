//! Notification hooks: the commands the user configured for events (`notify.on_reauth_needed`...).
//!
//! A hook runs without a shell (argv as written), with `{client}`, `{event}`, `{error}` and
//! `{url}` substituted in its arguments and the same values in `OAUTH2MCI_*` environment
//! variables; it never receives a token. It is killed after the configured timeout. Deciding *when*
//! to notify (once per incident) is the caller's job; this module only runs and reports.

use crate::config::NotifyConfig;
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

#[derive(Debug, Clone)]
pub struct Notice {
    pub kind: Kind,
    pub client: String,
    pub error: String,
    pub url: String,
}

impl Notice {
    /// A notice without a URL (only authorization notices carry one).
    pub fn new(kind: Kind, client: &str, error: &str) -> Notice {
        Notice {
            kind,
            client: client.to_string(),
            error: error.to_string(),
            url: String::new(),
        }
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

fn substitute(arg: &str, n: &Notice) -> String {
    arg.replace("{client}", &n.client)
        .replace("{event}", n.kind.name())
        .replace("{error}", &n.error)
        .replace("{url}", &n.url)
}

async fn run(argv: &[String], n: &Notice, timeout: Duration) -> Result<(), String> {
    let args: Vec<String> = argv.iter().map(|a| substitute(a, n)).collect();
    let (program, rest) = args.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .env("OAUTH2MCI_EVENT", n.kind.name())
        .env("OAUTH2MCI_CLIENT", &n.client)
        .env("OAUTH2MCI_ERROR", &n.error)
        .env("OAUTH2MCI_URL", &n.url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let mut stderr = child.stderr.take();
    let waited = tokio::time::timeout(timeout, async {
        let mut err = String::new();
        if let Some(s) = stderr.as_mut() {
            use tokio::io::AsyncReadExt;
            let _ = s.take(4096).read_to_string(&mut err).await;
        }
        (child.wait().await, err)
    })
    .await;
    match waited {
        Err(_) => Err(format!(
            "{program:?} still running after {}; killed",
            humantime::format_duration(timeout)
        )),
        Ok((Err(e), _)) => Err(format!("{program:?}: {e}")),
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), err)) => Err(format!("{program:?} exited with {status}: {}", err.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice() -> Notice {
        Notice {
            kind: Kind::ReauthNeeded,
            client: "mail".into(),
            error: "invalid_grant".into(),
            url: "http://x".into(),
        }
    }

    #[tokio::test]
    async fn runs_without_a_shell_with_substitutions_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            format!(
                "echo \"$0 $OAUTH2MCI_EVENT $OAUTH2MCI_ERROR\" > {}",
                out.display()
            ),
            "{client}".to_string(),
        ];
        run(&argv, &notice(), Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "mail reauth_needed invalid_grant\n"
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
        assert!(e.contains("killed"));
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
