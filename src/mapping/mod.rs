//! Mapping: row changes become domain events.
//!
//! A [`Mapper`] is built from the YAML mapping files (`spec`) and the
//! tables' catalog entries. Building it checks every name in the files
//! against the table; [`Mapper::register`] then derives each topic's Avro
//! schema (`avro`), checks it against the schema registry (`registry`) and
//! refuses to start on an incompatible one. [`Mapper::map`] turns one
//! [`ChangeEvent`] into one framed Avro record, in the Confluent wire format
//! (`0x00`, schema id as big-endian u32, Avro binary body).
//!
//! Every event has the same envelope, whatever the table:
//! `event_type`, `op`, `key`, `dedup_id`, `before`, `after`, `source`.
//!
//! A mapping with `debezium:` also publishes each change in Debezium's
//! change event envelope, on a topic of its own (`debezium`):
//! [`Mapper::map_into`] appends those records after the domain event.

pub mod avro;
pub mod debezium;
pub mod registry;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::config::ConfigError;
use crate::event::{ChangeEvent, Op, SourceKind, TableInfo, Value};
use avro::{render_text, write_bytes, write_long, write_nullable, AvroType, EncodeError};
use registry::{RegistryClient, RegistryError};
use spec::{sanitize_name, LoadedMapping, TypeOverride};

/// A change with its domain meaning, ready for Kafka.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainEvent {
    pub topic: Arc<str>,
    /// The entity key (Kafka message key); `None` for table-wide events.
    pub key: Option<Vec<u8>>,
    /// Same for the same change delivered twice.
    pub dedup_id: String,
    pub event_type: Arc<str>,
    pub schema_id: u32,
    /// Confluent wire format: magic byte, schema id, Avro body. `None` for a
    /// tombstone (a record with a null value, which log compaction treats as
    /// the deletion of its key).
    pub payload: Option<Vec<u8>>,
}

/// What stops a mapping.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: {source}")]
    Registry {
        file: PathBuf,
        #[source]
        source: RegistryError,
    },
    #[error("{file}: the schema derived for table {table} is incompatible with the latest version registered under subject `{subject}`.\n  registry says: {}\n  to fix: keep published fields and their types (new columns are published as optional fields, which is compatible), \
publish to a new topic (for example `{topic_v2}`), or change the subject's compatibility level in the registry", messages.join("\n                ")
    )]
    Incompatible {
        file: PathBuf,
        table: String,
        subject: String,
        topic_v2: String,
        messages: Vec<String>,
    },
    #[error("table {table}, column `{column}`, key {key}: {source}")]
    Encode {
        table: String,
        column: String,
        key: String,
        #[source]
        source: EncodeError,
    },
    #[error("table {table}: {message}")]
    Drift { table: String, message: String },
    #[error("table {table}: the {op} of a row has no value for key column `{column}`")]
    MissingKey {
        table: String,
        op: &'static str,
        column: String,
    },
    /// An event larger than Kafka accepts (checked before it is handed
    /// over, so one large row never stops the pipeline).
    #[error("table {table}, key {key}: the event is {size} bytes, more than the {limit} bytes Kafka accepts ({from}); it is not published. To publish such rows, raise the topic's max.message.bytes (and kafka.properties message.max.bytes), or leave the large column out of the mapping (`drop:`)")]
    TooLarge {
        table: String,
        key: String,
        size: usize,
        limit: usize,
        from: String,
    },
    /// Several mappings refused at once (each with its file and line).
    #[error("{} problems found:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<MappingError>),
}

impl MappingError {
    /// Whether retrying could help (only registry outages).
    pub fn is_transient(&self) -> bool {
        matches!(self, MappingError::Registry { source, .. } if source.is_transient())
    }

    /// Whether the error is in the data of one change (a poison row, which
    /// may go to the dead-letter topic) rather than in the setup.
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            MappingError::Encode { .. }
                | MappingError::MissingKey { .. }
                | MappingError::TooLarge { .. }
        )
    }
}

