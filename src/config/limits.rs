//! The limits that keep any configuration, however large or strange, within bounded memory and
//! time, checked before the YAML parser sees the text:
//!
//! - the file: at most `MAX_FILE_BYTES`, a regular file (`read`);
//! - nesting: at most `MAX_DEPTH` levels, flow (`[ {`) and block (indentation) together;
//! - aliases: with anchors in the file, what they expand to may add at most
//!   `MAX_ALIAS_NODES` nodes and `MAX_ALIAS_BYTES` of text to the file's own (`expansion`);
//! - clients: at most `MAX_CLIENTS`.
//!
//! Why by hand: libyaml keeps one entry per open flow level and walks them all for every token,
//! so nesting is quadratic: 100,000 `[` took over a minute before the parser said anything,
//! and serde_yaml's own depth limit (128) applies only after that. The scan below reads the
//! text once, as far as YAML's structure goes (quoted scalars, comments, block scalars, and
//! brackets only where a node starts), and stops at the first level too deep.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::path::Path;

/// Far above any real configuration (100,000 clients take 15 MB; a million, about 150 MB).
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;
/// A configuration's own structure is 6 levels deep (`clients.a.provider.token_params.k`).
pub const MAX_DEPTH: usize = 32;
/// Nodes (scalars and collections) the file may hold: parsing holds an event of about 140
/// bytes for each, so this keeps a parse under about 2.2 GB, with room for a million clients
/// written compactly (13 nodes each).
pub const MAX_NODES: u64 = 16_000_000;
/// The longest scalar: no setting needs more (a secret written inline is 64 KiB at most), and
/// a scalar is copied several times on its way from the text to a setting.
pub const MAX_SCALAR_BYTES: usize = 1024 * 1024;
/// Aliases may add this many nodes to what the file holds.
pub const MAX_ALIAS_NODES: u64 = 1_000_000;
/// ...and this much scalar text.
pub const MAX_ALIAS_BYTES: u64 = 16 * 1024 * 1024;
/// What one daemon is measured to carry (BENCHMARKS.md); beyond it, run several.
pub const MAX_CLIENTS: usize = 1_000_000;

/// What the scan found: whether there are anchors, and where the first one is.
#[derive(Debug, PartialEq)]
pub struct Shape {
    /// Where the first anchor (`&name`) stands, if any: aliases may then expand, which
    /// `expansion` measures.
    pub first_anchor: Option<(usize, usize)>,
}

/// A limit passed at `(line, column)`, 1-based.
#[derive(Debug, PartialEq)]
pub struct Passed {
    pub line: usize,
    pub column: usize,
    pub limit: Limit,
}

/// Which limit.
#[derive(Debug, PartialEq, Clone, Copy)]
pub enum Limit {
    Depth,
    Nodes,
    Scalar,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Depth => write!(
                f,
                "nested deeper than {MAX_DEPTH} levels; a configuration needs fewer than 10"
            ),
            Limit::Nodes => write!(
                f,
                "more than {MAX_NODES} YAML nodes; a configuration of a million clients needs fewer"
            ),
            Limit::Scalar => write!(
                f,
                "a value longer than {} MiB; no setting needs that much",
                MAX_SCALAR_BYTES / (1024 * 1024)
            ),
        }
    }
}

/// Scans `src` for its nesting depth, nodes, scalar sizes and anchors, in one pass.
pub fn shape(src: &str) -> Result<Shape, Passed> {
    Scanner::new(src).run()
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
    line: usize,
    line_start: usize,
    /// Indentations of the open block collections.
    indents: Vec<usize>,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    nodes: u64,
    /// A plain scalar that ended a line in block context may go on, on lines indented more
    /// than the line it began on: that indentation, and its length so far.
    plain: Option<(usize, usize)>,
    first_anchor: Option<(usize, usize)>,
}

