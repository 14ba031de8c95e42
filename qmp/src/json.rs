//! QEMU-compatible JSON: a streaming reader with QEMU's framing, limits, error recovery and error texts, and a
//! writer that prints values byte for byte as QEMU 7.2 does.
//!
//! The reader follows the three stages of QEMU's `qobject/json-lexer.c`, `json-streamer.c` and `json-parser.c`
//! (behaviour re-derived from them and checked against recorded QEMU 7.2 sessions, not copied):
//!
//! * the lexer turns bytes into tokens; on a byte that cannot continue a token it reports
//!   `JSON parse error, stray '<token so far>'` and then skips input until a structural character
//!   (`{ } [ ] : ,`), an ASCII control character other than TAB, or a byte 0xFE/0xFF, where it resumes;
//! * the streamer collects tokens until braces and brackets balance (or one count goes negative), enforcing the
//!   size, token-count and nesting limits, and hands the collected tokens to the parser;
//! * the parser builds one value, or reports the first error as `JSON parse error, <what>`.
//!
//! Each complete top-level value or error is one [`Message`]. Values are `serde_json::Value`, whose numbers hold
//! exactly QEMU's three kinds: i64 if the integer fits, else u64 if it fits, else f64.

use serde_json::{Map, Number, Value};

/// Limits on one top-level JSON value. The defaults are QEMU's (`json-streamer.c`), so an input that QEMU accepts is
/// accepted and one it rejects is rejected with the same text. Memory held for a pending value is bounded by
/// `max_bytes` of token text plus 12 bytes of bookkeeping per token (at most ~88 MiB with the defaults); a VMM that
/// wants less per connection may lower them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of token text in one value (QEMU: 64 MiB). Also caps one token.
    pub max_bytes: usize,
    /// Tokens in one value (QEMU: 2 Mi).
    pub max_tokens: usize,
    /// Open brackets plus open braces (QEMU: 1024; the 1025th opening is an error).
    pub max_nesting: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: 64 << 20, max_tokens: 2 << 20, max_nesting: 1024 }
    }
}

