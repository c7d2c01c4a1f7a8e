//! Logging setup: human-readable on a terminal, JSON lines on request.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info` for unilog, `warn` for libraries).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,unilog=info,schema_registry_standin=info,librdkafka=off")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}

/// A latency histogram with buckets 5% apart, from 1 µs to hours.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
}

const RATIO_LN: f64 = 0.048_790_164_169_432; // ln(1.05)
const BUCKETS: usize = 512;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl LatencyHistogram {
    /// Records one latency in microseconds (negative clamps to 0).
    pub fn record_micros(&mut self, micros: i64) {
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let idx = if micros <= 1 {
            0
        } else {
            ((micros as f64).ln() / RATIO_LN).ceil() as usize
        };
        self.counts[idx.min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1) in milliseconds, within 5%; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                #[allow(
                    clippy::cast_precision_loss,
                    clippy::cast_possible_truncation,
                    clippy::cast_possible_wrap
                )]
                return Some((RATIO_LN * i as f64).exp() / 1000.0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_five_percent() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=100 {
            h.record_micros(ms * 1000);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((47.5..=52.5).contains(&p50), "{p50}");
        assert!((94.0..=104.0).contains(&p99), "{p99}");
        assert_eq!(LatencyHistogram::default().quantile_ms(0.5), None);
    }
}

/// Metric names, in one place (Prometheus style).
pub mod names {
    /// Changes read from the source, by pipeline and table.
    pub const EVENTS_READ: &str = "unilog_events_read_total";
    /// Changes sent to the dead-letter topic, by pipeline and table.
    pub const EVENTS_DEAD_LETTERED: &str = "unilog_events_dead_lettered_total";
    /// Records confirmed by Kafka, by pipeline and table.
    pub const EVENTS_PUBLISHED: &str = "unilog_events_published_total";
    /// Rows copied by the initial snapshot, by pipeline and table.
    pub const SNAPSHOT_ROWS: &str = "unilog_snapshot_rows_total";
    /// WAL bytes between the server's position and the last acknowledged one.
    pub const SOURCE_LAG_BYTES: &str = "unilog_source_lag_bytes";
    /// Age of the oldest change not yet acknowledged (0 when caught up).
    pub const SOURCE_LAG_SECONDS: &str = "unilog_source_lag_seconds";
    /// Commit in the database to acknowledgement by Kafka.
    pub const END_TO_END_LATENCY: &str = "unilog_end_to_end_latency_seconds";
    /// Hand-over of a batch to Kafka until every record is confirmed.
    pub const SINK_BATCH_SECONDS: &str = "unilog_sink_batch_seconds";
    /// Records Kafka did not accept (the pipeline stops and restarts from its position).
    pub const KAFKA_PRODUCE_ERRORS: &str = "unilog_kafka_produce_errors_total";
    /// Produce requests librdkafka retried.
    pub const KAFKA_PRODUCE_RETRIES: &str = "unilog_kafka_produce_retries_total";
    /// WAL the server keeps for this pipeline's slot (restart_lsn to current).
    pub const SLOT_RETAINED_WAL_BYTES: &str = "unilog_slot_retained_wal_bytes";
    /// MongoDB: seconds of oplog behind the delivered position (oldest
    /// entry to position): how long the pipeline may stop before it loses
    /// its place.
    pub const MONGO_OPLOG_HEADROOM_SECONDS: &str = "unilog_mongo_oplog_headroom_seconds";
    /// Unix time of the last acknowledgement or idle check.
    pub const LAST_PROGRESS: &str = "unilog_last_progress_timestamp_seconds";
    /// 1 for the pipeline's current phase (starting, snapshot, streaming, stopped, failed).
    pub const PIPELINE_PHASE: &str = "unilog_pipeline_phase";
    /// Documents the indexer wrote, by result (indexed, deleted, stale, dead_lettered).
    pub const INDEX_DOCUMENTS: &str = "unilog_index_documents_total";
    /// `_bulk` requests (or parts of them) the indexer sent again after 429/5xx.
    pub const INDEX_RETRIES: &str = "unilog_index_retries_total";
    /// One batch of the indexer, from the first `_bulk` to the last confirmation.
    pub const INDEX_BULK_SECONDS: &str = "unilog_index_bulk_seconds";
    /// Records the joiner read, by side (left, right, rekeyed).
    pub const JOIN_RECORDS_READ: &str = "unilog_join_records_read_total";
    /// Joined records the joiner committed to its output topic.
    pub const JOIN_RECORDS_OUT: &str = "unilog_join_records_out_total";
    /// State entries the joiner restored from its changelog.
    pub const JOIN_STATE_RESTORED: &str = "unilog_join_state_restored_total";
}

