//! The server: shared state, connections, command errors and the fields every reply carries.
//!
//! One task per connection reads a request, runs it and writes the reply; commands on one
//! connection run one at a time, as the driver sends them. All data sits behind one mutex that
//! is never held across an await: a blocking `getMore` releases it while it waits for the oplog
//! to grow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bson::{doc, spec::BinarySubtype, Binary, Bson, Document, Timestamp, Uuid};
use tokio::net::{TcpListener, TcpStream};

use crate::commands;
use crate::cursors::Cursors;
use crate::oplog::Oplog;
use crate::store::Store;
use crate::wire::{self, WireError};

/// Start-up settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Replica set name reported in hello (`setName`).
    pub set_name: String,
    /// The `host:port` hello reports as `me`, `primary` and the only entry of `hosts`: it must be
    /// the exact seed the client uses, or the driver drops the server from its topology.
    pub host: String,
    /// Cap of `local.oplog.rs`, in entries (none: unbounded).
    pub oplog_max_entries: Option<usize>,
    /// Largest `applyOps` entry of a transaction (bytes of its ops).
    pub txn_entry_bytes: usize,
}

/// A write inside a transaction: (command name, database, command).
pub type HeldWrite = (String, String, Document);

/// A command error armed by `standinFailNext`.
#[derive(Debug, Clone)]
pub struct FailPoint {
    pub command: String,
    pub error: CommandError,
}

/// Everything the commands read and write.
pub struct State {
    pub store: Store,
    pub oplog: Oplog,
    pub cursors: Cursors,
    pub fail_points: Vec<FailPoint>,
    /// Replies of executed retryable writes, by (lsid, txnNumber): a retry gets the saved reply.
    pub retried_writes: HashMap<(Uuid, i64), Document>,
    /// Open transactions, by (lsid, txnNumber): their writes, held until
    /// `commitTransaction`.
    pub transactions: HashMap<(Uuid, i64), Vec<HeldWrite>>,
    /// Transactions committed, so a retried `commitTransaction` answers ok.
    pub committed: std::collections::HashSet<(Uuid, i64)>,
}

pub struct Server {
    pub config: Config,
    state: Mutex<State>,
    next_connection_id: AtomicI64,
    next_request_id: AtomicI32,
}

impl Server {
    pub fn new(config: Config) -> Arc<Self> {
        let oplog = Oplog::new(config.oplog_max_entries);
        Arc::new(Self {
            config,
            state: Mutex::new(State {
                store: Store::default(),
                oplog,
                cursors: Cursors::default(),
                fail_points: Vec::new(),
                retried_writes: HashMap::new(),
                transactions: HashMap::new(),
                committed: std::collections::HashSet::new(),
            }),
            next_connection_id: AtomicI64::new(1),
            next_request_id: AtomicI32::new(1),
        })
    }

    /// Locks the state. A poisoned lock (a panic elsewhere) is taken over: the data is plain
    /// values, never left half-updated by an early return.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A commit that panicked left the oplog holding ops back: let
        // writes reach it again.
        if state.oplog.capturing() {
            let _ = state.oplog.end_capture();
        }
        state
    }

    /// Accepts connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let server = Arc::clone(&self);
            let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                tracing::debug!(connection = id, %peer, "connection accepted");
                if let Err(err) = server.connection(stream, id).await {
                    tracing::debug!(connection = id, error = %err, "connection closed");
                }
            });
        }
    }

    async fn connection(&self, mut stream: TcpStream, connection_id: i64) -> Result<(), WireError> {
        stream.set_nodelay(true)?;
        loop {
            let request = match wire::read_request(&mut stream).await {
                Ok(r) => r,
                Err(WireError::Closed) => return Ok(()),
                Err(e) => {
                    tracing::warn!(connection = connection_id, error = %e, "bad message, closing");
                    return Err(e);
                }
            };
            let reply = self.handle(request.command, connection_id).await;
            if request.flags & wire::MORE_TO_COME != 0 {
                continue;
            }
            let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
            wire::write_reply(&mut stream, id, request.request_id, &reply).await?;
        }
    }

    /// Runs one command and builds its reply document (`ok:1` or the error fields), with the
    /// `$clusterTime` and `operationTime` mongod adds.
    pub async fn handle(&self, command: Document, connection_id: i64) -> Document {
        let name = command.keys().next().cloned().unwrap_or_default();
        tracing::debug!(command = %name, "command");
        let armed = {
            let mut state = self.lock();
            let found = state
                .fail_points
                .iter()
                .position(|f| f.command.eq_ignore_ascii_case(&name));
            found.map(|i| state.fail_points.remove(i).error)
        };
        let result = match armed {
            Some(err) => Err(err),
            None => commands::run(self, &name, command, connection_id).await,
        };
        let mut reply = match result {
            Ok(mut body) => {
                if !body.contains_key("ok") {
                    body.insert("ok", 1.0);
                }
                body
            }
            Err(err) => {
                tracing::debug!(command = %name, code = err.code, error = %err.message, "command failed");
                err.to_document()
            }
        };
        let ts = self.lock().oplog.last_ts();
        reply.insert("$clusterTime", cluster_time(ts));
        reply.insert("operationTime", ts);
        reply
    }
}

/// `$clusterTime` with the all-zero signature of a server without keys.
pub fn cluster_time(ts: Timestamp) -> Document {
    doc! {
        "clusterTime": ts,
        "signature": {
            "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] },
            "keyId": 0_i64,
        },
    }
}

// ------------------------------------------------------------------------------------------
// errors

