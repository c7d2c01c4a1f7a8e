//! docs/CONFIG.md and docs/MAPPING-COOKBOOK.md cannot drift from the code.
//!
//! 1. Every YAML block of the docs says what it is (```` ```yaml pipeline ````,
//!    ```` ```yaml mapping ````, ```` ```yaml fragment ````). Complete files are
//!    loaded with unilog's own loaders, which refuse unknown keys.
//! 2. The keys of the pipeline file and of the mapping file are found by
//!    tracing the `Deserialize` impls of [`PipelineConfig`] and [`MappingSpec`]
//!    with `serde-reflection`, recursively, so a field someone adds to a config
//!    struct is seen here without any change to this file. Each dotted key
//!    (`source.postgres.slot`, `columns.<column>.as`) must have a row in the
//!    reference tables of docs/CONFIG.md, each row must name a key that
//!    exists, and a key whose value is a unit enum must list its values.
//!
//! What serde-reflection cannot trace, and how it is handled here:
//! - An untagged enum (`ColumnRule`: `column: new_name` or
//!   `column: { as, type }`) asks for `deserialize_any`, which a tracer cannot
//!   answer. The first pass stops there, but it has recorded the field's
//!   format up to the enum (`Option<Map<String, Option<?>>>`), so the next pass
//!   skips the field (a known `Option` is traced as `None`) and reaches the
//!   fields after it. The enum's place stays unknown (`columns.<column>`) and is
//!   described in [`hand_traced`]: its string form is a leaf, its long form is
//!   `ColumnDetail`, traced on its own.
//! - `IndexMap` and `BTreeMap` need nothing special: both deserialize as maps.
//!   A map of plain values is one key (`kafka.properties`); a map of
//!   structures gets a placeholder segment (`columns.<column>`).
//! - Enums nested in structs are explored until every variant is seen (a
//!   tracer only finishes the root type by itself).

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_reflection::{
    ContainerFormat, Error, Format, Registry, Samples, Tracer, TracerConfig, VariantFormat,
};

use support::docs::{by_section, materialize, read_doc, yaml_blocks, BlockKind};
use unilog::config::{LoadedConfig, MongoConfig, PipelineConfig, PostgresConfig};
use unilog::mapping::spec::{BsonType, ColumnDetail, FieldDetail, LoadedMapping, MappingSpec};

const CONFIG_DOC: &str = "docs/CONFIG.md";
const COOKBOOK_DOC: &str = "docs/MAPPING-COOKBOOK.md";
const OPERATIONS_DOC: &str = "docs/OPERATIONS.md";
const PIPELINE_KEYS: &str = "Pipeline file keys";
const MAPPING_KEYS: &str = "Mapping file keys";

/// A tracer gives up on a type after this many passes.
const MAX_PASSES: usize = 200;

// ---------------------------------------------------------------------------
// Tracing the config structs

/// Traces `T` until its registry holds every struct and every enum variant
/// reachable from it.
fn trace<T: for<'de> Deserialize<'de>>(root: &str) -> Registry {
    let mut enums = BTreeSet::new();
    loop {
        let registry = trace_passes::<T>(root, &enums);
        let found: BTreeSet<String> = registry
            .iter()
            .filter(|(_, c)| matches!(c, ContainerFormat::Enum(_)))
            .map(|(n, _)| n.clone())
            .collect();
        if found.is_subset(&enums) {
            return registry;
        }
        // Enums seen for the first time: trace again, exploring them too.
        enums.extend(found);
    }
}

fn trace_passes<T: for<'de> Deserialize<'de>>(root: &str, enums: &BTreeSet<String>) -> Registry {
    let samples = Samples::new();
    let mut tracer = Tracer::new(TracerConfig::default().is_human_readable(true));
    let mut stopped = None;
    for _ in 0..MAX_PASSES {
        match tracer.trace_type_once::<T>(&samples) {
            Ok(_) => {
                stopped = None;
                let incomplete = enums
                    .iter()
                    .filter(|name| tracer.check_incomplete_enum(name).is_some())
                    .count();
                if incomplete == 0 {
                    return tracer.registry_unchecked();
                }
            }
            // An untagged enum: the next pass skips it (see the module doc).
            Err(e @ Error::NotSupported("deserialize_any")) => stopped = Some(e),
            Err(e) => panic!(
                "serde-reflection cannot trace {root}: {e}. Describe the type that fails by hand \
                 (see hand_traced in tests/config_docs.rs)"
            ),
        }
    }
    panic!(
        "serde-reflection did not finish tracing {root} in {MAX_PASSES} passes (last error: {stopped:?}); \
         an untagged enum outside an Option or a map cannot be skipped: describe it by hand in tests/config_docs.rs"
    )
}

