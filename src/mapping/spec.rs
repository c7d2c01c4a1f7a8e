//! The YAML mapping file a platform team edits: which table changes become
//! which domain events, on which topic, with which fields.
//!
//! ```yaml
//! table: public.users          # schema.table (schema defaults to public)
//! topic: legacy.users          # the shared topic; subject is `<topic>-value`
//!                              # (default: `<schema>.<table>`, made a valid topic name)
//! record: User                 # Avro record name (default: from the table)
//! key: [id]                    # entity key (default: the primary key)
//! events:                      # event type per operation
//!   insert: UserRegistered
//!   update: UserProfileChanged
//!   delete: UserDeleted
//!   snapshot: UserRegistered   # default: the insert name
//!   truncate: UsersTruncated   # default: truncates are not published
//! columns:                     # publish these, in this order (default: all)
//!   id: user_id                # rename
//!   email:                     # keep the name
//!   created_at: { as: registered_at }
//!   plan: { type: string }     # publish as text
//! drop: [password_digest]      # never leaves the database
//! insert_only: false           # true: publish inserts only (append-only tables
//!                              # without a replica identity, such as audit logs)
//! children: include            # an inheritance parent: also its children's rows
//!                              # (`exclude`: the parent's own rows only)
//! debezium:                    # also publish Debezium's change envelope (optional)
//!   server_name: legacy        # Debezium's topic.prefix, the logical server name
//!   topic: legacy.public.users # default: <server_name>.<schema>.<table>
//!   tombstones: true           # a null-value record after each delete (default true)
//! ```
//!
//! With `debezium:`, every change is published a second time, on its own
//! topic, in the shape Debezium's PostgreSQL connector gives it with
//! Confluent's Avro converter (see [`super::debezium`]). That record carries
//! every column of the table under its own name and type, except the
//! `drop`ped ones: `columns:` selects what the domain event publishes, not
//! what the Debezium record leaves out, so a secret must be in `drop`.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;

use crate::config::{load_yaml, ConfigError};

/// One mapping file, as written.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    pub table: String,
    /// Default: `<schema>.<table>` made a valid topic name ([`default_topic`]).
    #[serde(default)]
    pub topic: String,
    pub record: Option<String>,
    pub key: Option<Vec<String>>,
    pub events: EventNames,
    pub columns: Option<IndexMap<String, Option<ColumnRule>>>,
    #[serde(default)]
    pub drop: Vec<String>,
    /// Also publish the Debezium-style change envelope.
    pub debezium: Option<DebeziumSpec>,
    /// MongoDB only: the declared type of each field, since a collection
    /// has no catalog. Documents that do not fit go to the dead-letter topic.
    pub fields: Option<IndexMap<String, FieldDecl>>,
    /// Publish inserts (and truncates) only, through the insert-only
    /// publication: for append-only tables without a replica identity,
    /// whose UPDATE and DELETE a full publication would make fail.
    #[serde(default)]
    pub insert_only: bool,
    /// An inheritance parent: whether its children's rows are published
    /// too (as `SELECT * FROM parent` shows them) or only its own.
    #[serde(default)]
    pub children: ChildRows,
}

/// Which rows of an inheritance parent a mapping covers.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChildRows {
    /// The parent's and every child's (`SELECT * FROM parent`).
    #[default]
    Include,
    /// The parent's own rows only (`SELECT * FROM ONLY parent`).
    Exclude,
}

/// The declared type of one document field: `email: string`, or the long
/// form `{ type: document, required: true, fields: {...} }`.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum FieldDecl {
    Short(BsonType),
    Long(FieldDetail),
}

/// The long form of a field declaration.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldDetail {
    #[serde(rename = "type")]
    pub ty: BsonType,
    /// A document where the field is missing or null does not fit.
    #[serde(default)]
    pub required: bool,
    /// For `document`: its fields.
    pub fields: Option<IndexMap<String, FieldDecl>>,
    /// For `array`: the type of its items.
    pub items: Option<Box<FieldDecl>>,
}

/// Field types a MongoDB mapping can declare.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BsonType {
    /// ObjectId, published as its 24-digit hex string.
    ObjectId,
    String,
    /// 32-bit integer (a 64-bit one that fits is accepted).
    Int,
    /// 64-bit integer (32-bit ones are accepted).
    Long,
    /// Double (integers are accepted).
    Double,
    /// Decimal128 (or any number), published as its exact text.
    Decimal,
    Bool,
    /// BSON date, published as Avro `timestamp-micros`.
    Date,
    /// Binary data.
    Binary,
    /// Binary subtype 4, published as Avro `uuid`.
    Uuid,
    /// Any value, published as relaxed extended JSON text.
    Json,
    /// A sub-document with declared `fields`, published as a nested record.
    Document,
    /// An array with declared `items`.
    Array,
}

