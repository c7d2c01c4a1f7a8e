//! Sources: where changes come from.
//!
//! A [`Source`] hands out batches of [`ChangeEvent`]s in log order and is
//! told, through [`Source::ack`], how far downstream has durably taken them.
//! Acknowledged positions only move forward.

pub mod mongo_oplog;
pub mod pg_logical;

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use crate::event::ChangeEvent;

/// A batch of changes and the position it completes.
#[derive(Debug)]
pub struct SourceBatch<P> {
    pub events: Vec<ChangeEvent>,
    /// Set when the batch ends at least one transaction: once every event of
    /// this and earlier batches is delivered, the source may be acknowledged
    /// up to here.
    pub position: Option<P>,
}

impl<P> Default for SourceBatch<P> {
    fn default() -> Self {
        SourceBatch {
            events: Vec::new(),
            position: None,
        }
    }
}

/// A stream of changes that can be acknowledged.
pub trait Source {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Where the source can resume from (an LSN, a resume token, ...).
    type Position: Clone + Debug + std::fmt::Display + Send + 'static;

    /// The next batch: at most `max_events`, waiting at most `max_wait` once
    /// the first event arrived. May return an empty batch when idle, so the
    /// caller can check for shutdown; it is not cancelled mid-batch.
    fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> impl Future<Output = Result<SourceBatch<Self::Position>, Self::Error>> + Send;

    /// Everything up to `position` is durable downstream.
    fn ack(&mut self, position: Self::Position) -> Result<(), Self::Error>;

    /// How far behind the source's end the reader is, in bytes, when the
    /// source can tell.
    fn lag_bytes(&self) -> Option<u64> {
        None
    }

    /// Saves what was acknowledged and closes connections.
    fn shutdown(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
