//! Durations as people write them, with one grammar for the configuration, the command line
//! and the socket API: a number and a unit (`90s`, `5m`, `1h 30m`, `7d`, humantime's units).
//! A bare number is refused in the configuration, where `60` could mean seconds or minutes to
//! its reader, and taken as seconds on the command line and in the API (`--min-valid 60`,
//! `?min_valid=60`), where that is the convention.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Whether a bare number is a duration in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unitless {
    Refused,
    Seconds,
}

/// Why a text is not a duration; reads as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("expected a duration like 90s, 5m or 1h, found an empty string")]
    Empty,
    #[error("a duration needs a unit: write {0}s, {0}m or {0}h")]
    NoUnit(String),
    #[error("expected a duration like 90s, 5m or 1h, found {text:?} ({reason})")]
    Invalid { text: String, reason: String },
}

/// Reads `text` (surrounding spaces ignored).
pub fn parse(text: &str, unitless: Unitless) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return match (unitless, trimmed.parse::<u64>()) {
            (Unitless::Seconds, Ok(secs)) => Ok(Duration::from_secs(secs)),
            (Unitless::Seconds, Err(e)) => Err(DurationError::Invalid {
                text: text.to_string(),
                reason: e.to_string(),
            }),
            (Unitless::Refused, _) => Err(DurationError::NoUnit(trimmed.to_string())),
        };
    }
    humantime::parse_duration(trimmed).map_err(|e| DurationError::Invalid {
        text: text.to_string(),
        reason: e.to_string(),
    })
}

/// A duration as it is shown, the way it is written: days, hours, minutes, seconds and
/// milliseconds (`90d`, `1h 30m`, `250ms`), never months of 30.44 days. It reads back as the
/// same duration.
pub fn show(d: Duration) -> String {
    let total = d.as_millis();
    if total == 0 {
        return "0s".into();
    }
    let parts = [
        (total / 86_400_000, "d"),
        (total / 3_600_000 % 24, "h"),
        (total / 60_000 % 60, "m"),
        (total / 1000 % 60, "s"),
        (total % 1000, "ms"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A duration in the configuration: with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, like 90s, 5m, 1h or 7d")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                parse(s, Unitless::Refused).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
                Err(E::custom(DurationError::NoUnit(n.to_string())))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "expected a duration with a unit like 90s, found {n}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&show(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar_with_bare_numbers_where_they_are_the_convention() {
        for unitless in [Unitless::Refused, Unitless::Seconds] {
            assert_eq!(parse("90s", unitless), Ok(Duration::from_secs(90)));
            assert_eq!(parse(" 1h 30m ", unitless), Ok(Duration::from_secs(5400)));
            assert_eq!(parse("7d", unitless), Ok(Duration::from_secs(7 * 86400)));
            assert_eq!(parse("", unitless), Err(DurationError::Empty));
            assert!(matches!(
                parse("soon", unitless),
                Err(DurationError::Invalid { .. })
            ));
            assert!(matches!(
                parse("-5s", unitless),
                Err(DurationError::Invalid { .. })
            ));
        }
        assert_eq!(
            parse("90", Unitless::Refused).unwrap_err().to_string(),
            "a duration needs a unit: write 90s, 90m or 90h"
        );
        assert_eq!(parse("90", Unitless::Seconds), Ok(Duration::from_secs(90)));
        assert!(parse(&"9".repeat(30), Unitless::Seconds).is_err());
    }

    #[test]
    fn shown_as_written_and_read_back() {
        for (d, shown) in [
            (Duration::from_secs(90 * 86400), "90d"),
            (Duration::from_secs(5400), "1h 30m"),
            (Duration::from_secs(90), "1m 30s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(86_400_001), "1d 1ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(show(d), shown);
            assert_eq!(parse(shown, Unitless::Refused), Ok(d), "{shown}");
        }
    }
}