impl FieldDecl {
    /// The declared type.
    pub fn ty(&self) -> BsonType {
        match self {
            FieldDecl::Short(t) => *t,
            FieldDecl::Long(d) => d.ty,
        }
    }

    /// Whether the field must be present and non-null.
    pub fn required(&self) -> bool {
        matches!(self, FieldDecl::Long(d) if d.required)
    }
}

/// `debezium:`: the Debezium-compatible change envelope beside the domain event.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebeziumSpec {
    /// Debezium's `topic.prefix` (the logical server name): the `name` in
    /// `source`, the first part of the topic and of the record names.
    pub server_name: String,
    /// Default: `<server_name>.<schema>.<table>`.
    pub topic: Option<String>,
    /// A null-value record with the same key after each delete, so that
    /// log compaction can remove the row (Debezium's `tombstones.on.delete`).
    #[serde(default = "default_tombstones")]
    pub tombstones: bool,
}

const fn default_tombstones() -> bool {
    true
}

/// Event type names per operation.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct EventNames {
    pub insert: String,
    /// Required unless the mapping is `insert_only`.
    pub update: Option<String>,
    /// Required unless the mapping is `insert_only`.
    pub delete: Option<String>,
    pub snapshot: Option<String>,
    pub truncate: Option<String>,
}

/// How one column is published.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum ColumnRule {
    /// `column: new_name`
    Rename(String),
    /// `column: { as: new_name, type: string }`
    Detailed(ColumnDetail),
}

/// The long form of a column rule.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ColumnDetail {
    #[serde(rename = "as")]
    pub rename: Option<String>,
    #[serde(rename = "type")]
    pub type_override: Option<TypeOverride>,
}

/// Published types a column can be forced to.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TypeOverride {
    /// The value's text form.
    String,
}

/// A mapping file with its path and text, for error messages.
#[derive(Debug, Clone)]
pub struct LoadedMapping {
    pub path: PathBuf,
    pub text: String,
    pub spec: MappingSpec,
}