/// How many tables' schemas are checked and registered at once at start.
pub const REGISTER_CONCURRENCY: usize = 8;

/// After the dedup id of a key-changing update, for the delete of its old key.
pub const OLD_KEY_SUFFIX: &str = "/old-key";

/// The id that is the same whenever the same change is delivered again:
/// `pg/<database>/<commit LSN>/<ordinal>` (`s<ordinal>` for snapshot rows).
pub fn dedup_id(ev: &ChangeEvent) -> String {
    if let Some(id) = &ev.id {
        return format!("mongo/{}/{id}", ev.table.database);
    }
    match ev.op {
        Op::Snapshot => format!(
            "pg/{}/{}/s{}",
            ev.table.database, ev.seq.commit, ev.seq.ordinal
        ),
        _ => format!(
            "pg/{}/{}/{}",
            ev.table.database, ev.seq.commit, ev.seq.ordinal
        ),
    }
}

/// One published field.
#[derive(Clone, Debug)]
struct FieldPlan {
    column: String,
    out: String,
    ty: AvroType,
}

/// Column positions of a rule in one version of the table.
struct Positions {
    table: Arc<TableInfo>,
    fields: Vec<usize>,
    key: Vec<usize>,
}

/// The compiled mapping of one table.
struct TableRule {
    file: PathBuf,
    table: String,
    topic: Arc<str>,
    subject: String,
    events: HashMap<&'static str, Arc<str>>,
    fields: Vec<FieldPlan>,
    key_columns: Vec<String>,
    schema: String,
    schema_id: Option<u32>,
    positions: Option<Positions>,
    /// The Debezium envelope, when the mapping asks for it.
    debezium: Option<debezium::DebeziumRule>,
    /// The mapping file, kept to compile again when the table changes.
    mapping: Arc<LoadedMapping>,
    /// The table as this rule was compiled against.
    compiled_against: Arc<TableInfo>,
}

/// Turns [`ChangeEvent`]s into [`DomainEvent`]s by the mapping files.
pub struct Mapper {
    rules: HashMap<String, TableRule>,
    /// Whether any rule publishes the Debezium envelope.
    with_debezium: bool,
}

impl Mapper {
    /// Compiles mapping files against the tables they name (`tables` is
    /// keyed by `schema.table`). Refuses names that do not exist, tables
    /// without a key, types that cannot be published, and two mappings on
    /// one topic.
    pub fn new(
        mappings: &[LoadedMapping],
        tables: &HashMap<String, Arc<TableInfo>>,
    ) -> Result<Self, MappingError> {
        let mut rules = HashMap::new();
        let mut topics: HashMap<String, PathBuf> = HashMap::new();
        let mut problems: Vec<MappingError> = Vec::new();
        for m in mappings {
            let qualified = m.qualified_table();
            let Some(table) = tables.get(&qualified) else {
                problems.push(m.err("table", format!("table {qualified} does not exist in the database (or the user cannot see it)")).into());
                continue;
            };
            if let Some(other) = topics.insert(m.spec.topic.clone(), m.path.clone()) {
                problems.push(m
                    .err(
                        "topic",
                        format!(
                            "topic `{}` is already used by {}; each topic carries one record type (subject `<topic>-value`), so give each table its own topic",
                            m.spec.topic,
                            other.display()
                        ),
                    )
                    .into());
                continue;
            }
            if rules.contains_key(&qualified) {
                problems.push(
                    m.err("table", format!("table {qualified} is mapped twice"))
                        .into(),
                );
                continue;
            }
            let mut rule = match compile(m, table) {
                Ok(rule) => rule,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            rule.compiled_against = table.clone();
            if let Some(dz) = &rule.debezium {
                if let Some(other) = topics.insert(dz.topic.to_string(), m.path.clone()) {
                    problems.push(m
                        .err(
                            "debezium",
                            format!(
                                "the Debezium topic `{}` is already used by {}; set `debezium.topic` (or another `debezium.server_name`)",
                                dz.topic,
                                other.display()
                            ),
                        )
                        .into());
                    continue;
                }
            }
            rules.insert(qualified, rule);
        }
        match problems.len() {
            0 => {}
            1 => return Err(problems.remove(0)),
            _ => return Err(MappingError::Many(problems)),
        }
        let with_debezium = rules.values().any(|r| r.debezium.is_some());
        Ok(Mapper {
            rules,
            with_debezium,
        })
    }

    /// The mapped tables, `schema.table`.
    pub fn tables(&self) -> Vec<String> {
        let mut t: Vec<_> = self.rules.keys().cloned().collect();
        t.sort();
        t
    }

    /// The topics events go to (the Debezium topics included).
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<_> = self
            .rules
            .values()
            .flat_map(|r| {
                std::iter::once(r.topic.to_string())
                    .chain(r.debezium.as_ref().map(|d| d.topic.to_string()))
            })
            .collect();
        t.sort();
        t
    }

