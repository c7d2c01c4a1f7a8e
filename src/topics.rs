//! Reading unilog's own topics back: the Confluent frame, Avro decoding
//! through the registry, and the Avro-to-JSON conversion that search
//! documents and joined records are built from.
//!
//! The pipeline only writes these topics; the joiner and the indexer read
//! them, as any downstream service would. Both need the same three things,
//! so they live here once:
//! - [`unframe`] / [`frame`]: magic byte `0`, schema id as a big-endian u32,
//!   Avro binary body.
//! - [`SchemaCache`]: writer schemas fetched by id from the registry, once.
//! - [`to_json`]: an Avro value as plain JSON, walking the schema so that
//!   decimals keep their scale and timestamps become ISO-8601 text (what a
//!   search engine's `date` type parses).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use rdkafka::config::ClientConfig;
use serde_json::{json, Value as Json};

use crate::mapping::registry::{RegistryClient, RegistryError};

/// Kafka header naming the event type (as the pipeline writes it).
pub const HEADER_EVENT_TYPE: &str = "unilog.event_type";
/// Kafka header carrying the dedup id (as the pipeline writes it).
pub const HEADER_DEDUP_ID: &str = "unilog.dedup_id";

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the value is not in the Confluent wire format (magic byte 0, 4-byte schema id, Avro body): {0}")]
    NotFramed(String),
    #[error("schema id {id}: {source}")]
    Registry {
        id: u32,
        #[source]
        source: RegistryError,
    },
    #[error("schema id {id}: the registry's schema does not parse: {reason}")]
    BadSchema { id: u32, reason: String },
    #[error("schema id {id}: the Avro body does not decode with its writer schema: {reason}")]
    Decode { id: u32, reason: String },
    #[error("cannot encode the record with schema `{schema}`: {reason}")]
    Encode { schema: String, reason: String },
}

impl CodecError {
    /// Worth retrying (the registry may come back); everything else is in
    /// the data of one record and retrying cannot help.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry { source, .. } if source.is_transient())
    }
}

/// Splits a Confluent-framed value into its schema id and Avro body.
pub fn unframe(payload: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    match payload {
        [0, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [] => Err(CodecError::NotFramed("the value is empty".into())),
        [m, ..] if *m != 0 => Err(CodecError::NotFramed(format!("magic byte is {m}"))),
        _ => Err(CodecError::NotFramed(format!(
            "only {} bytes",
            payload.len()
        ))),
    }
}

/// Frames an Avro body with its schema id.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A parsed writer schema with its named types, for decoding and [`to_json`].
pub struct KnownSchema {
    pub schema: Schema,
    /// The schema's text as the registry holds it.
    pub text: String,
    names: HashMap<Name, Schema>,
}

impl KnownSchema {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<KnownSchema, String> {
        let schema = Schema::parse_str(text).map_err(|e| e.to_string())?;
        let names = ResolvedSchema::try_from(&schema)
            .map_err(|e| e.to_string())?
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        Ok(KnownSchema {
            schema,
            text: text.to_string(),
            names,
        })
    }

    /// The value as plain JSON (see [`to_json`]).
    pub fn json(&self, value: &Avro) -> Json {
        to_json(value, &self.schema, &self.names)
    }

    /// The schema's named types.
    pub fn names(&self) -> &HashMap<Name, Schema> {
        &self.names
    }

    /// Follows a named reference.
    pub fn resolve<'a>(&'a self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.names.get(name).unwrap_or(s),
            other => other,
        }
    }
}

/// Writer schemas by id, fetched from the registry once each.
pub struct SchemaCache {
    registry: RegistryClient,
    schemas: HashMap<u32, std::sync::Arc<KnownSchema>>,
}

impl SchemaCache {
    /// An empty cache in front of `registry`.
    pub fn new(registry: RegistryClient) -> SchemaCache {
        SchemaCache {
            registry,
            schemas: HashMap::new(),
        }
    }

