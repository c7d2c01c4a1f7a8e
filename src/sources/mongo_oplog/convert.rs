//! BSON documents to rows, by the fields a mapping declares.
//!
//! A collection has no catalog, so the mapping's `fields:` is the schema:
//! each declared field becomes a column of the collection's [`TableInfo`],
//! and each document is read into a [`Row`] in that order. A value that does
//! not fit its declaration becomes [`Value::Invalid`] with the field's dotted
//! path and what was found (never the value itself), so the mapping layer
//! refuses the document and the pipeline sends it to the dead-letter topic.
//!
//! Avro has no "missing": a missing field and a null one are both published
//! as null. A field declared `required: true` refuses both, and the reason
//! says which of the two it was.

use bson::spec::BinarySubtype;
use bson::{Bson, Document};
use indexmap::IndexMap;

use crate::event::{ColumnInfo, ColumnType, Row, SourceKind, TableInfo, Value};
use crate::mapping::spec::{BsonType, FieldDecl};

/// The column type of a declaration; `Err` names the problem (at `path`).
pub fn column_type(path: &str, decl: &FieldDecl) -> Result<ColumnType, String> {
    let detail = match decl {
        FieldDecl::Long(d) => Some(d),
        FieldDecl::Short(_) => None,
    };
    let nested = detail.and_then(|d| d.fields.as_ref());
    let items = detail.and_then(|d| d.items.as_deref());
    let ty = decl.ty();
    if nested.is_some() && ty != BsonType::Document {
        return Err(format!("`{path}` has `fields` but is not of type document"));
    }
    if items.is_some() && ty != BsonType::Array {
        return Err(format!("`{path}` has `items` but is not of type array"));
    }
    Ok(match ty {
        BsonType::ObjectId => ColumnType::ObjectId,
        BsonType::String => ColumnType::Text,
        BsonType::Int => ColumnType::Int32,
        BsonType::Long => ColumnType::Int64,
        BsonType::Double => ColumnType::Float64,
        BsonType::Decimal => ColumnType::Numeric(None),
        BsonType::Bool => ColumnType::Bool,
        BsonType::Date => ColumnType::Timestamp,
        BsonType::Binary => ColumnType::Bytes,
        BsonType::Uuid => ColumnType::Uuid,
        BsonType::Json => ColumnType::Json,
        BsonType::Document => {
            let Some(fields) = nested else {
                return Err(format!(
                    "`{path}` is a document: declare its `fields` (or use type json)"
                ));
            };
            ColumnType::Record(columns(path, fields)?)
        }
        BsonType::Array => {
            let Some(items) = items else {
                return Err(format!(
                    "`{path}` is an array: declare its `items` (or use type json)"
                ));
            };
            if items.ty() == BsonType::Array {
                return Err(format!(
                    "`{path}`: arrays of arrays are not supported; use type json"
                ));
            }
            ColumnType::Array(Box::new(column_type(&format!("{path}[]"), items)?))
        }
    })
}

/// The declared name of a type, for messages.
fn type_name(ty: BsonType) -> &'static str {
    match ty {
        BsonType::ObjectId => "object_id",
        BsonType::String => "string",
        BsonType::Int => "int",
        BsonType::Long => "long",
        BsonType::Double => "double",
        BsonType::Decimal => "decimal",
        BsonType::Bool => "bool",
        BsonType::Date => "date",
        BsonType::Binary => "binary",
        BsonType::Uuid => "uuid",
        BsonType::Json => "json",
        BsonType::Document => "document",
        BsonType::Array => "array",
    }
}

fn columns(prefix: &str, fields: &IndexMap<String, FieldDecl>) -> Result<Vec<ColumnInfo>, String> {
    fields
        .iter()
        .map(|(name, decl)| {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            Ok(ColumnInfo {
                name: name.clone(),
                type_name: type_name(decl.ty()).to_string(),
                ty: column_type(&path, decl)?,
                nullable: !decl.required() && name != "_id",
                key: prefix.is_empty() && name == "_id",
            })
        })
        .collect()
}

