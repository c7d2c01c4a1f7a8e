//! The Debezium envelope: encode, then decode with `apache-avro` against the
//! derived schemas, as a consumer would.

use std::collections::HashMap;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;

use super::*;
use crate::event::{Lsn, SeqKey, SourceKind, SourceMeta};
use crate::mapping::tests::{decode_framed, field};
use crate::mapping::Mapper;

fn col(name: &str, ty: ColumnType, nullable: bool) -> ColumnInfo {
    ColumnInfo {
        name: name.into(),
        type_name: format!("{ty:?}").to_lowercase(),
        key: name == "id",
        ty,
        nullable,
    }
}

fn users() -> Arc<TableInfo> {
    Arc::new(TableInfo {
        kind: SourceKind::Postgres,
        database: "legacy".into(),
        schema: "public".into(),
        name: "users".into(),
        columns: vec![
            col("id", ColumnType::Int64, false),
            col("email", ColumnType::Text, false),
            col("password_digest", ColumnType::Text, true),
            col("balance", ColumnType::Numeric(Some((10, 2))), true),
            col("rating", ColumnType::Numeric(None), true),
            col("created_at", ColumnType::Timestamp, true),
            col("seen_local", ColumnType::LocalTimestamp, true),
            col("born", ColumnType::Date, true),
            col("wakes", ColumnType::Time, true),
            col("ref", ColumnType::Uuid, true),
            col("doc", ColumnType::Json, true),
            col("tags", ColumnType::Array(Box::new(ColumnType::Text)), true),
            col("admin", ColumnType::Bool, false),
            col("small", ColumnType::Int16, true),
            col(
                "mood",
                ColumnType::Enum(vec!["happy".into(), "sad".into()]),
                true,
            ),
            col("geo", ColumnType::Unsupported("point".into()), true),
            col("big", ColumnType::Numeric(Some((50, 3))), true),
        ],
    })
}

fn row() -> Vec<Value> {
    vec![
        Value::Int(42),
        Value::Text("a@example.com".into()),
        Value::Text("secret".into()),
        Value::Numeric("12.50".into()),
        Value::Numeric("-1.005".into()),
        Value::TimestampMicros(1_700_000_000_500_000),
        Value::LocalTimestampMicros(1_700_000_000_000_001),
        Value::Date(19_723),
        Value::TimeMicros(3_600_000_001),
        Value::Uuid("9f1c2b4e-0000-4000-8000-000000000001".into()),
        Value::Json("{\"a\":1}".into()),
        Value::Array(vec![Value::Text("x".into()), Value::Null]),
        Value::Bool(true),
        Value::Int(-7),
        Value::Text("sad".into()),
        Value::Text("(1,2)".into()),
        Value::Numeric("123456789012345678901234567890123456789012.345".into()),
    ]
}

const YAML: &str = "table: users\ntopic: legacy.users\nevents:\n  insert: UserRegistered\n  update: UserUpdated\n  delete: UserDeleted\n  truncate: UsersTruncated\ncolumns:\n  id: user_id\n  email:\ndrop: [password_digest]\ndebezium:\n  server_name: legacy\n";

fn mapper(text: &str) -> Result<Mapper, MappingError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("users.yaml");
    std::fs::write(&p, text).unwrap();
    let m = LoadedMapping::load(&p).unwrap();
    let mut tables = HashMap::new();
    tables.insert("public.users".to_string(), users());
    Mapper::new(&[m], &tables)
}

/// A mapper whose schemas are "registered" (ids 1, 2, 3).
fn registered(text: &str) -> Mapper {
    let mut m = mapper(text).unwrap();
    let rule = m.rules.get_mut("public.users").unwrap();
    rule.schema_id = Some(1);
    let dz = rule.debezium.as_mut().unwrap();
    dz.value_schema_id = Some(2);
    dz.key_schema_id = Some(3);
    m
}

fn event(op: Op, before: Option<Vec<Value>>, after: Option<Vec<Value>>) -> ChangeEvent {
    let snapshot = op == Op::Snapshot;
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
            xid: (!snapshot).then_some(777),
            commit_time_micros: (!snapshot).then_some(1_700_000_000_000_001),
            relation: None,
        },
        before,
        after,
    }
}

fn schema_of(m: &Mapper, subject: &str) -> Schema {
    let (_, text) = m
        .schemas()
        .into_iter()
        .find(|(s, _)| s == subject)
        .unwrap_or_else(|| panic!("no subject {subject}"));
    Schema::parse_str(&text).unwrap()
}

