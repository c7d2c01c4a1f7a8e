//! The output record of a join, derived from the inputs' schemas.
//!
//! The output is the denormalised document search wants: the left row's
//! fields at the top level, the right rows embedded, and the key:
//!
//! ```text
//! UserDocument { key: string, <every field of the left row>,
//!                connections: array<UserDocument_connections> , connections_count: int }   (many)
//!                connections: null | UserDocument_connections                                (one)
//! ```
//!
//! A "row" is the `after` record of a unilog domain event, or the whole
//! value of a topic that carries plain records. Inputs are decoded with
//! their latest registered schema as the reader schema, so records written
//! with older versions resolve to the fields the output was derived from.

use apache_avro::schema::RecordSchema;
use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use serde_json::{json, Value as Json};

use crate::topics::KnownSchema;

/// The row record of a value schema, and whether it is an envelope.
pub fn row_schema(k: &KnownSchema) -> Result<(RecordSchema, bool), String> {
    let names = k.names();
    if let Some(Schema::Record(r)) = crate::indexer::mapping::envelope_after(&k.schema, names) {
        return Ok((r.clone(), true));
    }
    match k.resolve(&k.schema) {
        Schema::Record(r) => Ok((r.clone(), false)),
        _ => Err("the value schema is not a record".into()),
    }
}

fn field_json(f: &apache_avro::schema::RecordField) -> Result<Json, String> {
    let ty = serde_json::to_value(&f.schema).map_err(|e| e.to_string())?;
    let mut j = json!({"name": f.name, "type": ty});
    if let Some(d) = &f.default {
        j["default"] = d.clone();
    }
    Ok(j)
}

/// The output schema's JSON text.
pub fn output_schema(
    left: &KnownSchema,
    right: &KnownSchema,
    record: &str,
    namespace: &str,
    field: &str,
    count_field: Option<&str>,
) -> Result<String, String> {
    let (lrow, _) = row_schema(left).map_err(|e| format!("left topic: {e}"))?;
    let (rrow, _) = row_schema(right).map_err(|e| format!("right topic: {e}"))?;
    let mut fields = vec![json!({"name": "key", "type": "string", "doc": "the join key"})];
    for f in &lrow.fields {
        if f.name == "key" || f.name == field || Some(f.name.as_str()) == count_field {
            return Err(format!(
                "the left row has a field `{}`, which the output uses for the join; rename output.field/count_field, or the column in the mapping",
                f.name
            ));
        }
        fields.push(field_json(f)?);
    }
    let rfields: Vec<Json> = rrow
        .fields
        .iter()
        .map(field_json)
        .collect::<Result<_, _>>()?;
    let child = json!({"type": "record", "name": format!("{record}_{field}"), "fields": rfields});
    match count_field {
        Some(cf) => {
            fields.push(
                json!({"name": field, "type": {"type": "array", "items": child}, "default": []}),
            );
            fields.push(json!({"name": cf, "type": "int", "default": 0}));
        }
        None => fields.push(json!({"name": field, "type": ["null", child], "default": null})),
    }
    Ok(json!({
        "type": "record", "name": record, "namespace": namespace,
        "doc": "a joined document, published by unilog join",
        "fields": fields
    })
    .to_string())
}

/// The row of a decoded value: `None` for a delete event (or an event
/// without an `after` row).
pub fn row_of(value: Avro, envelope: bool) -> Option<Vec<(String, Avro)>> {
    let Avro::Record(fields) = value else {
        return None;
    };
    if !envelope {
        return Some(fields);
    }
    let mut op = None;
    let mut after = None;
    for (k, v) in fields {
        match (k.as_str(), v) {
            ("op", Avro::String(s)) => op = Some(s),
            ("after", Avro::Union(_, inner)) => after = Some(*inner),
            ("after", v) => after = Some(v),
            _ => {}
        }
    }
    if op.as_deref() == Some("delete") {
        return None;
    }
    match after {
        Some(Avro::Record(f)) => Some(f),
        _ => None,
    }
}