    /// The registry client.
    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The schema registered under `id`.
    pub async fn get(&mut self, id: u32) -> Result<std::sync::Arc<KnownSchema>, CodecError> {
        if let Some(s) = self.schemas.get(&id) {
            return Ok(s.clone());
        }
        let text = self
            .registry
            .schema_by_id(id)
            .await
            .map_err(|source| CodecError::Registry { id, source })?;
        let known = std::sync::Arc::new(
            KnownSchema::parse(&text).map_err(|reason| CodecError::BadSchema { id, reason })?,
        );
        self.schemas.insert(id, known.clone());
        Ok(known)
    }

    /// Decodes a framed value: its writer schema and Avro value.
    pub async fn decode(
        &mut self,
        payload: &[u8],
    ) -> Result<(std::sync::Arc<KnownSchema>, Avro), CodecError> {
        let (id, mut body) = unframe(payload)?;
        let schema = self.get(id).await?;
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema.schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(|e| CodecError::Decode {
                id,
                reason: e.to_string(),
            })?;
        if !body.is_empty() {
            return Err(CodecError::Decode {
                id,
                reason: format!("{} bytes left after the record", body.len()),
            });
        }
        Ok((schema, value))
    }
}

/// Decimal bytes (two's complement, big-endian) as text with `scale` digits.
fn decimal_text(bytes: &[u8], scale: usize) -> String {
    if bytes.len() > 16 {
        return format!(
            "0x{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
    let mut v: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for b in bytes {
        v = (v << 8) | i128::from(*b);
    }
    let digits = v.unsigned_abs().to_string();
    let sign = if v < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

fn micros_text(micros: i64, zone: bool) -> Json {
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) if zone => json!(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        Some(t) => json!(t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
        None => json!(micros),
    }
}

/// An Avro value as plain JSON: unions unwrapped, decimals as exact text,
/// timestamps and dates as ISO-8601 text, bytes as hex, records as objects.
pub fn to_json(value: &Avro, schema: &Schema, names: &HashMap<Name, Schema>) -> Json {
    let schema = match schema {
        Schema::Ref { name } => names.get(name).unwrap_or(schema),
        s => s,
    };
    match (value, schema) {
        (Avro::Union(i, inner), Schema::Union(u)) => {
            let idx = usize::try_from(*i).unwrap_or(usize::MAX);
            match u.variants().get(idx) {
                Some(s) => to_json(inner, s, names),
                None => to_json(inner, &Schema::Null, names),
            }
        }
        (Avro::Union(_, inner), s) => to_json(inner, s, names),
        (Avro::Null, _) => Json::Null,
        (Avro::Boolean(b), _) => json!(b),
        (Avro::Int(i) | Avro::TimeMillis(i), _) => json!(i),
        (Avro::Long(i) | Avro::TimeMicros(i), _) => json!(i),
        (Avro::Date(d), _) => chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163)
            .map_or_else(|| json!(d), |x| json!(x.format("%Y-%m-%d").to_string())),
        (Avro::TimestampMicros(m), _) => micros_text(*m, true),
        (Avro::TimestampMillis(m), _) => micros_text(m.saturating_mul(1000), true),
        (Avro::LocalTimestampMicros(m), _) => micros_text(*m, false),
        (Avro::LocalTimestampMillis(m), _) => micros_text(m.saturating_mul(1000), false),
        (Avro::Float(f), _) => json!(f),
        (Avro::Double(f), _) => json!(f),
        (Avro::String(s) | Avro::Enum(_, s), _) => json!(s),
        (Avro::Uuid(u), _) => json!(u.to_string()),
        (Avro::Decimal(d), s) => {
            let scale = match s {
                Schema::Decimal(ds) => ds.scale,
                _ => 0,
            };
            let bytes: Vec<u8> = d.try_into().unwrap_or_default();
            json!(decimal_text(&bytes, scale))
        }
        (Avro::Bytes(b) | Avro::Fixed(_, b), _) => {
            json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
        }
        (Avro::Array(items), Schema::Array(a)) => {
            Json::Array(items.iter().map(|v| to_json(v, &a.items, names)).collect())
        }
        (Avro::Map(m), Schema::Map(ms)) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), to_json(v, &ms.types, names)))
                .collect(),
        ),
        (Avro::Record(fields), Schema::Record(rs)) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| {
                    let fs = rs
                        .lookup
                        .get(k)
                        .and_then(|i| rs.fields.get(*i))
                        .map_or(&Schema::Null, |f| &f.schema);
                    (k.clone(), to_json(v, fs, names))
                })
                .collect(),
        ),
        (other, _) => json!(format!("{other:?}")),
    }
}

