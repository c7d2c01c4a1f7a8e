//! Sources: where changes come from.
//!
//! A [`Source`] hands out batches of [`ChangeEvent`]s in log order and is
//! told, through [`Source::ack`], how far downstream has durably taken them.
//! Acknowledged positions only move forward.

pub mod pg_logical;

use std::future::Future;
use std::time::Duration;

use crate::event::{ChangeEvent, Position};

/// A batch of changes and the position it completes.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub events: Vec<ChangeEvent>,
    /// Set when the batch ends at least one transaction: once every event of
    /// this and earlier batches is delivered, the source may be acknowledged
    /// up to here.
    pub position: Option<Position>,
}

/// A stream of changes that can be acknowledged.
pub trait Source {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next batch: at most `max_events`, waiting at most `max_wait` once
    /// the first event arrived. May return an empty batch when idle, so the
    /// caller can check for shutdown; it is not cancelled mid-batch.
    fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> impl Future<Output = Result<SourceBatch, Self::Error>> + Send;

    /// Everything up to `position` is durable downstream.
    fn ack(&mut self, position: Position) -> Result<(), Self::Error>;
}