/// The collection `db.coll` as a table whose columns are the declared fields.
/// `_id` must be declared: it is the document's key.
pub fn declared_table(
    db: &str,
    coll: &str,
    fields: &IndexMap<String, FieldDecl>,
) -> Result<TableInfo, String> {
    if !fields.contains_key("_id") {
        return Err(
            "`_id` is not declared; declare it (`_id: object_id`, or its type): it is the document key"
                .into(),
        );
    }
    Ok(TableInfo {
        kind: SourceKind::Mongo,
        database: db.to_string(),
        schema: db.to_string(),
        name: coll.to_string(),
        columns: columns("", fields)?,
    })
}

/// How strictly a document is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// A whole document: `required` fields must be there.
    Whole,
    /// Part of one (a delete's key, an update without its document): what
    /// is missing is null, whatever the declaration.
    Partial,
}

/// Reads `doc` into a row of `table`'s columns.
pub fn row(table: &TableInfo, doc: &Document, fit: Fit) -> Row {
    table
        .columns
        .iter()
        .map(|c| value(c, &c.name, doc.get(&c.name), fit))
        .collect()
}

/// What kind of BSON value it is, without the value.
fn kind(v: &Bson) -> &'static str {
    match v {
        Bson::Double(_) => "a double",
        Bson::String(_) | Bson::Symbol(_) => "a string",
        Bson::Array(_) => "an array",
        Bson::Document(_) => "a document",
        Bson::Boolean(_) => "a bool",
        Bson::Null | Bson::Undefined => "null",
        Bson::RegularExpression(_) => "a regular expression",
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) => "JavaScript code",
        Bson::Int32(_) => "an int",
        Bson::Int64(_) => "a long",
        Bson::Timestamp(_) => "a timestamp",
        Bson::Binary(_) => "binary data",
        Bson::ObjectId(_) => "an ObjectId",
        Bson::DateTime(_) => "a date",
        Bson::Decimal128(_) => "a decimal",
        Bson::MaxKey | Bson::MinKey => "a min/max key",
        Bson::DbPointer(_) => "a DBPointer",
    }
}

fn value(col: &ColumnInfo, path: &str, v: Option<&Bson>, fit: Fit) -> Value {
    let absent = match v {
        None => Some("missing"),
        Some(Bson::Null | Bson::Undefined) => Some("null"),
        Some(_) => None,
    };
    if let Some(what) = absent {
        return if col.nullable || fit == Fit::Partial {
            Value::Null
        } else {
            Value::Invalid(format!(
                "field `{path}` is {what}, but it is declared required"
            ))
        };
    }
    let Some(v) = v else { return Value::Null };
    convert(&col.ty, &col.type_name, path, v)
}