/// librdkafka settings for a consumer of unilog's topics: manual commits,
/// `read_committed` (so aborted transactions are never seen), start from
/// the beginning when the group has no offset yet.
pub fn consumer_config(
    brokers: &str,
    group: &str,
    properties: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("client.id", "unilog")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "range")
        .set("socket.keepalive.enable", "true");
    for (k, v) in properties {
        cfg.set(k, v);
    }
    cfg
}

/// The partition count of `topic`, or `None` when it does not exist.
pub fn partition_count<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, rdkafka::error::KafkaError> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
}

/// Exponential backoff with jitter: `initial`, doubling, capped at `max`,
/// each multiplied by a random factor in 0.75..1.25.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    use rand::Rng;
    let factor = f64::from(1u32 << attempt.min(16));
    let base = (initial.as_secs_f64() * factor).min(max.as_secs_f64());
    Duration::from_secs_f64(base * rand::rng().random_range(0.75..1.25))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let f = frame(258, b"abc");
        assert_eq!(f, vec![0, 0, 0, 1, 2, b'a', b'b', b'c']);
        assert_eq!(unframe(&f).unwrap(), (258, &b"abc"[..]));
        assert!(unframe(&[]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 1]).is_err());
        assert!(unframe(&[0, 0, 1]).is_err());
    }

    #[test]
    fn decimals_keep_their_scale() {
        assert_eq!(decimal_text(&[0x04, 0xd2], 2), "12.34");
        assert_eq!(decimal_text(&[0xfb, 0x2e], 2), "-12.34");
        assert_eq!(decimal_text(&[0x05], 3), "0.005");
        assert_eq!(decimal_text(&[0x05], 0), "5");
    }

    #[test]
    fn json_unwraps_unions_and_renders_times() {
        let k = KnownSchema::parse(
            r#"{"type":"record","name":"R","fields":[
                {"name":"a","type":["null","string"]},
                {"name":"t","type":["null",{"type":"long","logicalType":"timestamp-micros"}]},
                {"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":6,"scale":2}},
                {"name":"n","type":{"type":"array","items":"long"}}]}"#,
        )
        .unwrap();
        let v = Avro::Record(vec![
            (
                "a".into(),
                Avro::Union(1, Box::new(Avro::String("x".into()))),
            ),
            (
                "t".into(),
                Avro::Union(1, Box::new(Avro::TimestampMicros(1_000_000))),
            ),
            ("d".into(), Avro::Decimal(vec![0x04, 0xd2].into())),
            ("n".into(), Avro::Array(vec![Avro::Long(1)])),
        ]);
        assert_eq!(
            k.json(&v),
            json!({"a": "x", "t": "1970-01-01T00:00:01Z", "d": "12.34", "n": [1]})
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let a = backoff(0, Duration::from_millis(100), Duration::from_secs(5));
        let b = backoff(10, Duration::from_millis(100), Duration::from_secs(5));
        assert!(a <= Duration::from_millis(125), "{a:?}");
        assert!(
            b <= Duration::from_millis(6250) && b >= Duration::from_millis(3750),
            "{b:?}"
        );
    }
}