impl<'a> Scanner<'a> {
    fn new(src: &'a str) -> Scanner<'a> {
        Scanner {
            bytes: src.as_bytes(),
            at: 0,
            line: 1,
            line_start: 0,
            indents: Vec::new(),
            flow: 0,
            nodes: 0,
            plain: None,
            first_anchor: None,
        }
    }

    fn passed(&self, limit: Limit) -> Passed {
        let (line, column) = self.here();
        Passed {
            line,
            column,
            limit,
        }
    }

    fn here(&self) -> (usize, usize) {
        let end = self.at.min(self.bytes.len());
        let column = String::from_utf8_lossy(&self.bytes[self.line_start.min(end)..end])
            .chars()
            .count()
            + 1;
        (self.line, column)
    }

    fn peek(&self, ahead: usize) -> u8 {
        self.bytes.get(self.at + ahead).copied().unwrap_or(b'\n')
    }

    fn newline(&mut self) {
        self.at += 1;
        self.line += 1;
        self.line_start = self.at;
    }

    /// Counts one more node, starting here.
    fn node(&mut self) -> Result<(), Passed> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.passed(Limit::Nodes));
        }
        Ok(())
    }

    fn run(mut self) -> Result<Shape, Passed> {
        // A byte order mark is not content (libyaml skips it).
        if self.bytes.starts_with("\u{feff}".as_bytes()) {
            self.at = 3;
            self.line_start = 3;
        }
        while self.at < self.bytes.len() {
            self.line_of_text()?;
        }
        Ok(Shape {
            first_anchor: self.first_anchor,
        })
    }

    /// One line from its start: its indentation (in block context), then its nodes.
    fn line_of_text(&mut self) -> Result<(), Passed> {
        let mut indent = 0;
        while self.peek(indent) == b' ' {
            indent += 1;
        }
        let first = self.peek(indent);
        let start = self.at;
        self.at += indent;
        if matches!(first, b'\n' | b'#') || self.at >= self.bytes.len() {
            return self.rest_of_line();
        }
        if self.flow == 0 {
            if let Some((began, length)) = self.plain.take()
                && indent > began
                && self.continues_plain()
            {
                // The plain scalar of an earlier line goes on here.
                return self.plain_continued(began, length);
            }
            // Document markers: what follows `---` is a node.
            if indent == 0
                && (self.bytes[start..].starts_with(b"---")
                    || self.bytes[start..].starts_with(b"..."))
                && matches!(self.peek(3), b' ' | b'\t' | b'\n' | b'\r')
            {
                self.at += 3;
                return self.nodes(indent);
            }
            while self.indents.last().is_some_and(|&i| i > indent) {
                self.indents.pop();
            }
            if self.indents.last().is_none_or(|&i| i < indent) {
                self.indents.push(indent);
                self.node()?;
            }
            self.check_depth(0)?;
        }
        self.nodes(indent)
    }

    /// Whether the line from here can only go on a plain scalar: nothing on it starts a node
    /// of its own (`- `, `? `, `key: `, a comment).
    fn continues_plain(&self) -> bool {
        let line_end = self.bytes[self.at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.bytes.len(), |i| self.at + i);
        let line = &self.bytes[self.at..line_end];
        let starts_node = matches!(line.first(), Some(b'-' | b'?'))
            && matches!(line.get(1), None | Some(b' ' | b'\t' | b'\r'));
        let has_key = line
            .windows(2)
            .any(|w| w[0] == b':' && matches!(w[1], b' ' | b'\t' | b'\r'))
            || line.ends_with(b":");
        !starts_node && !has_key && line.first() != Some(&b'#')
    }

    fn plain_continued(&mut self, began: usize, length: usize) -> Result<(), Passed> {
        let from = self.at;
        self.skip_to_line_end();
        let length = length + (self.at - from);
        if length > MAX_SCALAR_BYTES {
            return Err(self.passed(Limit::Scalar));
        }
        self.plain = Some((began, length));
        if self.at < self.bytes.len() {
            self.newline();
        }
        Ok(())
    }

    fn check_depth(&self, extra: usize) -> Result<(), Passed> {
        if self.indents.len() + self.flow + extra > MAX_DEPTH {
            Err(self.passed(Limit::Depth))
        } else {
            Ok(())
        }
    }

    /// The nodes of a line (and of following lines, while a quoted scalar or a flow collection
    /// goes on): `indent` is the line's, for a block scalar's extent.
    fn nodes(&mut self, indent: usize) -> Result<(), Passed> {
        // Compact nesting on one line (`- - x`, `- a: b`).
        let mut extra = 0;
        let mut node_start = true;
        while self.at < self.bytes.len() {
            let b = self.peek(0);
            match b {
                b'\n' => {
                    if self.flow == 0 {
                        self.newline();
                        return Ok(());
                    }
                    // Inside a flow collection, lines go on without indentation rules.
                    self.newline();
                    node_start = true;
                }
                b' ' | b'\t' | b'\r' => self.at += 1,
                b'#' if self.at == self.line_start
                    || matches!(self.bytes[self.at - 1], b' ' | b'\t') =>
                {
                    self.skip_to_line_end()
                }
                b'[' | b'{' if node_start || self.flow > 0 => {
                    self.node()?;
                    self.flow += 1;
                    self.check_depth(extra)?;
                    self.at += 1;
                    node_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    self.at += 1;
                    node_start = false;
                }
                b',' if self.flow > 0 => {
                    self.at += 1;
                    node_start = true;
                }
                b'"' if node_start => {
                    self.node()?;
                    self.double_quoted()?;
                    node_start = false;
                }
                b'\'' if node_start => {
                    self.node()?;
                    self.single_quoted()?;
                    node_start = false;
                }
                b'!' if node_start && self.peek(1) == b'<' => {
                    // A verbatim tag (`!<tag:x,y>`) may hold any character but `>`.
                    while !matches!(self.peek(0), b'>' | b'\n') {
                        self.at += 1;
                    }
                    self.at += 1;
                }
                b'&' | b'*' | b'!' if node_start => {
                    if b == b'&' && self.first_anchor.is_none() {
                        self.first_anchor = Some(self.here());
                    }
                    while !matches!(
                        self.peek(0),
                        b' ' | b'\t' | b'\n' | b'\r' | b',' | b'[' | b']' | b'{' | b'}'
                    ) {
                        self.at += 1;
                    }
                }
                b'|' | b'>' if node_start && self.flow == 0 => {
                    self.node()?;
                    self.skip_to_line_end();
                    self.block_scalar(indent)?;
                    return Ok(());
                }
                b'-' | b'?' | b':' if matches!(self.peek(1), b' ' | b'\t' | b'\n' | b'\r') => {
                    if b != b':' && node_start && self.flow == 0 {
                        extra += 1;
                        self.node()?;
                        self.check_depth(extra)?;
                    }
                    self.at += 1;
                    node_start = true;
                }
                _ => {
                    self.node()?;
                    self.plain(indent)?;
                    node_start = false;
                }
            }
        }
        Ok(())
    }

    fn rest_of_line(&mut self) -> Result<(), Passed> {
        self.skip_to_line_end();
        if self.at < self.bytes.len() {
            self.newline();
        }
        Ok(())
    }

    fn skip_to_line_end(&mut self) {
        while self.at < self.bytes.len() && self.bytes[self.at] != b'\n' {
            self.at += 1;
        }
    }

    /// A plain scalar: up to what ends one in the current context. One that reaches the end
    /// of its line in block context may go on on the next (`plain`).
    fn plain(&mut self, indent: usize) -> Result<(), Passed> {
        let from = self.at;
        self.at += 1;
        while self.at < self.bytes.len() {
            let b = self.bytes[self.at];
            let ends = match b {
                b'\n' => true,
                b':' => {
                    matches!(self.peek(1), b' ' | b'\t' | b'\n' | b'\r')
                        || (self.flow > 0 && matches!(self.peek(1), b',' | b']' | b'}'))
                }
                b'#' => matches!(self.bytes[self.at - 1], b' ' | b'\t'),
                b',' | b']' | b'}' | b'[' | b'{' => self.flow > 0,
                _ => false,
            };
            if ends {
                break;
            }
            self.at += 1;
        }
        if self.at - from > MAX_SCALAR_BYTES {
            return Err(self.passed(Limit::Scalar));
        }
        if self.flow == 0 && self.peek(0) == b'\n' {
            self.plain = Some((indent, self.at - from));
        }
        Ok(())
    }

    fn double_quoted(&mut self) -> Result<(), Passed> {
        let from = self.at;
        self.at += 1;
        while self.at < self.bytes.len() {
            match self.bytes[self.at] {
                // An escaped line break continues the scalar on the next line.
                b'\\' if self.peek(1) == b'\n' => {
                    self.at += 1;
                    self.newline();
                }
                b'\\' => self.at += 2,
                b'"' => {
                    self.at += 1;
                    break;
                }
                b'\n' => self.newline(),
                _ => self.at += 1,
            }
        }
        self.scalar_ends(from)
    }

    fn single_quoted(&mut self) -> Result<(), Passed> {
        let from = self.at;
        self.at += 1;
        while self.at < self.bytes.len() {
            match self.bytes[self.at] {
                b'\'' if self.peek(1) == b'\'' => self.at += 2,
                b'\'' => {
                    self.at += 1;
                    break;
                }
                b'\n' => self.newline(),
                _ => self.at += 1,
            }
        }
        self.scalar_ends(from)
    }

    fn scalar_ends(&self, from: usize) -> Result<(), Passed> {
        if self.at.saturating_sub(from) > MAX_SCALAR_BYTES {
            Err(self.passed(Limit::Scalar))
        } else {
            Ok(())
        }
    }

    /// The lines of a block scalar (`|`, `>`) after its header line: blank, or indented more
    /// than the line that opened it. The newline of the header line is next.
    fn block_scalar(&mut self, indent: usize) -> Result<(), Passed> {
        let from = self.at;
        while self.at < self.bytes.len() {
            self.newline();
            let mut spaces = 0;
            while self.peek(spaces) == b' ' {
                spaces += 1;
            }
            let next = self.peek(spaces);
            let blank = matches!(next, b'\n' | b'\r');
            if !blank && spaces <= indent || self.at + spaces >= self.bytes.len() {
                // Not part of it: the next line starts here.
                return self.scalar_ends(from);
            }
            self.skip_to_line_end();
            self.scalar_ends(from)?;
        }
        self.scalar_ends(from)
    }
}