    /// (subject, schema JSON) of every subject the mappings register: per
    /// mapped table the domain event's, and the Debezium value and key
    /// schemas where asked for. For inspection and tests.
    pub fn schemas(&self) -> Vec<(String, String)> {
        let mut s: Vec<_> = self
            .rules
            .values()
            .flat_map(|r| {
                let mut v = vec![(r.subject.clone(), r.schema.clone())];
                if let Some(d) = &r.debezium {
                    v.push((d.value_subject.clone(), d.value_schema.clone()));
                    v.push((d.key_subject.clone(), d.key_schema.clone()));
                }
                v
            })
            .collect();
        s.sort();
        s
    }

    /// Checks every derived schema against the registry and, unless
    /// `dry_run`, registers it. A dry run only needs each schema to be
    /// compatible; it writes nothing. Returns (subject, id or None) pairs.
    ///
    /// Up to [`REGISTER_CONCURRENCY`] tables at a time, so that a pipeline
    /// of hundreds of tables starts in seconds; the answer is in table order,
    /// and the first refusal (in table order) is the error.
    pub async fn register(
        &mut self,
        registry: &RegistryClient,
        dry_run: bool,
    ) -> Result<Vec<(String, Option<u32>)>, MappingError> {
        let mut rules: Vec<(&String, &mut TableRule)> = self.rules.iter_mut().collect();
        rules.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = Vec::new();
        for chunk in rules.chunks_mut(REGISTER_CONCURRENCY) {
            let batch = chunk
                .iter_mut()
                .map(|(_, rule)| register_rule(rule, registry, dry_run));
            for r in futures::future::join_all(batch).await {
                out.extend(r?);
            }
        }
        Ok(out)
    }

