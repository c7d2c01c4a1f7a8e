//! The joiner: a derived stream built from two topics (`unilog join`).
//!
//! ```text
//!  right topic ──(right.key is a field)──▶ re-key by the join key ──▶ <name>.right-by-key ─┐
//!  (connections, keyed by their own id)     state: child -> join key                       │
//!                                                                                          ▼
//!  left topic ─────────────────────────────────────────────────────────────▶ join: state left[k], right[k][child]
//!  (users, keyed by the join key)                                                   │  any change of k re-emits k
//!                                                                                   ▼
//!                                                                      output topic (UserDocument, key k)
//! ```
//!
//! **Exactly once.** Each batch is one Kafka transaction: the output
//! records, the re-keyed records, the changelog entries of every state
//! change, and the input offsets (`send_offsets_to_transaction` with the
//! group's metadata, so a fenced instance cannot commit). Either all of it
//! becomes visible to `read_committed` readers or none of it, so a crash at
//! any point is followed by a replay of exactly the uncommitted batch.
//!
//! **State.** Held in a local redb file ([`store`]) for speed and size, and
//! mirrored to a compacted changelog topic in the same transactions. The
//! changelog is the truth: whenever a partition is assigned to a process,
//! its range of the local store is wiped and restored from the changelog
//! (read `read_committed`, so aborted batches never come back). Nothing
//! lives only in the process.
//!
//! **Scale-out.** Instances share one consumer group with the `range`
//! assignor, which gives partition `p` of every input topic to the same
//! instance. That is only a join if a key lives on the same partition
//! number in both inputs: the inputs must be co-partitioned (same partition
//! count, keyed by the join key, same partitioner). The joiner checks the
//! counts and refuses to start when they differ. A right side keyed by its
//! own id (a connection's id) is first re-keyed by the join key into an
//! internal topic with the left topic's partition count, as Kafka Streams
//! does for foreign-key joins; the child's id travels in a header.
//!
//! **Output per input.** Every left or (re-keyed) right record emits one
//! output record for its key: the joined document, or a tombstone when the
//! left record is gone (or, for `kind: inner`, when it has no right
//! records). Child deletes re-emit the parent with the smaller list, which
//! is what keeps a search document from going stale.

pub mod config;
pub mod schema;
pub mod store;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::ConfigError;
use crate::mapping::registry::{RegistryClient, RegistryError};
use crate::telemetry::{metrics, names};
use crate::topics::{consumer_config, frame, partition_count, unframe, KnownSchema, SchemaCache};
use config::{Cardinality, JoinKind, LoadedJoinerConfig};
use store::{left_key, rekey_key, right_key, right_prefix, Store, StoreError, Table};

/// Header of a re-keyed record: the right record's own key.
pub const HEADER_CHILD: &str = "unilog.join.child";

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// What stops the joiner.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Setup(String),
    #[error("subject `{subject}`: the derived output schema is incompatible with the registered one: {}; publish to a new output topic (for example `{topic}.v2`) or change the subject's compatibility level", messages.join("; "))]
    Incompatible {
        subject: String,
        topic: String,
        messages: Vec<String>,
    },
    #[error("the inputs are not co-partitioned: topic {left} has {left_n} partitions and topic {right} has {right_n}. A join needs both sides of a key on the same partition number, so both topics must have the same partition count (and be keyed by the join key with the same partitioner). Republish one of them on a topic with {left_n} partitions and point the join at it")]
    NotCoPartitioned {
        left: String,
        left_n: usize,
        right: String,
        right_n: usize,
    },
    #[error("kafka: {what}: {reason}")]
    Kafka { what: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// One output record cannot be made (definite: the same input fails
    /// the same way again); not a configuration error.
    #[error("the output record of key {key} cannot be encoded: {reason}")]
    Record { key: String, reason: String },
}

impl JoinError {
    /// Worth restarting for (state is restored from the changelog).
    pub fn is_transient(&self) -> bool {
        match self {
            JoinError::Registry(e) => e.is_transient(),
            JoinError::Kafka { .. } => true,
            _ => false,
        }
    }

