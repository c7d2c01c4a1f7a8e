//! Debezium's change event envelope, published beside the domain events, so
//! that consumers written for Debezium's PostgreSQL connector (with
//! Confluent's `AvroConverter` for key and value) can read unilog's topics
//! without a change.
//!
//! A mapping with `debezium: { server_name: legacy }` publishes every change
//! of its table a second time, on the topic `legacy.<schema>.<table>` (or
//! `debezium.topic`):
//!
//! ```text
//!  key    legacy.public.users.Key      {id}                    subject <topic>-key
//!  value  legacy.public.users.Envelope {before, after, source,  subject <topic>-value
//!                                       transaction, op, ts_ms, ts_us, ts_ns}
//!         before/after: legacy.public.users.Value (the table's columns)
//!         source:       io.debezium.connector.postgresql.Source
//!  after a delete: a tombstone (same key, null value) unless `tombstones: false`
//! ```
//!
//! Both key and value are Avro in the Confluent wire format, so an
//! `AvroDeserializer` (or `KafkaAvroDeserializer`) works on both.
//!
//! # What follows Debezium (3.x, `time.precision.mode=adaptive`, `decimal.handling.mode=precise`)
//!
//! - Record names and layout: `<server>.<schema>.<table>.Envelope` with
//!   fields in Debezium's order, `.Value` for `before`/`after` (defined once,
//!   referenced by `after`), `.Key` for the message key,
//!   `io.debezium.connector.postgresql.Source`, `event.block` for
//!   `transaction`; the `connect.name`/`connect.version`/`connect.parameters`
//!   attributes Confluent's converter writes, so tools that look at them
//!   (`io.debezium.data.Enum`'s `allowed`, ...) find them.
//! - `op`: `r` snapshot read, `c` insert, `u` update, `d` delete, `t`
//!   truncate (published only when the mapping names a truncate event;
//!   Debezium skips truncates by default too). An update that changes the
//!   key becomes `d` (old key) + tombstone + `c` (new key), as Debezium does.
//! - `before`: on update/delete only what PostgreSQL sends: the whole row
//!   under `REPLICA IDENTITY FULL`; under the default identity nothing on
//!   update and the key columns on delete, where every other NOT NULL
//!   column gets its type's zero value (`0`, `""`, `false`, ...), the
//!   fallback Debezium also uses, and nullable ones `null`.
//! - `source`: `version`, `connector` = `postgresql`, `name` = server name,
//!   `ts_ms`/`ts_us`/`ts_ns` = commit time (read time for snapshot rows),
//!   `snapshot` = `"true"`/`"false"` (a string enum, as in Debezium), `db`,
//!   `sequence` = `["<commit LSN>","<change LSN>"]` as decimal strings
//!   (`[null,"<LSN>"]` for snapshot rows), `schema`, `table`, `txId`, `lsn`.
//! - Envelope `ts_ms`/`ts_us`/`ts_ns`: when unilog processed the change.
//! - Message key: the primary key columns (or the mapping's `key:`, like
//!   Debezium's `message.key.columns`); a truncate has no key.
//! - Tombstones after deletes (`tombstones.on.delete`, default true).
//! - Unchanged TOAST values (update under the default replica identity) are
//!   Debezium's placeholder `__debezium_unavailable_value` in text, JSON and
//!   bytea columns; in other columns (arrays) they stop the pipeline with the
//!   domain event's error, which says to set `REPLICA IDENTITY FULL`.
//! - Column types as a Debezium Avro consumer sees them. Where the Avro type
//!   is the same as the domain event's, [`AvroType`] is reused (boolean,
//!   int, long, float, double, string, bytes, decimal(p,s) with p <= 38,
//!   one-dimensional arrays of nullable items).
//!   Where Debezium differs, the Debezium form wins, because that is what the
//!   consumer was written for:
//!
//!   | PostgreSQL | Debezium / here (domain event) |
//!   |---|---|
//!   | smallint | int + `connect.type: int16` |
//!   | timestamp | long `io.debezium.time.MicroTimestamp`, no logicalType (domain: local-timestamp-micros) |
//!   | timestamptz | string `io.debezium.time.ZonedTimestamp`, ISO 8601 in UTC: `2024-01-02T03:04:05.5Z` (domain: timestamp-micros) |
//!   | date | int `io.debezium.time.Date`, days, no logicalType (domain: date) |
//!   | time | long `io.debezium.time.MicroTime` (domain: time-micros) |
//!   | uuid | string `io.debezium.data.Uuid` (domain: logicalType uuid) |
//!   | json, jsonb | string `io.debezium.data.Json` |
//!   | enums | string `io.debezium.data.Enum` with `allowed` labels |
//!   | numeric(p,s), p > 38 | bytes decimal(p,s) (domain: string) |
//!   | numeric | record `io.debezium.data.VariableScaleDecimal {scale, value}` (domain: string) |
//!
//!   A consumer's deserializer turns a logicalType into a date or datetime
//!   object, and Debezium's `io.debezium.time.*` names into nothing: it gets
//!   the plain int, long or string. Publishing Avro logical types here
//!   would hand a Debezium consumer objects it does not expect.
//! - NOT NULL columns are required fields, nullable ones `["null", T]` with
//!   default `null`. `NaN`/`Infinity` numerics are `null` (Debezium's
//!   precise mode cannot carry them either).
//!
//! # What is left out or differs
//!
//! - `source.version` is `unilog-<version>`, not a Debezium release.
//! - `source.snapshot` is `"true"` for every snapshot row: no
//!   `first`/`last`/`*_in_data_collection` markers. `source.xmin` and
//!   `transaction` are always null (`provide.transaction.metadata=false`).
//! - `sequence` starts with the commit LSN of the change's own transaction;
//!   Debezium puts the last commit LSN it had processed. Both order changes
//!   the same way.
//! - Column defaults: Debezium copies a column's DEFAULT into the schema.
//!   unilog does not read defaults, and gives every required field its
//!   type's zero as Avro default instead, so that adding a NOT NULL column
//!   stays a compatible schema change. Key fields have no default, as in
//!   Debezium.
//! - `interval`, `money`, `bit`, `timetz`, `inet`, ranges, geometric and
//!   other types are strings with PostgreSQL's text form (Debezium:
//!   `MicroDuration`, decimal, `Bits`, `ZonedTime`, ... ; geometric types
//!   are structs). `timestamp(0..3)` and `time(0..3)` keep microseconds
//!   (Debezium's adaptive mode would switch to milliseconds).
//! - No `__debezium.oldkey`/`newkey` headers on key changes; the record
//!   headers are unilog's (`unilog.event_type`, `unilog.dedup_id`), the
//!   dedup id being the domain event's with `/d`, `/c` or `/tombstone`
//!   appended where one change gives several records.
//! - Columns: every column of the table but the mapping's `drop`, under its
//!   own name made a valid Avro name (Debezium's `field.name.adjustment.mode
//!   = avro`); the mapping's renames and `type: string` do not apply.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value as Json};

