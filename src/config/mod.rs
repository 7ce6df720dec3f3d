//! The configuration: one YAML file of clients, parsed, validated and resolved into plain types
//! that cannot hold an invalid value.
//!
//! Every error names the file, line and column and the path of the offending key. Checks that can
//! be made on one value run while serde_yaml reads it (see `values`), so its position is exact;
//! checks across values run afterwards and find their position with `locate`. Loading has no side
//! effects besides reading the config and secret files (and running secret commands): applying a
//! config is `registry`'s job.

mod blocks;
pub mod limits;
pub mod locate;
pub mod values;

use crate::jwt;
use crate::provider::{self, ClientAuth, PkceMode, Profile, ProfileSpec};
use crate::secret::Secret;
use crate::text::one_line;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use url::Url;
pub use values::BeforeExpiry;
use values::{Command, CronExpr, Dur, FileMode, NonEmpty, Percent};

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Line and column, 1-based, when the error belongs to a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        // The message may quote the file (an unknown key with a newline in it, found by the
        // config fuzz target): a refusal stays one line.
        write!(f, ": {}", one_line(&self.message, usize::MAX))
    }
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration.

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was loaded from (absolute).
    pub file: PathBuf,
    pub paths: Paths,
    pub socket: SocketAccess,
    /// A tracing filter (`info`, `oauth2mci=debug`); `OAUTH2MCI_LOG` wins over it.
    pub log_level: Option<String>,
    pub notify: NotifyConfig,
    pub history: HistoryConfig,
    pub limits: Limits,
    /// Keys for encryption at rest of the tokens in the store; empty: stored in the clear.
    pub encryption: crate::seal::Keys,
    pub clients: BTreeMap<Arc<str>, Arc<ClientConfig>>,
    /// The text of every setting but the clients: a reload keeps the clients whose own text
    /// did not change either.
    pub source: SourceText,
    /// Whether token files are refused in folders other users can write (`strict_modes`, the
    /// default for every sink).
    pub strict_modes: bool,
    /// The daemon's own files, which no token file may replace: the state folder, the socket,
    /// this file and every file it reads.
    pub protected: Arc<crate::files::Protected>,
}

/// A hash of the text a part of the configuration was read from, for a reload to keep what
/// reads the same instead of reading it again; `None`: read it again. It is not a setting, so
/// two values always compare equal: a client whose text changed but reads the same (a comment,
/// a key moved) has not changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceText(Option<u64>);

impl PartialEq for SourceText {
    fn eq(&self, _: &SourceText) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    /// Holds `state.db`.
    pub state_dir: PathBuf,
    /// Holds the socket and relative token files.
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
}

impl Paths {
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketAccess {
    pub mode: u32,
    pub group: Option<Group>,
    /// Users (uids) besides the daemon's own and root whose connections are served; members
    /// of `group` are too. Checked on each connection with SO_PEERCRED.
    pub allow_uids: Vec<u32>,
}

/// A Unix group named in the config, resolved once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NotifyConfig {
    pub on_reauth_needed: Option<Vec<String>>,
    pub on_error: Option<Vec<String>>,
    pub on_refresh: Option<Vec<String>>,
    pub on_warning: Option<Vec<String>>,
    /// A hook still running after this is killed.
    pub timeout: Duration,
    /// While an incident lasts (needs authorization, failing), tell again this often;
    /// `None`: once per incident.
    pub repeat: Option<Duration>,
    /// `on_error` runs after this many consecutive failures that may pass by themselves
    /// (network, 5xx); a configuration error is told at once.
    pub error_after: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryConfig {
    /// Events older than this are pruned.
    pub retention: Duration,
    /// Tokens of clients removed from the config are forgotten after this.
    pub keep_removed: Duration,
    /// When pruning runs (6-field cron).
    pub prune_schedule: CronExpr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Grant requests in flight at once to one token endpoint.
    pub per_endpoint_concurrency: usize,
    /// Scheduled grant requests started per second to one token endpoint, evenly spaced: an
    /// expiry wave reaches the server as a steady stream. Requests a consumer waits for
    /// (`token` of an expired token, `refresh`) do not wait for it.
    pub per_endpoint_rate: u32,
    /// Total time allowed for one request to an authorization server.
    pub request_timeout: Duration,
    /// Socket connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Of those, at most this many from one user (uid): one local user cannot take every slot.
    pub max_connections_per_user: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// A user authorizes once in a browser; refresh tokens keep it going.
    #[default]
    AuthorizationCode,
    /// No user: the client's own credentials buy each token.
    ClientCredentials,
    /// A user authorizes once by typing a code on another device (RFC 8628), for machines
    /// without a browser; refresh tokens keep it going.
    DeviceCode,
    /// No user: a JWT signed with the client's key buys each token (RFC 7523 section 2.1,
    /// Google service accounts).
    JwtBearer,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::AuthorizationCode => "authorization_code",
            Grant::ClientCredentials => "client_credentials",
            Grant::DeviceCode => "device_code",
            Grant::JwtBearer => "jwt_bearer",
        }
    }

    /// Whether each token is bought without any user, so that the daemon never needs one.
    pub fn unattended(self) -> bool {
        matches!(self, Grant::ClientCredentials | Grant::JwtBearer)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefreshPolicy {
    pub before_expiry: BeforeExpiry,
    pub min_before_expiry: Duration,
    /// Refresh at least this often, even a token that does not expire, so that inactivity never
    /// kills a refresh token. `None`: only when the access token expires.
    pub at_least: Option<Duration>,
    /// Share of the lifetime by which a refresh may come earlier, spreading expiry waves.
    pub jitter: f64,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long before a grant's known end (a refresh token's lifetime) the user is warned.
    pub warn_before: Duration,
}

/// What tells two refresh policies apart, in a form that can be hashed.
type PolicyKey = (
    (Option<u64>, Option<Duration>),
    Duration,
    Option<Duration>,
    u64,
    Duration,
    Duration,
    Duration,
);

