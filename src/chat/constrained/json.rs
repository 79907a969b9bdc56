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

/// Escape state inside a string: 0 none, 1 after `\`, 2..=5 hex digits of `\u` left + 1.
pub(super) fn string_byte(esc: &mut u8, b: u8) -> StrByte {
    match *esc {
        0 => match b {
            b'"' => return StrByte::Closed,
            b'\\' => *esc = 1,
            0..=0x1f => return StrByte::Invalid,
            _ => {}
        },
        1 => match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => *esc = 0,
            b'u' => *esc = 5,
            _ => return StrByte::Invalid,
        },
        n => {
            if !b.is_ascii_hexdigit() {
                return StrByte::Invalid;
            }
            *esc = if n == 2 { 0 } else { n - 1 };
        }
    }
    StrByte::More
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