/// A documented key: its dotted path, and the values of a unit enum.
type Keys = BTreeMap<String, Vec<String>>;

/// Every dotted key of `root` in `registry`.
fn keys_of(registry: &Registry, root: &str) -> Keys {
    let mut keys = Keys::new();
    walk_container(registry, root, "", &mut keys);
    keys
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn walk_container(registry: &Registry, name: &str, path: &str, keys: &mut Keys) {
    match registry.get(name) {
        Some(ContainerFormat::Struct(fields)) => {
            for f in fields {
                let p = join(path, &f.name);
                keys.entry(p.clone()).or_default();
                walk_format(registry, &f.value, &p, keys);
            }
        }
        Some(ContainerFormat::Enum(variants)) => {
            for v in variants.values() {
                let p = join(path, &v.name);
                match resolve_variant(&v.value) {
                    VariantFormat::Unit => keys
                        .entry(path.to_string())
                        .or_default()
                        .push(v.name.clone()),
                    VariantFormat::NewType(f) => {
                        keys.entry(p.clone()).or_default();
                        walk_format(registry, &f, &p, keys);
                    }
                    VariantFormat::Struct(fields) => {
                        keys.entry(p.clone()).or_default();
                        for f in fields {
                            let fp = join(&p, &f.name);
                            keys.entry(fp.clone()).or_default();
                            walk_format(registry, &f.value, &fp, keys);
                        }
                    }
                    VariantFormat::Tuple(_) | VariantFormat::Variable(_) => {
                        keys.entry(p).or_default();
                    }
                }
            }
        }
        Some(ContainerFormat::NewTypeStruct(f)) => walk_format(registry, f, path, keys),
        Some(ContainerFormat::UnitStruct | ContainerFormat::TupleStruct(_)) => {}
        None => panic!("`{path}`: type {name} is missing from the trace"),
    }
}

fn resolve_variant(v: &VariantFormat) -> VariantFormat {
    match v {
        VariantFormat::Variable(var) => match var.borrow().as_ref() {
            Some(inner) => resolve_variant(inner),
            None => v.clone(),
        },
        other => other.clone(),
    }
}

/// `f` without its variables; `None` where the tracer never learned it.
fn resolve(f: &Format) -> Option<Format> {
    match f {
        Format::Variable(var) => var.borrow().as_ref().and_then(resolve),
        other => Some(other.clone()),
    }
}

/// Plain values (and lists, options, maps of them) have no keys below them.
fn is_plain(registry: &Registry, f: &Format) -> bool {
    match resolve(f) {
        None => false,
        Some(Format::TypeName(n)) => match registry.get(&n) {
            Some(ContainerFormat::Enum(vs)) => vs
                .values()
                .all(|v| matches!(resolve_variant(&v.value), VariantFormat::Unit)),
            Some(ContainerFormat::NewTypeStruct(inner)) => is_plain(registry, inner),
            _ => false,
        },
        Some(Format::Option(inner) | Format::Seq(inner)) => is_plain(registry, &inner),
        Some(Format::Map { value, .. }) => is_plain(registry, &value),
        Some(_) => true,
    }
}

fn walk_format(registry: &Registry, f: &Format, path: &str, keys: &mut Keys) {
    let Some(f) = resolve(f) else {
        hand_traced(path, keys);
        return;
    };
    match f {
        Format::TypeName(n) => walk_container(registry, &n, path, keys),
        Format::Option(inner) => walk_format(registry, &inner, path, keys),
        Format::Seq(inner) if !is_plain(registry, &inner) => {
            let p = format!("{path}[]");
            walk_format(registry, &inner, &p, keys);
        }
        Format::Map { value, .. } if !is_plain(registry, &value) => {
            // `columns` -> `columns.<column>`
            let last = path.rsplit('.').next().unwrap_or(path);
            let p = format!("{path}.<{}>", last.strip_suffix('s').unwrap_or(last));
            keys.entry(p.clone()).or_default();
            walk_format(registry, &value, &p, keys);
        }
        _ => {}
    }
}

/// The places serde-reflection cannot see into, described by hand.
fn hand_traced(path: &str, keys: &mut Keys) {
    match path {
        // `ColumnRule`, an untagged enum: `column: new_name` (a plain string:
        // no keys below) or `column: { as: ..., type: ... }` (`ColumnDetail`).
        "columns.<column>" => {
            let registry = trace::<ColumnDetail>("ColumnDetail");
            walk_container(&registry, "ColumnDetail", path, keys);
        }
        // `FieldDecl`, untagged: `field: string` or `{ type, required, fields, items }`.
        // `FieldDetail` holds `FieldDecl` again (`fields`, `items`), which the
        // tracer cannot get through: its keys are listed here, and its type
        // names traced.
        "fields.<field>" => {
            let types = trace::<BsonType>("BsonType");
            let ty = format!("{path}.type");
            keys.entry(ty.clone()).or_default();
            walk_container(&types, "BsonType", &ty, keys);
            for k in ["required", "fields", "items"] {
                keys.entry(format!("{path}.{k}")).or_default();
            }
            // The list above must match the struct: an example with every key parses.
            let all: FieldDetail =
                serde_yaml::from_str("{type: array, required: true, fields: {a: int}, items: int}")
                    .expect("FieldDetail's keys changed: update hand_traced");
            assert!(all.required);
        }
        // The same declaration again, one level down: documented once.
        "fields.<field>.fields.<field>" | "fields.<field>.items" => {}
        _ => panic!(
            "serde-reflection cannot see the type at `{path}` (an untagged enum, or a type that \
             deserializes with deserialize_any); describe it by hand in hand_traced of tests/config_docs.rs"
        ),
    }
}

fn pipeline_keys() -> Keys {
    let mut keys = keys_of(&trace::<PipelineConfig>("PipelineConfig"), "PipelineConfig");
    // Each source is traced on its own too: behind `Option`, the tracer
    // records only the first variant of the enums inside.
    let sources = [
        (
            "source.postgres",
            trace::<PostgresConfig>("PostgresConfig"),
            "PostgresConfig",
        ),
        (
            "source.mongo",
            trace::<MongoConfig>("MongoConfig"),
            "MongoConfig",
        ),
    ];
    for (prefix, registry, root) in sources {
        let mut sub = Keys::new();
        walk_container(&registry, root, prefix, &mut sub);
        keys.extend(sub);
    }
    keys
}

fn mapping_keys() -> Keys {
    keys_of(&trace::<MappingSpec>("MappingSpec"), "MappingSpec")
}

// ---------------------------------------------------------------------------
// The reference tables of docs/CONFIG.md

/// One row of a reference table: `| `key` | type | default | meaning | example |`.
struct Row {
    line: usize,
    key: String,
    cells: Vec<String>,
    text: String,
}

/// The rows under `## {heading}`, up to the next `## `.
fn rows(doc: &str, heading: &str) -> Vec<Row> {
    let mut inside = false;
    let mut found = false;
    let mut out = Vec::new();
    for (idx, line) in doc.lines().enumerate() {
        if let Some(h) = line.strip_prefix("## ") {
            inside = h.trim() == heading;
            found |= inside;
            continue;
        }
        if !inside || !line.starts_with("| `") {
            continue;
        }
        let cells = split_cells(line);
        let key = cells
            .first()
            .map(|c| c.trim().trim_matches('`').to_string())
            .unwrap_or_default();
        out.push(Row {
            line: idx + 1,
            key,
            cells,
            text: line.to_string(),
        });
    }
    assert!(found, "{CONFIG_DOC} has no `## {heading}` section");
    out
}

/// Table cells; `\|` is a literal bar.
fn split_cells(line: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut chars = line.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cur.push('|');
                chars.next();
            }
            '|' => cells.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        cells.push(cur.trim().to_string());
    }
    cells
}