    /// Whether `table` (from the stream) differs in its columns or their
    /// types from the table its rule was compiled against: a schema change.
    pub fn needs_refresh(&mut self, table: &Arc<TableInfo>) -> bool {
        let Some(rule) = self.rules.values_mut().find(|r| {
            Arc::ptr_eq(&r.compiled_against, table)
                || (r.compiled_against.name == table.name
                    && r.compiled_against.schema == table.schema)
        }) else {
            return false;
        };
        if Arc::ptr_eq(&rule.compiled_against, table) {
            return false;
        }
        let a = &rule.compiled_against.columns;
        let b = &table.columns;
        let same = a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.name == y.name && x.ty == y.ty);
        if same {
            // Same shape, another description (e.g. nullability): adopt it.
            rule.compiled_against = table.clone();
        }
        !same
    }

    /// Compiles the table's mapping again against its new shape, checks the
    /// derived schemas with the registry and registers them. Refuses (and so
    /// stops the pipeline) when the mapping names a column that is gone, or
    /// when the registry finds the new schema incompatible. Returns the
    /// (subject, id) pairs now in use.
    pub async fn refresh(
        &mut self,
        table: &Arc<TableInfo>,
        registry: &RegistryClient,
    ) -> Result<Vec<(String, Option<u32>)>, MappingError> {
        let q = table.qualified();
        let Some(old) = self.rules.get(&q) else {
            return Ok(Vec::new());
        };
        let mapping = old.mapping.clone();
        let mut rule = compile(&mapping, table)?;
        rule.compiled_against = table.clone();
        let ids = register_rule(&mut rule, registry, false).await?;
        self.rules.insert(q, rule);
        Ok(ids)
    }

    /// Maps one change into every record it publishes (the domain event,
    /// and any further envelope a mapping asks for), appended to `out`.
    /// Returns how many were appended.
    ///
    /// With `debezium:`, the Debezium records of the change follow the
    /// domain event: one change event, and after a delete its tombstone
    /// (see [`debezium`]). They are published only when the domain event
    /// is, so a truncate reaches the Debezium topic only when the mapping
    /// names a truncate event.
    ///
    /// An update that changes the entity key is published as two domain
    /// events: a delete of the old key (dedup id with [`OLD_KEY_SUFFIX`]),
    /// then the update under the new key, so that a topic compacted by key
    /// (and a consumer folding it) keeps no row under the old key. The
    /// Debezium records follow the update, split as Debezium splits it:
    /// delete, tombstone, create.
    pub fn map_into(
        &mut self,
        ev: &ChangeEvent,
        out: &mut Vec<DomainEvent>,
    ) -> Result<usize, MappingError> {
        if ev.op == Op::Update && self.key_changed(ev)? {
            let old = ChangeEvent {
                op: Op::Delete,
                after: None,
                ..ev.clone()
            };
            let n = self.map_one_into(&old, OLD_KEY_SUFFIX, false, out)?;
            return Ok(n + self.map_one_into(ev, "", true, out)?);
        }
        self.map_one_into(ev, "", true, out)
    }

    /// Whether an update's old row names another entity key than its new row.
    fn key_changed(&mut self, ev: &ChangeEvent) -> Result<bool, MappingError> {
        let (Some(before), Some(after)) = (&ev.before, &ev.after) else {
            return Ok(false);
        };
        let Some(rule) = self.rules.get_mut(&ev.table.qualified()) else {
            return Ok(false);
        };
        ensure_positions(rule, &ev.table)?;
        let Some(pos) = rule.positions.as_ref() else {
            return Ok(false);
        };
        Ok(pos
            .key
            .iter()
            .any(|&i| match (before.get(i), after.get(i)) {
                (Some(Value::Null | Value::Unchanged) | None, _) | (_, None) => false,
                (Some(b), Some(a)) => render_text(b) != render_text(a),
            }))
    }

    /// Maps `ev` into its domain event and, with `debezium`, the Debezium
    /// records of the change (which split a key change on their own).
    fn map_one_into(
        &mut self,
        ev: &ChangeEvent,
        dedup_suffix: &str,
        debezium: bool,
        out: &mut Vec<DomainEvent>,
    ) -> Result<usize, MappingError> {
        let Some(d) = self.map_as(ev, dedup_suffix)? else {
            return Ok(0);
        };
        let start = out.len();
        let dz = if self.with_debezium && debezium {
            self.rules
                .get_mut(&ev.table.qualified())
                .and_then(|r| r.debezium.as_mut())
        } else {
            None
        };
        match dz {
            None => out.push(d),
            Some(dz) => {
                let mut records = dz.map(ev, &d)?;
                out.push(d);
                out.append(&mut records);
            }
        }
        Ok(out.len() - start)
    }

    /// Maps one change. `Ok(None)` when the table is not mapped or the
    /// operation is not published (truncate without an event name).
    pub fn map(&mut self, ev: &ChangeEvent) -> Result<Option<DomainEvent>, MappingError> {
        self.map_as(ev, "")
    }

    /// [`Self::map`], with `dedup_suffix` after the dedup id.
    fn map_as(
        &mut self,
        ev: &ChangeEvent,
        dedup_suffix: &str,
    ) -> Result<Option<DomainEvent>, MappingError> {
        let qualified = ev.table.qualified();
        let Some(rule) = self.rules.get_mut(&qualified) else {
            return Ok(None);
        };
        let Some(event_type) = rule.events.get(ev.op.as_str()).cloned() else {
            return Ok(None);
        };
        let Some(schema_id) = rule.schema_id else {
            return Err(MappingError::Drift {
                table: qualified,
                message:
                    "the mapping's schema was not registered before mapping (internal order error)"
                        .into(),
            });
        };
        ensure_positions(rule, &ev.table)?;
        let Some(pos) = rule.positions.as_ref() else {
            return Ok(None);
        };

        let key_row = ev.after.as_ref().or(ev.before.as_ref());
        let key_text = match (ev.op, key_row) {
            (Op::Truncate, _) | (_, None) => None,
            (_, Some(row)) => {
                let mut parts = Vec::with_capacity(pos.key.len());
                for (i, &idx) in pos.key.iter().enumerate() {
                    let Some(text) = row.get(idx).and_then(render_text) else {
                        return Err(MappingError::MissingKey {
                            table: qualified,
                            op: ev.op.as_str(),
                            column: rule.key_columns[i].clone(),
                        });
                    };
                    parts.push(text);
                }
                Some(if parts.len() == 1 {
                    parts.pop().unwrap_or_default()
                } else {
                    serde_json::Value::from(parts).to_string()
                })
            }
        };

        let mut dedup_id = dedup_id(ev);
        dedup_id.push_str(dedup_suffix);

        let mut buf = Vec::with_capacity(128);
        buf.push(0);
        buf.extend_from_slice(&schema_id.to_be_bytes());
        write_bytes(&mut buf, event_type.as_bytes());
        write_bytes(&mut buf, ev.op.as_str().as_bytes());
        write_bytes(&mut buf, key_text.as_deref().unwrap_or_default().as_bytes());
        write_bytes(&mut buf, dedup_id.as_bytes());
        for row in [&ev.before, &ev.after] {
            match row {
                None => buf.push(0),
                Some(row) => {
                    buf.push(2);
                    for (f, &idx) in rule.fields.iter().zip(&pos.fields) {
                        let v = row.get(idx).unwrap_or(&Value::Null);
                        write_nullable(&mut buf, &f.ty, v).map_err(|source| {
                            MappingError::Encode {
                                table: qualified.clone(),
                                column: f.column.clone(),
                                key: key_text.clone().unwrap_or_default(),
                                source,
                            }
                        })?;
                    }
                }
            }
        }
        write_bytes(&mut buf, ev.table.kind.connector().as_bytes());
        write_bytes(&mut buf, ev.table.database.as_bytes());
        // An inheritance child's rows name the child they live in.
        let (schema, name) = match &ev.meta.relation {
            Some(r) => (r.0.as_str(), r.1.as_str()),
            None => (ev.table.schema.as_str(), ev.table.name.as_str()),
        };
        write_bytes(&mut buf, schema.as_bytes());
        write_bytes(&mut buf, name.as_bytes());
        write_long(&mut buf, i64::try_from(ev.meta.lsn.0).unwrap_or(i64::MAX));
        write_nullable(
            &mut buf,
            &AvroType::Long,
            &ev.meta
                .xid
                .map_or(Value::Null, |x| Value::Int(i64::from(x))),
        )
        .map_err(|source| MappingError::Encode {
            table: qualified.clone(),
            column: "source.xid".into(),
            key: String::new(),
            source,
        })?;
        write_nullable(
            &mut buf,
            &AvroType::TimestampMicros,
            &ev.meta
                .commit_time_micros
                .map_or(Value::Null, Value::TimestampMicros),
        )
        .map_err(|source| MappingError::Encode {
            table: qualified.clone(),
            column: "source.commit_time".into(),
            key: String::new(),
            source,
        })?;
        buf.push(u8::from(ev.op == Op::Snapshot));
        if ev.table.kind == SourceKind::Mongo {
            match &ev.changed {
                None => buf.push(0),
                Some(paths) => {
                    buf.push(2);
                    if !paths.is_empty() {
                        write_long(&mut buf, i64::try_from(paths.len()).unwrap_or(i64::MAX));
                        for p in paths {
                            write_bytes(&mut buf, p.as_bytes());
                        }
                    }
                    buf.push(0);
                }
            }
        }

        Ok(Some(DomainEvent {
            topic: rule.topic.clone(),
            key: key_text.map(String::into_bytes),
            dedup_id,
            event_type,
            schema_id,
            payload: Some(buf),
        }))
    }
}