/// The record inside `["null", record]`, or None.
fn inner(v: &Avro) -> Option<&[(String, Avro)]> {
    match v {
        Avro::Union(0, _) => None,
        Avro::Union(1, r) => match &**r {
            Avro::Record(f) => Some(f),
            other => panic!("not a record: {other:?}"),
        },
        other => panic!("not a union: {other:?}"),
    }
}

fn some(v: Avro) -> Avro {
    Avro::Union(1, Box::new(v))
}

fn string(s: &str) -> Avro {
    Avro::String(s.into())
}

/// (op, before, after, source) of a Debezium value.
fn envelope(m: &Mapper, d: &DomainEvent) -> Vec<(String, Avro)> {
    let schema = schema_of(m, "legacy.public.users-value");
    decode_framed(&schema, d.payload.as_deref().expect("a value"), d.schema_id)
}

fn key_of(m: &Mapper, d: &DomainEvent) -> Vec<(String, Avro)> {
    let schema = schema_of(m, "legacy.public.users-key");
    decode_framed(&schema, d.key.as_deref().expect("a key"), 3)
}

fn op_of(rec: &[(String, Avro)]) -> &str {
    match field(rec, "op") {
        Avro::String(s) => s,
        other => panic!("op is {other:?}"),
    }
}

#[test]
fn schemas_follow_debeziums_names_and_leave_dropped_columns_out() {
    let m = mapper(YAML).unwrap();
    assert_eq!(
        m.topics(),
        ["legacy.public.users", "legacy.users"],
        "the Debezium topic is created too"
    );
    let subjects: Vec<String> = m.schemas().into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        subjects,
        [
            "legacy.public.users-key",
            "legacy.public.users-value",
            "legacy.users-value"
        ]
    );
    let value = schema_of(&m, "legacy.public.users-value");
    let Schema::Record(env) = &value else {
        panic!("not a record")
    };
    assert_eq!(env.name.fullname(None), "legacy.public.users.Envelope");
    let names: Vec<&str> = env.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "before",
            "after",
            "source",
            "transaction",
            "op",
            "ts_ms",
            "ts_us",
            "ts_ns"
        ]
    );
    let text = &m
        .schemas()
        .into_iter()
        .find(|(s, _)| s == "legacy.public.users-value")
        .unwrap()
        .1;
    for expected in [
        "\"legacy.public.users.Value\"",
        "\"io.debezium.connector.postgresql\"",
        "\"io.debezium.time.ZonedTimestamp\"",
        "\"io.debezium.time.MicroTimestamp\"",
        "\"io.debezium.time.Date\"",
        "\"io.debezium.time.MicroTime\"",
        "\"io.debezium.data.Uuid\"",
        "\"io.debezium.data.Json\"",
        "\"io.debezium.data.VariableScaleDecimal\"",
        "\"allowed\":\"happy,sad\"",
        "\"connect.type\":\"int16\"",
        "\"event.block\"",
    ] {
        assert!(text.contains(expected), "{expected} missing from {text}");
    }
    // Columns as they are, whatever `columns:` publishes, but never a dropped one.
    assert!(text.contains("\"name\":\"created_at\"") && text.contains("\"name\":\"id\""));
    assert!(!text.contains("password_digest") && !text.contains("user_id"));
    // No logical types a Debezium consumer would not expect, but decimal's.
    assert!(!text.contains("timestamp-micros") && !text.contains("\"uuid\""));
    let Schema::Record(key) = schema_of(&m, "legacy.public.users-key") else {
        panic!("not a record")
    };
    assert_eq!(key.name.fullname(None), "legacy.public.users.Key");
    assert_eq!(key.fields.len(), 1);
    assert_eq!(key.fields[0].name, "id");
    assert_eq!(key.fields[0].schema, Schema::Long, "a required key field");
}

