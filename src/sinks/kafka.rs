//! The Kafka sink: an idempotent producer with `acks=all`.
//!
//! The message key is the entity key, so one entity's events land on one
//! partition in order. Each record carries the headers `unilog.event_type`
//! and `unilog.dedup_id` so consumers can filter and deduplicate without
//! decoding the Avro body. A record without payload (a tombstone after a
//! delete, on a Debezium topic) is sent with a null value.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Delivery, Sink, SinkError};
use crate::mapping::DomainEvent;

/// Header naming the event type.
pub const HEADER_EVENT_TYPE: &str = "unilog.event_type";
/// Header carrying the dedup id.
pub const HEADER_DEDUP_ID: &str = "unilog.dedup_id";

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

/// Feeds librdkafka's statistics into unilog's metrics.
pub struct StatsContext;

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
}

/// Publishes domain events to Kafka.
pub struct KafkaSink {
    producer: FutureProducer<StatsContext>,
    brokers: String,
}

impl KafkaSink {
    /// A producer for `brokers` with extra librdkafka `properties`.
    pub fn new(brokers: &str, properties: &BTreeMap<String, String>) -> Result<Self, SinkError> {
        let mut cfg = base_config(brokers, properties);
        if !properties.contains_key("statistics.interval.ms") {
            cfg.set("statistics.interval.ms", "5000");
        }
        let producer: FutureProducer<StatsContext> = cfg
            .create_with_context(StatsContext)
            .map_err(|e| SinkError::Setup(e.to_string()))?;
        Ok(KafkaSink {
            producer,
            brokers: brokers.to_string(),
        })
    }

    /// Fails with a clear message when no broker answers within `timeout`.
    pub async fn check_connection(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| SinkError::Unreachable {
                    brokers,
                    reason: e.to_string(),
                })
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
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &opts)
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

impl Sink for KafkaSink {
    async fn write(&self, batch: Vec<DomainEvent>) -> Result<Delivery, SinkError> {
        let mut pending = Vec::with_capacity(batch.len());
        for ev in &batch {
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
            loop {
                match self.producer.send_result(record) {
                    Ok(fut) => {
                        pending.push((fut, ev.topic.clone()));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        return Err(SinkError::Delivery {
                            topic: ev.topic.to_string(),
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
        Ok(Box::pin(async move {
            let (futs, topics): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            for (res, topic) in join_all(futs).await.into_iter().zip(topics) {
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        return Err(SinkError::Delivery {
                            topic: topic.to_string(),
                            reason: e.to_string(),
                        })
                    }
                    Err(_) => {
                        return Err(SinkError::Delivery {
                            topic: topic.to_string(),
                            reason: "the producer was dropped before confirming".into(),
                        })
                    }
                }
            }
            Ok(())
        }))
    }
}
