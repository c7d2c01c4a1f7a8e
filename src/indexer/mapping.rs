//! Index mappings derived from a topic's Avro schema.
//!
//! A search index guesses field types from the first document it sees
//! unless told otherwise, and a wrong guess (a numeric-looking string taken
//! as a number) cannot be changed later without a reindex. So the indexer
//! states every field's type from the schema the registry already holds,
//! and lets the YAML override single fields (`mappings: {email: {type:
//! keyword}}`).
//!
//! | Avro | index type |
//! |---|---|
//! | string | `text` with a `keyword` sub-field |
//! | enum, uuid | `keyword` |
//! | int / long / float / double / boolean | `integer` / `long` / `float` / `double` / `boolean` |
//! | timestamp-*, local-timestamp-*, date | `date` (the documents carry ISO-8601 text) |
//! | decimal | `keyword` (the exact text; override with `scaled_float` to range over it) |
//! | bytes, fixed | `keyword`, not indexed (hex text) |
//! | time-* | `long` |
//! | array of T | T (every field of a search index may hold a list) |
//! | map | `object` |
//! | record | `object` with its fields |

use std::collections::{BTreeMap, HashMap};

use apache_avro::schema::Name;
use apache_avro::Schema;
use serde_json::{json, Map, Value as Json};

use super::config::{DocumentFrom, IndexSpec};
use crate::topics::KnownSchema;

/// Whether a value schema is unilog's domain-event envelope (it has `op`
/// and `after`), and if so the schema of `after`.
pub fn envelope_after<'a>(
    schema: &'a Schema,
    names: &'a HashMap<Name, Schema>,
) -> Option<&'a Schema> {
    let Schema::Record(r) = schema else {
        return None;
    };
    if !r.lookup.contains_key("op") {
        return None;
    }
    let after = r.lookup.get("after").and_then(|i| r.fields.get(*i))?;
    Some(non_null(&after.schema, names))
}

fn resolve<'a>(s: &'a Schema, names: &'a HashMap<Name, Schema>) -> &'a Schema {
    match s {
        Schema::Ref { name } => names.get(name).unwrap_or(s),
        other => other,
    }
}

fn non_null<'a>(s: &'a Schema, names: &'a HashMap<Name, Schema>) -> &'a Schema {
    match resolve(s, names) {
        Schema::Union(u) => u
            .variants()
            .iter()
            .find(|v| !matches!(v, Schema::Null))
            .map_or(s, |v| resolve(v, names)),
        other => other,
    }
}

