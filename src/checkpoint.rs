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
    /// Inheritance children added to the publication while streaming
    /// whose copy Kafka has not confirmed yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_children: Vec<PendingChild>,
    /// The publications that existed when the slot was created, which the
    /// slot can read (`None`: a slot of an earlier version, which reads the
    /// main publication only). PostgreSQL before 18 stops decoding at a
    /// publication newer than the slot's position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publications: Option<Vec<String>>,
}

/// An inheritance child whose copy is not confirmed yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChild {
    pub oid: u32,
    pub schema: String,
    pub name: String,
}

impl PgCheckpoint {
    /// The delivered position as an [`Lsn`].
    pub fn delivered(&self) -> Option<Lsn> {
        self.delivered_lsn.as_deref().and_then(|s| s.parse().ok())
    }
}

/// What a MongoDB pipeline remembers between runs. Positions are kept as
/// canonical extended JSON, so the file stays readable and exact.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MongoCheckpoint {
    /// `change_streams` or `oplog`: positions of one mode mean nothing to the other.
    pub mode: String,
    /// Names this state's life: made when the file is first written, kept
    /// across a re-copy. Exactly-once progress records of another life
    /// (the file was moved away) do not apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub life: Option<String>,
    /// Cluster time (`{"t": .., "i": ..}`) noted before the initial copy;
    /// streaming starts just after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_started_at: Option<serde_json::Value>,
    /// Change streams: the resume token noted before the initial copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_start_token: Option<serde_json::Value>,
    /// Collections (`db.coll`) whose copy Kafka confirmed completely.
    #[serde(default)]
    pub copied: Vec<String>,
    /// The collection being copied and the last `_id` Kafka confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_progress: Option<(String, serde_json::Value)>,
    /// The initial copy of every mapped collection was delivered.
    #[serde(default)]
    pub copy_complete: bool,
    /// Change streams: the last delivered resume token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<serde_json::Value>,
    /// Whether that token is an invalidate's (reopen with `startAfter`).
    #[serde(default)]
    pub token_is_invalidate: bool,
    /// Cluster time of the last delivered change (`{"t": .., "i": ..}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_ts: Option<serde_json::Value>,
    /// The error that last stopped the pipeline, with its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Reads a JSON state file; `Ok(None)` when there is none.
pub fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, CheckpointError> {
    let io = |reason: String| CheckpointError::Io {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io(format!("unreadable ({e}); move it away to start over"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e.to_string())),
    }
}

/// Writes a JSON state file atomically: temporary file, fsync, rename.
pub fn write_json<T: Serialize>(path: &Path, state: &T) -> Result<(), CheckpointError> {
    let io = |reason: String| CheckpointError::Io {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(state).map_err(|e| io(e.to_string()))?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(e.to_string()))?;
        f.write_all(&body).map_err(|e| io(e.to_string()))?;
        f.sync_all().map_err(|e| io(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(e.to_string()))
}

/// Where a MongoDB pipeline keeps its state: `dir/<pipeline>.mongo.json`.
pub fn mongo_state_path(dir: &Path, pipeline: &str) -> PathBuf {
    dir.join(format!("{pipeline}.mongo.json"))
}

/// Why the checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("checkpoint {path} would move backward from {from} to {to}; refusing")]
    Backward { path: PathBuf, from: Lsn, to: Lsn },
    #[error("this pipeline is already running ({holder}; lock {path}): stop that process first, or give this one another `name` or `state_dir`; one pipeline runs in one process")]
    Locked { path: PathBuf, holder: String },
}

/// Storage for a pipeline's checkpoint.
pub trait CheckpointStore {
    /// The saved state, or the default when none was saved.
    fn load(&self) -> Result<PgCheckpoint, CheckpointError>;
    /// Saves `state`; refuses to move `delivered_lsn` backward for the same slot.
    fn commit(&mut self, state: &PgCheckpoint) -> Result<(), CheckpointError>;
}

/// One process per pipeline: an exclusive lock on `<dir>/<name>.lock`,
/// held for the life of the process (the system releases it when the
/// process ends, `kill -9` included). A second `unilog run` (or `join`) of
/// the same pipeline on the same state folder is refused at once, naming
/// the process that holds it, instead of tailing the same stream and
/// writing the same state files.
#[derive(Debug)]
pub struct ProcessLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl ProcessLock {
    /// Takes the lock of pipeline `name` in `dir`.
    pub fn acquire(dir: &Path, name: &str) -> Result<ProcessLock, CheckpointError> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(format!("{name}.lock"));
        let io = |reason: String| CheckpointError::Io {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(e.to_string()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(CheckpointError::Locked {
                    path: path.clone(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e.to_string())),
        }
        file.set_len(0).map_err(|e| io(e.to_string()))?;
        file.rewind().map_err(|e| io(e.to_string()))?;
        let me = format!(
            "pid {} on {}, since {}",
            std::process::id(),
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "this host".into()),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        );
        file.write_all(me.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| io(e.to_string()))?;
        Ok(ProcessLock { _file: file, path })
    }

    /// Where the lock is.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
}

impl CheckpointStore for FileCheckpointStore {
    fn load(&self) -> Result<PgCheckpoint, CheckpointError> {
        Ok(read_json(&self.path)?.unwrap_or_default())
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
        write_json(&self.path, state)?;
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
