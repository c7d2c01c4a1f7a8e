//! `unilog init`: a pipeline file and one mapping per table, written from a
//! PostgreSQL catalog, for a platform team that maps 150 tables, not 3.
//!
//! Each table gets a mapping with a topic, event names and (when the
//! primary key will not do) a key; the pipeline file lists the mappings
//! that `check` can accept as they are. The tables that still need a
//! decision (no key, no usable replica identity, a relation that cannot be
//! published, a column type that is refused) get a mapping file too, but
//! stay commented out in the pipeline file, with the reason, and are
//! printed in one list. Partitions are covered by their partitioned table
//! and inheritance children by their parent, so they get no mapping.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::ReplicaIdentityFix;
use crate::event::{pg_qualified, TableInfo};
use crate::mapping::avro::AvroType;
use crate::mapping::spec::{default_topic, is_topic_name, LoadedMapping};
use crate::sources::pg_logical::catalog::Catalog;
use crate::sources::pg_logical::relations::{self, Identity, RelKind};
use crate::sources::pg_logical::{connect_plain, safety, PgError};

/// What `init` was asked for (the command line's `unilog init` options).
#[derive(Debug, Clone, clap::Args)]
pub struct InitOptions {
    /// The database, `postgres://user:password@host:port/database`.
    #[arg(long, env = "PG_URL", hide_env_values = true)]
    pub url: String,
    /// Only these schemas (repeat the flag); default: every schema but the
    /// system ones.
    #[arg(long = "schema")]
    pub schemas: Vec<String>,
    /// Where to write `pipeline.yaml` and `mappings/`.
    #[arg(long, default_value = "unilog")]
    pub out: PathBuf,
    /// The pipeline's name (names the slot and publication).
    #[arg(long, default_value = "legacy")]
    pub name: String,
    /// Put before every topic name (`legacy.` gives `legacy.public.users`).
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// Overwrite files that exist.
    #[arg(long)]
    pub force: bool,
}

/// What `init` wrote.
#[derive(Debug, Default)]
pub struct InitReport {
    pub pipeline: PathBuf,
    /// Mappings listed in the pipeline file.
    pub ready: Vec<String>,
    /// `schema.table` and what it still needs decided.
    pub pending: Vec<(String, String)>,
    /// Tables left out on purpose (partitions, children), with why.
    pub covered: Vec<(String, String)>,
}

/// Why `init` could not run.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Usage(String),
}

/// `orders` -> `Order`, `categories` -> `Category`, `user_connections` -> `UserConnection`.
fn singular_pascal(table: &str) -> String {
    let base = if let Some(stem) = table.strip_suffix("ies") {
        format!("{stem}y")
    } else if table.ends_with("ss") || !table.ends_with('s') {
        table.to_string()
    } else {
        table[..table.len() - 1].to_string()
    };
    let p = crate::mapping::pascal_case(&base);
    if p.chars().all(|c| c == '_') {
        "Row".to_string()
    } else {
        p
    }
}

/// A file name for a table's mapping: its `schema.table`, with characters
/// that file systems dislike replaced.
fn file_name(qualified: &str) -> String {
    let clean: String = qualified
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{clean}.yaml")
}

/// The first clause of the first problem, without the table's own name in
/// front: `has no primary key and no replica identity`.
fn short_reason(q: &str, why: &str) -> String {
    let first = why.lines().next().unwrap_or_default();
    let clause = first.split(": ").next().unwrap_or(first);
    let clause = clause.split(". ").next().unwrap_or(clause);
    clause
        .strip_prefix(&format!("{q} "))
        .unwrap_or(clause)
        .to_string()
}

/// YAML single-quoted scalar.
fn yaml_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The `table:` text of `schema.name`: quoted where the schema holds a dot.
fn table_text(schema: &str, name: &str) -> String {
    if schema.contains('.') || schema.contains('"') {
        format!("\"{}\".{name}", schema.replace('"', "\"\""))
    } else {
        pg_qualified(schema, name)
    }
}

