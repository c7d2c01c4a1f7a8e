//! The YAML examples in the docs, as files the real loaders can read.
//!
//! Every fenced ```` ```yaml ```` block in a checked doc says what it is in its
//! info string, so none can rot unnoticed:
//! - ```` ```yaml pipeline ```` a complete pipeline file,
//! - ```` ```yaml mapping ```` a complete mapping file,
//! - ```` ```yaml fragment ```` a piece of a file (only its YAML syntax is checked).
//!
//! `file=PATH` names the file a block is written to, so a pipeline example can
//! list the mapping examples of the same section (`## ` heading) by path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a YAML block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Pipeline,
    Mapping,
    Fragment,
}

/// One fenced YAML block of a doc.
#[derive(Clone, Debug)]
pub struct DocBlock {
    /// `docs/CONFIG.md:120`: where the block's fence opens.
    pub origin: String,
    /// The `## ` heading the block is under.
    pub section: String,
    pub kind: BlockKind,
    /// `file=` of the info string.
    pub file: Option<String>,
    pub text: String,
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Reads a doc of the repository (`docs/CONFIG.md`).
pub fn read_doc(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Every ```` ```yaml ```` block of `rel`. Panics, naming the line, on a YAML
/// block without a kind or an unclosed fence.
pub fn yaml_blocks(rel: &str) -> Vec<DocBlock> {
    let text = read_doc(rel);
    let mut out = Vec::new();
    let mut section = String::new();
    let mut open: Option<(usize, String, Vec<&str>)> = None;
    for (idx, line) in text.lines().enumerate() {
        let lineno = idx + 1;
        if let Some((start, info, body)) = open.as_mut() {
            if line.trim_start().starts_with("```") {
                let origin = format!("{rel}:{start}");
                if let Some(block) = parse_info(&origin, info, &section, body.join("\n") + "\n") {
                    out.push(block);
                }
                open = None;
            } else {
                body.push(line);
            }
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_string();
        }
        if let Some(info) = line.trim_start().strip_prefix("```") {
            open = Some((lineno, info.trim().to_string(), Vec::new()));
        }
    }
    if let Some((start, ..)) = open {
        panic!("{rel}:{start}: code fence is never closed");
    }
    out
}

fn parse_info(origin: &str, info: &str, section: &str, text: String) -> Option<DocBlock> {
    let mut words = info.split_whitespace();
    if !matches!(words.next(), Some("yaml" | "yml")) {
        return None;
    }
    let mut kind = None;
    let mut file = None;
    for w in words {
        match w {
            "pipeline" => kind = Some(BlockKind::Pipeline),
            "mapping" => kind = Some(BlockKind::Mapping),
            "fragment" => kind = Some(BlockKind::Fragment),
            _ => match w.strip_prefix("file=") {
                Some(f) => file = Some(f.to_string()),
                None => panic!("{origin}: unknown word `{w}` in the info string `{info}`"),
            },
        }
    }
    let Some(kind) = kind else {
        panic!(
            "{origin}: a ```yaml block must say what it is: ```yaml pipeline, ```yaml mapping or ```yaml fragment"
        );
    };
    Some(DocBlock {
        origin: origin.to_string(),
        section: section.to_string(),
        kind,
        file,
        text,
    })
}

/// Example values for the `${VAR}` references of the docs and examples.
/// A reference to any other variable must carry a default (`${VAR:-x}`).
pub const EXAMPLE_ENV: &[(&str, &str)] = &[
    ("PG_URL", "postgres://unilog:secret@db.internal:5432/app"),
    ("PG_PASSWORD", "secret"),
    (
        "MONGO_URL",
        "mongodb://unilog:secret@mongo-1.internal:27017/?replicaSet=rs0",
    ),
    (
        "KAFKA_BROKERS",
        "kafka-1.internal:9092,kafka-2.internal:9092",
    ),
    ("SCHEMA_REGISTRY_URL", "https://registry.internal:8081"),
    ("REGISTRY_USER", "unilog"),
    ("REGISTRY_PASSWORD", "registry-secret"),
    ("KAFKA_USER", "unilog"),
    ("KAFKA_PASSWORD", "kafka-secret"),
    ("KAFKA_CA_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    ("UNILOG_STATE_DIR", "/var/lib/unilog"),
    ("UNILOG_HTTP_LISTEN", "0.0.0.0:9187"),
];

/// `text` with `${VAR}` replaced by [`EXAMPLE_ENV`] (or the reference's default).
pub fn expand_example(origin: &str, text: &str) -> String {
    let lookup = |name: &str| {
        EXAMPLE_ENV
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_string())
    };
    unilog::config::expand_env(Path::new(origin), text, lookup).unwrap_or_else(|e| {
        panic!("{origin}: {e} (give the variable a default, or add it to EXAMPLE_ENV in tests/support/docs.rs)")
    })
}

/// The blocks of one section written to a temporary folder. Returns the
/// folder and, per block, the path it was written to.
pub fn materialize(blocks: &[&DocBlock]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut paths = Vec::new();
    let mut taken: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (i, b) in blocks.iter().enumerate() {
        let rel = b.file.clone().unwrap_or_else(|| match b.kind {
            BlockKind::Pipeline => format!("pipeline-{i}.yaml"),
            BlockKind::Mapping => format!("mapping-{i}.yaml"),
            BlockKind::Fragment => format!("fragment-{i}.yaml"),
        });
        let path = dir.path().join(&rel);
        if let Some(other) = taken.insert(path.clone(), b.origin.clone()) {
            panic!(
                "{}: file={rel} is also written by {other} in the same section",
                b.origin
            );
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create folder");
        }
        std::fs::write(&path, expand_example(&b.origin, &b.text)).expect("write example");
        paths.push(path);
    }
    (dir, paths)
}

/// The blocks grouped by section, in document order.
pub fn by_section(blocks: &[DocBlock]) -> Vec<(String, Vec<&DocBlock>)> {
    let mut out: Vec<(String, Vec<&DocBlock>)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some((s, v)) if *s == b.section => v.push(b),
            _ => out.push((b.section.clone(), vec![b])),
        }
    }
    out
}
