//! The Kafka sink: an idempotent producer with `acks=all`.
//!
//! The message key is the entity key, so one entity's events land on one
//! partition in order. Each record carries the headers `unilog.event_type`
//! and `unilog.dedup_id` so consumers can filter and deduplicate without
//! decoding the Avro body. A record without payload (a tombstone after a
//! delete, on a Debezium topic) is sent with a null value.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::{Delivery, ProgressRecord, Sink, SinkError};
use crate::mapping::DomainEvent;

/// Header naming the event type.
pub const HEADER_EVENT_TYPE: &str = "unilog.event_type";
/// Header carrying the dedup id.
pub const HEADER_DEDUP_ID: &str = "unilog.dedup_id";

/// How long initialising, committing or aborting a transaction may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// librdkafka settings unilog sets unless the config overrides them.
fn base_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("client.id", "unilog")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "300000")
        .set("socket.keepalive.enable", "true");
    for (k, v) in properties {
        cfg.set(k, v);
    }
    cfg
}

/// The last error librdkafka reported for a client (a failed TLS handshake,
/// a refused SASL login, a broker that went away), with its code.
///
/// TLS and SASL failures reach the application only through librdkafka's
/// error callback: a metadata request meanwhile just times out with "broker
/// transport failure". Keeping the last one lets the connection check say
/// what went wrong, and stop at once when retrying cannot help.
#[derive(Default)]
pub struct LastError(Mutex<LastErrorState>);

#[derive(Default)]
struct LastErrorState {
    last: Option<(RDKafkaErrorCode, String)>,
    /// When each code was last logged.
    logged: Vec<(RDKafkaErrorCode, Instant)>,
}

/// How often one kind of client error is logged: librdkafka reports every
/// reconnection attempt.
const LOG_EVERY: Duration = Duration::from_secs(30);

impl LastError {
    /// Records an error; true when it is worth a log line.
    fn set(&self, code: RDKafkaErrorCode, reason: &str) -> bool {
        let Ok(mut state) = self.0.lock() else {
            return true;
        };
        // "All brokers down" and a lost connection follow the error that
        // brought the brokers down: keep a refusal over them.
        let keep = state
            .last
            .as_ref()
            .is_some_and(|(c, r)| refusal(*c, r).is_some() && refusal(code, reason).is_none());
        if !keep {
            state.last = Some((code, reason.to_string()));
        }
        let now = Instant::now();
        match state.logged.iter_mut().find(|(c, _)| *c == code) {
            Some((_, at)) if now.duration_since(*at) < LOG_EVERY => false,
            Some((_, at)) => {
                *at = now;
                true
            }
            None => {
                state.logged.push((code, now));
                true
            }
        }
    }

    fn get(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.0.lock().ok().and_then(|state| state.last.clone())
    }
}

/// The producer's context: feeds librdkafka's statistics into unilog's
/// metrics and keeps its last error (see [`LastError`]).
pub struct StatsContext {
    last_error: Arc<LastError>,
}

impl rdkafka::ClientContext for StatsContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let (retries, errors) = statistics
            .brokers
            .values()
            .fold((0u64, 0u64), |(r, e), b| (r + b.txretries, e + b.txerrs));
        #[allow(clippy::cast_precision_loss)]
        {
            let m = crate::telemetry::metrics();
            m.set_counter(
                crate::telemetry::names::KAFKA_PRODUCE_RETRIES,
                &[],
                retries as f64,
            );
            m.set_counter(
                crate::telemetry::names::KAFKA_PRODUCE_ERRORS,
                &[],
                errors as f64,
            );
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        if self.last_error.set(code, reason) {
            tracing::warn!(error = %reason, code = ?code, "kafka client error");
        }
    }
}