/// Histogram buckets in seconds.
const SECONDS_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default, Clone)]
struct PromHistogram {
    buckets: [u64; SECONDS_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// A small Prometheus registry: counters, gauges and histograms with labels.
#[derive(Default)]
pub struct Metrics {
    counters: std::sync::Mutex<std::collections::BTreeMap<(&'static str, Labels), f64>>,
    gauges: std::sync::Mutex<std::collections::BTreeMap<(&'static str, Labels), f64>>,
    histograms: std::sync::Mutex<std::collections::BTreeMap<(&'static str, Labels), PromHistogram>>,
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);
    &M
}

impl Metrics {
    /// Adds `by` to a counter.
    pub fn inc(&self, name: &'static str, l: &[(&'static str, &str)], by: f64) {
        *lock(&self.counters).entry((name, labels(l))).or_default() += by;
    }

    /// Sets a counter to a cumulative value read elsewhere (never lowers it).
    pub fn set_counter(&self, name: &'static str, l: &[(&'static str, &str)], value: f64) {
        let mut c = lock(&self.counters);
        let e = c.entry((name, labels(l))).or_default();
        *e = e.max(value);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, l: &[(&'static str, &str)], value: f64) {
        lock(&self.gauges).insert((name, labels(l)), value);
    }

    /// Records observations (seconds) in a histogram.
    pub fn observe_many(
        &self,
        name: &'static str,
        l: &[(&'static str, &str)],
        values: impl IntoIterator<Item = f64>,
    ) {
        let mut h = lock(&self.histograms);
        let hist = h.entry((name, labels(l))).or_default();
        for v in values {
            hist.count += 1;
            hist.sum += v;
            if let Some(i) = SECONDS_BUCKETS.iter().position(|b| v <= *b) {
                hist.buckets[i] += 1;
            }
        }
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        fn label_text(l: &Labels, extra: Option<(&str, String)>) -> String {
            let mut parts: Vec<String> = l
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}=\"{}\"",
                        v.replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n")
                    )
                })
                .collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        }
        let mut out = String::new();
        let mut last = "";
        for ((name, l), v) in lock(&self.counters).iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} counter");
                last = name;
            }
            let _ = writeln!(out, "{name}{} {v}", label_text(l, None));
        }
        for ((name, l), v) in lock(&self.gauges).iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} gauge");
                last = name;
            }
            let _ = writeln!(out, "{name}{} {v}", label_text(l, None));
        }
        for ((name, l), h) in lock(&self.histograms).iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} histogram");
                last = name;
            }
            let mut cumulative = 0;
            for (b, c) in SECONDS_BUCKETS.iter().zip(h.buckets) {
                cumulative += c;
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {cumulative}",
                    label_text(l, Some(("le", b.to_string())))
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                label_text(l, Some(("le", "+Inf".into()))),
                h.count
            );
            let _ = writeln!(out, "{name}_sum{} {}", label_text(l, None), h.sum);
            let _ = writeln!(out, "{name}_count{} {}", label_text(l, None), h.count);
        }
        out
    }
}