/// The mapping of one field.
fn field_mapping(s: &Schema, names: &HashMap<Name, Schema>, depth: usize) -> Json {
    if depth > 16 {
        return json!({"type": "object", "enabled": false});
    }
    match non_null(s, names) {
        Schema::String => {
            json!({"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}})
        }
        Schema::Enum(_) | Schema::Uuid(_) => json!({"type": "keyword"}),
        Schema::Int => json!({"type": "integer"}),
        Schema::Long | Schema::TimeMicros | Schema::TimeMillis => json!({"type": "long"}),
        Schema::Float => json!({"type": "float"}),
        Schema::Double => json!({"type": "double"}),
        Schema::Boolean => json!({"type": "boolean"}),
        Schema::Date
        | Schema::TimestampMicros
        | Schema::TimestampMillis
        | Schema::TimestampNanos
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampNanos => json!({"type": "date"}),
        Schema::Decimal(_) | Schema::BigDecimal => json!({"type": "keyword"}),
        Schema::Bytes | Schema::Fixed(_) | Schema::Duration(_) => {
            json!({"type": "keyword", "index": false})
        }
        Schema::Array(a) => field_mapping(&a.items, names, depth + 1),
        Schema::Map(_) => json!({"type": "object"}),
        Schema::Record(r) => {
            let props: Map<String, Json> = r
                .fields
                .iter()
                .map(|f| (f.name.clone(), field_mapping(&f.schema, names, depth + 1)))
                .collect();
            json!({"properties": props})
        }
        // A null-only field, or a union of several types: let the server decide.
        _ => json!({"type": "object", "enabled": false}),
    }
}

/// The `properties` of an index for documents of `schema`, as `document`
/// takes them from each record, with `overrides` replacing fields.
pub fn derive_properties(
    schema: &KnownSchema,
    document: DocumentFrom,
    overrides: &BTreeMap<String, Json>,
) -> Map<String, Json> {
    let names = schema.names();
    let doc_schema = match document {
        DocumentFrom::Value => Some(resolve(&schema.schema, names)),
        DocumentFrom::After | DocumentFrom::Auto => envelope_after(&schema.schema, names)
            .or_else(|| (document == DocumentFrom::Auto).then_some(&schema.schema)),
    };
    let mut props = match doc_schema.map(|s| field_mapping(s, names, 0)) {
        Some(Json::Object(mut m)) => match m.remove("properties") {
            Some(Json::Object(p)) => p,
            _ => Map::new(),
        },
        _ => Map::new(),
    };
    for (k, v) in overrides {
        props.insert(k.clone(), v.clone());
    }
    props
}

/// The body of an index-creation request for `spec`: its settings and the
/// mapping derived from `schema` (none when the topic has no schema yet:
/// then only the overrides, and the server maps the rest).
pub fn index_body(spec: &IndexSpec, schema: Option<&KnownSchema>) -> Json {
    let props = match schema {
        Some(s) => derive_properties(s, spec.document, &spec.mappings),
        None => spec
            .mappings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let mut body = json!({"mappings": {"properties": props}});
    if !spec.settings.is_empty() {
        body["settings"] = json!(spec.settings);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVELOPE: &str = r#"{"type":"record","name":"User","namespace":"unilog","fields":[
        {"name":"event_type","type":"string"},
        {"name":"op","type":"string"},
        {"name":"key","type":"string"},
        {"name":"after","type":["null",{"type":"record","name":"UserRow","fields":[
            {"name":"user_id","type":["null","long"]},
            {"name":"email","type":["null","string"]},
            {"name":"balance","type":["null",{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}]},
            {"name":"tags","type":["null",{"type":"array","items":["null","string"]}]},
            {"name":"created","type":["null",{"type":"long","logicalType":"timestamp-micros"}]}]}],"default":null}]}"#;

    #[test]
    fn derives_the_after_row_of_an_envelope_with_overrides() {
        let k = KnownSchema::parse(ENVELOPE).unwrap();
        let mut o = BTreeMap::new();
        o.insert("email".to_string(), json!({"type": "keyword"}));
        let p = derive_properties(&k, DocumentFrom::Auto, &o);
        assert_eq!(p["user_id"], json!({"type": "long"}));
        assert_eq!(p["email"], json!({"type": "keyword"}));
        assert_eq!(p["balance"], json!({"type": "keyword"}));
        assert_eq!(p["tags"]["type"], "text");
        assert_eq!(p["created"], json!({"type": "date"}));
        assert!(!p.contains_key("op"));
        // The whole value on request.
        let p = derive_properties(&k, DocumentFrom::Value, &BTreeMap::new());
        assert!(p.contains_key("op") && p["after"]["properties"].is_object());
    }

    #[test]
    fn a_plain_record_is_the_document_in_auto_mode() {
        let k = KnownSchema::parse(
            r#"{"type":"record","name":"Doc","fields":[{"name":"n","type":"int"},
               {"name":"friends","type":{"type":"array","items":{"type":"record","name":"F","fields":[{"name":"id","type":"long"}]}}}]}"#,
        )
        .unwrap();
        let p = derive_properties(&k, DocumentFrom::Auto, &BTreeMap::new());
        assert_eq!(p["n"], json!({"type": "integer"}));
        assert_eq!(
            p["friends"],
            json!({"properties": {"id": {"type": "long"}}})
        );
    }
}