/// The operator's message when librdkafka's error means the brokers refuse
/// this client as configured, so that retrying cannot help: a certificate
/// that does not check out, or a refused SASL login. `None` for anything
/// that may pass (a broker down, a connection reset).
fn refusal(code: RDKafkaErrorCode, reason: &str) -> Option<String> {
    match code {
        RDKafkaErrorCode::SSL if reason.contains("certificate verify failed") => Some(format!(
            "TLS handshake failed: {reason}; check kafka.properties `ssl.ca.location`: it must \
             hold the CA that signed the brokers' certificates, and the host names in \
             kafka.brokers must be named in those certificates"
        )),
        // librdkafka files a connection lost during the SASL handshake under
        // authentication too; that one may pass.
        RDKafkaErrorCode::Authentication if !reason.contains("Broker transport failure") => {
            Some(format!(
                "SASL authentication failed: {reason}; check kafka.properties `sasl.mechanism`, \
             `sasl.username` and `sasl.password`: the brokers must know this user for this \
             mechanism"
            ))
        }
        _ => None,
    }
}

/// Why no broker answered, with librdkafka's last error when there was one.
fn unreachable_reason(err: &KafkaError, last: Option<&(RDKafkaErrorCode, String)>) -> String {
    let Some((_, reason)) = last else {
        return err.to_string();
    };
    let hint = if reason.contains("state AUTH_HANDSHAKE")
        || reason.contains("mechanism handshake failed")
    {
        "; the broker closed the connection during the SASL handshake: check that it offers \
         kafka.properties `sasl.mechanism` on this listener"
    } else if reason.contains("state SSL_HANDSHAKE") {
        "; the TLS handshake failed: check kafka.properties `security.protocol` and `ssl.*`"
    } else {
        ""
    };
    format!("{err}; last error: {reason}{hint}")
}

/// Whether `brokers` answer a client with these `properties`: a TLS or
/// SASL refusal is [`SinkError::Refused`] at once, no answer within
/// `timeout` is [`SinkError::Unreachable`]. For the joiner and the indexer,
/// whose consumers would otherwise only time out.
pub async fn check_brokers(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), SinkError> {
    KafkaSink::new(brokers, properties)?
        .check_connection(timeout)
        .await
}

/// Publishes domain events to Kafka.
pub struct KafkaSink {
    producer: FutureProducer<StatsContext>,
    brokers: String,
    last_error: Arc<LastError>,
}

impl KafkaSink {
    /// A producer for `brokers` with extra librdkafka `properties`.
    pub fn new(brokers: &str, properties: &BTreeMap<String, String>) -> Result<Self, SinkError> {
        let mut cfg = base_config(brokers, properties);
        if !properties.contains_key("statistics.interval.ms") {
            cfg.set("statistics.interval.ms", "5000");
        }
        let last_error = Arc::new(LastError::default());
        let producer: FutureProducer<StatsContext> = cfg
            .create_with_context(StatsContext {
                last_error: last_error.clone(),
            })
            .map_err(|e| SinkError::Setup(e.to_string()))?;
        Ok(KafkaSink {
            producer,
            brokers: brokers.to_string(),
            last_error,
        })
    }

    /// A transactional producer (exactly-once delivery): `transactional_id`
    /// is stable per pipeline, so a restarted process fences the one
    /// before it and aborts the transaction it left open.
    pub async fn transactional(
        brokers: &str,
        properties: &BTreeMap<String, String>,
        transactional_id: &str,
    ) -> Result<Self, SinkError> {
        let mut props = properties.clone();
        props
            .entry("transactional.id".into())
            .or_insert_with(|| transactional_id.to_string());
        // A transaction left open by a process that died blocks
        // read_committed consumers until the broker aborts it: keep that
        // short. (A restarted unilog fences and aborts it at once.)
        props
            .entry("transaction.timeout.ms".into())
            .or_insert_with(|| "60000".into());
        props
            .entry("message.timeout.ms".into())
            .or_insert_with(|| "60000".into());
        let sink = KafkaSink::new(brokers, &props)?;
        let producer = sink.producer.clone();
        let brokers_text = brokers.to_string();
        tokio::task::spawn_blocking(move || producer.init_transactions(TXN_TIMEOUT))
            .await
            .map_err(|e| SinkError::Setup(e.to_string()))?
            .map_err(|e| SinkError::Unreachable {
                brokers: brokers_text,
                reason: format!("cannot initialise transactions: {e}"),
            })?;
        Ok(sink)
    }

