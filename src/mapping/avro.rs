//! Avro for domain events: the published type of each column, the event
//! schema derived from a mapping, and a direct binary encoder.
//!
//! The encoder writes Avro binary straight from [`Value`]s following a plan
//! computed once per table, instead of building a generic Avro value tree
//! per row. Its output is checked against `apache-avro`'s reader in tests.

use serde_json::{json, Value as Json};

use crate::event::{ColumnType, Value};

/// The Avro type a column is published as (always inside `["null", T]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AvroType {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Bytes,
    /// `bytes` with logical type decimal.
    Decimal {
        precision: u32,
        scale: u32,
    },
    Date,
    TimeMicros,
    TimestampMicros,
    LocalTimestampMicros,
    Uuid,
    /// `string` holding JSON text.
    Json,
    /// Items are nullable.
    Array(Box<AvroType>),
    /// A nested record (a MongoDB sub-document); its fields are nullable.
    Record {
        name: String,
        fields: Vec<(String, AvroType)>,
    },
}

/// Largest decimal precision published as Avro `decimal` (fits an i128).
pub const MAX_DECIMAL_PRECISION: u32 = 38;

impl AvroType {
    /// The published type of a database column type; `Err` names what is
    /// not supported.
    pub fn for_column(ty: &ColumnType) -> Result<AvroType, String> {
        Self::for_column_named(ty, "Nested")
    }