use super::avro::{
    write_bytes, write_long, write_value, AvroType, EncodeError, MAX_DECIMAL_PRECISION,
};
use super::spec::{sanitize_name, DebeziumSpec, LoadedMapping};
use super::{DomainEvent, MappingError};
use crate::event::{ChangeEvent, ColumnInfo, ColumnType, Op, Row, TableInfo, Value};

/// `source.version`.
pub const CONNECTOR_VERSION: &str = concat!("unilog-", env!("CARGO_PKG_VERSION"));

/// Debezium's `unavailable.value.placeholder`: an unchanged TOAST value.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// The values of `source.snapshot` (`io.debezium.data.Enum`).
const SNAPSHOT_ALLOWED: &str =
    "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental";

const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";

/// How a column is published in the Debezium record.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DzType {
    /// The same Avro type and value as in the domain event.
    Avro(AvroType),
    /// `int` with `connect.type: int16`.
    Int16,
    /// `long`, microseconds since the epoch, no time zone.
    MicroTimestamp,
    /// `string`, ISO 8601 in UTC.
    ZonedTimestamp,
    /// `int`, days since the epoch.
    Date,
    /// `long`, microseconds since midnight.
    MicroTime,
    Uuid,
    Json,
    /// Labels, comma-separated.
    Enum(String),
    /// `bytes` decimal beyond 38 digits.
    BigDecimal {
        precision: u32,
        scale: u32,
    },
    /// Record `{scale: int, value: bytes}`.
    VariableScaleDecimal,
    /// Items are nullable.
    Array(Box<DzType>),
}

impl DzType {
    fn for_column(ty: &ColumnType) -> DzType {
        match ty {
            ColumnType::Bool => DzType::Avro(AvroType::Boolean),
            ColumnType::Int16 => DzType::Int16,
            ColumnType::Int32 => DzType::Avro(AvroType::Int),
            ColumnType::Int64 => DzType::Avro(AvroType::Long),
            ColumnType::Float32 => DzType::Avro(AvroType::Float),
            ColumnType::Float64 => DzType::Avro(AvroType::Double),
            ColumnType::Numeric(Some((p, s))) if *p <= MAX_DECIMAL_PRECISION => {
                DzType::Avro(AvroType::Decimal {
                    precision: *p,
                    scale: *s,
                })
            }
            ColumnType::Numeric(Some((p, s))) => DzType::BigDecimal {
                precision: *p,
                scale: *s,
            },
            ColumnType::Numeric(None) => DzType::VariableScaleDecimal,
            ColumnType::Text
            | ColumnType::TextLike
            | ColumnType::ObjectId
            | ColumnType::Record(_)
            | ColumnType::Unsupported(_) => DzType::Avro(AvroType::String),
            ColumnType::Enum(labels) => DzType::Enum(labels.join(",")),
            ColumnType::Bytes => DzType::Avro(AvroType::Bytes),
            ColumnType::LocalTimestamp => DzType::MicroTimestamp,
            ColumnType::Timestamp => DzType::ZonedTimestamp,
            ColumnType::Date => DzType::Date,
            ColumnType::Time => DzType::MicroTime,
            ColumnType::Uuid => DzType::Uuid,
            // Debezium's `hstore.handling.mode: json`, its default.
            ColumnType::Json | ColumnType::Hstore => DzType::Json,
            // EWKB bytes (Debezium itself gives a {wkb, srid} struct).
            ColumnType::Geometry => DzType::Avro(AvroType::Bytes),
            ColumnType::Array(inner) => match **inner {
                // Published as their text form, like the domain event's `type: string`.
                ColumnType::Array(_) | ColumnType::Unsupported(_) => DzType::Avro(AvroType::String),
                _ => DzType::Array(Box::new(DzType::for_column(inner))),
            },
        }
    }