/// Counts what `src` expands to, aliases followed, and stops at the limits: past them, or
/// past serde_yaml's own repetition limit, the error says so (with the place where serde_yaml
/// was when it stopped).
pub fn expansion(src: &str) -> Result<(), serde_yaml::Error> {
    let mut budget = Budget {
        nodes: src.len() as u64 + MAX_ALIAS_NODES,
        bytes: src.len() as u64 + MAX_ALIAS_BYTES,
    };
    for document in serde_yaml::Deserializer::from_str(src) {
        document.deserialize_any(Counter(&mut budget))?;
    }
    Ok(())
}

struct Budget {
    nodes: u64,
    bytes: u64,
}

struct Counter<'b>(&'b mut Budget);

impl Counter<'_> {
    fn take(&mut self, bytes: usize) -> Result<(), String> {
        let b = &mut self.0;
        b.nodes = b.nodes.checked_sub(1).ok_or_else(|| {
            format!(
                "anchors and aliases expand the file past its own size plus {MAX_ALIAS_NODES} nodes"
            )
        })?;
        b.bytes = b.bytes.checked_sub(bytes as u64).ok_or_else(|| {
            format!(
                "anchors and aliases expand the file past its own size plus {} MiB of text",
                MAX_ALIAS_BYTES / (1024 * 1024)
            )
        })?;
        Ok(())
    }
}

