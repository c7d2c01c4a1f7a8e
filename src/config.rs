//! The pipeline configuration file and the YAML loading shared with mappings.
//!
//! Loading happens in three steps, each of which names the file and line of
//! what it refuses:
//! 1. `${VAR}` / `${VAR:-default}` are replaced from the environment (secrets
//!    stay out of files); a missing variable is an error at its line.
//! 2. The text is parsed into structs that deny unknown keys, so a typo is an
//!    error and not a silently ignored setting.
//! 3. [`PipelineConfig::validate`] checks what types alone cannot.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// An error in a configuration or mapping file: where, and what to change.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted path of the field, when known (`source.postgres.slot`).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigError {
    /// An error about `field` in `file`, located by searching `text` for it.
    pub fn at_field(file: &Path, text: &str, field: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: line_of_field(text, field),
            column: None,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            field: None,
            message: message.into(),
        }
    }
}

/// Reads `path`, expands `${VAR}` references and parses it as YAML into `T`.
/// Returns the expanded text too, so later checks can point at lines.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<(T, String), ConfigError> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole_file(path, format!("cannot read the file: {e}")))?;
    let text = expand_env(path, &raw, |name| std::env::var(name).ok())?;
    let value = serde_yaml::from_str(&text).map_err(|e| {
        let loc = e.location();
        ConfigError {
            file: path.to_path_buf(),
            line: loc.as_ref().map(serde_yaml::Location::line),
            column: loc.as_ref().map(serde_yaml::Location::column),
            field: None,
            // Drop the location the prefix already gives, keep the rest
            // (it can point elsewhere: "while scanning a quoted scalar at line 4").
            message: match &loc {
                Some(l) => e.to_string().replacen(
                    &format!(" at line {} column {}", l.line(), l.column()),
                    "",
                    1,
                ),
                None => e.to_string(),
            },
        }
    })?;
    Ok((value, text))
}

/// Replaces `${NAME}` and `${NAME:-default}`. `$${` is a literal `${`.
/// Comment lines are left alone, so an example in a comment needs no variable.
pub fn expand_env(
    file: &Path,
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find("${") {
            if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
                out.push_str(&rest[..pos - 1]);
                out.push_str("${");
                rest = &rest[pos + 2..];
                continue;
            }
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 2..];
            let Some(end) = after.find('}') else {
                return Err(ConfigError {
                    file: file.to_path_buf(),
                    line: Some(idx + 1),
                    column: Some(line.len() - rest.len() + pos + 1),
                    field: None,
                    message: "`${` without a closing `}`".into(),
                });
            };
            let expr = &after[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ConfigError {
                    file: file.to_path_buf(),
                    line: Some(idx + 1),
                    column: Some(line.len() - rest.len() + pos + 1),
                    field: None,
                    message: format!("`${{{expr}}}` is not a variable reference (use ${{NAME}} or ${{NAME:-default}})"),
                });
            }
            match lookup(name).or_else(|| default.map(str::to_string)) {
                Some(v) => out.push_str(&v),
                None => {
                    return Err(ConfigError {
                        file: file.to_path_buf(),
                        line: Some(idx + 1),
                        column: Some(line.len() - rest.len() + pos + 1),
                        field: None,
                        message: format!(
                            "environment variable {name} is not set; export it or write ${{{name}:-default}}"
                        ),
                    })
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Finds the line of a dotted field path (`a.b.c`) in YAML text by looking
/// for each key in turn below the previous one. Good enough to point a
/// reader at the right place; `None` if a key is not written in the file.
pub fn line_of_field(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut found = None;
    for key in field.split('.') {
        let key = key.split('[').next().unwrap_or(key);
        let hit = (from..lines.len()).find(|&i| {
            let t = lines[i].trim_start().trim_start_matches("- ");
            t.starts_with(&format!("{key}:")) || t == key || t.starts_with(&format!("\"{key}\":"))
        })?;
        found = Some(hit + 1);
        from = hit + 1;
    }
    found
}

/// Names that also name slots, state files and transactional ids: letters,
/// digits and `_`, at least one.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Default number of partitions for topics unilog creates.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Default replication factor for topics unilog creates.
pub const DEFAULT_REPLICATION_FACTOR: i32 = 1;
/// Default largest number of events in one batch.
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 2000;
/// Default time a batch waits to fill, in milliseconds.
pub const DEFAULT_BATCH_MAX_WAIT_MS: u64 = 20;
/// Default number of batches handed to Kafka and not yet confirmed.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

/// The whole pipeline file (`unilog run --config FILE`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Pipeline name: names the slot, publication and state unless overridden.
    pub name: String,
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub schema_registry: RegistryConfig,
    /// Mapping files, relative to this file.
    pub mappings: Vec<PathBuf>,
    /// Folder for local state (checkpoints), relative to this file.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub batch: BatchConfig,
    /// The HTTP endpoint for `/metrics`, `/health` and `/ready` (off when absent).
    pub http: Option<HttpConfig>,
    /// What happens to a change that cannot be published (a poison row).
    #[serde(default)]
    pub on_bad_row: BadRowPolicy,
    /// Topic for dead letters; default `unilog.<name>.dead_letter`.
    pub dead_letter_topic: Option<String>,
    /// What happens when a table's new shape (after DDL) cannot be published.
    #[serde(default)]
    pub on_schema_change: SchemaChangePolicy,
}

/// What to do with a change that cannot be published: a value that does
/// not parse or does not fit its published type, or a missing key.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BadRowPolicy {
    /// Publish the reason to the dead-letter topic and go on.
    #[default]
    DeadLetter,
    /// Stop the pipeline with the reason (nothing after it is acknowledged).
    Stop,
}

