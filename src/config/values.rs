//! Validated scalar values of the configuration: durations, percentages, file modes, client names,
//! commands. Each one is checked while it is deserialized, so a bad value is reported by serde_yaml
//! with the exact path, line and column of the value.

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::fmt;
use std::time::Duration;

pub use crate::duration::Dur;
use crate::duration::{Unitless, parse as parse_duration_text};

/// A percentage from 0 to 100, written `5%`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Percent {
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

fn parse_percent(s: &str) -> Option<f64> {
    let v: f64 = s.trim().strip_suffix('%')?.trim().parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a percentage like 5%")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Percent, E> {
                parse_percent(s).map(Percent).ok_or_else(|| {
                    E::custom(format!(
                        "expected a percentage from 0% to 100%, like 5%, found {s:?}"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// How long before expiry to refresh: a share of the token's lifetime (`10%`) or a duration (`5m`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BeforeExpiry {
    Share(Percent),
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for BeforeExpiry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BeforeExpiry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a share of the token lifetime like 10%, or a duration like 5m")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<BeforeExpiry, E> {
                if s.trim_end().ends_with('%') {
                    match parse_percent(s) {
                        Some(p) if p > 0.0 && p < 100.0 => Ok(BeforeExpiry::Share(Percent(p))),
                        _ => Err(E::custom(format!(
                            "expected a share of the token lifetime above 0% and below 100%, found {s:?}"
                        ))),
                    }
                } else {
                    parse_duration_text(s, Unitless::Refused)
                        .map(BeforeExpiry::Fixed)
                        .map_err(E::custom)
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// Unix permission bits for a file the daemon writes, written as an octal string: `"0640"`.
/// Bits for "others" are refused: these files hold credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FileMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal file mode as a quoted string, like \"0640\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FileMode, E> {
                let bits = u32::from_str_radix(s.trim(), 8)
                    .ok()
                    .filter(|b| *b <= 0o777)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "expected an octal file mode like \"0640\", found {s:?}"
                        ))
                    })?;
                if bits & 0o007 != 0 {
                    return Err(E::custom(format!(
                        "mode {s:?} gives access to every user on the machine; token files may be shared with a group at most (like \"0640\")"
                    )));
                }
                if bits & 0o600 != 0o600 {
                    return Err(E::custom(format!(
                        "mode {s:?} does not let the daemon itself read and write the file; use at least \"0600\""
                    )));
                }
                Ok(FileMode(bits))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<FileMode, E> {
                Err(E::custom(format!(
                    "write the file mode as a quoted octal string, like \"0{n}\": YAML reads a bare number as decimal"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// The prefix of an `env` token file's variables: the client's name in capitals, anything but letters and digits as `_`
/// (a name may start with a digit, which no variable may).
pub fn env_prefix(client: &str) -> String {
    let name: String = client
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{name}")
    } else {
        name
    }
}

/// Longest client name: it appears in URLs, file names and environment variable names.
pub const MAX_CLIENT_NAME: usize = 64;

/// Checks a client name: ASCII letters, digits, `.`, `_` and `-`, not starting with `.` or `-`.
pub fn check_client_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_CLIENT_NAME || !ok_chars || name.starts_with(['.', '-'])
    {
        return Err(format!(
            "client name {name:?} must be 1 to {MAX_CLIENT_NAME} ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ));
    }
    Ok(())
}

/// A command to run without a shell: a non-empty list of arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command(pub Vec<String>);

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let argv = Vec::<String>::deserialize(d)?;
        if argv.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(de::Error::custom(
                "a command is a list whose first item is the program, like [notify-send, \"{client}\"]",
            ));
        }
        Ok(Command(argv))
    }
}

/// The placeholders of a hook's arguments, each with whether its value comes from outside the
/// configuration (a server's error text, a URL, a code it chose): such text must never become
/// a program's name or part of a shell script, where it would run as a command.
pub const PLACEHOLDERS: [(&str, bool); 9] = [
    ("{client}", false),
    ("{event}", false),
    ("{provider}", false),
    ("{failures}", false),
    ("{error}", true),
    ("{reason}", true),
    ("{url}", true),
    ("{user_code}", true),
    ("{verification_uri}", true),
];

/// Shells whose `-c` argument is a script.
const SHELLS: [&str; 8] = ["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish"];

/// Refuses, in a notification hook, text from outside as the program or inside a shell's
/// script, where it would run as a command; it goes there through the `OAUTH2MCI_*` variables,
/// which a script quotes (`"$OAUTH2MCI_REASON"`).
pub fn check_hook(argv: &[String]) -> Result<(), String> {
    let outside = |arg: &str| {
        PLACEHOLDERS
            .iter()
            .find(|(p, from_outside)| *from_outside && arg.contains(p))
            .map(|(p, _)| *p)
    };
    if argv[0].contains('{') && argv[0].contains('}') {
        return Err(format!(
            "the program {:?} may not hold a placeholder: name the program itself",
            argv[0]
        ));
    }
    let program = std::path::Path::new(&argv[0])
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let shell = SHELLS.contains(&program)
        || (program == "busybox" && argv.get(1).is_some_and(|a| SHELLS.contains(&a.as_str())));
    if !shell {
        return Ok(());
    }
    // The script is the argument after `-c` (or after options that include c, like `-ec`).
    let script = argv
        .iter()
        .skip(1)
        .skip_while(|a| !(a.starts_with('-') && !a.starts_with("--") && a.contains('c')))
        .nth(1);
    match script.and_then(|s| outside(s)) {
        Some(p) => {
            let var = format!(
                "OAUTH2MCI_{}",
                p.trim_matches(['{', '}']).to_ascii_uppercase()
            );
            Err(format!(
                "{p} in a shell script would let a server's text run as a command; use \"${var}\" in the script instead"
            ))
        }
        None => Ok(()),
    }
}

/// A cron schedule, 5 fields (minute precision) or 6 (with seconds), checked by the same parser
/// that will run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronExpr(pub String);

impl CronExpr {
    pub fn parse(s: &str) -> Result<CronExpr, String> {
        let fields = s.split_whitespace().count();
        let six = match fields {
            5 => format!("0 {}", s.trim()),
            6 => s.trim().to_string(),
            _ => {
                return Err(format!(
                    "expected a cron schedule of 5 fields (minute hour day month weekday), found {s:?}"
                ));
            }
        };
        tokio_cron_scheduler::Job::new_async(six.as_str(), |_, _| Box::pin(async {}))
            .map_err(|_| format!("{s:?} is not a valid cron schedule"))?;
        Ok(CronExpr(six))
    }
}

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CronExpr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a cron schedule like \"0 */6 * * *\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<CronExpr, E> {
                CronExpr::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A string that must not be empty (client ids, scopes, paths).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NonEmpty;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-empty string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<NonEmpty, E> {
                if s.trim().is_empty() {
                    Err(E::custom("must not be empty"))
                } else {
                    Ok(NonEmpty(s.to_string()))
                }
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_are_bounded() {
        assert_eq!(parse_percent("5%"), Some(5.0));
        assert_eq!(parse_percent("101%"), None);
        assert_eq!(parse_percent("-1%"), None);
        assert_eq!(parse_percent("5"), None);
    }

    #[test]
    fn file_modes_refuse_other_users() {
        let m: Result<FileMode, _> = serde_yaml::from_str("\"0644\"");
        assert!(m.unwrap_err().to_string().contains("every user"));
        let m: FileMode = serde_yaml::from_str("\"0640\"").unwrap();
        assert_eq!(m.0, 0o640);
        let m: Result<FileMode, _> = serde_yaml::from_str("640");
        assert!(m.unwrap_err().to_string().contains("quoted octal"));
    }

    #[test]
    fn outside_text_never_reaches_a_program_name_or_a_shell_script() {
        let hook =
            |argv: &[&str]| check_hook(&argv.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        for ok in [
            &["notify-send", "oauth2mci", "{client}: {reason}. Open {url}"][..],
            &["sh", "-c", "notify-send \"$OAUTH2MCI_REASON\"", "{reason}"],
            &["sh", "-c", "echo {client} failed {failures} times"],
            &["logger", "-t", "oauth2mci", "{error}"],
            &["/usr/bin/env", "bash", "script.sh", "{reason}"],
        ] {
            assert_eq!(hook(ok), Ok(()), "{ok:?}");
        }
        for (bad, fragment) in [
            (&["{reason}"][..], "may not hold a placeholder"),
            (
                &["sh", "-c", "echo '{reason}' >> log"],
                "\"$OAUTH2MCI_REASON\"",
            ),
            (&["/bin/bash", "-ec", "notify {url}"], "\"$OAUTH2MCI_URL\""),
            (
                &["busybox", "sh", "-c", "x {error}"],
                "\"$OAUTH2MCI_ERROR\"",
            ),
            (&["zsh", "-c", "x {user_code}"], "OAUTH2MCI_USER_CODE"),
        ] {
            let e = hook(bad).unwrap_err();
            assert!(e.contains(fragment), "{bad:?}: {e}");
        }
    }

    #[test]
    fn client_names() {
        assert!(check_client_name("gmail-work_2.x").is_ok());
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_client_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cron_five_and_six_fields() {
        assert_eq!(CronExpr::parse("*/5 * * * *").unwrap().0, "0 */5 * * * *");
        assert!(CronExpr::parse("0 0 * * * *").is_ok());
        assert!(CronExpr::parse("61 * * * *").is_err());
        assert!(CronExpr::parse("* *").is_err());
    }
}