/// Phases of a pipeline, for `/ready` and the phase gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Snapshot = 1,
    Streaming = 2,
    Stopped = 3,
    Failed = 4,
}

impl Phase {
    /// The phase's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Snapshot => "snapshot",
            Phase::Streaming => "streaming",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// What `/ready` needs to know about the pipeline of this process.
pub struct Health {
    phase: std::sync::atomic::AtomicU8,
    /// Unix millis of the last pass of the main loop.
    last_loop_ms: std::sync::atomic::AtomicI64,
    /// Unix millis since when work is waiting without an acknowledgement (0: none).
    pending_since_ms: std::sync::atomic::AtomicI64,
    last_error: std::sync::Mutex<Option<String>>,
    /// Problems that leave the pipeline running but need an operator
    /// (a published table without a replica identity, ...), by key.
    warnings: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The process's pipeline health.
pub fn health() -> &'static Health {
    static H: std::sync::LazyLock<Health> = std::sync::LazyLock::new(|| Health {
        phase: std::sync::atomic::AtomicU8::new(Phase::Starting as u8),
        last_loop_ms: std::sync::atomic::AtomicI64::new(0),
        pending_since_ms: std::sync::atomic::AtomicI64::new(0),
        last_error: std::sync::Mutex::new(None),
        warnings: std::sync::Mutex::new(std::collections::BTreeMap::new()),
    });
    &H
}

impl Health {
    /// Enters `phase`; also sets the phase gauge for `pipeline`.
    pub fn set_phase(&self, pipeline: &str, phase: Phase) {
        use std::sync::atomic::Ordering;
        self.phase.store(phase as u8, Ordering::Relaxed);
        for p in [
            Phase::Starting,
            Phase::Snapshot,
            Phase::Streaming,
            Phase::Stopped,
            Phase::Failed,
        ] {
            metrics().set(
                names::PIPELINE_PHASE,
                &[("pipeline", pipeline), ("phase", p.as_str())],
                if p == phase { 1.0 } else { 0.0 },
            );
        }
        self.beat();
    }