impl RefreshPolicy {
    /// The policy as a hashable key: floats by their bits, -0 read as 0. Every field is named,
    /// so a new one cannot be left out of it.
    fn key(&self) -> PolicyKey {
        let RefreshPolicy {
            before_expiry,
            min_before_expiry,
            at_least,
            jitter,
            retry_initial,
            retry_max,
            warn_before,
        } = *self;
        let bits = |x: f64| (x + 0.0).to_bits();
        let before_expiry = match before_expiry {
            BeforeExpiry::Share(share) => (Some(bits(share.0)), None),
            BeforeExpiry::Fixed(fixed) => (None, Some(fixed)),
        };
        (
            before_expiry,
            min_before_expiry,
            at_least,
            bits(jitter),
            retry_initial,
            retry_max,
            warn_before,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// The access token alone.
    #[default]
    Raw,
    /// `Authorization: Bearer …`, for `curl -H @file`.
    Header,
    /// access_token, token_type, expires_at, scope.
    Json,
    /// `NAME_ACCESS_TOKEN=…`, for shell `source` and systemd `EnvironmentFile=`.
    Env,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub path: PathBuf,
    pub format: SinkFormat,
    pub mode: u32,
    pub group: Option<Group>,
    /// Refuse to write it in a folder other users can write (`strict_modes`).
    pub strict: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub authorize: Option<Url>,
    pub token: Url,
    /// Where refreshes go: the profile's `refresh_url`, else the token endpoint.
    pub refresh: Url,
    /// The revocation URL; with `revocation: url` it still holds `{refresh_token}` or
    /// `{access_token}`, filled when revoking.
    pub revoke: Option<String>,
    pub device_authorization: Option<Url>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// The same allocation as its key in `Config::clients` and the registry's name.
    pub name: Arc<str>,
    /// `google`, `generic+custom`...: for `status`.
    pub provider: Arc<str>,
    /// Shared by the clients whose `provider` reads the same.
    pub profile: Arc<Profile>,
    /// Shared by the clients whose endpoints are the same URLs.
    pub endpoints: Arc<Endpoints>,
    pub grant: Grant,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// A private key and its claims: `private_key_jwt` client authentication, or the
    /// assertion of the `jwt_bearer` grant.
    pub jwt: Option<Box<crate::jwt::JwtSettings>>,
    /// Shared by the clients that ask for the same scopes.
    pub scopes: Arc<[String]>,
    /// Whether the authorization request carries a PKCE S256 challenge.
    pub pkce: bool,
    /// The loopback redirect URI; `None`: `http://127.0.0.1:{free port}/callback`.
    pub redirect_uri: Option<Box<Url>>,
    pub authorize_params: BTreeMap<String, String>,
    /// How long an authorization waits for the browser.
    pub authorize_timeout: Duration,
    /// Shared by the clients whose policy is the same (most take the global one).
    pub refresh: Arc<RefreshPolicy>,
    pub sinks: Vec<SinkConfig>,
    /// A cron schedule that refreshes the token, for tokens without a known expiry.
    pub cron: Option<CronExpr>,
    /// When only the user can help, start an authorization by itself, so that notices and
    /// `oauth2mci token` can say where to go (the URL, or the device code).
    pub auto_authorize: bool,
    /// Refresh hooks get the access token in `OAUTH2MCI_ACCESS_TOKEN`.
    pub notify_token: bool,
    /// `fingerprint`'s bytes.
    identity: [u8; 8],
    /// The client's block of text, when a reload may keep it (no secret or group read from
    /// outside the file, which may have changed meanwhile).
    pub source: SourceText,
}

impl ClientConfig {
    /// The client authentication actually used: a profile's `basic`/`post` needs a secret, and a
    /// client without one is public.
    pub fn client_auth(&self) -> ClientAuth {
        match (&self.jwt, &self.client_secret) {
            // A key given for a JWT bearer grant signs the grant, not the client.
            (Some(_), _) if self.grant != Grant::JwtBearer => ClientAuth::PrivateKeyJwt,
            (_, None) => ClientAuth::None,
            (_, Some(_)) => self.profile.client_auth,
        }
    }

    /// The scopes as the provider wants them written.
    pub fn scope_string(&self) -> String {
        self.scopes.join(&self.profile.scope_separator)
    }

    /// A `token_params`/`refresh_params` value with {client_id}, {redirect_uri} and {scope}
    /// filled in.
    pub fn param_value(&self, template: &str) -> Result<String, String> {
        let mut vars = BTreeMap::from([
            ("client_id".to_string(), self.client_id.clone()),
            ("scope".to_string(), self.scope_string()),
        ]);
        if let Some(r) = &self.redirect_uri {
            vars.insert("redirect_uri".into(), r.to_string());
        }
        provider::fill_template(template, &vars, &[])
    }

    /// Identifies the grant that tokens were issued under. Tokens obtained under another
    /// fingerprint are stale: a changed client id, token endpoint, scope set or grant needs a
    /// new authorization.
    pub fn fingerprint(&self) -> String {
        hex::encode(self.identity)
    }

    /// Whether `fingerprint` is this client's (checked for every token served: no allocation).
    pub fn has_fingerprint(&self, fingerprint: &str) -> bool {
        let mut own = [0u8; 16];
        hex::encode_to_slice(self.identity, &mut own).is_ok() && own == fingerprint.as_bytes()
    }

    /// The hash behind `fingerprint`, computed once when the client is resolved.
    fn identity_hash(&self) -> [u8; 8] {
        let mut scopes = self.scopes.to_vec();
        scopes.sort();
        let mut h = Sha256::new();
        let subject = self
            .jwt
            .as_ref()
            .and_then(|j| j.subject.clone())
            .unwrap_or_default();
        for part in [
            &self.client_id,
            self.endpoints.token.as_str(),
            &scopes.join(" "),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        // Only when set, so that fingerprints from before subjects existed stay the same.
        if !subject.is_empty() {
            h.update(b"sub\0");
            h.update(subject.as_bytes());
        }
        h.update(format!("{:?}", self.grant).as_bytes());
        let mut identity = [0u8; 8];
        identity.copy_from_slice(&h.finalize()[..8]);
        identity
    }

    /// Whether a change from `old` to `self` leaves existing tokens usable.
    pub fn same_identity(&self, old: &ClientConfig) -> bool {
        self.identity == old.identity
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    paths: RawPaths,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    notify: RawNotify,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    socket: RawSocket,
    #[serde(default)]
    history: RawHistory,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    encryption: RawEncryption,
    strict_modes: Option<bool>,
    clients: ClientMap,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    state: Option<NonEmpty>,
    runtime: Option<NonEmpty>,
    socket: Option<NonEmpty>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    before_expiry: Option<BeforeExpiry>,
    min_before_expiry: Option<Dur>,
    at_least: Option<OrNever>,
    jitter: Option<Percent>,
    retry: Option<RawRetry>,
    warn_before: Option<Dur>,
}

/// A duration like `24h`, or `never` (`refresh.at_least`, `notify.repeat`).
#[derive(Clone, Copy)]
struct OrNever(Option<Duration>);

impl<'de> Deserialize<'de> for OrNever {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OrNever;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration like 24h, or never")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OrNever, E> {
                if s.trim() == "never" {
                    return Ok(OrNever(None));
                }
                crate::duration::parse(s, crate::duration::Unitless::Refused)
                    .map(|d| OrNever(Some(d)))
                    .map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial: Option<Dur>,
    max: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    on_reauth_needed: Option<Command>,
    on_error: Option<Command>,
    on_refresh: Option<Command>,
    on_warning: Option<Command>,
    timeout: Option<Dur>,
    repeat: Option<OrNever>,
    error_after: Option<Bounded<1, 1000>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<LogFilter>,
}

struct LogFilter(String);

impl<'de> Deserialize<'de> for LogFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_log_filter(&s).map_err(|e| {
            de::Error::custom(format!(
                "expected a log level (error, warn, info, debug, trace) or a tracing filter, found {s:?} ({e})"
            ))
        })?;
        Ok(LogFilter(s))
    }
}

/// A tracing filter, for `log.level` and `OAUTH2MCI_LOG` alike. Two guards against
/// tracing-subscriber 0.3, both found by the config fuzz target: non-ASCII is refused (some
/// makes its parser panic; targets, levels and span names are ASCII anyway), and field values
/// are matched literally (as regular expressions they are compiled to a full DFA, which takes
/// minutes for some patterns; a log filter has no need for them).
pub fn parse_log_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if !filter.is_ascii() {
        return Err("only ASCII is allowed".into());
    }
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(filter)
        .map_err(|e| e.to_string())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSocket {
    mode: Option<FileMode>,
    group: Option<NonEmpty>,
    allow_users: Option<Vec<NonEmpty>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    retention: Option<Dur>,
    keep_removed: Option<Dur>,
    prune: Option<CronExpr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    key: Option<SecretSource>,
    old_keys: Option<Vec<SecretSource>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    per_endpoint_concurrency: Option<Bounded<1, 10_000>>,
    per_endpoint_rate: Option<Bounded<1, 1_000_000>>,
    request_timeout: Option<Dur>,
    max_connections: Option<Bounded<1, 1_000_000>>,
    max_connections_per_user: Option<Bounded<1, 1_000_000>>,
}

/// An integer in `MIN..=MAX`.
#[derive(Clone, Copy)]
struct Bounded<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MIN: u64, const MAX: u64>;
        impl<const MIN: u64, const MAX: u64> Visitor<'_> for V<MIN, MAX> {
            type Value = Bounded<MIN, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a whole number from {MIN} to {MAX}")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                if (MIN..=MAX).contains(&n) {
                    Ok(Bounded(n))
                } else {
                    Err(E::custom(format!(
                        "expected a whole number from {MIN} to {MAX}, found {n}"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "expected a whole number from {MIN} to {MAX}, found {n}"
                )))
            }
        }
        d.deserialize_u64(V::<MIN, MAX>)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    #[serde(default)]
    provider: ProfileSpec,
    #[serde(default)]
    grant: Grant,
    client_id: Option<NonEmpty>,
    client_secret: Option<SecretSource>,
    private_key: Option<SecretSource>,
    key_id: Option<NonEmpty>,
    signing_alg: Option<crate::jwt::Alg>,
    service_account_key: Option<SecretSource>,
    subject: Option<NonEmpty>,
    audience: Option<NonEmpty>,
    scopes: Option<Vec<NonEmpty>>,
    pkce: Option<bool>,
    redirect_uri: Option<NonEmpty>,
    authorize_params: Option<BTreeMap<String, String>>,
    authorize_timeout: Option<Dur>,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    sinks: Vec<RawSink>,
    cron: Option<CronExpr>,
    auto_authorize: Option<bool>,
    notify_token: Option<bool>,
    base_url: Option<NonEmpty>,
    tenant: Option<NonEmpty>,
    domain: Option<NonEmpty>,
    region: Option<NonEmpty>,
    version: Option<NonEmpty>,
    realm: Option<NonEmpty>,
}