    /// The Avro schema JSON, as Confluent's converter writes Debezium's
    /// Connect schema. `named` holds the named types already defined.
    fn schema(&self, named: &mut HashSet<&'static str>) -> Json {
        let debezium =
            |ty: &str, name: &str| json!({"type": ty, "connect.version": 1, "connect.name": name});
        match self {
            DzType::Avro(AvroType::Decimal { precision, scale })
            | DzType::BigDecimal { precision, scale } => json!({
                "type": "bytes",
                "scale": scale,
                "precision": precision,
                "connect.version": 1,
                "connect.parameters": {"scale": scale.to_string(), "connect.decimal.precision": precision.to_string()},
                "connect.name": "org.apache.kafka.connect.data.Decimal",
                "logicalType": "decimal"
            }),
            DzType::Avro(t) => t.schema(),
            DzType::Int16 => json!({"type": "int", "connect.type": "int16"}),
            DzType::MicroTimestamp => debezium("long", "io.debezium.time.MicroTimestamp"),
            DzType::ZonedTimestamp => debezium("string", "io.debezium.time.ZonedTimestamp"),
            DzType::Date => debezium("int", "io.debezium.time.Date"),
            DzType::MicroTime => debezium("long", "io.debezium.time.MicroTime"),
            DzType::Uuid => debezium("string", "io.debezium.data.Uuid"),
            DzType::Json => debezium("string", "io.debezium.data.Json"),
            DzType::Enum(allowed) => json!({
                "type": "string",
                "connect.version": 1,
                "connect.parameters": {"allowed": allowed},
                "connect.name": "io.debezium.data.Enum"
            }),
            DzType::VariableScaleDecimal => {
                if named.insert(VARIABLE_SCALE_DECIMAL) {
                    json!({
                        "type": "record",
                        "name": "VariableScaleDecimal",
                        "namespace": "io.debezium.data",
                        "fields": [
                            {"name": "scale", "type": "int"},
                            {"name": "value", "type": "bytes"}
                        ],
                        "connect.doc": "Variable scaled decimal",
                        "connect.version": 1,
                        "connect.name": VARIABLE_SCALE_DECIMAL
                    })
                } else {
                    json!(VARIABLE_SCALE_DECIMAL)
                }
            }
            DzType::Array(inner) => {
                json!({"type": "array", "items": ["null", inner.schema(named)]})
            }
        }
    }

    /// The value a required field gets when the database sent none (a key-only
    /// old row): the type's zero, which is also Debezium's fallback.
    fn zero(&self) -> Value {
        match self {
            DzType::Avro(AvroType::Boolean) => Value::Bool(false),
            DzType::Avro(AvroType::Float | AvroType::Double) => Value::Float(0.0),
            DzType::Avro(AvroType::Bytes) => Value::Bytes(Vec::new()),
            DzType::Avro(AvroType::Decimal { .. })
            | DzType::BigDecimal { .. }
            | DzType::VariableScaleDecimal => Value::Numeric("0".into()),
            DzType::Avro(AvroType::LocalTimestampMicros) | DzType::MicroTimestamp => {
                Value::LocalTimestampMicros(0)
            }
            DzType::Avro(AvroType::TimestampMicros) | DzType::ZonedTimestamp => {
                Value::TimestampMicros(0)
            }
            DzType::Avro(AvroType::Date) | DzType::Date => Value::Date(0),
            DzType::Avro(AvroType::TimeMicros) | DzType::MicroTime => Value::TimeMicros(0),
            DzType::Avro(AvroType::Uuid) | DzType::Uuid => {
                Value::Uuid("00000000-0000-0000-0000-000000000000".into())
            }
            DzType::Avro(AvroType::Array(_)) | DzType::Array(_) => Value::Array(Vec::new()),
            DzType::Avro(AvroType::Int | AvroType::Long) | DzType::Int16 => Value::Int(0),
            DzType::Avro(AvroType::String | AvroType::Json | AvroType::Record { .. })
            | DzType::Json
            | DzType::Enum(_) => Value::Text(String::new()),
        }
    }

