//! unilog: a change-data-capture bridge from legacy databases to
//! schema-checked domain events on Kafka.
//!
//! The folders follow the data: `sources` read a database's replication
//! stream into [`event::ChangeEvent`]s, `mapping` turns them into
//! [`mapping::DomainEvent`]s by YAML rules checked against a schema
//! registry, `sinks` publish them, and `pipeline` wires the three together
//! with acknowledgements flowing back only after delivery.

pub mod checkpoint;
pub mod config;
pub mod endpoint;
pub mod event;
pub mod http;
pub mod indexer;
pub mod init;
pub mod joiner;
pub mod mapping;
pub mod pipeline;
pub mod sinks;
pub mod sources;
pub mod telemetry;
pub mod topics;