fn columns_list(table: &TableInfo) -> String {
    table
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn compile(m: &LoadedMapping, table: &TableInfo) -> Result<TableRule, MappingError> {
    let q = table.qualified();
    let missing = |field: &str, col: &str| {
        m.err(
            field,
            format!(
                "table {q} has no column `{col}`; its columns are: {}",
                columns_list(table)
            ),
        )
    };
    for col in &m.spec.drop {
        if table.column_index(col).is_none() {
            return Err(missing("drop", col).into());
        }
    }
    // Which columns, in which order, under which names.
    let chosen: Vec<(String, Option<spec::ColumnRule>)> = match &m.spec.columns {
        Some(cols) => {
            for col in cols.keys() {
                if table.column_index(col).is_none() {
                    return Err(missing(&format!("columns.{col}"), col).into());
                }
            }
            cols.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        }
        None => table
            .columns
            .iter()
            .filter(|c| !m.spec.drop.contains(&c.name))
            .map(|c| (c.name.clone(), None))
            .collect(),
    };
    let row_name = m
        .spec
        .record
        .clone()
        .unwrap_or_else(|| pascal_case(&table.name));
    let mut fields = Vec::with_capacity(chosen.len());
    let mut seen = HashSet::new();
    for (col, rule) in chosen {
        let info = &table.columns[table.column_index(&col).unwrap_or_default()];
        let out = rule
            .as_ref()
            .and_then(|r| r.rename().map(str::to_string))
            .unwrap_or_else(|| sanitize_name(&col));
        let field = format!("columns.{col}");
        if !seen.insert(out.clone()) {
            return Err(m
                .err(
                    &field,
                    format!("two columns are published as `{out}`; rename one"),
                )
                .into());
        }
        let ty = match rule.as_ref().and_then(spec::ColumnRule::type_override) {
            Some(TypeOverride::String) => AvroType::String,
            None => AvroType::for_column_named(&info.ty, &format!("{row_name}{}", pascal_case(&out))).map_err(|why| {
                let where_ = if m.spec.columns.is_some() { field.as_str() } else { "table" };
                m.err(
                    where_,
                    format!(
                        "column `{col}` of {q} has type `{}`: {why}; drop it (`drop: [{col}]`) or publish its text (`columns: {{ {col}: {{ type: string }} }}`)",
                        info.type_name
                    ),
                )
            })?,
        };
        fields.push(FieldPlan {
            column: col,
            out,
            ty,
        });
    }
    let key_columns = match &m.spec.key {
        Some(k) => {
            if k.is_empty() {
                return Err(m.err("key", "is empty; name the key column(s)").into());
            }
            for col in k {
                if table.column_index(col).is_none() {
                    return Err(missing("key", col).into());
                }
            }
            k.clone()
        }
        None => {
            let pk: Vec<String> = table
                .columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone())
                .collect();
            if pk.is_empty() {
                return Err(m
                    .err(
                        "table",
                        format!("table {q} has no primary key; name the entity key with `key: [column, ...]` (and give the table a replica identity)"),
                    )
                    .into());
            }
            pk
        }
    };
    let s = &m.spec;
    let mut events: HashMap<&'static str, Arc<str>> = HashMap::new();
    events.insert("insert", Arc::from(s.events.insert.as_str()));
    if !s.insert_only {
        if let Some(u) = &s.events.update {
            events.insert("update", Arc::from(u.as_str()));
        }
        if let Some(d) = &s.events.delete {
            events.insert("delete", Arc::from(d.as_str()));
        }
    }
    events.insert(
        "snapshot",
        Arc::from(s.events.snapshot.as_deref().unwrap_or(&s.events.insert)),
    );
    if let Some(t) = &s.events.truncate {
        events.insert("truncate", Arc::from(t.as_str()));
    }
    let schema = envelope_schema(&row_name, table, &fields);
    let debezium = match &s.debezium {
        Some(dz) => Some(debezium::DebeziumRule::compile(m, dz, table, &key_columns)?),
        None => None,
    };
    Ok(TableRule {
        file: m.path.clone(),
        table: q,
        topic: Arc::from(s.topic.as_str()),
        subject: format!("{}-value", s.topic),
        events,
        fields,
        key_columns,
        schema,
        schema_id: None,
        positions: None,
        debezium,
        mapping: Arc::new(m.clone()),
        compiled_against: Arc::new(table.clone()),
    })
}