    /// [`Self::zero`] as an Avro field default.
    fn zero_default(&self) -> Json {
        match self {
            DzType::Avro(AvroType::Boolean) => json!(false),
            DzType::Avro(AvroType::Float | AvroType::Double) => json!(0.0),
            DzType::Avro(AvroType::Decimal { .. }) | DzType::BigDecimal { .. } => json!("\u{0}"),
            DzType::VariableScaleDecimal => json!({"scale": 0, "value": "\u{0}"}),
            DzType::Avro(AvroType::Array(_)) | DzType::Array(_) => json!([]),
            DzType::ZonedTimestamp => json!("1970-01-01T00:00:00Z"),
            DzType::Avro(AvroType::Uuid) | DzType::Uuid => {
                json!("00000000-0000-0000-0000-000000000000")
            }
            DzType::Avro(
                AvroType::Bytes | AvroType::String | AvroType::Json | AvroType::Record { .. },
            )
            | DzType::Json
            | DzType::Enum(_) => json!(""),
            DzType::Avro(
                AvroType::Int
                | AvroType::Long
                | AvroType::Date
                | AvroType::TimeMicros
                | AvroType::TimestampMicros
                | AvroType::LocalTimestampMicros,
            )
            | DzType::Int16
            | DzType::MicroTimestamp
            | DzType::Date
            | DzType::MicroTime => json!(0),
        }
    }

    /// What is written for `v`: `NaN`/`Infinity` numerics become null, an
    /// unchanged TOAST value Debezium's placeholder where the type is text
    /// or bytes (an error otherwise).
    fn prepare<'v>(&self, v: &'v Value) -> Result<Cow<'v, Value>, EncodeError> {
        Ok(match (self, v) {
            (
                DzType::Avro(AvroType::Decimal { .. })
                | DzType::BigDecimal { .. }
                | DzType::VariableScaleDecimal,
                Value::Numeric(s),
            ) if is_special_numeric(s) => Cow::Owned(Value::Null),
            (DzType::Avro(AvroType::String) | DzType::Json | DzType::Enum(_), Value::Unchanged) => {
                Cow::Owned(Value::Text(UNAVAILABLE_VALUE.into()))
            }
            (DzType::Avro(AvroType::Bytes), Value::Unchanged) => {
                Cow::Owned(Value::Bytes(UNAVAILABLE_VALUE.as_bytes().to_vec()))
            }
            (_, Value::Unchanged) => return Err(EncodeError::Unchanged),
            _ => Cow::Borrowed(v),
        })
    }

    /// Appends a non-null `v`.
    fn write(&self, buf: &mut Vec<u8>, v: &Value) -> Result<(), EncodeError> {
        let mismatch = || EncodeError::Mismatch {
            expected: format!("debezium {self:?}").to_lowercase(),
            value: "another kind of".into(),
        };
        match (self, v) {
            (DzType::Avro(t), _) => write_value(buf, t, v)?,
            (DzType::Int16, _) => write_value(buf, &AvroType::Int, v)?,
            (DzType::Uuid | DzType::Json | DzType::Enum(_), _) => {
                write_value(buf, &AvroType::String, v)?;
            }
            (DzType::MicroTimestamp, Value::LocalTimestampMicros(us))
            | (DzType::MicroTime, Value::TimeMicros(us)) => write_long(buf, *us),
            (DzType::Date, Value::Date(d)) => write_long(buf, i64::from(*d)),
            (DzType::ZonedTimestamp, Value::TimestampMicros(us)) => {
                write_bytes(buf, zoned_timestamp(*us).ok_or_else(mismatch)?.as_bytes());
            }
            (DzType::BigDecimal { precision, scale }, Value::Numeric(s)) => {
                let (_, bytes) = big_unscaled(s, Some(*scale))
                    .filter(|_| significant_digits_fit(s, *precision, *scale))
                    .ok_or_else(|| EncodeError::Decimal {
                        value: s.chars().count().to_string(),
                        precision: *precision,
                        scale: *scale,
                    })?;
                write_bytes(buf, &bytes);
            }
            (DzType::VariableScaleDecimal, Value::Numeric(s)) => {
                let (scale, bytes) = big_unscaled(s, None).ok_or_else(mismatch)?;
                write_long(buf, i64::from(scale));
                write_bytes(buf, &bytes);
            }
            (DzType::Array(inner), Value::Array(items)) => {
                if !items.is_empty() {
                    write_long(buf, i64::try_from(items.len()).unwrap_or(i64::MAX));
                    for item in items {
                        let item = inner.prepare(item)?;
                        if matches!(*item, Value::Null) {
                            buf.push(0);
                        } else {
                            buf.push(2);
                            inner.write(buf, &item)?;
                        }
                    }
                }
                buf.push(0);
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }
}

/// `NaN`, `Infinity`, `-Infinity`: numerics no decimal can hold.
fn is_special_numeric(s: &str) -> bool {
    matches!(s.trim(), "NaN" | "Infinity" | "-Infinity" | "+Infinity")
}

/// Whether a numeric's integer digits fit `precision - scale`.
fn significant_digits_fit(s: &str, precision: u32, scale: u32) -> bool {
    let digits = s.trim().trim_start_matches(['-', '+']);
    let int = digits.split_once('.').map_or(digits, |(i, _)| i);
    let int_digits = int.trim_start_matches('0').len();
    u32::try_from(int_digits).is_ok_and(|n| n + scale <= precision)
}

/// Java's `ISO_OFFSET_DATE_TIME` of an instant in UTC, which is what
/// Debezium's `ZonedTimestamp` holds: the fraction as short as possible.
fn zoned_timestamp(us: i64) -> Option<String> {
    let dt = chrono::DateTime::from_timestamp_micros(us)?;
    let mut s = dt.format("%Y-%m-%dT%H:%M:%S").to_string();
    let frac = us.rem_euclid(1_000_000);
    if frac != 0 {
        let digits = format!("{frac:06}");
        s.push('.');
        s.push_str(digits.trim_end_matches('0'));
    }
    s.push('Z');
    Some(s)
}

/// A numeric's text as (scale, unscaled value in minimal big-endian two's
/// complement), at `scale` (the text's own when `None`). Any number of
/// digits. `None` for what is not a plain decimal number or has nonzero
/// digits beyond `scale`.
fn big_unscaled(s: &str, scale: Option<u32>) -> Option<(u32, Vec<u8>)> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let scale = match scale {
        Some(s) => s,
        None => u32::try_from(frac.len()).ok()?,
    };
    let keep = usize::try_from(scale).ok()?;
    let (kept, extra) = frac.split_at(frac.len().min(keep));
    if extra.bytes().any(|b| b != b'0') {
        return None;
    }
    // Magnitude, little-endian base 256.
    let mut mag: Vec<u8> = Vec::with_capacity(digits.len() / 2 + 1);
    let pad = std::iter::repeat_n(b'0', keep - kept.len());
    for d in int.bytes().chain(kept.bytes()).chain(pad) {
        let mut carry = u32::from(d - b'0');
        for limb in &mut mag {
            let x = u32::from(*limb) * 10 + carry;
            *limb = x.to_le_bytes()[0];
            carry = x >> 8;
        }
        while carry > 0 {
            mag.push(carry.to_le_bytes()[0]);
            carry >>= 8;
        }
    }
    while mag.last() == Some(&0) {
        mag.pop();
    }
    if mag.is_empty() {
        return Some((scale, vec![0]));
    }
    // Room for the sign bit.
    if mag.last().is_some_and(|b| b & 0x80 != 0) {
        mag.push(0);
    }
    if neg {
        let mut carry = true;
        for limb in &mut mag {
            let (v, c) = (!*limb).overflowing_add(u8::from(carry));
            *limb = v;
            carry = c;
        }
        // Drop redundant sign bytes.
        while mag.len() > 1 && mag[mag.len() - 1] == 0xff && mag[mag.len() - 2] & 0x80 != 0 {
            mag.pop();
        }
    }
    mag.reverse();
    Some((scale, mag))
}

