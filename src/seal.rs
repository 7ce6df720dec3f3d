//! Encryption at rest of the secrets the store keeps: access, refresh and id tokens, PKCE
//! verifiers and device codes.
//!
//! Each value is sealed on its own with XChaCha20-Poly1305 under a random 192-bit nonce (random
//! nonces of that size never collide in practice, so no counter has to survive a crash). The
//! associated data names the column and the row (`tokens.refresh_token/CLIENT`), so a sealed
//! value copied into another row or column does not open. A sealed value reads
//! `oauth2mci:v1:KEYID:BASE64URL(nonce || ciphertext)`; the key id lets a database hold values
//! under several keys while a rotation is under way, and names the key that is missing.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

const PREFIX: &str = "oauth2mci:v1:";
/// Marks a value stored in the clear that would otherwise look sealed (a server can send any
/// token, `oauth2mci:v1:...` included).
const CLEAR: &str = "oauth2mci:clear:";
const NONCE_LEN: usize = 24;

/// A 256-bit key. Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
    id: String,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}, [redacted])", self.id)
    }
}

impl Key {
    /// Reads a key written as 32 bytes in base64 (standard or URL-safe, padded or not) or in
    /// 64 hex digits, as `head -c 32 /dev/urandom | base64` or `openssl rand -hex 32` print it.
    pub fn parse(text: &str) -> Result<Key, String> {
        let text = text.trim();
        let decoded = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(text).ok())
        };
        let bytes: [u8; 32] = decoded
            .and_then(|d| d.try_into().ok())
            .ok_or("an encryption key is 32 random bytes in base64 or 64 hex digits (make one with `head -c 32 /dev/urandom | base64`)")?;
        Ok(Key::from_bytes(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        // A digest, not a prefix of the key: the id is printed in errors and stored beside
        // every value.
        let digest = Sha256::new()
            .chain_update(b"oauth2mci key id\0")
            .chain_update(bytes)
            .finalize();
        Key {
            bytes,
            id: hex::encode(&digest[..4]),
        }
    }

    /// Eight hex digits naming the key in sealed values and in errors.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys configured under `encryption:`: `key` seals new values (none: values are stored in
/// the clear), and every key, old ones included, opens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Keys {
    pub current: Option<Key>,
    pub old: Vec<Key>,
}

/// Why a stored value cannot be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SealError {
    #[error(
        "{what} is encrypted with key {id}, which is not configured: add it under encryption.key or encryption.old_keys"
    )]
    UnknownKey { what: String, id: String },
    #[error(
        "{what} does not decrypt with key {id}: the value was altered or moved from another row"
    )]
    Damaged { what: String, id: String },
    #[error("{what} is marked as encrypted but is not in the form this version writes")]
    Malformed { what: String },
}

/// Seals and opens stored secrets with the configured keys.
#[derive(Clone)]
pub struct Sealer {
    current: Option<(String, XChaCha20Poly1305)>,
    by_id: Vec<(String, XChaCha20Poly1305)>,
}

impl Sealer {
    pub fn new(keys: &Keys) -> Sealer {
        let cipher = |k: &Key| (k.id.clone(), XChaCha20Poly1305::new(&k.bytes.into()));
        Sealer {
            current: keys.current.as_ref().map(cipher),
            by_id: keys.current.iter().chain(&keys.old).map(cipher).collect(),
        }
    }

    /// A sealer that stores values in the clear and opens none that are sealed.
    pub fn clear() -> Sealer {
        Sealer::new(&Keys::default())
    }

    /// `value` as it is to be stored for `place` (`tokens.access_token/CLIENT`).
    pub fn seal(&self, value: &str, place: &str) -> String {
        let Some((id, cipher)) = &self.current else {
            return if value.starts_with("oauth2mci:") {
                format!("{CLEAR}{value}")
            } else {
                value.to_string()
            };
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: value.as_bytes(),
            aad: place.as_bytes(),
        };
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            .expect("XChaCha20-Poly1305 seals any message shorter than 256 GiB");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        format!("{PREFIX}{id}:{}", URL_SAFE_NO_PAD.encode(out))
    }

    /// The value stored for `place`, opened when sealed.
    pub fn open(&self, stored: &str, place: &str) -> Result<String, SealError> {
        if let Some(clear) = stored.strip_prefix(CLEAR) {
            return Ok(clear.to_string());
        }
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let what = || place.to_string();
        let (id, data) = rest
            .split_once(':')
            .ok_or_else(|| SealError::Malformed { what: what() })?;
        let data = URL_SAFE_NO_PAD
            .decode(data)
            .ok()
            .filter(|d| d.len() > NONCE_LEN)
            .ok_or_else(|| SealError::Malformed { what: what() })?;
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        // Ids are 32 bits: two configured keys may share one, so each is tried.
        let mut candidates = self.by_id.iter().filter(|(k, _)| k == id).peekable();
        if candidates.peek().is_none() {
            return Err(SealError::UnknownKey {
                what: what(),
                id: id.to_string(),
            });
        }
        let damaged = || SealError::Damaged {
            what: what(),
            id: id.to_string(),
        };
        let plain = candidates
            .find_map(|(_, cipher)| {
                let payload = Payload {
                    msg: sealed,
                    aad: place.as_bytes(),
                };
                cipher.decrypt(XNonce::from_slice(nonce), payload).ok()
            })
            .ok_or_else(damaged)?;
        String::from_utf8(plain).map_err(|_| damaged())
    }

