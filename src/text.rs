//! Text that came from outside (a server's answer, a redirect, a config file) shown in the one
//! line every error and log entry is.

/// `text` fit for one log line: control characters escaped (a newline in an
/// `error_description` must not forge a second log line), at most `max` chars.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        // Controls, line and paragraph separators, and the bidi marks that can make a log line
        // read differently from what it holds.
        if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_is_capped() {
        assert_eq!(one_line("a\nb\r\u{0}c\td", 100), r"a\nb\r\u{0}c\td");
        assert_eq!(one_line("héllo wörld", 5), "héllo…");
        assert_eq!(one_line("plain", 5), "plain");
        assert_eq!(one_line("a\u{2028}b\u{202E}c", 100), r"a\u{2028}b\u{202e}c");
    }
}