    /// Like [`AvroType::for_column`]; nested records are named `name`,
    /// then `name` + the PascalCase field name below it, so every record
    /// name in one schema is distinct.
    pub fn for_column_named(ty: &ColumnType, name: &str) -> Result<AvroType, String> {
        Ok(match ty {
            ColumnType::Bool => AvroType::Boolean,
            ColumnType::Int16 | ColumnType::Int32 => AvroType::Int,
            ColumnType::Int64 => AvroType::Long,
            ColumnType::Float32 => AvroType::Float,
            ColumnType::Float64 => AvroType::Double,
            ColumnType::Numeric(Some((p, s))) if *p <= MAX_DECIMAL_PRECISION => AvroType::Decimal {
                precision: *p,
                scale: *s,
            },
            ColumnType::Numeric(_)
            | ColumnType::ObjectId
            | ColumnType::Text
            | ColumnType::TextLike
            | ColumnType::Enum(_) => AvroType::String,
            ColumnType::Bytes => AvroType::Bytes,
            ColumnType::LocalTimestamp => AvroType::LocalTimestampMicros,
            ColumnType::Timestamp => AvroType::TimestampMicros,
            ColumnType::Date => AvroType::Date,
            ColumnType::Time => AvroType::TimeMicros,
            ColumnType::Uuid => AvroType::Uuid,
            ColumnType::Json => AvroType::Json,
            ColumnType::Array(inner) => {
                AvroType::Array(Box::new(AvroType::for_column_named(inner, name)?))
            }
            ColumnType::Hstore => AvroType::Json,
            ColumnType::Geometry => AvroType::Bytes,
            ColumnType::Record(fields) => AvroType::Record {
                name: name.to_string(),
                fields: fields
                    .iter()
                    .map(|f| {
                        let sub = format!("{name}{}", super::pascal_case(&f.name));
                        Ok((
                            super::sanitize_name(&f.name),
                            AvroType::for_column_named(&f.ty, &sub)?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            },
            ColumnType::Unsupported(name) => {
                return Err(format!("type `{name}` is not supported"));
            }
        })
    }

    /// The Avro schema JSON of this type (without the null union).
    pub fn schema(&self) -> Json {
        match self {
            AvroType::Boolean => json!("boolean"),
            AvroType::Int => json!("int"),
            AvroType::Long => json!("long"),
            AvroType::Float => json!("float"),
            AvroType::Double => json!("double"),
            AvroType::String => json!("string"),
            AvroType::Json => json!({"type": "string", "connect.name": "io.debezium.data.Json"}),
            AvroType::Bytes => json!("bytes"),
            AvroType::Decimal { precision, scale } => {
                json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
            }
            AvroType::Date => json!({"type": "int", "logicalType": "date"}),
            AvroType::TimeMicros => json!({"type": "long", "logicalType": "time-micros"}),
            AvroType::TimestampMicros => json!({"type": "long", "logicalType": "timestamp-micros"}),
            AvroType::LocalTimestampMicros => {
                json!({"type": "long", "logicalType": "local-timestamp-micros"})
            }
            AvroType::Uuid => json!({"type": "string", "logicalType": "uuid"}),
            AvroType::Array(inner) => json!({"type": "array", "items": ["null", inner.schema()]}),
            AvroType::Record { name, fields } => json!({
                "type": "record",
                "name": name,
                "fields": fields
                    .iter()
                    .map(|(n, t)| json!({"name": n, "type": ["null", t.schema()], "default": null}))
                    .collect::<Vec<_>>(),
            }),
        }
    }
}

/// Why a value could not be encoded as its published type.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EncodeError {
    #[error("{value} value does not fit the published type {expected}")]
    Mismatch { expected: String, value: String },
    #[error("the database did not send this unchanged TOAST value; set `ALTER TABLE ... REPLICA IDENTITY FULL` so updates carry it")]
    Unchanged,
    #[error("the value could not be read: {0}")]
    Invalid(String),
    #[error("a numeric value of {value} characters does not fit decimal({precision},{scale}) (or is NaN/infinite); publish the column as text (`type: string`) to carry NaN, Infinity and any precision")]
    Decimal {
        value: String,
        precision: u32,
        scale: u32,
    },
}

/// What kind of value it was, without the value (row values never go to logs).
fn short(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Numeric(_) => "a numeric",
        Value::Text(_) => "a text",
        Value::Bytes(_) => "bytes",
        Value::LocalTimestampMicros(_) | Value::TimestampMicros(_) => "a timestamp",
        Value::Date(_) => "a date",
        Value::TimeMicros(_) => "a time",
        Value::Uuid(_) => "a uuid",
        Value::Json(_) => "a json",
        Value::Array(_) => "an array",
        Value::Record(_) => "a document",
        Value::Unchanged => "an unchanged TOAST value",
        Value::Invalid(_) => "an unreadable value",
    };
    kind.to_string()
}

/// Appends a zig-zag varint `long`.
pub fn write_long(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)).cast_unsigned();
    while z >= 0x80 {
        buf.push(u8::try_from(z & 0x7f).unwrap_or(0) | 0x80);
        z >>= 7;
    }
    buf.push(u8::try_from(z).unwrap_or(0));
}

/// Appends Avro `string`/`bytes`: length then data.
pub fn write_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    write_long(buf, i64::try_from(b.len()).unwrap_or(i64::MAX));
    buf.extend_from_slice(b);
}

/// Appends `["null", T]` for `v`.
pub fn write_nullable(buf: &mut Vec<u8>, ty: &AvroType, v: &Value) -> Result<(), EncodeError> {
    if matches!(v, Value::Null) {
        buf.push(0);
        return Ok(());
    }
    buf.push(2);
    write_value(buf, ty, v)
}

fn mismatch(ty: &AvroType, v: &Value) -> EncodeError {
    EncodeError::Mismatch {
        expected: format!("{ty:?}").to_lowercase(),
        value: short(v),
    }
}