/// What to do when a table changes shape and its mapping or the registry
/// refuses the new shape (an incompatible type change, a dropped column the
/// mapping names).
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SchemaChangePolicy {
    /// Stop the pipeline with the table, the column and the registry's verdict.
    #[default]
    Stop,
    /// Send the table's changes to the dead-letter topic, with that reason,
    /// until its shape or the mapping changes again; other tables go on.
    DeadLetter,
}

/// Default time without progress after which `/ready` fails.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 60;

/// Where unilog serves metrics and health probes.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port`, e.g. `127.0.0.1:9187`.
    pub listen: String,
    /// `/ready` fails when changes wait longer than this without an
    /// acknowledgement, or the pipeline loop does not run for this long.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: u64,
}

fn default_stall_timeout() -> u64 {
    DEFAULT_STALL_TIMEOUT_SECS
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".unilog/state")
}

/// Which database the pipeline reads: exactly one of `postgres` and `mongo`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub postgres: Option<PostgresConfig>,
    pub mongo: Option<MongoConfig>,
}

/// The source a pipeline reads, once validated.
#[derive(Debug, Clone, Copy)]
pub enum SourceChoice<'a> {
    Postgres(&'a PostgresConfig),
    Mongo(&'a MongoConfig),
}

/// Default time a MongoDB read waits for new changes, in milliseconds.
pub const DEFAULT_MONGO_MAX_AWAIT_MS: u64 = 500;

/// A MongoDB replica set read through change streams or its oplog.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// `mongodb://user:password@host:27017/?replicaSet=rs0`.
    pub url: String,
    /// How changes are read.
    #[serde(default)]
    pub mode: MongoMode,
    /// Whether to copy existing documents before streaming.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// What an update event carries as the new document.
    #[serde(default)]
    pub full_document: FullDocument,
    /// What happens when the saved position is no longer in the oplog.
    #[serde(default)]
    pub on_history_lost: HistoryLostPolicy,
    /// How long one read waits for new changes before the pipeline checks
    /// for a stop (and, idle, saves the position the server reports).
    #[serde(default = "default_mongo_max_await")]
    pub max_await_ms: u64,
}

fn default_mongo_max_await() -> u64 {
    DEFAULT_MONGO_MAX_AWAIT_MS
}

/// How a MongoDB source reads changes.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MongoMode {
    /// Change streams on the mapped collections' database(s), with resume tokens.
    #[default]
    ChangeStreams,
    /// A tailable cursor on `local.oplog.rs`, filtered by namespace and `ts`.
    Oplog,
}