    /// Fails with a clear message when no broker answers within `timeout`,
    /// and at once when the brokers refuse this client's TLS or SASL
    /// settings ([`SinkError::Refused`]).
    pub async fn check_connection(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let brokers = self.brokers.clone();
        let last_error = self.last_error.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            loop {
                // Short requests, so that a refusal reported meanwhile ends the wait.
                let left = deadline.saturating_duration_since(Instant::now());
                let Err(err) = producer
                    .client()
                    .fetch_metadata(None, left.min(Duration::from_secs(1)))
                else {
                    return Ok(());
                };
                let last = last_error.get();
                if let Some(reason) = last.as_ref().and_then(|(c, r)| refusal(*c, r)) {
                    return Err(SinkError::Refused { brokers, reason });
                }
                if Instant::now() >= deadline {
                    return Err(SinkError::Unreachable {
                        brokers,
                        reason: unreachable_reason(&err, last.as_ref()),
                    });
                }
            }
        })
        .await
        .map_err(|e| SinkError::Setup(e.to_string()))?
    }

    /// Waits until everything enqueued is delivered (or `timeout`).
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer
            .flush(timeout)
            .map_err(|e| SinkError::Delivery {
                topic: "*".into(),
                reason: e.to_string(),
            })
    }
}

/// A failed produce or delivery, classified by its Kafka error code: a
/// refusal that cannot change on a retry is [`SinkError::Definite`], with
/// what to do; anything else is a transient [`SinkError::Delivery`].
pub fn delivery_error(topic: &str, e: &KafkaError) -> SinkError {
    let reason = e.to_string();
    let definite = |advice: String| SinkError::Definite {
        what: format!("topic {topic}"),
        reason: reason.clone(),
        advice,
    };
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessageSize,
        ) => definite("the record is larger than the producer's or the broker's limit: raise the topic's max.message.bytes (or the broker's message.max.bytes) and kafka.properties message.max.bytes, or set kafka.max_event_bytes to that limit so that larger events go to the dead-letter topic".to_string()),
        Some(RDKafkaErrorCode::InvalidRecord) => {
            definite("the broker refuses the record as invalid (a policy of the topic, such as a compacted topic without a key)".into())
        }
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => definite(format!("the principal of kafka.properties may not write topic {topic}: grant it WRITE (and DESCRIBE) on the topic")),
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => definite(
            "the principal may not use the transactional id: grant it WRITE and DESCRIBE on the transactional id unilog-<name>".into(),
        ),
        Some(RDKafkaErrorCode::PolicyViolation) => {
            definite("the broker's create or produce policy refuses it".into())
        }
        code if is_fenced(code) => fenced_or_fatal(format!("topic {topic}"), reason.clone(), true),
        _ => SinkError::Delivery {
            topic: topic.to_string(),
            reason,
        },
    }
}

fn fenced_advice() -> String {
    "another producer with this pipeline's transactional id (unilog-<name>) started, which fences this one: another `unilog run` of the same pipeline is running; stop one of them (each pipeline runs in one process)".into()
}

/// A failed transaction call: fatal errors (a fenced producer above all)
/// are definite; the rest are worth a restart.
fn transaction_error(what: &str, e: &KafkaError) -> SinkError {
    let fatal = matches!(e, KafkaError::Transaction(t) if t.is_fatal());
    let fenced = is_fenced(e.rdkafka_error_code());
    if fenced || fatal {
        fenced_or_fatal(format!("transaction ({what})"), e.to_string(), fenced)
    } else {
        SinkError::Transaction {
            reason: format!("{what}: {e}"),
        }
    }
}

fn is_fenced(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::TransactionCoordinatorFenced
        )
    )
}

/// How many fenced or fatal transaction errors within [`FENCE_WINDOW`]
/// make them definite.
const FENCES_BEFORE_STOP: usize = 3;
const FENCE_WINDOW: Duration = Duration::from_secs(600);