struct Candidate {
    schema: String,
    name: String,
    rel: relations::Relation,
}

/// Reads the catalog and writes the files.
pub async fn init(opts: &InitOptions) -> Result<InitReport, InitError> {
    let client = connect_plain(&opts.url).await?;
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
               AND (cardinality($1::text[]) = 0 OR n.nspname = ANY($1::text[]))
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
             ORDER BY 1, 2",
            &[&opts.schemas],
        )
        .await
        .map_err(|e| PgError::Setup(format!("reading the catalog: {}", crate::sources::pg_logical::pg_text(&e))))?;
    if rows.is_empty() {
        return Err(InitError::Usage(if opts.schemas.is_empty() {
            "the database has no tables".to_string()
        } else {
            format!("schema(s) {} have no tables", opts.schemas.join(", "))
        }));
    }
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| PgError::Setup(crate::sources::pg_logical::pg_text(&e)))?
        .get(0);
    let mut candidates = Vec::new();
    for r in rows {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        if let Some(rel) = relations::load(&client, &schema, &name)
            .await
            .map_err(|e| PgError::Setup(crate::sources::pg_logical::pg_text(&e)))?
        {
            candidates.push(Candidate { schema, name, rel });
        }
    }
    // Partitions and inheritance children are covered by the table above.
    let mut covered_by: BTreeMap<u32, String> = BTreeMap::new();
    for c in &candidates {
        if c.rel.main.kind != RelKind::Table && c.rel.main.kind != RelKind::Partitioned {
            continue;
        }
        if c.rel.main.is_partition {
            continue;
        }
        for m in &c.rel.members {
            covered_by.insert(m.oid, c.rel.main.qualified());
        }
    }
    let mut catalog = Catalog::new(&database);
    let mut report = InitReport::default();
    let mappings_dir = opts.out.join("mappings");
    std::fs::create_dir_all(&mappings_dir)
        .map_err(|e| InitError::Io(format!("cannot create {}: {e}", mappings_dir.display())))?;
    let mut listed = Vec::new();
    let mut topics: BTreeMap<String, String> = BTreeMap::new();
    let mut files = std::collections::HashSet::new();
    for c in &candidates {
        let q = c.rel.main.qualified();
        if let Some(parent) = covered_by.get(&c.rel.main.oid) {
            let how = if c.rel.main.is_partition {
                "a partition"
            } else {
                "an inheritance child"
            };
            report.covered.push((
                q.clone(),
                format!("{how} of {parent}, whose mapping covers it"),
            ));
            continue;
        }
        let table = catalog
            .table(&client, &c.schema, &c.name)
            .await
            .map_err(|e| PgError::Setup(crate::sources::pg_logical::pg_text(&e)))?;
        let (text, needs) = mapping_for(opts, c, table.as_ref(), &mut topics);
        // Names that clean up alike (`a b`, `a_b`) get the table's OID.
        let mut file = file_name(&q);
        if !files.insert(file.clone()) {
            file = format!("{}.{}.yaml", file.trim_end_matches(".yaml"), c.rel.main.oid);
            files.insert(file.clone());
        }
        let path = mappings_dir.join(&file);
        write_new(&path, &text, opts.force)?;
        let rel_path = format!("mappings/{file}");
        match needs {
            None => {
                listed.push(format!("  - {}\n", yaml_str(&rel_path)));
                report.ready.push(q);
            }
            Some(why) => {
                let short = short_reason(&q, &why);
                listed.push(format!(
                    "  # - {}   # needs a decision: {short}\n",
                    yaml_str(&rel_path)
                ));
                report
                    .pending
                    .push((q, format!("{short} (the ways out: {rel_path})")));
            }
        }
    }
    let pipeline = pipeline_text(opts, &listed, &report);
    let path = opts.out.join("pipeline.yaml");
    write_new(&path, &pipeline, opts.force)?;
    report.pipeline = path;
    Ok(report)
}

