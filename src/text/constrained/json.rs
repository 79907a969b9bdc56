//! An incremental validator of one JSON object over bytes (JSON mode), and the lexical pieces
//! (strings, numbers) the schema validator shares.

/// Where a JSON number is: after `-`, a leading `0`, integer digits, `.`, fraction digits,
/// `e`/`E`, the exponent's sign, exponent digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// The state after a number's first byte, if it can start one.
    pub(super) fn start(b: u8) -> Option<Num> {
        match b {
            b'-' => Some(Num::Minus),
            b'0' => Some(Num::Zero),
            b'1'..=b'9' => Some(Num::Int),
            _ => None,
        }
    }

    /// The state after `b`, if the number can go on with it.
    pub(super) fn next(self, b: u8) -> Option<Num> {
        match (self, b) {
            (Num::Minus, b'0') => Some(Num::Zero),
            (Num::Minus, b'1'..=b'9') => Some(Num::Int),
            (Num::Int, b'0'..=b'9') => Some(Num::Int),
            (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
            (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
            (Num::E, b'+' | b'-') => Some(Num::ESign),
            (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
            _ => None,
        }
    }

    /// Whether the number may end here.
    pub(super) fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }

    /// Whether this state is still an integer (no fraction or exponent).
    pub(super) fn integral(self) -> bool {
        matches!(self, Num::Minus | Num::Zero | Num::Int)
    }
}

/// One byte inside a JSON string (after the opening quote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StrByte {
    /// Part of the string.
    More,
    /// The closing quote.
    Closed,
    Invalid,
}

/// State inside a string: 0 none; 1 after `\`; 2..=5 hex digits of `\u` left + 1; from
/// [`UTF8`] on, inside a multi-byte UTF-8 character (the text must stay valid UTF-8).
pub(super) fn string_byte(state: &mut u8, b: u8) -> StrByte {
    match *state {
        0 => match b {
            b'"' => return StrByte::Closed,
            b'\\' => *state = 1,
            0..=0x1f => return StrByte::Invalid,
            0x20..=0x7f => {}
            _ => match utf8_lead(b) {
                Some(next) => *state = next,
                None => return StrByte::Invalid,
            },
        },
        1 => match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => *state = 0,
            b'u' => *state = 5,
            _ => return StrByte::Invalid,
        },
        2..=5 => {
            if !b.is_ascii_hexdigit() {
                return StrByte::Invalid;
            }
            *state = if *state == 2 { 0 } else { *state - 1 };
        }
        s => match utf8_continue(s, b) {
            Some(next) => *state = next,
            None => return StrByte::Invalid,
        },
    }
    StrByte::More
}

/// UTF-8 states: `UTF8 + n` expects n more continuation bytes (80..BF); the four states after
/// it restrict the first continuation byte as RFC 3629 requires (no overlong forms, no
/// surrogates, nothing above U+10FFFF).
const UTF8: u8 = 10;
const AFTER_E0: u8 = UTF8 + 4; // A0..BF, then 1 more
const AFTER_ED: u8 = UTF8 + 5; // 80..9F, then 1 more
const AFTER_F0: u8 = UTF8 + 6; // 90..BF, then 2 more
const AFTER_F4: u8 = UTF8 + 7; // 80..8F, then 2 more

fn utf8_lead(b: u8) -> Option<u8> {
    Some(match b {
        0xC2..=0xDF => UTF8 + 1,
        0xE0 => AFTER_E0,
        0xED => AFTER_ED,
        0xE1..=0xEC | 0xEE..=0xEF => UTF8 + 2,
        0xF0 => AFTER_F0,
        0xF1..=0xF3 => UTF8 + 3,
        0xF4 => AFTER_F4,
        _ => return None,
    })
}

