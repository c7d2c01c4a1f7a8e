//! Input for the joiner and indexer tests: topics written directly with a
//! producer and the registry, in the shape unilog's pipeline publishes
//! (key = entity key text, value = Confluent-framed Avro domain event, or a
//! tombstone), so these tests need no database.
#![allow(dead_code)]

use std::time::Duration;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::Value as Json;

/// The search server: `SEARCH_URL` (the local stack's emulator, or a real cluster).
pub fn search_url() -> String {
    std::env::var("SEARCH_URL")
        .unwrap_or_else(|_| panic!("SEARCH_URL is not set: `eval \"$(scripts/stack env)\"` first"))
        .trim_end_matches('/')
        .to_string()
}

/// Creates `topic` with `partitions`.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let r = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for x in r {
        x.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// A row schema with the fields `(name, avro type)`, wrapped in unilog's
/// domain-event envelope (`event_type`, `op`, `key`, `dedup_id`, `before`, `after`).
pub fn envelope_schema(record: &str, fields: &[(&str, &str)]) -> String {
    let fields: Vec<Json> = fields
        .iter()
        .map(|(n, t)| serde_json::json!({"name": n, "type": ["null", t], "default": null}))
        .collect();
    serde_json::json!({
        "type": "record", "name": record, "namespace": "unilog.test",
        "fields": [
            {"name": "event_type", "type": "string"},
            {"name": "op", "type": "string"},
            {"name": "key", "type": "string"},
            {"name": "dedup_id", "type": "string"},
            {"name": "before", "type": ["null", {"type": "record", "name": format!("{record}Row"), "fields": fields}], "default": null},
            {"name": "after", "type": ["null", format!("{record}Row")], "default": null}
        ]
    })
    .to_string()
}

/// Writes domain events for one topic.
pub struct Feed {
    pub topic: String,
    pub schema: Schema,
    pub schema_id: u32,
    pub producer: FutureProducer,
    seq: u64,
}

impl Feed {
    /// Registers `schema` under `<topic>-value`.
    pub async fn new(brokers: &str, registry: &str, topic: &str, schema: &str) -> Feed {
        let reg = unilog::mapping::registry::RegistryClient::new(registry, None, None).unwrap();
        let schema_id = reg
            .register(&format!("{topic}-value"), schema)
            .await
            .unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap();
        Feed {
            topic: topic.to_string(),
            schema: Schema::parse_str(schema).unwrap(),
            schema_id,
            producer,
            seq: 0,
        }
    }

    /// The framed value of an event with `op` and an `after` row of `(field, value)`.
    pub fn event(&mut self, key: &str, op: &str, after: Option<Vec<(&str, Avro)>>) -> Vec<u8> {
        self.seq += 1;
        let Schema::Record(r) = &self.schema else {
            panic!("not a record")
        };
        let row_fields: Vec<String> = match &r.fields[4].schema {
            Schema::Union(u) => match &u.variants()[1] {
                Schema::Record(rr) => rr.fields.iter().map(|f| f.name.clone()).collect(),
                _ => panic!("row"),
            },
            _ => panic!("before"),
        };
        let row = after.map(|vals| {
            Avro::Record(
                row_fields
                    .iter()
                    .map(|f| {
                        let v = vals.iter().find(|(n, _)| n == f).map(|(_, v)| v.clone());
                        (
                            f.clone(),
                            match v {
                                Some(v) => Avro::Union(1, Box::new(v)),
                                None => Avro::Union(0, Box::new(Avro::Null)),
                            },
                        )
                    })
                    .collect(),
            )
        });
        let value = Avro::Record(vec![
            ("event_type".into(), Avro::String(format!("Test{op}"))),
            ("op".into(), Avro::String(op.into())),
            ("key".into(), Avro::String(key.into())),
            (
                "dedup_id".into(),
                Avro::String(format!("test/{}", self.seq)),
            ),
            ("before".into(), Avro::Union(0, Box::new(Avro::Null))),
            (
                "after".into(),
                match row {
                    Some(r) => Avro::Union(1, Box::new(r)),
                    None => Avro::Union(0, Box::new(Avro::Null)),
                },
            ),
        ]);
        let body = apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        unilog::topics::frame(self.schema_id, &body)
    }

    /// Sends `value` (`None`: a tombstone) under `key` and waits for the broker.
    pub async fn send(&self, key: &str, value: Option<Vec<u8>>) {
        let mut rec = FutureRecord::<str, Vec<u8>>::to(&self.topic).key(key);
        if let Some(v) = &value {
            rec = rec.payload(v);
        }
        self.producer
            .send(rec, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {}: {e}", self.topic));
    }

    /// Hands `value` to the producer without waiting (call [`Feed::flush`]).
    pub fn send_nowait(&self, key: &str, value: Option<Vec<u8>>) {
        let mut rec = FutureRecord::<str, Vec<u8>>::to(&self.topic).key(key);
        if let Some(v) = &value {
            rec = rec.payload(v);
        }
        loop {
            match self.producer.send_result(rec) {
                Ok(_) => return,
                Err((_, back)) => {
                    rec = back;
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
    }

    /// An insert/update of `after`.
    pub async fn upsert(&mut self, key: &str, op: &str, after: Vec<(&str, Avro)>) {
        let v = self.event(key, op, Some(after));
        self.send(key, Some(v)).await;
    }

    /// A delete event (no tombstone).
    pub async fn delete(&mut self, key: &str) {
        let v = self.event(key, "delete", None);
        self.send(key, Some(v)).await;
    }

    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(30)).unwrap();
    }
}

/// A small client for checking the search server.
pub struct Search {
    pub base: String,
    pub http: reqwest::Client,
}

impl Search {
    pub fn new() -> Search {
        Search {
            base: search_url(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Json) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Json::Null))
    }

    pub async fn refresh(&self, index: &str) {
        let _ = self
            .http
            .post(format!("{}/{index}/_refresh", self.base))
            .send()
            .await;
    }

    pub async fn count(&self, index: &str) -> u64 {
        self.refresh(index).await;
        self.get(&format!("/{index}/_count")).await.1["count"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The `_source` of a document, if it exists.
    pub async fn doc(&self, index: &str, id: &str) -> Option<Json> {
        let (s, b) = self.get(&format!("/{index}/_doc/{id}")).await;
        (s == 200 && b["found"] != Json::Bool(false)).then(|| b["_source"].clone())
    }

    /// Waits until `index` holds `n` documents.
    pub async fn wait_count(&self, index: &str, n: u64, timeout: Duration) {
        let start = std::time::Instant::now();
        loop {
            let c = self.count(index).await;
            if c == n {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{index} holds {c} documents, not {n}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn delete(&self, index: &str) {
        let _ = self
            .http
            .delete(format!("{}/{index}", self.base))
            .send()
            .await;
    }
}
