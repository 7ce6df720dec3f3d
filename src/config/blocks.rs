//! The `clients:` section of a configuration cut into one block of text per client, by
//! indentation alone, without parsing YAML. With 100,000 clients, parsing the whole document
//! is most of start-up and of every reload: cut into blocks, the clients are parsed in
//! parallel chunks (and never all held as YAML events at once), and a reload reads again only
//! the blocks whose text changed.
//!
//! The cut is a shortcut, never the authority: it gives up (`None`) on anything but the plain
//! layout (`clients:` at the margin, one key per client at one indentation), and whatever it
//! gives is checked by the YAML parser, block by block. Anything unexpected falls back to parsing
//! the whole document, which also gives the exact error.

use std::hash::{Hash, Hasher};

/// A configuration's text cut around its clients.
pub struct Split<'a> {
    /// The file without the clients' lines. Its line numbers are not the file's: an error in
    /// it is placed by parsing the whole file, and 100,000 empty lines cost the YAML scanner
    /// 0.1 s.
    pub outside: String,
    /// Of the settings around the clients, wherever they stand: adding or removing a client
    /// moves them but changes nothing they say.
    pub outside_hash: u64,
    pub blocks: Vec<Block<'a>>,
}

/// One client's lines, from its key to the next client's.
pub struct Block<'a> {
    /// The client's name when its key is plain text (a quoted key is only known once parsed).
    pub name: Option<&'a str>,
    pub text: &'a str,
    /// Of `text`: a block whose hash did not change reads the same.
    pub hash: u64,
}

/// Cuts `src`, or `None` if its layout is not the plain one.
pub fn split(src: &str) -> Option<Split<'_>> {
    let mut outside = String::with_capacity(1024);
    let mut outside_hash = std::collections::hash_map::DefaultHasher::new();
    let mut blocks: Vec<Block> = Vec::new();
    // Where the clients' section is: before it, in it (with the indentation of its keys once
    // seen), after it.
    let mut in_clients = false;
    let mut seen_clients = false;
    let mut indent: Option<usize> = None;
    let mut block_start: Option<usize> = None;
    let mut section_start: Option<usize> = None;
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        let trimmed = content.trim_start_matches(' ');
        let blank = trimmed.is_empty() || trimmed.starts_with('#');
        // Tabs, documents and directives are the full parser's to judge.
        if trimmed.starts_with('\t')
            || content.starts_with("---")
            || content.starts_with("...")
            || content.starts_with('%')
        {
            return None;
        }
        let at_margin = !blank && trimmed.len() == content.len();
        if in_clients && at_margin {
            in_clients = false;
            if let Some(b) = block_start.take() {
                blocks.push(block(&src[b..start])?);
            }
        }
        if in_clients {
            // Line breaks the cut does not see (a lone CR, NEL, LS, PS) are libyaml's too.
            if content.contains(['\r', '\u{85}', '\u{2028}', '\u{2029}']) {
                return None;
            }
            // Comments before the first client go with it: the parser must see every byte.
            section_start.get_or_insert(start);
            if blank {
                continue;
            }
            let own = content.len() - trimmed.len();
            let key_indent = *indent.get_or_insert(own);
            if own == key_indent {
                if trimmed.starts_with(['-', '?', '{', '[', '&', '*', '!', '|', '>']) {
                    return None;
                }
                let first = block_start.is_none();
                if let Some(b) = block_start.replace(start) {
                    blocks.push(block(&src[b..start])?);
                }
                if first {
                    block_start = section_start;
                }
            } else if own < key_indent || block_start.is_none() {
                return None;
            }
            continue;
        }
        if at_margin && content.starts_with("clients:") {
            let rest = content["clients:".len()..].trim_start_matches(' ');
            if seen_clients || !(rest.is_empty() || rest.starts_with('#')) {
                return None;
            }
            seen_clients = true;
            in_clients = true;
        }
        outside.push_str(line);
        line.hash(&mut outside_hash);
    }
    if let Some(b) = block_start {
        blocks.push(block(&src[b..])?);
    }
    (seen_clients && indent.is_some_and(|i| i > 0)).then(|| Split {
        outside,
        outside_hash: outside_hash.finish(),
        blocks,
    })
}

fn block(text: &str) -> Option<Block<'_>> {
    let key = text
        .lines()
        .map(|line| line.trim_start_matches(' '))
        .find(|line| !line.is_empty() && !line.starts_with('#'))?;
    // A quoted key with nothing to unescape reads as its inside; others as they are.
    let (key, end) = match key.as_bytes().first() {
        Some(b'"') => (&key[1..], "\":"),
        Some(b'\'') => (&key[1..], "':"),
        _ => (key, ":"),
    };
    let name = key
        .split_once(end)
        .map(|(name, _)| name)
        .filter(|name| !name.is_empty() && !name.contains(['"', '\'', '\\', ' ', '#', '\n']));
    Some(Block {
        name,
        text,
        hash: hash(text),
    })
}

/// A hash of `text` that is the same from one reload to the next in one process.
pub fn hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_one_block_per_client_and_keeps_the_rest_in_place() {
        let src = "\
paths: {state: s}
clients:
  # first
  a:
    client_id: x
    scopes:
      - one

  b: {client_id: y}
  \"c d\":
    client_id: z
  'e': {client_id: w}
refresh:
  jitter: 5
";
        let split = split(src).expect("the plain layout");
        let names: Vec<_> = split.blocks.iter().map(|b| b.name).collect();
        assert_eq!(names, [Some("a"), Some("b"), None, Some("e")]);
        assert_eq!(
            split.blocks[0].text,
            "  # first\n  a:\n    client_id: x\n    scopes:\n      - one\n\n"
        );
        assert_eq!(split.blocks[1].text, "  b: {client_id: y}\n");
        assert_eq!(
            split.outside,
            "paths: {state: s}\nclients:\nrefresh:\n  jitter: 5\n"
        );
        assert_ne!(split.blocks[0].hash, split.blocks[1].hash);
    }

    #[test]
    fn gives_up_on_any_other_layout() {
        for src in [
            "clients: {a: {client_id: x}}\n",
            "clients:\n- a\n",
            "clients:\n  - a: {}\n",
            "clients:\n    a: {}\n  b: {}\n",
            "clients:\n  a: {}\nclients:\n  b: {}\n",
            "---\nclients:\n  a: {}\n",
            "clients:\n  a:\n\tclient_id: x\n",
            "refresh: {}\n",
            "clients:\n",
            "clients:\n  a: {client_id: x}\r  b: {client_id: y}\n",
            "clients:\n  a: {client_id: x}\u{2028}b: {}\n",
        ] {
            assert!(split(src).is_none(), "{src:?}");
        }
    }
}