/// What an update event carries as its new document.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullDocument {
    /// The document as it is when the change is read (MongoDB's `updateLookup`;
    /// in oplog mode, a read by `_id`). May be newer than the change.
    #[default]
    UpdateLookup,
    /// The post-image stored with the change, when the collection has
    /// `changeStreamPreAndPostImages`; otherwise as `none` (change streams only).
    WhenAvailable,
    /// The post-image stored with the change; a change without one is an
    /// error (change streams only).
    Required,
    /// No lookup: `after` carries the fields the update set, others are
    /// null, and `changed_fields` says which are real.
    None,
}

/// What to do when the saved position fell off the oplog.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HistoryLostPolicy {
    /// Stop with a message that says what was lost and what to run.
    #[default]
    Stop,
    /// Copy the mapped collections again from a new start time, then stream.
    Recopy,
}

/// A PostgreSQL source read through logical replication (pgoutput).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database[?sslmode=...]`.
    pub url: String,
    /// Replication slot; default `unilog_<name>`.
    pub slot: Option<String>,
    /// Publication; default `unilog_<name>`.
    pub publication: Option<String>,
    /// Whether to copy existing rows before streaming.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Create the publication (or add missing tables to it) at start-up.
    #[serde(default = "yes")]
    pub manage_publication: bool,
    /// What to do when the slot this pipeline streamed from is gone.
    #[serde(default)]
    pub on_slot_lost: SlotLostPolicy,
    /// The publication of `insert_only` mappings (inserts and truncates
    /// only); default `<publication>_inserts`.
    pub insert_publication: Option<String>,
    /// Whether unilog may give a mapped table without a replica identity
    /// one itself, before publishing it (the app's UPDATE and DELETE would
    /// fail otherwise).
    #[serde(default)]
    pub set_replica_identity: ReplicaIdentityFix,
}

/// What unilog may run on a mapped table that has no replica identity
/// (no primary key), so that publishing its updates and deletes does not
/// make the app's own UPDATE and DELETE fail.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaIdentityFix {
    /// Nothing: such a table is refused, with the SQL that fixes it.
    #[default]
    Never,
    /// `REPLICA IDENTITY USING INDEX` on a unique index over NOT NULL
    /// columns, when the table has one; refused otherwise.
    Index,
    /// As `index`, else `REPLICA IDENTITY FULL` (more WAL per change).
    IndexOrFull,
}

/// What happens when the slot the pipeline streamed from was dropped or
/// invalidated: the changes since the last delivered position are gone.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SlotLostPolicy {
    /// Stop with what happened and how to recover.
    #[default]
    Stop,
    /// Drop what is left of the slot, create a new one and copy the mapped
    /// tables again, then stream.
    Resnapshot,
}

fn yes() -> bool {
    true
}

/// What happens to rows that exist before the slot is created.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Copy every mapped table once, consistent with the stream, then stream.
    #[default]
    Initial,
    /// Stream changes only.
    Never,
}

/// Kafka connection and topic settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    /// Partitions for topics unilog creates.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Extra librdkafka settings (`security.protocol`, `sasl.mechanism`, ...).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Commit each batch with the position it completes in one Kafka
    /// transaction, so `read_committed` consumers see every change once.
    #[serde(default)]
    pub exactly_once: bool,
    /// The compacted topic of committed positions; default `unilog.<name>.progress`.
    pub progress_topic: Option<String>,
    /// The largest event (value, key and headers) unilog hands to Kafka;
    /// a larger one goes to the dead-letter topic. Default: the smallest of
    /// the producer's `message.max.bytes` and the topics' `max.message.bytes`.
    pub max_event_bytes: Option<usize>,
}

fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}

fn default_replication() -> i32 {
    DEFAULT_REPLICATION_FACTOR
}

/// A Confluent-compatible schema registry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
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
}

crate::endpoint::http_access!(RegistryConfig);

/// How events are grouped on their way to Kafka.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: DEFAULT_BATCH_MAX_EVENTS,
            max_wait_ms: DEFAULT_BATCH_MAX_WAIT_MS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

fn default_max_events() -> usize {
    DEFAULT_BATCH_MAX_EVENTS
}
fn default_max_wait_ms() -> u64 {
    DEFAULT_BATCH_MAX_WAIT_MS
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}

/// A loaded pipeline file, with where it came from.
#[derive(Debug)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub text: String,
    pub config: PipelineConfig,
}