#[test]
fn insert_encodes_every_column_and_decodes_against_the_schema() {
    let mut m = registered(YAML);
    let mut out = Vec::new();
    let n = m
        .map_into(&event(Op::Insert, None, Some(row())), &mut out)
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(&*out[0].topic, "legacy.users", "the domain event first");
    let d = &out[1];
    assert_eq!(&*d.topic, "legacy.public.users");
    assert_eq!(d.dedup_id, out[0].dedup_id);
    assert_eq!(d.event_type, out[0].event_type);
    assert_eq!(d.schema_id, 2);
    assert_eq!(key_of(&m, d), vec![("id".to_string(), Avro::Long(42))]);
    let rec = envelope(&m, d);
    assert_eq!(op_of(&rec), "c");
    assert!(inner(field(&rec, "before")).is_none());
    assert_eq!(
        field(&rec, "transaction"),
        &Avro::Union(0, Box::new(Avro::Null))
    );
    let after = inner(field(&rec, "after")).expect("after");
    let expect = [
        ("id", Avro::Long(42)),
        ("email", string("a@example.com")),
        (
            "balance",
            some(Avro::Decimal(apache_avro::Decimal::from(vec![0x04, 0xe2]))),
        ),
        (
            "rating",
            some(Avro::Record(vec![
                ("scale".into(), Avro::Int(3)),
                ("value".into(), Avro::Bytes(vec![0xfc, 0x13])),
            ])),
        ),
        ("created_at", some(string("2023-11-14T22:13:20.5Z"))),
        ("seen_local", some(Avro::Long(1_700_000_000_000_001))),
        ("born", some(Avro::Int(19_723))),
        ("wakes", some(Avro::Long(3_600_000_001))),
        ("ref", some(string("9f1c2b4e-0000-4000-8000-000000000001"))),
        ("doc", some(string("{\"a\":1}"))),
        (
            "tags",
            some(Avro::Array(vec![
                some(string("x")),
                Avro::Union(0, Box::new(Avro::Null)),
            ])),
        ),
        ("admin", Avro::Boolean(true)),
        ("small", some(Avro::Int(-7))),
        ("mood", some(string("sad"))),
        ("geo", some(string("(1,2)"))),
    ];
    for (name, want) in &expect {
        assert_eq!(field(after, name), want, "{name}");
    }
    let Avro::Union(1, big) = field(after, "big") else {
        panic!("big is null")
    };
    let Avro::Decimal(big) = &**big else {
        panic!("big is {big:?}")
    };
    let bytes: Vec<u8> = big.try_into().unwrap();
    assert_eq!(
        bytes,
        big_unscaled("123456789012345678901234567890123456789012345", Some(0))
            .unwrap()
            .1
    );
    let Avro::Record(source) = field(&rec, "source") else {
        panic!("source")
    };
    let expect = [
        ("version", string(CONNECTOR_VERSION)),
        ("connector", string("postgresql")),
        ("name", string("legacy")),
        ("ts_ms", Avro::Long(1_700_000_000_000)),
        ("snapshot", Avro::Union(0, Box::new(string("false")))),
        ("db", string("legacy")),
        (
            "sequence",
            some(string(&format!(
                "[\"{}\",\"{}\"]",
                0x1_0000_0010_u64, 0x1_0000_0008_u64
            ))),
        ),
        ("ts_us", some(Avro::Long(1_700_000_000_000_001))),
        ("ts_ns", some(Avro::Long(1_700_000_000_000_001_000))),
        ("schema", string("public")),
        ("table", string("users")),
        ("txId", some(Avro::Long(777))),
        ("lsn", some(Avro::Long(0x1_0000_0008))),
        ("xmin", Avro::Union(0, Box::new(Avro::Null))),
    ];
    for (name, want) in &expect {
        assert_eq!(field(source, name), want, "source.{name}");
    }
    let Avro::Union(1, ts) = field(&rec, "ts_ms") else {
        panic!("ts_ms is null")
    };
    assert!(matches!(**ts, Avro::Long(t) if t > 1_700_000_000_000));
    // The dropped column never leaves.
    assert!(!d
        .payload
        .as_ref()
        .unwrap()
        .windows(6)
        .any(|w| w == b"secret"));
}