impl RawClient {
    /// Whether the client reads the same for as long as its text does: nothing in it comes
    /// from outside the file (a secret file, a command, a group's id).
    fn keepable(&self) -> bool {
        let inline = |s: &Option<SecretSource>| matches!(s, None | Some(SecretSource::Inline(_)));
        inline(&self.client_secret)
            && inline(&self.private_key)
            && inline(&self.service_account_key)
            && self.sinks.iter().all(|s| s.group.is_none())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    path: NonEmpty,
    #[serde(default)]
    format: SinkFormat,
    mode: Option<FileMode>,
    group: Option<NonEmpty>,
    strict_modes: Option<bool>,
}

/// Where a secret comes from.
enum SecretSource {
    Inline(String),
    File(String),
    Env(String),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
    /// What a command prints (a password manager: `[pass, show, mail/client-secret]`), run
    /// without a shell, killed after the timeout.
    Command(Vec<String>, Duration),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ref {
            file: Option<NonEmpty>,
            env: Option<NonEmpty>,
            credential: Option<NonEmpty>,
            command: Option<Command>,
            timeout: Option<Dur>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string, or one of {file: PATH}, {env: VAR}, {credential: NAME}, {command: [PROGRAM, ARGS...]}",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<SecretSource, A::Error> {
                let r = Ref::deserialize(de::value::MapAccessDeserializer::new(m))?;
                if r.timeout.is_some() && r.command.is_none() {
                    return Err(de::Error::custom("timeout only applies to a command"));
                }
                match (r.file, r.env, r.credential, r.command) {
                    (Some(f), None, None, None) => Ok(SecretSource::File(f.0)),
                    (None, Some(e), None, None) => Ok(SecretSource::Env(e.0)),
                    (None, None, Some(c), None) => Ok(SecretSource::Credential(c.0)),
                    (None, None, None, Some(c)) => Ok(SecretSource::Command(
                        c.0,
                        r.timeout.map_or(defaults::SECRET_COMMAND_TIMEOUT, |t| t.0),
                    )),
                    _ => Err(de::Error::custom(
                        "give exactly one of file, env, credential or command",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The `clients:` map. Refuses a name given twice (serde would silently keep the last one) and
/// invalid names, at the position of the key.
struct ClientMap(Vec<(String, RawClient)>);

impl<'de> Deserialize<'de> for ClientMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        client_map(d, limits::MAX_CLIENTS)
    }
}

/// The `clients:` map, refusing the client past `limit` at its name.
fn client_map<'de, D: Deserializer<'de>>(d: D, limit: usize) -> Result<ClientMap, D::Error> {
    struct Name<'a> {
        seen: &'a HashMap<String, ()>,
        /// `limit` clients are read already.
        full: Option<usize>,
    }
    impl<'de> DeserializeSeed<'de> for Name<'_> {
        type Value = String;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl Visitor<'_> for Name<'_> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a client name")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
            if let Some(limit) = self.full {
                return Err(E::custom(format!(
                    "client {s:?} is one more than the {limit} one daemon carries (see BENCHMARKS.md); run several"
                )));
            }
            values::check_client_name(s).map_err(E::custom)?;
            if self.seen.contains_key(s) {
                return Err(E::custom(format!("client {s:?} is defined twice")));
            }
            Ok(s.to_string())
        }
    }
    struct V(usize);
    impl<'de> Visitor<'de> for V {
        type Value = ClientMap;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map from client name to client settings")
        }
        fn visit_unit<E: de::Error>(self) -> Result<ClientMap, E> {
            Ok(ClientMap(Vec::new()))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<ClientMap, A::Error> {
            let mut seen = HashMap::new();
            let mut out = Vec::new();
            loop {
                let name = Name {
                    seen: &seen,
                    full: (out.len() >= self.0).then_some(self.0),
                };
                let Some(name) = m.next_key_seed(name)? else {
                    break;
                };
                let client: RawClient = m.next_value()?;
                seen.insert(name.clone(), ());
                out.push((name, client));
            }
            Ok(ClientMap(out))
        }
    }
    d.deserialize_any(V(limit))
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Reads, validates and resolves the config at `file`.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    load_announcing(file, |_, _| {})
}

/// `load`, handing `settings_known` the settings around the clients (paths, encryption,
/// logging; no clients yet) and how many clients the file has, as soon as they are resolved,
/// so that the caller can start on them while the clients are read. Not called when the
/// settings are wrong; when the clients are, it has been called and the load still fails.
pub fn load_announcing(
    file: &Path,
    settings_known: impl FnOnce(&Config, usize),
) -> Result<Config, ConfigError> {
    let (src, file) = read(file)?;
    parse_reusing(&src, &file, None, settings_known)
}

/// Reads the config at `file` again, keeping from `previous` every client whose text and
/// settings around it are unchanged: with many clients, a reload costs what changed.
pub fn reload(file: &Path, previous: &Config) -> Result<Config, ConfigError> {
    let (src, file) = read(file)?;
    parse_reusing(&src, &file, Some(previous), |_, _| {})
}

fn read(file: &Path) -> Result<(String, PathBuf), ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let fail = |message: String| ConfigError {
        file: file.clone(),
        position: None,
        message,
    };
    // Non-blocking, so that opening a FIFO does not wait for a writer: it is refused below.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&file)
        .map_err(|e| fail(format!("cannot read the configuration: {e}")))?;
    let meta = opened
        .metadata()
        .map_err(|e| fail(format!("cannot read the configuration: {e}")))?;
    limits::check_file(&file, &meta).map_err(fail)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    opened
        .take(limits::MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read the configuration: {e}")))?;
    if bytes.len() as u64 > limits::MAX_FILE_BYTES {
        return Err(fail(format!(
            "the file grew past the {} MiB a configuration may take while it was read",
            limits::MAX_FILE_BYTES / (1024 * 1024)
        )));
    }
    let src = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Valid UTF-8 up to here, so counting chars gives the column an editor shows.
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        ConfigError {
            file: file.clone(),
            position: Some((valid.iter().filter(|&&b| b == b'\n').count() + 1, column)),
            message: "the file is not valid UTF-8 here".into(),
        }
    })?;
    Ok((src, file))
}

/// What the daemon reads through the client blocks (`by_blocks`), or `None` where it falls back
/// to `parse`: for the fuzzer, which checks that both read the same.
pub fn parse_by_blocks(src: &str, file: &Path) -> Option<Config> {
    check_limits(src, file).ok()?;
    by_blocks(src, file, None, &SecretsRead::default(), &mut |_, _| {})
}

/// Refuses text past the limits of `limits` (nesting, what aliases expand to) before the
/// clients are read: with the file's size checked at `read`, whatever passes is bounded.
fn check_limits(src: &str, file: &Path) -> Result<(), ConfigError> {
    let shape = limits::shape(src).map_err(|at| ConfigError {
        file: file.to_path_buf(),
        position: Some((at.line, at.column)),
        message: at.limit.to_string(),
    })?;
    if let Some(anchor) = shape.first_anchor {
        limits::expansion(src).map_err(|e| {
            let mut error = from_yaml_error(file, &e);
            if error.position.is_none() {
                // serde_yaml's own repetition limit says no place: the first anchor's.
                error.position = Some(anchor);
                error.message = format!(
                    "anchors and aliases expand the file too far ({}), from the anchor here on",
                    error.message
                );
            }
            error
        })?;
    }
    Ok(())
}

/// `parse`, through the client blocks when the file has the plain layout.
fn parse_reusing(
    src: &str,
    file: &Path,
    previous: Option<&Config>,
    settings_known: impl FnOnce(&Config, usize),
) -> Result<Config, ConfigError> {
    check_limits(src, file)?;
    let mut settings_known = Some(settings_known);
    // Told once: the blocks may have told it before falling back.
    let mut tell = |settings: &Config, clients: usize| {
        if let Some(told) = settings_known.take() {
            told(settings, clients);
        }
    };
    let secrets = SecretsRead::default();
    match by_blocks(src, file, previous, &secrets, &mut tell) {
        Some(config) => Ok(config),
        // Whatever the blocks could not settle (another layout, or an error anywhere), the
        // whole document settles, and says where an error is.
        None => parse_announcing(src, file, &secrets, &mut tell),
    }
}

/// Clients parsed by a parser thread, each with its block's place in the file.
type ParsedChunk = Vec<(usize, (String, RawClient))>;

/// Clients parsed together: enough to make the parser's set-up cost nothing, few enough that
/// the YAML events held at once stay small.
const CHUNK: usize = 250;