/// One published column.
#[derive(Clone, Debug)]
struct DzColumn {
    column: String,
    field: String,
    ty: DzType,
    /// NOT NULL in the database: a required Avro field.
    required: bool,
}

impl DzColumn {
    fn new(c: &ColumnInfo) -> DzColumn {
        DzColumn {
            column: c.name.clone(),
            field: sanitize_name(&c.name),
            ty: DzType::for_column(&c.ty),
            required: !c.nullable,
        }
    }

    /// The field's schema. A required value field gets its type's zero as
    /// default (so adding a NOT NULL column stays compatible); key fields,
    /// like Debezium's, have none.
    fn schema(&self, named: &mut HashSet<&'static str>, in_key: bool) -> Json {
        let ty = self.ty.schema(named);
        if self.required && in_key {
            json!({"name": self.field, "type": ty})
        } else if self.required {
            json!({"name": self.field, "type": ty, "default": self.ty.zero_default()})
        } else {
            json!({"name": self.field, "type": ["null", ty], "default": null})
        }
    }

    /// Appends the field for `v` (required fields get their zero for null).
    fn write(&self, buf: &mut Vec<u8>, v: &Value) -> Result<(), EncodeError> {
        let v = self.ty.prepare(v)?;
        match (self.required, matches!(*v, Value::Null)) {
            (true, true) => self.ty.write(buf, &self.ty.zero()),
            (true, false) => self.ty.write(buf, &v),
            (false, true) => {
                buf.push(0);
                Ok(())
            }
            (false, false) => {
                buf.push(2);
                self.ty.write(buf, &v)
            }
        }
    }
}

