//! One pipeline, end to end: source -> mapper -> sink, and acknowledgements
//! flowing back only after delivery.
//!
//! Batches are pipelined: batch N+1 is read and handed to Kafka while batch
//! N is still waiting for confirmation, up to `batch.max_in_flight`
//! batches. Deliveries complete in order, and a batch's source position is
//! acknowledged only after it and every batch before it are confirmed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};

use crate::checkpoint::FileCheckpointStore;
use crate::config::{
    BadRowPolicy, ConfigError, LoadedConfig, MongoConfig, PostgresConfig, SchemaChangePolicy,
    SourceChoice,
};
use crate::event::{ChangeEvent, Lsn, Op, SeqKey, SourceKind, TableInfo};
use crate::mapping::registry::RegistryClient;
use crate::mapping::spec::LoadedMapping;
use crate::mapping::{dedup_id, DomainEvent, Mapper, MappingError};
use crate::sinks::kafka::{
    ensure_progress_topic, ensure_topics, event_limits, read_last, EventLimits, KafkaSink,
};
use crate::sinks::{ProgressRecord, Sink, SinkError};
use crate::sources::mongo_oplog::{cluster_time_text, MongoError, MongoSource};
use crate::sources::pg_logical::{connect_plain, safety, PgError, PgSettings, PgSource};
use crate::sources::Source;
use crate::telemetry::{health, metrics, names, LatencyHistogram, Phase};

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Mapping(Box<MappingError>),
    #[error(transparent)]
    Source(#[from] PgError),
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{}", problems_text(.0))]
    Many(Vec<String>),
    /// Local state: the process lock above all (another process runs this
    /// pipeline).
    #[error(transparent)]
    State(#[from] crate::checkpoint::CheckpointError),
}

impl PipelineError {
    /// Whether restarting the pipeline later may succeed: a server that
    /// is unreachable or a connection that dropped. Bad configuration, bad
    /// mappings and refused schemas are not.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_transient(),
            PipelineError::Mongo(e) => e.is_transient(),
            PipelineError::Sink(e) => e.is_transient(),
            PipelineError::Mapping(e) => e.is_transient(),
            PipelineError::Config(_) | PipelineError::Many(_) | PipelineError::State(_) => false,
        }
    }
}

fn problems_text(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => format!(
            "{} problems found:\n{}",
            many.len(),
            many.iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

impl From<MappingError> for PipelineError {
    fn from(e: MappingError) -> Self {
        PipelineError::Mapping(Box::new(e))
    }
}

/// Counts of one run, for the log and for tests.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub snapshot_rows: u64,
    pub events_read: u64,
    pub events_published: u64,
    /// The last acknowledged source position, as text.
    pub last_acked: Option<String>,
    /// Changes sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Commit-to-Kafka-acknowledgement latency of streamed changes.
    pub latency: LatencyHistogram,
    /// Changes read again after a restart and skipped, because an earlier
    /// run had committed them (exactly-once delivery).
    pub skipped_committed: u64,
}

/// What the progress topic records for a pipeline (exactly-once delivery).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Progress {
    /// The life of the slot these positions belong to.
    slot: String,
    /// The last source position whose every change is committed.
    position: Option<String>,
    /// The last committed change (a batch may end inside a transaction).
    last_commit: Option<String>,
    last_ordinal: Option<u64>,
}

/// Exactly-once delivery: each batch and the position it completes are
/// committed in one Kafka transaction, the position to a compacted
/// progress topic. After a restart the slot may resend changes the last
/// run committed (its acknowledgement lags); those are skipped.
struct ExactlyOnce {
    topic: String,
    key: Vec<u8>,
    committed: Progress,
}

impl ExactlyOnce {
    /// Whether an earlier run committed `ev` already.
    fn committed_before(&self, ev: &ChangeEvent) -> bool {
        if ev.op == Op::Snapshot {
            return false;
        }
        let p = &self.committed;
        if p.position
            .as_deref()
            .and_then(|s| s.parse::<Lsn>().ok())
            .is_some_and(|pos| ev.seq.commit < pos)
        {
            return true;
        }
        match (
            p.last_commit.as_deref().and_then(|s| s.parse::<Lsn>().ok()),
            p.last_ordinal,
        ) {
            (Some(commit), Some(ordinal)) => ev.seq <= SeqKey { commit, ordinal },
            _ => false,
        }
    }
}

/// What is known of a batch handed to the sink.
struct BatchInfo<P> {
    position: Option<P>,
    /// Commit time of each published record (streamed changes only).
    commit_times: Vec<i64>,
    handed_over: Instant,
    /// Records published per table.
    per_table: Vec<(String, u64)>,
}

/// A batch's delivery: resolves to what is known of the batch.
type Pending<P> = Pin<Box<dyn Future<Output = Result<BatchInfo<P>, SinkError>> + Send>>;

