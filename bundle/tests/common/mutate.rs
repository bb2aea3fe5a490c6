//! Mutations of valid inputs for the property tests of every parser of
//! outside input (bundles, manifests, policies, agent config, plans,
//! inventories, ELF/BTF objects): bit flips, byte changes, insertions,
//! deletions, truncation and repeated slices. Arbitrary bytes mostly fail
//! at the first check a parser makes; a few edits of a valid input reach
//! the checks behind it. The other crates' tests include this file by
//! `#[path]`, so there is one definition of what "mutated" means.
#![allow(dead_code)]

use proptest::prelude::*;

/// One edit, at a position taken modulo the input's length when applied.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flip bit `bit` of the byte at the position.
    Flip(usize, u8),
    /// Replace the byte at the position.
    Set(usize, u8),
    /// Insert a byte before the position.
    Insert(usize, u8),
    /// Remove the byte at the position.
    Delete(usize),
    /// Cut the input at the position.
    Truncate(usize),
    /// Insert a copy of `len` bytes from the first position at the second.
    Repeat(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Edit::Set(i, v)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => any::<usize>().prop_map(Edit::Delete),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(a, b, n)| Edit::Repeat(a, b, n)),
    ]
}

/// One to `max` edits.
pub fn edits(max: usize) -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..=max)
}

/// `input` with `edits` applied in order.
pub fn apply(input: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = input.to_vec();
    for e in edits {
        let n = b.len();
        match *e {
            Edit::Flip(i, bit) if n > 0 => b[i % n] ^= 1 << bit,
            Edit::Set(i, v) if n > 0 => b[i % n] = v,
            Edit::Insert(i, v) => b.insert(i % (n + 1), v),
            Edit::Delete(i) if n > 0 => {
                b.remove(i % n);
            }
            Edit::Truncate(i) => b.truncate(i % (n + 1)),
            Edit::Repeat(from, to, len) if n > 0 => {
                let from = from % n;
                let slice = b[from..(from + len).min(n)].to_vec();
                let to = to % (n + 1);
                b.splice(to..to, slice);
            }
            _ => {}
        }
    }
    b
}

/// Characters that mean something to TOML and JSON, and some that are
/// more than one byte in UTF-8, for edits of text that stay text.
const TEXT_CHARS: &[char] = &[
    '[',
    ']',
    '{',
    '}',
    '=',
    '"',
    '\'',
    '\n',
    '#',
    '.',
    ',',
    ':',
    '\\',
    '-',
    '+',
    '0',
    '1',
    '9',
    'a',
    'e',
    'x',
    ' ',
    '\t',
    '\0',
    'é',
    'ß',
    '€',
    '\u{10FFFF}',
    '\u{FEFF}',
];

/// One edit of text: a character inserted, replaced or removed, or the
/// text cut, at a character position taken modulo its length.
#[derive(Debug, Clone)]
pub enum TextEdit {
    Insert(usize, char),
    Replace(usize, char),
    Remove(usize),
    Cut(usize),
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    let c = prop::sample::select(TEXT_CHARS);
    prop_oneof![
        3 => (any::<usize>(), c.clone()).prop_map(|(i, c)| TextEdit::Insert(i, c)),
        3 => (any::<usize>(), c).prop_map(|(i, c)| TextEdit::Replace(i, c)),
        2 => any::<usize>().prop_map(TextEdit::Remove),
        1 => any::<usize>().prop_map(TextEdit::Cut),
    ]
}

/// One to `max` text edits.
pub fn text_edits(max: usize) -> impl Strategy<Value = Vec<TextEdit>> {
    prop::collection::vec(text_edit(), 1..=max)
}

/// `text` with `edits` applied in order.
pub fn apply_text(text: &str, edits: &[TextEdit]) -> String {
    let mut c: Vec<char> = text.chars().collect();
    for e in edits {
        let n = c.len();
        match *e {
            TextEdit::Insert(i, ch) => c.insert(i % (n + 1), ch),
            TextEdit::Replace(i, ch) if n > 0 => c[i % n] = ch,
            TextEdit::Remove(i) if n > 0 => {
                c.remove(i % n);
            }
            TextEdit::Cut(i) => c.truncate(i % (n + 1)),
            _ => {}
        }
    }
    c.into_iter().collect()
}

/// Either kind of mutation of a text, as text: byte edits are read back
/// lossily, as a parser of a file read as UTF-8 would never see them.
pub fn mutated_text(text: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        text_edits(6).prop_map(move |e| apply_text(text, &e)),
        edits(6)
            .prop_map(move |e| String::from_utf8_lossy(&apply(text.as_bytes(), &e)).into_owned()),
    ]
}

/// Checks that an error's message starts with `file:line:col` where the
/// line is one of `text`'s (or just past its end): the error points at a
/// place a person can find.
pub fn located(msg: &str, file: &str, text: &str) -> Result<(), TestCaseError> {
    let Some(rest) = msg.strip_prefix(&format!("{file}:")) else {
        return Err(TestCaseError::fail(format!("{msg:?} does not name {file}")));
    };
    let mut parts = rest.splitn(3, ':');
    let line: usize = parts
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| TestCaseError::fail(format!("{msg:?} has no line")))?;
    let col: usize = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| TestCaseError::fail(format!("{msg:?} has no column")))?;
    let lines = text.split('\n').count();
    prop_assert!(
        line >= 1 && line <= lines + 1,
        "{msg:?}: line {line} of {lines}"
    );
    prop_assert!(col >= 1, "{msg:?}: column {col}");
    Ok(())
}