/// Checks and registers (unless `dry_run`) every subject of one rule.
async fn register_rule(
    rule: &mut TableRule,
    registry: &RegistryClient,
    dry_run: bool,
) -> Result<Vec<(String, Option<u32>)>, MappingError> {
    let mut out = Vec::new();
    let id = register_subject(
        registry,
        &rule.file,
        &rule.table,
        &rule.topic,
        &rule.subject,
        &rule.schema,
        dry_run,
    )
    .await?;
    rule.schema_id = id;
    out.push((rule.subject.clone(), id));
    if let Some(dz) = rule.debezium.as_mut() {
        for (subject, schema, slot) in [
            (&dz.value_subject, &dz.value_schema, &mut dz.value_schema_id),
            (&dz.key_subject, &dz.key_schema, &mut dz.key_schema_id),
        ] {
            let id = register_subject(
                registry,
                &rule.file,
                &rule.table,
                &dz.topic,
                subject,
                schema,
                dry_run,
            )
            .await?;
            *slot = id;
            out.push((subject.clone(), id));
        }
    }
    Ok(out)
}

/// Checks `schema` against the registry's latest version of `subject` and,
/// unless `dry_run`, registers it. `None` only for a dry run of a new
/// (compatible) schema.
async fn register_subject(
    registry: &RegistryClient,
    file: &Path,
    table: &str,
    topic: &str,
    subject: &str,
    schema: &str,
    dry_run: bool,
) -> Result<Option<u32>, MappingError> {
    let reg_err = |source| MappingError::Registry {
        file: file.to_path_buf(),
        source,
    };
    let incompatible = |subject: String, messages| MappingError::Incompatible {
        file: file.to_path_buf(),
        table: table.to_string(),
        subject,
        topic_v2: format!("{topic}.v2"),
        messages,
    };
    if let Some(found) = registry.lookup(subject, schema).await.map_err(reg_err)? {
        return Ok(Some(found.id));
    }
    let messages = registry
        .check_compatibility(subject, schema)
        .await
        .map_err(reg_err)?;
    if !messages.is_empty() {
        return Err(incompatible(subject.to_string(), messages));
    }
    if dry_run {
        return Ok(None);
    }
    let id = registry
        .register(subject, schema)
        .await
        .map_err(|source| match source {
            RegistryError::Incompatible { subject, messages } => incompatible(subject, messages),
            source => reg_err(source),
        })?;
    Ok(Some(id))
}