/// Column positions in one version of the table.
struct Positions {
    table: Arc<TableInfo>,
    columns: Vec<usize>,
    key: Vec<usize>,
}

/// The compiled `debezium:` option of one mapping.
pub(super) struct DebeziumRule {
    pub(super) topic: Arc<str>,
    pub(super) value_subject: String,
    pub(super) key_subject: String,
    pub(super) value_schema: String,
    pub(super) key_schema: String,
    pub(super) value_schema_id: Option<u32>,
    pub(super) key_schema_id: Option<u32>,
    table: String,
    server_name: String,
    tombstones: bool,
    columns: Vec<DzColumn>,
    key: Vec<DzColumn>,
    positions: Option<Positions>,
}

/// Debezium's default topic: `<server>.<schema>.<table>`, with characters a
/// topic cannot have replaced by `_`.
fn default_topic(server_name: &str, table: &TableInfo) -> String {
    format!("{server_name}.{}.{}", table.schema, table.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl DebeziumRule {
    /// Derives the key and value schemas for `table` (every column but the
    /// mapping's `drop`). Refuses a key column that is dropped and two
    /// columns with the same Avro name.
    pub(super) fn compile(
        m: &LoadedMapping,
        spec: &DebeziumSpec,
        table: &TableInfo,
        key_columns: &[String],
    ) -> Result<DebeziumRule, MappingError> {
        let q = table.qualified();
        let drop = &m.spec.drop;
        let mut key = Vec::with_capacity(key_columns.len());
        for k in key_columns {
            if drop.contains(k) {
                return Err(m
                    .err(
                        "debezium",
                        format!("key column `{k}` of {q} is in `drop`, but the Debezium record's message key is made of the key columns; keep it or name another key with `key:`"),
                    )
                    .into());
            }
            if let Some(c) = table.columns.iter().find(|c| &c.name == k) {
                key.push(DzColumn::new(c));
            }
        }
        let columns: Vec<DzColumn> = table
            .columns
            .iter()
            .filter(|c| !drop.contains(&c.name))
            .map(DzColumn::new)
            .collect();
        let mut seen = HashSet::new();
        for c in &columns {
            if !seen.insert(c.field.as_str()) {
                return Err(m
                    .err(
                        "debezium",
                        format!("two columns of {q} have the Avro field name `{}` in the Debezium record; drop one", c.field),
                    )
                    .into());
            }
        }
        let namespace = format!(
            "{}.{}.{}",
            spec.server_name
                .split('.')
                .map(sanitize_name)
                .collect::<Vec<_>>()
                .join("."),
            sanitize_name(&table.schema),
            sanitize_name(&table.name)
        );
        let topic = spec
            .topic
            .clone()
            .unwrap_or_else(|| default_topic(&spec.server_name, table));
        let mut named = HashSet::new();
        let value_fields: Vec<Json> = columns
            .iter()
            .map(|c| c.schema(&mut named, false))
            .collect();
        let value_schema = envelope_schema(&namespace, value_fields).to_string();
        let mut named = HashSet::new();
        let key_fields: Vec<Json> = key.iter().map(|c| c.schema(&mut named, true)).collect();
        let key_schema = json!({
            "type": "record",
            "name": "Key",
            "namespace": namespace,
            "fields": key_fields,
            "connect.name": format!("{namespace}.Key")
        })
        .to_string();
        Ok(DebeziumRule {
            value_subject: format!("{topic}-value"),
            key_subject: format!("{topic}-key"),
            topic: Arc::from(topic),
            value_schema,
            key_schema,
            value_schema_id: None,
            key_schema_id: None,
            table: q,
            server_name: spec.server_name.clone(),
            tombstones: spec.tombstones,
            columns,
            key,
            positions: None,
        })
    }

    /// Finds the columns in `table` (again when the table changed).
    fn refresh_positions(&mut self, table: &Arc<TableInfo>) -> Result<(), MappingError> {
        if !self
            .positions
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.table, table))
        {
            let find = |c: &DzColumn| {
                table.column_index(&c.column).ok_or_else(|| MappingError::Drift {
                    table: self.table.clone(),
                    message: format!(
                        "column `{}` is published in the Debezium record but the table no longer has it; restart unilog to derive the schema again",
                        c.column
                    ),
                })
            };
            let columns = self.columns.iter().map(find).collect::<Result<_, _>>()?;
            let key = self.key.iter().map(find).collect::<Result<_, _>>()?;
            self.positions = Some(Positions {
                table: table.clone(),
                columns,
                key,
            });
        }
        Ok(())
    }

    /// The Debezium records of one change, given its domain event `domain`
    /// (whose dedup id and event type they share).
    pub(super) fn map(
        &mut self,
        ev: &ChangeEvent,
        domain: &DomainEvent,
    ) -> Result<Vec<DomainEvent>, MappingError> {
        let (Some(value_id), Some(key_id)) = (self.value_schema_id, self.key_schema_id) else {
            return Err(MappingError::Drift {
                table: self.table.clone(),
                message:
                    "the Debezium schemas were not registered before mapping (internal order error)"
                        .into(),
            });
        };
        let now_us = chrono::Utc::now().timestamp_micros();
        self.refresh_positions(&ev.table)?;
        let Some(pos) = self.positions.as_ref() else {
            return Ok(Vec::new());
        };
        let key_text = domain
            .key
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let enc = Encoder {
            rule: self,
            pos,
            ev,
            key_text: &key_text,
            value_id,
            key_id,
            now_us,
        };
        let record = |key: Option<Vec<u8>>, payload: Option<Vec<u8>>, suffix: &str| DomainEvent {
            topic: self.topic.clone(),
            key,
            dedup_id: format!("{}{suffix}", domain.dedup_id),
            event_type: domain.event_type.clone(),
            schema_id: value_id,
            payload,
        };
        let mut out = Vec::with_capacity(2);
        match ev.op {
            Op::Truncate => {
                out.push(record(None, Some(enc.value("t", None, None)?), ""));
            }
            Op::Delete => {
                let before = ev.before.as_ref();
                let key = enc.key(before, "delete")?;
                out.push(record(
                    Some(key.clone()),
                    Some(enc.value("d", before, None)?),
                    "",
                ));
                if self.tombstones {
                    out.push(record(Some(key), None, "/tombstone"));
                }
            }
            Op::Update => {
                let (before, after) = (ev.before.as_ref(), ev.after.as_ref());
                let new_key = enc.key(after, "update")?;
                // An old row without the key (another replica identity
                // index) cannot show a key change.
                let old_key = before.and_then(|_| enc.key(before, "update").ok());
                match old_key {
                    // The key changed: Debezium's delete + tombstone + create.
                    Some(old) if old != new_key => {
                        out.push(record(
                            Some(old.clone()),
                            Some(enc.value("d", before, None)?),
                            "/d",
                        ));
                        if self.tombstones {
                            out.push(record(Some(old), None, "/tombstone"));
                        }
                        out.push(record(
                            Some(new_key),
                            Some(enc.value("c", None, after)?),
                            "/c",
                        ));
                    }
                    _ => out.push(record(
                        Some(new_key),
                        Some(enc.value("u", before, after)?),
                        "",
                    )),
                }
            }
            Op::Insert | Op::Snapshot => {
                let after = ev.after.as_ref();
                let op = if ev.op == Op::Snapshot { "r" } else { "c" };
                out.push(record(
                    Some(enc.key(after, ev.op.as_str())?),
                    Some(enc.value(op, None, after)?),
                    "",
                ));
            }
        }
        Ok(out)
    }
}

