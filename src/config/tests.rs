use super::*;

const GOOD: &str = r#"
paths:
  state: state
  runtime: run
refresh:
  before_expiry: 10%
  jitter: 5%
clients:
  local:
    provider:
      authorize_url: http://127.0.0.1:9/auth
      token_url: http://127.0.0.1:9/token
    client_id: app
    client_secret: s3cret
    scopes: [openid, offline_access]
    sinks:
      - { path: tokens/local, format: raw }
      - { path: /tmp/x.json, format: json, mode: "0640" }
"#;

fn parse_at(src: &str) -> Result<Config, ConfigError> {
    parse(src, Path::new("/etc/o/config.yaml"))
}

/// Each config is refused at `line:column` with a message holding the fragment.
fn assert_refused(cases: &[(String, &str, &str)]) {
    for (src, position, fragment) in cases {
        let shown = match parse_at(src) {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            shown.starts_with(&format!("/etc/o/config.yaml:{position}: "))
                && shown.contains(fragment),
            "{src}\nexpected {position} {fragment:?}, got: {shown}"
        );
    }
}

#[test]
fn a_good_config_resolves() {
    let c = parse_at(GOOD).unwrap();
    assert_eq!(c.paths.state_dir, PathBuf::from("/etc/o/state"));
    assert_eq!(c.paths.socket, PathBuf::from("/etc/o/run/oauth2mci.sock"));
    let local = &c.clients["local"];
    assert_eq!(
        local.sinks[0].path,
        PathBuf::from("/etc/o/run/tokens/local")
    );
    assert_eq!(local.sinks[1].mode, 0o640);
    assert!(local.pkce);
    assert_eq!(local.client_auth(), ClientAuth::Basic);
    assert_eq!(local.refresh.jitter, 0.05);
    assert_eq!(local.refresh.at_least, Some(Duration::from_secs(86400)));
}