/// Compares the traced keys with the rows of one table; returns the problems.
fn compare(file: &str, keys: &Keys, heading: &str) -> Vec<String> {
    let doc = read_doc(CONFIG_DOC);
    let rows = rows(&doc, heading);
    let mut problems = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        if let Some(first) = seen.insert(&row.key, row.line) {
            problems.push(format!(
                "{CONFIG_DOC}:{}: key `{}` is documented twice (also line {first})",
                row.line, row.key
            ));
        }
        if !keys.contains_key(&row.key) {
            problems.push(format!(
                "{CONFIG_DOC}:{}: `{}` is documented under `## {heading}` but the {file} has no such key (renamed or removed?)",
                row.line, row.key
            ));
        }
        if row.cells.len() != 5 {
            problems.push(format!(
                "{CONFIG_DOC}:{}: the row of `{}` has {} cells; want 5 (key | type | default | meaning | example)",
                row.line,
                row.key,
                row.cells.len()
            ));
        }
    }
    for (key, values) in keys {
        let Some(row) = rows.iter().find(|r| r.key == *key) else {
            problems.push(format!(
                "key `{key}` of the {file} is undocumented: add a row `| `{key}` | type | default | meaning | example |` under `## {heading}` in {CONFIG_DOC}"
            ));
            continue;
        };
        for v in values {
            if !row.text.contains(&format!("`{v}`")) {
                problems.push(format!(
                    "{CONFIG_DOC}:{}: key `{key}` can be `{v}`, which its row does not mention",
                    row.line
                ));
            }
        }
    }
    problems
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn every_pipeline_key_is_documented() {
    let keys = pipeline_keys();
    // The trace itself is checked on keys that have long existed.
    for k in [
        "source.postgres.snapshot",
        "kafka.properties",
        "batch.max_in_flight",
        "state_dir",
    ] {
        assert!(keys.contains_key(k), "trace lost `{k}`: {keys:?}");
    }
    for v in ["initial", "never"] {
        assert!(
            keys["source.postgres.snapshot"].iter().any(|x| x == v),
            "{keys:?}"
        );
    }
    println!("pipeline file keys: {keys:?}");
    assert_no_problems(&compare("pipeline file", &keys, PIPELINE_KEYS));
}

