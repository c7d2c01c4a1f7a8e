//! What a source emits: [`ChangeEvent`], a row or document change with the
//! position it came from, before it has any domain meaning.
//!
//! Every event carries a [`SeqKey`] that orders it totally within its source
//! (Postgres: commit LSN, then its ordinal inside the transaction). The key
//! is also what makes a dedup id stable: the same change, delivered twice
//! after a restart, gets the same `SeqKey` and so the same id.

use std::fmt;
use std::sync::Arc;

/// A PostgreSQL log sequence number. Displayed as `XXXXXXXX/XXXXXXXX`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not an LSN (expected XXXXXXXX/XXXXXXXX)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("'{s}' is not an LSN: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("'{s}' is not an LSN: {e}"))?;
        if hi > u64::from(u32::MAX) || lo > u64::from(u32::MAX) {
            return Err(format!("'{s}' is not an LSN: part out of range"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

/// Total order of events within one source.
///
/// Snapshot rows sort before every streamed change of the same slot: they
/// carry the slot's consistent point as `commit` and `snapshot = true`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqKey {
    /// Commit LSN of the transaction (or the snapshot's consistent point).
    pub commit: Lsn,
    /// Position of the change inside its transaction (or snapshot), from 0.
    pub ordinal: u64,
}

/// The kind of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A row that existed when the initial snapshot was taken.
    Snapshot,
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    /// The lowercase name used in config files and in published events.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// A decoded column value, independent of where it came from.
///
/// Temporal values are kept as integers in the units Avro uses, so mapping
/// them is a move and not a conversion.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// `numeric`, exactly as the database printed it (`-12.3400`, `NaN`).
    Numeric(String),
    Text(String),
    Bytes(Vec<u8>),
    /// `timestamp without time zone`, microseconds since 1970-01-01 00:00.
    LocalTimestampMicros(i64),
    /// `timestamp with time zone`, microseconds since the Unix epoch (UTC).
    TimestampMicros(i64),
    /// `date`, days since 1970-01-01.
    Date(i32),
    /// `time`, microseconds since midnight.
    TimeMicros(i64),
    /// `uuid` in its canonical lowercase text form.
    Uuid(String),
    /// `json` / `jsonb` text.
    Json(String),
    Array(Vec<Value>),
    /// A nested document, values in the order of its declared fields.
    Record(Vec<Value>),
    /// A TOASTed value the database did not send because it did not change.
    Unchanged,
    /// A value the source could not parse (the reason, without the value).
    /// Publishing its column fails, and the change goes to the dead-letter
    /// topic; a dropped column with such a value does not matter.
    Invalid(String),
}

/// One row: values in the order of [`TableInfo::columns`].
pub type Row = Vec<Value>;

/// What a value's column is, as far as mapping needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// `numeric(precision, scale)`; `None` when unconstrained.
    Numeric(Option<(u32, u32)>),
    Text,
    Bytes,
    LocalTimestamp,
    Timestamp,
    Date,
    Time,
    Uuid,
    Json,
    /// A user-defined enum, with its labels in sort order.
    Enum(Vec<String>),
    /// Types published as their text form (`interval`, `inet`, `money`, ...).
    TextLike,
    Array(Box<ColumnType>),
    /// A MongoDB ObjectId, published as its hex text.
    ObjectId,
    /// A nested record: a MongoDB document with declared fields, or a
    /// PostgreSQL composite type with its attributes.
    Record(Vec<ColumnInfo>),
    /// `hstore`, published as a JSON object of strings.
    Hstore,
    /// A PostGIS `geometry` or `geography`, published as EWKB bytes.
    Geometry,
    /// A type unilog cannot publish (its database name); the column must be
    /// dropped in the mapping. Values arrive as their text form.
    Unsupported(String),
}

/// A column of a source table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// The database's own name for the type, for messages (`character varying(80)`).
    pub type_name: String,
    pub ty: ColumnType,
    pub nullable: bool,
    /// Part of the table's primary key (or replica identity).
    pub key: bool,
}

/// Which kind of database a table lives in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SourceKind {
    #[default]
    Postgres,
    /// A MongoDB collection: `schema` is the database, `name` the
    /// collection, and the columns are the fields its mapping declares.
    Mongo,
}

impl SourceKind {
    /// The connector name published in every event's `source`.
    pub fn connector(self) -> &'static str {
        match self {
            SourceKind::Postgres => "postgresql",
            SourceKind::Mongo => "mongodb",
        }
    }
}

/// A source table (or collection) and its columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub kind: SourceKind,
    pub database: String,
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnInfo>,
}

impl TableInfo {
    /// `schema.table`, as written in mappings.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Index of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// `schema.table` of a PostgreSQL relation, as mappings and messages write
/// it: the catalog's names as they are, joined by a dot (no quoting, no
/// case folding).
pub fn pg_qualified(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}

/// Where a change came from, published with every event.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceMeta {
    /// The LSN of the change itself (for snapshot rows, the consistent point).
    pub lsn: Lsn,
    /// Transaction id; `None` for snapshot rows.
    pub xid: Option<u32>,
    /// Commit time, microseconds since the Unix epoch; `None` for snapshot rows.
    pub commit_time_micros: Option<i64>,
    /// The table the row lives in, (schema, name), when it is not the
    /// mapped table itself: an inheritance child of a mapped parent.
    pub relation: Option<Arc<(String, String)>>,
}

/// A row change as a source saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeEvent {
    pub table: Arc<TableInfo>,
    pub op: Op,
    pub seq: SeqKey,
    pub meta: SourceMeta,
    /// The old row, where the database sends it (key columns only under the
    /// default replica identity; the whole row under `REPLICA IDENTITY FULL`).
    pub before: Option<Row>,
    /// The new row; `None` for deletes and truncates.
    pub after: Option<Row>,
    /// A stable id of the change given by the source, when its position is
    /// not an LSN (MongoDB: the resume token or oplog time and index). The
    /// dedup id is built from it.
    pub id: Option<Arc<str>>,
    /// The fields an update changed (dotted paths), where the source says
    /// so (MongoDB updates); `None` otherwise.
    pub changed: Option<Vec<String>>,
}

/// A position a source can be acknowledged up to: everything at or before it
/// has been delivered downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub Lsn);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
        assert!("1/zz".parse::<Lsn>().is_err());
    }

    #[test]
    fn seq_keys_order_by_commit_then_ordinal() {
        let a = SeqKey {
            commit: Lsn(10),
            ordinal: 5,
        };
        let b = SeqKey {
            commit: Lsn(10),
            ordinal: 6,
        };
        let c = SeqKey {
            commit: Lsn(11),
            ordinal: 0,
        };
        assert!(a < b && b < c);
    }
}
