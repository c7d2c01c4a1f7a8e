//! The joiner's configuration file (`unilog join --config FILE`).
//!
//! Loaded like the pipeline file (`${VAR}` expansion, unknown keys refused,
//! errors at `file:line`). Every key is documented in docs/JOIN-INDEX.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{is_plain_name, load_yaml, ConfigError, RegistryConfig};
use crate::mapping::spec::is_avro_name;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinerConfig {
    /// Letters, digits, `_`: names the group, the internal topics and the
    /// transactional id.
    pub name: String,
    pub kafka: JoinKafka,
    pub schema_registry: RegistryConfig,
    /// The local state store (a cache of the changelog), relative to this file.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The side every output record is about (a user), keyed by the join key.
    pub left: LeftSide,
    /// The side joined to it (the user's connections).
    pub right: RightSide,
    #[serde(default)]
    pub kind: JoinKind,
    #[serde(default)]
    pub cardinality: Cardinality,
    pub output: OutputSpec,
    #[serde(default)]
    pub batch: JoinBatch,
}

/// Kafka settings of the joiner.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinKafka {
    pub brokers: String,
    /// Consumer group (default `unilog-join-<name>`); instances in one group split the partitions.
    pub group: Option<String>,
    /// This instance's id within the group (default `0`); makes the
    /// transactional id, so each running instance needs its own, and a
    /// restarted one should keep its id (that fences its previous life).
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Extra librdkafka settings for the consumer and the producer
    /// (`partitioner` must match the producer of the left topic).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// The left input.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LeftSide {
    /// A topic whose message key is the join key.
    pub topic: String,
}

/// The right input.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RightSide {
    pub topic: String,
    /// The field of the right row that holds the left key (`user_id`), or
    /// `$key` when the right topic's message key is the join key already.
    pub key: String,
}

/// Inner or left join.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum JoinKind {
    /// Every left record, with its right records if any.
    #[default]
    Left,
    /// Only left records that have at least one right record.
    Inner,
}

/// How many right records one left record has.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Cardinality {
    /// A list (and its count) embedded in the output record.
    #[default]
    Many,
    /// At most one, embedded as an optional record.
    One,
}

/// The output topic and its record.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub topic: String,
    /// Avro record name of the output (`UserDocument`).
    pub record: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The field that embeds the right side (`connections`).
    pub field: String,
    /// The count field for `cardinality: many` (default `<field>_count`).
    pub count_field: Option<String>,
}

/// Records per Kafka transaction.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct JoinBatch {
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