fn convert(ty: &ColumnType, declared: &str, path: &str, v: &Bson) -> Value {
    let misfit = || {
        Value::Invalid(format!(
            "field `{path}` is {}, but it is declared {declared}",
            kind(v)
        ))
    };
    match (ty, v) {
        (ColumnType::ObjectId, Bson::ObjectId(id)) => Value::Text(id.to_hex()),
        (ColumnType::Text, Bson::String(s) | Bson::Symbol(s)) => Value::Text(s.clone()),
        (ColumnType::Int32, Bson::Int32(i)) => Value::Int(i64::from(*i)),
        (ColumnType::Int32, Bson::Int64(i)) if i32::try_from(*i).is_ok() => Value::Int(*i),
        (ColumnType::Int64, Bson::Int32(i)) => Value::Int(i64::from(*i)),
        (ColumnType::Int64, Bson::Int64(i)) => Value::Int(*i),
        (ColumnType::Float64, Bson::Double(f)) => Value::Float(*f),
        (ColumnType::Float64, Bson::Int32(i)) => Value::Float(f64::from(*i)),
        #[allow(clippy::cast_precision_loss)]
        (ColumnType::Float64, Bson::Int64(i)) => Value::Float(*i as f64),
        (ColumnType::Numeric(_), Bson::Decimal128(d)) => {
            let text = d.to_string();
            // NaN and infinities have no exact text a reader can use.
            if text
                .chars()
                .any(|c| c.is_ascii_alphabetic() && c != 'E' && c != 'e')
            {
                Value::Invalid(format!(
                    "field `{path}` is a decimal that is not a finite number"
                ))
            } else {
                Value::Numeric(text)
            }
        }
        (ColumnType::Numeric(_), Bson::Int32(i)) => Value::Numeric(i.to_string()),
        (ColumnType::Numeric(_), Bson::Int64(i)) => Value::Numeric(i.to_string()),
        (ColumnType::Numeric(_), Bson::Double(f)) if f.is_finite() => Value::Numeric(f.to_string()),
        (ColumnType::Bool, Bson::Boolean(b)) => Value::Bool(*b),
        (ColumnType::Timestamp, Bson::DateTime(d)) => {
            match d.timestamp_millis().checked_mul(1000) {
                Some(us) => Value::TimestampMicros(us),
                None => Value::Invalid(format!("field `{path}` is a date out of range")),
            }
        }
        (ColumnType::Bytes, Bson::Binary(b)) => Value::Bytes(b.bytes.clone()),
        (ColumnType::Uuid, Bson::Binary(b)) if b.subtype == BinarySubtype::Uuid => {
            match <[u8; 16]>::try_from(b.bytes.as_slice()) {
                Ok(bytes) => Value::Uuid(uuid_text(&bytes)),
                Err(_) => Value::Invalid(format!(
                    "field `{path}` is a UUID of {} bytes, not 16",
                    b.bytes.len()
                )),
            }
        }
        (ColumnType::Json, v) => Value::Json(v.clone().into_relaxed_extjson().to_string()),
        (ColumnType::Record(cols), Bson::Document(doc)) => Value::Record(
            cols.iter()
                .map(|c| {
                    value(
                        c,
                        &format!("{path}.{}", c.name),
                        doc.get(&c.name),
                        Fit::Whole,
                    )
                })
                .collect(),
        ),
        (ColumnType::Array(inner), Bson::Array(items)) => {
            let item_name = declared_item_name(inner);
            Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        Bson::Null | Bson::Undefined => Value::Null,
                        item => convert(inner, &item_name, &format!("{path}.{i}"), item),
                    })
                    .collect(),
            )
        }
        _ => misfit(),
    }
}

/// The declared name of an array's item type, for messages.
fn declared_item_name(ty: &ColumnType) -> String {
    match ty {
        ColumnType::ObjectId => "object_id",
        ColumnType::Text => "string",
        ColumnType::Int32 => "int",
        ColumnType::Int64 => "long",
        ColumnType::Float64 => "double",
        ColumnType::Numeric(_) => "decimal",
        ColumnType::Bool => "bool",
        ColumnType::Timestamp => "date",
        ColumnType::Bytes => "binary",
        ColumnType::Uuid => "uuid",
        ColumnType::Json => "json",
        ColumnType::Record(_) => "document",
        _ => "a type",
    }
    .to_string()
}

