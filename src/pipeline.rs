//! One pipeline, end to end: source -> mapper -> sink, and acknowledgements
//! flowing back only after delivery.
//!
//! Batches are pipelined: batch N+1 is read and handed to Kafka while batch
//! N is still waiting for confirmation, up to `batch.max_in_flight`
//! batches. Deliveries complete in order, and a batch's source position is
//! acknowledged only after it and every batch before it are confirmed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};

use crate::checkpoint::FileCheckpointStore;
use crate::config::{ConfigError, LoadedConfig};
use crate::event::{ChangeEvent, Position, TableInfo};
use crate::mapping::registry::RegistryClient;
use crate::mapping::spec::LoadedMapping;
use crate::mapping::{DomainEvent, Mapper, MappingError};
use crate::sinks::kafka::{ensure_topics, KafkaSink};
use crate::sinks::{Sink, SinkError};
use crate::sources::pg_logical::{PgError, PgSettings, PgSource};
use crate::sources::Source;
use crate::telemetry::LatencyHistogram;

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
    Sink(#[from] SinkError),
    #[error("{} problems found:\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<String>),
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
    pub last_acked: Option<Position>,
    /// Commit-to-Kafka-acknowledgement latency of streamed changes.
    pub latency: LatencyHistogram,
}

/// A batch's delivery: resolves to its position and its events' commit times.
type Pending =
    Pin<Box<dyn Future<Output = Result<(Option<Position>, Vec<i64>), SinkError>> + Send>>;

/// Maps and hands batches to the sink, keeping deliveries in order.
struct Publisher<'a, K: Sink> {
    sink: &'a K,
    mapper: &'a mut Mapper,
    inflight: FuturesOrdered<Pending>,
    max_in_flight: usize,
    stats: RunStats,
}

impl<K: Sink> Publisher<'_, K> {
    /// Maps `events` and enqueues them; returns positions whose deliveries
    /// completed meanwhile (in order), ready to acknowledge.
    async fn publish(
        &mut self,
        events: Vec<ChangeEvent>,
        position: Option<Position>,
    ) -> Result<Vec<Position>, PipelineError> {
        self.stats.events_read += events.len() as u64;
        let mut out: Vec<DomainEvent> = Vec::with_capacity(events.len());
        let mut commit_times = Vec::new();
        for ev in &events {
            let n = self.mapper.map_into(ev, &mut out)?;
            if let Some(t) = ev.meta.commit_time_micros {
                commit_times.extend(std::iter::repeat_n(t, n));
            }
        }
        self.stats.events_published += out.len() as u64;
        let mut done = Vec::new();
        if out.is_empty() && self.inflight.is_empty() {
            // Nothing to wait for: the position is delivered already.
            if let Some(p) = position {
                done.push(p);
            }
            return Ok(done);
        }
        let delivery = self.sink.write(out).await?;
        self.inflight.push_back(Box::pin(
            delivery.map(move |r| r.map(|()| (position, commit_times))),
        ));
        while self.inflight.len() > self.max_in_flight {
            if let Some(res) = self.inflight.next().await {
                done.extend(self.delivered(res?));
            }
        }
        done.extend(self.completed()?);
        Ok(done)
    }

    /// Positions of deliveries that already finished, without waiting.
    fn completed(&mut self) -> Result<Vec<Position>, PipelineError> {
        let mut done = Vec::new();
        while let Some(Some(res)) = self.inflight.next().now_or_never() {
            done.extend(self.delivered(res?));
        }
        Ok(done)
    }

    /// Waits for every delivery; returns their positions in order.
    async fn drain(&mut self) -> Result<Vec<Position>, PipelineError> {
        let mut done = Vec::new();
        while let Some(res) = self.inflight.next().await {
            done.extend(self.delivered(res?));
        }
        Ok(done)
    }

    /// Records the latency of a confirmed batch; returns its position.
    fn delivered(
        &mut self,
        (position, commit_times): (Option<Position>, Vec<i64>),
    ) -> Option<Position> {
        if !commit_times.is_empty() {
            let now = chrono::Utc::now().timestamp_micros();
            for t in commit_times {
                self.stats.latency.record_micros(now - t);
            }
        }
        position
    }
}