/// A fenced (or otherwise fatal) transactional producer. The broker also
/// fences a producer whose transaction it aborted for running past
/// `transaction.timeout.ms` (a leader or coordinator away for a minute),
/// and a new producer then works: so the first ones restart the pipeline
/// with a new producer. Fenced again and again within 10 minutes, it is
/// another process with the same transactional id: definite.
fn fenced_or_fatal(what: String, reason: String, fenced: bool) -> SinkError {
    static RECENT: std::sync::LazyLock<Mutex<Vec<Instant>>> =
        std::sync::LazyLock::new(Default::default);
    let count = {
        let mut recent = RECENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.retain(|t| t.elapsed() < FENCE_WINDOW);
        recent.push(Instant::now());
        recent.len()
    };
    let advice = if fenced {
        fenced_advice()
    } else {
        "the transactional producer hit a fatal error; check the broker's transaction settings"
            .into()
    };
    if count >= FENCES_BEFORE_STOP {
        SinkError::Definite {
            what,
            reason: format!(
                "{reason} ({count} times within {} min)",
                FENCE_WINDOW.as_secs() / 60
            ),
            advice,
        }
    } else {
        SinkError::Transaction {
            reason: format!(
                "{what}: {reason}; restarting with a new producer (if this repeats: {advice})"
            ),
        }
    }
}

/// The largest event unilog hands to Kafka, and where the limit comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLimit {
    pub bytes: usize,
    /// For messages: `kafka.max_event_bytes`, the producer's
    /// `message.max.bytes`, or a topic's `max.message.bytes`.
    pub from: String,
}

/// librdkafka's own `message.max.bytes` default.
const PRODUCER_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What a record adds to its key and value on the wire (headers aside):
/// librdkafka counts it against `message.max.bytes`.
pub const RECORD_OVERHEAD_BYTES: usize = 128;

/// The size of `ev` as librdkafka counts it against its limit (about).
pub fn record_size(ev: &DomainEvent) -> usize {
    ev.payload.as_ref().map_or(0, Vec::len)
        + ev.key.as_ref().map_or(0, Vec::len)
        + HEADER_EVENT_TYPE.len()
        + ev.event_type.len()
        + HEADER_DEDUP_ID.len()
        + ev.dedup_id.len()
        + RECORD_OVERHEAD_BYTES
}

/// The event limits of a pipeline: `kafka.max_event_bytes` if set, else
/// per topic the smaller of the producer's `message.max.bytes` and the
/// topic's `max.message.bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLimits {
    explicit: Option<usize>,
    producer: usize,
    /// Topics whose `max.message.bytes` is below the producer's limit.
    topics: BTreeMap<String, usize>,
}

impl EventLimits {
    /// The limit of an event bound for `topic`.
    pub fn for_topic(&self, topic: &str) -> EventLimit {
        if let Some(bytes) = self.explicit {
            return EventLimit {
                bytes,
                from: "kafka.max_event_bytes".into(),
            };
        }
        match self.topics.get(topic) {
            Some(&bytes) => EventLimit {
                bytes,
                from: format!("topic {topic}'s max.message.bytes"),
            },
            None => EventLimit {
                bytes: self.producer,
                from: "the producer's message.max.bytes".into(),
            },
        }
    }

    /// For `check`: the limit, and the topics with a smaller one.
    pub fn describe(&self) -> String {
        if let Some(bytes) = self.explicit {
            return format!("{bytes} bytes (kafka.max_event_bytes)");
        }
        let mut text = format!("{} bytes (the producer's message.max.bytes)", self.producer);
        for (t, b) in &self.topics {
            text.push_str(&format!(", {b} bytes on topic {t} (its max.message.bytes)"));
        }
        text
    }
}