fn uuid_text(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, DateTime, Decimal128};

    fn decls(yaml: &str) -> IndexMap<String, FieldDecl> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn users() -> TableInfo {
        declared_table(
            "shop",
            "users",
            &decls(
                "_id: object_id\nemail: { type: string, required: true }\nage: int\nbalance: decimal\n\
                 joined: date\naddress: { type: document, fields: { city: string, zip: { type: string, required: true } } }\n\
                 tags: { type: array, items: string }\nextra: json\n",
            ),
        )
        .unwrap()
    }

    #[test]
    fn declared_fields_become_columns() {
        let t = users();
        assert_eq!(t.kind, SourceKind::Mongo);
        assert_eq!(t.qualified(), "shop.users");
        let names: Vec<_> = t.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["_id", "email", "age", "balance", "joined", "address", "tags", "extra"]
        );
        assert!(t.columns[0].key && !t.columns[0].nullable);
        assert!(!t.columns[1].nullable && t.columns[2].nullable);
        assert!(matches!(&t.columns[5].ty, ColumnType::Record(c) if c.len() == 2));
        assert_eq!(
            t.columns[6].ty,
            ColumnType::Array(Box::new(ColumnType::Text))
        );
    }

    #[test]
    fn declarations_that_cannot_work_are_refused() {
        let no_id = declared_table("d", "c", &decls("email: string\n"));
        assert!(no_id.unwrap_err().contains("`_id` is not declared"));
        let doc_without_fields = declared_table("d", "c", &decls("_id: long\na: document\n"));
        assert!(doc_without_fields
            .unwrap_err()
            .contains("`a` is a document: declare its `fields`"));
        let nested = declared_table(
            "d",
            "c",
            &decls("_id: long\na: { type: array, items: { type: array, items: int } }\n"),
        );
        assert!(nested.unwrap_err().contains("arrays of arrays"));
    }

    #[test]
    fn documents_read_by_their_declarations() {
        let t = users();
        let id = ObjectId::parse_str("64c7f9ee0000000000000001").unwrap();
        let d = doc! {
            "_id": id, "email": "a@example.com", "age": 41_i64,
            "balance": "12.50".parse::<Decimal128>().unwrap(),
            "joined": DateTime::from_millis(1_700_000_000_123),
            "address": {"city": "Lyon", "zip": "69001", "ignored": 1},
            "tags": ["a", bson::Bson::Null, "b"],
            "extra": {"n": 1, "when": DateTime::from_millis(0)},
            "undeclared": true,
        };
        let r = row(&t, &d, Fit::Whole);
        assert_eq!(r[0], Value::Text("64c7f9ee0000000000000001".into()));
        assert_eq!(r[1], Value::Text("a@example.com".into()));
        assert_eq!(r[2], Value::Int(41));
        assert_eq!(r[3], Value::Numeric("12.50".into()));
        assert_eq!(r[4], Value::TimestampMicros(1_700_000_000_123_000));
        assert_eq!(
            r[5],
            Value::Record(vec![
                Value::Text("Lyon".into()),
                Value::Text("69001".into())
            ])
        );
        assert_eq!(
            r[6],
            Value::Array(vec![
                Value::Text("a".into()),
                Value::Null,
                Value::Text("b".into())
            ])
        );
        assert!(matches!(&r[7], Value::Json(j) if j.contains("\"n\":1")));
    }

    #[test]
    fn misfits_name_the_field_and_what_was_found() {
        let t = users();
        let d = doc! {"_id": 7, "age": "old", "address": {"city": 3}, "tags": ["x", 2]};
        let r = row(&t, &d, Fit::Whole);
        let reason = |v: &Value| match v {
            Value::Invalid(r) => r.clone(),
            other => panic!("expected a misfit, got {other:?}"),
        };
        assert_eq!(
            reason(&r[0]),
            "field `_id` is an int, but it is declared object_id"
        );
        assert_eq!(
            reason(&r[1]),
            "field `email` is missing, but it is declared required"
        );
        assert_eq!(
            reason(&r[2]),
            "field `age` is a string, but it is declared int"
        );
        let Value::Record(addr) = &r[5] else {
            panic!("address")
        };
        assert_eq!(
            reason(&addr[0]),
            "field `address.city` is an int, but it is declared string"
        );
        assert_eq!(
            reason(&addr[1]),
            "field `address.zip` is missing, but it is declared required"
        );
        let Value::Array(tags) = &r[6] else {
            panic!("tags")
        };
        assert_eq!(
            reason(&tags[1]),
            "field `tags.1` is an int, but it is declared string"
        );
        // Null is not missing, and the reason says so.
        let r = row(
            &t,
            &doc! {"_id": ObjectId::new(), "email": null},
            Fit::Whole,
        );
        assert_eq!(
            reason(&r[1]),
            "field `email` is null, but it is declared required"
        );
        // A delete's key alone is a partial document: nothing is required.
        let r = row(&t, &doc! {"_id": ObjectId::new()}, Fit::Partial);
        assert_eq!(r[1], Value::Null);
    }

    #[test]
    fn an_int_too_big_for_int_is_a_misfit() {
        let t = declared_table("d", "c", &decls("_id: long\nn: int\n")).unwrap();
        let r = row(&t, &doc! {"_id": 1_i64, "n": 1_i64 << 40}, Fit::Whole);
        assert!(matches!(&r[1], Value::Invalid(m) if m.contains("declared int")));
        assert_eq!(
            row(&t, &doc! {"_id": 1, "n": 5_i64}, Fit::Whole)[1],
            Value::Int(5)
        );
    }
}
