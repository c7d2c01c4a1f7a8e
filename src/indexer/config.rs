//! The indexer's configuration file (`unilog index --config FILE`).
//!
//! Loaded like the pipeline file: `${VAR}` expansion, unknown keys refused,
//! then [`IndexerConfig::validate`] for what types alone cannot say. Every
//! key is documented in docs/JOIN-INDEX.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{is_plain_name, load_yaml, ConfigError, RegistryConfig};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexerConfig {
    /// Letters, digits, `_`: names the consumer group and the dead-letter topic.
    pub name: String,
    pub kafka: IndexerKafka,
    pub schema_registry: RegistryConfig,
    pub search: SearchConfig,
    /// One entry per topic.
    pub indexes: Vec<IndexSpec>,
    /// Where rejected documents go (default `unilog.index.<name>.dead_letter`).
    pub dead_letter_topic: Option<String>,
    #[serde(default)]
    pub batch: IndexBatch,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Optional: `/search/<alias>?q=...`, `/metrics`, `/health`, `/ready`.
    pub http: Option<IndexerHttp>,
}

/// Kafka settings of the indexer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexerKafka {
    pub brokers: String,
    /// Consumer group (default `unilog-index-<name>`).
    pub group: Option<String>,
    /// Extra librdkafka settings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// The search server (Elasticsearch or OpenSearch REST API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password (a mounted secret), instead of `password`.
    pub password_file: Option<PathBuf>,
    /// PEM certificates trusted for an `https://` URL, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Per-request timeout.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

crate::endpoint::http_access!(SearchConfig);

/// What part of a record becomes the document.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DocumentFrom {
    /// `after` for unilog's domain events (the envelope has `op` and
    /// `after`), the whole value otherwise (joined documents).
    #[default]
    Auto,
    /// The `after` row of a domain event.
    After,
    /// The whole value.
    Value,
}

/// One topic kept in step with one index, reached through an alias.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IndexSpec {
    pub topic: String,
    /// The name searches use. The concrete index is `<alias>_v<N>`.
    pub alias: String,
    #[serde(default)]
    pub document: DocumentFrom,
    /// Field mappings that replace the derived ones (`{field: {type: keyword}}`).
    #[serde(default)]
    pub mappings: BTreeMap<String, serde_json::Value>,
    /// Index settings for new indexes (`number_of_shards`, ...).
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// How documents are grouped into `_bulk` requests.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IndexBatch {
    /// Documents per `_bulk` request (at most 10000).
    #[serde(default = "default_max_docs")]
    pub max_docs: usize,
    /// How long a batch waits to fill.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

impl Default for IndexBatch {
    fn default() -> Self {
        IndexBatch {
            max_docs: default_max_docs(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

/// Retries of 429/5xx and unreachable servers.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// Attempts before the indexer stops (0: never stop retrying).
    #[serde(default)]
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            max_attempts: 0,
        }
    }
}

/// The indexer's HTTP endpoint.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IndexerHttp {
    pub listen: String,
    /// Whether to serve `/search/<alias>` (default true).
    #[serde(default = "yes")]
    pub search: bool,
    /// Hits returned when the query gives no `size`.
    #[serde(default = "default_size")]
    pub default_size: u32,
}

fn yes() -> bool {
    true
}
fn default_size() -> u32 {
    10
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_max_docs() -> usize {
    500
}
fn default_max_wait_ms() -> u64 {
    200
}
fn default_initial_ms() -> u64 {
    200
}
fn default_max_ms() -> u64 {
    30_000
}

/// A loaded, validated file.
#[derive(Debug)]
pub struct LoadedIndexerConfig {
    pub path: PathBuf,
    pub config: IndexerConfig,
}

fn valid_index_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['_', '-', '+'])
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c))
}

impl LoadedIndexerConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut config, text): (IndexerConfig, String) = load_yaml(path)?;
        config.schema_registry.resolve_files(path);
        config.search.resolve_files(path);
        config.validate(path, &text)?;
        Ok(LoadedIndexerConfig {
            path: path.to_path_buf(),
            config,
        })
    }

    /// The consumer group.
    pub fn group(&self) -> String {
        self.config
            .kafka
            .group
            .clone()
            .unwrap_or_else(|| format!("unilog-index-{}", self.config.name))
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.config
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("unilog.index.{}.dead_letter", self.config.name))
    }

    /// The spec of `alias`.
    pub fn index(&self, alias: &str) -> Option<&IndexSpec> {
        self.config.indexes.iter().find(|i| i.alias == alias)
    }
}

impl IndexerConfig {
    /// Checks what the types cannot.
    pub fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| ConfigError::at_field(path, text, field, msg);
        for (section, access) in [
            ("schema_registry", self.schema_registry.access()),
            ("search", self.search.access()),
        ] {
            if let Err(e) = access.validate() {
                return Err(err(&format!("{section}.{}", e.field), e.message));
            }
        }
        if !is_plain_name(&self.name) {
            return Err(err(
                "name",
                format!("`{}`: use letters, digits and `_` only", self.name),
            ));
        }
        if self.indexes.is_empty() {
            return Err(err(
                "indexes",
                "is empty; list at least one `{topic, alias}`".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for i in &self.indexes {
            if !valid_index_name(&i.alias) {
                return Err(err("alias", format!("`{}`: an index alias is lowercase letters, digits, `_`, `-`, `.`, and does not start with `_`, `-` or `+`", i.alias)));
            }
            if !seen.insert(i.alias.as_str()) {
                return Err(err(
                    "alias",
                    format!("`{}` is used by two entries; one topic per alias", i.alias),
                ));
            }
            if i.topic.is_empty() {
                return Err(err("topic", "is empty".into()));
            }
        }
        if self.batch.max_docs == 0 || self.batch.max_docs > 10_000 {
            return Err(err(
                "max_docs",
                format!("{} is out of range: use 1 to 10000", self.batch.max_docs),
            ));
        }
        if let Some(h) = &self.http {
            if h.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(err(
                    "listen",
                    format!(
                        "`{}` is not host:port (for example 127.0.0.1:9188)",
                        h.listen
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LoadedIndexerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.yaml");
        std::fs::write(&p, text).unwrap();
        LoadedIndexerConfig::load(&p)
    }

    const GOOD: &str = "name: users\nkafka:\n  brokers: b:9092\nschema_registry:\n  url: http://r\nsearch:\n  url: http://s\nindexes:\n  - topic: legacy.users\n    alias: users\n";

    #[test]
    fn the_example_loads() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/user-search/index.yaml");
        let c = LoadedIndexerConfig::load(&p).unwrap();
        assert_eq!(c.config.indexes[0].alias, "users");
        assert!(c.config.http.is_some());
    }

    #[test]
    fn defaults_and_names() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.group(), "unilog-index-users");
        assert_eq!(c.dead_letter_topic(), "unilog.index.users.dead_letter");
        assert_eq!(c.config.batch.max_docs, 500);
        assert_eq!(c.config.indexes[0].document, DocumentFrom::Auto);
    }

    #[test]
    fn refuses_bad_alias_unknown_keys_and_bad_batch() {
        let e = load(&GOOD.replace("alias: users", "alias: Users")).unwrap_err();
        assert!(e.to_string().contains(":10: field `alias`"), "{e}");
        let e = load(&format!("{GOOD}colour: red\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = load(&format!("{GOOD}batch:\n  max_docs: 0\n")).unwrap_err();
        assert!(e.to_string().contains("max_docs"), "{e}");
    }
}
