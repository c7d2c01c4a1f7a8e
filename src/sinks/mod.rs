//! Sinks: where domain events go.
//!
//! A [`Sink`] takes a batch in order and hands back a [`Delivery`] that
//! resolves only when every record of the batch is confirmed by the
//! destination. Enqueueing is ordered (batch N's records are all handed over
//! before batch N+1's), so per-key order survives pipelining; the source is
//! acknowledged only after a batch's delivery resolved.

pub mod kafka;

use std::future::Future;
use std::pin::Pin;

use crate::mapping::DomainEvent;

/// Why a sink could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("kafka: cannot create the producer: {0}; check kafka.brokers and kafka.properties")]
    Setup(String),
    #[error("kafka: delivery to topic {topic} failed: {reason}")]
    Delivery { topic: String, reason: String },
    #[error("kafka: cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("kafka: brokers {brokers} unreachable: {reason}")]
    Unreachable { brokers: String, reason: String },
    /// The brokers refuse this client's TLS or SASL settings: retrying cannot help.
    #[error("kafka: brokers {brokers} refused the connection: {reason}")]
    Refused { brokers: String, reason: String },
    #[error("kafka: transaction failed: {reason}")]
    Transaction { reason: String },
    #[error("kafka: cannot read progress topic {topic}: {reason}")]
    Progress { topic: String, reason: String },
    /// The broker or the client refuses a record or this producer for
    /// good (classified by Kafka's error code): retrying cannot help.
    #[error("kafka: {what}: {reason}; {advice}")]
    Definite {
        what: String,
        reason: String,
        advice: String,
    },
}

impl SinkError {
    /// Worth restarting the pipeline for (nothing was acknowledged past the
    /// failed batch, so a restart re-delivers it).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SinkError::Delivery { .. }
                | SinkError::Unreachable { .. }
                | SinkError::Transaction { .. }
                | SinkError::Progress { .. }
        )
    }
}

/// Resolves when every record of one batch is confirmed.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>>;

/// A record written in the same transaction as a batch: the source
/// position the batch completes (exactly-once delivery).
#[derive(Debug, Clone)]
pub struct ProgressRecord {
    pub topic: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A destination for domain events.
pub trait Sink {
    /// Hands `batch` over in order. Returns once all records are enqueued;
    /// the returned [`Delivery`] resolves when all are confirmed.
    fn write(
        &self,
        batch: Vec<DomainEvent>,
    ) -> impl Future<Output = Result<Delivery, SinkError>> + Send;

    /// Writes `batch` and `progress` all or nothing, and returns once they
    /// are committed. Only sinks with transactions support it.
    fn write_atomic(
        &self,
        batch: Vec<DomainEvent>,
        progress: Option<ProgressRecord>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = (batch, progress);
        async {
            Err(SinkError::Setup(
                "this sink cannot write transactions (exactly-once delivery)".into(),
            ))
        }
    }
}