#[test]
fn every_mapping_key_is_documented() {
    let keys = mapping_keys();
    for k in [
        "events.truncate",
        "columns.<column>",
        "columns.<column>.as",
        "columns.<column>.type",
        "drop",
    ] {
        assert!(keys.contains_key(k), "trace lost `{k}`: {keys:?}");
    }
    assert!(
        keys["columns.<column>.type"].iter().any(|x| x == "string"),
        "{keys:?}"
    );
    println!("mapping file keys: {keys:?}");
    assert_no_problems(&compare("mapping file", &keys, MAPPING_KEYS));
}

/// The defaults the docs give are the code's constants.
#[test]
fn documented_defaults_are_the_code_defaults() {
    use unilog::config::{
        DEFAULT_BATCH_MAX_EVENTS, DEFAULT_BATCH_MAX_WAIT_MS, DEFAULT_MAX_IN_FLIGHT,
        DEFAULT_PARTITIONS, DEFAULT_REPLICATION_FACTOR,
    };
    let doc = read_doc(CONFIG_DOC);
    let rows = rows(&doc, PIPELINE_KEYS);
    let want = [
        ("kafka.partitions", DEFAULT_PARTITIONS.to_string()),
        (
            "kafka.replication_factor",
            DEFAULT_REPLICATION_FACTOR.to_string(),
        ),
        ("batch.max_events", DEFAULT_BATCH_MAX_EVENTS.to_string()),
        ("batch.max_wait_ms", DEFAULT_BATCH_MAX_WAIT_MS.to_string()),
        ("batch.max_in_flight", DEFAULT_MAX_IN_FLIGHT.to_string()),
        ("state_dir", ".unilog/state".to_string()),
        ("source.postgres.snapshot", "initial".to_string()),
        ("source.postgres.manage_publication", "true".to_string()),
        ("on_bad_row", "dead_letter".to_string()),
    ];
    let mut problems = Vec::new();
    for (key, value) in want {
        match rows.iter().find(|r| r.key == key) {
            Some(r) if r.cells.get(2).is_some_and(|c| c.contains(&format!("`{value}`"))) => {}
            Some(r) => problems.push(format!(
                "{CONFIG_DOC}:{}: the default of `{key}` is `{value}` in the code; its row says `{}`",
                r.line,
                r.cells.get(2).map_or("", String::as_str)
            )),
            None => problems.push(format!("{CONFIG_DOC}: no row for `{key}`")),
        }
    }
    // The code's defaults, read back through the loader.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(
        &p,
        "name: d\nsource:\n  postgres:\n    url: postgres://u@h/db\nkafka:\n  brokers: h:9092\nschema_registry:\n  url: http://h:8081\nmappings: [m.yaml]\n",
    )
    .unwrap();
    let c = LoadedConfig::load(&p).unwrap();
    assert_eq!(c.config.state_dir, std::path::Path::new(".unilog/state"));
    assert!(c.postgres().unwrap().manage_publication);
    assert_no_problems(&problems);
}

