//! A token endpoint's answer, read through every built-in profile: arbitrary status, content
//! type and body. Reading must never panic; a token must come with a usable lifetime; an error
//! must be one line and never quote a token the body carried.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oauth2mci::oauth::{Answer, interpret};
use oauth2mci::provider::{self, Profile, ProfileSpec};
use std::sync::LazyLock;

static PROFILES: LazyLock<Vec<Profile>> = LazyLock::new(|| {
    provider::builtin_names()
        .filter_map(|name| provider::resolve(&ProfileSpec::Named(name.to_string())).ok())
        .map(|(_, profile)| profile)
        .collect()
});

const STATUSES: [u16; 12] = [200, 201, 204, 302, 400, 401, 403, 404, 429, 500, 502, 503];
const CONTENT_TYPES: [&str; 7] = [
    "application/json",
    "application/json; charset=utf-8",
    "application/x-www-form-urlencoded",
    "text/plain",
    "text/html",
    "",
    "image/png",
];
const NOW: i64 = 1_790_000_000_000;

/// Values of token fields in a JSON body that are distinctive enough to search for in a message.
fn carried_tokens(body: &[u8]) -> Vec<String> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    ["access_token", "refresh_token", "id_token"]
        .iter()
        .filter_map(|k| fields.get(*k)?.as_str())
        .filter(|v| {
            v.len() >= 16
                && v.chars().all(|c| c.is_ascii_alphanumeric())
                && v.chars().any(|c| c.is_ascii_digit())
        })
        .map(str::to_string)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [p, s, c, body @ ..] = data else {
        return;
    };
    let profile = &PROFILES[*p as usize % PROFILES.len()];
    let answer = Answer {
        status: STATUSES[*s as usize % STATUSES.len()],
        content_type: CONTENT_TYPES[*c as usize % CONTENT_TYPES.len()].to_string(),
        body: body.to_vec(),
        retry_after: None,
    };
    match interpret(profile, "https://as.example/token", &answer, NOW) {
        Ok(token) => {
            assert!(!token.access_token.expose().is_empty(), "an empty access token was accepted");
            if let Some(at) = token.expires_at {
                assert!(at > NOW, "a token that has already expired was accepted: {at}");
            }
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.contains('\n'), "an error spans lines: {shown:?}");
            for token in carried_tokens(body) {
                assert!(!shown.contains(&token), "an error quotes a token: {shown:?}");
            }
        }
    }
});
