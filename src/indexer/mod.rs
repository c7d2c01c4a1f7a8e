//! The indexer: topics kept in step with a search index (`unilog index`).
//!
//! ```text
//!  topic ──consumer group──▶ decode (registry) ──▶ _bulk index/delete ──▶ alias ──▶ <alias>_vN
//!    ▲                                              │ per document:
//!    └──── commit offsets only after the bulk ◀─────┤  2xx done · 409 stale · 429/5xx retried
//!                                                   └─ other 4xx ──▶ dead-letter topic (reason)
//! ```
//!
//! **Why replays never roll a document back.** The document id is the
//! record's key and the document version is the record's Kafka offset plus
//! one, written with `version_type=external_gte`. One key lives on one
//! partition, so its offsets grow with every change; a replayed, retried or
//! reordered batch carries older offsets, and the server refuses them (409,
//! counted as stale and dropped). Equal versions are accepted, so writing
//! the same record twice is harmless. The offset is used rather than the
//! source position in the value because it exists on every topic (joined
//! documents have no database position) and is monotonic per key by
//! construction. The price: a topic that is recreated or repartitioned
//! starts its offsets again, and needs a reindex into a new index.
//!
//! **Why offsets are committed after the bulk.** A crash between the bulk
//! and the commit re-sends the batch, which the versions make harmless; the
//! other order could lose it.
//!
//! `reindex` builds a new index by replay and swaps the alias (blue/green),
//! `http` serves `GET /search/<alias>?q=...`.

pub mod config;
pub mod http;
pub mod mapping;
pub mod reindex;
pub mod search;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value as Json};

use crate::config::ConfigError;
use crate::mapping::registry::{RegistryClient, RegistryError};
use crate::telemetry::{metrics, names};
use crate::topics::{backoff, consumer_config, CodecError, KnownSchema, SchemaCache};
use config::{DocumentFrom, IndexSpec, LoadedIndexerConfig};
use search::{SearchClient, SearchError};

/// What stops the indexer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("topic {topic}, partition {partition}, offset {offset}: {source}")]
    Codec {
        topic: String,
        partition: i32,
        offset: i64,
        #[source]
        source: CodecError,
    },
    #[error("kafka: {what}: {reason}")]
    Kafka { what: String, reason: String },
    #[error("gave up after {attempts} attempts: {last}; raise retry.max_attempts (0 retries forever) or fix the search server")]
    GaveUp { attempts: u32, last: String },
    #[error("{0}")]
    Usage(String),
}

impl IndexError {
    /// Worth restarting for: a server that may come back.
    pub fn is_transient(&self) -> bool {
        match self {
            IndexError::Search(e) => e.is_transient(),
            IndexError::Registry(e) => e.is_transient(),
            IndexError::Codec { source, .. } => source.is_transient(),
            IndexError::Kafka { .. } => true,
            // retry.max_attempts is spent: stop, as the setting says.
            IndexError::GaveUp { .. } | IndexError::Config(_) | IndexError::Usage(_) => false,
        }
    }
}

fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> IndexError {
    let what = what.into();
    move |e| IndexError::Kafka {
        what,
        reason: e.to_string(),
    }
}

/// A consumed record, owned (so the consumer can be polled again).
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

impl Rec {
    /// Copies a message.
    pub fn of(m: &BorrowedMessage<'_>) -> Rec {
        Rec {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
        }
    }
}

/// What one record does to its index.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Index {
        id: String,
        doc: Json,
    },
    Delete {
        id: String,
    },
    /// Nothing to do (a table-wide event such as a truncate).
    Skip(&'static str),
    /// Cannot be indexed: goes to the dead-letter topic with the reason.
    Dead(String),
}

