//! Postgres output text to [`Value`]s.
//!
//! Both ways rows reach us deliver each column as the type's *output text*:
//! pgoutput in text mode (a [`super::pgoutput::TupleValue::Text`]) and the
//! initial snapshot (`COPY ... TO STDOUT`, text format, split by
//! [`split_copy_line`]). So one parser, [`parse_text`], serves both, and a row
//! reads the same whether it came from the snapshot or from the stream.
//!
//! The parser relies on the session settings the source connects with:
//! `TimeZone=UTC`, `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` (and the default `bytea_output=hex`, though the
//! `escape` form is read too). Under them every value has exactly one
//! spelling, so the parser is strict: text it does not recognise is an error
//! that names the type and the text, not a guess.
//!
//! Temporal values become integers in Avro's units (see [`Value`]);
//! `infinity` and `-infinity` become the largest and smallest integer of
//! the type (`i64::MAX`/`i64::MIN` microseconds, `i32::MAX`/`i32::MIN`
//! days), as Debezium publishes them, so such rows are published, not
//! refused. Composite values, `hstore` and PostGIS geometries are read by
//! [`super::composite`].

use std::borrow::Cow;

use chrono::{Datelike, NaiveDate};

use crate::event::{ColumnType, Value};

/// Longest piece of an offending value quoted in an error, in characters.
const MAX_EXCERPT_CHARS: usize = 60;
/// PostgreSQL's `MAXDIM`: arrays have at most 6 dimensions.
const MAX_ARRAY_DIMS: usize = 6;
const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// `NaiveDate::num_days_from_ce` of 1970-01-01.
const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// Why a value's text could not be turned into a [`Value`].
///
/// All of these are definite: the same text will fail the same way again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The text is not a valid value of the column's type.
    #[error("invalid {ty} value '{text}': {reason}")]
    Invalid {
        /// The column type, in Postgres terms (`smallint`, `timestamptz[]`).
        ty: String,
        /// The offending text, cut to about 60 characters.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A line of `COPY` text output could not be split into fields.
    #[error("malformed COPY text line: field {field} at byte {offset}: {reason}")]
    CopyLine {
        /// The field, counting from 1.
        field: usize,
        /// Byte offset of the field's start in the line.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl ValueError {
    /// The message without the offending value, for logs (row values
    /// never go to logs).
    pub fn redacted(&self) -> String {
        match self {
            ValueError::Invalid { ty, text, reason } => {
                format!(
                    "invalid {ty} value ({} characters): {reason}",
                    text.chars().count()
                )
            }
            other => other.to_string(),
        }
    }

    fn invalid(ty: &ColumnType, text: &str, reason: impl Into<String>) -> Self {
        ValueError::Invalid {
            ty: type_name(ty),
            text: excerpt(text),
            reason: reason.into(),
        }
    }
}

/// What went wrong inside a parser; turned into a [`ValueError`] by the caller,
/// who knows the type and the whole text.
type Reason = Cow<'static, str>;

/// Parses the output text of a value of type `ty`.
///
/// SQL NULL never reaches this function: pgoutput and `COPY` mark it
/// separately. Inside arrays, an unquoted `NULL` becomes [`Value::Null`].
///
/// # Errors
///
/// [`ValueError::Invalid`] when `text` is not a value of `ty` as Postgres
/// prints it (out-of-range integers, impossible dates, malformed arrays, a
/// label that is not in the enum, an array with the wrong number of
/// dimensions, ...).
pub fn parse_text(ty: &ColumnType, text: &str) -> Result<Value, ValueError> {
    let parsed: Result<Value, Reason> = match ty {
        ColumnType::Bool => match text {
            "t" => Ok(Value::Bool(true)),
            "f" => Ok(Value::Bool(false)),
            _ => Err("expected 't' or 'f'".into()),
        },
        ColumnType::Int16 => parse_int(text, i16::MIN.into(), i16::MAX.into()),
        ColumnType::Int32 => parse_int(text, i32::MIN.into(), i32::MAX.into()),
        ColumnType::Int64 => parse_int(text, i64::MIN, i64::MAX),
        ColumnType::Float32 => parse_float(text, true),
        ColumnType::Float64 => parse_float(text, false),
        ColumnType::Numeric(_) => check_numeric(text).map(|()| Value::Numeric(text.to_owned())),
        // Unsupported columns must be dropped by the mapping; until then they
        // travel as text, like their database prints them.
        ColumnType::Text
        | ColumnType::TextLike
        | ColumnType::ObjectId
        | ColumnType::Unsupported(_) => Ok(Value::Text(text.to_owned())),
        ColumnType::Record(fields) => super::composite::parse_composite(fields, text),
        ColumnType::Hstore => super::composite::hstore_json(text).map(Value::Json),
        ColumnType::Geometry => super::composite::ewkb(text).map(Value::Bytes),
        ColumnType::Json => Ok(Value::Json(text.to_owned())),
        ColumnType::Bytes => parse_bytea(text).map(Value::Bytes),
        ColumnType::LocalTimestamp | ColumnType::Timestamp | ColumnType::Date
            if is_infinity(text) =>
        {
            let positive = text == "infinity";
            Ok(match ty {
                ColumnType::Date => Value::Date(if positive { i32::MAX } else { i32::MIN }),
                ColumnType::Timestamp => {
                    Value::TimestampMicros(if positive { i64::MAX } else { i64::MIN })
                }
                _ => Value::LocalTimestampMicros(if positive { i64::MAX } else { i64::MIN }),
            })
        }
        ColumnType::LocalTimestamp => parse_timestamp(text, false).map(Value::LocalTimestampMicros),
        ColumnType::Timestamp => parse_timestamp(text, true).map(Value::TimestampMicros),
        ColumnType::Date => parse_date(text).map(Value::Date),
        ColumnType::Time => parse_time_of_day(text, true).map(Value::TimeMicros),
        ColumnType::Uuid => parse_uuid(text).map(Value::Uuid),
        ColumnType::Enum(labels) => {
            if labels.iter().any(|l| l == text) {
                Ok(Value::Text(text.to_owned()))
            } else {
                Err(not_a_label(labels).into())
            }
        }
        ColumnType::Array(_) => {
            let (leaf, dims) = array_leaf(ty);
            ArrayParser::new(leaf, text)
                .parse()
                .and_then(|v| check_dims(v, dims))
        }
    };
    parsed.map_err(|reason| ValueError::invalid(ty, text, reason))
}

/// The element type below every array level, and the number of levels.
fn array_leaf(ty: &ColumnType) -> (&ColumnType, usize) {
    let mut t = ty;
    let mut dims = 0;
    while let ColumnType::Array(inner) = t {
        t = inner;
        dims += 1;
    }
    (t, dims)
}

/// A parsed array must have the column's number of dimensions (from
/// `pg_attribute.attndims`; PostgreSQL does not enforce it), since the
/// published Avro type nests that many arrays. An empty array fits any.
fn check_dims(v: Value, dims: usize) -> Result<Value, Reason> {
    let mut depth = 0;
    let mut cur = &v;
    while let Value::Array(items) = cur {
        depth += 1;
        match items.iter().find(|i| !matches!(i, Value::Null)) {
            Some(first) => cur = first,
            None => return Ok(v),
        }
    }
    if depth == dims {
        Ok(v)
    } else {
        Err(format!(
            "has {depth} dimension(s), but the column is declared with {dims}; publish it as text (`type: string`), or declare the column with {depth} (`{}[]`)",
            "[]".repeat(depth.saturating_sub(1))
        )
        .into())
    }
}

/// Like [`parse_text`], for text that arrives as bytes (a pgoutput
/// [`super::pgoutput::TupleValue::Text`]).
///
/// # Errors
///
/// [`ValueError::Invalid`] when the bytes are not UTF-8, else as [`parse_text`].
pub fn parse_text_bytes(ty: &ColumnType, bytes: &[u8]) -> Result<Value, ValueError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_text(ty, text),
        Err(e) => Err(ValueError::invalid(
            ty,
            &String::from_utf8_lossy(bytes),
            format!("not valid UTF-8 ({e})"),
        )),
    }
}

