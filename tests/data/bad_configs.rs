// Malformed configurations, each with the `line:column` and a fragment of the one-line error it
// must produce. Shared by the unit test (`src/config/tests.rs`, parsed in-process) and the
// integration test (`tests/bad_configs.rs`, sent to a running daemon that must keep serving).
// Each entry is a whole config file.
&[
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
    ("clients:\n\ta: {client_id: x}\n", "2:1", "found character that cannot start any token, while scanning"),
    ("clients:\n  a:\n    client_id: \"x\n", "4:1", "found unexpected end of stream, while scanning a quoted scalar"),
    ("clients:\n  a: &a {client_id: x}\n  b: *c\n", "3:6", "unknown anchor"),
    ("clients:\n  a:\n    client_id: [x]\n", "3:16", "clients.a.client_id: invalid type: sequence"),
    ("clients:\n  a:\n    client_id: x\n    scopes: openid\n", "4:13", "clients.a.scopes: invalid type: string \"openid\", expected a sequence"),
    ("clients:\n  a:\n    client_id: x\n    pkce: maybe\n", "4:11", "expected a boolean"),
    ("refresh:\n  jitter: true\nclients: {}\n", "2:11", "refresh.jitter: expected a percentage"),
    ("limits:\n  request_timeout: soon\nclients: {}\n", "2:20", "expected a duration like 90s"),
    ("limits:\n  max_connections: -5\nclients: {}\n", "2:20", "expected a whole number from 1 to 1000000"),
    ("notify:\n  repeat: 10s\nclients: {}\n", "2:11", "notify.repeat: must be from 1m to 365d, or never"),
    ("notify:\n  error_after: 0\nclients: {}\n", "2:16", "notify.error_after: expected a whole number from 1 to 1000, found 0"),
    ("socket:\n  mode: \"0666\"\nclients: {}\n", "2:9", "gives access to every user on the machine"),
    ("history:\n  prune: \"every day\"\nclients: {}\n", "2:10", "expected a cron schedule"),
    ("clients:\n  a:\n    client_id: x\n    grant: password\n", "4:12", "unknown variant `password`"),
    ("clients:\n  a/b: {client_id: x}\n", "2:3", "client name \"a/b\""),
    ("clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: ../../etc/cron.d/x}]\n", "5:20", "climbs out of the runtime directory"),
    ("clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: oauth2mci.sock}]\n", "5:20", "would overwrite the daemon's own socket"),
    ("clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: tokens/}]\n", "5:20", "names a folder, not a file"),
    ("clients:\n  a:\n    client_id: x\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n    sinks: [{path: t}, {path: t}]\n", "5:31", "sinks[1].path: /run/oauth2mci/t is already written by clients.a.sinks[0]"),
    ("clients:\n  a:\n    client_id: x\n    grant: device_code\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n", "5:15", "needs a device authorization endpoint"),
    ("clients:\n  a:\n    client_id: x\n    grant: jwt_bearer\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n", "4:12", "the jwt_bearer grant signs its request"),
    ("clients:\n  a:\n    client_id: x\n    signing_alg: HS256\n", "4:18", "unknown variant `HS256`"),
    ("paths:\n  state: \"\"\nclients: {}\n", "2:10", "paths.state: must not be empty"),
    ("clients:\n  a:\n    client_id: x\n    client_secret: {file: /dev/zero}\n    provider: {token_url: \"https://t/\", authorize_url: \"https://a/\"}\n", "4:20", "/dev/zero holds more than 65536 bytes"),
    ("clients:\n  a:\n    client_id: x\n    \"x\\ny\": 1\n", "4:5", "unknown field `x\\ny`, expected one of"),
]