/// One top-level value read from the stream, or the error QEMU would report in its place.
#[derive(Debug, PartialEq)]
pub enum Message {
    Value(Value),
    /// The `desc` of the GenericError to send (without `id`: the input had none that could be trusted).
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What the lexer does with one byte in one state.
enum Step {
    /// Append the byte to the token and move to the state.
    Take(State),
    /// Drop the byte (whitespace, or skipped while recovering) and move to the state.
    Skip(State),
    /// Append the byte; the token is complete.
    Finish(Kind),
    /// The token ended before this byte, which is looked at again from `Start`.
    Lookahead(Kind),
    /// Leave recovery; the byte is looked at again from `Start`.
    Resync,
    /// The byte cannot go here: it is appended and the token so far is reported as stray.
    Error,
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    match state {
        Start => match b {
            b'"' => Step::Take(DqString),
            b'\'' => Step::Take(SqString),
            b'0' => Step::Take(Zero),
            b'1'..=b'9' => Step::Take(Digits),
            b'-' => Step::Take(Sign),
            b'{' => Step::Finish(Kind::LCurly),
            b'}' => Step::Finish(Kind::RCurly),
            b'[' => Step::Finish(Kind::LSquare),
            b']' => Step::Finish(Kind::RSquare),
            b',' => Step::Finish(Kind::Comma),
            b':' => Step::Finish(Kind::Colon),
            b'a'..=b'z' => Step::Take(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip(Start),
            _ => Step::Error,
        },
        Recovery => match b {
            b'\t' => Step::Skip(Recovery),
            0..=0x1f | 0xfe | 0xff | b'{' | b'}' | b'[' | b']' | b':' | b',' => Step::Resync,
            _ => Step::Skip(Recovery),
        },
        DqString | SqString => {
            let quote = if state == DqString { b'"' } else { b'\'' };
            match b {
                _ if b == quote => Step::Finish(Kind::String),
                b'\\' => Step::Take(if state == DqString { DqEscape } else { SqEscape }),
                0x20..=0xfd => Step::Take(state),
                _ => Step::Error,
            }
        }
        DqEscape | SqEscape => match b {
            0x20..=0xfd => Step::Take(if state == DqEscape { DqString } else { SqString }),
            _ => Step::Error,
        },
        Zero => match b {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Take(Mantissa),
            _ => Step::Lookahead(Kind::Integer),
        },
        Sign => match b {
            b'0' => Step::Take(Zero),
            b'1'..=b'9' => Step::Take(Digits),
            _ => Step::Error,
        },
        Digits => match b {
            b'0'..=b'9' => Step::Take(Digits),
            b'e' | b'E' => Step::Take(ExpE),
            b'.' => Step::Take(Mantissa),
            _ => Step::Lookahead(Kind::Integer),
        },
        Mantissa => match b {
            b'0'..=b'9' => Step::Take(MantissaDigits),
            _ => Step::Error,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Step::Take(MantissaDigits),
            b'e' | b'E' => Step::Take(ExpE),
            _ => Step::Lookahead(Kind::Float),
        },
        ExpE => match b {
            b'+' | b'-' => Step::Take(ExpSign),
            b'0'..=b'9' => Step::Take(ExpDigits),
            _ => Step::Error,
        },
        ExpSign => match b {
            b'0'..=b'9' => Step::Take(ExpDigits),
            _ => Step::Error,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Step::Take(ExpDigits),
            _ => Step::Lookahead(Kind::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Step::Take(Keyword),
            _ => Step::Lookahead(Kind::Keyword),
        },
    }
}

/// The streaming reader: feed it bytes in any pieces, get complete messages back.
#[derive(Debug)]
pub struct JsonStream {
    limits: Limits,
    state: State,
    /// Text of the token being lexed.
    token: Vec<u8>,
    /// Text of the completed tokens of the pending value, back to back; `tokens` index into it.
    text: Vec<u8>,
    tokens: Vec<(Kind, u32, u32)>,
    braces: i64,
    brackets: i64,
}

impl JsonStream {
    pub fn new(limits: Limits) -> Self {
        JsonStream {
            limits,
            state: State::Start,
            token: Vec::new(),
            text: Vec::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
        }
    }

    /// Feeds bytes; every message completed by them is appended to `out`, in input order.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Message>) {
        for &b in input {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Message>) {
        loop {
            match step(self.state, b) {
                Step::Take(s) => {
                    self.token.push(b);
                    self.state = s;
                }
                Step::Skip(s) => self.state = s,
                Step::Finish(kind) => {
                    self.token.push(b);
                    self.state = State::Start;
                    self.token_done(kind, out);
                }
                Step::Lookahead(kind) => {
                    self.state = State::Start;
                    self.token_done(kind, out);
                    continue;
                }
                Step::Resync => {
                    self.state = State::Start;
                    continue;
                }
                Step::Error => {
                    self.token.push(b);
                    // QEMU formats the token with %s: it ends at the first NUL byte.
                    let shown = self.token.split(|&c| c == 0).next().unwrap_or(&[]);
                    let msg = format!("JSON parse error, stray '{}'", decode_lossy(shown));
                    self.token.clear();
                    self.state = State::Recovery;
                    self.emit(Message::Error(msg), out);
                }
            }
            break;
        }
        // One token may not grow without bound either (QEMU checks after every byte and restarts lexing).
        if self.token.len() > self.limits.max_bytes {
            self.token.clear();
            self.state = State::Start;
            self.emit(Message::Error("JSON token size limit exceeded".into()), out);
        }
    }

    fn token_done(&mut self, kind: Kind, out: &mut Vec<Message>) {
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let len = self.token.len();
        if self.text.len() + len + 1 > self.limits.max_bytes {
            self.token.clear();
            return self.emit(Message::Error("JSON token size limit exceeded".into()), out);
        }
        if self.tokens.len() + 1 > self.limits.max_tokens {
            self.token.clear();
            return self.emit(Message::Error("JSON token count limit exceeded".into()), out);
        }
        if self.braces + self.brackets > self.limits.max_nesting {
            self.token.clear();
            return self.emit(Message::Error("JSON nesting depth limit exceeded".into()), out);
        }
        let start = self.text.len() as u32;
        self.text.extend_from_slice(&self.token);
        self.token.clear();
        self.tokens.push((kind, start, len as u32));
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let msg = match (Parser { s: self, pos: 0 }).parse_value() {
            Ok(v) => Message::Value(v),
            Err(e) => Message::Error(format!("JSON parse error, {e}")),
        };
        self.emit(msg, out);
    }

    /// Hands a message out and forgets the pending value, as QEMU's streamer does after every message.
    fn emit(&mut self, msg: Message, out: &mut Vec<Message>) {
        self.braces = 0;
        self.brackets = 0;
        self.tokens.clear();
        self.text.clear();
        // Do not keep a huge buffer alive after a huge message.
        if self.text.capacity() > 1 << 20 {
            self.text = Vec::new();
            self.tokens = Vec::new();
        }
        out.push(msg);
    }
}

/// Recursive descent over the collected tokens. The first error ends the parse, which gives the same message as
/// QEMU's parser (it records only the first error and every caller fails after it).
struct Parser<'a> {
    s: &'a JsonStream,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Kind> {
        self.s.tokens.get(self.pos).map(|t| t.0)
    }