impl LoadedMapping {
    /// Reads and parses one mapping file (syntax and key names only; the
    /// checks against the table happen when the [`super::Mapper`] is built).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut spec, text): (MappingSpec, String) = load_yaml(path)?;
        if spec.topic.is_empty() {
            spec.topic = default_topic(&qualify(&spec.table));
        }
        let loaded = LoadedMapping {
            path: path.to_path_buf(),
            text,
            spec,
        };
        loaded.check_names()?;
        Ok(loaded)
    }

    /// An error about `field` of this file.
    pub fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at_field(&self.path, &self.text, field, message)
    }

    /// `schema.table` of the mapped table.
    pub fn qualified_table(&self) -> String {
        qualify(&self.spec.table)
    }

    /// (schema, table) of a PostgreSQL mapping: `table:` split at its first
    /// dot outside double quotes, quotes removed (`'"my.schema".orders'`).
    pub fn table_parts(&self) -> (String, String) {
        split_qualified(&self.spec.table)
    }

    fn check_names(&self) -> Result<(), ConfigError> {
        let s = &self.spec;
        if !is_topic_name(&s.topic) {
            return Err(self.err(
                "topic",
                format!(
                    "`{}` is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`)",
                    s.topic
                ),
            ));
        }
        if let Some(r) = &s.record {
            if !is_avro_name(r) {
                return Err(self.err(
                    "record",
                    format!("`{r}` is not a valid Avro record name ([A-Za-z_][A-Za-z0-9_]*)"),
                ));
            }
        }
        if !s.insert_only {
            for (field, name) in [("update", &s.events.update), ("delete", &s.events.delete)] {
                if name.is_none() {
                    return Err(self.err(
                        "events",
                        format!("missing field `{field}`: name the event of each operation (or set `insert_only: true` for a table that is only inserted into)"),
                    ));
                }
            }
        }
        if split_qualified_checked(&s.table).is_err() {
            return Err(self.err(
                "table",
                format!("`{}` is not a table name: write `schema.table`, and put a name holding a dot in double quotes (`'\"my.schema\".orders'`)", s.table),
            ));
        }
        let names = [
            ("events.insert", Some(&s.events.insert)),
            ("events.update", s.events.update.as_ref()),
            ("events.delete", s.events.delete.as_ref()),
            ("events.snapshot", s.events.snapshot.as_ref()),
            ("events.truncate", s.events.truncate.as_ref()),
        ];
        for (field, name) in names {
            if let Some(n) = name {
                let ok = n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'));
                if !ok {
                    return Err(self.err(field, format!("`{n}` is not an event type name (letters, digits, `_`, `.`; starts with a letter)")));
                }
            }
        }
        if let Some(dz) = &s.debezium {
            if dz.server_name.is_empty()
                || !dz
                    .server_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(self.err(
                    "debezium.server_name",
                    format!(
                        "`{}` is not a valid server name (letters, digits, `.`, `_`, `-`, as Debezium's topic.prefix)",
                        dz.server_name
                    ),
                ));
            }
            if let Some(t) = &dz.topic {
                if !is_topic_name(t) {
                    return Err(self.err(
                        "debezium.topic",
                        format!("`{t}` is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`)"),
                    ));
                }
            }
        }
        if let Some(cols) = &s.columns {
            for (col, rule) in cols {
                if s.drop.contains(col) {
                    return Err(self.err("drop", format!("`{col}` is both published (columns) and dropped; remove it from one of them")));
                }
                if let Some(out) = rule.as_ref().and_then(ColumnRule::rename) {
                    if !is_avro_name(out) {
                        return Err(self.err(
                            &format!("columns.{col}"),
                            format!("`{out}` is not a valid field name ([A-Za-z_][A-Za-z0-9_]*)"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl ColumnRule {
    /// The published name, when renamed.
    pub fn rename(&self) -> Option<&str> {
        match self {
            ColumnRule::Rename(n) => Some(n),
            ColumnRule::Detailed(d) => d.rename.as_deref(),
        }
    }

    /// The forced type, if any.
    pub fn type_override(&self) -> Option<TypeOverride> {
        match self {
            ColumnRule::Rename(_) => None,
            ColumnRule::Detailed(d) => d.type_override,
        }
    }
}

/// `users` -> `public.users`; `'"my.schema"."Order Items"'` ->
/// `my.schema.Order Items` (the catalog's names joined by a dot, as
/// [`crate::event::TableInfo::qualified`] writes them).
pub fn qualify(table: &str) -> String {
    if table.contains('"') {
        let (schema, name) = split_qualified(table);
        crate::event::pg_qualified(&schema, &name)
    } else if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    }
}

/// (schema, table) of `table:`; see [`LoadedMapping::table_parts`]. A
/// malformed name is split as well as it can be (loading refuses it).
pub fn split_qualified(table: &str) -> (String, String) {
    split_qualified_checked(table).unwrap_or_else(|()| match table.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("public".to_string(), table.to_string()),
    })
}

/// Splits at the first dot outside double quotes and unquotes each part
/// (`""` inside quotes is one `"`). `Err` for an unterminated quote, an
/// empty part, or text after a closing quote.
fn split_qualified_checked(table: &str) -> Result<(String, String), ()> {
    let mut parts = vec![String::new()];
    let mut chars = table.chars().peekable();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if parts.last().is_some_and(String::is_empty) && !quoted_part => {
                quoted_part = true;
                loop {
                    match chars.next() {
                        None => return Err(()),
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            parts.last_mut().ok_or(())?.push('"');
                        }
                        Some('"') => break,
                        Some(c) => parts.last_mut().ok_or(())?.push(c),
                    }
                }
                if !matches!(chars.peek(), None | Some('.')) {
                    return Err(());
                }
            }
            '"' => return Err(()),
            '.' if parts.len() == 1 => {
                if parts[0].is_empty() {
                    return Err(());
                }
                parts.push(String::new());
                quoted_part = false;
            }
            c => parts.last_mut().ok_or(())?.push(c),
        }
    }
    match parts.as_slice() {
        [name] if !name.is_empty() => Ok(("public".to_string(), name.clone())),
        [schema, name] if !schema.is_empty() && !name.is_empty() => {
            Ok((schema.clone(), name.clone()))
        }
        _ => Err(()),
    }
}

/// The topic of a mapping without `topic:`: `<schema>.<table>`, every
/// character a topic name cannot hold replaced by `_`, and a name longer
/// than Kafka's 249 characters cut, with a hash of the whole name, so two
/// long names do not meet.
pub fn default_topic(qualified: &str) -> String {
    let clean: String = qualified
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.len() <= 249 && clean != "." && clean != ".." {
        return clean;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = qualified.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}.{hash:016x}", &clean[..232])
}

/// Kafka topic names: 1 to 249 of letters, digits, `.`, `_`, `-`.
pub fn is_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Avro names: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_avro_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A column name made into a valid Avro name (`first-name` -> `first_name`).
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
    {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LoadedMapping, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.yaml");
        std::fs::write(&p, text).unwrap();
        LoadedMapping::load(&p)
    }

    const GOOD: &str = "table: users\ntopic: legacy.users\nevents:\n  insert: UserRegistered\n  update: UserUpdated\n  delete: UserDeleted\ncolumns:\n  id: user_id\n  email:\n  created_at: { as: registered_at }\n  plan: { type: string }\ndrop: [password_digest]\n";

    #[test]
    fn parses_all_column_forms_in_order() {
        let m = load(GOOD).unwrap();
        assert_eq!(m.qualified_table(), "public.users");
        let cols = m.spec.columns.as_ref().unwrap();
        let names: Vec<_> = cols.keys().cloned().collect();
        assert_eq!(names, ["id", "email", "created_at", "plan"]);
        assert_eq!(cols["id"].as_ref().unwrap().rename(), Some("user_id"));
        assert!(cols["email"].is_none());
        assert_eq!(
            cols["created_at"].as_ref().unwrap().rename(),
            Some("registered_at")
        );
        assert_eq!(
            cols["plan"].as_ref().unwrap().type_override(),
            Some(TypeOverride::String)
        );
    }

    #[test]
    fn unknown_key_names_its_line() {
        let err = load(&GOOD.replace("drop:", "dorp:"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("users.yaml:12") && err.contains("unknown field `dorp`"),
            "{err}"
        );
    }

    #[test]
    fn missing_event_name_is_refused() {
        let err = load(&GOOD.replace("  delete: UserDeleted\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `delete`"), "{err}");
    }

    #[test]
    fn bad_field_name_is_refused() {
        let err = load(&GOOD.replace("id: user_id", "id: user-id"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("users.yaml:8: field `columns.id`"), "{err}");
    }

    #[test]
    fn debezium_option_has_defaults_and_refuses_unknown_keys() {
        let m = load(&format!("{GOOD}debezium:\n  server_name: legacy\n")).unwrap();
        let dz = m.spec.debezium.as_ref().unwrap();
        assert_eq!(dz.server_name, "legacy");
        assert_eq!(dz.topic, None);
        assert!(dz.tombstones);
        let m = load(&format!(
            "{GOOD}debezium:\n  server_name: legacy\n  topic: legacy.public.users\n  tombstones: false\n"
        ))
        .unwrap();
        let dz = m.spec.debezium.as_ref().unwrap();
        assert_eq!(dz.topic.as_deref(), Some("legacy.public.users"));
        assert!(!dz.tombstones);
        let err = load(&format!(
            "{GOOD}debezium:\n  server_name: legacy\n  tombstone: false\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `tombstone`"), "{err}");
        let err = load(&format!("{GOOD}debezium:\n  server_name: leg acy\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("users.yaml:14: field `debezium.server_name`"),
            "{err}"
        );
        let err = load(&format!("{GOOD}debezium:\n  topic: x\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `server_name`"), "{err}");
    }

    #[test]
    fn table_names_split_outside_quotes() {
        assert_eq!(split_qualified("users"), ("public".into(), "users".into()));
        assert_eq!(split_qualified("app.users"), ("app".into(), "users".into()));
        assert_eq!(
            split_qualified("app.order.items"),
            ("app".into(), "order.items".into())
        );
        assert_eq!(
            split_qualified("\"my.schema\".\"Order \"\"Items\"\"\""),
            ("my.schema".into(), "Order \"Items\"".into())
        );
        assert_eq!(
            split_qualified("\"Ünïcode\""),
            ("public".into(), "Ünïcode".into())
        );
        for bad in ["\"open", ".x", "a.", "\"a\"b.c", "a.\"b\"c"] {
            assert!(split_qualified_checked(bad).is_err(), "{bad}");
        }
        assert_eq!(qualify("\"my.schema\".t"), "my.schema.t");
    }

    #[test]
    fn default_topics_are_valid_for_any_table() {
        assert_eq!(default_topic("public.users"), "public.users");
        assert_eq!(
            default_topic("public.Order Items (2024)"),
            "public.Order_Items__2024_"
        );
        assert_eq!(default_topic("app.Ünïcode"), "app._n_code");
        let long = format!("public.{}", "x".repeat(300));
        let t = default_topic(&long);
        assert!(is_topic_name(&t) && t.len() <= 249, "{t}");
        assert_ne!(t, default_topic(&format!("{long}y")));
    }

    #[test]
    fn insert_only_mappings_need_no_update_or_delete_event() {
        let m =
            load("table: audit\ninsert_only: true\nkey: [id]\nevents:\n  insert: AuditLogged\n")
                .unwrap();
        assert!(m.spec.insert_only);
        assert_eq!(m.spec.topic, "public.audit");
        let err = load("table: audit\nevents:\n  insert: AuditLogged\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing field `update`") && err.contains("insert_only: true"),
            "{err}"
        );
    }

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize_name("first-name"), "first_name");
        assert_eq!(sanitize_name("1st"), "_1st");
        assert!(is_avro_name("_a1") && !is_avro_name("a-b"));
    }
}