/// Encodes the records of one change.
struct Encoder<'a> {
    rule: &'a DebeziumRule,
    pos: &'a Positions,
    ev: &'a ChangeEvent,
    /// The domain event's key, for error messages.
    key_text: &'a str,
    value_id: u32,
    key_id: u32,
    now_us: i64,
}

impl Encoder<'_> {
    fn encode_err(&self, column: &str, source: EncodeError) -> MappingError {
        MappingError::Encode {
            table: self.rule.table.clone(),
            column: column.to_string(),
            key: self.key_text.to_string(),
            source,
        }
    }

    /// The framed key record from `row`.
    fn key(&self, row: Option<&Row>, op: &'static str) -> Result<Vec<u8>, MappingError> {
        let mut buf = Vec::with_capacity(16);
        buf.push(0);
        buf.extend_from_slice(&self.key_id.to_be_bytes());
        for (c, &idx) in self.rule.key.iter().zip(&self.pos.key) {
            let v = row.and_then(|r| r.get(idx)).unwrap_or(&Value::Null);
            if c.required && matches!(v, Value::Null | Value::Unchanged) {
                return Err(MappingError::MissingKey {
                    table: self.rule.table.clone(),
                    op,
                    column: c.column.clone(),
                });
            }
            c.write(&mut buf, v)
                .map_err(|e| self.encode_err(&c.column, e))?;
        }
        Ok(buf)
    }

    /// The framed `Envelope` record.
    fn value(
        &self,
        op: &str,
        before: Option<&Row>,
        after: Option<&Row>,
    ) -> Result<Vec<u8>, MappingError> {
        let ev = self.ev;
        let mut buf = Vec::with_capacity(256);
        buf.push(0);
        buf.extend_from_slice(&self.value_id.to_be_bytes());
        for row in [before, after] {
            match row {
                None => buf.push(0),
                Some(row) => {
                    buf.push(2);
                    for (c, &idx) in self.rule.columns.iter().zip(&self.pos.columns) {
                        let v = row.get(idx).unwrap_or(&Value::Null);
                        c.write(&mut buf, v)
                            .map_err(|e| self.encode_err(&c.column, e))?;
                    }
                }
            }
        }
        // source
        let ts_us = ev.meta.commit_time_micros.unwrap_or(self.now_us);
        let snapshot = ev.op == Op::Snapshot;
        write_bytes(&mut buf, CONNECTOR_VERSION.as_bytes());
        write_bytes(&mut buf, b"postgresql");
        write_bytes(&mut buf, self.rule.server_name.as_bytes());
        write_long(&mut buf, ts_us.div_euclid(1000));
        buf.push(0); // the enum string is the union's first branch
        write_bytes(&mut buf, if snapshot { b"true" } else { b"false" });
        write_bytes(&mut buf, ev.table.database.as_bytes());
        let sequence = if snapshot {
            format!("[null,\"{}\"]", ev.meta.lsn.0)
        } else {
            format!("[\"{}\",\"{}\"]", ev.seq.commit.0, ev.meta.lsn.0)
        };
        write_optional_bytes(&mut buf, Some(sequence.as_bytes()));
        write_optional_long(&mut buf, Some(ts_us));
        write_optional_long(&mut buf, Some(ts_us.saturating_mul(1000)));
        // Debezium names the table a row lives in: an inheritance child's.
        let (schema, name) = match &ev.meta.relation {
            Some(r) => (r.0.as_str(), r.1.as_str()),
            None => (ev.table.schema.as_str(), ev.table.name.as_str()),
        };
        write_bytes(&mut buf, schema.as_bytes());
        write_bytes(&mut buf, name.as_bytes());
        write_optional_long(&mut buf, ev.meta.xid.map(i64::from));
        write_optional_long(
            &mut buf,
            Some(i64::try_from(ev.meta.lsn.0).unwrap_or(i64::MAX)),
        );
        write_optional_long(&mut buf, None); // xmin
                                             // transaction
        buf.push(0);
        write_bytes(&mut buf, op.as_bytes());
        write_optional_long(&mut buf, Some(self.now_us.div_euclid(1000)));
        write_optional_long(&mut buf, Some(self.now_us));
        write_optional_long(&mut buf, Some(self.now_us.saturating_mul(1000)));
        Ok(buf)
    }
}