    /// Whether the setup is wrong (exit code 2).
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            JoinError::Config(_)
                | JoinError::Setup(_)
                | JoinError::Incompatible { .. }
                | JoinError::NotCoPartitioned { .. }
        )
    }
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> JoinError {
    let what = what.into();
    move |e| JoinError::Kafka {
        what,
        reason: e.to_string(),
    }
}

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JoinStats {
    pub left_read: u64,
    pub right_read: u64,
    pub rekeyed_read: u64,
    /// Output records committed (documents and tombstones).
    pub out: u64,
    pub transactions: u64,
    pub restored: u64,
}

/// Schemas and topic layout, settled before the first record.
struct Prepared {
    registry: RegistryClient,
    left: Arc<KnownSchema>,
    left_env: bool,
    right: Arc<KnownSchema>,
    right_env: bool,
    output: Schema,
    output_id: u32,
}

async fn latest(
    registry: &RegistryClient,
    topic: &str,
    side: &str,
) -> Result<Arc<KnownSchema>, JoinError> {
    let subject = format!("{topic}-value");
    let v = registry.latest(&subject).await?.ok_or_else(|| {
        JoinError::Setup(format!(
            "{side} topic {topic}: no schema is registered under subject `{subject}`; start the pipeline that publishes it first"
        ))
    })?;
    KnownSchema::parse(&v.schema).map(Arc::new).map_err(|e| {
        JoinError::Setup(format!(
            "subject `{subject}`: the schema does not parse: {e}"
        ))
    })
}

