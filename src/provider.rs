//! Provider profiles: how one authorization server deviates from RFC 6749, as data.
//!
//! A profile is a set of values on the quirk dimensions; the OAuth engine (`oauth`) reads them and
//! never looks at a provider's name. Built-in profiles live in `providers.yaml`, embedded in the
//! binary. A client's profile is built in layers: `generic`, then the named base, then the client's
//! own overrides. This module owns the layers and their merge; it does no I/O.

use crate::config::values::Dur;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the client id and secret.
    Basic,
    /// `client_secret_post`: both in the request body.
    Post,
    /// A public client: only `client_id` in the body.
    None,
}

/// Whether the authorization request carries a PKCE challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PkceMode {
    /// The server refuses requests without PKCE: clients cannot turn it off.
    Required,
    /// Used unless the client says `pkce: false`.
    Supported,
    /// The server rejects or mishandles PKCE parameters: never sent.
    Off,
}

/// How a token request's parameters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestEncoding {
    /// `application/x-www-form-urlencoded` body (RFC 6749).
    Form,
    /// A JSON object body.
    Json,
}

/// Declares the profile fields once: the override layer (`ProfileLayer`, every field optional,
/// as written in YAML) and the resolved `Profile` are both generated from this list, so a new
/// quirk dimension is one line here.
macro_rules! profile_fields {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr ;)*) => {
        /// One layer of a profile as written in YAML: a built-in entry or a client's override.
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ProfileLayer {
            /// The built-in profile this layer starts from (default `generic`).
            pub base: Option<String>,
            $( $(#[$doc])* pub $name: Option<$ty>, )*
        }

        /// A resolved profile: every dimension has a value.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub struct Profile {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl ProfileLayer {
            /// `self` wins where it has a value.
            fn over(self, below: ProfileLayer) -> ProfileLayer {
                ProfileLayer {
                    base: self.base.or(below.base),
                    $( $name: self.$name.or(below.$name), )*
                }
            }

            fn resolve(self) -> Profile {
                Profile { $( $name: self.$name.unwrap_or_else(|| $default), )* }
            }
        }
    };
}

profile_fields! {
    /// One line for `oauth2mci providers`.
    description: String = String::new();
    /// Authorization endpoint template.
    authorize_url: Option<String> = None;
    /// Token endpoint template.
    token_url: Option<String> = None;
    /// Revocation endpoint template (RFC 7009).
    revoke_url: Option<String> = None;
    /// The issuer identifier, checked against `iss` in the authorization response (RFC 9207).
    issuer: Option<String> = None;
    /// Client authentication at the token endpoint.
    client_auth: ClientAuth = ClientAuth::Basic;
    /// PKCE S256 use.
    pkce: PkceMode = PkceMode::Supported;
    /// Token request body encoding.
    token_request: RequestEncoding = RequestEncoding::Form;
    /// Separator of scopes in the authorization request.
    scope_separator: String = " ".to_string();
    /// Scopes requested when the client names none.
    default_scopes: Vec<String> = Vec::new();
    /// Extra query parameters of the authorization request (e.g. what makes a server issue a
    /// refresh token).
    authorize_params: BTreeMap<String, String> = BTreeMap::new();
    /// Extra headers on every token request.
    token_headers: BTreeMap<String, String> = BTreeMap::new();
    /// Access-token lifetime to assume when a response gives none.
    default_expires_in: Option<Dur> = None;
}

/// The embedded built-in profiles, as layers.
fn builtins() -> &'static BTreeMap<String, ProfileLayer> {
    static BUILTINS: OnceLock<BTreeMap<String, ProfileLayer>> = OnceLock::new();
    BUILTINS.get_or_init(|| {
        // The file is part of the binary and checked by a unit test, so a failure here is a
        // build defect, not bad input.
        serde_yaml::from_str(include_str!("providers.yaml"))
            .expect("src/providers.yaml is checked by the test suite")
    })
}

/// Names of the built-in profiles, sorted.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    builtins().keys().map(String::as_str)
}

/// The profile a client asked for: a name, or a layer over a base.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileSpec {
    Named(String),
    Layer(Box<ProfileLayer>),
}

impl Default for ProfileSpec {
    fn default() -> Self {
        ProfileSpec::Named("generic".into())
    }
}

impl<'de> Deserialize<'de> for ProfileSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ProfileSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a built-in provider name, or a map of profile fields")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ProfileSpec, E> {
                Ok(ProfileSpec::Named(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<ProfileSpec, A::Error> {
                ProfileLayer::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(|l| ProfileSpec::Layer(Box::new(l)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Why a profile cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("unknown provider {0:?}; built-in providers are: {1}")]
    Unknown(String, String),
}

/// Builds a client's profile: `generic` ← named base ← the client's layer.
pub fn resolve(spec: &ProfileSpec) -> Result<(String, Profile), ProfileError> {
    let (base_name, layer) = match spec {
        ProfileSpec::Named(name) => (name.clone(), ProfileLayer::default()),
        ProfileSpec::Layer(l) => (
            l.base.clone().unwrap_or_else(|| "generic".into()),
            (**l).clone(),
        ),
    };
    let builtins = builtins();
    let base = builtins.get(&base_name).cloned().ok_or_else(|| {
        ProfileError::Unknown(
            base_name.clone(),
            builtin_names().collect::<Vec<_>>().join(", "),
        )
    })?;
    let generic = builtins.get("generic").cloned().unwrap_or_default();
    let label = match spec {
        ProfileSpec::Named(_) => base_name,
        ProfileSpec::Layer(_) => format!("{base_name}+custom"),
    };
    Ok((label, layer.over(base).over(generic).resolve()))
}

/// Fills `{base_url}`, `{tenant}`... in an endpoint template; names a missing variable.
pub fn fill_template(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in URL template {template:?}"))?;
        let var = &after[..close];
        let value = vars.get(var).ok_or_else(|| {
            format!("URL template {template:?} needs `{var}`: set `{var}:` on the client")
        })?;
        out.push_str(value.trim_end_matches('/'));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profiles_parse_and_resolve() {
        assert!(builtin_names().any(|n| n == "generic"));
        for name in builtin_names() {
            resolve(&ProfileSpec::Named(name.into())).unwrap();
        }
    }

    #[test]
    fn layers_override_base_and_generic() {
        let layer: ProfileLayer =
            serde_yaml::from_str("token_url: https://x/token\ntoken_request: json\n").unwrap();
        let (label, p) = resolve(&ProfileSpec::Layer(Box::new(layer))).unwrap();
        assert_eq!(label, "generic+custom");
        assert_eq!(p.token_request, RequestEncoding::Json);
        assert_eq!(p.client_auth, ClientAuth::Basic);
        assert_eq!(p.token_url.as_deref(), Some("https://x/token"));
    }

    #[test]
    fn unknown_fields_and_providers_are_refused() {
        let e = serde_yaml::from_str::<ProfileLayer>("tokn_url: x").unwrap_err();
        assert!(e.to_string().contains("unknown field `tokn_url`"));
        let e = resolve(&ProfileSpec::Named("gogle".into())).unwrap_err();
        assert!(e.to_string().contains("unknown provider \"gogle\""));
    }

    #[test]
    fn templates_fill_and_name_missing_vars() {
        let vars = BTreeMap::from([("base_url".to_string(), "https://fhir.example/".to_string())]);
        assert_eq!(
            fill_template("{base_url}/auth/token", &vars).unwrap(),
            "https://fhir.example/auth/token"
        );
        assert!(
            fill_template("https://{tenant}/x", &vars)
                .unwrap_err()
                .contains("`tenant`")
        );
    }
}