// ---------------------------------------------------------------------------
// The examples of the docs

/// Loads every complete example of `doc` with the real loaders.
fn check_examples(doc: &str) -> usize {
    let blocks = yaml_blocks(doc);
    let mut checked = 0;
    for (section, blocks) in by_section(&blocks) {
        let (dir, paths) = materialize(&blocks);
        for (b, path) in blocks.iter().zip(&paths) {
            match b.kind {
                BlockKind::Pipeline => {
                    let c = LoadedConfig::load(path)
                        .unwrap_or_else(|e| panic!("{}: pipeline example: {e}", b.origin));
                    for m in &c.config.mappings {
                        let mp = c.resolve(m);
                        assert!(
                            mp.starts_with(dir.path()) && mp.exists(),
                            "{}: lists mapping `{}`, which no ```yaml mapping file={} block of section `{section}` provides",
                            b.origin,
                            m.display(),
                            m.display()
                        );
                    }
                }
                BlockKind::Mapping => {
                    LoadedMapping::load(path)
                        .unwrap_or_else(|e| panic!("{}: mapping example: {e}", b.origin));
                }
                BlockKind::Fragment => {
                    let text = std::fs::read_to_string(path).unwrap();
                    serde_yaml::from_str::<serde_yaml::Value>(&text)
                        .unwrap_or_else(|e| panic!("{}: YAML fragment: {e}", b.origin));
                }
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn config_doc_examples_load() {
    let blocks = yaml_blocks(CONFIG_DOC);
    for kind in [BlockKind::Pipeline, BlockKind::Mapping] {
        assert!(
            blocks.iter().any(|b| b.kind == kind),
            "{CONFIG_DOC} has no complete {kind:?} example"
        );
    }
    assert!(check_examples(CONFIG_DOC) >= 2);
}

#[test]
fn cookbook_recipes_load() {
    let n = check_examples(COOKBOOK_DOC);
    assert!(n >= 8, "{COOKBOOK_DOC}: only {n} checked YAML blocks");
}

#[test]
fn operations_doc_examples_load() {
    check_examples(OPERATIONS_DOC);
}

/// The checker itself: a typo in an example is caught, with its place.
#[test]
fn a_wrong_key_in_an_example_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(
        &p,
        "table: users\ntopic: t\nevents: {insert: A, update: B, delete: C}\ncolums: {id: user_id}\n",
    )
    .unwrap();
    let err = LoadedMapping::load(&p).unwrap_err().to_string();
    assert!(err.contains("unknown field `colums`"), "{err}");
    let keys = mapping_keys();
    assert!(!keys.contains_key("colums"));
}

/// The comparison names an undocumented key.
#[test]
fn an_undocumented_key_is_named() {
    let mut keys = mapping_keys();
    keys.insert("envelope.flavour".into(), Vec::new());
    let problems = compare("mapping file", &keys, MAPPING_KEYS);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("key `envelope.flavour` of the mapping file is undocumented")),
        "{problems:?}"
    );
}