async fn create_topics(
    cfg: &LoadedJoinerConfig,
    topics: &[(String, bool)],
    partitions: usize,
) -> Result<(), JoinError> {
    let c = &cfg.config.kafka;
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &c.brokers);
    for (k, v) in &c.properties {
        cc.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = cc
        .create()
        .map_err(kafka("cannot create the admin client"))?;
    let n = i32::try_from(partitions).unwrap_or(i32::MAX);
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, compact)| {
            let nt = NewTopic::new(t, n, TopicReplication::Fixed(1));
            if *compact {
                nt.set("cleanup.policy", "compact")
            } else {
                nt
            }
        })
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(kafka("cannot create topics"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => {
                return Err(JoinError::Kafka {
                    what: format!("cannot create topic {t}"),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Checks the inputs, derives and registers the output schema, and creates
/// the internal topics. Refuses inputs that are not co-partitioned.
async fn prepare(cfg: &LoadedJoinerConfig) -> Result<Prepared, JoinError> {
    let c = &cfg.config;
    let reg = &c.schema_registry;
    let registry = RegistryClient::from_config(reg)?;
    crate::sinks::kafka::check_brokers(
        &c.kafka.brokers,
        &c.kafka.properties,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| match e {
        crate::sinks::SinkError::Refused { .. } => JoinError::Setup(e.to_string()),
        other => JoinError::Kafka {
            what: "connecting".into(),
            reason: other.to_string(),
        },
    })?;
    // Partition counts first: the refusal should not depend on schemas.
    let probe: BaseConsumer = consumer_config(&c.kafka.brokers, &cfg.group(), &c.kafka.properties)
        .create()
        .map_err(kafka("cannot create the consumer"))?;
    let count = |topic: &str| -> Result<usize, JoinError> {
        partition_count(probe.client(), topic, Duration::from_secs(10))
            .map_err(kafka(format!("cannot read the metadata of topic {topic}")))?
            .ok_or_else(|| {
                JoinError::Setup(format!(
                    "topic {topic} does not exist; the joiner reads it, so publish to it first"
                ))
            })
    };
    let left_n = count(&c.left.topic)?;
    let right_n = count(&c.right.topic)?;
    if left_n != right_n {
        return Err(JoinError::NotCoPartitioned {
            left: c.left.topic.clone(),
            left_n,
            right: c.right.topic.clone(),
            right_n,
        });
    }
    for internal in [cfg.rekeyed_topic(), Some(cfg.changelog_topic())]
        .into_iter()
        .flatten()
    {
        if let Some(n) = partition_count(probe.client(), &internal, Duration::from_secs(10))
            .map_err(kafka(format!(
                "cannot read the metadata of topic {internal}"
            )))?
        {
            if n != left_n {
                return Err(JoinError::NotCoPartitioned {
                    left: c.left.topic.clone(),
                    left_n,
                    right: internal,
                    right_n: n,
                });
            }
        }
    }
    let left = latest(&registry, &c.left.topic, "left").await?;
    let right = latest(&registry, &c.right.topic, "right").await?;
    let (_, left_env) = schema::row_schema(&left)
        .map_err(|e| JoinError::Setup(format!("left topic {}: {e}", c.left.topic)))?;
    let (rrow, right_env) = schema::row_schema(&right)
        .map_err(|e| JoinError::Setup(format!("right topic {}: {e}", c.right.topic)))?;
    if c.right.key != "$key" && !rrow.lookup.contains_key(&c.right.key) {
        return Err(JoinError::Setup(format!(
            "right.key `{}`: the right row of topic {} has no such field; its fields are: {}",
            c.right.key,
            c.right.topic,
            rrow.fields
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let count_field = (c.cardinality == Cardinality::Many).then(|| cfg.count_field());
    let text = schema::output_schema(
        &left,
        &right,
        &c.output.record,
        &c.output.namespace,
        &c.output.field,
        count_field.as_deref(),
    )
    .map_err(JoinError::Setup)?;
    let output = Schema::parse_str(&text)
        .map_err(|e| JoinError::Setup(format!("the derived output schema does not parse: {e}")))?;
    let subject = format!("{}-value", c.output.topic);
    let messages = registry.check_compatibility(&subject, &text).await?;
    if !messages.is_empty() {
        return Err(JoinError::Incompatible {
            subject,
            topic: c.output.topic.clone(),
            messages,
        });
    }
    let output_id = registry.register(&subject, &text).await?;
    let mut topics = vec![
        (cfg.changelog_topic(), true),
        (c.output.topic.clone(), false),
    ];
    if let Some(t) = cfg.rekeyed_topic() {
        topics.push((t, false));
    }
    create_topics(cfg, &topics, left_n).await?;
    tracing::info!(left = %c.left.topic, right = %c.right.topic, output = %c.output.topic, partitions = left_n, schema_id = output_id, "join prepared");
    Ok(Prepared {
        registry,
        left,
        left_env,
        right,
        right_env,
        output,
        output_id,
    })
}

/// Runs the joiner until `stop`. The Kafka work runs on a blocking thread
/// (librdkafka's transactional calls block).
pub async fn run(
    cfg: Arc<LoadedJoinerConfig>,
    stop: Arc<AtomicBool>,
) -> Result<JoinStats, JoinError> {
    let prep = prepare(&cfg).await?;
    // One process per state folder (its store file would be emptied by a
    // second one); held until the worker ends.
    let state = cfg.state_file();
    let lock = crate::checkpoint::ProcessLock::acquire(
        state.parent().unwrap_or_else(|| std::path::Path::new(".")),
        &format!("join-{}-{}", cfg.config.name, cfg.config.kafka.instance),
    )
    .map_err(|e| JoinError::Setup(e.to_string()))?;
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _lock = lock;
        Worker::new(cfg, prep, handle)?.run(&stop)
    })
    .await
    .map_err(|e| JoinError::Setup(format!("the join thread failed: {e}")))?
}

/// Consumer context: records assignments for the worker to restore.
#[derive(Default)]
struct Ctx {
    generation: AtomicU64,
    assigned: Mutex<BTreeSet<i32>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        let mut a = self
            .assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match r {
            Rebalance::Assign(tpl) => {
                *a = tpl
                    .elements()
                    .iter()
                    .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
                    .collect();
            }
            Rebalance::Revoke(_) => a.clear(),
            Rebalance::Error(_) => return,
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rec {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    child: Option<Vec<u8>>,
}

struct Worker {
    cfg: Arc<LoadedJoinerConfig>,
    prep: Prepared,
    handle: tokio::runtime::Handle,
    cache: SchemaCache,
    store: Arc<Store>,
    producer: BaseProducer,
    consumer: BaseConsumer<Ctx>,
    ctx: Arc<Ctx>,
    rekeyed: Option<String>,
    changelog: String,
    count_field: Option<String>,
    stats: JoinStats,
}

/// A produced record, kept until librdkafka has it.
struct Out<'a> {
    topic: &'a str,
    key: &'a [u8],
    value: Option<&'a [u8]>,
    partition: Option<i32>,
    child: Option<&'a [u8]>,
}

impl Worker {
    fn new(
        cfg: Arc<LoadedJoinerConfig>,
        prep: Prepared,
        handle: tokio::runtime::Handle,
    ) -> Result<Worker, JoinError> {
        let c = &cfg.config;
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &c.kafka.brokers)
            .set("client.id", "unilog-join")
            .set("transactional.id", cfg.transactional_id())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("transaction.timeout.ms", "60000")
            .set("queue.buffering.max.messages", "1000000");
        for (k, v) in &c.kafka.properties {
            pc.set(k, v);
        }
        let producer: BaseProducer = pc.create().map_err(kafka("cannot create the producer"))?;
        producer
            .init_transactions(TXN_TIMEOUT)
            .map_err(kafka(format!(
                "cannot initialise transactions as `{}`",
                cfg.transactional_id()
            )))?;
        let consumer: BaseConsumer<Ctx> =
            consumer_config(&c.kafka.brokers, &cfg.group(), &c.kafka.properties)
                .create_with_context(Ctx::default())
                .map_err(kafka("cannot create the consumer"))?;
        let mut topics = vec![c.left.topic.as_str(), c.right.topic.as_str()];
        let rekeyed = cfg.rekeyed_topic();
        if let Some(t) = &rekeyed {
            topics.push(t);
        }
        consumer
            .subscribe(&topics)
            .map_err(kafka(format!("cannot subscribe to {}", topics.join(", "))))?;
        let store = Arc::new(Store::open_empty(&cfg.state_file())?);
        let count_field = (c.cardinality == Cardinality::Many).then(|| cfg.count_field());
        Ok(Worker {
            cache: SchemaCache::new(prep.registry.clone()),
            changelog: cfg.changelog_topic(),
            ctx: consumer.context().clone(),
            rekeyed,
            count_field,
            consumer,
            producer,
            store,
            prep,
            handle,
            cfg,
            stats: JoinStats::default(),
        })
    }

    fn run(mut self, stop: &AtomicBool) -> Result<JoinStats, JoinError> {
        let max = self.cfg.config.batch.max_records;
        let wait = Duration::from_millis(self.cfg.config.batch.max_wait_ms);
        let mut restored: BTreeSet<i32> = BTreeSet::new();
        let mut seen_gen = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut batch: Vec<Rec> = Vec::new();
            let deadline = Instant::now() + wait;
            while batch.len() < max {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let msg = self.consumer.poll(left.min(Duration::from_millis(100)));
                let g = self.ctx.generation.load(Ordering::SeqCst);
                if g != seen_gen {
                    // Positions were reset by the rebalance: what was read
                    // before it is read again.
                    batch.clear();
                    seen_gen = g;
                }
                match msg {
                    Some(Ok(m)) => batch.push(Rec {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        child: m.headers().and_then(|h| {
                            h.iter()
                                .find(|x| x.key == HEADER_CHILD)
                                .and_then(|x| x.value.map(<[u8]>::to_vec))
                        }),
                    }),
                    Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
                    None => {}
                }
                self.producer.poll(Duration::ZERO);
            }
            let assigned = self
                .ctx
                .assigned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            restored.retain(|p| assigned.contains(p));
            for p in assigned.difference(&restored.clone()) {
                self.restore(*p)?;
                restored.insert(*p);
            }
            batch.retain(|r| assigned.contains(&r.partition));
            if batch.is_empty() {
                continue;
            }
            self.transaction(&batch)?;
        }
        tracing::info!(stats = ?self.stats, "joiner stopped");
        Ok(self.stats)
    }

    /// Wipes partition `p` locally and reads it back from the changelog.
    fn restore(&mut self, p: i32) -> Result<(), JoinError> {
        let started = Instant::now();
        let c = &self.cfg.config;
        let reader: BaseConsumer = consumer_config(
            &c.kafka.brokers,
            &format!("{}-restore", self.cfg.group()),
            &c.kafka.properties,
        )
        .create()
        .map_err(kafka("cannot create the changelog reader"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.changelog, p, Offset::Beginning)
            .map_err(kafka("cannot assign the changelog"))?;
        reader.assign(&tpl).map_err(kafka(format!(
            "cannot assign {} partition {p}",
            self.changelog
        )))?;
        let (_, high) = reader
            .fetch_watermarks(&self.changelog, p, Duration::from_secs(10))
            .map_err(kafka(format!(
                "cannot read the end of {} partition {p}",
                self.changelog
            )))?;
        let store = self.store.clone();
        let txn = store.begin()?;
        txn.wipe_partition(p)?;
        let mut n = 0u64;
        let mut last = Instant::now();
        // The end: the reader's position (which steps over transaction
        // markers) at the high watermark, and the partition quiet. Some
        // brokers under-report the watermark, so a long quiet also ends it;
        // nobody else writes this partition while it is assigned to us.
        loop {
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last = Instant::now();
                    let Some((tag, key)) = m.key().and_then(|k| k.split_first()) else {
                        continue;
                    };
                    let Some(table) = Table::of_tag(*tag) else {
                        continue;
                    };
                    match m.payload() {
                        Some(v) => txn.put(table, key, v)?,
                        None => txn.del(table, key)?,
                    }
                    n += 1;
                }
                Some(Err(e)) => {
                    return Err(JoinError::Kafka {
                        what: format!("reading {} partition {p}", self.changelog),
                        reason: e.to_string(),
                    })
                }
                None => {
                    let position = reader
                        .position()
                        .ok()
                        .and_then(|tpl| {
                            tpl.find_partition(&self.changelog, p)
                                .and_then(|e| e.offset().to_raw())
                        })
                        .unwrap_or(-1);
                    let quiet = last.elapsed();
                    if (position >= high && quiet > Duration::from_millis(200))
                        || quiet > Duration::from_secs(2)
                    {
                        break;
                    }
                }
            }
        }
        txn.commit()?;
        self.stats.restored += n;
        #[allow(clippy::cast_precision_loss)]
        metrics().inc(names::JOIN_STATE_RESTORED, &[], n as f64);
        tracing::info!(
            partition = p,
            entries = n,
            ms = started.elapsed().as_millis(),
            "join state restored from the changelog"
        );
        Ok(())
    }

    fn send(&self, o: &Out<'_>) -> Result<(), JoinError> {
        let mut rec = BaseRecord::<[u8], [u8]>::to(o.topic).key(o.key);
        if let Some(v) = o.value {
            rec = rec.payload(v);
        }
        if let Some(p) = o.partition {
            rec = rec.partition(p);
        }
        if let Some(c) = o.child {
            rec = rec.headers(OwnedHeaders::new().insert(Header {
                key: HEADER_CHILD,
                value: Some(c),
            }));
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    return Err(JoinError::Kafka {
                        what: format!("produce to {}", o.topic),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// One batch, one transaction. On any failure the transaction is
    /// aborted and the error returned: the caller restarts the worker,
    /// which restores the state from the changelog and reads the batch again.
    fn transaction(&mut self, batch: &[Rec]) -> Result<(), JoinError> {
        self.producer
            .begin_transaction()
            .map_err(kafka("cannot begin a transaction"))?;
        let result = self.transaction_body(batch);
        if let Err(e) = result {
            if let Err(a) = self.producer.abort_transaction(TXN_TIMEOUT) {
                tracing::warn!(error = %a, "cannot abort the transaction");
            }
            return Err(e);
        }
        Ok(())
    }

    fn transaction_body(&mut self, batch: &[Rec]) -> Result<(), JoinError> {
        let store = self.store.clone();
        let outcome = (|| {
            let txn = store.begin()?;
            let mut out = 0u64;
            for rec in batch {
                out += self.process(rec, &txn)?;
            }
            let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
            for r in batch {
                let e = offsets.entry((r.topic.clone(), r.partition)).or_insert(0);
                *e = (*e).max(r.offset + 1);
            }
            let mut tpl = TopicPartitionList::new();
            for ((t, p), o) in &offsets {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                    .map_err(kafka("offsets"))?;
            }
            let meta = self
                .consumer
                .group_metadata()
                .ok_or_else(|| JoinError::Kafka {
                    what: "send offsets to the transaction".into(),
                    reason: "the consumer has no group metadata (not in a group yet)".into(),
                })?;
            self.producer
                .send_offsets_to_transaction(&tpl, &meta, TXN_TIMEOUT)
                .map_err(kafka("cannot send the input offsets to the transaction"))?;
            self.producer
                .commit_transaction(TXN_TIMEOUT)
                .map_err(kafka("cannot commit the transaction"))?;
            txn.commit()?;
            Ok::<u64, JoinError>(out)
        })();
        let out = outcome?;
        self.stats.out += out;
        self.stats.transactions += 1;
        #[allow(clippy::cast_precision_loss)]
        metrics().inc(names::JOIN_RECORDS_OUT, &[], out as f64);
        Ok(())
    }

    /// Decodes a framed value with the topic's latest schema as reader.
    fn decode(&mut self, payload: &[u8], reader: &Arc<KnownSchema>) -> Result<Avro, String> {
        let (id, mut body) = unframe(payload).map_err(|e| e.to_string())?;
        let writer = self
            .handle
            .block_on(self.cache.get(id))
            .map_err(|e| e.to_string())?;
        let builder = apache_avro::reader::datum::GenericDatumReader::builder(&writer.schema);
        let r = if writer.text == reader.text {
            builder.build()
        } else {
            builder.maybe_reader_schema(Some(&reader.schema)).build()
        };
        r.and_then(|r| r.read_value(&mut body))
            .map_err(|e| e.to_string())
    }

    /// The row of a left/right payload (`None`: deleted or undecodable).
    fn row(
        &mut self,
        payload: Option<&[u8]>,
        left: bool,
        rec: &Rec,
    ) -> Option<Vec<(String, Avro)>> {
        let payload = payload?;
        let (reader, env) = if left {
            (self.prep.left.clone(), self.prep.left_env)
        } else {
            (self.prep.right.clone(), self.prep.right_env)
        };
        match self.decode(payload, &reader) {
            Ok(v) => schema::row_of(v, env),
            Err(e) => {
                tracing::warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, error = %e, "record does not decode; treated as a delete");
                None
            }
        }
    }

    fn changelog(
        &self,
        p: i32,
        table: Table,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), JoinError> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(table.tag());
        k.extend_from_slice(key);
        self.send(&Out {
            topic: &self.changelog,
            key: &k,
            value,
            partition: Some(p),
            child: None,
        })
    }

    /// Applies one record; returns the number of output records.
    fn process(&mut self, rec: &Rec, txn: &store::Txn<'_>) -> Result<u64, JoinError> {
        let cfg = self.cfg.clone();
        let c = &cfg.config;
        let Some(key) = rec.key.clone() else {
            tracing::warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, "record without a key skipped: a join needs keys");
            return Ok(0);
        };
        let p = rec.partition;
        if rec.topic == c.left.topic {
            self.stats.left_read += 1;
            metrics().inc(names::JOIN_RECORDS_READ, &[("side", "left")], 1.0);
            let present = self.row(rec.payload.as_deref(), true, rec).is_some();
            let sk = left_key(p, &key);
            match (&rec.payload, present) {
                (Some(v), true) => {
                    txn.put(Table::Left, &sk, v)?;
                    self.changelog(p, Table::Left, &sk, Some(v))?;
                }
                _ => {
                    txn.del(Table::Left, &sk)?;
                    self.changelog(p, Table::Left, &sk, None)?;
                }
            }
            return self.emit(p, &key, txn);
        }
        if rec.topic == c.right.topic && self.rekeyed.is_some() {
            // Re-key: file the child under its join key.
            self.stats.right_read += 1;
            metrics().inc(names::JOIN_RECORDS_READ, &[("side", "right")], 1.0);
            let fk_new = self
                .row(rec.payload.as_deref(), false, rec)
                .and_then(|row| {
                    row.iter()
                        .find(|(n, _)| *n == c.right.key)
                        .and_then(|(_, v)| schema::key_text(v))
                })
                .map(String::into_bytes);
            let sk = rekey_key(p, &key);
            let fk_old = txn.get(Table::Rekey, &sk)?;
            let topic = self.rekeyed.clone().unwrap_or_default();
            if let Some(old) = &fk_old {
                if fk_new.as_ref() != Some(old) {
                    self.send(&Out {
                        topic: &topic,
                        key: old,
                        value: None,
                        partition: None,
                        child: Some(&key),
                    })?;
                }
            }
            match &fk_new {
                Some(fk) => {
                    self.send(&Out {
                        topic: &topic,
                        key: fk,
                        value: rec.payload.as_deref(),
                        partition: None,
                        child: Some(&key),
                    })?;
                    if fk_old.as_ref() != Some(fk) {
                        txn.put(Table::Rekey, &sk, fk)?;
                        self.changelog(p, Table::Rekey, &sk, Some(fk))?;
                    }
                }
                None if fk_old.is_some() => {
                    txn.del(Table::Rekey, &sk)?;
                    self.changelog(p, Table::Rekey, &sk, None)?;
                }
                None => {}
            }
            return Ok(0);
        }
        // A right record keyed by the join key (re-keyed, or `$key`).
        if self.rekeyed.as_deref() == Some(rec.topic.as_str()) {
            self.stats.rekeyed_read += 1;
            metrics().inc(names::JOIN_RECORDS_READ, &[("side", "rekeyed")], 1.0);
        } else {
            self.stats.right_read += 1;
            metrics().inc(names::JOIN_RECORDS_READ, &[("side", "right")], 1.0);
        }
        let child = rec.child.clone().unwrap_or_default();
        let present = self.row(rec.payload.as_deref(), false, rec).is_some();
        let sk = right_key(p, &key, &child);
        match (&rec.payload, present) {
            (Some(v), true) => {
                txn.put(Table::Right, &sk, v)?;
                self.changelog(p, Table::Right, &sk, Some(v))?;
            }
            _ => {
                txn.del(Table::Right, &sk)?;
                self.changelog(p, Table::Right, &sk, None)?;
            }
        }
        self.emit(p, &key, txn)
    }

    /// Produces the output record of `key` from the state.
    fn emit(&mut self, p: i32, key: &[u8], txn: &store::Txn<'_>) -> Result<u64, JoinError> {
        let c = &self.cfg.config;
        let left = txn.get(Table::Left, &left_key(p, key))?;
        let rights = txn.scan(Table::Right, &right_prefix(p, key))?;
        let cardinality = c.cardinality;
        let kind = c.kind;
        let field = c.output.field.clone();
        let output_topic = c.output.topic.clone();
        let probe = Rec {
            topic: output_topic.clone(),
            partition: p,
            offset: -1,
            key: None,
            payload: None,
            child: None,
        };
        let left_row = match &left {
            Some(v) => self.row(Some(v), true, &probe),
            None => None,
        };
        let mut right_rows = Vec::with_capacity(rights.len());
        for (_, v) in &rights {
            if let Some(r) = self.row(Some(v), false, &probe) {
                right_rows.push(r);
            }
            if cardinality == Cardinality::One && !right_rows.is_empty() {
                break;
            }
        }
        let value = match left_row {
            Some(l) if kind == JoinKind::Left || !right_rows.is_empty() => {
                let key_text = String::from_utf8_lossy(key);
                let v = schema::output_value(
                    &key_text,
                    l,
                    right_rows,
                    &field,
                    self.count_field.as_deref(),
                );
                let body =
                    apache_avro::writer::datum::GenericDatumWriter::builder(&self.prep.output)
                        .build()
                        .and_then(|w| w.write_value_to_vec(v))
                        .map_err(|e| JoinError::Record {
                            key: key_text.to_string(),
                            reason: e.to_string(),
                        })?;
                Some(frame(self.prep.output_id, &body))
            }
            _ => None,
        };
        self.send(&Out {
            topic: &output_topic,
            key,
            value: value.as_deref(),
            partition: None,
            child: None,
        })?;
        Ok(1)
    }
}