#[test]
fn each_operation_has_debeziums_op_code() {
    let mut m = registered(YAML);
    let cases = [
        (Op::Snapshot, None, Some(row()), vec!["r"]),
        (Op::Insert, None, Some(row()), vec!["c"]),
        (Op::Update, None, Some(row()), vec!["u"]),
        (Op::Update, Some(row()), Some(row()), vec!["u"]),
        (Op::Delete, Some(row()), None, vec!["d", "tombstone"]),
        (Op::Truncate, None, None, vec!["t"]),
    ];
    for (op, before, after, want) in cases {
        let mut out = Vec::new();
        m.map_into(&event(op, before.clone(), after.clone()), &mut out)
            .unwrap();
        let got: Vec<String> = out[1..]
            .iter()
            .map(|d| match &d.payload {
                None => "tombstone".to_string(),
                Some(_) => op_of(&envelope(&m, d)).to_string(),
            })
            .collect();
        assert_eq!(got, want, "{op:?}");
        let rec = out[1]
            .payload
            .as_ref()
            .map(|_| envelope(&m, &out[1]))
            .unwrap();
        assert_eq!(
            inner(field(&rec, "before")).is_some(),
            before.is_some(),
            "{op:?} before"
        );
        assert_eq!(
            inner(field(&rec, "after")).is_some(),
            after.is_some(),
            "{op:?} after"
        );
        let Avro::Record(source) = field(&rec, "source") else {
            panic!()
        };
        let snapshot = if op == Op::Snapshot { "true" } else { "false" };
        assert_eq!(
            field(source, "snapshot"),
            &Avro::Union(0, Box::new(string(snapshot)))
        );
        if op == Op::Snapshot {
            assert_eq!(
                field(source, "sequence"),
                &some(string(&format!("[null,\"{}\"]", 0x1_0000_0008_u64)))
            );
            assert_eq!(field(source, "txId"), &Avro::Union(0, Box::new(Avro::Null)));
        }
        if op == Op::Truncate {
            assert_eq!(out[1].key, None, "a truncate has no key");
        }
    }
}

#[test]
fn delete_is_followed_by_a_tombstone_with_the_same_key() {
    let mut m = registered(YAML);
    // Default replica identity: the old row has the key only.
    let mut before = vec![Value::Null; 17];
    before[0] = Value::Int(9);
    let mut out = Vec::new();
    let n = m
        .map_into(&event(Op::Delete, Some(before), None), &mut out)
        .unwrap();
    assert_eq!(n, 3);
    let (del, tomb) = (&out[1], &out[2]);
    assert_eq!(tomb.payload, None, "a tombstone has a null value");
    assert_eq!(tomb.key, del.key);
    assert_eq!(tomb.topic, del.topic);
    assert_eq!(key_of(&m, tomb), vec![("id".to_string(), Avro::Long(9))]);
    assert_eq!(tomb.dedup_id, format!("{}/tombstone", del.dedup_id));
    let rec = envelope(&m, del);
    assert_eq!(op_of(&rec), "d");
    assert!(inner(field(&rec, "after")).is_none());
    let before = inner(field(&rec, "before")).expect("before");
    assert_eq!(field(before, "id"), &Avro::Long(9));
    // NOT NULL columns the database did not send: the type's zero, as Debezium does.
    assert_eq!(field(before, "email"), &string(""));
    assert_eq!(field(before, "admin"), &Avro::Boolean(false));
    assert_eq!(
        field(before, "balance"),
        &Avro::Union(0, Box::new(Avro::Null))
    );

    let mut m = registered(&format!("{YAML}  tombstones: false\n"));
    let mut out = Vec::new();
    let n = m
        .map_into(&event(Op::Delete, Some(row()), None), &mut out)
        .unwrap();
    assert_eq!(n, 2, "no tombstone with `tombstones: false`");
}

#[test]
fn key_change_becomes_delete_tombstone_create() {
    let mut m = registered(YAML);
    let mut old = row();
    old[0] = Value::Int(41);
    let mut out = Vec::new();
    m.map_into(&event(Op::Update, Some(old), Some(row())), &mut out)
        .unwrap();
    // The domain events: the old key's delete, the update; then Debezium's three.
    assert_eq!(&*out[0].event_type, "UserDeleted");
    assert_eq!(out[0].key.as_deref(), Some(&b"41"[..]));
    let dz = &out[2..];
    assert_eq!(dz.len(), 3);
    assert_eq!(op_of(&envelope(&m, &dz[0])), "d");
    assert_eq!(key_of(&m, &dz[0]), vec![("id".to_string(), Avro::Long(41))]);
    assert_eq!(dz[1].payload, None);
    assert_eq!(dz[1].key, dz[0].key);
    let create = envelope(&m, &dz[2]);
    assert_eq!(op_of(&create), "c");
    assert!(inner(field(&create, "before")).is_none());
    assert_eq!(key_of(&m, &dz[2]), vec![("id".to_string(), Avro::Long(42))]);
    let ids: std::collections::HashSet<&str> = dz.iter().map(|d| d.dedup_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "distinct dedup ids: {ids:?}");
}