/// Computes the rule's column positions in `table` again when the table
/// (its `Arc`) is not the one they were computed for.
fn ensure_positions(rule: &mut TableRule, table: &Arc<TableInfo>) -> Result<(), MappingError> {
    if !rule
        .positions
        .as_ref()
        .is_some_and(|p| Arc::ptr_eq(&p.table, table))
    {
        rule.positions = Some(positions(rule, table)?);
    }
    Ok(())
}

fn positions(rule: &TableRule, table: &Arc<TableInfo>) -> Result<Positions, MappingError> {
    let mut fields = Vec::with_capacity(rule.fields.len());
    for f in &rule.fields {
        let Some(idx) = table.column_index(&f.column) else {
            return Err(MappingError::Drift {
                table: rule.table.clone(),
                message: format!(
                    "column `{}` is published by {} but the table no longer has it (columns now: {}); update the mapping",
                    f.column,
                    rule.file.display(),
                    columns_list(table)
                ),
            });
        };
        fields.push(idx);
    }
    let mut key = Vec::with_capacity(rule.key_columns.len());
    for k in &rule.key_columns {
        key.push(table.column_index(k).ok_or_else(|| MappingError::Drift {
            table: rule.table.clone(),
            message: format!(
                "key column `{k}` is gone from the table; update {}",
                rule.file.display()
            ),
        })?);
    }
    Ok(Positions {
        table: table.clone(),
        fields,
        key,
    })
}

