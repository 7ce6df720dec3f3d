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
      - { path: /var/cache/o/x.json, format: json, mode: "0640" }
"#;

/// As the daemon reads a file: through the client blocks, or the whole document.
fn parse_at(src: &str) -> Result<Config, ConfigError> {
    parse_reusing(src, Path::new("/etc/o/config.yaml"), None, |_, _| {})
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
    let cases: &[(&str, &str, &str)] = include!("../../tests/data/bad_configs.rs");
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
fn a_sink_may_not_overwrite_the_config_file() {
    let src = "clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: /etc/o/config.yaml}]\n";
    let shown = parse_at(src).map(|_| ()).unwrap_err().to_string();
    assert!(
        shown.starts_with("/etc/o/config.yaml:5:20: ") && shown.contains("configuration"),
        "{shown}"
    );
}

#[test]
fn log_filter_field_values_are_matched_literally() {
    // As a regular expression this pattern takes minutes to compile to a DFA (found by the
    // config fuzz target); matched literally it loads at once. Without the fix this test hangs.
    let pattern = format!("(a|b)*a{}", "(a|b)".repeat(24));
    let src = format!("log:\n  level: \"info,[{{x={pattern}}}]\"\nclients: {{}}\n");
    let c = parse_at(&src).unwrap();
    assert!(c.log_level.unwrap().contains(&pattern));
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

/// With 100,000 clients, a copy of the profile, endpoints and refresh policy in each was most
/// of the daemon's memory: clients that read the same share one.
#[test]
fn clients_of_one_provider_share_profile_endpoints_and_policy() {
    let src = r#"
clients:
  a: {provider: google, client_id: one}
  b: {provider: google, client_id: two}
  c: {provider: microsoft, client_id: three, tenant: t1}
  d: {provider: microsoft, client_id: four, tenant: t2}
  e: {provider: google, client_id: five, refresh: {before_expiry: 5m}}
  f: {provider: {base: google, scope_separator: ","}, client_id: six}
  g: {provider: {base: google, scope_separator: ","}, client_id: seven}
  h: {provider: google, client_id: eight, scopes: [mail]}
  i: {provider: google, client_id: nine, scopes: [mail]}
"#;
    let c = parse_at(src).expect("valid");
    let client = |n: &str| c.clients[n].clone();
    let (a, b, cc, d, e, f, g) = (
        client("a"),
        client("b"),
        client("c"),
        client("d"),
        client("e"),
        client("f"),
        client("g"),
    );
    assert!(Arc::ptr_eq(&a.profile, &b.profile) && Arc::ptr_eq(&a.profile, &e.profile));
    assert!(Arc::ptr_eq(&cc.profile, &d.profile) && !Arc::ptr_eq(&a.profile, &cc.profile));
    assert!(Arc::ptr_eq(&f.profile, &g.profile) && !Arc::ptr_eq(&a.profile, &f.profile));
    assert_eq!(&*f.provider, "google+custom");
    assert_eq!(f.profile.scope_separator, ",");
    assert!(Arc::ptr_eq(&a.endpoints, &b.endpoints));
    // Another tenant is another token endpoint.
    assert!(!Arc::ptr_eq(&cc.endpoints, &d.endpoints));
    assert_ne!(cc.endpoints.token, d.endpoints.token);
    assert!(Arc::ptr_eq(&a.refresh, &b.refresh) && !Arc::ptr_eq(&a.refresh, &e.refresh));
    assert!(Arc::ptr_eq(&a.name, c.clients.keys().next().expect("a")));
    // The same scopes are one list, other scopes another.
    assert!(Arc::ptr_eq(&a.scopes, &b.scopes));
    let (h, i) = (client("h"), client("i"));
    assert!(Arc::ptr_eq(&h.scopes, &i.scopes) && !Arc::ptr_eq(&a.scopes, &h.scopes));
}

/// Many clients in the plain layout, with a few odd ones: a quoted name, comments, a block
/// scalar, flow and block styles, per-client policies and sinks.
fn many_clients(n: usize, jitter: u32) -> String {
    let mut src = format!(
        "paths: {{state: state, runtime: run}}\nrefresh:\n  jitter: {jitter}%\nclients:\n  # the clients\n"
    );
    for i in 0..n {
        match i % 4 {
            0 => src.push_str(&format!(
                "  c{i}: {{provider: {{authorize_url: \"http://127.0.0.1:9/a\", token_url: \"http://127.0.0.1:9/t\"}}, client_id: app{i}, scopes: [mail]}}\n"
            )),
            1 => src.push_str(&format!(
                "  c{i}:\n    provider: google\n    client_id: app{i}\n    client_secret: |\n      s{i}\n\n    refresh: {{jitter: 1%}}\n"
            )),
            2 => src.push_str(&format!(
                "  \"c{i}\":\n    # a comment\n    provider: microsoft\n    tenant: t{i}\n    client_id: app{i}\n    sinks:\n      - {{path: tokens/c{i}, format: raw}}\n"
            )),
            _ => src.push_str(&format!(
                "  c{i}:\n    grant: client_credentials\n    provider: {{token_url: \"http://127.0.0.1:9/t\"}}\n    client_id: app{i}\n    client_secret: s\n"
            )),
        }
    }
    src.push_str("limits:\n  request_timeout: 5s\n");
    src
}

#[test]
fn client_blocks_read_the_same_as_the_whole_document() {
    let file = Path::new("/etc/o/config.yaml");
    // Past one chunk, so that several threads share the work.
    for src in [GOOD.to_string(), many_clients(5000, 5)] {
        let whole = parse(&src, file).expect("valid");
        let by_blocks = parse_by_blocks(&src, file).expect("the plain layout");
        assert_eq!(by_blocks, whole);
        assert!(by_blocks.source.0.is_some());
    }
    // What libyaml refuses anywhere (a control character, here in a comment before the first
    // client) is seen by the blocks' parser too, and refused whole.
    let control = "clients:\n  # a \u{1}\n  a: {provider: google, client_id: x}\n";
    assert!(parse_by_blocks(control, file).is_none());
    assert!(parse(control, file).is_err());
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.yaml"))
            .expect("the example config");
    assert_eq!(
        parse_by_blocks(&example, file).expect("the plain layout"),
        parse(&example, file).expect("valid")
    );
}

#[test]
fn a_reload_keeps_the_clients_whose_text_did_not_change() {
    let file = Path::new("/etc/o/config.yaml");
    let src = many_clients(8, 5);
    let before = parse_reusing(&src, file, None, |_, _| {}).expect("valid");
    let edited = src.replace("client_id: app5\n", "client_id: app5-new\n");
    let after = parse_reusing(&edited, file, Some(&before), |_, _| {}).expect("valid");
    assert_eq!(after, parse(&edited, file).expect("valid"));
    for (name, client) in &after.clients {
        let kept = Arc::ptr_eq(client, &before.clients[name]);
        assert_eq!(kept, &**name != "c5", "{name}");
    }
    // Clients added or removed move the settings after them, which still read the same.
    let added = edited.replace(
        "limits:",
        "  extra: {provider: google, client_id: x}\nlimits:",
    );
    let after_add = parse_reusing(&added, file, Some(&after), |_, _| {}).expect("valid");
    assert_eq!(after_add.clients.len(), after.clients.len() + 1);
    assert!(
        after
            .clients
            .iter()
            .all(|(n, c)| Arc::ptr_eq(c, &after_add.clients[n]))
    );
    let c7 = "  c7:\n    grant: client_credentials\n    provider: {token_url: \"http://127.0.0.1:9/t\"}\n    client_id: app7\n    client_secret: s\n";
    assert!(added.contains(c7));
    let after_remove =
        parse_reusing(&added.replace(c7, ""), file, Some(&after_add), |_, _| {}).expect("valid");
    assert!(!after_remove.clients.contains_key("c7"));
    assert!(
        after_remove
            .clients
            .iter()
            .all(|(n, c)| Arc::ptr_eq(c, &after_add.clients[n]))
    );
    // A setting around the clients may change any of them: none is kept.
    let around = src.replace("jitter: 5%", "jitter: 6%");
    let after = parse_reusing(&around, file, Some(&before), |_, _| {}).expect("valid");
    assert!(
        after
            .clients
            .iter()
            .all(|(n, c)| !Arc::ptr_eq(c, &before.clients[n]))
    );
    // A secret read from a file may have changed since: read again every time.
    let dir = tempfile::tempdir().expect("a temporary folder");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "one").expect("secret written");
    let src = format!(
        "clients:\n  a:\n    provider: google\n    client_id: x\n    client_secret: {{file: {}}}\n  b:\n    provider: google\n    client_id: y\n",
        secret.display()
    );
    let before = parse_reusing(&src, file, None, |_, _| {}).expect("valid");
    std::fs::write(&secret, "two").expect("secret rewritten");
    let after = parse_reusing(&src, file, Some(&before), |_, _| {}).expect("valid");
    assert_eq!(
        after.clients["a"]
            .client_secret
            .as_ref()
            .map(|s| s.expose().to_string()),
        Some("two".to_string())
    );
    assert!(Arc::ptr_eq(&after.clients["b"], &before.clients["b"]));
}

#[test]
fn an_error_in_a_block_is_placed_in_the_whole_file() {
    let mut src = many_clients(3000, 5);
    src = src.replace(
        "  c2001:\n    provider: google\n",
        "  c2001:\n    provider: google\n    scopez: [x]\n",
    );
    let line = src
        .lines()
        .position(|l| l.contains("scopez"))
        .expect("the typo")
        + 1;
    let shown = parse_at(&src).expect_err("refused").to_string();
    assert!(
        shown.starts_with(&format!("/etc/o/config.yaml:{line}:5: ")) && shown.contains("scopez"),
        "{shown}"
    );
    // A name given twice in two chunks is found too.
    let twice = many_clients(3000, 5).replace("  c2999:", "  c3:");
    let shown = parse_at(&twice).expect_err("refused").to_string();
    assert!(shown.contains("client \"c3\" is defined twice"), "{shown}");
}

#[test]
fn the_settings_are_told_once_before_the_clients_are_read() {
    let file = Path::new("/etc/o/config.yaml");
    let plain = many_clients(600, 3);
    // Flow style: the blocks give up, and the whole document tells.
    let flow = "paths: {state: /var/lib/x}\nclients: {a: {provider: google, client_id: x}, b: {provider: google, client_id: y}}\n";
    // A bad client: the settings were told, and the load still fails.
    let bad = plain.replacen("client_id: app7\n", "client_id: app7\n    pkce: maybe\n", 1);
    assert_ne!(bad, plain);
    for (src, clients, ok) in [
        (&plain[..], 600, true),
        (flow, 2, true),
        (&bad[..], 600, false),
    ] {
        let mut told = Vec::new();
        let loaded = parse_reusing(src, file, None, |settings, n| {
            told.push((settings.paths.clone(), settings.clients.len(), n));
        });
        assert_eq!(loaded.is_ok(), ok, "{src:.80}");
        let whole_paths = parse(src, file).map(|c| c.paths).ok();
        assert_eq!(told.len(), 1, "{src:.80}");
        let (paths, held, n) = &told[0];
        assert_eq!((*held, *n), (0, clients), "{src:.80}");
        if let Some(whole) = whole_paths {
            assert_eq!(*paths, whole);
        }
    }
    // Settings that are wrong are not told.
    let mut told = 0;
    assert!(
        parse_reusing(
            "limits: {request_timeout: soon}\nclients:\n  a: {}\n",
            file,
            None,
            |_, _| told += 1
        )
        .is_err()
    );
    assert_eq!(told, 0);
}

#[test]
fn the_client_past_the_limit_is_refused_at_its_name() {
    let src = "a: {client_id: x}\nb: {client_id: y}\nc: {client_id: z}\n";
    let e = client_map(serde_yaml::Deserializer::from_str(src), 2)
        .err()
        .unwrap();
    let at = e.location().map(|l| (l.line(), l.column()));
    assert_eq!(at, Some((3, 1)), "{e}");
    assert!(
        e.to_string()
            .contains("client \"c\" is one more than the 2"),
        "{e}"
    );
    assert!(client_map(serde_yaml::Deserializer::from_str(src), 3).is_ok());
}

#[test]
fn files_past_the_limits_are_refused_with_their_place() {
    let deep = format!(
        "clients:\n  a:\n    client_id: x\n    scopes: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let e = parse_at(&deep).unwrap_err().to_string();
    assert!(e.starts_with("/etc/o/config.yaml:4:"), "{e}");
    assert!(e.contains("nested deeper than 32 levels"), "{e}");
    let mut wide = String::from(
        "clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    scopes: &s [",
    );
    wide.push_str(
        &(0..20_000)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    wide.push_str("]\n");
    for i in 0..100 {
        wide.push_str(&format!("  c{i}:\n    client_id: x\n    provider: {{token_url: \"https://t/\", authorize_url: \"https://a/\"}}\n    scopes: *s\n"));
    }
    let begun = std::time::Instant::now();
    let e = parse_at(&wide).unwrap_err().to_string();
    assert!(e.contains("anchors and aliases expand the file"), "{e}");
    assert!(e.starts_with("/etc/o/config.yaml:"), "{e}");
    assert!(begun.elapsed() < Duration::from_secs(30));
    // Anchors used with measure are read as before.
    let shared = "clients:\n  a: {client_id: x, provider: &p {token_url: \"https://t/\", authorize_url: \"https://a/\"}}\n  b: {client_id: y, provider: *p}\n";
    let c = parse_at(shared).unwrap();
    assert_eq!(c.clients["b"].endpoints.token.as_str(), "https://t/");
}