impl Default for JoinBatch {
    fn default() -> Self {
        JoinBatch {
            max_records: default_max_records(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".unilog/join")
}
fn default_instance() -> String {
    "0".into()
}
fn default_namespace() -> String {
    "unilog.join".into()
}
fn default_max_records() -> usize {
    500
}
fn default_max_wait_ms() -> u64 {
    100
}

/// A loaded, validated file.
#[derive(Debug)]
pub struct LoadedJoinerConfig {
    pub path: PathBuf,
    pub config: JoinerConfig,
}

impl LoadedJoinerConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut config, text): (JoinerConfig, String) = load_yaml(path)?;
        config.schema_registry.resolve_files(path);
        let err = |field: &str, msg: String| ConfigError::at_field(path, &text, field, msg);
        let c = &config;
        if let Err(e) = c.schema_registry.access().validate() {
            return Err(err(&format!("schema_registry.{}", e.field), e.message));
        }
        if !is_plain_name(&c.name) {
            return Err(err(
                "name",
                format!("`{}`: use letters, digits and `_` only", c.name),
            ));
        }
        if c.left.topic == c.right.topic {
            return Err(err("topic", "left and right are the same topic".into()));
        }
        if c.output.topic == c.left.topic || c.output.topic == c.right.topic {
            return Err(err("topic", "the output topic is an input topic".into()));
        }
        if c.right.key != "$key" && !is_avro_name(&c.right.key) {
            return Err(err(
                "key",
                format!(
                    "`{}`: name a field of the right row, or `$key`",
                    c.right.key
                ),
            ));
        }
        for (field, v) in [("record", &c.output.record), ("field", &c.output.field)] {
            if !is_avro_name(v) {
                return Err(err(field, format!("`{v}` is not an Avro name (letters, digits, `_`, not starting with a digit)")));
            }
        }
        if let Some(cf) = &c.output.count_field {
            if !is_avro_name(cf) {
                return Err(err("count_field", format!("`{cf}` is not an Avro name")));
            }
        }
        if c.batch.max_records == 0 || c.batch.max_records > 100_000 {
            return Err(err("max_records", "use 1 to 100000".into()));
        }
        if !is_plain_name(&c.kafka.instance) {
            return Err(err(
                "instance",
                format!("`{}`: use letters, digits and `_` only", c.kafka.instance),
            ));
        }
        Ok(LoadedJoinerConfig {
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
            .unwrap_or_else(|| format!("unilog-join-{}", self.config.name))
    }

    /// The transactional id of this instance.
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.group(), self.config.kafka.instance)
    }

    /// The compacted changelog of the state store.
    pub fn changelog_topic(&self) -> String {
        format!("unilog.join.{}.changelog", self.config.name)
    }

    /// The right side re-keyed by the join key (when `right.key` is a field).
    pub fn rekeyed_topic(&self) -> Option<String> {
        (self.config.right.key != "$key")
            .then(|| format!("unilog.join.{}.right-by-key", self.config.name))
    }

    /// The count field name.
    pub fn count_field(&self) -> String {
        self.config
            .output
            .count_field
            .clone()
            .unwrap_or_else(|| format!("{}_count", self.config.output.field))
    }

    /// The state store file of this instance.
    pub fn state_file(&self) -> PathBuf {
        let dir = if self.config.state_dir.is_absolute() {
            self.config.state_dir.clone()
        } else {
            self.path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(&self.config.state_dir)
        };
        dir.join(format!(
            "{}-{}.redb",
            self.config.name, self.config.kafka.instance
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: docs\nkafka:\n  brokers: b:9092\nschema_registry:\n  url: http://r\nleft:\n  topic: users\nright:\n  topic: conns\n  key: user_id\noutput:\n  topic: user.docs\n  record: UserDocument\n  field: connections\n";

    fn load(text: &str) -> Result<LoadedJoinerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("join.yaml");
        std::fs::write(&p, text).unwrap();
        LoadedJoinerConfig::load(&p)
    }

    #[test]
    fn the_example_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/user-search/join.yaml");
        let c = LoadedJoinerConfig::load(&p).unwrap();
        assert_eq!(c.config.right.key, "user_id");
        assert!(c.state_file().ends_with(".unilog/join/user_docs-0.redb"));
    }

    #[test]
    fn defaults_and_derived_names() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.config.kind, JoinKind::Left);
        assert_eq!(c.config.cardinality, Cardinality::Many);
        assert_eq!(c.transactional_id(), "unilog-join-docs-0");
        assert_eq!(
            c.rekeyed_topic().as_deref(),
            Some("unilog.join.docs.right-by-key")
        );
        assert_eq!(c.count_field(), "connections_count");
        assert!(c.state_file().ends_with(".unilog/join/docs-0.redb"));
    }

    #[test]
    fn refusals_name_the_field() {
        let e = load(&GOOD.replace("key: user_id", "key: 9x")).unwrap_err();
        assert!(e.to_string().contains("field `key`"), "{e}");
        let e = load(&GOOD.replace("topic: conns", "topic: users")).unwrap_err();
        assert!(e.to_string().contains("same topic"), "{e}");
        let e = load(&format!("{GOOD}kind: outer\n")).unwrap_err();
        assert!(e.to_string().contains("unknown variant `outer`"), "{e}");
    }
}