    /// Whether `stored` is not in the form `seal` would write now: in the clear while a key is
    /// set, under another key than the current one, or sealed while encryption is off.
    pub fn is_stale(&self, stored: &str) -> bool {
        // A value marked clear is not sealed: `strip_prefix(PREFIX)` is None for it.
        match (&self.current, stored.strip_prefix(PREFIX)) {
            (Some(_), None) => true,
            (Some((id, _)), Some(rest)) => rest.split_once(':').map(|(k, _)| k) != Some(id),
            (None, sealed) => sealed.is_some(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.current.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key::from_bytes([n; 32])
    }

    fn sealer(current: Option<u8>, old: &[u8]) -> Sealer {
        Sealer::new(&Keys {
            current: current.map(key),
            old: old.iter().map(|&n| key(n)).collect(),
        })
    }

    #[test]
    fn sealed_values_open_only_in_their_place_and_with_their_key() {
        let s = sealer(Some(1), &[]);
        let sealed = s.seal("rt-secret", "tokens.refresh_token/a");
        assert!(sealed.starts_with(&format!("{PREFIX}{}:", key(1).id())));
        assert!(!sealed.contains("rt-secret"));
        // A fresh nonce each time.
        assert_ne!(sealed, s.seal("rt-secret", "tokens.refresh_token/a"));
        assert_eq!(
            s.open(&sealed, "tokens.refresh_token/a").unwrap(),
            "rt-secret"
        );
        // Moved to another client or column: refused.
        for place in ["tokens.refresh_token/b", "tokens.access_token/a"] {
            assert!(matches!(
                s.open(&sealed, place),
                Err(SealError::Damaged { .. })
            ));
        }
        // One byte changed: refused.
        let mut bytes = sealed.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(bytes).unwrap();
        assert!(matches!(
            s.open(&altered, "tokens.refresh_token/a"),
            Err(SealError::Damaged { .. })
        ));
        // Without the key: the error names it.
        let e = sealer(Some(2), &[])
            .open(&sealed, "tokens.refresh_token/a")
            .unwrap_err();
        assert_eq!(
            e,
            SealError::UnknownKey {
                what: "tokens.refresh_token/a".into(),
                id: key(1).id().into()
            }
        );
        assert!(e.to_string().contains("encryption.old_keys"));
        assert!(matches!(
            s.open("oauth2mci:v1:zz", "p"),
            Err(SealError::Malformed { .. })
        ));
    }

    #[test]
    fn rotation_opens_old_values_and_marks_them_stale() {
        let old = sealer(Some(1), &[]).seal("v", "p");
        let rotated = sealer(Some(2), &[1]);
        assert_eq!(rotated.open(&old, "p").unwrap(), "v");
        assert!(rotated.is_stale(&old));
        assert!(!rotated.is_stale(&rotated.seal("v", "p")));
        assert!(rotated.is_stale("plain"));
        // Turning encryption off: old keys open, values are stored in the clear again.
        let off = sealer(None, &[1]);
        assert_eq!(off.open(&old, "p").unwrap(), "v");
        assert!(off.is_stale(&old) && !off.is_stale("plain"));
        assert_eq!(off.seal("v", "p"), "v");
        assert_eq!(Sealer::clear().open("plain", "p").unwrap(), "plain");
        // A server's token that looks sealed is stored marked, and read back as it came.
        let odd = "oauth2mci:v1:evil:AAAA";
        let stored = off.seal(odd, "p");
        assert_ne!(stored, odd);
        assert_eq!(Sealer::clear().open(&stored, "p").unwrap(), odd);
        assert!(!off.is_stale(&stored) && rotated.is_stale(&stored));
        let sealed = rotated.seal(odd, "p");
        assert_eq!(rotated.open(&sealed, "p").unwrap(), odd);
    }

    #[test]
    fn keys_are_read_in_base64_or_hex_and_never_shown() {
        let bytes = [7u8; 32];
        for text in [
            STANDARD.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
            hex::encode(bytes),
            format!("{}\n", STANDARD.encode(bytes)),
        ] {
            assert_eq!(Key::parse(&text).unwrap(), Key::from_bytes(bytes), "{text}");
        }
        for bad in ["", "short", &STANDARD.encode([7u8; 16]), &"g".repeat(64)] {
            assert!(
                Key::parse(bad).unwrap_err().contains("32 random bytes"),
                "{bad}"
            );
        }
        let shown = format!("{:?}", Key::from_bytes(bytes));
        assert!(!shown.contains(&hex::encode(bytes)) && shown.contains("redacted"));
    }
}