/// Each bad config with the `line:column` and a fragment of the message it must produce.
#[test]
fn bad_configs_are_refused_with_their_position() {
    let cases: &[(&str, &str, &str)] = &[
        ("clients: [", "1:10", "expected a map from client name"),
        ("clientz: {}\n", "1:1", "unknown field `clientz`"),
        (
            "refresh:\n  jitter: 5x\nclients: {}\n",
            "2:11",
            "refresh.jitter: expected a percentage",
        ),
        (
            "refresh:\n  jitter: 80%\nclients: {}\n",
            "2:11",
            "must be at most 50%",
        ),
        (
            "refresh:\n  min_before_expiry: 60\nclients: {}\n",
            "2:22",
            "needs a unit",
        ),
        (
            "refresh:\n  before_expiry: 100%\nclients: {}\n",
            "2:18",
            "below 100%",
        ),
        (
            "refresh:\n  retry: {initial: 1m, max: 10s}\nclients: {}\n",
            "2:29",
            "shorter than retry.initial",
        ),
        (
            "clients:\n  a:\n    client_id: x\n",
            "3:5",
            "no token endpoint",
        ),
        (
            "clients:\n  a:\n    provider: gogle\n    client_id: x\n",
            "3:15",
            "unknown provider \"gogle\"",
        ),
        (
            "clients:\n  a:\n    provider: {token_url: x}\n    client_id: x\n",
            "3:15",
            "is not a URL",
        ),
        (
            "clients:\n  a:\n    provider: {tokn_url: x}\n    client_id: x\n",
            "3:16",
            "unknown field `tokn_url`",
        ),
        (
            "clients:\n  a:\n    provider: {token_url: \"http://example.com/t\"}\n    client_id: x\n    grant: client_credentials\n    client_secret: s\n",
            "3:15",
            "plain http",
        ),
        (
            "clients:\n  a: {client_id: x}\n  a: {client_id: y}\n",
            "3:3",
            "defined twice",
        ),
        ("clients:\n  a b: {client_id: x}\n", "2:3", "client name"),
        (
            "clients:\n  a:\n    sinks: []\n",
            "3:5",
            "missing field `client_id`",
        ),
        (
            "clients:\n  a:\n    client_id: \"\"\n",
            "3:16",
            "must not be empty",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    grant: device\n",
            "4:12",
            "unknown variant `device`",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    client_secret: {file: /nonexistent/s}\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "4:20",
            "cannot read /nonexistent/s",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    client_secret: {file: a, env: B}\n",
            "4:20",
            "exactly one of",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    client_secret: {env: OAUTH2MCI_TEST_UNSET_VAR}\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "4:20",
            "OAUTH2MCI_TEST_UNSET_VAR is not set",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    pkce: false\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "3:16",
            "cannot prove who it is",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    redirect_uri: https://example.com/cb\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "4:19",
            "http://127.0.0.1",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    sinks: [{path: t, mode: \"0644\"}]\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "4:29",
            "every user",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    sinks: [{path: t, format: yaml}]\n",
            "4:31",
            "unknown variant `yaml`",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: t}]\n  b:\n    client_id: y\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: t}]\n",
            "9:20",
            "clients.b.sinks[0].path: /run/oauth2mci/t is already written by clients.a.sinks[0]",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    cron: \"99 * * * *\"\n",
            "4:11",
            "not a valid cron",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    scopes: [\"a b\"]\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "4:13",
            "may not contain spaces",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    authorize_params: {state: x}\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n",
            "4:23",
            "set by the daemon",
        ),
        (
            "limits:\n  per_endpoint_concurrency: 0\nclients: {}\n",
            "2:29",
            "from 1 to 10000",
        ),
        (
            "log:\n  level: \"info,[\"\nclients: {}\n",
            "2:3",
            "expected a log level",
        ),
        (
            "notify:\n  on_reauth_needed: []\nclients: {}\n",
            "2:3",
            "first item is the program",
        ),
        (
            "socket:\n  group: no-such-group-oauth2mci\nclients: {}\n",
            "2:10",
            "no group named",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: {base: google, tokn_url: \"https://t/\"}\n",
            "4:30",
            "unknown field `tokn_url`",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider:\n      base: google\n      token_method: GET\n",
            "6:21",
            "set `token_request: query`",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider:\n      base: strava\n      client_auth: both\n",
            "6:20",
            "unknown variant `both`",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: gogle\n",
            "4:15",
            "unknown provider \"gogle\"",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: {base: keycloak}\n",
            "4:15",
            "needs `base_url`",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: x\n    pkce: false\n",
            "5:11",
            "requires PKCE",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: facebook\n",
            "3:5",
            "exchanging them with the client secret",
        ),
        (
            "clients:\n  a:\n    client_id: x\n    provider: {base: google, error_codes: {weird: nonsense}}\n",
            "4:43",
            "not a standard code",
        ),
    ];
    let mut wrong = Vec::new();
    for (src, position, fragment) in cases {
        let shown = match parse_at(src) {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string(),
        };
        if !(shown.starts_with(&format!("/etc/o/config.yaml:{position}: "))
            && shown.contains(fragment))
        {
            wrong.push(format!(
                "config {src:?}\n  expected {position} and {fragment:?}\n  got: {shown}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn empty_file_is_explained() {
    assert!(
        parse_at("  \n")
            .unwrap_err()
            .to_string()
            .contains("the file is empty")
    );
}

#[test]
fn identity_changes_change_the_fingerprint() {
    let a = parse_at(GOOD).unwrap();
    let b = parse_at(&GOOD.replace("offline_access]", "offline_access, email]")).unwrap();
    let c = parse_at(&GOOD.replace("jitter: 5%", "jitter: 7%")).unwrap();
    let (a, b, c) = (
        &a.clients["local"],
        &b.clients["local"],
        &c.clients["local"],
    );
    assert!(!b.same_identity(a));
    assert!(c.same_identity(a));
}

#[test]
fn secrets_never_show_in_debug() {
    let c = parse_at(GOOD).unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn signing_keys_are_read_and_checked_at_load() {
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa.pem");
    let base = "clients:\n  a:\n    provider: {token_url: \"https://as.example/token\", authorize_url: \"https://as.example/auth\"}\n";
    let ok = parse_at(&format!(
        "{base}    grant: client_credentials\n    client_id: x\n    private_key: {{file: {key}}}\n    key_id: k1\n"
    ))
    .unwrap();
    let a = &ok.clients["a"];
    assert_eq!(a.client_auth(), ClientAuth::PrivateKeyJwt);
    assert_eq!(a.jwt.as_ref().unwrap().key.kid.as_deref(), Some("k1"));
    assert!(!format!("{ok:?}").contains("PRIVATE KEY"));

    // A service account names the client; its key signs the grant.
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("sa.json");
    let pem = std::fs::read_to_string(key).unwrap();
    std::fs::write(
        &sa,
        serde_json::json!({"type": "service_account", "client_email": "sa@p.iam", "private_key": pem, "private_key_id": "abc"}).to_string(),
    )
    .unwrap();
    let google = parse_at(&format!(
        "clients:\n  g:\n    provider: google-service-account\n    grant: jwt_bearer\n    service_account_key: {{file: {}}}\n    scopes: [s]\n    subject: alice@example.com\n",
        sa.display()
    ))
    .unwrap();
    let g = &google.clients["g"];
    assert_eq!(g.client_id, "sa@p.iam");
    assert_eq!(g.jwt.as_ref().unwrap().key.kid.as_deref(), Some("abc"));
    assert_eq!(g.client_auth(), ClientAuth::None);

    let cases = [
        (
            format!("{base}    grant: jwt_bearer\n    client_id: x\n"),
            "4:12",
            "signs its request",
        ),
        (
            format!("{base}    client_id: x\n    private_key: {{file: /nonexistent/k.pem}}\n"),
            "5:18",
            "cannot read /nonexistent/k.pem",
        ),
        (
            format!("{base}    client_id: x\n    private_key: not a key\n"),
            "5:18",
            "not a PEM private key",
        ),
        (
            format!("{base}    client_id: x\n    client_secret: s\n    subject: bob\n"),
            "6:14",
            "only applies with a private_key",
        ),
        (
            format!(
                "{base}    client_id: x\n    client_secret: s\n    private_key: {{file: {key}}}\n"
            ),
            "6:18",
            "not both",
        ),
        (
            format!(
                "{base}    grant: client_credentials\n    client_id: x\n    private_key: {{file: {key}}}\n    subject: bob\n"
            ),
            "7:14",
            "other grants have none",
        ),
        (
            "socket:\n  allow_users: [root, no-such-user-here]\nclients: {}\n".to_string(),
            "2:23",
            "no user named \"no-such-user-here\"",
        ),
        (
            "notify:\n  repeat: 10s\nclients: {}\n".to_string(),
            "2:11",
            "from 1m to 365d",
        ),
        (
            format!("{base}    grant: jwt_bearer\n    service_account_key: \"{{}}\"\n"),
            "5:26",
            "not a service account key",
        ),
        (
            format!(
                "{base}    client_id: x\n    private_key: {{file: {key}}}\n    signing_alg: ES256\n"
            ),
            "5:18",
            "does not fit",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn secrets_may_come_from_a_command() {
    let base = "clients:\n  a:\n    provider: {token_url: \"https://as.example/t\"}\n    grant: client_credentials\n    client_id: x\n";
    let ok = parse_at(&format!(
        "{base}    client_secret: {{command: [sh, -c, \"printf vault-secret\"], timeout: 5s}}\n"
    ))
    .unwrap();
    assert_eq!(
        ok.clients["a"].client_secret.as_ref().unwrap().expose(),
        "vault-secret"
    );
    let cases = [
        (
            format!(
                "{base}    client_secret: {{command: [sh, -c, \"echo locked >&2; exit 2\"]}}\n"
            ),
            "6:20",
            "locked",
        ),
        (
            format!("{base}    client_secret: {{command: []}}\n"),
            "6:20",
            "a command is a list",
        ),
        (
            format!("{base}    client_secret: {{file: /x, timeout: 5s}}\n"),
            "6:20",
            "timeout only applies to a command",
        ),
        (
            format!(
                "{base}    client_secret: {{command: [sh, -c, \"sleep 5\"], timeout: 200ms}}\n"
            ),
            "6:20",
            "killed",
        ),
    ];
    assert_refused(&cases);
}