    fn pop(&mut self) -> Option<(Kind, &[u8])> {
        let &(kind, start, len) = self.s.tokens.get(self.pos)?;
        self.pos += 1;
        Some((kind, &self.s.text[start as usize..(start + len) as usize]))
    }

    fn parse_value(&mut self) -> Result<Value, String> {
        let Some(kind) = self.peek() else { return Err("premature EOI".into()) };
        match kind {
            Kind::LCurly => self.parse_object(),
            Kind::LSquare => self.parse_array(),
            Kind::String => {
                let (_, text) = self.pop().expect("peeked");
                parse_string(text).map(Value::String)
            }
            Kind::Integer | Kind::Float => {
                let (_, text) = self.pop().expect("peeked");
                Ok(Value::Number(parse_number(kind, text)))
            }
            Kind::Keyword => {
                let (_, text) = self.pop().expect("peeked");
                match text {
                    b"true" => Ok(Value::Bool(true)),
                    b"false" => Ok(Value::Bool(false)),
                    b"null" => Ok(Value::Null),
                    _ => Err(format!("invalid keyword '{}'", decode_lossy(text))),
                }
            }
            _ => Err("expecting value".into()),
        }
    }

    fn parse_object(&mut self) -> Result<Value, String> {
        self.pop();
        let mut map = Map::new();
        match self.peek() {
            None => return Err("premature EOI".into()),
            Some(Kind::RCurly) => {
                self.pop();
                return Ok(Value::Object(map));
            }
            Some(_) => {}
        }
        loop {
            self.parse_pair(&mut map)?;
            match self.pop() {
                None => return Err("premature EOI".into()),
                Some((Kind::RCurly, _)) => return Ok(Value::Object(map)),
                Some((Kind::Comma, _)) => {}
                Some(_) => return Err("expected separator in dict".into()),
            }
        }
    }

    fn parse_pair(&mut self, map: &mut Map<String, Value>) -> Result<(), String> {
        if self.peek().is_none() {
            return Err("premature EOI".into());
        }
        let Value::String(key) = self.parse_value()? else { return Err("key is not a string in object".into()) };
        match self.pop() {
            None => return Err("premature EOI".into()),
            Some((Kind::Colon, _)) => {}
            Some(_) => return Err("missing : in object pair".into()),
        }
        let value = self.parse_value()?;
        if map.contains_key(&key) {
            return Err("duplicate key".into());
        }
        map.insert(key, value);
        Ok(())
    }