/// The document id of a record key: its text, or `0x` and hex when it is not UTF-8.
pub fn document_id(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "0x{}",
            key.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// The action for a decoded value (`None`: a tombstone).
pub fn action_for(key: Option<&[u8]>, value: Option<Json>, from: DocumentFrom) -> Action {
    let Some(key) = key else {
        return Action::Dead("the record has no key, and a document needs an id".into());
    };
    let id = document_id(key);
    if id.is_empty() || id.len() > 512 {
        return Action::Dead(format!(
            "the key is {} bytes; a document id is 1 to 512 bytes",
            id.len()
        ));
    }
    let Some(value) = value else {
        return Action::Delete { id };
    };
    let envelope = value.get("op").and_then(Json::as_str).is_some() && value.get("after").is_some();
    match from {
        DocumentFrom::Value => Action::Index { id, doc: value },
        DocumentFrom::After | DocumentFrom::Auto if envelope => {
            match value["op"].as_str().unwrap_or_default() {
                "delete" => Action::Delete { id },
                "truncate" => Action::Skip("truncate"),
                op => match &value["after"] {
                    Json::Object(_) => Action::Index {
                        id,
                        doc: value["after"].clone(),
                    },
                    _ => Action::Dead(format!("a `{op}` event without an `after` row")),
                },
            }
        }
        DocumentFrom::After => Action::Dead(
            "`document: after` but the value is not a domain event (no `op`/`after`)".into(),
        ),
        DocumentFrom::Auto => Action::Index { id, doc: value },
    }
}

/// Counts of one run or one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    pub indexed: u64,
    pub deleted: u64,
    /// Refused by the server as older than what it holds (replays).
    pub stale: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    /// Bulk requests sent again (whole or in part).
    pub retries: u64,
}

impl IndexStats {
    fn add(&mut self, o: IndexStats) {
        self.indexed += o.indexed;
        self.deleted += o.deleted;
        self.stale += o.stale;
        self.dead_lettered += o.dead_lettered;
        self.skipped += o.skipped;
        self.retries += o.retries;
    }
}

/// Decodes records and writes them with `_bulk`: the part shared by the
/// live indexer and the reindex.
pub struct Indexer {
    cfg: Arc<LoadedIndexerConfig>,
    search: SearchClient,
    cache: SchemaCache,
    dlq: FutureProducer,
    specs: HashMap<String, IndexSpec>,
}