/// Splits one line of `COPY ... TO STDOUT` text format (no trailing newline)
/// into fields; `None` for `\N`.
///
/// Fields are separated by TAB. Backslash escapes are undone: `\b \f \n \r
/// \t \v \\`, `\NNN` (one to three octal digits), `\xHH` (one or two hex
/// digits), and any other `\c` stands for `c`. A field that is exactly `\N`
/// is SQL NULL. An empty line is one empty field. The end-of-data marker
/// `\.` is not expected: the protocol's `CopyDone` ends the data instead.
///
/// # Errors
///
/// [`ValueError::CopyLine`] when the line ends in a lone backslash or a
/// field is not valid UTF-8 once unescaped.
pub fn split_copy_line(line: &[u8]) -> Result<Vec<Option<String>>, ValueError> {
    let mut fields = Vec::new();
    let mut current = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    loop {
        let rest = line.get(pos..).unwrap_or_default();
        let (byte, used) = match rest {
            [] | [b'\t', ..] => {
                let field = fields.len() + 1;
                let raw = line.get(start..pos).unwrap_or_default();
                let value = if raw == b"\\N" {
                    None
                } else {
                    let text = String::from_utf8(std::mem::take(&mut current)).map_err(|e| {
                        ValueError::CopyLine {
                            field,
                            offset: start,
                            reason: format!("not valid UTF-8 ({})", e.utf8_error()),
                        }
                    })?;
                    Some(text)
                };
                current.clear();
                fields.push(value);
                if rest.is_empty() {
                    return Ok(fields);
                }
                pos += 1;
                start = pos;
                continue;
            }
            [b'\\'] => {
                return Err(ValueError::CopyLine {
                    field: fields.len() + 1,
                    offset: start,
                    reason: format!("line ends in a lone backslash at byte {pos}"),
                })
            }
            [b'\\', c, tail @ ..] => match c {
                b'b' => (0x08, 2),
                b'f' => (0x0c, 2),
                b'n' => (b'\n', 2),
                b'r' => (b'\r', 2),
                b't' => (b'\t', 2),
                b'v' => (0x0b, 2),
                b'0'..=b'7' => {
                    let digits = 1 + tail
                        .iter()
                        .take(2)
                        .take_while(|b| matches!(b, b'0'..=b'7'))
                        .count();
                    let value = rest
                        .iter()
                        .skip(1)
                        .take(digits)
                        .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    // Like Postgres, keep the low 8 bits of `\777`.
                    (value.to_le_bytes()[0], 1 + digits)
                }
                b'x' => {
                    let digits: Vec<u8> =
                        tail.iter().take(2).map_while(|&b| hex_value(b)).collect();
                    if digits.is_empty() {
                        (b'x', 2)
                    } else {
                        let value = digits.iter().fold(0u8, |acc, d| (acc << 4) | d);
                        (value, 2 + digits.len())
                    }
                }
                other => (*other, 2),
            },
            [b, ..] => (*b, 1),
        };
        current.push(byte);
        pos += used;
    }
}

/// The name of a column type for messages, in Postgres terms.
fn type_name(ty: &ColumnType) -> String {
    let name = match ty {
        ColumnType::Bool => "boolean",
        ColumnType::Int16 => "smallint",
        ColumnType::Int32 => "integer",
        ColumnType::Int64 => "bigint",
        ColumnType::Float32 => "real",
        ColumnType::Float64 => "double precision",
        ColumnType::Numeric(None) => "numeric",
        ColumnType::Numeric(Some((p, s))) => return format!("numeric({p},{s})"),
        ColumnType::Text => "text",
        ColumnType::Bytes => "bytea",
        ColumnType::LocalTimestamp => "timestamp",
        ColumnType::Timestamp => "timestamptz",
        ColumnType::Date => "date",
        ColumnType::Time => "time",
        ColumnType::Uuid => "uuid",
        ColumnType::Json => "json",
        ColumnType::Enum(_) => "enum",
        ColumnType::TextLike => "text-like",
        ColumnType::Array(elem) => return format!("{}[]", type_name(elem)),
        ColumnType::ObjectId => "objectId",
        ColumnType::Record(_) => "composite",
        ColumnType::Hstore => "hstore",
        ColumnType::Geometry => "geometry",
        ColumnType::Unsupported(name) => return name.clone(),
    };
    name.to_owned()
}

/// At most [`MAX_EXCERPT_CHARS`] characters of `text`, with `…` if cut.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(MAX_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", text.get(..cut).unwrap_or(text)),
        None => text.to_owned(),
    }
}

fn not_a_label(labels: &[String]) -> String {
    let list = labels.join(", ");
    if list.chars().count() <= MAX_EXCERPT_CHARS * 2 {
        format!("not one of the enum's labels ({list})")
    } else {
        format!("not one of the enum's {} labels", labels.len())
    }
}

fn parse_int(text: &str, min: i64, max: i64) -> Result<Value, Reason> {
    use std::num::IntErrorKind;
    let n: i64 = text
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => {
                Reason::from(format!("out of range ({min}..={max})"))
            }
            _ => Reason::from("not an integer"),
        })?;
    if n < min || n > max {
        return Err(format!("out of range ({min}..={max})").into());
    }
    Ok(Value::Int(n))
}