/// Appends `v` as `ty` (not nullable: the caller handles null).
pub fn write_value(buf: &mut Vec<u8>, ty: &AvroType, v: &Value) -> Result<(), EncodeError> {
    match v {
        Value::Unchanged => return Err(EncodeError::Unchanged),
        Value::Invalid(reason) => return Err(EncodeError::Invalid(reason.clone())),
        _ => {}
    }
    match (ty, v) {
        (AvroType::Boolean, Value::Bool(b)) => buf.push(u8::from(*b)),
        (AvroType::Int, Value::Int(i)) => {
            let i = i32::try_from(*i).map_err(|_| mismatch(ty, v))?;
            write_long(buf, i64::from(i));
        }
        (AvroType::Long, Value::Int(i)) => write_long(buf, *i),
        #[allow(clippy::cast_possible_truncation)]
        (AvroType::Float, Value::Float(f)) => buf.extend_from_slice(&(*f as f32).to_le_bytes()),
        (AvroType::Double, Value::Float(f)) => buf.extend_from_slice(&f.to_le_bytes()),
        (AvroType::String | AvroType::Json | AvroType::Uuid, _) => match text_of(v) {
            Some(s) => write_bytes(buf, s.as_bytes()),
            None => return Err(mismatch(ty, v)),
        },
        (AvroType::Bytes, Value::Bytes(b)) => write_bytes(buf, b),
        (AvroType::Decimal { precision, scale }, Value::Numeric(s)) => {
            let unscaled =
                decimal_unscaled(s, *precision, *scale).ok_or_else(|| EncodeError::Decimal {
                    value: s.chars().count().to_string(),
                    precision: *precision,
                    scale: *scale,
                })?;
            write_bytes(buf, &twos_complement_min(unscaled));
        }
        (AvroType::Date, Value::Date(d)) => write_long(buf, i64::from(*d)),
        (AvroType::TimeMicros, Value::TimeMicros(t))
        | (AvroType::TimestampMicros, Value::TimestampMicros(t))
        | (AvroType::LocalTimestampMicros, Value::LocalTimestampMicros(t)) => write_long(buf, *t),
        (AvroType::Array(inner), Value::Array(items)) => {
            if !items.is_empty() {
                write_long(buf, i64::try_from(items.len()).unwrap_or(i64::MAX));
                for item in items {
                    if matches!(item, Value::Array(_)) && !matches!(**inner, AvroType::Array(_)) {
                        return Err(EncodeError::Mismatch {
                            expected: "a one-dimensional array".into(),
                            value: "a multi-dimensional array".into(),
                        });
                    }
                    write_nullable(buf, inner, item)?;
                }
            }
            buf.push(0);
        }
        (AvroType::Record { fields, .. }, Value::Record(values)) => {
            if values.len() != fields.len() {
                return Err(mismatch(ty, v));
            }
            for ((_, t), item) in fields.iter().zip(values) {
                write_nullable(buf, t, item)?;
            }
        }
        _ => return Err(mismatch(ty, v)),
    }
    Ok(())
}

/// The text form of a value when it is published as a string.
fn text_of(v: &Value) -> Option<String> {
    Some(match v {
        Value::Text(s) | Value::Numeric(s) | Value::Json(s) | Value::Uuid(s) => s.clone(),
        other => render_text(other)?,
    })
}

/// A readable text form of any value (for `type: string` and for keys).
pub fn render_text(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null | Value::Unchanged | Value::Invalid(_) => return None,
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Uuid(s) => s.clone(),
        Value::Bytes(b) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
        Value::LocalTimestampMicros(us) => chrono::DateTime::from_timestamp_micros(*us)?
            .naive_utc()
            .format("%Y-%m-%dT%H:%M:%S%.f")
            .to_string(),
        Value::TimestampMicros(us) => chrono::DateTime::from_timestamp_micros(*us)?
            .format("%Y-%m-%dT%H:%M:%S%.fZ")
            .to_string(),
        Value::Date(d) => (chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
            + chrono::Duration::days(i64::from(*d)))
        .format("%Y-%m-%d")
        .to_string(),
        Value::TimeMicros(us) => {
            let secs = u32::try_from(us / 1_000_000).ok()?;
            let nanos = u32::try_from((us % 1_000_000) * 1000).ok()?;
            chrono::NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos)?
                .format("%H:%M:%S%.f")
                .to_string()
        }
        Value::Array(items) | Value::Record(items) => {
            let parts: Vec<Json> = items
                .iter()
                .map(|i| render_text(i).map_or(Json::Null, Json::String))
                .collect();
            Json::Array(parts).to_string()
        }
    })
}