    fn parse_array(&mut self) -> Result<Value, String> {
        self.pop();
        let mut list = Vec::new();
        match self.peek() {
            None => return Err("premature EOI".into()),
            Some(Kind::RSquare) => {
                self.pop();
                return Ok(Value::Array(list));
            }
            Some(_) => {}
        }
        loop {
            list.push(self.parse_value()?);
            match self.pop() {
                None => return Err("premature EOI".into()),
                Some((Kind::RSquare, _)) => return Ok(Value::Array(list)),
                Some((Kind::Comma, _)) => {}
                Some(_) => return Err("expected separator in list".into()),
            }
        }
    }
}

/// QEMU's number rule: an integer that fits i64 is i64, else one that fits u64 (and has no sign) is u64, else
/// everything is a double (strtod; Rust's parser rounds the same way).
fn parse_number(kind: Kind, text: &[u8]) -> Number {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' into number tokens.
    let s = std::str::from_utf8(text).unwrap_or("0");
    if kind == Kind::Integer {
        if let Ok(i) = s.parse::<i64>() {
            return Number::from(i);
        }
        if let Ok(u) = s.parse::<u64>() {
            return Number::from(u);
        }
    }
    let f: f64 = s.parse().unwrap_or(0.0);
    // QEMU keeps an overflowing literal as inf and then prints `inf`, which is not JSON. We keep the largest finite
    // double instead (a documented difference: serde_json numbers cannot hold inf, and invalid output helps no one).
    let f = if f.is_finite() { f } else { f64::MAX.copysign(f) };
    Number::from_f64(f).unwrap_or_else(|| Number::from(0))
}

/// QEMU's `is_valid_codepoint`: no surrogates, no noncharacters, nothing past U+10FFFF.
fn is_valid_codepoint(cp: u32) -> bool {
    cp <= 0x10ffff && (cp & 0xfffe) != 0xfffe && !(0xfdd0..=0xfdef).contains(&cp) && !(0xd800..=0xdfff).contains(&cp)
}

/// Decodes one modified-UTF-8 sequence as QEMU's `mod_utf8_codepoint` (with n = 6) does: returns the code point,
/// or None for an invalid sequence, and how many bytes were used. `\xC0\x80` is U+0000; other overlong forms,
/// surrogates and noncharacters are invalid.
fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    let Some(&first) = s.first() else { return (None, 0) };
    if first == 0 {
        return (None, 0);
    }
    if first < 0x80 {
        return (Some(first as u32), 1);
    }
    if first >= 0xfe || first & 0x40 == 0 {
        return (None, 1);
    }
    let mut len = 0;
    let mut mask = 0x80u32;
    while first as u32 & mask != 0 {
        len += 1;
        mask >>= 1;
    }
    let mut cp = first as u32 & (mask - 1);
    let mut used = 1;
    for i in 1..len {
        let b = if i < 6 { s.get(i).copied().unwrap_or(0) } else { 0 };
        if b & 0xc0 != 0x80 {
            return (None, used);
        }
        used += 1;
        cp = (cp << 6) | (b as u32 & 0x3f);
    }
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    if !is_valid_codepoint(cp) || (cp < MIN[len - 2] && !(cp == 0 && len == 2)) {
        return (None, used);
    }
    (Some(cp), used)
}

/// Turns bytes into text the way QEMU's output does when it prints them: invalid sequences become U+FFFD.
pub(crate) fn decode_lossy(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let (cp, used) = mod_utf8_codepoint(&bytes[i..]);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{fffd}'));
        i += used.max(1);
    }
    out
}

fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 || !s[..4].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(&s[..4]).ok()?, 16).ok()
}

/// Decodes a string token (with its quotes) as QEMU's `parse_string`.
fn parse_string(tok: &[u8]) -> Result<String, String> {
    let quote = tok[0];
    let body = &tok[1..];
    let mut out = String::new();
    let mut i = 0;
    while body[i] != quote {
        if body[i] == b'\\' {
            let beg = i;
            i += 1;
            let c = body[i];
            i += 1;
            match c {
                b'"' | b'\'' | b'\\' | b'/' => out.push(c as char),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i..]);
                    i += 4;
                    if let Some(lead @ 0xd800..=0xdbff) = cp {
                        if body.get(i) == Some(&b'\\') && body.get(i + 1) == Some(&b'u') {
                            cp = match body.get(i + 2..).and_then(hex4) {
                                Some(t @ 0xdc00..=0xdfff) => {
                                    i += 6;
                                    Some(0x10000 + ((lead & 0x3ff) << 10) + (t & 0x3ff))
                                }
                                _ => None,
                            };
                        }
                    }
                    match cp.filter(|&c| is_valid_codepoint(c)).and_then(char::from_u32) {
                        Some(ch) => out.push(ch),
                        None => {
                            // QEMU prints the 6 (or 12) bytes it looked at, as a C string: the token ends with the
                            // closing quote, so a short escape shows the quote and stops there.
                            let end = i.min(body.len());
                            return Err(format!("{} is not a valid Unicode character", decode_lossy(&body[beg..end])));
                        }
                    }
                }
                _ => return Err("invalid escape sequence in string".into()),
            }
            continue;
        }
        let (cp, used) = mod_utf8_codepoint(&body[i..]);
        match cp.and_then(char::from_u32) {
            Some(ch) => out.push(ch),
            None => return Err("invalid UTF-8 sequence in string".into()),
        }
        i += used;
    }
    Ok(out)
}