    /// The main loop is alive.
    pub fn beat(&self) {
        self.last_loop_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether work waits for acknowledgement (`true`) or everything read is acknowledged.
    pub fn pending(&self, pending: bool) {
        use std::sync::atomic::Ordering;
        if pending {
            let _ = self.pending_since_ms.compare_exchange(
                0,
                now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.pending_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// An acknowledgement went out: progress.
    pub fn progressed(&self) {
        use std::sync::atomic::Ordering;
        let now = now_ms();
        if self.pending_since_ms.load(Ordering::Relaxed) != 0 {
            self.pending_since_ms.store(now, Ordering::Relaxed);
        }
        self.last_loop_ms.store(now, Ordering::Relaxed);
    }

    /// Remembers the error that stopped the pipeline.
    pub fn failed(&self, pipeline: &str, error: &str) {
        *lock(&self.last_error) = Some(error.to_string());
        self.set_phase(pipeline, Phase::Failed);
    }

    /// Sets (or, with `None`, clears) the warning under `key`; `/ready`
    /// fails while any is set. Returns whether the warning is new.
    pub fn set_warning(&self, key: &str, warning: Option<String>) -> bool {
        let mut w = lock(&self.warnings);
        match warning {
            Some(text) => w.insert(key.to_string(), text).is_none(),
            None => {
                w.remove(key);
                false
            }
        }
    }

    /// The warnings set now.
    pub fn warnings(&self) -> Vec<String> {
        lock(&self.warnings).values().cloned().collect()
    }

    /// `Ok(phase)` when ready; `Err(reason)` when not.
    pub fn ready(&self, stall_timeout: std::time::Duration) -> Result<&'static str, String> {
        use std::sync::atomic::Ordering;
        let phase = match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Snapshot,
            2 => Phase::Streaming,
            3 => return Err("the pipeline has stopped".into()),
            4 => {
                return Err(format!(
                    "the pipeline failed: {}",
                    lock(&self.last_error).clone().unwrap_or_default()
                ))
            }
            _ => return Err("the pipeline is starting".into()),
        };
        let stall = i64::try_from(stall_timeout.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let last_loop = self.last_loop_ms.load(Ordering::Relaxed);
        if now - last_loop > stall {
            return Err(format!(
                "the pipeline loop has not run for {} s",
                (now - last_loop) / 1000
            ));
        }
        if let Some(w) = lock(&self.warnings).values().next() {
            return Err(w.clone());
        }
        let pending = self.pending_since_ms.load(Ordering::Relaxed);
        if pending != 0 && now - pending > stall {
            return Err(format!(
                "changes have waited {} s without an acknowledgement from Kafka",
                (now - pending) / 1000
            ));
        }
        Ok(phase.as_str())
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inc(
            names::EVENTS_READ,
            &[("pipeline", "p"), ("table", "public.users")],
            3.0,
        );
        m.set(names::SOURCE_LAG_BYTES, &[("pipeline", "p")], 42.0);
        m.observe_many(
            names::END_TO_END_LATENCY,
            &[("pipeline", "p")],
            [0.003, 0.2],
        );
        let text = m.render();
        assert!(text.contains("# TYPE unilog_events_read_total counter\nunilog_events_read_total{pipeline=\"p\",table=\"public.users\"} 3\n"), "{text}");
        assert!(
            text.contains("unilog_source_lag_bytes{pipeline=\"p\"} 42"),
            "{text}"
        );
        assert!(
            text.contains(
                "unilog_end_to_end_latency_seconds_bucket{pipeline=\"p\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("unilog_end_to_end_latency_seconds_bucket{pipeline=\"p\",le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("unilog_end_to_end_latency_seconds_count{pipeline=\"p\"} 2"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn fresh() -> Health {
        Health {
            phase: std::sync::atomic::AtomicU8::new(Phase::Starting as u8),
            last_loop_ms: std::sync::atomic::AtomicI64::new(0),
            pending_since_ms: std::sync::atomic::AtomicI64::new(0),
            last_error: std::sync::Mutex::new(None),
            warnings: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    #[test]
    fn a_warning_makes_ready_fail_until_cleared() {
        let h = fresh();
        h.set_phase("p", Phase::Streaming);
        assert!(h.ready(std::time::Duration::from_secs(60)).is_ok());
        assert!(h.set_warning("identity:public.t", Some("no replica identity".into())));
        assert!(!h.set_warning("identity:public.t", Some("no replica identity".into())));
        assert_eq!(
            h.ready(std::time::Duration::from_secs(60)),
            Err("no replica identity".to_string())
        );
        h.set_warning("identity:public.t", None);
        assert!(h.ready(std::time::Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn ready_only_when_running_and_progressing() {
        let h = fresh();
        let stall = std::time::Duration::from_secs(60);
        assert!(h.ready(stall).unwrap_err().contains("starting"));
        h.set_phase("t", Phase::Streaming);
        assert_eq!(h.ready(stall), Ok("streaming"));
        // Work pending for longer than the stall timeout: not ready.
        h.pending(true);
        h.pending_since_ms
            .store(now_ms() - 61_000, Ordering::Relaxed);
        assert!(h
            .ready(stall)
            .unwrap_err()
            .contains("without an acknowledgement"));
        // An acknowledgement is progress.
        h.progressed();
        assert_eq!(h.ready(stall), Ok("streaming"));
        // A loop that stopped turning: not ready.
        h.last_loop_ms.store(now_ms() - 61_000, Ordering::Relaxed);
        assert!(h.ready(stall).unwrap_err().contains("loop has not run"));
        h.failed("t", "kafka: delivery failed");
        assert!(h
            .ready(stall)
            .unwrap_err()
            .contains("kafka: delivery failed"));
    }
}