#[test]
fn unchanged_toast_is_debeziums_placeholder() {
    let text = YAML.replace("  email:\n", "");
    let mut m = registered(&text);
    let mut r = row();
    r[10] = Value::Unchanged; // doc, json
    let mut out = Vec::new();
    m.map_into(&event(Op::Update, None, Some(r)), &mut out)
        .unwrap();
    let rec = envelope(&m, &out[1]);
    let after = inner(field(&rec, "after")).unwrap();
    assert_eq!(field(after, "doc"), &some(string(UNAVAILABLE_VALUE)));
}

#[test]
fn special_numerics_are_null() {
    let mut m = registered(YAML);
    let mut r = row();
    r[3] = Value::Numeric("NaN".into());
    r[4] = Value::Numeric("-Infinity".into());
    let mut out = Vec::new();
    m.map_into(&event(Op::Insert, None, Some(r)), &mut out)
        .unwrap();
    let rec = envelope(&m, &out[1]);
    let after = inner(field(&rec, "after")).unwrap();
    assert_eq!(
        field(after, "balance"),
        &Avro::Union(0, Box::new(Avro::Null))
    );
    assert_eq!(
        field(after, "rating"),
        &Avro::Union(0, Box::new(Avro::Null))
    );
}

#[test]
fn refuses_clashing_topics_and_dropped_keys() {
    let text = YAML.replace(
        "server_name: legacy\n",
        "server_name: legacy\n  topic: legacy.users\n",
    );
    let Err(err) = mapper(&text) else {
        panic!("accepted")
    };
    assert!(err.to_string().contains("already used"), "{err}");
    let text = YAML.replace("  id: user_id\n", "").replace(
        "drop: [password_digest]",
        "drop: [password_digest, id]\nkey: [email]",
    );
    assert!(mapper(&text).is_ok(), "another key may be named");
    let text = YAML
        .replace("  id: user_id\n", "")
        .replace("drop: [password_digest]", "drop: [password_digest, id]");
    let Err(err) = mapper(&text) else {
        panic!("accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("field `debezium`") && err.contains("key column `id`"),
        "{err}"
    );
}

#[test]
fn numerics_of_any_size_become_twos_complement() {
    assert_eq!(big_unscaled("12.34", None), Some((2, vec![0x04, 0xd2])));
    assert_eq!(big_unscaled("-1.005", None), Some((3, vec![0xfc, 0x13])));
    assert_eq!(big_unscaled("0.000", None), Some((3, vec![0])));
    assert_eq!(big_unscaled("128", None), Some((0, vec![0x00, 0x80])));
    assert_eq!(big_unscaled("-128", None), Some((0, vec![0x80])));
    assert_eq!(big_unscaled("-129", None), Some((0, vec![0xff, 0x7f])));
    assert_eq!(big_unscaled("-256", None), Some((0, vec![0xff, 0x00])));
    assert_eq!(big_unscaled("1.5", Some(3)), Some((3, vec![0x05, 0xdc])));
    assert_eq!(big_unscaled("1.5001", Some(3)), None);
    assert_eq!(big_unscaled("NaN", None), None);
    // 10^40: beyond i128's decimal reach, checked against its hex.
    let (_, b) = big_unscaled(&format!("1{}", "0".repeat(40)), None).unwrap();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(hex, "1d6329f1c35ca4bfabb9f5610000000000");
    let (_, n) = big_unscaled(&format!("-1{}", "0".repeat(40)), None).unwrap();
    let neg: Vec<u8> = b.iter().map(|x| !x).collect();
    let mut expect = neg;
    // -x = !x + 1, and the low byte of 10^40 is 0 so the carry runs up.
    let mut carry = true;
    for byte in expect.iter_mut().rev() {
        let (v, c) = byte.overflowing_add(u8::from(carry));
        *byte = v;
        carry = c;
    }
    assert_eq!(n, expect);
}

#[test]
fn zoned_timestamps_look_like_javas_iso_offset_date_time() {
    assert_eq!(zoned_timestamp(0).unwrap(), "1970-01-01T00:00:00Z");
    assert_eq!(
        zoned_timestamp(1_500_000).unwrap(),
        "1970-01-01T00:00:01.5Z"
    );
    assert_eq!(
        zoned_timestamp(123_456).unwrap(),
        "1970-01-01T00:00:00.123456Z"
    );
    assert_eq!(zoned_timestamp(-1).unwrap(), "1969-12-31T23:59:59.999999Z");
}