/// A command failure, sent as `{ok:0, errmsg, code, codeName, [errorLabels]}`.
#[derive(Debug, Clone)]
pub struct CommandError {
    pub code: i32,
    pub code_name: String,
    pub message: String,
    pub labels: Vec<String>,
}

impl CommandError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            code_name: code_name(code).to_string(),
            message: message.into(),
            labels: Vec::new(),
        }
    }

    pub fn with_label(mut self, label: &str) -> Self {
        self.labels.push(label.to_string());
        self
    }

    pub fn to_document(&self) -> Document {
        let mut d = doc! {
            "ok": 0.0,
            "errmsg": &self.message,
            "code": self.code,
            "codeName": &self.code_name,
        };
        if !self.labels.is_empty() {
            d.insert("errorLabels", self.labels.clone());
        }
        d
    }

    pub fn bad_value(m: impl Into<String>) -> Self {
        Self::new(2, m)
    }
    pub fn failed_to_parse(m: impl Into<String>) -> Self {
        Self::new(9, m)
    }
    pub fn type_mismatch(m: impl Into<String>) -> Self {
        Self::new(14, m)
    }
    pub fn illegal_operation(m: impl Into<String>) -> Self {
        Self::new(20, m)
    }
    /// NoSuchTransaction (251), labelled `TransientTransactionError` as
    /// mongod does, so a driver may retry the whole transaction.
    pub fn no_such_transaction(txn_number: i64) -> Self {
        let mut e = Self::new(
            251,
            format!(
                "Transaction with txnNumber {txn_number} has been aborted or was never started"
            ),
        );
        e.labels.push("TransientTransactionError".into());
        e
    }
    pub fn namespace_not_found(m: impl Into<String>) -> Self {
        Self::new(26, m)
    }
    pub fn path_not_viable(m: impl Into<String>) -> Self {
        Self::new(28, m)
    }
    pub fn cursor_not_found(id: i64) -> Self {
        Self::new(43, format!("cursor id {id} not found"))
    }
    pub fn no_matching_document(m: impl Into<String>) -> Self {
        Self::new(47, m)
    }
    pub fn namespace_exists(m: impl Into<String>) -> Self {
        Self::new(48, m)
    }
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            59,
            format!("no such command: '{name}' (the MongoDB stand-in implements a subset)"),
        )
    }
    pub fn immutable_field() -> Self {
        Self::new(
            66,
            "Performing an update on the path '_id' would modify the immutable field '_id'",
        )
    }
    pub fn invalid_options(m: impl Into<String>) -> Self {
        Self::new(72, m)
    }
    pub fn invalid_namespace(m: impl Into<String>) -> Self {
        Self::new(73, m)
    }
    pub fn capped_position_lost(m: impl Into<String>) -> Self {
        Self::new(136, m)
    }
    pub fn invalid_resume_token(m: impl Into<String>) -> Self {
        Self::new(260, m)
    }
    pub fn change_stream_fatal(m: impl Into<String>) -> Self {
        Self::new(280, m).with_label("NonResumableChangeStreamError")
    }
    pub fn history_lost(m: impl Into<String>) -> Self {
        Self::new(286, m).with_label("NonResumableChangeStreamError")
    }
}

/// Names of the codes the stand-in or its tests use (mongod's `error_codes.yml`).
pub fn code_name(code: i32) -> &'static str {
    match code {
        1 => "InternalError",
        2 => "BadValue",
        6 => "HostUnreachable",
        7 => "HostNotFound",
        9 => "FailedToParse",
        11 => "UserNotFound",
        14 => "TypeMismatch",
        20 => "IllegalOperation",
        26 => "NamespaceNotFound",
        28 => "PathNotViable",
        43 => "CursorNotFound",
        47 => "NoMatchingDocument",
        48 => "NamespaceExists",
        50 => "MaxTimeMSExpired",
        59 => "CommandNotFound",
        63 => "StaleShardVersion",
        66 => "ImmutableField",
        72 => "InvalidOptions",
        73 => "InvalidNamespace",
        89 => "NetworkTimeout",
        91 => "ShutdownInProgress",
        133 => "FailedToSatisfyReadPreference",
        134 => "ReadConcernMajorityNotAvailableYet",
        136 => "CappedPositionLost",
        150 => "StaleEpoch",
        189 => "PrimarySteppedDown",
        234 => "RetryChangeStream",
        237 => "CursorKilled",
        260 => "InvalidResumeToken",
        262 => "ExceededTimeLimit",
        280 => "ChangeStreamFatalError",
        286 => "ChangeStreamHistoryLost",
        9001 => "SocketException",
        10107 => "NotWritablePrimary",
        10334 => "BSONObjectTooLarge",
        11000 => "DuplicateKey",
        11600 => "InterruptedAtShutdown",
        11602 => "InterruptedDueToReplStateChange",
        13388 => "StaleConfig",
        13435 => "NotPrimaryNoSecondaryOk",
        13436 => "NotPrimaryOrSecondary",
        _ => "UnknownError",
    }
}

/// Labels mongod puts on an error of a change stream's aggregate or getMore
/// (`error_labels.cpp`): resumable for retriable/network codes, non-resumable for 280/286.
pub fn change_stream_labels(code: i32) -> Vec<String> {
    match code {
        6 | 7 | 89 | 91 | 133 | 189 | 234 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436 => {
            vec!["ResumableChangeStreamError".to_string()]
        }
        280 | 286 => vec!["NonResumableChangeStreamError".to_string()],
        _ => Vec::new(),
    }
}

/// Reads an integer argument of any numeric BSON type.
pub fn as_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        #[allow(clippy::cast_possible_truncation)]
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}