/// `user_connections` -> `UserConnections`.
pub fn pascal_case(s: &str) -> String {
    let out: String = s
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut cs = p.chars();
            cs.next()
                .map(|f| f.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect();
    sanitize_name(&out)
}

fn envelope_schema(row_name: &str, table: &TableInfo, fields: &[FieldPlan]) -> String {
    let db_schema = &table.schema;
    let qualified = table.qualified();
    // A column whose name is not an Avro name keeps it in the schema.
    let row_fields: Vec<serde_json::Value> = fields
        .iter()
        .map(|f| {
            let mut field =
                json!({"name": f.out, "type": ["null", f.ty.schema()], "default": null});
            if !spec::is_avro_name(&f.column) {
                field["unilog.column"] = json!(f.column);
            }
            field
        })
        .collect();
    let namespace = format!("unilog.{}", sanitize_name(db_schema));
    let schema = json!({
        "type": "record",
        "name": format!("{row_name}Event"),
        "namespace": namespace,
        "doc": format!("Domain events of {} {qualified}, published by unilog", match table.kind {
            SourceKind::Postgres => "table",
            SourceKind::Mongo => "collection",
        }),
        "fields": [
            {"name": "event_type", "type": "string"},
            {"name": "op", "type": "string", "doc": "snapshot, insert, update, delete or truncate"},
            {"name": "key", "type": "string", "doc": "entity key: the key column's text, or a JSON array of texts for a composite key"},
            {"name": "dedup_id", "type": "string", "doc": "the same for the same change delivered twice"},
            {"name": "before", "type": ["null", {"type": "record", "name": row_name, "fields": row_fields}], "default": null},
            {"name": "after", "type": ["null", row_name], "default": null},
            {"name": "source", "type": {"type": "record", "name": "Source", "fields": [
                {"name": "connector", "type": "string"},
                {"name": "database", "type": "string"},
                {"name": "schema", "type": "string"},
                {"name": "table", "type": "string"},
                {"name": "lsn", "type": "long"},
                {"name": "xid", "type": ["null", "long"], "default": null},
                {"name": "commit_time", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}], "default": null},
                {"name": "snapshot", "type": "boolean"}
            ]}}
        ]
    });
    let mut schema = schema;
    if table.kind == SourceKind::Mongo {
        if let Some(f) = schema["fields"].as_array_mut() {
            f.push(json!({
                "name": "changed_fields",
                "type": ["null", {"type": "array", "items": "string"}],
                "default": null,
                "doc": "for updates: the fields the update set or removed (dotted paths)"
            }));
        }
    }
    schema.to_string()
}

#[cfg(test)]
mod tests;