/// Maps and hands batches to the sink, keeping deliveries in order.
struct Publisher<'a, K: Sink, P> {
    pipeline: String,
    sink: &'a K,
    registry: &'a RegistryClient,
    mapper: &'a mut Mapper,
    inflight: FuturesOrdered<Pending<P>>,
    /// Oldest commit time of each in-flight batch, in order.
    inflight_oldest: VecDeque<Option<i64>>,
    max_in_flight: usize,
    /// Where poison rows go; `None`: stop on them.
    dead_letter: Option<Arc<str>>,
    /// Where changes of a table whose new shape is refused go; `None`: stop.
    schema_dead_letter: Option<Arc<str>>,
    /// Tables whose current shape was refused, with the shape and why: their
    /// changes are dead-lettered until the shape changes again.
    quarantined: HashMap<String, (Arc<TableInfo>, String)>,
    /// Set for exactly-once delivery.
    exactly_once: Option<ExactlyOnce>,
    /// The largest event Kafka takes, per topic; larger ones are dead letters.
    limits: EventLimits,
    stats: RunStats,
}

impl<K: Sink, P: std::fmt::Display + Send + 'static> Publisher<'_, K, P> {
    /// Maps one change; a poison row becomes a dead letter when allowed.
    fn map_one(
        &mut self,
        ev: &ChangeEvent,
        out: &mut Vec<DomainEvent>,
    ) -> Result<usize, PipelineError> {
        let before = out.len();
        let mapped = self
            .mapper
            .map_into(ev, out)
            .and_then(|n| self.check_sizes(ev, &out[before..]).map(|()| n));
        match mapped {
            Ok(n) => Ok(n),
            Err(e) if e.is_definite() && self.dead_letter.is_some() => {
                out.truncate(before);
                let topic = self.dead_letter.clone().unwrap_or_else(|| Arc::from(""));
                out.push(self.dead_letter_of(ev, topic, &e.to_string()));
                if let MappingError::TooLarge { key, size, .. } = &e {
                    if let Some(body) = out.last_mut().and_then(|d| d.payload.as_mut()) {
                        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) {
                            v["key"] = key.clone().into();
                            v["size_bytes"] = (*size).into();
                            *body = v.to_string().into_bytes();
                        }
                    }
                }
                Ok(1)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// An event larger than Kafka accepts is refused here, before the sink
    /// (where the producer or the broker would refuse it for good).
    fn check_sizes(&self, ev: &ChangeEvent, records: &[DomainEvent]) -> Result<(), MappingError> {
        for d in records {
            let size = crate::sinks::kafka::record_size(d);
            let limit = self.limits.for_topic(&d.topic);
            if size > limit.bytes {
                return Err(MappingError::TooLarge {
                    table: ev.table.qualified(),
                    key: d
                        .key
                        .as_deref()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                    size,
                    limit: limit.bytes,
                    from: limit.from,
                });
            }
        }
        Ok(())
    }

    /// The dead letter of a change: JSON with where it came from and `error`,
    /// never its values.
    fn dead_letter_of(&mut self, ev: &ChangeEvent, topic: Arc<str>, error: &str) -> DomainEvent {
        let table = ev.table.qualified();
        let id = dedup_id(ev);
        tracing::warn!(table = %table, dedup_id = %id, error = %error, "change sent to the dead-letter topic");
        metrics().inc(
            names::EVENTS_DEAD_LETTERED,
            &[("pipeline", &self.pipeline), ("table", &table)],
            1.0,
        );
        self.stats.dead_lettered += 1;
        let mut body = serde_json::json!({
            "pipeline": self.pipeline,
            "table": table,
            "op": ev.op.as_str(),
            "dedup_id": id,
            "error": error,
        });
        match ev.table.kind {
            SourceKind::Postgres => {
                body["lsn"] = ev.meta.lsn.to_string().into();
                body["xid"] = ev.meta.xid.into();
            }
            SourceKind::Mongo => {
                body["cluster_time"] = cluster_time_text(ev.meta.lsn.0).into();
            }
        }
        DomainEvent {
            topic,
            key: Some(table.into_bytes()),
            dedup_id: id,
            event_type: Arc::from("unilog.DeadLetter"),
            schema_id: 0,
            payload: Some(body.to_string().into_bytes()),
        }
    }

    /// Checks a table's new shape with the mapping and the registry. `false`
    /// when the shape is refused and the policy dead-letters its changes
    /// (then `ev` went to `out` as a dead letter).
    async fn adopt_shape(
        &mut self,
        ev: &ChangeEvent,
        out: &mut Vec<DomainEvent>,
    ) -> Result<bool, PipelineError> {
        let q = ev.table.qualified();
        if let Some((shape, why)) = self.quarantined.get(&q) {
            if same_shape(shape, &ev.table) {
                let (topic, why) = (self.schema_dead_letter.clone(), why.clone());
                if let Some(topic) = topic {
                    out.push(self.dead_letter_of(ev, topic, &why));
                    return Ok(false);
                }
            }
        }
        tracing::info!(table = %q, "the table's columns changed; deriving and checking its schema again");
        match self.mapper.refresh(&ev.table, self.registry).await {
            Ok(ids) => {
                self.quarantined.remove(&q);
                for (subject, id) in ids {
                    tracing::info!(table = %q, subject = %subject, schema_id = id.unwrap_or_default(), "schema in use");
                }
                Ok(true)
            }
            Err(e) if !e.is_transient() && self.schema_dead_letter.is_some() => {
                let why = format!("the table's new shape cannot be published: {e}");
                tracing::error!(table = %q, error = %e, "the table's new shape is refused; its changes go to the dead-letter topic until the table or the mapping changes (on_schema_change: dead_letter)");
                self.quarantined.insert(q, (ev.table.clone(), why.clone()));
                let topic = self
                    .schema_dead_letter
                    .clone()
                    .unwrap_or_else(|| Arc::from(""));
                out.push(self.dead_letter_of(ev, topic, &why));
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Maps `events` and enqueues them; returns positions whose deliveries
    /// completed meanwhile (in order), ready to acknowledge.
    async fn publish(
        &mut self,
        events: Vec<ChangeEvent>,
        position: Option<P>,
    ) -> Result<Vec<P>, PipelineError> {
        let events = match &self.exactly_once {
            Some(eo) => {
                let before = events.len();
                let kept: Vec<ChangeEvent> = events
                    .into_iter()
                    .filter(|e| !eo.committed_before(e))
                    .collect();
                let skipped = before - kept.len();
                if skipped > 0 {
                    tracing::info!(
                        skipped,
                        "exactly once: skipped changes that an earlier run committed"
                    );
                }
                self.stats.skipped_committed += skipped as u64;
                kept
            }
            None => events,
        };
        self.stats.events_read += events.len() as u64;
        let mut out: Vec<DomainEvent> = Vec::with_capacity(events.len());
        let mut commit_times = Vec::new();
        // (table, read, published), few tables per batch.
        let mut tables: Vec<(Arc<TableInfo>, u64, u64)> = Vec::new();
        for ev in &events {
            let n =
                if self.mapper.needs_refresh(&ev.table) && !self.adopt_shape(ev, &mut out).await? {
                    1
                } else {
                    self.map_one(ev, &mut out)?
                };
            if let Some(t) = ev.meta.commit_time_micros {
                commit_times.extend(std::iter::repeat_n(t, n));
            }
            match tables
                .iter_mut()
                .find(|(t, _, _)| Arc::ptr_eq(t, &ev.table))
            {
                Some(entry) => {
                    entry.1 += 1;
                    entry.2 += n as u64;
                }
                None => tables.push((ev.table.clone(), 1, n as u64)),
            }
        }
        let mut per_table = Vec::with_capacity(tables.len());
        for (table, read, published) in tables {
            let name = table.qualified();
            metrics().inc(
                names::EVENTS_READ,
                &[("pipeline", &self.pipeline), ("table", &name)],
                read as f64,
            );
            per_table.push((name, published));
        }
        self.stats.events_published += out.len() as u64;
        if self.exactly_once.is_some() {
            let last = events
                .iter()
                .rev()
                .find(|e| e.op != Op::Snapshot)
                .map(|e| e.seq);
            let info = BatchInfo {
                position,
                handed_over: Instant::now(),
                per_table,
                commit_times,
            };
            return self.commit_atomic(out, last, info).await;
        }
        let mut done = Vec::new();
        if out.is_empty() && self.inflight.is_empty() {
            // Nothing to wait for: the position is delivered already.
            if let Some(p) = position {
                done.push(p);
            }
            return Ok(done);
        }
        let info = BatchInfo {
            position,
            handed_over: Instant::now(),
            per_table,
            commit_times,
        };
        self.inflight_oldest
            .push_back(info.commit_times.iter().copied().min());
        let delivery = self.sink.write(out).await?;
        self.inflight
            .push_back(Box::pin(delivery.map(move |r| r.map(|()| info))));
        while self.inflight.len() > self.max_in_flight {
            if let Some(res) = self.inflight.next().await {
                done.extend(self.delivered(res?));
            }
        }
        done.extend(self.completed()?);
        Ok(done)
    }

    /// Commits `out` and the progress it makes in one transaction; returns
    /// the batch's position, ready to acknowledge.
    async fn commit_atomic(
        &mut self,
        out: Vec<DomainEvent>,
        last: Option<SeqKey>,
        info: BatchInfo<P>,
    ) -> Result<Vec<P>, PipelineError> {
        let Some(eo) = self.exactly_once.as_mut() else {
            return Ok(Vec::new());
        };
        if out.is_empty() {
            // Nothing to publish: the position is delivered already.
            return Ok(info.position.into_iter().collect());
        }
        let position = info.position.as_ref().map(ToString::to_string);
        let mut record = None;
        if last.is_some() || position.is_some() {
            if let Some(seq) = last {
                eo.committed.last_commit = Some(seq.commit.to_string());
                eo.committed.last_ordinal = Some(seq.ordinal);
            }
            if let Some(p) = position {
                eo.committed.position = Some(p);
            }
            record = Some(ProgressRecord {
                topic: eo.topic.clone(),
                key: eo.key.clone(),
                value: serde_json::to_vec(&eo.committed).unwrap_or_default(),
            });
        }
        self.sink.write_atomic(out, record).await?;
        Ok(self.delivered(info).into_iter().collect())
    }

    /// Positions of deliveries that already finished, without waiting.
    fn completed(&mut self) -> Result<Vec<P>, PipelineError> {
        let mut done = Vec::new();
        while let Some(Some(res)) = self.inflight.next().now_or_never() {
            done.extend(self.delivered(res?));
        }
        Ok(done)
    }

    /// Waits for every delivery; returns their positions in order.
    async fn drain(&mut self) -> Result<Vec<P>, PipelineError> {
        let mut done = Vec::new();
        while let Some(res) = self.inflight.next().await {
            done.extend(self.delivered(res?));
        }
        Ok(done)
    }

    /// Records metrics of a confirmed batch; returns its position.
    fn delivered(&mut self, info: BatchInfo<P>) -> Option<P> {
        self.inflight_oldest.pop_front();
        let p = [("pipeline", self.pipeline.as_str())];
        metrics().observe_many(
            names::SINK_BATCH_SECONDS,
            &p,
            [info.handed_over.elapsed().as_secs_f64()],
        );
        for (table, n) in &info.per_table {
            metrics().inc(
                names::EVENTS_PUBLISHED,
                &[("pipeline", &self.pipeline), ("table", table)],
                *n as f64,
            );
        }
        if !info.commit_times.is_empty() {
            let now = chrono::Utc::now().timestamp_micros();
            for t in &info.commit_times {
                self.stats.latency.record_micros(now - t);
            }
            #[allow(clippy::cast_precision_loss)]
            metrics().observe_many(
                names::END_TO_END_LATENCY,
                &p,
                info.commit_times.iter().map(|t| (now - t) as f64 / 1e6),
            );
        }
        info.position
    }

    /// Seconds the oldest undelivered change has waited since its commit.
    fn lag_seconds(&self) -> f64 {
        let now = chrono::Utc::now().timestamp_micros();
        #[allow(clippy::cast_precision_loss)]
        self.inflight_oldest
            .iter()
            .flatten()
            .min()
            .map_or(0.0, |t| (now - t).max(0) as f64 / 1e6)
    }
}

/// A Postgres pipeline, prepared and checked.
struct PgPrepared {
    source: PgSource,
    mapper: Mapper,
    tables: Vec<Arc<TableInfo>>,
    registry: RegistryClient,
}

fn load_mappings(cfg: &LoadedConfig) -> Result<Vec<LoadedMapping>, PipelineError> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for p in &cfg.config.mappings {
        match LoadedMapping::load(&cfg.resolve(p)) {
            Ok(m) => out.push(m),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(PipelineError::Many(problems))
    }
}

fn settings(cfg: &LoadedConfig, pg: &PostgresConfig) -> PgSettings {
    PgSettings {
        url: pg.url.clone(),
        slot: cfg.slot(),
        publication: cfg.publication(),
        snapshot: pg.snapshot,
        manage_publication: pg.manage_publication,
        on_slot_lost: pg.on_slot_lost,
        insert_publication: cfg.insert_publication(),
        set_replica_identity: pg.set_replica_identity,
    }
}

/// Compiles the mappings against the tables, then checks (and unless
/// `dry_run` registers) their schemas with the registry.
async fn map_and_register(
    cfg: &LoadedConfig,
    mappings: &[LoadedMapping],
    tables: &HashMap<String, Arc<TableInfo>>,
    dry_run: bool,
    report: &mut Vec<String>,
) -> Result<(Mapper, RegistryClient), PipelineError> {
    let mapper = Mapper::new(mappings, tables)?;
    register(cfg, mapper, dry_run, report).await
}

/// Checks (and unless `dry_run` registers) the mapper's schemas.
async fn register(
    cfg: &LoadedConfig,
    mut mapper: Mapper,
    dry_run: bool,
    report: &mut Vec<String>,
) -> Result<(Mapper, RegistryClient), PipelineError> {
    report.push(format!("mappings: ok for {}", mapper.tables().join(", ")));
    let reg = &cfg.config.schema_registry;
    let registry = RegistryClient::from_config(reg).map_err(|source| MappingError::Registry {
        file: cfg.path.clone(),
        source,
    })?;
    for (subject, id) in mapper.register(&registry, dry_run).await? {
        report.push(match id {
            Some(id) => format!("schema registry: subject {subject} -> schema id {id}"),
            None => format!(
                "schema registry: subject {subject} is compatible (would register a new version)"
            ),
        });
    }
    Ok((mapper, registry))
}

async fn prepare_pg(
    cfg: &LoadedConfig,
    pg: &PostgresConfig,
    mappings: &[LoadedMapping],
    dry_run: bool,
    report: &mut Vec<String>,
) -> Result<PgPrepared, PipelineError> {
    let store = FileCheckpointStore::new(&cfg.state_dir(), &cfg.config.name);
    let mut source = PgSource::connect(settings(cfg, pg), store).await?;
    report.push(format!(
        "postgres: connected to database {} over {} (wal_level=logical, role may replicate)",
        source.database(),
        source.transport()
    ));
    let parts: Vec<(String, String)> = mappings.iter().map(LoadedMapping::table_parts).collect();
    let relations = source.load_relations(&parts).await?;
    let mapped: HashSet<String> = mappings
        .iter()
        .map(LoadedMapping::qualified_table)
        .collect();
    // Every problem of every mapping, so that one run lists them all.
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    let mut usable = Vec::new();
    for m in mappings {
        let q = m.qualified_table();
        let Some(rel) = relations.get(&q) else {
            problems.push(
                m.err(
                    "table",
                    format!("table {q} does not exist in the database (or the user cannot see it)"),
                )
                .to_string(),
            );
            continue;
        };
        match safety::judge(
            m,
            rel,
            &mapped,
            pg.set_replica_identity,
            &cfg.insert_publication(),
        ) {
            Ok(plan) => {
                // Generated columns are never streamed (before 18): a
                // mapping that drops one asks for what happens anyway.
                let mut m = m.clone();
                m.spec.drop.retain(|c| !plan.generated.contains(c));
                plans.push(plan);
                usable.push(m);
            }
            Err(p) => problems.extend(p),
        }
    }
    let usable_parts: Vec<(String, String)> =
        usable.iter().map(LoadedMapping::table_parts).collect();
    let tables = source.load_tables(&usable_parts).await?;
    let compiled = match Mapper::new(&usable, &tables) {
        Ok(mapper) => Some(mapper),
        Err(MappingError::Many(list)) => {
            problems.extend(list.iter().map(ToString::to_string));
            None
        }
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let Some(mapper) = compiled.filter(|_| problems.is_empty()) else {
        return Err(PipelineError::Many(problems));
    };
    let (mapper, registry) = register(cfg, mapper, dry_run, report).await?;
    for plan in &plans {
        report.push(plan.verdict.clone());
    }
    let changes = source.ensure_publication(plans, dry_run).await?;
    for c in changes {
        report.push(format!(
            "publication: {}{c}",
            if dry_run { "would run " } else { "ran " }
        ));
    }
    let ordered: Vec<Arc<TableInfo>> = mapper
        .tables()
        .iter()
        .filter_map(|t| tables.get(t).cloned())
        .collect();
    Ok(PgPrepared {
        source,
        mapper,
        tables: ordered,
        registry,
    })
}

async fn prepare_mongo(
    cfg: &LoadedConfig,
    mongo: &MongoConfig,
    mappings: &[LoadedMapping],
    dry_run: bool,
    report: &mut Vec<String>,
) -> Result<(MongoSource, Mapper, RegistryClient), PipelineError> {
    let tables = crate::sources::mongo_oplog::declared_collections(mappings)?;
    let (mapper, registry) = map_and_register(cfg, mappings, &tables, dry_run, report).await?;
    let collections: Vec<Arc<TableInfo>> = mapper
        .tables()
        .iter()
        .filter_map(|t| tables.get(t).cloned())
        .collect();
    let source =
        MongoSource::connect(mongo, &cfg.config.name, &cfg.state_dir(), collections).await?;
    report.push(format!("mongodb: {}", source.describe()));
    Ok((source, mapper, registry))
}

/// Validates config, mappings, connectivity and schema compatibility
/// without writing anything. Returns what was checked.
pub async fn check(cfg: &LoadedConfig) -> Result<Vec<String>, PipelineError> {
    let mut report = Vec::new();
    let mappings = load_mappings(cfg)?;
    report.push(format!(
        "config {}: ok ({} mapping files)",
        cfg.path.display(),
        mappings.len()
    ));
    let topics = match cfg.source() {
        SourceChoice::Postgres(pg) => prepare_pg(cfg, pg, &mappings, true, &mut report)
            .await?
            .mapper
            .topics(),
        SourceChoice::Mongo(m) => {
            let (mut source, mapper, _) =
                prepare_mongo(cfg, m, &mappings, true, &mut report).await?;
            source.shutdown().await?;
            mapper.topics()
        }
    };
    let sink = KafkaSink::new(&cfg.config.kafka.brokers, &cfg.config.kafka.properties)?;
    sink.check_connection(Duration::from_secs(10)).await?;
    report.push(format!(
        "kafka: brokers {} reachable; topics {}",
        cfg.config.kafka.brokers,
        topics.join(", ")
    ));
    let kafka = &cfg.config.kafka;
    let limits = event_limits(
        &kafka.brokers,
        &kafka.properties,
        &topics,
        kafka.max_event_bytes,
    )
    .await;
    report.push(format!(
        "kafka: events larger than {} are {}",
        limits.describe(),
        if cfg.config.on_bad_row == BadRowPolicy::DeadLetter {
            "sent to the dead-letter topic with their table, key and size"
        } else {
            "refused: the pipeline stops on them (on_bad_row: stop)"
        }
    ));
    Ok(report)
}

/// Connects the Kafka sink and creates the topics events go to.
async fn open_sink(
    cfg: &LoadedConfig,
    mapper: &Mapper,
) -> Result<(KafkaSink, EventLimits), PipelineError> {
    let kafka = &cfg.config.kafka;
    let sink = KafkaSink::new(&kafka.brokers, &kafka.properties)?;
    sink.check_connection(Duration::from_secs(10)).await?;
    if kafka.exactly_once {
        ensure_progress_topic(
            &kafka.brokers,
            &kafka.properties,
            &cfg.progress_topic(),
            kafka.replication_factor,
        )
        .await?;
    }
    let mut topics = mapper.topics();
    if cfg.config.on_bad_row == BadRowPolicy::DeadLetter
        || cfg.config.on_schema_change == SchemaChangePolicy::DeadLetter
    {
        topics.push(cfg.dead_letter_topic());
    }
    ensure_topics(
        &kafka.brokers,
        &kafka.properties,
        &topics,
        kafka.partitions,
        kafka.replication_factor,
    )
    .await?;
    let limits = event_limits(
        &kafka.brokers,
        &kafka.properties,
        &mapper.topics(),
        kafka.max_event_bytes,
    )
    .await;
    tracing::info!(limits = %limits.describe(), "events larger than this are not handed to Kafka (dead letter, or stop with on_bad_row: stop)");
    Ok((sink, limits))
}

/// With `kafka.exactly_once`, the transactional producer
/// (`transactional.id` `unilog-<name>`) in place of `sink`.
async fn transactional_if_asked(
    cfg: &LoadedConfig,
    sink: KafkaSink,
) -> Result<KafkaSink, PipelineError> {
    let kafka = &cfg.config.kafka;
    if !kafka.exactly_once {
        return Ok(sink);
    }
    let id = format!("unilog-{}", cfg.config.name);
    Ok(KafkaSink::transactional(&kafka.brokers, &kafka.properties, &id).await?)
}

fn publisher<'a, K: Sink, P>(
    cfg: &LoadedConfig,
    sink: &'a K,
    registry: &'a RegistryClient,
    mapper: &'a mut Mapper,
    limits: EventLimits,
) -> Publisher<'a, K, P> {
    Publisher {
        pipeline: cfg.config.name.clone(),
        sink,
        registry,
        mapper,
        inflight: FuturesOrdered::new(),
        inflight_oldest: VecDeque::new(),
        max_in_flight: cfg.config.batch.max_in_flight,
        dead_letter: (cfg.config.on_bad_row == BadRowPolicy::DeadLetter)
            .then(|| Arc::from(cfg.dead_letter_topic().as_str())),
        schema_dead_letter: (cfg.config.on_schema_change == SchemaChangePolicy::DeadLetter)
            .then(|| Arc::from(cfg.dead_letter_topic().as_str())),
        quarantined: HashMap::new(),
        exactly_once: cfg.config.kafka.exactly_once.then(|| ExactlyOnce {
            topic: cfg.progress_topic(),
            key: cfg.config.name.clone().into_bytes(),
            committed: Progress::default(),
        }),
        limits,
        stats: RunStats::default(),
    }
}

/// Runs the pipeline until `stop` is set, then drains and acknowledges.
pub async fn run(cfg: &LoadedConfig, stop: Arc<AtomicBool>) -> Result<RunStats, PipelineError> {
    // One process per pipeline; held until this function returns.
    let lock = lock(cfg)?;
    run_locked(cfg, stop, &lock).await
}

/// The process lock of `cfg`'s pipeline (see [`crate::checkpoint::ProcessLock`]).
pub fn lock(cfg: &LoadedConfig) -> Result<crate::checkpoint::ProcessLock, PipelineError> {
    Ok(crate::checkpoint::ProcessLock::acquire(
        &cfg.state_dir(),
        &cfg.config.name,
    )?)
}

/// [`run`], for a caller that holds the pipeline's lock (across restarts).
pub async fn run_locked(
    cfg: &LoadedConfig,
    stop: Arc<AtomicBool>,
    _lock: &crate::checkpoint::ProcessLock,
) -> Result<RunStats, PipelineError> {
    let name = cfg.config.name.clone();
    health().set_phase(&name, Phase::Starting);
    let mut report = Vec::new();
    let mappings = load_mappings(cfg)?;
    report.push(format!(
        "config {}: ok ({} mapping files)",
        cfg.path.display(),
        mappings.len()
    ));
    match cfg.source() {
        SourceChoice::Postgres(pg) => run_pg(cfg, pg, &mappings, report, &stop).await,
        SourceChoice::Mongo(m) => {
            let (mut source, mut mapper, registry) =
                prepare_mongo(cfg, m, &mappings, false, &mut report).await?;
            for line in &report {
                tracing::info!("{line}");
            }
            let (sink, limits) = open_sink(cfg, &mapper).await?;
            // Exactly once: the transactional producer also fences an
            // older process of this pipeline that is still running.
            let sink = transactional_if_asked(cfg, sink).await?;
            let mut publisher = publisher(cfg, &sink, &registry, &mut mapper, limits);
            if let Some(eo) = publisher.exactly_once.as_mut() {
                // The state file may lag the progress topic by the batches
                // in flight at a crash: changes up to the committed one
                // are read again and skipped.
                eo.committed =
                    committed_progress(cfg, publisher.sink, &eo.topic, source.incarnation()?)
                        .await?;
            }
            health().set_phase(&name, Phase::Snapshot);
            let monitor = tokio::spawn(source.headroom_monitor());
            let r = stream(&mut source, &mut publisher, &stop, cfg).await;
            monitor.abort();
            r?;
            Ok(publisher.stats)
        }
    }
}

async fn run_pg(
    cfg: &LoadedConfig,
    pg: &PostgresConfig,
    mappings: &[LoadedMapping],
    mut report: Vec<String>,
    stop: &AtomicBool,
) -> Result<RunStats, PipelineError> {
    let name = cfg.config.name.clone();
    let PgPrepared {
        mut source,
        mut mapper,
        tables,
        registry,
    } = prepare_pg(cfg, pg, mappings, false, &mut report).await?;
    for line in &report {
        tracing::info!("{line}");
    }
    let (sink, limits) = open_sink(cfg, &mapper).await?;
    let batch = &cfg.config.batch;
    let opened = source.open(&tables).await?;
    // Exactly once: the transactional producer fences any other producer
    // of this pipeline, so it starts only once this process got the slot
    // (a second process stops at "slot in use" without fencing the first).
    let sink = transactional_if_asked(cfg, sink).await?;
    let mut publisher = publisher(cfg, &sink, &registry, &mut mapper, limits);

    if let Some(mut snap) = opened {
        health().set_phase(&name, Phase::Snapshot);
        while let Some(events) = snap.next_batch(batch.max_events).await? {
            health().beat();
            if stop.load(Ordering::Relaxed) {
                tracing::warn!(
                    "stopped during the initial snapshot; it starts over at the next run"
                );
                publisher.drain().await?;
                health().set_phase(&name, Phase::Stopped);
                return Ok(publisher.stats);
            }
            #[allow(clippy::cast_precision_loss)]
            metrics().inc(
                names::SNAPSHOT_ROWS,
                &[("pipeline", name.as_str())],
                events.len() as f64,
            );
            publisher.publish(events, None).await?;
        }
        publisher.drain().await?;
        publisher.stats.snapshot_rows = snap.rows();
        source.snapshot_delivered()?;
        tracing::info!(rows = snap.rows(), "initial snapshot delivered");
    }
    if let Some(eo) = publisher.exactly_once.as_mut() {
        eo.committed =
            committed_progress(cfg, publisher.sink, &eo.topic, source.slot_incarnation()).await?;
    }
    source.start_streaming().await?;
    health().set_phase(&name, Phase::Streaming);
    let monitor = tokio::spawn(slot_monitor(pg.url.clone(), cfg.slot(), name.clone()));
    let r = stream(&mut source, &mut publisher, stop, cfg).await;
    monitor.abort();
    r?;
    Ok(publisher.stats)
}

/// Acknowledges every delivered position, in order (a source may need each:
/// MongoDB's copy positions say which collection is done). Returns whether
/// there was any.
fn ack_all<S: Source>(
    source: &mut S,
    stats: &mut RunStats,
    acks: &[S::Position],
) -> Result<bool, S::Error> {
    for p in acks {
        source.ack(p.clone())?;
    }
    if let Some(last) = acks.last() {
        stats.last_acked = Some(last.to_string());
    }
    Ok(!acks.is_empty())
}

/// Same columns with the same types.
fn same_shape(a: &TableInfo, b: &TableInfo) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.ty == y.ty)
}

/// The streaming loop shared by every source: read a batch, publish it,
/// acknowledge what Kafka confirmed; on stop (or error), drain and
/// acknowledge what was delivered, then close the source.
async fn stream<S, K>(
    source: &mut S,
    publisher: &mut Publisher<'_, K, S::Position>,
    stop: &AtomicBool,
    cfg: &LoadedConfig,
) -> Result<(), PipelineError>
where
    S: Source,
    K: Sink,
    PipelineError: From<S::Error>,
{
    let name = cfg.config.name.as_str();
    let batch = &cfg.config.batch;
    let max_wait = Duration::from_millis(batch.max_wait_ms);
    let mut last_log = Instant::now();
    let mut logged_events = 0u64;
    let labels = [("pipeline", name)];
    let result: Result<(), PipelineError> = async {
        while !stop.load(Ordering::Relaxed) {
            let b = source.next_batch(batch.max_events, max_wait).await?;
            health().beat();
            let acks = if b.events.is_empty() && b.position.is_none() {
                publisher.completed()?
            } else {
                publisher.publish(b.events, b.position).await?
            };
            if ack_all(source, &mut publisher.stats, &acks)? {
                health().progressed();
                #[allow(clippy::cast_precision_loss)]
                metrics().set(
                    names::LAST_PROGRESS,
                    &labels,
                    chrono::Utc::now().timestamp_millis() as f64 / 1000.0,
                );
            }
            health().pending(!publisher.inflight.is_empty());
            #[allow(clippy::cast_precision_loss)]
            if let Some(lag) = source.lag_bytes() {
                metrics().set(names::SOURCE_LAG_BYTES, &labels, lag as f64);
            }
            metrics().set(names::SOURCE_LAG_SECONDS, &labels, publisher.lag_seconds());
            if last_log.elapsed() >= Duration::from_secs(10) {
                let n = publisher.stats.events_published - logged_events;
                #[allow(clippy::cast_precision_loss)]
                let rate = n as f64 / last_log.elapsed().as_secs_f64();
                tracing::info!(
                    published = publisher.stats.events_published,
                    events_per_sec = rate as u64,
                    lag_bytes = source.lag_bytes(),
                    "progress"
                );
                logged_events = publisher.stats.events_published;
                last_log = Instant::now();
            }
        }
        Ok(())
    }
    .await;
    // Whatever happened, acknowledge what was delivered.
    let drained = publisher.drain().await;
    if let Ok(acks) = &drained {
        ack_all(source, &mut publisher.stats, acks)?;
    }
    source.shutdown().await?;
    result?;
    drained?;
    health().set_phase(name, Phase::Stopped);
    let lat = &publisher.stats.latency;
    tracing::info!(
        published = publisher.stats.events_published,
        latency_samples = lat.count(),
        latency_p50_ms = lat.quantile_ms(0.5).unwrap_or_default(),
        latency_p99_ms = lat.quantile_ms(0.99).unwrap_or_default(),
        skipped_committed = publisher.stats.skipped_committed,
        "stopped cleanly"
    );
    Ok(())
}

/// What the progress topic says this life of the slot committed last.
///
/// It first commits a start marker (key `<name>.start`, a fresh value) to
/// the progress topic, then reads up to that marker: every transaction of
/// an earlier process is resolved before it, so the last progress record
/// read is the last one committed.
async fn committed_progress<K: Sink>(
    cfg: &LoadedConfig,
    sink: &K,
    topic: &str,
    incarnation: String,
) -> Result<Progress, PipelineError> {
    let kafka = &cfg.config.kafka;
    let name = &cfg.config.name;
    let fence_key = format!("{name}.start").into_bytes();
    let fence_value = format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    )
    .into_bytes();
    sink.write_atomic(
        Vec::new(),
        Some(ProgressRecord {
            topic: topic.to_string(),
            key: fence_key.clone(),
            value: fence_value.clone(),
        }),
    )
    .await?;
    let last = read_last(
        &kafka.brokers,
        &kafka.properties,
        topic,
        name.as_bytes(),
        (fence_key, fence_value),
        Duration::from_secs(60),
    )
    .await?;
    let fresh = Progress {
        slot: incarnation.clone(),
        ..Progress::default()
    };
    let Some(bytes) = last else {
        return Ok(fresh);
    };
    match serde_json::from_slice::<Progress>(&bytes) {
        Ok(p) if p.slot == incarnation => {
            tracing::info!(
                topic,
                position = p.position.as_deref().unwrap_or("-"),
                last_commit = p.last_commit.as_deref().unwrap_or("-"),
                last_ordinal = p.last_ordinal.unwrap_or_default(),
                "exactly once: changes up to the committed position are skipped"
            );
            Ok(p)
        }
        Ok(p) => {
            tracing::info!(topic, recorded = %p.slot, current = %incarnation, "exactly once: the progress topic records another life of the source (a new slot, or a new MongoDB state file); starting from the source's own position");
            Ok(fresh)
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "exactly once: unreadable progress record; starting from the source's own position (changes may repeat once)");
            Ok(fresh)
        }
    }
}

/// Every 10 s, the WAL the server keeps for the slot (a gauge).
async fn slot_monitor(url: String, slot: String, pipeline: String) {
    let client = match connect_plain(&url).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the slot's retained WAL");
            return;
        }
    };
    loop {
        match client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(Some(row)) => {
                if let Some(bytes) = row.get::<_, Option<f64>>(0) {
                    metrics().set(
                        names::SLOT_RETAINED_WAL_BYTES,
                        &[("pipeline", &pipeline), ("slot", &slot)],
                        bytes,
                    );
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the slot's retained WAL"),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