/// `["null", "long"]`.
fn write_optional_long(buf: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => buf.push(0),
        Some(v) => {
            buf.push(2);
            write_long(buf, v);
        }
    }
}

/// `["null", "string"]`.
fn write_optional_bytes(buf: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => buf.push(0),
        Some(v) => {
            buf.push(2);
            write_bytes(buf, v);
        }
    }
}

/// Debezium's envelope around the `Value` record with `value_fields`.
fn envelope_schema(namespace: &str, value_fields: Vec<Json>) -> Json {
    let optional_long = || json!(["null", "long"]);
    json!({
        "type": "record",
        "name": "Envelope",
        "namespace": namespace,
        "fields": [
            {"name": "before", "type": ["null", {
                "type": "record",
                "name": "Value",
                "fields": value_fields,
                "connect.name": format!("{namespace}.Value")
            }], "default": null},
            {"name": "after", "type": ["null", "Value"], "default": null},
            {"name": "source", "type": {
                "type": "record",
                "name": "Source",
                "namespace": "io.debezium.connector.postgresql",
                "fields": [
                    {"name": "version", "type": "string"},
                    {"name": "connector", "type": "string"},
                    {"name": "name", "type": "string"},
                    {"name": "ts_ms", "type": "long"},
                    {"name": "snapshot", "type": [{
                        "type": "string",
                        "connect.version": 1,
                        "connect.parameters": {"allowed": SNAPSHOT_ALLOWED},
                        "connect.default": "false",
                        "connect.name": "io.debezium.data.Enum"
                    }, "null"], "default": "false"},
                    {"name": "db", "type": "string"},
                    {"name": "sequence", "type": ["null", "string"], "default": null},
                    {"name": "ts_us", "type": optional_long(), "default": null},
                    {"name": "ts_ns", "type": optional_long(), "default": null},
                    {"name": "schema", "type": "string"},
                    {"name": "table", "type": "string"},
                    {"name": "txId", "type": optional_long(), "default": null},
                    {"name": "lsn", "type": optional_long(), "default": null},
                    {"name": "xmin", "type": optional_long(), "default": null}
                ],
                "connect.name": "io.debezium.connector.postgresql.Source"
            }},
            {"name": "transaction", "type": ["null", {
                "type": "record",
                "name": "block",
                "namespace": "event",
                "fields": [
                    {"name": "id", "type": "string"},
                    {"name": "total_order", "type": "long"},
                    {"name": "data_collection_order", "type": "long"}
                ],
                "connect.version": 1,
                "connect.name": "event.block"
            }], "default": null},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": optional_long(), "default": null},
            {"name": "ts_us", "type": optional_long(), "default": null},
            {"name": "ts_ns", "type": optional_long(), "default": null}
        ],
        "connect.version": 2,
        "connect.name": format!("{namespace}.Envelope")
    })
}

#[cfg(test)]
mod tests;