/// `real` is parsed as `f32` and widened, so the result is exactly the stored
/// value (the shortest text `1.1` widens to `1.100000023841858`).
fn parse_float(text: &str, single: bool) -> Result<Value, Reason> {
    let v = match text {
        "NaN" => f64::NAN,
        "Infinity" => f64::INFINITY,
        "-Infinity" => f64::NEG_INFINITY,
        _ => {
            // Rust also reads `inf` and `nan`; Postgres never prints those.
            let plain = !text.is_empty()
                && text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
            let parsed = if !plain {
                None
            } else if single {
                text.parse::<f32>().ok().map(f64::from)
            } else {
                text.parse::<f64>().ok()
            };
            let v = parsed.ok_or("not a floating-point number")?;
            if !v.is_finite() {
                return Err("out of range".into());
            }
            v
        }
    };
    Ok(Value::Float(v))
}

/// Postgres prints `numeric` as `-?digits(.digits)?`, `NaN`, or (since 14)
/// `Infinity`/`-Infinity`; never with an exponent.
fn check_numeric(text: &str) -> Result<(), Reason> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(());
    }
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match unsigned.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (unsigned, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if all_digits(int) && frac.is_none_or(all_digits) {
        Ok(())
    } else {
        Err("not a number (expected digits with an optional '-' and '.', or NaN)".into())
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `bytea` in hex (`\x0aff`) or escape (`ab\\\001`) output format.
fn parse_bytea(text: &str) -> Result<Vec<u8>, Reason> {
    if let Some(hex) = text.strip_prefix("\\x") {
        let pairs = hex.as_bytes().chunks(2);
        return pairs
            .map(|pair| match pair {
                [hi, lo] => Some((hex_value(*hi)? << 4) | hex_value(*lo)?),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| "expected an even number of hex digits after \\x".into());
    }
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    loop {
        rest = match rest {
            [] => return Ok(out),
            [b'\\', b'\\', tail @ ..] => {
                out.push(b'\\');
                tail
            }
            [b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', tail @ ..] => {
                out.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
                tail
            }
            [b'\\', ..] => {
                return Err("invalid escape (expected \\\\ or \\ and three octal digits)".into())
            }
            [b, tail @ ..] => {
                out.push(*b);
                tail
            }
        };
    }
}

fn is_infinity(text: &str) -> bool {
    matches!(text, "infinity" | "-infinity")
}

/// Splits off the ` BC` era suffix.
fn strip_era(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (text, false),
    }
}

/// `s` as a number, if it is `min..=max` ASCII digits.
fn digits(s: &str, min: usize, max: usize) -> Option<u32> {
    if (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// `YYYY-MM-DD` (four or more year digits); `bc` for a ` BC` suffix.
fn parse_ymd(s: &str, bc: bool) -> Result<NaiveDate, Reason> {
    let mut parts = s.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected YYYY-MM-DD".into());
    };
    let (Some(year), Some(month), Some(day)) = (digits(y, 4, 7), digits(m, 2, 2), digits(d, 2, 2))
    else {
        return Err("expected YYYY-MM-DD".into());
    };
    let Ok(year) = i32::try_from(year) else {
        return Err("year out of range".into());
    };
    if year == 0 {
        return Err("there is no year 0".into());
    }
    // 1 BC is year 0 in the proleptic Gregorian calendar chrono uses.
    let year = if bc { 1 - year } else { year };
    NaiveDate::from_ymd_opt(year, month, day).ok_or_else(|| "no such date".into())
}

fn days_since_epoch(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - UNIX_EPOCH_DAYS_FROM_CE
}

/// `date`, as days since 1970-01-01.
fn parse_date(text: &str) -> Result<i32, Reason> {
    let (body, bc) = strip_era(text);
    parse_ymd(body, bc).map(days_since_epoch)
}

/// `HH:MM:SS[.ffffff]` as microseconds since midnight. `24:00:00` is allowed
/// for `time` columns, where Postgres accepts it.
fn parse_time_of_day(s: &str, allow_24: bool) -> Result<i64, Reason> {
    const SHAPE: &str = "expected HH:MM:SS with an optional fraction of 1 to 6 digits";
    let mut parts = s.splitn(3, ':');
    let (Some(h), Some(m), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SHAPE.into());
    };
    let (sec, frac) = match rest.split_once('.') {
        Some((sec, frac)) => (sec, Some(frac)),
        None => (rest, None),
    };
    let (Some(h), Some(m), Some(sec)) = (digits(h, 2, 2), digits(m, 2, 2), digits(sec, 2, 2))
    else {
        return Err(SHAPE.into());
    };
    let micros = match frac {
        None => 0,
        Some(frac) => {
            let Some(value) = digits(frac, 1, 6) else {
                return Err(SHAPE.into());
            };
            // frac.len() is 1..=6 here.
            let scale = 10_i64.pow(6 - u32::try_from(frac.len()).unwrap_or(6));
            i64::from(value) * scale
        }
    };
    let is_midnight_24 = allow_24 && h == 24 && m == 0 && sec == 0 && micros == 0;
    if (h > 23 && !is_midnight_24) || m > 59 || sec > 59 {
        return Err("time of day out of range".into());
    }
    Ok((i64::from(h * 3600 + m * 60 + sec)) * MICROS_PER_SECOND + micros)
}

/// `timestamp` (`with_offset == false`) or `timestamptz` output text, as
/// microseconds since 1970-01-01 (UTC for `timestamptz`).
fn parse_timestamp(text: &str, with_offset: bool) -> Result<i64, Reason> {
    let (body, bc) = strip_era(text);
    let Some((date, rest)) = body.split_once(' ') else {
        return Err("expected 'YYYY-MM-DD HH:MM:SS'".into());
    };
    let date = parse_ymd(date, bc)?;
    let (time, offset_seconds) = if with_offset {
        let Some(at) = rest.find(['+', '-']) else {
            return Err("missing UTC offset".into());
        };
        let (time, offset) = rest.split_at_checked(at).ok_or("missing UTC offset")?;
        (time, parse_utc_offset(offset)?)
    } else {
        (rest, 0)
    };
    let time = parse_time_of_day(time, false)?;
    i64::from(days_since_epoch(date))
        .checked_mul(MICROS_PER_DAY)
        .and_then(|d| d.checked_add(time))
        .and_then(|local| local.checked_sub(offset_seconds * MICROS_PER_SECOND))
        .ok_or_else(|| "out of range".into())
}

/// `+HH`, `-HH:MM` or `+HH:MM:SS`, as seconds east of UTC.
fn parse_utc_offset(s: &str) -> Result<i64, Reason> {
    const SHAPE: &str = "expected a UTC offset like +00, -08 or +05:30";
    let (sign, body) = match s.split_at_checked(1) {
        Some(("+", body)) => (1, body),
        Some(("-", body)) => (-1, body),
        _ => return Err(SHAPE.into()),
    };
    let mut seconds = 0i64;
    let mut unit = 3600;
    for (i, part) in body.split(':').enumerate() {
        // Hours, then minutes and seconds below 60; nothing more.
        let value = digits(part, 2, 2).filter(|&v| i == 0 || (i < 3 && v < 60));
        let Some(value) = value else {
            return Err(SHAPE.into());
        };
        seconds += i64::from(value) * unit;
        unit /= 60;
    }
    Ok(sign * seconds)
}

/// The canonical `8-4-4-4-12` form, lowercased.
fn parse_uuid(text: &str) -> Result<String, Reason> {
    let ok = text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    if ok {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx in hex".into())
    }
}

/// Reads an array literal: `{1,2}`, `{"a b",NULL}`, `{{1,2},{3,4}}`,
/// optionally after a `[1:2]=` bounds decoration, which is ignored.
///
/// Works on bytes: every structural character is ASCII, and a UTF-8
/// continuation byte never equals an ASCII one, so slices stay valid UTF-8.
struct ArrayParser<'a> {
    elem: &'a ColumnType,
    text: &'a str,
    pos: usize,
}

impl<'a> ArrayParser<'a> {
    fn new(elem: &'a ColumnType, text: &'a str) -> Self {
        ArrayParser { elem, text, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn unexpected(&self, expected: &str) -> Reason {
        match self.text.get(self.pos..).and_then(|s| s.chars().next()) {
            Some(c) => format!("expected {expected} at byte {}, found '{c}'", self.pos).into(),
            None => format!("expected {expected} at byte {}, found the end", self.pos).into(),
        }
    }

    fn parse(mut self) -> Result<Value, Reason> {
        self.skip_whitespace();
        if self.peek() == Some(b'[') {
            self.skip_bounds()?;
        }
        let value = self.level(1)?;
        self.skip_whitespace();
        if self.pos < self.text.len() {
            return Err(self.unexpected("nothing after the closing '}'"));
        }
        Ok(value)
    }

    /// Skips `[lo:hi][lo:hi]=`.
    fn skip_bounds(&mut self) -> Result<(), Reason> {
        while self.peek() == Some(b'[') {
            self.pos += 1;
            while self
                .peek()
                .is_some_and(|b| b.is_ascii_digit() || b == b'-' || b == b':')
            {
                self.pos += 1;
            }
            if self.peek() != Some(b']') {
                return Err(self.unexpected("']' closing the array bounds"));
            }
            self.pos += 1;
        }
        if self.peek() != Some(b'=') {
            return Err(self.unexpected("'=' after the array bounds"));
        }
        self.pos += 1;
        self.skip_whitespace();
        Ok(())
    }

    /// One `{...}` level; `depth` counts from 1.
    fn level(&mut self, depth: usize) -> Result<Value, Reason> {
        if depth > MAX_ARRAY_DIMS {
            return Err(format!("more than {MAX_ARRAY_DIMS} dimensions").into());
        }
        if self.peek() != Some(b'{') {
            return Err(self.unexpected("'{'"));
        }
        self.pos += 1;
        self.skip_whitespace();
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        let mut nested = None;
        loop {
            self.skip_whitespace();
            let start = self.pos;
            let (value, is_nested) = match self.peek() {
                Some(b'{') => (self.level(depth + 1)?, true),
                Some(b'"') => {
                    let text = self.quoted()?;
                    (self.element(start, &text)?, false)
                }
                Some(_) => (self.unquoted()?, false),
                None => return Err("unterminated array: missing '}'".into()),
            };
            if *nested.get_or_insert(is_nested) != is_nested {
                return Err(format!(
                    "element at byte {start} mixes nested arrays and plain elements"
                )
                .into());
            }
            items.push(value);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                None => return Err("unterminated array: missing '}'".into()),
                Some(_) => return Err(self.unexpected("',' or '}'")),
            }
        }
    }

    /// A `"..."` element, with backslash escapes undone.
    fn quoted(&mut self) -> Result<String, Reason> {
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(format!("unterminated quoted element at byte {start}").into()),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let Some(c) = self.peek() else {
                        return Err(format!("unterminated quoted element at byte {start}").into());
                    };
                    out.push(c);
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out)
            .map_err(|_| format!("invalid UTF-8 in element at byte {start}").into())
    }

    /// An unquoted element up to `,` or `}`; `NULL` in any case is null.
    fn unquoted(&mut self) -> Result<Value, Reason> {
        let start = self.pos;
        let mut out = Vec::new();
        let mut escaped = false;
        // Length of `out` without trailing unescaped whitespace.
        let mut kept = 0;
        while let Some(c) = self.peek() {
            match c {
                b',' | b'}' => break,
                b'{' | b'"' => return Err(self.unexpected("',' or '}'")),
                b'\\' => {
                    self.pos += 1;
                    let Some(c) = self.peek() else {
                        return Err("unterminated array: ends in a backslash".into());
                    };
                    out.push(c);
                    escaped = true;
                    kept = out.len();
                }
                _ => {
                    out.push(c);
                    if !c.is_ascii_whitespace() {
                        kept = out.len();
                    }
                }
            }
            self.pos += 1;
        }
        out.truncate(kept);
        if out.is_empty() && !escaped {
            return Err(self.unexpected("an element"));
        }
        if !escaped && out.eq_ignore_ascii_case(b"NULL") {
            return Ok(Value::Null);
        }
        let text = String::from_utf8(out)
            .map_err(|_| Reason::from(format!("invalid UTF-8 in element at byte {start}")))?;
        self.element(start, &text)
    }

    fn element(&self, start: usize, text: &str) -> Result<Value, Reason> {
        parse_text(self.elem, text).map_err(|e| format!("element at byte {start}: {e}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ty: &ColumnType, text: &str) -> Value {
        match parse_text(ty, text) {
            Ok(v) => v,
            Err(e) => panic!("{text:?} as {ty:?}: {e}"),
        }
    }

    fn err(ty: &ColumnType, text: &str) -> ValueError {
        match parse_text(ty, text) {
            Ok(v) => panic!("{text:?} as {ty:?} parsed as {v:?}"),
            Err(e) => e,
        }
    }

    fn arr(ty: ColumnType) -> ColumnType {
        ColumnType::Array(Box::new(ty))
    }

    fn t(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    #[test]
    fn booleans() {
        assert_eq!(ok(&ColumnType::Bool, "t"), Value::Bool(true));
        assert_eq!(ok(&ColumnType::Bool, "f"), Value::Bool(false));
        for bad in ["true", "T", "", "1", "t "] {
            err(&ColumnType::Bool, bad);
        }
        assert_eq!(
            err(&ColumnType::Bool, "yes").to_string(),
            "invalid boolean value 'yes': expected 't' or 'f'"
        );
    }

    #[test]
    fn integers_are_range_checked_per_width() {
        use ColumnType::{Int16, Int32, Int64};
        assert_eq!(ok(&Int16, "-32768"), Value::Int(-32768));
        assert_eq!(ok(&Int16, "32767"), Value::Int(32767));
        assert_eq!(ok(&Int16, "0"), Value::Int(0));
        assert_eq!(ok(&Int16, "-7"), Value::Int(-7));
        assert_eq!(
            err(&Int16, "32768").to_string(),
            "invalid smallint value '32768': out of range (-32768..=32767)"
        );
        err(&Int16, "-32769");
        assert_eq!(ok(&Int32, "-2147483648"), Value::Int(-2_147_483_648));
        assert_eq!(ok(&Int32, "2147483647"), Value::Int(2_147_483_647));
        err(&Int32, "2147483648");
        err(&Int32, "-2147483649");
        assert_eq!(ok(&Int64, "-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(ok(&Int64, "9223372036854775807"), Value::Int(i64::MAX));
        assert_eq!(
            err(&Int64, "9223372036854775808").to_string(),
            "invalid bigint value '9223372036854775808': out of range \
             (-9223372036854775808..=9223372036854775807)"
        );
        err(&Int64, "-9223372036854775809");
        for bad in ["", "-", "1.0", "12a", " 1", "1 ", "0x10", "1e3"] {
            assert_eq!(
                err(&Int32, bad).to_string(),
                format!("invalid integer value '{bad}': not an integer")
            );
        }
    }

    #[test]
    fn floats() {
        use ColumnType::{Float32, Float64};
        assert_eq!(ok(&Float64, "1.5"), Value::Float(1.5));
        assert_eq!(ok(&Float64, "-0.25"), Value::Float(-0.25));
        assert_eq!(ok(&Float64, "1e+300"), Value::Float(1e300));
        assert_eq!(
            ok(&Float64, "1.2345678901234567e-05"),
            Value::Float(1.234_567_890_123_456_7e-5)
        );
        assert_eq!(ok(&Float64, "0"), Value::Float(0.0));
        assert_eq!(ok(&Float64, "Infinity"), Value::Float(f64::INFINITY));
        assert_eq!(ok(&Float64, "-Infinity"), Value::Float(f64::NEG_INFINITY));
        assert!(matches!(ok(&Float64, "NaN"), Value::Float(v) if v.is_nan()));
        assert!(matches!(ok(&Float32, "NaN"), Value::Float(v) if v.is_nan()));
        assert_eq!(ok(&Float32, "-Infinity"), Value::Float(f64::NEG_INFINITY));
        // A real is the f32 it was, widened.
        assert_eq!(ok(&Float32, "1.1"), Value::Float(f64::from(1.1_f32)));
        assert_eq!(
            ok(&Float32, "3.4028235e+38"),
            Value::Float(f64::from(f32::MAX))
        );
        err(&Float32, "1e39");
        err(&Float64, "1e999");
        for bad in ["", "inf", "nan", "infinity", "abc", "1,5", " 1"] {
            err(&Float64, bad);
        }
    }

    #[test]
    fn numerics_are_kept_as_printed() {
        let ty = ColumnType::Numeric(Some((10, 4)));
        for good in [
            "-12.3400",
            "0",
            "0.0001",
            "123456789012345678901234567890.123456789",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            assert_eq!(ok(&ty, good), Value::Numeric(good.to_owned()));
        }
        for bad in [
            "", "-", ".5", "1.", "1.2.3", "1e5", "+1", "abc", "nan", "1 ",
        ] {
            err(&ty, bad);
        }
        assert!(err(&ty, "x")
            .to_string()
            .starts_with("invalid numeric(10,4) value 'x': not a number"));
        err(&ColumnType::Numeric(None), "--1");
    }

    #[test]
    fn text_json_and_text_like_pass_through() {
        assert_eq!(ok(&ColumnType::Text, ""), t(""));
        assert_eq!(ok(&ColumnType::Text, "héllo\tworld"), t("héllo\tworld"));
        assert_eq!(
            ok(&ColumnType::TextLike, "1 day 02:00:00"),
            t("1 day 02:00:00")
        );
        let point = ColumnType::Unsupported("point".into());
        assert_eq!(ok(&point, "(1,2)"), t("(1,2)"));
        assert_eq!(type_name(&arr(point)), "point[]");
        assert_eq!(
            ok(&ColumnType::Json, r#"{"a": [1, 2]}"#),
            Value::Json(r#"{"a": [1, 2]}"#.to_owned())
        );
    }

    #[test]
    fn bytea_hex_and_escape_forms() {
        let ty = ColumnType::Bytes;
        assert_eq!(ok(&ty, "\\x"), Value::Bytes(vec![]));
        assert_eq!(
            ok(&ty, "\\x00ff10AB"),
            Value::Bytes(vec![0, 0xff, 0x10, 0xab])
        );
        err(&ty, "\\x0");
        err(&ty, "\\xzz");
        err(&ty, "\\x0g");
        assert_eq!(
            ok(&ty, "ab\\\\c\\001\\377"),
            Value::Bytes(b"ab\\c\x01\xff".to_vec())
        );
        assert_eq!(ok(&ty, ""), Value::Bytes(vec![]));
        err(&ty, "\\9");
        err(&ty, "\\01");
        err(&ty, "\\400");
        err(&ty, "abc\\");
    }

    #[test]
    fn local_timestamps() {
        let ty = ColumnType::LocalTimestamp;
        let base = 1_704_164_645_000_000; // 2024-01-02 03:04:05
        assert_eq!(
            ok(&ty, "2024-01-02 03:04:05.123456"),
            Value::LocalTimestampMicros(base + 123_456)
        );
        assert_eq!(
            ok(&ty, "2024-01-02 03:04:05"),
            Value::LocalTimestampMicros(base)
        );
        for (frac, micros) in [
            ("5", 500_000),
            ("12", 120_000),
            ("123", 123_000),
            ("1234", 123_400),
            ("12345", 123_450),
            ("123456", 123_456),
            ("000001", 1),
        ] {
            assert_eq!(
                ok(&ty, &format!("2024-01-02 03:04:05.{frac}")),
                Value::LocalTimestampMicros(base + micros),
                "fraction .{frac}"
            );
        }
        assert_eq!(
            ok(&ty, "1970-01-01 00:00:00"),
            Value::LocalTimestampMicros(0)
        );
        assert_eq!(
            ok(&ty, "1969-12-31 23:59:59.999999"),
            Value::LocalTimestampMicros(-1)
        );
        assert_eq!(
            ok(&ty, "1960-06-15 12:00:00"),
            Value::LocalTimestampMicros(-301_233_600_000_000)
        );
        assert_eq!(
            ok(&ty, "0001-01-01 00:00:00"),
            Value::LocalTimestampMicros(-62_135_596_800_000_000)
        );
        // 1 BC is year 0, a leap year.
        assert_eq!(
            ok(&ty, "0001-01-01 00:00:00 BC"),
            Value::LocalTimestampMicros(-62_167_219_200_000_000)
        );
        assert_eq!(
            ok(&ty, "9999-12-31 23:59:59.999999"),
            Value::LocalTimestampMicros(253_402_300_799_999_999)
        );
        assert!(matches!(
            ok(&ty, "10000-01-01 00:00:00"),
            Value::LocalTimestampMicros(m) if m == 253_402_300_800_000_000
        ));
        assert_eq!(
            ok(&ty, "2024-02-29 12:00:00"),
            Value::LocalTimestampMicros(1_709_208_000_000_000)
        );
        for bad in [
            "2023-02-29 12:00:00",
            "2024-01-02T03:04:05",
            "2024-01-02",
            "2024-01-02 03:04",
            "2024-01-02 3:04:05",
            "2024-01-02 24:00:00",
            "2024-01-02 23:60:00",
            "2024-01-02 23:59:60",
            "2024-13-01 00:00:00",
            "2024-00-01 00:00:00",
            "2024-01-32 00:00:00",
            "2024-01-02 03:04:05.1234567",
            "2024-01-02 03:04:05.",
            "2024-01-02 03:04:05+00",
            "24-01-02 03:04:05",
            "0000-01-01 00:00:00",
            "-2024-01-02 03:04:05",
            "",
        ] {
            err(&ty, bad);
        }
    }

    #[test]
    fn timestamps_with_offsets_become_utc() {
        let ty = ColumnType::Timestamp;
        let base = 1_704_164_645_000_000; // 2024-01-02 03:04:05 UTC
        assert_eq!(
            ok(&ty, "2024-01-02 03:04:05.5+00"),
            Value::TimestampMicros(base + 500_000)
        );
        assert_eq!(
            ok(&ty, "2024-01-02 03:04:05+00"),
            Value::TimestampMicros(base)
        );
        assert_eq!(
            ok(&ty, "2024-01-02 08:34:05+05:30"),
            Value::TimestampMicros(base)
        );
        assert_eq!(
            ok(&ty, "2024-01-01 19:04:05-08"),
            Value::TimestampMicros(base)
        );
        assert_eq!(
            ok(&ty, "2024-01-01 19:04:05.000001-08:00"),
            Value::TimestampMicros(base + 1)
        );
        assert_eq!(
            ok(&ty, "2024-01-02 03:04:15+00:00:10"),
            Value::TimestampMicros(base)
        );
        assert_eq!(
            ok(&ty, "1969-12-31 23:59:59.999999+00"),
            Value::TimestampMicros(-1)
        );
        assert_eq!(
            ok(&ty, "0001-01-01 00:00:00+00 BC"),
            Value::TimestampMicros(-62_167_219_200_000_000)
        );
        for bad in [
            "2024-01-02 03:04:05",
            "2024-01-02 03:04:05+5",
            "2024-01-02 03:04:05+05:3",
            "2024-01-02 03:04:05+05:60",
            "2024-01-02 03:04:05+05:30:15:00",
            "2024-01-02 03:04:05 +00",
            "2024-01-02 03:04:05Z",
            "2024-01-02T03:04:05+00",
        ] {
            err(&ty, bad);
        }
    }

    #[test]
    fn infinite_timestamps_and_dates_are_the_extremes() {
        assert_eq!(
            ok(&ColumnType::Timestamp, "infinity"),
            Value::TimestampMicros(i64::MAX)
        );
        assert_eq!(
            ok(&ColumnType::Timestamp, "-infinity"),
            Value::TimestampMicros(i64::MIN)
        );
        assert_eq!(
            ok(&ColumnType::LocalTimestamp, "infinity"),
            Value::LocalTimestampMicros(i64::MAX)
        );
        assert_eq!(ok(&ColumnType::Date, "infinity"), Value::Date(i32::MAX));
        assert_eq!(ok(&ColumnType::Date, "-infinity"), Value::Date(i32::MIN));
    }

    #[test]
    fn arrays_have_the_declared_dimensions() {
        let two = arr(arr(ColumnType::Int32));
        assert_eq!(
            ok(&two, "{{1,2},{3,NULL}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Null]),
            ])
        );
        assert_eq!(ok(&two, "{}"), Value::Array(vec![]));
        assert!(err(&two, "{1,2}")
            .to_string()
            .contains("has 1 dimension(s), but the column is declared with 2"));
        assert!(err(&arr(ColumnType::Int32), "{{1},{2}}")
            .to_string()
            .contains("`type: string`"));
    }

    #[test]
    fn dates() {
        let ty = ColumnType::Date;
        assert_eq!(ok(&ty, "2024-01-02"), Value::Date(19_724));
        assert_eq!(ok(&ty, "1970-01-01"), Value::Date(0));
        assert_eq!(ok(&ty, "1969-12-31"), Value::Date(-1));
        assert_eq!(ok(&ty, "2000-02-29"), Value::Date(11_016));
        assert_eq!(ok(&ty, "2024-02-29"), Value::Date(19_782));
        assert_eq!(ok(&ty, "0001-01-01"), Value::Date(-719_162));
        assert_eq!(ok(&ty, "0001-12-31 BC"), Value::Date(-719_163));
        // 44 BC is year -43 in the proleptic Gregorian calendar.
        let ides = NaiveDate::from_ymd_opt(-43, 3, 15).unwrap();
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        let days = i32::try_from((ides - epoch).num_days()).unwrap();
        assert_eq!(ok(&ty, "0044-03-15 BC"), Value::Date(days));
        for bad in [
            "1900-02-29",
            "2100-02-29",
            "2023-02-29",
            "2024-1-2",
            "2024-01-02 ",
            "2024/01/02",
            "0000-01-01",
            "20240102",
            "2024-04-31",
            "",
        ] {
            err(&ty, bad);
        }
        assert_eq!(
            err(&ty, "2023-02-29").to_string(),
            "invalid date value '2023-02-29': no such date"
        );
    }

    #[test]
    fn times() {
        let ty = ColumnType::Time;
        assert_eq!(
            ok(&ty, "13:45:00.25"),
            Value::TimeMicros((13 * 3600 + 45 * 60) * 1_000_000 + 250_000)
        );
        assert_eq!(ok(&ty, "00:00:00"), Value::TimeMicros(0));
        assert_eq!(
            ok(&ty, "23:59:59.999999"),
            Value::TimeMicros(86_399_999_999)
        );
        assert_eq!(ok(&ty, "24:00:00"), Value::TimeMicros(86_400_000_000));
        for bad in [
            "24:00:01",
            "24:00:00.5",
            "12:60:00",
            "12:00:60",
            "1:00:00",
            "12:00",
            "12:00:00.1234567",
            "12:00:00+00",
            "",
        ] {
            err(&ty, bad);
        }
    }

    #[test]
    fn uuids_are_validated_and_lowercased() {
        let ty = ColumnType::Uuid;
        assert_eq!(
            ok(&ty, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_owned())
        );
        assert_eq!(
            ok(&ty, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_owned())
        );
        for bad in [
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "a0eebc99-9c0b-4ef8-bb6d_6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "",
        ] {
            err(&ty, bad);
        }
    }

    #[test]
    fn enums_accept_only_their_labels() {
        let ty = ColumnType::Enum(vec!["sad".into(), "ok".into(), "happy".into()]);
        assert_eq!(ok(&ty, "ok"), t("ok"));
        assert_eq!(
            err(&ty, "meh").to_string(),
            "invalid enum value 'meh': not one of the enum's labels (sad, ok, happy)"
        );
        err(&ty, "OK");
        let many = ColumnType::Enum((0..100).map(|i| format!("label_{i}")).collect());
        assert_eq!(
            err(&many, "x").to_string(),
            "invalid enum value 'x': not one of the enum's 100 labels"
        );
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let long = "é".repeat(100);
        let ValueError::Invalid { text, .. } = err(&ColumnType::Int32, &long) else {
            panic!("expected Invalid");
        };
        assert_eq!(text, format!("{}…", "é".repeat(60)));
        let exact = "1".repeat(60) + "x";
        let ValueError::Invalid { text, .. } = err(&ColumnType::Int32, &exact) else {
            panic!("expected Invalid");
        };
        assert_eq!(text, format!("{}…", "1".repeat(60)));
    }

    #[test]
    fn bytes_must_be_utf8() {
        assert_eq!(
            parse_text_bytes(&ColumnType::Int32, b"42"),
            Ok(Value::Int(42))
        );
        let e = parse_text_bytes(&ColumnType::Text, b"ab\xff").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("invalid text value 'ab\u{fffd}': not valid UTF-8"));
    }

    #[test]
    fn simple_arrays() {
        let ints = arr(ColumnType::Int32);
        assert_eq!(
            ok(&ints, "{1,2,3}"),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(3)])
        );
        assert_eq!(ok(&ints, "{}"), Value::Array(vec![]));
        assert_eq!(ok(&ints, " { } "), Value::Array(vec![]));
        assert_eq!(
            ok(&ints, "{-1, 2 ,NULL}"),
            Value::Array(vec![Value::Int(-1), Value::Int(2), Value::Null])
        );
        assert_eq!(
            ok(&arr(ColumnType::Bool), "{t,f,NULL}"),
            Value::Array(vec![Value::Bool(true), Value::Bool(false), Value::Null])
        );
        let Value::Array(floats) = ok(&arr(ColumnType::Float64), "{1.5,NaN,-Infinity}") else {
            panic!("expected an array");
        };
        assert!(matches!(
            floats.as_slice(),
            [Value::Float(a), Value::Float(b), Value::Float(c)]
                if *a == 1.5 && b.is_nan() && *c == f64::NEG_INFINITY
        ));
    }

    #[test]
    fn text_arrays_with_quotes_escapes_and_nulls() {
        let texts = arr(ColumnType::Text);
        assert_eq!(
            ok(&texts, r#"{"a b","c\"d",NULL}"#),
            Value::Array(vec![t("a b"), t("c\"d"), Value::Null])
        );
        assert_eq!(
            ok(&texts, r#"{"NULL",null,NuLl,"",\NULL}"#),
            Value::Array(vec![t("NULL"), Value::Null, Value::Null, t(""), t("NULL")])
        );
        assert_eq!(
            ok(&texts, r#"{"back\\slash","{braces}","a,b",a\,b,"  pad  "}"#),
            Value::Array(vec![
                t("back\\slash"),
                t("{braces}"),
                t("a,b"),
                t("a,b"),
                t("  pad  "),
            ])
        );
        assert_eq!(
            ok(&texts, "{héllo,wörld}"),
            Value::Array(vec![t("héllo"), t("wörld")])
        );
        // Unquoted elements lose surrounding blanks, but not escaped ones.
        assert_eq!(
            ok(&texts, "{ a b , c\\ }"),
            Value::Array(vec![t("a b"), t("c ")])
        );
    }

    #[test]
    fn nested_arrays_and_bounds() {
        let dims = |n: usize, leaf: ColumnType| (0..n).fold(leaf, |t, _| arr(t));
        let ints = arr(ColumnType::Int64);
        let ints2 = dims(2, ColumnType::Int64);
        let row = |a, b| Value::Array(vec![Value::Int(a), Value::Int(b)]);
        assert_eq!(
            ok(&ints2, "{{1,2},{3,4}}"),
            Value::Array(vec![row(1, 2), row(3, 4)])
        );
        assert_eq!(
            ok(&ints2, "[0:1][1:2]={{1,2},{3,4}}"),
            Value::Array(vec![row(1, 2), row(3, 4)])
        );
        assert_eq!(
            ok(&ints, "[-2:0]={1,2,3}"),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(3)])
        );
        assert_eq!(
            ok(&dims(3, ColumnType::Int64), "{{{1}}}"),
            Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::Int(1)])])])
        );
        ok(&dims(6, ColumnType::Int64), "{{{{{{1}}}}}}");
        assert!(err(&ints, "{{{{{{{1}}}}}}}")
            .to_string()
            .contains("more than 6 dimensions"));
        let texts = dims(2, ColumnType::Text);
        assert_eq!(
            ok(&texts, r#"{{"a",NULL},{"{",c}}"#),
            Value::Array(vec![
                Value::Array(vec![t("a"), Value::Null]),
                Value::Array(vec![t("{"), t("c")]),
            ])
        );
    }

    #[test]
    fn arrays_parse_elements_with_the_element_type() {
        assert_eq!(
            ok(
                &arr(ColumnType::Timestamp),
                r#"{"2024-01-02 03:04:05+00",NULL}"#
            ),
            Value::Array(vec![
                Value::TimestampMicros(1_704_164_645_000_000),
                Value::Null
            ])
        );
        assert_eq!(
            ok(&arr(ColumnType::Bytes), r#"{"\\x0102","\\x"}"#),
            Value::Array(vec![Value::Bytes(vec![1, 2]), Value::Bytes(vec![])])
        );
        assert_eq!(
            ok(&arr(ColumnType::Json), r#"{"{\"a\": 1}",null}"#),
            Value::Array(vec![Value::Json(r#"{"a": 1}"#.into()), Value::Null])
        );
        assert_eq!(
            ok(
                &arr(ColumnType::Uuid),
                "{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}"
            ),
            Value::Array(vec![Value::Uuid(
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into()
            )])
        );
        let moods = arr(ColumnType::Enum(vec!["sad".into(), "ok".into()]));
        assert_eq!(
            ok(&moods, "{ok,sad}"),
            Value::Array(vec![t("ok"), t("sad")])
        );
        err(&moods, "{ok,meh}");
        assert_eq!(
            ok(&arr(ColumnType::Numeric(None)), "{1.50,NaN}"),
            Value::Array(vec![
                Value::Numeric("1.50".into()),
                Value::Numeric("NaN".into())
            ])
        );
        assert_eq!(
            err(&arr(ColumnType::Int16), "{1,40000}").to_string(),
            "invalid smallint[] value '{1,40000}': element at byte 3: \
             invalid smallint value '40000': out of range (-32768..=32767)"
        );
        assert_eq!(
            ok(&arr(ColumnType::Date), "{2024-01-01,infinity}"),
            Value::Array(vec![Value::Date(19723), Value::Date(i32::MAX)])
        );
    }

    #[test]
    fn malformed_arrays_are_errors() {
        let ints = arr(ColumnType::Int32);
        let texts = arr(ColumnType::Text);
        for bad in [
            "",
            "{",
            "}",
            "{1,2",
            "{1,2}}",
            "{1,2}x",
            "1,2",
            "{1,,2}",
            "{,}",
            "{1,}",
            "{,1}",
            "{{1},2}",
            "{1,{2}}",
            "{{1,2},{3,4}",
            "[1:2]{1,2}",
            "[1:2={1,2}",
            "[x]={1}",
            "{1 2,3}x",
            "{abc}",
        ] {
            err(&ints, bad);
        }
        for bad in [
            r#"{"abc}"#,
            r#"{"abc"x}"#,
            r#"{"abc\"}"#,
            r#"{ab"c}"#,
            r#"{a{b}"#,
            "{abc\\",
            "{\"a\"\"b\"}",
        ] {
            err(&texts, bad);
        }
        assert_eq!(
            err(&ints, "{1,2").to_string(),
            "invalid integer[] value '{1,2': unterminated array: missing '}'"
        );
        assert_eq!(
            err(&ints, "{1,,2}").to_string(),
            "invalid integer[] value '{1,,2}': expected an element at byte 3, found ','"
        );
    }

    #[test]
    fn copy_lines_split_on_tabs_and_unescape() {
        assert_eq!(
            split_copy_line(b"1\tfoo\\\\bar\t\\N\t"),
            Ok(vec![
                Some("1".into()),
                Some("foo\\bar".into()),
                None,
                Some(String::new()),
            ])
        );
        assert_eq!(split_copy_line(b""), Ok(vec![Some(String::new())]));
        assert_eq!(split_copy_line(b"\\N"), Ok(vec![None]));
        assert_eq!(
            split_copy_line(b"\t"),
            Ok(vec![Some(String::new()), Some(String::new())])
        );
        assert_eq!(
            split_copy_line(b"a\\tb\\nc\\rd\\be\\ff\\vg"),
            Ok(vec![Some("a\tb\nc\rd\x08e\x0cf\x0bg".into())])
        );
        // Octal (1 to 3 digits) and hex (1 or 2 digits) escapes.
        assert_eq!(
            split_copy_line(b"\\101\\0\\12x\\x41\\x4g\\xZ"),
            Ok(vec![Some("A\0\nx\x41\x04gxZ".into())])
        );
        assert_eq!(
            split_copy_line(b"\\303\\251t\\xc3\\xa9"),
            Ok(vec![Some("été".into())])
        );
        // Any other escaped character stands for itself; `\N` inside a field
        // is not NULL.
        assert_eq!(
            split_copy_line(b"\\q\\.\ta\\Nb\t\\N\\N"),
            Ok(vec![
                Some("q.".into()),
                Some("aNb".into()),
                Some("NN".into())
            ])
        );
        // An escaped raw TAB is data, not a separator.
        assert_eq!(
            split_copy_line(b"a\\\tb\tc"),
            Ok(vec![Some("a\tb".into()), Some("c".into())])
        );
        assert_eq!(
            split_copy_line("héllo\twörld".as_bytes()),
            Ok(vec![Some("héllo".into()), Some("wörld".into())])
        );
    }

    #[test]
    fn malformed_copy_lines_are_errors() {
        assert_eq!(
            split_copy_line(b"ok\tbad\\"),
            Err(ValueError::CopyLine {
                field: 2,
                offset: 3,
                reason: "line ends in a lone backslash at byte 6".into(),
            })
        );
        let e = split_copy_line(b"1\t2\t\\377").unwrap_err();
        assert!(matches!(
            e,
            ValueError::CopyLine {
                field: 3,
                offset: 4,
                ..
            }
        ));
        assert!(e
            .to_string()
            .starts_with("malformed COPY text line: field 3 at byte 4: not valid UTF-8"));
        assert!(split_copy_line(b"\xff").is_err());
    }

    #[test]
    fn copy_fields_feed_the_value_parser() {
        let fields = split_copy_line(b"42\t{\"a b\",NULL}\t2024-01-02 03:04:05+00\t\\N").unwrap();
        let types = [
            ColumnType::Int32,
            arr(ColumnType::Text),
            ColumnType::Timestamp,
            ColumnType::Text,
        ];
        let values: Vec<Value> = fields
            .iter()
            .zip(&types)
            .map(|(f, ty)| f.as_deref().map_or(Ok(Value::Null), |s| parse_text(ty, s)))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            values,
            vec![
                Value::Int(42),
                Value::Array(vec![t("a b"), Value::Null]),
                Value::TimestampMicros(1_704_164_645_000_000),
                Value::Null,
            ]
        );
    }

    #[test]
    fn random_text_never_panics() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x7661_6c75_6573);
        let alphabet: Vec<char> = "{}[]:=,\"\\ NULLnul0123456789-+.eE:tfx aé\t"
            .chars()
            .collect();
        let types = [
            ColumnType::Bool,
            ColumnType::Int16,
            ColumnType::Float32,
            ColumnType::Numeric(None),
            ColumnType::Bytes,
            ColumnType::LocalTimestamp,
            ColumnType::Timestamp,
            ColumnType::Date,
            ColumnType::Time,
            ColumnType::Uuid,
            arr(ColumnType::Int32),
            arr(ColumnType::Text),
            arr(arr(ColumnType::Text)),
        ];
        for _ in 0..20_000 {
            let len = rng.random_range(0..24);
            let text: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let ty = &types[rng.random_range(0..types.len())];
            let _ = parse_text(ty, &text);
            let _ = split_copy_line(text.as_bytes());
        }
        let mut bytes = vec![0u8; 32];
        for _ in 0..5_000 {
            rng.fill(&mut bytes[..]);
            let _ = split_copy_line(&bytes);
        }
    }
}