/// The configuration read through its client blocks (`blocks`): the settings around the
/// clients first, then the clients `previous` holds with the same text are kept, and the others
/// are parsed and resolved in chunks, on as many threads as there are cores. `None` on any
/// error or surprise.
fn by_blocks(
    src: &str,
    file: &Path,
    previous: Option<&Config>,
    secrets: &SecretsRead,
    settings_known: &mut dyn FnMut(&Config, usize),
) -> Option<Config> {
    let split = blocks::split(src)?;
    if split.blocks.len() > limits::MAX_CLIENTS {
        // The whole document says where.
        return None;
    }
    let raw: RawConfig = serde_yaml::from_str(&split.outside).ok()?;
    let resolver = Resolver::new(src, file, secrets);
    let (mut config, global_refresh, clients) = resolver.settings(raw).ok()?;
    if !clients.0.is_empty() {
        return None;
    }
    config.source = SourceText(Some(split.outside_hash));
    settings_known(&config, split.blocks.len());
    let keep_from = previous.filter(|p| p.source.0 == config.source.0);
    let mut slots: Vec<Option<Arc<ClientConfig>>> = split
        .blocks
        .iter()
        .map(|b| {
            let kept = keep_from?.clients.get(b.name?)?;
            (kept.source.0 == Some(b.hash)).then(|| kept.clone())
        })
        .collect();
    let to_read: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_none()).collect();
    let chunks: Vec<&[usize]> = to_read.chunks(CHUNK).collect();
    let parse_chunk = |chunk: &[usize]| -> Option<ParsedChunk> {
        let text: String = chunk.iter().map(|&i| split.blocks[i].text).collect();
        let clients = serde_yaml::from_str::<ClientMap>(&text).ok()?;
        (clients.0.len() == chunk.len()).then(|| chunk.iter().copied().zip(clients.0).collect())
    };
    let mut resolve = |parsed: ParsedChunk| -> Option<()> {
        for (i, (name, rc)) in parsed {
            let block = &split.blocks[i];
            if block.name.is_some_and(|n| n != name) {
                return None;
            }
            let keepable = rc.keepable();
            let mut client = resolver.client(&name, rc, &global_refresh, &config).ok()?;
            client.source = SourceText(keepable.then_some(block.hash));
            slots[i] = Some(Arc::new(client));
        }
        Some(())
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(4))
        .min(chunks.len());
    if threads <= 1 {
        // A small file (or a reload with few changes): no thread to start.
        for chunk in &chunks {
            resolve(parse_chunk(chunk)?)?;
        }
    } else {
        // Parser threads turn chunks of blocks into raw clients, and this thread resolves
        // them: what the clients keep is then allocated here, and the parsers' heaps hold
        // only what is thrown away (heap.rs).
        let next = std::sync::atomic::AtomicUsize::new(0);
        let parse_chunks = |parsed: std::sync::mpsc::SyncSender<Option<ParsedChunk>>| loop {
            let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(chunk) = chunks.get(at) else {
                return;
            };
            let clients = parse_chunk(chunk);
            let failed = clients.is_none();
            // The receiver is gone when another chunk failed.
            if parsed.send(clients).is_err() || failed {
                return;
            }
        };
        let parse_chunks = &parse_chunks;
        std::thread::scope(|scope| {
            let (sender, parsed) = std::sync::mpsc::sync_channel(threads * 2);
            for _ in 0..threads {
                let sender = sender.clone();
                scope.spawn(move || parse_chunks(sender));
            }
            drop(sender);
            for chunk in parsed {
                resolve(chunk?)?;
            }
            Some(())
        })?;
    }
    let mut sinks = SinkOwners::default();
    for client in slots {
        let client = client?;
        sinks.claim(&resolver, &client).ok()?;
        if config.clients.insert(client.name.clone(), client).is_some() {
            return None;
        }
    }
    resolver.protect(&mut config).ok()?;
    Some(config)
}

/// Validates and resolves `src`, read from `file` (which anchors relative paths).
pub fn parse(src: &str, file: &Path) -> Result<Config, ConfigError> {
    check_limits(src, file)?;
    parse_announcing(src, file, &SecretsRead::default(), &mut |_, _| {})
}

/// `parse`, telling `settings_known` the settings before the clients are resolved.
fn parse_announcing(
    src: &str,
    file: &Path,
    secrets: &SecretsRead,
    settings_known: &mut dyn FnMut(&Config, usize),
) -> Result<Config, ConfigError> {
    if src.trim().is_empty() {
        return Err(ConfigError {
            file: file.to_path_buf(),
            position: None,
            message: "the file is empty; a configuration needs at least `clients:`".into(),
        });
    }
    let raw: RawConfig = serde_yaml::from_str(src).map_err(|e| from_yaml_error(file, &e))?;
    let resolver = Resolver::new(src, file, secrets);
    let (mut config, global_refresh, clients) = resolver.settings(raw)?;
    settings_known(&config, clients.0.len());
    let mut sinks = SinkOwners::default();
    for (name, rc) in clients.0 {
        let client = resolver.client(&name, rc, &global_refresh, &config)?;
        sinks.claim(&resolver, &client)?;
        config.clients.insert(client.name.clone(), Arc::new(client));
    }
    resolver.protect(&mut config)?;
    Ok(config)
}

/// Which client writes each sink path: two may not write the same file.
#[derive(Default)]
struct SinkOwners {
    paths: HashMap<PathBuf, (Arc<str>, usize)>,
    /// The clients with an `env` token file, by the prefix of its variables: two clients whose
    /// names differ only in case or punctuation would set the same variables, and a program
    /// that reads both files would quietly get one client's token for the other's.
    env_prefixes: HashMap<String, Arc<str>>,
}