/// Everything a pipeline needs, prepared and checked.
struct Prepared {
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

fn settings(cfg: &LoadedConfig) -> PgSettings {
    let pg = cfg.postgres();
    PgSettings {
        url: pg.url.clone(),
        slot: cfg.slot(),
        publication: cfg.publication(),
        snapshot: pg.snapshot,
        manage_publication: pg.manage_publication,
    }
}

async fn prepare(
    cfg: &LoadedConfig,
    dry_run: bool,
    report: &mut Vec<String>,
) -> Result<Prepared, PipelineError> {
    let mappings = load_mappings(cfg)?;
    report.push(format!(
        "config {}: ok ({} mapping files)",
        cfg.path.display(),
        mappings.len()
    ));
    let store = FileCheckpointStore::new(&cfg.state_dir(), &cfg.config.name);
    let mut source = PgSource::connect(settings(cfg), store).await?;
    report.push(format!(
        "postgres: connected to database {} (wal_level=logical, role may replicate)",
        source.database()
    ));
    let names: Vec<String> = mappings
        .iter()
        .map(LoadedMapping::qualified_table)
        .collect();
    let tables = source.load_tables(&names).await?;
    let mut mapper = Mapper::new(&mappings, &tables)?;
    report.push(format!(
        "mappings: ok for tables {}",
        mapper.tables().join(", ")
    ));
    let reg = &cfg.config.schema_registry;
    let registry = RegistryClient::new(&reg.url, reg.username.clone(), reg.password.clone())
        .map_err(|source| MappingError::Registry {
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
    let changes = source.ensure_publication(&mapper.tables(), dry_run).await?;
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
    Ok(Prepared {
        source,
        mapper,
        tables: ordered,
        registry,
    })
}

/// Validates config, mappings, connectivity and schema compatibility
/// without writing anything. Returns what was checked.
pub async fn check(cfg: &LoadedConfig) -> Result<Vec<String>, PipelineError> {
    let mut report = Vec::new();
    let prepared = prepare(cfg, true, &mut report).await?;
    let sink = KafkaSink::new(&cfg.config.kafka.brokers, &cfg.config.kafka.properties)?;
    sink.check_connection(Duration::from_secs(10)).await?;
    report.push(format!(
        "kafka: brokers {} reachable; topics {}",
        cfg.config.kafka.brokers,
        prepared.mapper.topics().join(", ")
    ));
    drop(prepared.registry);
    Ok(report)
}

/// Runs the pipeline until `stop` is set, then drains and acknowledges.
pub async fn run(cfg: &LoadedConfig, stop: Arc<AtomicBool>) -> Result<RunStats, PipelineError> {
    let mut report = Vec::new();
    let Prepared {
        mut source,
        mut mapper,
        tables,
        ..
    } = prepare(cfg, false, &mut report).await?;
    for line in &report {
        tracing::info!("{line}");
    }
    let kafka = &cfg.config.kafka;
    let sink = KafkaSink::new(&kafka.brokers, &kafka.properties)?;
    sink.check_connection(Duration::from_secs(10)).await?;
    ensure_topics(
        &kafka.brokers,
        &kafka.properties,
        &mapper.topics(),
        kafka.partitions,
        kafka.replication_factor,
    )
    .await?;

    let batch = cfg.config.batch.clone();
    let mut publisher = Publisher {
        sink: &sink,
        mapper: &mut mapper,
        inflight: FuturesOrdered::new(),
        max_in_flight: batch.max_in_flight,
        stats: RunStats::default(),
    };

    if let Some(mut snap) = source.open(&tables).await? {
        while let Some(events) = snap.next_batch(batch.max_events).await? {
            if stop.load(Ordering::Relaxed) {
                tracing::warn!(
                    "stopped during the initial snapshot; it starts over at the next run"
                );
                publisher.drain().await?;
                return Ok(publisher.stats);
            }
            publisher.publish(events, None).await?;
        }
        publisher.drain().await?;
        publisher.stats.snapshot_rows = snap.rows();
        source.snapshot_delivered()?;
        tracing::info!(rows = snap.rows(), "initial snapshot delivered");
    }
    source.start_streaming().await?;

    let max_wait = Duration::from_millis(batch.max_wait_ms);
    let mut last_log = Instant::now();
    let mut logged_events = 0u64;
    let result: Result<(), PipelineError> = async {
        while !stop.load(Ordering::Relaxed) {
            let b = source.next_batch(batch.max_events, max_wait).await?;
            let acks = if b.events.is_empty() && b.position.is_none() {
                publisher.completed()?
            } else {
                publisher.publish(b.events, b.position).await?
            };
            if let Some(last) = acks.last() {
                source.ack(*last)?;
                publisher.stats.last_acked = Some(*last);
            }
            if last_log.elapsed() >= Duration::from_secs(10) {
                let n = publisher.stats.events_published - logged_events;
                #[allow(clippy::cast_precision_loss)]
                let rate = n as f64 / last_log.elapsed().as_secs_f64();
                tracing::info!(
                    published = publisher.stats.events_published,
                    events_per_sec = rate as u64,
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
        if let Some(last) = acks.last() {
            source.ack(*last)?;
            publisher.stats.last_acked = Some(*last);
        }
    }
    source.shutdown().await?;
    result?;
    drained?;
    tracing::info!(
        published = publisher.stats.events_published,
        "stopped cleanly"
    );
    Ok(publisher.stats)
}
