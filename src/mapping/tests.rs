//! YAML mapping in, Avro out: the encoder's bytes are decoded with
//! `apache-avro` against the derived schema.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;

use super::*;
use crate::event::{ColumnInfo, ColumnType, Lsn, SeqKey, SourceKind, SourceMeta};

fn col(name: &str, ty: ColumnType, key: bool) -> ColumnInfo {
    ColumnInfo {
        name: name.into(),
        type_name: format!("{ty:?}").to_lowercase(),
        ty,
        nullable: !key,
        key,
    }
}

fn users() -> Arc<TableInfo> {
    Arc::new(TableInfo {
        kind: SourceKind::Postgres,
        database: "legacy".into(),
        schema: "public".into(),
        name: "users".into(),
        columns: vec![
            col("id", ColumnType::Int64, true),
            col("email", ColumnType::Text, false),
            col("password_digest", ColumnType::Text, false),
            col("balance", ColumnType::Numeric(Some((10, 2))), false),
            col("created_at", ColumnType::Timestamp, false),
            col("tags", ColumnType::Array(Box::new(ColumnType::Text)), false),
            col("admin", ColumnType::Bool, false),
            col("geo", ColumnType::Unsupported("point".into()), false),
        ],
    })
}

fn mapping(text: &str) -> LoadedMapping {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("users.yaml");
    std::fs::write(&p, text).unwrap();
    LoadedMapping::load(&p).unwrap()
}

fn mapper(text: &str) -> Result<Mapper, MappingError> {
    let mut tables = HashMap::new();
    tables.insert("public.users".to_string(), users());
    Mapper::new(&[mapping(text)], &tables)
}

const YAML: &str = "table: users\ntopic: legacy.users\nevents:\n  insert: UserRegistered\n  update: UserUpdated\n  delete: UserDeleted\n  truncate: UsersTruncated\ncolumns:\n  id: user_id\n  email:\n  balance:\n  created_at: { as: registered_at }\n  tags:\n  admin: { type: string }\n  geo: { type: string }\n";

fn row() -> Vec<Value> {
    vec![
        Value::Int(42),
        Value::Text("a@example.com".into()),
        Value::Text("secret".into()),
        Value::Numeric("12.50".into()),
        Value::TimestampMicros(1_700_000_000_000_000),
        Value::Array(vec![Value::Text("x".into()), Value::Null]),
        Value::Bool(true),
        Value::Text("(1,2)".into()),
    ]
}

fn event(op: Op, before: Option<Vec<Value>>, after: Option<Vec<Value>>) -> ChangeEvent {
    ChangeEvent {
        id: None,
        changed: None,
        table: users(),
        op,
        seq: SeqKey {
            commit: Lsn(0x1_0000_0010),
            ordinal: 3,
        },
        meta: SourceMeta {
            lsn: Lsn(0x1_0000_0008),
            xid: Some(777),
            commit_time_micros: Some(1_700_000_000_000_001),
            relation: None,
        },
        before,
        after,
    }
}

fn decode(m: &Mapper, d: &DomainEvent) -> Vec<(String, Avro)> {
    let (_, schema_text) = &m.schemas()[0];
    let schema = Schema::parse_str(schema_text).unwrap();
    decode_framed(
        &schema,
        d.payload.as_deref().expect("not a tombstone"),
        d.schema_id,
    )
}

/// Decodes a Confluent-framed record against `schema`, checking the frame.
pub(crate) fn decode_framed(schema: &Schema, framed: &[u8], id: u32) -> Vec<(String, Avro)> {
    assert_eq!(framed[0], 0, "magic byte");
    assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()), id);
    let mut body = &framed[5..];
    let v = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_value(&mut body)
        .unwrap();
    assert!(body.is_empty(), "trailing bytes after the record");
    match v {
        Avro::Record(fields) => fields,
        other => panic!("not a record: {other:?}"),
    }
}