/// The text of a key field (what the left topic's message key holds).
pub fn key_text(v: &Avro) -> Option<String> {
    match v {
        Avro::Union(_, inner) => key_text(inner),
        Avro::Null => None,
        Avro::String(s) | Avro::Enum(_, s) => Some(s.clone()),
        Avro::Int(i) => Some(i.to_string()),
        Avro::Long(i) => Some(i.to_string()),
        Avro::Uuid(u) => Some(u.to_string()),
        Avro::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The output value for `key` from the left row and the right rows.
pub fn output_value(
    key: &str,
    left: Vec<(String, Avro)>,
    right: Vec<Vec<(String, Avro)>>,
    field: &str,
    count_field: Option<&str>,
) -> Avro {
    let mut out = Vec::with_capacity(left.len() + 3);
    out.push(("key".to_string(), Avro::String(key.to_string())));
    out.extend(left);
    match count_field {
        Some(cf) => {
            let n = i32::try_from(right.len()).unwrap_or(i32::MAX);
            out.push((
                field.to_string(),
                Avro::Array(right.into_iter().map(Avro::Record).collect()),
            ));
            out.push((cf.to_string(), Avro::Int(n)));
        }
        None => out.push((
            field.to_string(),
            match right.into_iter().next() {
                Some(r) => Avro::Union(1, Box::new(Avro::Record(r))),
                None => Avro::Union(0, Box::new(Avro::Null)),
            },
        )),
    }
    Avro::Record(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str, fields: &str) -> KnownSchema {
        KnownSchema::parse(&format!(
            r#"{{"type":"record","name":"{name}","namespace":"t","fields":[
            {{"name":"op","type":"string"}},
            {{"name":"before","type":["null",{{"type":"record","name":"{name}Row","fields":[{fields}]}}],"default":null}},
            {{"name":"after","type":["null","{name}Row"],"default":null}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn output_schema_embeds_the_right_rows_and_encodes() {
        let l = env(
            "User",
            r#"{"name":"user_id","type":["null","long"],"default":null},{"name":"name","type":["null","string"],"default":null}"#,
        );
        let r = env(
            "Conn",
            r#"{"name":"id","type":["null","long"],"default":null},{"name":"user_id","type":["null","long"],"default":null}"#,
        );
        let text = output_schema(
            &l,
            &r,
            "UserDocument",
            "unilog.join",
            "connections",
            Some("connections_count"),
        )
        .unwrap();
        let out = Schema::parse_str(&text).unwrap();
        let v = output_value(
            "1",
            vec![
                ("user_id".into(), Avro::Union(1, Box::new(Avro::Long(1)))),
                (
                    "name".into(),
                    Avro::Union(1, Box::new(Avro::String("a".into()))),
                ),
            ],
            vec![vec![
                ("id".into(), Avro::Union(1, Box::new(Avro::Long(7)))),
                ("user_id".into(), Avro::Union(1, Box::new(Avro::Long(1)))),
            ]],
            "connections",
            Some("connections_count"),
        );
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&out)
            .build()
            .unwrap()
            .write_value_to_vec(v)
            .unwrap();
        assert!(!bytes.is_empty());
        // One-to-one.
        let text = output_schema(&l, &r, "UserDocument", "unilog.join", "profile", None).unwrap();
        assert!(text.contains(r#""default":null"#));
        // A left field named like the embedded one is refused.
        assert!(output_schema(&l, &r, "D", "n", "name", None).is_err());
    }

    #[test]
    fn rows_and_keys() {
        let row = vec![("a".to_string(), Avro::Int(1))];
        let ev = |op: &str, after: Option<Vec<(String, Avro)>>| {
            Avro::Record(vec![
                ("op".into(), Avro::String(op.into())),
                (
                    "after".into(),
                    match after {
                        Some(r) => Avro::Union(1, Box::new(Avro::Record(r))),
                        None => Avro::Union(0, Box::new(Avro::Null)),
                    },
                ),
            ])
        };
        assert_eq!(
            row_of(ev("insert", Some(row.clone())), true),
            Some(row.clone())
        );
        assert_eq!(row_of(ev("delete", None), true), None);
        assert_eq!(row_of(Avro::Record(row.clone()), false), Some(row));
        assert_eq!(
            key_text(&Avro::Union(1, Box::new(Avro::Long(42)))).as_deref(),
            Some("42")
        );
        assert_eq!(key_text(&Avro::Union(0, Box::new(Avro::Null))), None);
    }
}