impl Indexer {
    /// Clients for the search server, the registry and the dead-letter topic.
    pub fn new(cfg: Arc<LoadedIndexerConfig>) -> Result<Indexer, IndexError> {
        let c = &cfg.config;
        let search = SearchClient::from_config(&c.search)?;
        let reg = &c.schema_registry;
        let registry = RegistryClient::from_config(reg)?;
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &c.kafka.brokers)
            .set("client.id", "unilog-indexer")
            .set("enable.idempotence", "true")
            .set("acks", "all");
        for (k, v) in &c.kafka.properties {
            pc.set(k, v);
        }
        let dlq = pc.create().map_err(kafka("cannot create the producer"))?;
        let specs = c
            .indexes
            .iter()
            .map(|s| (s.topic.clone(), s.clone()))
            .collect();
        Ok(Indexer {
            search,
            cache: SchemaCache::new(registry),
            dlq,
            specs,
            cfg,
        })
    }

    /// The search client.
    pub fn search(&self) -> &SearchClient {
        &self.search
    }

    /// The latest value schema of `topic`, if registered.
    pub async fn latest_schema(&mut self, topic: &str) -> Result<Option<KnownSchema>, IndexError> {
        let subject = format!("{topic}-value");
        match self.cache.registry().latest(&subject).await? {
            Some(v) => KnownSchema::parse(&v.schema).map(Some).map_err(|reason| {
                IndexError::Usage(format!(
                    "subject `{subject}`: the registry's schema does not parse: {reason}"
                ))
            }),
            None => Ok(None),
        }
    }

    /// Creates `<alias>_v1` with the derived mapping and points the alias at
    /// it, for every alias that does not exist yet.
    pub async fn ensure_aliases(&mut self) -> Result<(), IndexError> {
        let specs: Vec<IndexSpec> = self.cfg.config.indexes.clone();
        for spec in specs {
            if !self.search.alias_targets(&spec.alias).await?.is_empty() {
                continue;
            }
            if self.search.exists(&spec.alias).await? {
                return Err(IndexError::Usage(format!(
                    "`{}` is an index, not an alias; the indexer writes through an alias so that `unilog reindex` can swap it. Reindex it into an alias or choose another alias name",
                    spec.alias
                )));
            }
            let schema = self.latest_schema(&spec.topic).await?;
            let index = format!("{}_v1", spec.alias);
            self.search
                .create_index(&index, &mapping::index_body(&spec, schema.as_ref()))
                .await?;
            self.search.swap_alias(&spec.alias, &[], &index).await?;
            tracing::info!(alias = %spec.alias, index = %index, "created the index and its alias");
        }
        Ok(())
    }

    /// Decodes one record into its action. `Err` only for transient
    /// failures (the registry is down): data errors become [`Action::Dead`].
    pub async fn prepare(&mut self, rec: &Rec) -> Result<Action, IndexError> {
        let from = self
            .specs
            .get(&rec.topic)
            .map_or(DocumentFrom::Auto, |s| s.document);
        let value = match &rec.payload {
            None => None,
            Some(p) => match self.cache.decode(p).await {
                Ok((schema, v)) => Some(schema.json(&v)),
                Err(e) if e.is_transient() => {
                    return Err(IndexError::Codec {
                        topic: rec.topic.clone(),
                        partition: rec.partition,
                        offset: rec.offset,
                        source: e,
                    })
                }
                Err(e) => return Ok(Action::Dead(e.to_string())),
            },
        };
        Ok(action_for(rec.key.as_deref(), value, from))
    }

    /// [`Indexer::prepare`], retrying transient failures with backoff.
    pub async fn prepare_retrying(&mut self, rec: &Rec) -> Result<Action, IndexError> {
        let mut attempt = 0;
        loop {
            match self.prepare(rec).await {
                Ok(a) => return Ok(a),
                Err(e) => {
                    attempt += 1;
                    self.pause(attempt, &e.to_string()).await?;
                }
            }
        }
    }

    async fn pause(&self, attempt: u32, why: &str) -> Result<(), IndexError> {
        let r = &self.cfg.config.retry;
        if r.max_attempts > 0 && attempt >= r.max_attempts {
            return Err(IndexError::GaveUp {
                attempts: attempt,
                last: why.to_string(),
            });
        }
        let d = backoff(
            attempt.saturating_sub(1),
            Duration::from_millis(r.initial_ms),
            Duration::from_millis(r.max_ms),
        );
        tracing::warn!(attempt, retry_in_ms = d.as_millis(), reason = %why, "retrying");
        metrics().inc(names::INDEX_RETRIES, &[], 1.0);
        tokio::time::sleep(d).await;
        Ok(())
    }

    /// Writes one batch: `_bulk` into `target(spec)` (the alias, or the new
    /// index of a reindex), retrying 429/5xx, dead-lettering other refusals.
    /// Returns when every record is either in the index, stale, skipped or
    /// confirmed on the dead-letter topic.
    pub async fn write(
        &mut self,
        batch: &[(Rec, Action)],
        target: &(dyn Fn(&IndexSpec) -> String + Send + Sync),
    ) -> Result<IndexStats, IndexError> {
        let started = Instant::now();
        let mut stats = IndexStats::default();
        let mut dead: Vec<(usize, u16, String)> = Vec::new();
        let mut pending: Vec<usize> = Vec::new();
        for (i, (rec, action)) in batch.iter().enumerate() {
            match action {
                Action::Index { .. } | Action::Delete { .. }
                    if self.specs.contains_key(&rec.topic) =>
                {
                    pending.push(i)
                }
                Action::Index { .. } | Action::Delete { .. } => stats.skipped += 1,
                Action::Skip(what) => {
                    tracing::warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, what, "record skipped: it does not name one document");
                    stats.skipped += 1;
                }
                Action::Dead(reason) => dead.push((i, 0, reason.clone())),
            }
        }
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let mut body = Vec::with_capacity(pending.len() * 256);
            for &i in &pending {
                let (rec, action) = &batch[i];
                let index = self.specs.get(&rec.topic).map(target).unwrap_or_default();
                let version = rec.offset.saturating_add(1);
                let (verb, id, doc) = match action {
                    Action::Index { id, doc } => ("index", id, Some(doc)),
                    Action::Delete { id } => ("delete", id, None),
                    _ => continue,
                };
                let meta = json!({verb: {"_index": index, "_id": id, "version": version, "version_type": "external_gte"}});
                body.extend_from_slice(meta.to_string().as_bytes());
                body.push(b'\n');
                if let Some(doc) = doc {
                    body.extend_from_slice(doc.to_string().as_bytes());
                    body.push(b'\n');
                }
            }
            let items = match self.search.bulk(body, pending.len()).await {
                Ok(items) => items,
                Err(e) if e.is_transient() => {
                    attempt += 1;
                    stats.retries += 1;
                    self.pause(attempt, &e.to_string()).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut again = Vec::new();
            for (&i, item) in pending.iter().zip(items) {
                let is_delete = matches!(batch[i].1, Action::Delete { .. });
                match item.status {
                    200..=299 if is_delete => stats.deleted += 1,
                    200..=299 => stats.indexed += 1,
                    404 if is_delete => stats.deleted += 1,
                    409 => stats.stale += 1,
                    429 | 500..=599 => again.push(i),
                    status => dead.push((
                        i,
                        status,
                        item.error.unwrap_or_else(|| format!("HTTP {status}")),
                    )),
                }
            }
            pending = again;
            if !pending.is_empty() {
                attempt += 1;
                stats.retries += 1;
                self.pause(
                    attempt,
                    &format!("{} documents answered 429/5xx", pending.len()),
                )
                .await?;
            }
        }
        stats.dead_lettered = self.dead_letter(batch, &dead, target).await?;
        let m = metrics();
        #[allow(clippy::cast_precision_loss)]
        {
            m.inc(
                names::INDEX_DOCUMENTS,
                &[("result", "indexed")],
                stats.indexed as f64,
            );
            m.inc(
                names::INDEX_DOCUMENTS,
                &[("result", "deleted")],
                stats.deleted as f64,
            );
            m.inc(
                names::INDEX_DOCUMENTS,
                &[("result", "stale")],
                stats.stale as f64,
            );
            m.inc(
                names::INDEX_DOCUMENTS,
                &[("result", "dead_lettered")],
                stats.dead_lettered as f64,
            );
        }
        m.observe_many(
            names::INDEX_BULK_SECONDS,
            &[],
            [started.elapsed().as_secs_f64()],
        );
        Ok(stats)
    }

    /// Publishes the refused records' reasons and waits for Kafka to confirm.
    async fn dead_letter(
        &self,
        batch: &[(Rec, Action)],
        dead: &[(usize, u16, String)],
        target: &(dyn Fn(&IndexSpec) -> String + Send + Sync),
    ) -> Result<u64, IndexError> {
        if dead.is_empty() {
            return Ok(0);
        }
        let topic = self.cfg.dead_letter_topic();
        let mut futs = Vec::with_capacity(dead.len());
        for (i, status, reason) in dead {
            let rec = &batch[*i].0;
            tracing::warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, status, reason = %reason, "document refused; sent to the dead-letter topic");
            let body = json!({
                "indexer": self.cfg.config.name,
                "topic": rec.topic,
                "partition": rec.partition,
                "offset": rec.offset,
                "key": rec.key.as_deref().map(document_id),
                "index": self.specs.get(&rec.topic).map(target),
                "status": status,
                "reason": reason,
                "at": chrono::Utc::now().to_rfc3339(),
            })
            .to_string();
            let mut record = FutureRecord::<Vec<u8>, String>::to(&topic).payload(&body);
            if let Some(k) = &rec.key {
                record = record.key(k);
            }
            loop {
                match self.dlq.send_result(record) {
                    Ok(f) => {
                        futs.push(f);
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        return Err(IndexError::Kafka {
                            what: format!("delivery to the dead-letter topic {topic}"),
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
        for r in futures::future::join_all(futs).await {
            let failed = match r {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e.to_string()),
                Err(_) => Some("the producer was dropped before confirming".to_string()),
            };
            if let Some(reason) = failed {
                return Err(IndexError::Kafka {
                    what: format!("delivery to the dead-letter topic {topic}"),
                    reason,
                });
            }
        }
        Ok(dead.len() as u64)
    }
}

/// Reads up to `max` records, waiting at most `wait` for the batch to fill.
pub async fn next_batch(
    consumer: &StreamConsumer,
    max: usize,
    wait: Duration,
) -> Result<Vec<Rec>, IndexError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(Rec::of(&m)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka consumer error");
                if out.is_empty() {
                    tokio::time::sleep_until(deadline).await;
                }
                break;
            }
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The next offsets to read after `batch`, per topic and partition.
pub fn next_offsets(batch: &[Rec]) -> TopicPartitionList {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for r in batch {
        let e = next.entry((r.topic.as_str(), r.partition)).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in next {
        // Cannot fail for a valid offset.
        let _ = tpl.add_partition_offset(t, p, Offset::Offset(o));
    }
    tpl
}

/// Runs the live indexer until `stop`.
/// The brokers answer with these settings; a TLS or SASL refusal is a
/// usage error (not retried), no answer a Kafka error (retried).
async fn check_kafka(c: &config::IndexerConfig) -> Result<(), IndexError> {
    crate::sinks::kafka::check_brokers(
        &c.kafka.brokers,
        &c.kafka.properties,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| match e {
        crate::sinks::SinkError::Refused { .. } => IndexError::Usage(e.to_string()),
        other => IndexError::Kafka {
            what: "connecting".into(),
            reason: other.to_string(),
        },
    })
}

pub async fn run(
    cfg: Arc<LoadedIndexerConfig>,
    stop: Arc<AtomicBool>,
) -> Result<IndexStats, IndexError> {
    let c = &cfg.config;
    check_kafka(c).await?;
    let mut ix = Indexer::new(cfg.clone())?;
    ix.ensure_aliases().await?;
    let consumer: StreamConsumer =
        consumer_config(&c.kafka.brokers, &cfg.group(), &c.kafka.properties)
            .create()
            .map_err(kafka("cannot create the consumer"))?;
    let topics: Vec<&str> = c.indexes.iter().map(|i| i.topic.as_str()).collect();
    consumer
        .subscribe(&topics)
        .map_err(kafka(format!("cannot subscribe to {}", topics.join(", "))))?;
    let health = crate::telemetry::health();
    health.set_phase(&c.name, crate::telemetry::Phase::Streaming);
    tracing::info!(topics = %topics.join(","), group = %cfg.group(), "indexing");
    let mut total = IndexStats::default();
    let alias = |s: &IndexSpec| s.alias.clone();
    while !stop.load(Ordering::Relaxed) {
        let batch = next_batch(
            &consumer,
            c.batch.max_docs,
            Duration::from_millis(c.batch.max_wait_ms),
        )
        .await?;
        health.beat();
        if batch.is_empty() {
            continue;
        }
        health.pending(true);
        let mut prepared = Vec::with_capacity(batch.len());
        for rec in batch {
            let action = ix.prepare_retrying(&rec).await?;
            prepared.push((rec, action));
        }
        let stats = ix.write(&prepared, &alias).await?;
        total.add(stats);
        let recs: Vec<Rec> = prepared.into_iter().map(|(r, _)| r).collect();
        if let Err(e) = consumer.commit(&next_offsets(&recs), CommitMode::Sync) {
            // After a rebalance the partition's new owner indexes the batch
            // again; the versions make that harmless.
            tracing::warn!(error = %e, "cannot commit offsets; the batch will be indexed again");
        }
        health.pending(false);
        health.progressed();
    }
    health.set_phase(&c.name, crate::telemetry::Phase::Stopped);
    tracing::info!(
        indexed = total.indexed,
        deleted = total.deleted,
        stale = total.stale,
        dead_lettered = total.dead_lettered,
        "indexer stopped"
    );
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_for_envelopes_plain_values_and_tombstones() {
        let ev = |op: &str, after: Json| json!({"op": op, "after": after, "key": "1"});
        assert_eq!(
            action_for(
                Some(b"1"),
                Some(ev("insert", json!({"a": 1}))),
                DocumentFrom::Auto
            ),
            Action::Index {
                id: "1".into(),
                doc: json!({"a": 1})
            }
        );
        assert_eq!(
            action_for(
                Some(b"1"),
                Some(ev("delete", Json::Null)),
                DocumentFrom::Auto
            ),
            Action::Delete { id: "1".into() }
        );
        assert_eq!(
            action_for(
                Some(b"1"),
                Some(ev("truncate", Json::Null)),
                DocumentFrom::After
            ),
            Action::Skip("truncate")
        );
        assert_eq!(
            action_for(Some(b"7"), None, DocumentFrom::Auto),
            Action::Delete { id: "7".into() }
        );
        assert_eq!(
            action_for(Some(b"7"), Some(json!({"n": 1})), DocumentFrom::Auto),
            Action::Index {
                id: "7".into(),
                doc: json!({"n": 1})
            }
        );
        assert!(matches!(
            action_for(None, Some(json!({})), DocumentFrom::Auto),
            Action::Dead(_)
        ));
        assert!(matches!(
            action_for(Some(b"1"), Some(json!({"n": 1})), DocumentFrom::After),
            Action::Dead(_)
        ));
        assert_eq!(document_id(&[0xff, 0x01]), "0xff01");
    }

    #[test]
    fn next_offsets_are_one_past_the_highest() {
        let r = |p, o| Rec {
            topic: "t".into(),
            partition: p,
            offset: o,
            key: None,
            payload: None,
        };
        let tpl = next_offsets(&[r(0, 5), r(0, 3), r(1, 9)]);
        let l = tpl.elements();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].offset(), Offset::Offset(6));
        assert_eq!(l[1].offset(), Offset::Offset(10));
    }
}