impl LoadedConfig {
    /// Loads and validates a pipeline file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut config, text): (PipelineConfig, String) = load_yaml(path)?;
        config.schema_registry.resolve_files(path);
        let loaded = LoadedConfig {
            path: path.to_path_buf(),
            text,
            config,
        };
        loaded.validate()?;
        Ok(loaded)
    }

    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at_field(&self.path, &self.text, field, message)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        if !is_plain_name(&c.name) {
            return Err(self.err(
                "name",
                format!("`{}` must be letters, digits and `_` only (it names the slot and the publication)", c.name),
            ));
        }
        let pg = match (&c.source.postgres, &c.source.mongo) {
            (Some(pg), None) => pg,
            (None, Some(m)) => {
                if !m.url.starts_with("mongodb://") && !m.url.starts_with("mongodb+srv://") {
                    return Err(self.err(
                        "source.mongo.url",
                        "must be a URL like mongodb://user:password@host:27017/?replicaSet=rs0",
                    ));
                }
                if m.max_await_ms == 0 {
                    return Err(self.err("source.mongo.max_await_ms", "must be at least 1"));
                }
                return self.validate_common();
            }
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "source",
                    "names both `postgres` and `mongo`; a pipeline reads one database (run two pipelines)",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    "source",
                    "names no database; add `postgres:` or `mongo:` under `source:`",
                ))
            }
        };
        if !pg.url.starts_with("postgres://") && !pg.url.starts_with("postgresql://") {
            return Err(self.err(
                "source.postgres.url",
                "must be a URL like postgres://user:password@host:5432/database",
            ));
        }
        if let Err(e) = crate::sources::pg_logical::tls::PgUrl::parse(&pg.url) {
            return Err(self.err("source.postgres.url", e));
        }
        for (field, value) in [
            ("slot", &pg.slot),
            ("publication", &pg.publication),
            ("insert_publication", &pg.insert_publication),
        ] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 63
                    && v.chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_');
                if !ok {
                    return Err(self.err(
                        &format!("source.postgres.{field}"),
                        format!("`{v}` must be 1 to 63 lowercase letters, digits or `_`"),
                    ));
                }
            }
        }
        let inserts = self.insert_publication();
        if inserts.len() > 63 {
            return Err(self.err(
                "source.postgres.insert_publication",
                format!("the default `{inserts}` (`<publication>_inserts`) is longer than PostgreSQL's 63 characters; name it here"),
            ));
        }
        self.validate_common()
    }

    fn validate_common(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        if c.kafka.brokers.trim().is_empty() {
            return Err(self.err("kafka.brokers", "is empty; give host:port[,host:port]"));
        }
        if c.kafka.partitions < 1 {
            return Err(self.err("kafka.partitions", "must be at least 1"));
        }
        if c.kafka.replication_factor < 1 {
            return Err(self.err("kafka.replication_factor", "must be at least 1"));
        }
        if let Err(e) = c.schema_registry.access().validate() {
            return Err(self.err(&format!("schema_registry.{}", e.field), e.message));
        }
        if c.mappings.is_empty() {
            return Err(self.err("mappings", "lists no mapping file; add at least one"));
        }
        if let Some(http) = &c.http {
            if http.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.err(
                    "http.listen",
                    format!("`{}` is not an address like 127.0.0.1:9187", http.listen),
                ));
            }
            if http.stall_timeout_secs == 0 {
                return Err(self.err("http.stall_timeout_secs", "must be at least 1"));
            }
        }
        if c.batch.max_events == 0 || c.batch.max_in_flight == 0 {
            return Err(self.err(
                "batch",
                "`max_events` and `max_in_flight` must be at least 1",
            ));
        }
        Ok(())
    }

    /// A path from the config file, resolved against the file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// The Postgres source settings.
    /// `None` for a MongoDB pipeline.
    pub fn postgres(&self) -> Option<&PostgresConfig> {
        self.config.source.postgres.as_ref()
    }

    /// The source this pipeline reads (validation made sure there is one).
    pub fn source(&self) -> SourceChoice<'_> {
        match (&self.config.source.postgres, &self.config.source.mongo) {
            (_, Some(m)) => SourceChoice::Mongo(m),
            (Some(pg), None) => SourceChoice::Postgres(pg),
            (None, None) => unreachable!("validate() requires a source"),
        }
    }

    /// The replication slot name (Postgres).
    pub fn slot(&self) -> String {
        self.postgres()
            .and_then(|p| p.slot.clone())
            .unwrap_or_else(|| format!("unilog_{}", self.config.name.to_lowercase()))
    }

    /// The publication name (Postgres).
    pub fn publication(&self) -> String {
        self.postgres()
            .and_then(|p| p.publication.clone())
            .unwrap_or_else(|| format!("unilog_{}", self.config.name.to_lowercase()))
    }

    /// The publication of `insert_only` mappings (Postgres).
    pub fn insert_publication(&self) -> String {
        self.postgres()
            .and_then(|p| p.insert_publication.clone())
            .unwrap_or_else(|| format!("{}_inserts", self.publication()))
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.config
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("unilog.{}.dead_letter", self.config.name))
    }

    /// The topic of committed positions (exactly-once delivery).
    pub fn progress_topic(&self) -> String {
        self.config
            .kafka
            .progress_topic
            .clone()
            .unwrap_or_else(|| format!("unilog.{}.progress", self.config.name))
    }

    /// Folder for local state of this pipeline.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.config.state_dir)
    }
}