/// A record's field by name.
pub(crate) fn field<'a>(rec: &'a [(String, Avro)], name: &str) -> &'a Avro {
    &rec.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1
}

#[test]
fn insert_becomes_a_decodable_domain_event() {
    let mut m = mapper(YAML).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(7);
    let d = m
        .map(&event(Op::Insert, None, Some(row())))
        .unwrap()
        .unwrap();
    assert_eq!(&*d.topic, "legacy.users");
    assert_eq!(d.key.as_deref(), Some(&b"42"[..]));
    assert_eq!(&*d.event_type, "UserRegistered");
    assert_eq!(d.dedup_id, "pg/legacy/1/10/3");
    let rec = decode(&m, &d);
    assert_eq!(
        field(&rec, "event_type"),
        &Avro::String("UserRegistered".into())
    );
    assert_eq!(field(&rec, "op"), &Avro::String("insert".into()));
    assert_eq!(field(&rec, "key"), &Avro::String("42".into()));
    assert_eq!(field(&rec, "before"), &Avro::Union(0, Box::new(Avro::Null)));
    let Avro::Union(1, after) = field(&rec, "after") else {
        panic!("after is null")
    };
    let Avro::Record(after) = &**after else {
        panic!()
    };
    let names: Vec<&str> = after.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "user_id",
            "email",
            "balance",
            "registered_at",
            "tags",
            "admin",
            "geo"
        ]
    );
    assert_eq!(
        field(after, "user_id"),
        &Avro::Union(1, Box::new(Avro::Long(42)))
    );
    assert_eq!(
        field(after, "email"),
        &Avro::Union(1, Box::new(Avro::String("a@example.com".into())))
    );
    let Avro::Union(1, bal) = field(after, "balance") else {
        panic!()
    };
    assert_eq!(
        **bal,
        Avro::Decimal(apache_avro::Decimal::from(vec![0x04, 0xe2]))
    );
    assert_eq!(
        field(after, "registered_at"),
        &Avro::Union(1, Box::new(Avro::TimestampMicros(1_700_000_000_000_000)))
    );
    assert_eq!(
        field(after, "tags"),
        &Avro::Union(
            1,
            Box::new(Avro::Array(vec![
                Avro::Union(1, Box::new(Avro::String("x".into()))),
                Avro::Union(0, Box::new(Avro::Null))
            ]))
        )
    );
    assert_eq!(
        field(after, "admin"),
        &Avro::Union(1, Box::new(Avro::String("true".into())))
    );
    let Avro::Record(source) = field(&rec, "source") else {
        panic!()
    };
    assert_eq!(field(source, "table"), &Avro::String("users".into()));
    assert_eq!(field(source, "lsn"), &Avro::Long(0x1_0000_0008));
    assert_eq!(
        field(source, "xid"),
        &Avro::Union(1, Box::new(Avro::Long(777)))
    );
    assert_eq!(field(source, "snapshot"), &Avro::Boolean(false));
    // The password never appears.
    assert!(!d.payload.unwrap().windows(6).any(|w| w == b"secret"));
}

#[test]
fn delete_with_key_only_before_uses_the_old_key() {
    let mut m = mapper(YAML).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(1);
    let mut before = vec![Value::Null; 8];
    before[0] = Value::Int(9);
    let d = m
        .map(&event(Op::Delete, Some(before), None))
        .unwrap()
        .unwrap();
    assert_eq!(d.key.as_deref(), Some(&b"9"[..]));
    let rec = decode(&m, &d);
    assert_eq!(
        field(&rec, "event_type"),
        &Avro::String("UserDeleted".into())
    );
    assert_eq!(field(&rec, "after"), &Avro::Union(0, Box::new(Avro::Null)));
}