fn utf8_continue(state: u8, b: u8) -> Option<u8> {
    let (range, then) = match state {
        AFTER_E0 => (0xA0..=0xBF, UTF8 + 1),
        AFTER_ED => (0x80..=0x9F, UTF8 + 1),
        AFTER_F0 => (0x90..=0xBF, UTF8 + 2),
        AFTER_F4 => (0x80..=0x8F, UTF8 + 2),
        s => (0x80..=0xBF, if s == UTF8 + 1 { 0 } else { s - 1 }),
    };
    range.contains(&b).then_some(then)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object.
    Start,
    /// Expecting a value.
    Value,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket.
    After,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// Inside a string; `esc`: 0 none, 1 after `\`, 2..=5 hex digits of `\u` left + 1.
    Str {
        key: bool,
        esc: u8,
    },
    Number(Num),
    /// Inside `true`/`false`/`null`: the bytes still expected.
    Literal(&'static [u8]),
    /// The top-level object is closed.
    End,
}

/// An incremental JSON validator over bytes: the text fed so far must be a prefix of one JSON
/// object (whitespace around it allowed).
#[derive(Debug, Clone)]
pub struct JsonValidator {
    stack: Vec<u8>,
    mode: Mode,
    ws: WsRun,
}

impl Default for JsonValidator {
    fn default() -> Self {
        JsonValidator {
            stack: Vec::new(),
            mode: Mode::Start,
            ws: WsRun::default(),
        }
    }
}

/// Structural whitespace a constrained answer may put in one place, at most: enough to
/// pretty-print a few levels deep, and a model cannot stall in it (random weights otherwise
/// pick whitespace forever).
pub(super) const MAX_WS_RUN: u8 = 20;

/// Counts consecutive structural whitespace.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct WsRun(u8);

impl WsRun {
    /// Records `b`; false when it is structural whitespace past [`MAX_WS_RUN`].
    pub(super) fn admit(&mut self, b: u8, structural: bool) -> bool {
        if structural && is_ws(b) {
            if self.0 >= MAX_WS_RUN {
                return false;
            }
            self.0 += 1;
        } else {
            self.0 = 0;
        }
        true
    }
}

pub(super) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonValidator {
    /// Whether the object is complete.
    pub fn complete(&self) -> bool {
        self.mode == Mode::End
    }

    /// Feeds bytes; false (and an unspecified state) when they cannot continue valid JSON.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    fn close_value(&mut self) {
        self.mode = if self.stack.is_empty() {
            Mode::End
        } else {
            Mode::After
        };
    }

    fn start_value(&mut self, b: u8) -> bool {
        match b {
            b'{' => {
                self.stack.push(b'{');
                self.mode = Mode::KeyOrEnd;
            }
            b'[' => {
                self.stack.push(b'[');
                self.mode = Mode::ValueOrEnd;
            }
            b'"' => self.mode = Mode::Str { key: false, esc: 0 },
            b'-' | b'0'..=b'9' => match Num::start(b) {
                Some(n) => self.mode = Mode::Number(n),
                None => return false,
            },
            b't' => self.mode = Mode::Literal(b"rue"),
            b'f' => self.mode = Mode::Literal(b"alse"),
            b'n' => self.mode = Mode::Literal(b"ull"),
            _ => return false,
        }
        true
    }

    pub(super) fn byte(&mut self, b: u8) -> bool {
        let in_string = matches!(self.mode, Mode::Str { .. });
        self.ws.admit(b, !in_string) && self.step(b)
    }

    fn step(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Start => {
                if is_ws(b) {
                    return true;
                }
                if b != b'{' {
                    return false;
                }
                self.stack.push(b'{');
                self.mode = Mode::KeyOrEnd;
                true
            }
            Mode::End => is_ws(b),
            Mode::Value => is_ws(b) || self.start_value(b),
            Mode::ValueOrEnd => {
                if is_ws(b) {
                    true
                } else if b == b']' {
                    self.stack.pop();
                    self.close_value();
                    true
                } else {
                    self.start_value(b)
                }
            }
            Mode::KeyOrEnd | Mode::Key => {
                if is_ws(b) {
                    true
                } else if b == b'"' {
                    self.mode = Mode::Str { key: true, esc: 0 };
                    true
                } else if b == b'}' && self.mode == Mode::KeyOrEnd {
                    self.stack.pop();
                    self.close_value();
                    true
                } else {
                    false
                }
            }
            Mode::Colon => {
                if is_ws(b) {
                    true
                } else if b == b':' {
                    self.mode = Mode::Value;
                    true
                } else {
                    false
                }
            }
            Mode::After => match b {
                _ if is_ws(b) => true,
                b',' => {
                    self.mode = if self.stack.last() == Some(&b'{') {
                        Mode::Key
                    } else {
                        Mode::Value
                    };
                    true
                }
                b'}' | b']' => {
                    let open = if b == b'}' { b'{' } else { b'[' };
                    if self.stack.last() != Some(&open) {
                        return false;
                    }
                    self.stack.pop();
                    self.close_value();
                    true
                }
                _ => false,
            },
            Mode::Str { key, mut esc } => match string_byte(&mut esc, b) {
                StrByte::More => {
                    self.mode = Mode::Str { key, esc };
                    true
                }
                StrByte::Closed => {
                    if key {
                        self.mode = Mode::Colon;
                    } else {
                        self.close_value();
                    }
                    true
                }
                StrByte::Invalid => false,
            },
            Mode::Literal(rest) => {
                if rest.first() != Some(&b) {
                    return false;
                }
                if rest.len() == 1 {
                    self.close_value();
                } else {
                    self.mode = Mode::Literal(&rest[1..]);
                }
                true
            }
            Mode::Number(n) => {
                let next = n.next(b);
                match next {
                    Some(n) => {
                        self.mode = Mode::Number(n);
                        true
                    }
                    None if n.can_end() => {
                        self.close_value();
                        self.step(b)
                    }
                    None => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_stay_valid_utf8() {
        for ok in ["é", "数学", "🌍", "\u{10FFFF}", "\u{D7FF}"] {
            assert!(valid_prefix(&format!("{{\"a\": \"{ok}\"}}")), "{ok:?}");
        }
        let prefix = b"{\"a\": \"";
        for bad in [
            &[0x80u8][..],       // a lone continuation byte
            &[0xC0, 0x80],       // overlong
            &[0xE0, 0x80, 0x80], // overlong
            &[0xED, 0xA0, 0x80], // a surrogate
            &[0xF4, 0x90, 0x80], // above U+10FFFF
            &[0xFF],
            &[0xC3, b'"'], // a character cut by the closing quote
        ] {
            let mut v = JsonValidator::default();
            assert!(!v.feed(&[&prefix[..], bad].concat()), "{bad:x?}");
        }
    }

    #[test]
    fn structural_whitespace_is_capped_string_content_is_not() {
        let gap = " ".repeat(MAX_WS_RUN as usize);
        assert!(valid_prefix(&format!(
            "{gap}{{{gap}\"a\"{gap}:{gap}\"{}\"",
            " ".repeat(100)
        )));
        assert!(!valid_prefix(&format!("{gap} {{")));
        assert!(!valid_prefix(&format!("{{\"a\": 1,{gap} ")));
    }

    fn valid_prefix(s: &str) -> bool {
        JsonValidator::default().feed(s.as_bytes())
    }

    #[test]
    fn accepts_json_object_prefixes() {
        let doc = r#" {"a": [1, -2.5e+3, true, null, "x\"\u00e9y"], "b": {"c": {}}, "d": []} "#;
        for i in 0..=doc.len() {
            assert!(valid_prefix(&doc[..i]), "{:?}", &doc[..i]);
        }
        let mut v = JsonValidator::default();
        assert!(v.feed(doc.trim().as_bytes()));
        assert!(v.complete());
    }

    #[test]
    fn rejects_invalid_json() {
        for bad in [
            "[1]",
            "x",
            "{a",
            "{\"a\" 1",
            "{\"a\": tru3",
            "{\"a\": 01",
            "{\"a\": 1]",
            "{} x",
            "{\"a\":\"\u{1}\"}",
            "{\"a\": -}",
            "{,}",
        ] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }
}