/// `"-12.5"` at scale 2 -> -1250; `None` if it has more digits than fit.
fn decimal_unscaled(s: &str, precision: u32, scale: u32) -> Option<i128> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let scale_us = usize::try_from(scale).ok()?;
    // Extra fraction digits must be zeros (Postgres pads to the scale).
    let (kept, extra) = frac_part.split_at(frac_part.len().min(scale_us));
    if extra.chars().any(|c| c != '0') {
        return None;
    }
    let mut unscaled: i128 = 0;
    let mut count = 0u32;
    for c in int_part
        .trim_start_matches('0')
        .chars()
        .chain(kept.chars())
        .chain(std::iter::repeat_n('0', scale_us - kept.len()))
    {
        unscaled = unscaled
            .checked_mul(10)?
            .checked_add(i128::from(c.to_digit(10)?))?;
        count += 1;
    }
    let significant = int_part.trim_start_matches('0').len() + scale_us;
    if u32::try_from(significant).ok()? > precision && count > 0 && unscaled != 0 {
        return None;
    }
    Some(if neg { -unscaled } else { unscaled })
}

/// Minimal big-endian two's complement bytes of `v` (what Avro decimal wants).
fn twos_complement_min(v: i128) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let b = bytes[start];
        let next_high = bytes[start + 1] & 0x80;
        if (b == 0x00 && next_high == 0) || (b == 0xff && next_high != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_matches_the_spec() {
        let cases: [(i64, &[u8]); 5] = [
            (0, &[0]),
            (-1, &[1]),
            (1, &[2]),
            (-64, &[0x7f]),
            (64, &[0x80, 1]),
        ];
        for (v, want) in cases {
            let mut buf = Vec::new();
            write_long(&mut buf, v);
            assert_eq!(buf, want, "{v}");
        }
    }

    #[test]
    fn decimals_scale_and_check_precision() {
        assert_eq!(decimal_unscaled("12.5", 5, 2), Some(1250));
        assert_eq!(decimal_unscaled("-0.01", 5, 2), Some(-1));
        assert_eq!(decimal_unscaled("123.450", 6, 2), Some(12345));
        assert_eq!(decimal_unscaled("123.456", 6, 2), None);
        assert_eq!(decimal_unscaled("12345", 5, 2), None);
        assert_eq!(decimal_unscaled("NaN", 5, 2), None);
        assert_eq!(twos_complement_min(1250), vec![0x04, 0xe2]);
        assert_eq!(twos_complement_min(-1), vec![0xff]);
        assert_eq!(twos_complement_min(128), vec![0x00, 0x80]);
        assert_eq!(twos_complement_min(0), vec![0x00]);
    }

    #[test]
    fn renders_text_forms() {
        assert_eq!(
            render_text(&Value::TimestampMicros(1_500_000)).unwrap(),
            "1970-01-01T00:00:01.500Z"
        );
        assert_eq!(render_text(&Value::Date(19_723)).unwrap(), "2024-01-01");
        assert_eq!(
            render_text(&Value::Bytes(vec![0xde, 0xad])).unwrap(),
            "\\xdead"
        );
        assert_eq!(
            render_text(&Value::Array(vec![Value::Int(1), Value::Null])).unwrap(),
            "[\"1\",null]"
        );
        assert_eq!(render_text(&Value::Null), None);
    }

    #[test]
    fn unsupported_types_are_named() {
        let err = AvroType::for_column(&ColumnType::Unsupported("point".into())).unwrap_err();
        assert!(err.contains("`point`"));
    }
}