#[test]
fn snapshot_defaults_to_the_insert_name_and_has_its_own_dedup_id() {
    let mut m = mapper(YAML).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(1);
    let d = m
        .map(&event(Op::Snapshot, None, Some(row())))
        .unwrap()
        .unwrap();
    assert_eq!(&*d.event_type, "UserRegistered");
    assert_eq!(d.dedup_id, "pg/legacy/1/10/s3");
    let rec = decode(&m, &d);
    let Avro::Record(source) = field(&rec, "source") else {
        panic!()
    };
    assert_eq!(field(source, "snapshot"), &Avro::Boolean(true));
}

#[test]
fn same_change_gives_the_same_dedup_id() {
    let mut m = mapper(YAML).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(1);
    let a = m
        .map(&event(Op::Update, None, Some(row())))
        .unwrap()
        .unwrap();
    let b = m
        .map(&event(Op::Update, None, Some(row())))
        .unwrap()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn unchanged_toast_is_refused_with_advice() {
    let mut m = mapper(YAML).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(1);
    let mut r = row();
    r[1] = Value::Unchanged;
    let err = m
        .map(&event(Op::Update, None, Some(r)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column `email`") && err.contains("REPLICA IDENTITY FULL"),
        "{err}"
    );
}

#[test]
fn missing_column_is_named_with_file_line_and_alternatives() {
    let Err(err) = mapper(&YAML.replace("  email:\n", "  emial:\n")) else {
        panic!("accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("users.yaml:10: field `columns.emial`")
            && err.contains("has no column `emial`")
            && err.contains("email"),
        "{err}"
    );
}

#[test]
fn unsupported_type_is_refused_unless_dropped_or_text() {
    let Err(err) = mapper(&YAML.replace("  geo: { type: string }\n", "  geo:\n")) else {
        panic!("accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("column `geo`") && err.contains("`point`") && err.contains("drop: [geo]"),
        "{err}"
    );
}

#[test]
fn all_columns_minus_drop_by_default() {
    let text = "table: users\ntopic: t\nevents: {insert: A, update: B, delete: C}\ndrop: [password_digest, geo]\n";
    let m = mapper(text).unwrap();
    let schema = &m.schemas()[0].1;
    assert!(!schema.contains("password_digest") && schema.contains("\"created_at\""));
    Schema::parse_str(schema).unwrap();
}

#[test]
fn truncate_without_event_name_is_skipped() {
    let text = "table: users\ntopic: t\nevents: {insert: A, update: B, delete: C}\ndrop: [geo]\n";
    let mut m = mapper(text).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(1);
    assert!(m.map(&event(Op::Truncate, None, None)).unwrap().is_none());
}

#[test]
fn derived_schema_is_stable() {
    let a = mapper(YAML).unwrap().schemas();
    let b = mapper(YAML).unwrap().schemas();
    assert_eq!(a, b);
    assert_eq!(a[0].0, "legacy.users-value");
}

#[test]
fn an_update_that_changes_the_key_deletes_the_old_key_first() {
    let mut m = mapper(YAML).unwrap();
    m.rules.get_mut("public.users").unwrap().schema_id = Some(1);
    let mut old_key = vec![Value::Null; 8];
    old_key[0] = Value::Int(41);
    let mut out = Vec::new();
    let n = m
        .map_into(&event(Op::Update, Some(old_key), Some(row())), &mut out)
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(out[0].key.as_deref(), Some(&b"41"[..]));
    assert_eq!(&*out[0].event_type, "UserDeleted");
    assert!(
        out[0].dedup_id.ends_with(OLD_KEY_SUFFIX),
        "{}",
        out[0].dedup_id
    );
    assert_eq!(out[1].key.as_deref(), Some(&b"42"[..]));
    assert_eq!(&*out[1].event_type, "UserUpdated");
    assert_eq!(out[1].dedup_id, dedup_id(&event(Op::Update, None, None)));
    // The same key (REPLICA IDENTITY FULL sends the old row on every update): one event.
    out.clear();
    let n = m
        .map_into(&event(Op::Update, Some(row()), Some(row())), &mut out)
        .unwrap();
    assert_eq!(n, 1);
}