/// The event limits for `topics` (see [`EventLimits`]). The topics'
/// `max.message.bytes` come from DescribeConfigs; a broker that does not
/// answer leaves the producer's limit. With `compression.type` set, the
/// broker checks a topic's limit against compressed batches, so only the
/// producer's limit (on uncompressed records) is applied.
pub async fn event_limits(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[String],
    explicit: Option<usize>,
) -> EventLimits {
    let producer = properties
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(PRODUCER_MESSAGE_MAX_BYTES);
    let mut limits = EventLimits {
        explicit,
        producer,
        topics: BTreeMap::new(),
    };
    let compressed = properties
        .get("compression.type")
        .or_else(|| properties.get("compression.codec"))
        .is_some_and(|c| c != "none");
    if explicit.is_some() || compressed {
        return limits;
    }
    let Ok(admin) = base_config(brokers, properties).create::<AdminClient<DefaultClientContext>>()
    else {
        return limits;
    };
    let specs: Vec<rdkafka::admin::ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| rdkafka::admin::ResourceSpecifier::Topic(t))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let described = tokio::time::timeout(
        Duration::from_secs(10),
        admin.describe_configs(specs.iter(), &opts),
    )
    .await;
    if let Ok(Ok(results)) = described {
        for (topic, r) in topics.iter().zip(results) {
            let Ok(resource) = r else { continue };
            let bytes = resource
                .entries
                .iter()
                .find(|e| e.name == "max.message.bytes")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<usize>().ok());
            if let Some(b) = bytes.filter(|b| *b < producer) {
                limits.topics.insert(topic.clone(), b);
            }
        }
    }
    limits
}

/// Creates `topics` that do not exist yet.
pub async fn ensure_topics(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), SinkError> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers, properties)
        .create()
        .map_err(|e| SinkError::Setup(e.to_string()))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    create_topics(&admin, brokers, &new).await
}

impl KafkaSink {
    /// Enqueues `batch` in order; returns each record's delivery with its topic.
    async fn enqueue(
        &self,
        batch: &[DomainEvent],
    ) -> Result<Vec<(DeliveryFuture, Arc<str>)>, SinkError> {
        let mut pending = Vec::with_capacity(batch.len());
        for ev in batch {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: HEADER_EVENT_TYPE,
                    value: Some(ev.event_type.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_DEDUP_ID,
                    value: Some(ev.dedup_id.as_bytes()),
                });
            let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(&ev.topic).headers(headers);
            // No payload: a tombstone (null value).
            if let Some(p) = &ev.payload {
                record = record.payload(p);
            }
            if let Some(k) = &ev.key {
                record = record.key(k);
            }
            pending.push((self.send(record, &ev.topic).await?, ev.topic.clone()));
        }
        Ok(pending)
    }

    /// Sends one record, waiting while librdkafka's queue is full.
    async fn send<'a>(
        &self,
        mut record: FutureRecord<'a, Vec<u8>, Vec<u8>>,
        topic: &str,
    ) -> Result<DeliveryFuture, SinkError> {
        loop {
            match self.producer.send_result(record) {
                Ok(fut) => return Ok(fut),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(delivery_error(topic, &e)),
            }
        }
    }

    /// Runs a blocking transaction call off the async threads.
    async fn txn_call(
        &self,
        what: &'static str,
        call: impl FnOnce(&FutureProducer<StatsContext>) -> rdkafka::error::KafkaResult<()>
            + Send
            + 'static,
    ) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || call(&producer))
            .await
            .map_err(|e| SinkError::Transaction {
                reason: format!("{what}: {e}"),
            })?
            .map_err(|e| transaction_error(what, &e))
    }
}

/// Waits for every delivery; the first failure names its topic.
async fn wait_all(pending: Vec<(DeliveryFuture, Arc<str>)>) -> Result<(), SinkError> {
    let (futs, topics): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
    for (res, topic) in join_all(futs).await.into_iter().zip(topics) {
        match res {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(delivery_error(&topic, &e)),
            Err(_) => {
                return Err(SinkError::Delivery {
                    topic: topic.to_string(),
                    reason: "the producer was dropped before confirming".into(),
                })
            }
        }
    }
    Ok(())
}