/// The bucket QEMU's QDict puts a key in (`tdb_hash(key) % 512`).
fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut v = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add((c as u32) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// The order in which QEMU iterates (and so prints and checks) the keys of an object: by hash bucket, and within
/// a bucket the most recently inserted first. `map` must be in insertion order (serde_json's `preserve_order`).
pub(crate) fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(u32, usize, &String, &Value)> =
        map.iter().enumerate().map(|(i, (k, v))| (qdict_bucket(k), i, k, v)).collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

/// Prints a value as QEMU's compact `qobject_to_json` does: `", "` and `": "` separators, keys in QDict order,
/// every character outside 0x20..0x7E as `\uXXXX` with upper-case hex (surrogate pairs beyond the BMP), doubles
/// as `%.17g`.
pub fn to_qemu_json(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&format_g17(n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, e);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, e)) in qdict_order(m).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_value(out, e);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(ch),
            _ => {
                let cp = ch as u32;
                // QEMU re-decodes its stored text on output; code points it considers invalid print as U+FFFD.
                let cp = if is_valid_codepoint(cp) { cp } else { 0xfffd };
                if cp > 0xffff {
                    let c = cp - 0x10000;
                    let _ = write!(out, "\\u{:04X}\\u{:04X}", 0xd800 + (c >> 10), 0xdc00 + (c & 0x3ff));
                } else {
                    let _ = write!(out, "\\u{cp:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// C's `%.17g`.
fn format_g17(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let sci = format!("{x:.16e}");
    let (mant, exp) = sci.split_once('e').expect("scientific format has an exponent");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
    let sign = if neg { "-" } else { "" };
    if !(-4..17).contains(&exp) {
        let frac = digits[1..].trim_end_matches('0');
        let dot = if frac.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{}{dot}{frac}e{esign}{:02}", &digits[..1], exp.abs());
    }
    let (int, frac) = if exp >= 0 {
        let e = exp as usize + 1;
        (digits[..e].to_string(), digits[e..].to_string())
    } else {
        ("0".to_string(), "0".repeat((-exp - 1) as usize) + &digits)
    };
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(input: &[u8]) -> Vec<Message> {
        let mut s = JsonStream::new(Limits::default());
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn err(s: &str) -> Message {
        Message::Error(s.to_string())
    }

    #[test]
    fn objects_back_to_back_split_and_unterminated() {
        let msgs = read(b"{\"a\":1}{'b' : \"x\"}  \r\n\t[1, 2.5] ");
        assert_eq!(
            msgs,
            vec![Message::Value(json!({"a":1})), Message::Value(json!({"b":"x"})), Message::Value(json!([1, 2.5]))]
        );
        // Every split point of the same input gives the same messages.
        let input = b"{\"execute\":\"x\",\"id\":[1,{\"k\":'v\\''}]}{}";
        let whole = read(input);
        for cut in 0..input.len() {
            let mut s = JsonStream::new(Limits::default());
            let mut out = Vec::new();
            s.feed(&input[..cut], &mut out);
            s.feed(&input[cut..], &mut out);
            assert_eq!(out, whole, "cut at {cut}");
        }
        // A top-level scalar needs the byte after it to end; an object does not.
        assert_eq!(read(b"42"), vec![]);
        assert_eq!(read(b"{}"), vec![Message::Value(json!({}))]);
    }

    #[test]
    fn lexical_errors_recover_at_structural_characters() {
        assert_eq!(read(b"@"), vec![err("JSON parse error, stray '@'")]);
        // After the error, ` "id"` is skipped; `:` resyncs (and is then an error of its own), `1` and `}` follow.
        assert_eq!(
            read(b"{\"x\":1, @ \"id\":1}"),
            vec![
                err("JSON parse error, stray '@'"),
                err("JSON parse error, expecting value"),
                Message::Value(json!(1)),
                err("JSON parse error, expecting value"),
            ]
        );
        assert_eq!(read(b"\xff"), vec![err("JSON parse error, stray '\u{fffd}'")]);
        assert_eq!(read(b"01 -1 {}"), vec![err("JSON parse error, stray '01'"), Message::Value(json!({}))]);
        assert_eq!(
            read(b"\"a\x01b\"}"),
            vec![err("JSON parse error, stray '\"a\x01'"), err("JSON parse error, expecting value")]
        );
        assert_eq!(read(b"\0"), vec![err("JSON parse error, stray ''")]);
        // A newline ends recovery: a client can always resynchronise with one.
        assert_eq!(read(b"@ garbage 1 2\n{}"), vec![err("JSON parse error, stray '@'"), Message::Value(json!({}))]);
    }

    #[test]
    fn parser_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"}", "expecting value"),
            (b"{\"a\":1,}", "expecting value"),
            (b"{,}", "expecting value"),
            (b"{\"a\" 1}", "missing : in object pair"),
            (b"[1 2]", "expected separator in list"),
            (b"{\"a\":1 \"b\":2}", "expected separator in dict"),
            (b"{\"a\":1,\"a\":2}", "duplicate key"),
            (b"{1:2}", "key is not a string in object"),
            (b"{\"a\":tru}", "invalid keyword 'tru'"),
            (b"[\"\\x\"]", "invalid escape sequence in string"),
            (b"[\"\\u12\"]", "\\u12\" is not a valid Unicode character"),
            (b"[\"\\uD800\"]", "\\uD800 is not a valid Unicode character"),
            (b"[\"\\uD800\\u0041\"]", "\\uD800 is not a valid Unicode character"),
            (b"[\"\\uFFFF\"]", "\\uFFFF is not a valid Unicode character"),
            (b"[\"\xc3\x28\"]", "invalid UTF-8 sequence in string"),
            (b"[\"\xed\xa0\x80\"]", "invalid UTF-8 sequence in string"),
            (b"[\"\xe0\x80\x80\"]", "invalid UTF-8 sequence in string"),
            (b"{]", "expecting value"),
        ];
        for (input, want) in cases {
            assert_eq!(
                read(input),
                vec![err(&format!("JSON parse error, {want}"))],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(read(b"[\"\\uD83D\\uDE00\xc0\x80\\u0000\"]"), vec![Message::Value(json!(["\u{1F600}\0\0"]))]);
    }

    #[test]
    fn numbers_follow_qemu_kinds() {
        let v =
            read(b"[9223372036854775807, 9223372036854775808, 18446744073709551616, -9223372036854775809, 1e3, -0]");
        let Message::Value(Value::Array(a)) = &v[0] else { panic!() };
        assert!(a[0].is_i64() && a[1].is_u64() && a[2].is_f64() && a[3].is_f64() && a[4].is_f64() && a[5].is_i64());
        assert_eq!(
            to_qemu_json(&v_of(&v)),
            "[9223372036854775807, 9223372036854775808, 1.8446744073709552e+19, -9.2233720368547758e+18, 1000, 0]"
        );
    }

    fn v_of(m: &[Message]) -> Value {
        match &m[0] {
            Message::Value(v) => v.clone(),
            Message::Error(e) => panic!("{e}"),
        }
    }

    #[test]
    fn g17() {
        for (x, s) in [
            (0.1, "0.10000000000000001"),
            (1.5, "1.5"),
            (1e-5, "1.0000000000000001e-05"),
            (123456.0, "123456"),
            (1e17, "1e+17"),
            (-2.5e-300, "-2.5e-300"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(format_g17(x), s);
        }
    }

    #[test]
    fn output_shape() {
        let v = json!({"return": {"running": true, "singlestep": false, "status": "running"}, "id": "x\u{fc}\u{20ac}\u{1F600}\0\u{7f}\t\"/"});
        assert_eq!(
            to_qemu_json(&v),
            r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": "x\u00FC\u20AC\uD83D\uDE00\u0000\u007F\t\"/"}"#
        );
        assert_eq!(
            to_qemu_json(&json!({"id": 1, "error": {"class": "C", "desc": "d"}})),
            r#"{"id": 1, "error": {"class": "C", "desc": "d"}}"#
        );
        assert_eq!(
            to_qemu_json(&json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#
        );
        assert_eq!(
            to_qemu_json(&json!({"major": 7, "minor": 2, "micro": 0})),
            r#"{"micro": 0, "minor": 2, "major": 7}"#
        );
        assert_eq!(to_qemu_json(&json!([[], {}])), "[[], {}]");
    }

    #[test]
    fn limits() {
        let lim = Limits { max_bytes: 100, max_tokens: 10, max_nesting: 3 };
        let run = |input: &[u8]| {
            let mut s = JsonStream::new(lim);
            let mut out = Vec::new();
            s.feed(input, &mut out);
            // A newline ends a string the size limit cut into, as in QEMU.
            s.feed(b"\n{}", &mut out);
            out
        };
        assert_eq!(run(b"[[[]]]")[0], Message::Value(json!([[[]]])));
        let deep = run(b"[[[[]]]]");
        assert_eq!(deep[0], err("JSON nesting depth limit exceeded"));
        assert_eq!(deep.len(), 1 + 4 + 1, "each stray ] is its own error, then the stream works");
        assert_eq!(run(b"[1,2,3,4,5,6]")[0], err("JSON token count limit exceeded"));
        let big = [b"[\"".as_slice(), &[b'a'; 200], b"\"]"].concat();
        assert_eq!(run(&big)[0], err("JSON token size limit exceeded"));
        assert_eq!(*run(&big).last().unwrap(), Message::Value(json!({})));
    }
}