impl SinkOwners {
    /// Claims `client`'s sinks; taken in file order, the error names the later client.
    fn claim(&mut self, resolver: &Resolver, client: &ClientConfig) -> Result<(), ConfigError> {
        for (i, sink) in client.sinks.iter().enumerate() {
            if sink.format == SinkFormat::Env {
                let prefix = values::env_prefix(&client.name);
                match self.env_prefixes.get(&prefix) {
                    Some(other) if *other != client.name => {
                        return Err(resolver.error(
                            &["clients", &client.name, "sinks", &i.to_string(), "format"],
                            format!(
                                "its variables would be named {prefix}_ACCESS_TOKEN and so on, as clients.{other}'s are: rename one of the clients"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.env_prefixes.insert(prefix, client.name.clone());
                    }
                }
            }
            let owner = (client.name.clone(), i);
            if let Some((other, j)) = self.paths.insert(sink.path.clone(), owner) {
                return Err(resolver.error(
                    &["clients", &client.name, "sinks", &i.to_string(), "path"],
                    format!(
                        "{} is already written by clients.{other}.sinks[{j}]",
                        sink.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn from_yaml_error(file: &Path, e: &serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    let position = e.location().map(|l| (l.line(), l.column()));
    if let Some((line, column)) = position {
        // The position leads the line already; libyaml's scanner errors also carry it mid-text.
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    ConfigError {
        file: file.to_path_buf(),
        position,
        message,
    }
}

/// Defaults, each with its reason.
mod defaults {
    use std::time::Duration;
    /// Refresh when 10% of the lifetime is left: an hour-long token is refreshed 6 minutes early.
    pub const BEFORE_EXPIRY_SHARE: f64 = 10.0;
    /// ...but never with less than a minute left, so a slow server still answers in time.
    pub const MIN_BEFORE_EXPIRY: Duration = Duration::from_secs(60);
    /// Google drops refresh tokens unused for 6 months, Xero 60 days, Box 60 days: a daily
    /// refresh keeps every such token alive with a wide margin.
    pub const AT_LEAST: Duration = Duration::from_secs(24 * 3600);
    pub const JITTER_PERCENT: f64 = 5.0;
    pub const RETRY_INITIAL: Duration = Duration::from_secs(5);
    pub const RETRY_MAX: Duration = Duration::from_secs(15 * 60);
    /// A weekend plus a day: time to re-authorize before a grant ends.
    pub const WARN_BEFORE: Duration = Duration::from_secs(3 * 24 * 3600);
    pub const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);
    /// A password manager may ask for a passphrase through an agent; a minute is plenty.
    pub const SECRET_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
    /// A reminder a day while only the user can help: enough to be seen, not enough to nag.
    pub const NOTIFY_REPEAT: Duration = Duration::from_secs(24 * 3600);
    /// Three failures in a row (about 35 s with the default backoff) is no longer a blip.
    pub const NOTIFY_ERROR_AFTER: u32 = 3;
    pub const HISTORY_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
    pub const KEEP_REMOVED: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Hourly, at a minute unlikely to collide with other hourly jobs.
    pub const PRUNE_SCHEDULE: &str = "0 17 * * * *";
    /// Enough parallel requests to keep a provider busy without looking like an attack.
    pub const PER_ENDPOINT_CONCURRENCY: u64 = 16;
    /// Far above what 100,000 hourly tokens need (28/s), far below what would look like an
    /// attack to a provider.
    pub const PER_ENDPOINT_RATE: u64 = 200;
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: u64 = 1024;
    /// The largest share of a lifetime that jitter may take.
    pub const MAX_JITTER_PERCENT: f64 = 50.0;
}

/// Default folders when the config names none: systemd's directories when it runs us, else the
/// system or the user layout of DESIGN.md.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = env_path("STATE_DIRECTORY") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/var/lib/oauth2mci");
    }
    env_path("XDG_STATE_HOME")
        .or_else(|| env_path("HOME").map(|h| h.join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("oauth2mci")
}

pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = env_path("RUNTIME_DIRECTORY") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/run/oauth2mci");
    }
    match env_path("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("oauth2mci"),
        // Without a per-user runtime folder, keep runtime files beside the state, which is
        // private to the user, rather than in a shared /tmp.
        None => default_state_dir().join("run"),
    }
}

pub fn default_config_file() -> PathBuf {
    if let Some(dir) = env_path("CONFIGURATION_DIRECTORY") {
        return dir.join("config.yaml");
    }
    if is_root() {
        return PathBuf::from("/etc/oauth2mci/config.yaml");
    }
    env_path("XDG_CONFIG_HOME")
        .or_else(|| env_path("HOME").map(|h| h.join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("oauth2mci/config.yaml")
}

pub const SOCKET_NAME: &str = "oauth2mci.sock";

fn env_path(var: &str) -> Option<PathBuf> {
    // systemd passes colon-separated lists when a unit names several folders; the first is ours.
    let v = std::env::var_os(var)?;
    let first = v
        .to_str()
        .map(|s| s.split(':').next().unwrap_or("").to_string())?;
    (!first.is_empty() && Path::new(&first).is_absolute()).then(|| PathBuf::from(first))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `clients.a.sinks[0].path`, the way serde_yaml names places.
fn show_path(path: &[&str]) -> String {
    let mut shown = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            shown.push_str(&format!("[{part}]"));
        } else {
            if !shown.is_empty() {
                shown.push('.');
            }
            shown.push_str(part);
        }
    }
    shown
}

struct Resolver<'a> {
    src: &'a str,
    file: &'a Path,
    dir: &'a Path,
    /// What clients share rather than each holding a copy: with 100,000 clients these are
    /// most of the daemon's memory.
    profiles: std::cell::RefCell<provider::Profiles>,
    // foldhash, not SipHash: each is hashed for every client at start-up (8 % of the time
    // with SipHash), and the file is trusted input.
    endpoints: std::cell::RefCell<FastSet<Arc<Endpoints>>>,
    /// The same, by the text of their URLs: clients of one provider share them, and parsing
    /// and checking the URLs again was a tenth of resolving a client.
    endpoints_by_text:
        std::cell::RefCell<HashMap<FilledEndpoints, Arc<Endpoints>, foldhash::fast::RandomState>>,
    scopes: std::cell::RefCell<FastSet<Arc<[String]>>>,
    refresh_policies:
        std::cell::RefCell<HashMap<PolicyKey, Arc<RefreshPolicy>, foldhash::fast::RandomState>>,
    /// The files secrets were read from, with the setting that names each: no token file may
    /// replace them.
    read_files: std::cell::RefCell<Vec<(PathBuf, String)>>,
    /// Shared by the resolvers of one load.
    secrets: &'a SecretsRead,
}

type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// A client's endpoint templates, filled with its variables.
#[derive(PartialEq, Eq, Hash)]
struct FilledEndpoints {
    token: String,
    authorize: Option<String>,
    refresh: Option<String>,
    device_authorization: Option<String>,
    /// Still holding `{refresh_token}` or `{access_token}`.
    revoke: Option<String>,
}

impl FilledEndpoints {
    /// The endpoints these name, checked: URLs, and credentials over https only.
    fn checked(&self) -> Result<Endpoints, String> {
        let url = |text: &str, field: &str| -> Result<Url, String> {
            let url =
                Url::parse(text).map_err(|e| format!("{field} {text:?} is not a URL: {e}"))?;
            check_endpoint_security(&url).map_err(|m| format!("{field}: {m}"))?;
            Ok(url)
        };
        let optional =
            |text: &Option<String>, field: &str| text.as_deref().map(|t| url(t, field)).transpose();
        let token = url(&self.token, "token_url")?;
        let authorize = optional(&self.authorize, "authorize_url")?;
        let refresh = optional(&self.refresh, "refresh_url")?.unwrap_or_else(|| token.clone());
        let device_authorization =
            optional(&self.device_authorization, "device_authorization_url")?;
        if let Some(revoke) = &self.revoke {
            // Checked with a stand-in for the token that goes in when revoking.
            let probe = revoke
                .replace("{refresh_token}", "T")
                .replace("{access_token}", "T");
            url(&probe, "revoke_url")?;
        }
        Ok(Endpoints {
            authorize,
            token,
            refresh,
            revoke: self.revoke.clone(),
            device_authorization,
        })
    }
}

impl<'a> Resolver<'a> {
    fn new(src: &'a str, file: &'a Path, secrets: &'a SecretsRead) -> Resolver<'a> {
        Resolver {
            src,
            file,
            dir: file.parent().unwrap_or(Path::new("/")),
            profiles: Default::default(),
            endpoints: Default::default(),
            endpoints_by_text: Default::default(),
            scopes: Default::default(),
            refresh_policies: Default::default(),
            read_files: Default::default(),
            secrets,
        }
    }

    fn error(&self, path: &[&str], message: impl Into<String>) -> ConfigError {
        // A value that is missing from the file (an omitted provider) is reported at its parent.
        let position = (1..=path.len())
            .rev()
            .find_map(|n| locate::locate(self.src, &path[..n]));
        ConfigError {
            file: self.file.to_path_buf(),
            position,
            message: format!("{}: {}", show_path(path), message.into()),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn group(&self, at: &[&str], name: &str) -> Result<Group, ConfigError> {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(Group {
                name: name.to_string(),
                gid: g.gid.as_raw(),
            }),
            Ok(None) => Err(self.error(at, format!("no group named {name:?} on this machine"))),
            Err(e) => Err(self.error(at, format!("cannot look up group {name:?}: {e}"))),
        }
    }

    /// A user named in the config (or a numeric uid), resolved once at load.
    fn user(&self, at: &[&str], name: &str) -> Result<u32, ConfigError> {
        if let Ok(uid) = name.parse::<u32>() {
            return Ok(uid);
        }
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(u.uid.as_raw()),
            Ok(None) => Err(self.error(at, format!("no user named {name:?} on this machine"))),
            Err(e) => Err(self.error(at, format!("cannot look up user {name:?}: {e}"))),
        }
    }

    /// Every setting but the clients, which come back unresolved with the global refresh
    /// policy they merge with.
    fn settings(&self, raw: RawConfig) -> Result<(Config, RawRefresh, ClientMap), ConfigError> {
        let state_dir = raw
            .paths
            .state
            .as_ref()
            .map(|p| self.path(&p.0))
            .unwrap_or_else(default_state_dir);
        let runtime_dir = raw
            .paths
            .runtime
            .as_ref()
            .map(|p| self.path(&p.0))
            .unwrap_or_else(default_runtime_dir);
        let socket = raw
            .paths
            .socket
            .as_ref()
            .map(|p| self.path(&p.0))
            .unwrap_or_else(|| runtime_dir.join(SOCKET_NAME));
        let paths = Paths {
            state_dir,
            runtime_dir,
            socket,
        };

        let socket_access = SocketAccess {
            mode: raw.socket.mode.map_or(0o600, |m| m.0),
            group: raw
                .socket
                .group
                .as_ref()
                .map(|g| self.group(&["socket", "group"], &g.0))
                .transpose()?,
            allow_uids: raw
                .socket
                .allow_users
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, u)| self.user(&["socket", "allow_users", &i.to_string()], &u.0))
                .collect::<Result<_, _>>()?,
        };
        for (name, hook) in [
            ("on_reauth_needed", &raw.notify.on_reauth_needed),
            ("on_error", &raw.notify.on_error),
            ("on_refresh", &raw.notify.on_refresh),
            ("on_warning", &raw.notify.on_warning),
        ] {
            if let Some(Command(argv)) = hook {
                values::check_hook(argv).map_err(|m| self.error(&["notify", name], m))?;
            }
        }
        let notify = NotifyConfig {
            on_reauth_needed: raw.notify.on_reauth_needed.map(|c| c.0),
            on_error: raw.notify.on_error.map(|c| c.0),
            on_refresh: raw.notify.on_refresh.map(|c| c.0),
            on_warning: raw.notify.on_warning.map(|c| c.0),
            timeout: raw.notify.timeout.map_or(defaults::NOTIFY_TIMEOUT, |d| d.0),
            repeat: raw
                .notify
                .repeat
                .map_or(Some(defaults::NOTIFY_REPEAT), |r| r.0),
            error_after: raw
                .notify
                .error_after
                .map_or(defaults::NOTIFY_ERROR_AFTER, |b| b.0 as u32),
        };
        if notify
            .repeat
            .is_some_and(|d| d < Duration::from_secs(60) || d > Duration::from_secs(365 * 86400))
        {
            return Err(self.error(&["notify", "repeat"], "must be from 1m to 365d, or never"));
        }
        let history = HistoryConfig {
            retention: raw
                .history
                .retention
                .map_or(defaults::HISTORY_RETENTION, |d| d.0),
            keep_removed: raw
                .history
                .keep_removed
                .map_or(defaults::KEEP_REMOVED, |d| d.0),
            prune_schedule: match raw.history.prune {
                Some(c) => c,
                None => CronExpr(defaults::PRUNE_SCHEDULE.to_string()),
            },
        };
        let limits = Limits {
            per_endpoint_concurrency: raw
                .limits
                .per_endpoint_concurrency
                .map_or(defaults::PER_ENDPOINT_CONCURRENCY, |b| b.0)
                as usize,
            per_endpoint_rate: raw
                .limits
                .per_endpoint_rate
                .map_or(defaults::PER_ENDPOINT_RATE, |b| b.0) as u32,
            request_timeout: raw
                .limits
                .request_timeout
                .map_or(defaults::REQUEST_TIMEOUT, |d| d.0),
            max_connections: raw
                .limits
                .max_connections
                .map_or(defaults::MAX_CONNECTIONS, |b| b.0) as usize,
            max_connections_per_user: 0,
        };
        let mut limits = limits;
        // A quarter by default: a user holding their whole share leaves three quarters.
        limits.max_connections_per_user = match raw.limits.max_connections_per_user {
            Some(b) if b.0 as usize > limits.max_connections => {
                return Err(self.error(
                    &["limits", "max_connections_per_user"],
                    format!(
                        "is more than limits.max_connections ({})",
                        limits.max_connections
                    ),
                ));
            }
            Some(b) => b.0 as usize,
            None => (limits.max_connections / 4).max(1),
        };
        if limits.request_timeout < Duration::from_secs(1) {
            return Err(self.error(&["limits", "request_timeout"], "must be at least 1s"));
        }
        // The global policy is checked for its own errors; clients carry their merged copy.
        self.refresh(&RawRefresh::default(), &raw.refresh, &["refresh"])?;
        let encryption = self.encryption(raw.encryption)?;
        let config = Config {
            file: self.file.to_path_buf(),
            paths,
            socket: socket_access,
            log_level: raw.log.level.map(|l| l.0),
            notify,
            history,
            limits,
            encryption,
            clients: BTreeMap::new(),
            source: SourceText::default(),
            strict_modes: raw.strict_modes.unwrap_or(true),
            protected: Arc::default(),
        };
        Ok((config, raw.refresh, raw.clients))
    }

    fn encryption(&self, raw: RawEncryption) -> Result<crate::seal::Keys, ConfigError> {
        let key = |source: SecretSource, at: &[&str]| {
            if matches!(source, SecretSource::Inline(_)) {
                // The key guards the database against whoever can read it; the config file is
                // usually easier to read than the database.
                return Err(self.error(
                    at,
                    "give the key as {file: PATH}, {credential: NAME}, {env: VAR} or {command: [...]}, not written in the config",
                ));
            }
            let text = self
                .secret(source, &show_path(at))
                .map_err(|m| self.error(at, m))?;
            crate::seal::Key::parse(text.expose()).map_err(|m| self.error(at, m))
        };
        let current = raw
            .key
            .map(|s| key(s, &["encryption", "key"]))
            .transpose()?;
        let old = raw
            .old_keys
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, s)| key(s, &["encryption", "old_keys", &i.to_string()]))
            .collect::<Result<_, _>>()?;
        Ok(crate::seal::Keys { current, old })
    }

    /// The daemon's own files (this one, the socket, the state folder, every file read), and
    /// every token file checked against them, against each other and, with `strict_modes`,
    /// for a folder others could write: by what the paths lead to, not by their text.
    fn protect(&self, config: &mut Config) -> Result<(), ConfigError> {
        use crate::files::{FileId, Folder, Place, Protected};
        // Whoever can write the state folder can swap the database (and its refresh tokens);
        // whoever can write the socket's folder can put a socket of their own in its place.
        if config.strict_modes {
            let socket_folder = config.paths.socket.parent().unwrap_or(Path::new("/"));
            let socket_named = if socket_folder == config.paths.runtime_dir {
                "runtime"
            } else {
                "socket"
            };
            for (folder, at) in [
                (config.paths.state_dir.as_path(), "state"),
                (socket_folder, socket_named),
            ] {
                crate::files::folder_is_safe(folder).map_err(|m| {
                    self.error(
                        &["paths", at],
                        format!(
                            "{}; use a folder only this user can write, or set strict_modes: false",
                            m.replace("a token file", "the daemon's files")
                        ),
                    )
                })?;
            }
        }
        let db = config.paths.database();
        let beside = |suffix: &str| PathBuf::from(format!("{}{suffix}", db.display()));
        // The folder is protected whole; its files by name too, so that a hard link to one of
        // them, anywhere, is found.
        let mut files = vec![
            (config.file.clone(), "the configuration".to_string()),
            (db.clone(), "the database".to_string()),
            (beside("-wal"), "the database's write-ahead log".to_string()),
            (beside("-shm"), "the database's shared memory".to_string()),
            (beside("-journal"), "the database's journal".to_string()),
            (
                config.paths.state_dir.join("lock"),
                "the state folder's lock".to_string(),
            ),
        ];
        files.extend(self.read_files.borrow_mut().drain(..));
        let mut folders = vec![(
            config.paths.state_dir.clone(),
            "the state folder (the database, its -wal and -shm files, the lock)".to_string(),
        )];
        // A database that is a link: SQLite keeps its log and shared memory beside the file
        // the link leads to, which is then the daemon's too.
        let real_db = crate::files::resolve(&db);
        if real_db != crate::files::resolve(&config.paths.state_dir).join("state.db") {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let path = PathBuf::from(format!("{}{suffix}", real_db.display()));
                files.push((
                    path,
                    "the file the database link leads to, or beside it".into(),
                ));
            }
            if let Some(folder) = real_db.parent() {
                folders.push((
                    folder.to_path_buf(),
                    "the folder the database link leads to".into(),
                ));
            }
        }
        // The socket is bound in place of what is at its path: none of the daemon's own files.
        let place =
            Place::of(&config.paths.socket).map_err(|m| self.error(&["paths", "socket"], m))?;
        let clash = Protected::new(files.clone(), folders.clone())
            .clash(&place)
            .map(|what| format!("would replace {what}"));
        let not_a_socket = match place.existing {
            Some((_, kind)) if kind != crate::files::Kind::Socket => Some(format!(
                "is {}, not a socket; the daemon binds its socket only where none or a stale one is",
                kind.describe()
            )),
            _ => None,
        };
        if let Some(m) = clash.or(not_a_socket) {
            return Err(self.error(
                &["paths", "socket"],
                format!("{}: it {m}", config.paths.socket.display()),
            ));
        }
        files.push((
            config.paths.socket.clone(),
            "the daemon's own socket".to_string(),
        ));
        let protected = Protected::new(files, folders);
        let mut by_entry: HashMap<(Folder, std::ffi::OsString), (Arc<str>, usize)> = HashMap::new();
        let mut by_file: HashMap<FileId, (Arc<str>, usize)> = HashMap::new();
        let mut folders_judged: HashMap<PathBuf, Result<(), String>> = HashMap::new();
        for client in config.clients.values() {
            for (i, sink) in client.sinks.iter().enumerate() {
                let index = i.to_string();
                let at = ["clients", &client.name, "sinks", &index, "path"];
                let fail = |m: String| self.error(&at, format!("{}: {m}", sink.path.display()));
                let place = Place::of(&sink.path).map_err(&fail)?;
                protected
                    .check_target(&place)
                    .map_err(|m| fail(format!("it {m}")))?;
                let owner = (client.name.clone(), i);
                let earlier = by_entry
                    .insert((place.folder.clone(), place.name.clone()), owner.clone())
                    .or_else(|| {
                        place
                            .existing
                            .and_then(|(id, _)| by_file.insert(id, owner.clone()))
                    });
                if let Some((other, j)) = earlier {
                    return Err(fail(format!(
                        "is the file clients.{other}.sinks[{j}] writes, by another path"
                    )));
                }
                if sink.strict {
                    let folder = sink.path.parent().unwrap_or(Path::new("/")).to_path_buf();
                    folders_judged
                        .entry(folder.clone())
                        .or_insert_with(|| crate::files::folder_is_safe(&folder))
                        .clone()
                        .map_err(|m| {
                            fail(format!(
                                "{m}; use a folder only this user can write, or set strict_modes: false"
                            ))
                        })?;
                }
            }
        }
        config.protected = Arc::new(protected);
        Ok(())
    }

    fn refresh(
        &self,
        global: &RawRefresh,
        own: &RawRefresh,
        at: &[&str],
    ) -> Result<RefreshPolicy, ConfigError> {
        let retry_own = own.retry.unwrap_or_default();
        let retry_global = global.retry.unwrap_or_default();
        let policy = RefreshPolicy {
            before_expiry: own
                .before_expiry
                .or(global.before_expiry)
                .unwrap_or(BeforeExpiry::Share(Percent(defaults::BEFORE_EXPIRY_SHARE))),
            min_before_expiry: own
                .min_before_expiry
                .or(global.min_before_expiry)
                .map_or(defaults::MIN_BEFORE_EXPIRY, |d| d.0),
            at_least: own
                .at_least
                .or(global.at_least)
                .map_or(Some(defaults::AT_LEAST), |a| a.0),
            jitter: own
                .jitter
                .or(global.jitter)
                .map_or(defaults::JITTER_PERCENT, |p| p.0)
                / 100.0,
            retry_initial: retry_own
                .initial
                .or(retry_global.initial)
                .map_or(defaults::RETRY_INITIAL, |d| d.0),
            retry_max: retry_own
                .max
                .or(retry_global.max)
                .map_or(defaults::RETRY_MAX, |d| d.0),
            warn_before: own
                .warn_before
                .or(global.warn_before)
                .map_or(defaults::WARN_BEFORE, |d| d.0),
        };
        let mut here = at.to_vec();
        if policy.jitter * 100.0 > defaults::MAX_JITTER_PERCENT {
            here.push("jitter");
            return Err(self.error(
                &here,
                format!("must be at most {}%", defaults::MAX_JITTER_PERCENT),
            ));
        }
        if policy.retry_initial < Duration::from_millis(100) {
            here.extend(["retry", "initial"]);
            return Err(self.error(&here, "must be at least 100ms"));
        }
        if policy.retry_initial > policy.retry_max {
            here.extend(["retry", "max"]);
            return Err(self.error(
                &here,
                format!(
                    "retry.max ({}) is shorter than retry.initial ({})",
                    crate::duration::show(policy.retry_max),
                    crate::duration::show(policy.retry_initial)
                ),
            ));
        }
        if policy.at_least.is_some_and(|d| d < Duration::from_secs(60)) {
            here.push("at_least");
            return Err(self.error(&here, "must be at least 1m, or never"));
        }
        Ok(policy)
    }

    fn client(
        &self,
        name: &str,
        rc: RawClient,
        global_refresh: &RawRefresh,
        settings: &Config,
    ) -> Result<ClientConfig, ConfigError> {
        let paths = &settings.paths;
        let at = |rest: &[&'static str]| -> Vec<String> {
            let mut v = vec!["clients".to_string(), name.to_string()];
            v.extend(rest.iter().map(|s| s.to_string()));
            v
        };
        let err = |rest: &[&'static str], msg: String| {
            let p = at(rest);
            let refs: Vec<&str> = p.iter().map(String::as_str).collect();
            self.error(&refs, msg)
        };

        let service_account = rc
            .service_account_key
            .map(|s| self.secret(s, &format!("clients.{name}.service_account_key")))
            .transpose()
            .and_then(|s| {
                s.map(|s| jwt::ServiceAccount::parse(s.expose()))
                    .transpose()
            })
            .map_err(|m| err(&["service_account_key"], m))?;
        let client_id = match (&rc.client_id, &service_account) {
            (Some(id), _) => id.0.clone(),
            (None, Some(sa)) => sa.client_email.clone(),
            (None, None) => return Err(err(&[], "missing field `client_id`".into())),
        };
        let resolved = self.profiles.borrow_mut().resolve(&rc.provider);
        let (provider_label, profile) = resolved.map_err(|e| match e {
            provider::ProfileError::Invalid { field, message }
                if matches!(rc.provider, ProfileSpec::Layer(_)) =>
            {
                err(&["provider", field], message)
            }
            other => err(&["provider"], other.to_string()),
        })?;
        let templates = [
            &profile.token_url,
            &profile.authorize_url,
            &profile.refresh_url,
            &profile.device_authorization_url,
            &profile.revoke_url,
        ];
        // Most profiles name fixed URLs: no variables to gather for them.
        let templated = templates
            .iter()
            .any(|t| t.as_ref().is_some_and(|t| t.contains('{')));
        let vars: BTreeMap<String, String> = if !templated {
            BTreeMap::new()
        } else {
            [
                ("base_url", &rc.base_url),
                ("tenant", &rc.tenant),
                ("domain", &rc.domain),
                ("region", &rc.region),
                ("version", &rc.version),
                ("realm", &rc.realm),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.0.clone())))
            .chain([("client_id".to_string(), client_id.clone())])
            .collect()
        };
        // The token itself goes in a revocation URL later; the rest is filled now.
        const LATE: [&str; 2] = ["refresh_token", "access_token"];
        let fill = |template: &Option<String>, field: &str, late: &[&str]| {
            template
                .as_ref()
                .map(|t| provider::fill_template(t, &vars, late))
                .transpose()
                .map_err(|m| err(&["provider"], format!("{field}: {m}")))
        };
        let filled = FilledEndpoints {
            token: fill(&profile.token_url, "token_url", &[])?.ok_or_else(|| {
                err(
                    &["provider"],
                    "no token endpoint: name a provider with one, or set provider.token_url".into(),
                )
            })?,
            authorize: fill(&profile.authorize_url, "authorize_url", &[])?,
            refresh: fill(&profile.refresh_url, "refresh_url", &[])?,
            device_authorization: fill(
                &profile.device_authorization_url,
                "device_authorization_url",
                &[],
            )?,
            revoke: fill(&profile.revoke_url, "revoke_url", &LATE)?,
        };
        let known = self.endpoints_by_text.borrow().get(&filled).cloned();
        let endpoints = match known {
            Some(endpoints) => endpoints,
            None => {
                let endpoints = filled.checked().map_err(|m| err(&["provider"], m))?;
                let endpoints = intern(&self.endpoints, endpoints);
                self.endpoints_by_text
                    .borrow_mut()
                    .insert(filled, endpoints.clone());
                endpoints
            }
        };
        let authorize = &endpoints.authorize;
        let device_authorization = &endpoints.device_authorization;
        if rc.grant == Grant::AuthorizationCode && authorize.is_none() {
            return Err(err(
                &["provider"],
                "the authorization_code grant needs an authorization endpoint: set provider.authorize_url".into(),
            ));
        }
        if rc.grant == Grant::DeviceCode && device_authorization.is_none() {
            return Err(err(
                &["provider"],
                format!(
                    "the device_code grant needs a device authorization endpoint, which provider {provider_label} does not have: set provider.device_authorization_url"
                ),
            ));
        }

        let pkce = match (profile.pkce, rc.pkce) {
            (PkceMode::Required, Some(false)) => {
                return Err(err(
                    &["pkce"],
                    format!("provider {provider_label} requires PKCE; remove `pkce: false`"),
                ));
            }
            (PkceMode::Off, Some(true)) => {
                return Err(err(
                    &["pkce"],
                    format!("provider {provider_label} does not support PKCE; remove `pkce: true`"),
                ));
            }
            (PkceMode::Off, _) => false,
            (_, choice) => choice.unwrap_or(true),
        };

        let client_secret = rc
            .client_secret
            .map(|s| self.secret(s, &format!("clients.{name}.client_secret")))
            .transpose()
            .map_err(|m| err(&["client_secret"], m))?;
        let jwt = self.jwt_settings(
            &err,
            &client_id,
            rc.private_key,
            service_account,
            rc.signing_alg,
            rc.key_id.map(|k| k.0),
            rc.subject.map(|s| s.0),
            rc.audience.map(|a| a.0),
            name,
        )?;
        let proves_itself = client_secret.is_some() || jwt.is_some();
        if jwt.is_some() && client_secret.is_some() && rc.grant != Grant::JwtBearer {
            return Err(err(
                &["private_key"],
                "a client authenticates with client_secret or with private_key, not both".into(),
            ));
        }
        if rc.grant != Grant::JwtBearer && jwt.as_ref().is_some_and(|j| j.subject.is_some()) {
            return Err(err(
                &["subject"],
                "subject names the user a jwt_bearer grant acts for; other grants have none".into(),
            ));
        }
        if rc.grant == Grant::JwtBearer && jwt.is_none() {
            return Err(err(
                &["grant"],
                "the jwt_bearer grant signs its request: set private_key (and client_id) or service_account_key".into(),
            ));
        }
        if !proves_itself && rc.grant == Grant::ClientCredentials {
            return Err(err(
                &["client_secret"],
                "the client_credentials grant needs a client_secret or a private_key".into(),
            ));
        }
        if !proves_itself && !pkce && rc.grant == Grant::AuthorizationCode {
            return Err(err(
                &["client_id"],
                "a client with neither client_secret, private_key nor PKCE cannot prove who it is; add one of them".into(),
            ));
        }
        if profile.client_auth == ClientAuth::PrivateKeyJwt
            && jwt.is_none()
            && client_secret.is_some()
        {
            return Err(err(
                &["client_secret"],
                format!(
                    "provider {provider_label} authenticates clients with a signed JWT: set private_key instead"
                ),
            ));
        }

        let redirect_uri = rc
            .redirect_uri
            .map(|r| parse_loopback_redirect(&r.0).map_err(|m| err(&["redirect_uri"], m)))
            .transpose()?;

        let mut scopes: Vec<String> = match rc.scopes {
            Some(s) => s.into_iter().map(|s| s.0).collect(),
            None => profile.default_scopes.clone(),
        };
        for s in &profile.offline_scopes {
            if !rc.grant.unattended() && !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        for s in &scopes {
            if s.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
            {
                return Err(err(
                    &["scopes"],
                    format!("scope {s:?} may not contain spaces, quotes or backslashes"),
                ));
            }
        }

        let refresh_at = at(&["refresh"]);
        let refresh_refs: Vec<&str> = refresh_at.iter().map(String::as_str).collect();
        let refresh = self.refresh(global_refresh, &rc.refresh, &refresh_refs)?;
        let refresh = self.shared_refresh(refresh);

        let mut sinks = Vec::with_capacity(rc.sinks.len());
        for (i, s) in rc.sinks.into_iter().enumerate() {
            let index = i.to_string();
            let path = Path::new(&s.path.0);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else if path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                // A relative path is a name inside the runtime directory; one that climbs out of
                // it is almost always a mistake, and an absolute path says the same on purpose.
                let p = ["clients", name, "sinks", &index, "path"];
                return Err(self.error(
                    &p,
                    format!(
                        "{:?} climbs out of the runtime directory with `..`: give an absolute path",
                        s.path.0
                    ),
                ));
            } else {
                paths.runtime_dir.join(path)
            };
            if path.file_name().is_none() || s.path.0.ends_with('/') {
                let p = ["clients", name, "sinks", &index, "path"];
                return Err(self.error(&p, format!("{:?} names a folder, not a file", s.path.0)));
            }
            let group = match s.group {
                Some(g) => Some(self.group(&["clients", name, "sinks", &index, "group"], &g.0)?),
                None => None,
            };
            let mode = s.mode.map_or(0o600, |m| m.0);
            // A token file is read, never run, and only the daemon writes it: a group that may
            // write could truncate it under a reader, and execute bits say something is wrong.
            if mode & 0o131 != 0 {
                let p = ["clients", name, "sinks", &index, "mode"];
                return Err(self.error(
                    &p,
                    format!(
                        "mode \"{mode:04o}\" lets the group write or anyone run the token file; use \"0600\" or \"0640\""
                    ),
                ));
            }
            sinks.push(SinkConfig {
                path,
                format: s.format,
                mode,
                group,
                strict: s.strict_modes.unwrap_or(settings.strict_modes),
            });
        }

        if profile.refresh_mechanism == provider::RefreshMechanism::FbExchangeToken
            && client_secret.is_none()
        {
            return Err(err(
                &["client_secret"],
                format!(
                    "provider {provider_label} renews tokens by exchanging them with the client secret: set client_secret"
                ),
            ));
        }
        let mut authorize_params = profile.authorize_params.clone();
        authorize_params.extend(rc.authorize_params.unwrap_or_default());
        const RESERVED: [&str; 7] = [
            "response_type",
            "client_id",
            "redirect_uri",
            "scope",
            "state",
            "code_challenge",
            "code_challenge_method",
        ];
        let scope_param = profile.scope_param.as_str();
        if let Some(k) = authorize_params.keys().find(|k| {
            *k == scope_param
                || (RESERVED.contains(&k.as_str()) && !(*k == "scope" && scope_param != "scope"))
        }) {
            return Err(err(
                &["authorize_params"],
                format!("{k:?} is set by the daemon itself"),
            ));
        }

        let mut client = ClientConfig {
            name: name.into(),
            provider: provider_label,
            profile,
            endpoints,
            grant: rc.grant,
            client_id,
            jwt: jwt.map(Box::new),
            client_secret,
            scopes: intern(&self.scopes, scopes),
            pkce,
            redirect_uri: redirect_uri.map(Box::new),
            authorize_params,
            authorize_timeout: rc
                .authorize_timeout
                .map_or(defaults::AUTHORIZE_TIMEOUT, |d| d.0),
            refresh,
            sinks,
            cron: rc.cron,
            auto_authorize: rc.auto_authorize.unwrap_or(true),
            notify_token: rc.notify_token.unwrap_or(false),
            identity: [0; 8],
            source: SourceText::default(),
        };
        client.identity = client.identity_hash();
        Ok(client)
    }

    /// `policy`, or the same one another client already holds.
    fn shared_refresh(&self, policy: RefreshPolicy) -> Arc<RefreshPolicy> {
        self.refresh_policies
            .borrow_mut()
            .entry(policy.key())
            .or_insert_with(|| Arc::new(policy))
            .clone()
    }

    /// The client's signing key and claims, from `private_key` or a service account file.
    #[allow(clippy::too_many_arguments)]
    fn jwt_settings(
        &self,
        err: &dyn Fn(&[&'static str], String) -> ConfigError,
        client_id: &str,
        private_key: Option<SecretSource>,
        service_account: Option<jwt::ServiceAccount>,
        alg: Option<jwt::Alg>,
        key_id: Option<String>,
        subject: Option<String>,
        audience: Option<String>,
        name: &str,
    ) -> Result<Option<jwt::JwtSettings>, ConfigError> {
        let (pem, kid, issuer, at) = match (private_key, service_account) {
            (Some(_), Some(_)) => {
                return Err(err(
                    &["private_key"],
                    "give private_key or service_account_key, not both".into(),
                ));
            }
            (Some(source), None) => {
                let pem = self
                    .secret(source, &format!("clients.{name}.private_key"))
                    .map_err(|m| err(&["private_key"], m))?;
                (pem, key_id, client_id.to_string(), "private_key")
            }
            (None, Some(sa)) => (
                Secret::new(sa.private_key),
                key_id.or(sa.private_key_id),
                sa.client_email,
                "service_account_key",
            ),
            (None, None) => {
                let stray = [
                    ("key_id", key_id.is_some()),
                    ("signing_alg", alg.is_some()),
                    ("subject", subject.is_some()),
                    ("audience", audience.is_some()),
                ];
                if let Some((field, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(err(
                        &[field],
                        format!("{field} only applies with a private_key or service_account_key"),
                    ));
                }
                return Ok(None);
            }
        };
        let key = jwt::SigningKey::load(pem, alg, kid).map_err(|m| err(&[at], m))?;
        Ok(Some(jwt::JwtSettings {
            key,
            issuer,
            subject,
            audience,
        }))
    }

    fn secret(&self, source: SecretSource, what: &str) -> Result<Secret, String> {
        let read_from = |path: &PathBuf, how: &str| {
            self.read_files
                .borrow_mut()
                .push((path.clone(), format!("the {how} {what} is read from")));
        };
        let (key, read): (String, Box<dyn FnOnce() -> Result<String, String>>) = match source {
            // A copy: the parsed text may live on a parser thread's heap (`by_blocks`).
            SecretSource::Inline(s) => (String::new(), Box::new(move || Ok(s.as_str().to_owned()))),
            SecretSource::File(p) => {
                let path = self.path(&p);
                read_from(&path, "file");
                let key = format!("file\0{}", path.display());
                (key, Box::new(move || crate::secret::from_file(&path)))
            }
            SecretSource::Env(var) => (
                format!("env\0{var}"),
                Box::new(move || {
                    std::env::var(&var).map_err(|_| {
                        format!("environment variable {var} is not set (or not UTF-8)")
                    })
                }),
            ),
            SecretSource::Command(argv, timeout) => (
                format!("command\0{}\0{timeout:?}", argv.join("\0")),
                Box::new(move || crate::secret::from_command(&argv, timeout)),
            ),
            SecretSource::Credential(name) => {
                if name.contains('/') {
                    return Err(format!("credential name {name:?} may not contain '/'"));
                }
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!("credential {name:?} needs systemd's CREDENTIALS_DIRECTORY (LoadCredential= in the unit)")
                })?;
                let path = PathBuf::from(dir).join(name);
                read_from(&path, "credential");
                let key = format!("file\0{}", path.display());
                (key, Box::new(move || crate::secret::from_file(&path)))
            }
        };
        let value = if key.is_empty() {
            read()?
        } else {
            // Once per load: the blocks and the whole document (when the blocks give up) read
            // each source once, and two clients naming one command run it once.
            self.secrets
                .0
                .borrow_mut()
                .entry(key)
                .or_insert_with(read)
                .clone()?
        };
        if value.is_empty() {
            return Err(format!("{what} is empty"));
        }
        Ok(Secret::new(value))
    }
}

/// What each secret source gave during one load.
#[derive(Default)]
struct SecretsRead(std::cell::RefCell<HashMap<String, Result<String, String>>>);

/// `value`, or the equal one already in `known`: one allocation for what many clients hold.
fn intern<T, V>(known: &std::cell::RefCell<FastSet<Arc<T>>>, value: V) -> Arc<T>
where
    T: std::hash::Hash + Eq + ?Sized,
    V: std::borrow::Borrow<T> + Into<Arc<T>>,
{
    let mut known = known.borrow_mut();
    if let Some(shared) = known.get(value.borrow()) {
        return shared.clone();
    }
    let shared: Arc<T> = value.into();
    known.insert(shared.clone());
    shared
}

/// Token and authorization endpoints carry credentials: plain http only on loopback.
fn check_endpoint_security(url: &Url) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(url) => Ok(()),
        "http" => Err(format!(
            "{url} is plain http; credentials may only travel over https (http is allowed on 127.0.0.1, ::1 and localhost)"
        )),
        other => Err(format!(
            "{url}: unsupported scheme {other:?}; expected https"
        )),
    }
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// A redirect URI the daemon can listen on itself (RFC 8252 section 7.3): http, a loopback host.
/// Port 0 or no port: a free port chosen at authorization time.
pub fn parse_loopback_redirect(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if url.scheme() != "http" || !is_loopback_host(&url) {
        return Err(format!(
            "{s:?}: the daemon receives the redirect itself, so it must be http://127.0.0.1:PORT/PATH (or [::1], localhost)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?}: a redirect URI may not carry a query or fragment"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests;