impl Sink for KafkaSink {
    async fn write(&self, batch: Vec<DomainEvent>) -> Result<Delivery, SinkError> {
        let pending = self.enqueue(&batch).await?;
        Ok(Box::pin(wait_all(pending)))
    }

    async fn write_atomic(
        &self,
        batch: Vec<DomainEvent>,
        progress: Option<ProgressRecord>,
    ) -> Result<(), SinkError> {
        self.producer
            .begin_transaction()
            .map_err(|e| transaction_error("begin", &e))?;
        let result = async {
            // The events first, and only once the broker has them all, the
            // progress record: on a broker that shows records of aborted
            // transactions to read_committed readers (the local test broker
            // does), a visible progress record then never runs ahead of the
            // events it covers.
            wait_all(self.enqueue(&batch).await?).await?;
            if let Some(p) = &progress {
                let record = FutureRecord::<Vec<u8>, Vec<u8>>::to(&p.topic)
                    .key(&p.key)
                    .payload(&p.value);
                let sent = self.send(record, &p.topic).await?;
                wait_all(vec![(sent, Arc::from(p.topic.as_str()))]).await?;
            }
            // Commit flushes every record first and fails if one failed.
            self.txn_call("commit", |p| p.commit_transaction(TXN_TIMEOUT))
                .await
        }
        .await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, "aborting the Kafka transaction");
            if let Err(abort) = self
                .txn_call("abort", |p| p.abort_transaction(TXN_TIMEOUT))
                .await
            {
                tracing::debug!(error = %abort, "abort failed; the next start fences the transaction");
            }
        }
        result
    }
}

/// Reads the last value written under `key` to partition 0 of `topic`,
/// committed transactions only, up to the record `fence` (key and value),
/// which the caller committed just before. A partition is read in order
/// and `read_committed` stops at the first unresolved transaction, so once
/// the fence is read every transaction before it has been seen: end
/// offsets, which not every broker reports reliably, are not needed.
/// Fails when the fence does not show up within `timeout`.
pub async fn read_last(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    key: &[u8],
    fence: (Vec<u8>, Vec<u8>),
    timeout: Duration,
) -> Result<Option<Vec<u8>>, SinkError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};

    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            cfg.set(k, v);
        }
    }
    cfg.set(
        "group.id",
        format!("unilog-progress-{}", std::process::id()),
    )
    .set("enable.auto.commit", "false")
    .set("isolation.level", "read_committed")
    .set("client.id", "unilog-progress");
    let topic = topic.to_string();
    let key = key.to_vec();
    let err = {
        let topic = topic.clone();
        move |reason: String| SinkError::Progress {
            topic: topic.clone(),
            reason,
        }
    };
    let err2 = err.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = cfg.create().map_err(|e| err(e.to_string()))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|e| err(e.to_string()))?;
        consumer.assign(&tpl).map_err(|e| err(e.to_string()))?;
        let mut last = None;
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if m.key() == Some(fence.0.as_slice())
                        && m.payload() == Some(fence.1.as_slice())
                    {
                        return Ok(last);
                    }
                    if m.key() == Some(key.as_slice()) {
                        last = m.payload().map(<[u8]>::to_vec);
                    }
                }
                Some(Err(e)) => return Err(err(e.to_string())),
                None => {}
            }
        }
        Err(err(format!(
            "the start marker this process committed did not arrive within {} s",
            timeout.as_secs()
        )))
    })
    .await
    .map_err(|e| err2(e.to_string()))?
}

/// Creates the compacted progress topic (one partition) if it is missing.
pub async fn ensure_progress_topic(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    replication: i32,
) -> Result<(), SinkError> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers, properties)
        .create()
        .map_err(|e| SinkError::Setup(e.to_string()))?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(replication))
        .set("cleanup.policy", "compact");
    create_topics(&admin, brokers, &[new]).await
}

