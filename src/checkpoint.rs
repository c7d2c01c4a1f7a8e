//! Local pipeline state that must survive a crash: whether the initial
//! snapshot finished for the current slot, and the last position Kafka
//! confirmed. Positions only move forward; a write is atomic (temporary file,
//! fsync, rename), so a crash leaves either the old or the new state.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::Lsn;

/// What a Postgres pipeline remembers between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgCheckpoint {
    /// The slot this state belongs to.
    pub slot: String,
    /// The slot's consistent point when it was created.
    pub slot_created_at: Option<String>,
    /// The initial snapshot of this slot was fully delivered.
    pub snapshot_complete: bool,
    /// Last commit end LSN whose events Kafka confirmed.
    pub delivered_lsn: Option<String>,
    /// The error that last stopped the pipeline, with its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl PgCheckpoint {
    /// The delivered position as an [`Lsn`].
    pub fn delivered(&self) -> Option<Lsn> {
        self.delivered_lsn.as_deref().and_then(|s| s.parse().ok())
    }
}

/// Why the checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("checkpoint {path} would move backward from {from} to {to}; refusing")]
    Backward { path: PathBuf, from: Lsn, to: Lsn },
}

/// Storage for a pipeline's checkpoint.
pub trait CheckpointStore {
    /// The saved state, or the default when none was saved.
    fn load(&self) -> Result<PgCheckpoint, CheckpointError>;
    /// Saves `state`; refuses to move `delivered_lsn` backward for the same slot.
    fn commit(&mut self, state: &PgCheckpoint) -> Result<(), CheckpointError>;
}

/// A JSON file per pipeline.
pub struct FileCheckpointStore {
    path: PathBuf,
    last: Option<PgCheckpoint>,
}

impl FileCheckpointStore {
    /// A store at `dir/<pipeline>.json`; the folder is created on first write.
    pub fn new(dir: &Path, pipeline: &str) -> Self {
        FileCheckpointStore {
            path: dir.join(format!("{pipeline}.json")),
            last: None,
        }
    }

    /// Where the state lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, reason: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Io {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}

impl CheckpointStore for FileCheckpointStore {
    fn load(&self) -> Result<PgCheckpoint, CheckpointError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| self.io(format!("unreadable ({e}); move it away to start over"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PgCheckpoint::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    fn commit(&mut self, state: &PgCheckpoint) -> Result<(), CheckpointError> {
        let previous = match &self.last {
            Some(p) => Some(p.clone()),
            None => Some(self.load()?),
        };
        if let Some(prev) = previous {
            if prev.slot == state.slot {
                if let (Some(from), Some(to)) = (prev.delivered(), state.delivered()) {
                    if to < from {
                        return Err(CheckpointError::Backward {
                            path: self.path.clone(),
                            from,
                            to,
                        });
                    }
                }
            }
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(state).map_err(|e| self.io(e))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| self.io(e))?;
            f.write_all(&body).map_err(|e| self.io(e))?;
            f.sync_all().map_err(|e| self.io(e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        self.last = Some(state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_never_moves_backward() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileCheckpointStore::new(dir.path(), "p");
        assert_eq!(store.load().unwrap(), PgCheckpoint::default());
        let mut s = PgCheckpoint {
            slot: "s".into(),
            snapshot_complete: true,
            delivered_lsn: Some("0/20".into()),
            ..Default::default()
        };
        store.commit(&s).unwrap();
        assert_eq!(FileCheckpointStore::new(dir.path(), "p").load().unwrap(), s);
        s.delivered_lsn = Some("0/10".into());
        assert!(matches!(
            store.commit(&s),
            Err(CheckpointError::Backward { .. })
        ));
        // A new slot starts over.
        s.slot = "other".into();
        store.commit(&s).unwrap();
    }
}