/// A URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PG_URL" => Some("postgres://u:secret@h/db".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        let out = expand_env(
            Path::new("f.yaml"),
            "url: ${PG_URL}\nx: ${NOPE:-7}\n# ${IGNORED}\ny: $${LIT}\n",
            env,
        )
        .unwrap();
        assert_eq!(
            out,
            "url: postgres://u:secret@h/db\nx: 7\n# ${IGNORED}\ny: ${LIT}\n"
        );
    }

    #[test]
    fn missing_variable_names_line_and_variable() {
        let err = expand_env(Path::new("p.yaml"), "a: 1\nb: ${MISSING_SECRET}\n", env).unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(
            err.to_string()
                .starts_with("p.yaml:2:4: environment variable MISSING_SECRET is not set"),
            "{err}"
        );
    }

    #[test]
    fn finds_nested_field_lines() {
        let text = "name: x\nsource:\n  postgres:\n    url: u\n    slot: S\nkafka:\n  brokers: b\n";
        assert_eq!(line_of_field(text, "source.postgres.slot"), Some(5));
        assert_eq!(line_of_field(text, "kafka.brokers"), Some(7));
        assert_eq!(line_of_field(text, "kafka.nothing"), None);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("http://h:1/x"), "http://h:1/x");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = "name: demo\nsource:\n  postgres:\n    url: postgres://u:p@127.0.0.1/db\nkafka:\n  brokers: 127.0.0.1:9092\nschema_registry:\n  url: http://127.0.0.1:8081\nmappings: [m.yaml]\n";

    #[test]
    fn loads_a_good_file_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "p.yaml", GOOD);
        let c = LoadedConfig::load(&p).unwrap();
        assert_eq!(c.slot(), "unilog_demo");
        assert_eq!(c.publication(), "unilog_demo");
        assert_eq!(c.config.kafka.partitions, DEFAULT_PARTITIONS);
        assert_eq!(c.postgres().unwrap().snapshot, SnapshotMode::Initial);
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "p.yaml",
            &GOOD.replace("  brokers:", "  brokerz: x\n  brokers:"),
        );
        let err = LoadedConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("p.yaml:6:3") && err.contains("unknown field `brokerz`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "p.yaml",
            &GOOD.replace(
                "brokers: 127.0.0.1:9092",
                "brokers: 127.0.0.1:9092\n  partitions: many",
            ),
        );
        let err = LoadedConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("p.yaml:7") && err.contains("invalid type"),
            "{err}"
        );
    }

    #[test]
    fn semantic_error_names_field_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "p.yaml",
            &GOOD.replace(
                "url: postgres://u:p@127.0.0.1/db",
                "url: postgres://u:p@127.0.0.1/db\n    slot: Bad-Slot",
            ),
        );
        let err = LoadedConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("p.yaml:5: field `source.postgres.slot`"),
            "{err}"
        );
    }
}