fn write_new(path: &Path, text: &str, force: bool) -> Result<(), InitError> {
    if path.exists() && !force {
        return Err(InitError::Usage(format!(
            "{} exists; remove it, choose another --out, or pass --force to overwrite",
            path.display()
        )));
    }
    std::fs::write(path, text)
        .map_err(|e| InitError::Io(format!("cannot write {}: {e}", path.display())))
}

/// One table's mapping file, and what it still needs decided (`None`:
/// `check` accepts it as it is).
fn mapping_for(
    opts: &InitOptions,
    c: &Candidate,
    table: Option<&TableInfo>,
    topics: &mut BTreeMap<String, String>,
) -> (String, Option<String>) {
    let rel = &c.rel;
    let q = rel.main.qualified();
    let record = singular_pascal(&c.name);
    let mut topic = format!("{}{}", opts.topic_prefix, default_topic(&q));
    if topic.len() > 249 || !is_topic_name(&topic) {
        topic = default_topic(&topic);
    }
    if let Some(other) = topics.insert(topic.clone(), q.clone()) {
        // Two names that clean up alike (`a b` and `a_b`): keep both apart.
        topic = format!("{topic}.{}", rel.main.oid);
        topics.insert(topic.clone(), other);
    }
    let mut needs: Vec<String> = Vec::new();
    let mut key_line = String::new();
    let mut drops: Vec<String> = Vec::new();
    let mut no_key = false;
    let kind_ok = matches!(rel.main.kind, RelKind::Table | RelKind::Partitioned);
    if let Some(t) = table.filter(|_| kind_ok) {
        for col in &t.columns {
            if let Err(why) = AvroType::for_column(&col.ty) {
                needs.push(format!(
                    "column `{}` ({}): {why}; drop it or publish it with `type: string`",
                    col.name, col.type_name
                ));
                drops.push(col.name.clone());
            }
        }
        let key: Option<Vec<String>> = match (&rel.main.identity, &rel.main.usable_index) {
            (Identity::PrimaryKey(_), _) => None,
            (Identity::Index(i), _) => Some(i.columns.clone()),
            (_, Some(i)) => Some(i.columns.clone()),
            _ => {
                if rel.main.kind != RelKind::Partitioned {
                    no_key = true;
                }
                None
            }
        };
        if let Some(k) = key {
            key_line = format!(
                "key: [{}]\n",
                k.iter().map(|c| yaml_str(c)).collect::<Vec<_>>().join(", ")
            );
        }
    }
    // Everything else, as `check` would judge it.
    let events = format!(
        "events:\n  insert: {record}Created\n  update: {record}Updated\n  delete: {record}Deleted\n"
    );
    let mut text = format!(
        "# {q}: {} (written by `unilog init`)\ntable: {}\ntopic: {topic}\nrecord: {record}\n{key_line}{events}",
        rel.main.kind.describe(),
        yaml_str(&table_text(&rel.main.schema, &rel.main.name)),
    );
    if !drops.is_empty() {
        let _ = writeln!(
            text,
            "drop: [{}]",
            drops
                .iter()
                .map(|c| yaml_str(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Ok(m) = parse_mapping(&text) {
        let mapped = std::iter::once(q.clone()).collect();
        if let Err(problems) = safety::judge(
            &m,
            rel,
            &mapped,
            ReplicaIdentityFix::Never,
            "<publication>_inserts",
        ) {
            for p in problems {
                // The file and line mean nothing here: keep the reason.
                let reason = p.split_once(": field `").map_or(p.as_str(), |(_, r)| {
                    r.split_once("`: ").map_or(r, |(_, r)| r)
                });
                if !needs.iter().any(|n| reason.contains(n.as_str())) {
                    needs.push(reason.to_string());
                }
            }
        }
    }
    // A table `check` would take but for its key (REPLICA IDENTITY FULL
    // without a primary key or unique index).
    if needs.is_empty() && no_key {
        needs.push(format!("{q} has no primary key and no unique index on NOT NULL columns: name the entity key (`key: [...]`)"));
    }
    if needs.is_empty() {
        (text, None)
    } else {
        let mut head = String::from(
            "# NEEDS A DECISION before this mapping can be listed in the pipeline file:\n",
        );
        for n in &needs {
            for line in n.lines() {
                let _ = writeln!(head, "#   {line}");
            }
        }
        (format!("{head}{text}"), Some(needs.join("\n")))
    }
}

/// Parses a mapping text written here, through the same loader as files.
fn parse_mapping(text: &str) -> Result<LoadedMapping, String> {
    let dir = std::env::temp_dir().join(format!("unilog-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let p = dir.join("m.yaml");
    std::fs::write(&p, text).map_err(|e| e.to_string())?;
    let m = LoadedMapping::load(&p).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&p);
    m
}

fn pipeline_text(opts: &InitOptions, listed: &[String], report: &InitReport) -> String {
    let mut s = format!(
        "# Written by `unilog init` from the catalog of the database at $PG_URL.\n\
         # {} table(s) ready, {} waiting for a decision (commented out below, with the reason;\n\
         # each mapping file says more). Check with: unilog check --config pipeline.yaml\n\
         name: {}\nsource:\n  postgres:\n    url: ${{PG_URL}}\n    snapshot: initial\n\
         kafka:\n  brokers: ${{KAFKA_BROKERS}}\n  partitions: 3\n  replication_factor: ${{KAFKA_REPLICATION_FACTOR:-1}}\n\
         schema_registry:\n  url: ${{SCHEMA_REGISTRY_URL}}\nstate_dir: .unilog/state\nmappings:\n",
        report.ready.len(),
        report.pending.len(),
        opts.name
    );
    if report.ready.is_empty() {
        s.push_str("  []\n");
    }
    for l in listed {
        s.push_str(l);
    }
    s
}

/// The summary `init` prints: what was written, and the one list of what
/// still needs deciding.
pub fn summary(report: &InitReport) -> String {
    let mut s = format!(
        "wrote {} with {} mapping(s) ready",
        report.pipeline.display(),
        report.ready.len()
    );
    if !report.covered.is_empty() {
        let _ = write!(
            s,
            "; {} partition(s) or child table(s) covered by the table above them",
            report.covered.len()
        );
    }
    s.push('\n');
    if report.pending.is_empty() {
        s.push_str("every table can be published as it is\n");
    } else {
        let _ = writeln!(
            s,
            "{} table(s) need a decision before they can be published (their mappings are commented out in the pipeline file):",
            report.pending.len()
        );
        for (t, why) in &report.pending {
            let mut lines = why.lines();
            let _ = writeln!(s, "  - {t}: {}", lines.next().unwrap_or_default());
            for l in lines {
                let _ = writeln!(s, "      {l}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_well() {
        assert_eq!(singular_pascal("orders"), "Order");
        assert_eq!(singular_pascal("categories"), "Category");
        assert_eq!(singular_pascal("user_connections"), "UserConnection");
        assert_eq!(singular_pascal("address"), "Address");
        assert_eq!(singular_pascal("用户"), "Row");
        assert_eq!(
            file_name("Legacy App.Order Items"),
            "Legacy_App.Order_Items.yaml"
        );
        assert_eq!(table_text("my.schema", "t"), "\"my.schema\".t");
        assert_eq!(yaml_str("it's"), "'it''s'");
        assert_eq!(
            short_reason(
                "public.a",
                "public.a is an UNLOGGED table: its changes. More"
            ),
            "is an UNLOGGED table"
        );
        assert_eq!(
            short_reason("public.m", "public.m_1 has no primary key: x"),
            "public.m_1 has no primary key"
        );
    }
}