/// Creates `topics`; one that exists already is fine.
async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    brokers: &str,
    topics: &[NewTopic<'_>],
) -> Result<(), SinkError> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(topics, &opts)
        .await
        .map_err(|e| SinkError::Unreachable {
            brokers: brokers.to_string(),
            reason: e.to_string(),
        })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SinkError::Topic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // librdkafka's own texts, as it reported them against the test broker.
    const BAD_CA: &str = "ssl://127.0.0.1:39093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 10ms in state SSL_HANDSHAKE)";
    const BAD_LOGIN: &str = "sasl_plaintext://127.0.0.1:39091/bootstrap: SASL authentication error: SASL SCRAM authentication failed: broker responded with unknown-user (after 24ms in state AUTH_REQ)";
    const CLOSED_IN_HANDSHAKE: &str = "sasl_plaintext://127.0.0.1:39091/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 0ms in state AUTH_HANDSHAKE)";
    const NO_SHARED_MECHANISM: &str = "sasl_plaintext://127.0.0.1:39197/bootstrap: SASL PLAIN mechanism handshake failed: Local: Broker transport failure: broker's supported mechanisms: (n/a) (after 0ms in state DOWN)";

    #[test]
    fn a_certificate_that_does_not_verify_is_a_refusal_naming_the_ca_setting() {
        let why = refusal(RDKafkaErrorCode::SSL, BAD_CA).unwrap();
        assert!(why.starts_with("TLS handshake failed: "), "{why}");
        assert!(why.contains("certificate verify failed"), "{why}");
        assert!(why.contains("kafka.properties `ssl.ca.location`"), "{why}");
    }

    #[test]
    fn a_refused_login_is_a_refusal_naming_the_sasl_settings() {
        let why = refusal(RDKafkaErrorCode::Authentication, BAD_LOGIN).unwrap();
        assert!(why.starts_with("SASL authentication failed: "), "{why}");
        assert!(why.contains("unknown-user"), "{why}");
        assert!(why.contains("`sasl.username` and `sasl.password`"), "{why}");
    }

    #[test]
    fn other_errors_are_retried() {
        let reset = "ssl://b:9093/bootstrap: SSL handshake failed: Disconnected: connection reset by peer (after 5ms in state SSL_HANDSHAKE)";
        assert!(refusal(RDKafkaErrorCode::SSL, reset).is_none());
        assert!(refusal(
            RDKafkaErrorCode::BrokerTransportFailure,
            CLOSED_IN_HANDSHAKE
        )
        .is_none());
        assert!(refusal(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down").is_none());
        // A broker that closes the connection in the SASL handshake (filed
        // by librdkafka under authentication) may be restarting.
        assert!(refusal(RDKafkaErrorCode::Authentication, NO_SHARED_MECHANISM).is_none());
    }

    #[test]
    fn an_unreachable_broker_carries_the_last_error_and_a_hint() {
        let err = KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure);
        let last = (
            RDKafkaErrorCode::BrokerTransportFailure,
            CLOSED_IN_HANDSHAKE.to_string(),
        );
        let text = unreachable_reason(&err, Some(&last));
        assert!(text.contains("state AUTH_HANDSHAKE"), "{text}");
        assert!(text.contains("`sasl.mechanism`"), "{text}");
        let last = (
            RDKafkaErrorCode::Authentication,
            NO_SHARED_MECHANISM.to_string(),
        );
        let text = unreachable_reason(&err, Some(&last));
        assert!(text.contains("during the SASL handshake"), "{text}");
        assert_eq!(unreachable_reason(&err, None), err.to_string());
    }

    #[test]
    fn a_refusal_is_not_hidden_by_the_errors_after_it() {
        let last = LastError::default();
        assert!(last.set(RDKafkaErrorCode::SSL, BAD_CA));
        last.set(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down");
        last.set(
            RDKafkaErrorCode::BrokerTransportFailure,
            "ssl://127.0.0.1:33829/bootstrap: error:0A000086:SSL routines::certificate verify failed (after 2ms in state SSL_HANDSHAKE)",
        );
        assert_eq!(last.get().unwrap().0, RDKafkaErrorCode::SSL);
        // The same kind again is not logged again right away.
        assert!(!last.set(RDKafkaErrorCode::SSL, BAD_CA));
    }
}