impl<'de> de::DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! scalar {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name<E: de::Error>(mut self, _: $ty) -> Result<(), E> {
            self.take(8).map_err(E::custom)
        }
    )*};
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_i128: i128, visit_u128: u128);

    fn visit_str<E: de::Error>(mut self, s: &str) -> Result<(), E> {
        self.take(s.len()).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.take(0).map_err(E::custom)
    }

    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.take(0).map_err(E::custom)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.take(0).map_err(de::Error::custom)?;
        while seq.next_element_seed(Counter(self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.take(0).map_err(de::Error::custom)?;
        while map.next_key_seed(Counter(self.0))?.is_some() {
            map.next_value_seed(Counter(self.0))?;
        }
        Ok(())
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use de::VariantAccess;
        let (_, variant) = data.variant_seed(Counter(self.0))?;
        variant.newtype_variant_seed(Counter(self.0))
    }
}

/// What a file the configuration is read from may not be, before a byte of it is read: a FIFO
/// (reading would wait for a writer forever), a device, a folder, or larger than the limit.
pub fn check_file(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        ""
    };
    if !kind.is_empty() {
        return Err(format!(
            "{} is {kind}, not a regular file; a configuration is read from a file",
            path.display()
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "the file is {} MiB, more than the {} MiB a configuration may take",
            meta.len() / (1024 * 1024),
            MAX_FILE_BYTES / (1024 * 1024)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(src: &str) -> Option<(usize, usize)> {
        shape(src).err().map(|e| {
            assert_eq!(e.limit, Limit::Depth);
            (e.line, e.column)
        })
    }

    #[test]
    fn deep_nesting_is_found_where_it_passes_the_limit_in_linear_time() {
        let flow = format!(
            "clients:\n  a:\n    client_id: {}{}\n",
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        let begun = std::time::Instant::now();
        // `clients` and `a` are two levels, the third `[` past 30 more is the 33rd.
        assert_eq!(depth_error(&flow), Some((3, 16 + MAX_DEPTH - 3)));
        assert!(begun.elapsed() < std::time::Duration::from_secs(2));
        let mut block = String::from("clients:\n");
        for i in 0..100 {
            block.push_str(&format!("{}k{i}:\n", " ".repeat(i + 2)));
        }
        assert_eq!(depth_error(&block), Some((MAX_DEPTH + 1, MAX_DEPTH + 2)));
        let compact = format!("clients:\n  a: {}x\n", "- ".repeat(40));
        assert!(depth_error(&compact).is_some());
        let mixed = format!("a:\n  b: {}\n", "{c: ".repeat(40));
        assert!(depth_error(&mixed).is_some());
    }

    #[test]
    fn nesting_hidden_in_every_construct_is_found() {
        let deep = "[".repeat(100);
        for before in [
            "x: !<tag:a,b> ",
            "x: !<a[b]{c}> ",
            "--- ",
            "---\t",
            "\u{feff}",
            "\u{feff}x: ",
            "x:\t",
            "- ",
            "-\t",
            "? ",
            "x: &a ",
            "x: !!seq ",
            "x: !t ",
            "\"k\": ",
            "'k': ",
            "{k: ",
            "x:\r\n  ",
            "x: |\n  text\ny: ",
            "x: >2\n   text\ny: ",
            "x: 'multi\n  line'\ny: ",
            "x: \"a\\\n b\"\ny: ",
            "x: plain\n  continued\ny: ",
            "x: [a, 'b, c', \"d]\", ",
        ] {
            let src = format!("{before}{deep}");
            let e = shape(&src).expect_err(&format!("{before:?}"));
            assert_eq!(e.limit, Limit::Depth, "{before:?}");
        }
    }

    #[test]
    fn nodes_and_scalars_are_bounded() {
        let many = format!("x: [{}]\n", "1,".repeat(MAX_NODES as usize));
        let e = shape(&many).unwrap_err();
        assert_eq!(e.limit, Limit::Nodes);
        assert_eq!(e.line, 1);
        let big = "x".repeat(MAX_SCALAR_BYTES + 1);
        for src in [
            format!("a: {big}\n"),
            format!("a: '{big}'\n"),
            format!("a: \"{big}\"\n"),
            format!("a: |\n  {big}\n"),
            format!(
                "a: start\n{}\n",
                vec![format!("  {}", "y".repeat(1000)); 1100].join("\n")
            ),
            format!(
                "a: >\n{}\n",
                vec![format!("  {}", "y".repeat(1000)); 1100].join("\n")
            ),
        ] {
            assert_eq!(
                shape(&src).unwrap_err().limit,
                Limit::Scalar,
                "{}",
                &src[..20]
            );
        }
        let fine = format!("a: '{}'\nb: {}\n", "x".repeat(60_000), "y".repeat(60_000));
        assert!(shape(&fine).is_ok());
    }

    #[test]
    fn brackets_that_are_not_structure_do_not_count() {
        let deep_text = "[".repeat(100);
        for src in [
            format!("a: \"{deep_text}\"\n"),
            format!("a: '{deep_text}'\n"),
            format!("a: x{deep_text}\n"),
            format!("a: x # {deep_text}\n"),
            format!("# {deep_text}\na: 1\n"),
            format!("a: |\n  {deep_text}\n  {deep_text}\nb: 1\n"),
            format!("a: >-\n    {deep_text}\n\n    x\nb: 1\n"),
            format!("a: \"multi\n  line {deep_text}\"\n"),
            format!("a: 'it''s {deep_text}'\n"),
            "a: http://[::1]:8080/x\n".to_string(),
            "a: [http://[::1]/]\n".to_string(),
        ] {
            assert_eq!(shape(&src), Ok(Shape { first_anchor: None }), "{src}");
        }
    }

    #[test]
    fn anchors_are_seen_where_they_stand() {
        assert_eq!(
            shape("a: &x [1]\nb: *x\n").unwrap().first_anchor,
            Some((1, 4))
        );
        assert_eq!(
            shape("a: [1, &x 1, *x]\n").unwrap().first_anchor,
            Some((1, 8))
        );
        for src in [
            "a: https://x/?a=1&b=2\n",
            "a: \"&x\"\n",
            "a: b # &x\n",
            "a: |\n  &x\n",
        ] {
            assert_eq!(shape(src).unwrap().first_anchor, None, "{src}");
        }
    }

    #[test]
    fn aliases_expand_only_so_far() {
        let wide = format!(
            "a: &s [{}]\nb: [{}]\n",
            vec!["s"; 10_000].join(", "),
            vec!["*s"; 200].join(", ")
        );
        let begun = std::time::Instant::now();
        let e = expansion(&wide).unwrap_err().to_string();
        assert!(
            e.contains("expand the file past its own size plus 1000000 nodes"),
            "{e}"
        );
        assert!(begun.elapsed() < std::time::Duration::from_secs(20));
        let long = format!(
            "a: &s \"{}\"\nb: [{}]\n",
            "x".repeat(1 << 20),
            vec!["*s"; 40].join(", ")
        );
        let e = expansion(&long).unwrap_err().to_string();
        assert!(e.contains("16 MiB of text"), "{e}");
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            laughs.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                vec![format!("*a{}", i - 1); 10].join(", ")
            ));
        }
        assert!(expansion(&laughs).is_err());
        // Modest sharing is fine.
        let shared = format!(
            "p: &p {{token_url: x, authorize_url: y}}\nc: [{}]\n",
            vec!["*p"; 1000].join(", ")
        );
        assert!(expansion(&shared).is_ok());
    }
}
