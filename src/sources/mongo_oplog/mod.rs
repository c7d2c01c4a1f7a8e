//! The MongoDB source: a replica set's change streams or raw oplog, with an
//! initial copy consistent with the stream.
//!
//! ```text
//!   note start S ──▶ copy collections in _id order ──▶ stream changes after S
//!   (resume token      (resumable: last confirmed        (change streams with resumeAfter,
//!    or newest oplog    _id per collection is saved)      or a tailable find on
//!    entry)                                               local.oplog.rs with ts > S)
//! ```
//!
//! # Why the copy and the stream agree
//! The start `S` is noted (and saved) before the first document is read.
//! The copy is not a snapshot: each document is read at some time after `S`.
//! Replaying every change after `S` on top of it, in order, leaves each
//! document in its final state; a change the copy already saw is published
//! again, which is harmless for state and recognisable by its dedup id. A
//! copy interrupted by a crash goes on from the last `_id` Kafka confirmed
//! (`_id > last`, in `_id` order) with the same `S`, so nothing is copied
//! twice and nothing is skipped.
//!
//! # Progress tracking
//! Positions ([`MongoPosition`]) flow back through [`Source::ack`] only
//! after Kafka confirmed every event before them, and only then reach the
//! state file (`<state_dir>/<pipeline>.mongo.json`): the copy's last `_id`,
//! then the stream's resume token (or oplog `ts`). A restart resumes exactly
//! there. When the server no longer has that position (the oplog rolled
//! over: ChangeStreamHistoryLost, CappedPositionLost, or an oplog whose
//! oldest entry is newer than the position), `source.mongo.on_history_lost`
//! decides: stop with a message saying what was lost and what to run, or
//! copy the collections again from a new start.
//!
//! # One shape for both modes
//! [`decode`] turns change events and oplog entries into the same
//! [`decode::Change`], and [`convert`] reads documents into rows by the
//! fields the mapping declares, so the rest of unilog does not know which
//! mode ran.

pub mod convert;
pub mod decode;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, Timestamp};
use futures::{StreamExt, TryStreamExt};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::{CursorType, FullDocumentType};
use mongodb::{Client, Cursor};

use crate::checkpoint::{
    mongo_state_path, read_json, write_json, CheckpointError, MongoCheckpoint,
};
use crate::config::{
    redact_url, ConfigError, FullDocument, HistoryLostPolicy, MongoConfig, MongoMode, SnapshotMode,
};
use crate::event::{ChangeEvent, Lsn, Op, Row, SeqKey, SourceMeta, TableInfo};
use crate::mapping::spec::LoadedMapping;
use crate::sources::{Source, SourceBatch};
use crate::telemetry::{health, metrics, names, Phase};
use convert::Fit;
use decode::{Change, Kind, OplogDecoder};

/// What went wrong reading MongoDB.
#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    #[error("cannot connect to MongoDB at {url}: {reason}; check source.mongo.url, that the server is running and is a replica set member (change streams and the oplog need one)")]
    Connect {
        url: String,
        reason: String,
        transient: bool,
    },
    #[error("MongoDB: {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: Box<mongodb::error::Error>,
    },
    #[error("MongoDB: {0}")]
    Decode(String),
    #[error("{0}")]
    HistoryLost(String),
    #[error("{0}")]
    State(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Server error codes worth retrying (as the drivers' resumable set).
const RESUMABLE_CODES: [i32; 14] = [
    6, 7, 89, 91, 133, 189, 234, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];
/// ChangeStreamHistoryLost, ChangeStreamFatalError, CappedPositionLost.
const HISTORY_LOST_CODES: [i32; 3] = [286, 280, 136];

fn code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

fn transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. } => true,
        ErrorKind::Command(c) => {
            RESUMABLE_CODES.contains(&c.code) || e.contains_label("ResumableChangeStreamError")
        }
        _ => e.contains_label("RetryableWriteError"),
    }
}

impl MongoError {
    /// Whether restarting later may help: the server unreachable or a
    /// connection lost. A lost position or a bad document is not.
    pub fn is_transient(&self) -> bool {
        match self {
            MongoError::Connect { transient, .. } => *transient,
            MongoError::Read { source, .. } => transient(source),
            _ => false,
        }
    }

    fn read(what: impl Into<String>, source: mongodb::error::Error) -> Self {
        MongoError::Read {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// `t.i` of a cluster time packed as `(t << 32) | i`, for messages and
/// dead letters.
pub fn cluster_time_text(packed: u64) -> String {
    format!("{}.{}", packed >> 32, packed & 0xffff_ffff)
}

fn pack(ts: Timestamp) -> u64 {
    (u64::from(ts.time) << 32) | u64::from(ts.increment)
}

fn ts_json(ts: Timestamp) -> serde_json::Value {
    serde_json::json!({"t": ts.time, "i": ts.increment})
}

fn ts_from_json(v: &serde_json::Value) -> Option<Timestamp> {
    Some(Timestamp {
        time: u32::try_from(v.get("t")?.as_u64()?).ok()?,
        increment: u32::try_from(v.get("i")?.as_u64()?).ok()?,
    })
}

/// The time just before `ts`, so that `ts > before(ts)` includes `ts`.
fn before(ts: Timestamp) -> Timestamp {
    if ts.increment > 0 {
        Timestamp {
            time: ts.time,
            increment: ts.increment - 1,
        }
    } else {
        Timestamp {
            time: ts.time.saturating_sub(1),
            increment: u32::MAX,
        }
    }
}

fn ext(b: &Bson) -> serde_json::Value {
    b.clone().into_canonical_extjson()
}

fn from_ext(v: &serde_json::Value) -> Option<Bson> {
    Bson::try_from(v.clone()).ok()
}

fn token_doc(t: &ResumeToken) -> Option<Document> {
    match bson::serialize_to_bson(t) {
        Ok(Bson::Document(d)) => Some(d),
        _ => None,
    }
}

fn token_of(d: &Document) -> Option<ResumeToken> {
    bson::deserialize_from_bson(Bson::Document(d.clone())).ok()
}

/// Where a MongoDB pipeline can resume from.
#[derive(Clone, Debug, PartialEq)]
pub enum MongoPosition {
    /// The initial copy of `ns` is delivered up to `last_id` (all of it
    /// when `done`).
    Copy {
        ns: String,
        last_id: Option<Bson>,
        done: bool,
    },
    /// Every change up to `ts` (the change stream's `token`) is delivered.
    Stream {
        token: Option<Document>,
        ts: Timestamp,
        invalidate: bool,
    },
}

impl fmt::Display for MongoPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MongoPosition::Copy { ns, done: true, .. } => write!(f, "copy of {ns} complete"),
            MongoPosition::Copy { ns, last_id, .. } => write!(
                f,
                "copy of {ns} up to _id {}",
                last_id.as_ref().map_or("-".into(), |b| ext(b).to_string())
            ),
            MongoPosition::Stream { ts, .. } => {
                write!(f, "cluster time {}", cluster_time_text(pack(*ts)))
            }
        }
    }
}

/// Seconds of oplog behind a delivered cluster time (`t` seconds): from the
/// oplog's oldest entry to it. For `unilog status`.
pub async fn oplog_headroom_secs(url: &str, delivered_secs: u32) -> Result<i64, MongoError> {
    let redacted = redact_url(url);
    let fail = |e: mongodb::error::Error| MongoError::Connect {
        url: redacted.clone(),
        reason: e.to_string(),
        transient: transient(&e),
    };
    let mut options = mongodb::options::ClientOptions::parse(url)
        .await
        .map_err(fail)?;
    options.server_selection_timeout = Some(Duration::from_secs(5));
    let client = Client::with_options(options).map_err(fail)?;
    let oldest = client
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! {"$natural": 1})
        .projection(doc! {"ts": 1})
        .await
        .map_err(|e| MongoError::read("reading local.oplog.rs", e))?
        .and_then(|d| d.get_timestamp("ts").ok())
        .ok_or_else(|| MongoError::Decode("local.oplog.rs is empty".into()))?;
    Ok(i64::from(delivered_secs) - i64::from(oldest.time))
}

/// The collections a Mongo pipeline maps, as tables whose columns are the
/// declared fields (keyed by `db.coll`).
pub fn declared_collections(
    mappings: &[LoadedMapping],
) -> Result<HashMap<String, Arc<TableInfo>>, ConfigError> {
    let mut out = HashMap::new();
    for m in mappings {
        let Some((db, coll)) = m.spec.table.split_once('.') else {
            return Err(m.err(
                "table",
                format!(
                    "`{}` must name database and collection: `<database>.<collection>`",
                    m.spec.table
                ),
            ));
        };
        let Some(fields) = &m.spec.fields else {
            return Err(m.err(
                "table",
                "a MongoDB collection has no catalog: declare its fields under `fields:` (e.g. `_id: object_id`, `email: string`)",
            ));
        };
        if m.spec.debezium.is_some() {
            return Err(m.err(
                "debezium",
                "the Debezium envelope is for PostgreSQL tables; remove `debezium:` from this MongoDB mapping",
            ));
        }
        let table = convert::declared_table(db, coll, fields).map_err(|e| m.err("fields", e))?;
        out.insert(table.qualified(), Arc::new(table));
    }
    Ok(out)
}

/// What the source is doing.
enum Stage {
    /// Deciding between copy and stream (at start, after a re-copy).
    Start,
    Copy {
        ns: String,
        cursor: Option<Box<Cursor<Document>>>,
        last_id: Option<Bson>,
        start: Timestamp,
        copied: u64,
        /// The collection's estimated size, and when progress was last logged.
        total: u64,
        logged: Instant,
    },
    Changes(Box<ChangeStream<Document>>),
    Oplog {
        cursor: Box<Cursor<Document>>,
        decoder: OplogDecoder,
        last: Timestamp,
    },
}

/// A MongoDB replica set as a [`Source`].
pub struct MongoSource {
    client: Client,
    url: String,
    mode: MongoMode,
    snapshot: SnapshotMode,
    full_document: FullDocument,
    on_history_lost: HistoryLostPolicy,
    max_await: Duration,
    pipeline: String,
    /// Mapped collections by `db.coll`, and their copy order.
    colls: HashMap<String, Arc<TableInfo>>,
    order: Vec<String>,
    state_path: PathBuf,
    state: MongoCheckpoint,
    dirty: bool,
    last_saved: Instant,
    /// Behind a mutex only so that `&MongoSource` is `Sync` (cursors are
    /// not); it is reached through `get_mut`, never locked.
    stage: tokio::sync::Mutex<Stage>,
    /// Packed cluster time of the last delivered change (for the headroom gauge).
    delivered: Arc<AtomicU64>,
    /// Ordinal of events sharing one cluster time (change streams).
    last_ts: Timestamp,
    ordinal: u64,
    /// Collections whose copy was read to the end in this run (their
    /// completion is saved when Kafka confirms it).
    read_done: Vec<String>,
    /// How far this run has read the stream (not yet confirmed): a stream
    /// opened again in the same run (after an invalidate) goes on from here.
    read_upto: Option<MongoPosition>,
}

impl MongoSource {
    /// Connects and checks that the server is a replica set member.
    pub async fn connect(
        cfg: &MongoConfig,
        pipeline: &str,
        state_dir: &std::path::Path,
        collections: Vec<Arc<TableInfo>>,
    ) -> Result<Self, MongoError> {
        let url = redact_url(&cfg.url);
        let fail = |reason: String, transient: bool| MongoError::Connect {
            url: url.clone(),
            reason,
            transient,
        };
        let mut options = mongodb::options::ClientOptions::parse(&cfg.url)
            .await
            .map_err(|e| fail(e.to_string(), false))?;
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(Duration::from_secs(10));
        }
        options.app_name = Some(format!("unilog-{pipeline}"));
        let client = Client::with_options(options).map_err(|e| fail(e.to_string(), false))?;
        let hello = client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await
            .map_err(|e| {
                let t = transient(&e);
                fail(e.to_string(), t)
            })?;
        if hello.get_str("setName").is_err() {
            return Err(fail(
                "the server is not a replica set member (no `setName` in hello); start mongod with --replSet and rs.initiate()".into(),
                false,
            ));
        }
        let state_path = mongo_state_path(state_dir, pipeline);
        let mut state: MongoCheckpoint = read_json(&state_path)?.unwrap_or_default();
        let mode = match cfg.mode {
            MongoMode::ChangeStreams => "change_streams",
            MongoMode::Oplog => "oplog",
        };
        if state.mode.is_empty() {
            state.mode = mode.to_string();
        } else if state.mode != mode {
            return Err(MongoError::State(format!(
                "the saved state {} was written in `{}` mode, and source.mongo.mode is now `{mode}`; positions of one mode mean nothing to the other: set the mode back, or move the state file away to copy the collections again",
                state_path.display(),
                state.mode
            )));
        }
        if state.life.is_none() {
            state.life = Some(format!(
                "{}-{}",
                chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
                std::process::id()
            ));
        }
        let order: Vec<String> = collections.iter().map(|t| t.qualified()).collect();
        let delivered = state
            .delivered_ts
            .as_ref()
            .and_then(ts_from_json)
            .map_or(0, pack);
        Ok(MongoSource {
            client,
            url,
            mode: cfg.mode,
            snapshot: cfg.snapshot,
            full_document: cfg.full_document,
            on_history_lost: cfg.on_history_lost,
            max_await: Duration::from_millis(cfg.max_await_ms),
            pipeline: pipeline.to_string(),
            colls: collections
                .into_iter()
                .map(|t| (t.qualified(), t))
                .collect(),
            order,
            state_path,
            state,
            dirty: false,
            last_saved: Instant::now(),
            stage: tokio::sync::Mutex::new(Stage::Start),
            delivered: Arc::new(AtomicU64::new(delivered)),
            last_ts: Timestamp {
                time: 0,
                increment: 0,
            },
            ordinal: 0,
            read_done: Vec::new(),
            read_upto: None,
        })
    }

    /// Names this state's life, for exactly-once progress records; saves
    /// a new state file first, so the name outlives a crash.
    pub fn incarnation(&mut self) -> Result<String, MongoError> {
        if !self.state_path.exists() {
            self.save()?;
        }
        Ok(format!(
            "mongo:{}@{}",
            self.pipeline,
            self.state.life.as_deref().unwrap_or("unknown")
        ))
    }

    /// One line for `unilog check` and the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "connected to {} (replica set member); {} mode; collections {}",
            self.url,
            match self.mode {
                MongoMode::ChangeStreams => "change streams",
                MongoMode::Oplog => "oplog",
            },
            self.order.join(", ")
        )
    }

    fn save(&mut self) -> Result<(), MongoError> {
        write_json(&self.state_path, &self.state)?;
        self.dirty = false;
        self.last_saved = Instant::now();
        Ok(())
    }

    fn databases(&self) -> Vec<String> {
        let mut dbs: Vec<String> = self.colls.values().map(|t| t.database.clone()).collect();
        dbs.sort();
        dbs.dedup();
        dbs
    }

    /// The `$match` that keeps our collections' events (and the events
    /// that end or drop them).
    fn match_stage(&self) -> Document {
        let nss: Vec<Bson> = self
            .colls
            .values()
            .map(|t| Bson::Document(doc! {"db": &t.database, "coll": &t.name}))
            .collect();
        let dbs: Vec<Bson> = self.databases().into_iter().map(Bson::String).collect();
        doc! {"$match": {"$or": [
            {"ns": {"$in": nss}},
            {"operationType": "dropDatabase", "ns.db": {"$in": dbs}},
            {"operationType": "invalidate"},
        ]}}
    }

    async fn open_change_stream(
        &self,
        resume: Option<(Document, bool)>,
        at: Option<Timestamp>,
    ) -> Result<ChangeStream<Document>, MongoError> {
        let dbs = self.databases();
        let pipeline = [self.match_stage()];
        let full = match self.full_document {
            FullDocument::UpdateLookup => Some(FullDocumentType::UpdateLookup),
            FullDocument::WhenAvailable => Some(FullDocumentType::WhenAvailable),
            FullDocument::Required => Some(FullDocumentType::Required),
            FullDocument::None => None,
        };
        let resume = match resume {
            Some((d, invalidate)) => Some((
                token_of(&d).ok_or_else(|| {
                    MongoError::State(format!(
                        "the saved resume token in {} is unreadable; move the file away to copy the collections again",
                        self.state_path.display()
                    ))
                })?,
                invalidate,
            )),
            None => None,
        };
        macro_rules! configure {
            ($w:expr) => {{
                let mut w = $w.pipeline(pipeline).max_await_time(self.max_await);
                if let Some(f) = full {
                    w = w.full_document(f);
                }
                match (resume, at) {
                    (Some((t, true)), _) => w = w.start_after(t),
                    (Some((t, false)), _) => w = w.resume_after(t),
                    (None, Some(ts)) => w = w.start_at_operation_time(ts),
                    (None, None) => {}
                }
                w.await
            }};
        }
        let stream = if let [db] = dbs.as_slice() {
            let database = self.client.database(db);
            configure!(database.watch())
        } else {
            configure!(self.client.watch())
        };
        match stream {
            Ok(s) => Ok(s.with_type::<Document>()),
            Err(e) if code(&e).is_some_and(|c| HISTORY_LOST_CODES.contains(&c)) => {
                Err(MongoError::HistoryLost(e.to_string()))
            }
            Err(e) => Err(MongoError::read("opening the change stream", e)),
        }
    }

    fn oplog(&self) -> mongodb::Collection<Document> {
        self.client.database("local").collection("oplog.rs")
    }

    /// The oldest or newest oplog entry's time.
    async fn oplog_edge(&self, newest: bool) -> Result<Option<Timestamp>, MongoError> {
        let entry = self
            .oplog()
            .find_one(doc! {})
            .sort(doc! {"$natural": if newest { -1 } else { 1 }})
            .projection(doc! {"ts": 1})
            .await
            .map_err(|e| MongoError::read("reading local.oplog.rs", e))?;
        Ok(entry.and_then(|d| d.get_timestamp("ts").ok()))
    }

    async fn open_oplog(&self, after: Timestamp) -> Result<Cursor<Document>, MongoError> {
        if let Some(oldest) = self.oplog_edge(false).await? {
            if oldest > after {
                return Err(MongoError::HistoryLost(format!(
                    "the oplog's oldest entry ({}) is newer than the saved position ({})",
                    cluster_time_text(pack(oldest)),
                    cluster_time_text(pack(after))
                )));
            }
        }
        let nss: Vec<Bson> = self.order.iter().cloned().map(Bson::String).collect();
        let mut cmd_nss: Vec<Bson> = self
            .databases()
            .into_iter()
            .map(|db| Bson::String(format!("{db}.$cmd")))
            .collect();
        cmd_nss.push(Bson::String("admin.$cmd".into()));
        let filter = doc! {
            "ts": {"$gt": after},
            "$or": [{"ns": {"$in": nss}}, {"ns": {"$in": cmd_nss}}, {"op": "n"}],
        };
        self.oplog()
            .find(filter)
            .cursor_type(CursorType::TailableAwait)
            .max_await_time(self.max_await)
            .await
            .map_err(|e| match code(&e) {
                Some(c) if HISTORY_LOST_CODES.contains(&c) => {
                    MongoError::HistoryLost(e.to_string())
                }
                _ => MongoError::read("tailing local.oplog.rs", e),
            })
    }

    /// Notes where the stream will start, before the copy reads anything.
    async fn note_copy_start(&mut self) -> Result<Timestamp, MongoError> {
        if let Some(ts) = self.state.copy_started_at.as_ref().and_then(ts_from_json) {
            return Ok(ts);
        }
        let ts = match self.mode {
            MongoMode::Oplog => self.oplog_edge(true).await?.unwrap_or(Timestamp {
                time: 0,
                increment: 0,
            }),
            MongoMode::ChangeStreams => {
                let stream = self.open_change_stream(None, None).await?;
                let token = stream.resume_token().as_ref().and_then(token_doc);
                let ts = token
                    .as_ref()
                    .and_then(decode::token_time)
                    .unwrap_or(Timestamp {
                        time: u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(0),
                        increment: 0,
                    });
                self.state.copy_start_token = token.map(|t| ext(&Bson::Document(t)));
                ts
            }
        };
        self.state.copy_started_at = Some(ts_json(ts));
        self.save()?;
        Ok(ts)
    }

    /// Chooses what to do next: copy a collection, or stream.
    async fn begin(&mut self) -> Result<(), MongoError> {
        let copying = !self.state.copy_complete
            && (self.snapshot == SnapshotMode::Initial || self.state.copy_started_at.is_some());
        if copying {
            let start = self.note_copy_start().await?;
            let next = self
                .order
                .iter()
                .find(|ns| !self.state.copied.contains(ns) && !self.read_done.contains(ns))
                .cloned();
            if let Some(ns) = next {
                let last_id = match &self.state.copy_progress {
                    Some((p, id)) if *p == ns => from_ext(id),
                    _ => None,
                };
                health().set_phase(&self.pipeline, Phase::Snapshot);
                *self.stage.get_mut() = Stage::Copy {
                    ns,
                    cursor: None,
                    last_id,
                    start,
                    copied: 0,
                    total: 0,
                    logged: Instant::now(),
                };
                return Ok(());
            }
            // Everything is read; `copy_complete` is saved when Kafka
            // confirmed the last of it (see `ack`).
        }
        let (read_token, read_ts) = match &self.read_upto {
            Some(MongoPosition::Stream {
                token,
                ts,
                invalidate,
                ..
            }) => (token.clone().map(|t| (t, *invalidate)), Some(*ts)),
            _ => (None, None),
        };
        let saved_ts = read_ts.or(self.state.delivered_ts.as_ref().and_then(ts_from_json));
        let copy_ts = self.state.copy_started_at.as_ref().and_then(ts_from_json);
        let next = match self.mode {
            MongoMode::ChangeStreams => {
                let saved = read_token.or_else(|| {
                    self.state
                        .resume_token
                        .as_ref()
                        .and_then(from_ext)
                        .and_then(|b| b.as_document().cloned())
                        .map(|t| (t, self.state.token_is_invalidate))
                });
                let copy_token = self
                    .state
                    .copy_start_token
                    .as_ref()
                    .and_then(from_ext)
                    .and_then(|b| b.as_document().cloned());
                let stream = match (saved, copy_token, copy_ts) {
                    (Some(t), _, _) => self.open_change_stream(Some(t), None).await,
                    (None, Some(t), _) => self.open_change_stream(Some((t, false)), None).await,
                    (None, None, Some(ts)) => {
                        self.open_change_stream(
                            None,
                            Some(Timestamp {
                                time: ts.time,
                                increment: ts.increment.saturating_add(1),
                            }),
                        )
                        .await
                    }
                    (None, None, None) => self.open_change_stream(None, None).await,
                };
                match stream {
                    Ok(s) => Stage::Changes(Box::new(s)),
                    Err(MongoError::HistoryLost(why)) => return self.history_lost(&why),
                    Err(e) => return Err(e),
                }
            }
            MongoMode::Oplog => {
                let after = match saved_ts.or(copy_ts) {
                    Some(ts) => ts,
                    None => self.oplog_edge(true).await?.unwrap_or(Timestamp {
                        time: 0,
                        increment: 0,
                    }),
                };
                match self.open_oplog(after).await {
                    Ok(cursor) => Stage::Oplog {
                        cursor: Box::new(cursor),
                        decoder: OplogDecoder::default(),
                        last: after,
                    },
                    Err(MongoError::HistoryLost(why)) => return self.history_lost(&why),
                    Err(e) => return Err(e),
                }
            }
        };
        *self.stage.get_mut() = next;
        tracing::info!(mode = ?self.mode, "streaming changes");
        health().set_phase(&self.pipeline, Phase::Streaming);
        Ok(())
    }

    /// The saved position is gone from the server: stop, or copy again.
    fn history_lost(&mut self, why: &str) -> Result<(), MongoError> {
        *self.stage.get_mut() = Stage::Start;
        let at = self
            .state
            .delivered_ts
            .as_ref()
            .or(self.state.copy_started_at.as_ref())
            .and_then(ts_from_json)
            .map_or("-".into(), |t| cluster_time_text(pack(t)));
        match self.on_history_lost {
            HistoryLostPolicy::Stop => Err(MongoError::HistoryLost(format!(
                "the saved position (cluster time {at}) is no longer in the oplog ({why}): changes made since then cannot be read, so some are lost to this pipeline. To copy the collections again and go on, set source.mongo.on_history_lost: recopy (or move {} away) and start again; to keep this from happening, size the oplog for the longest outage (see the oplog headroom gauge)",
                self.state_path.display()
            ))),
            HistoryLostPolicy::Recopy => {
                tracing::warn!(position = %at, reason = %why, "the saved position is no longer in the oplog; copying the collections again");
                self.state = MongoCheckpoint {
                    mode: self.state.mode.clone(),
                    life: self.state.life.clone(),
                    ..MongoCheckpoint::default()
                };
                self.save()?;
                self.read_done.clear();
                self.read_upto = None;
                // A re-copy is a copy even when the first run had none.
                self.snapshot = SnapshotMode::Initial;
                Ok(())
            }
        }
    }

    async fn copy_batch(
        &mut self,
        max_events: usize,
    ) -> Result<SourceBatch<MongoPosition>, MongoError> {
        let Stage::Copy {
            ns,
            cursor,
            last_id,
            start,
            copied,
            total,
            logged,
        } = self.stage.get_mut()
        else {
            return Ok(SourceBatch::default());
        };
        let Some(table) = self.colls.get(ns.as_str()).cloned() else {
            return Err(MongoError::State(format!(
                "{ns} is not a mapped collection"
            )));
        };
        if cursor.is_none() {
            let coll = self
                .client
                .database(&table.database)
                .collection::<Document>(&table.name);
            *total = coll.estimated_document_count().await.unwrap_or(0);
            tracing::info!(collection = %ns, documents_about = *total, resumed_after = last_id.is_some(), "copying");
            let filter = match last_id {
                Some(id) => doc! {"_id": {"$gt": id.clone()}},
                None => doc! {},
            };
            let c = coll
                .find(filter)
                .sort(doc! {"_id": 1})
                .batch_size(u32::try_from(max_events).unwrap_or(1000))
                .await
                .map_err(|e| MongoError::read(format!("copying {ns}"), e))?;
            *cursor = Some(Box::new(c));
        }
        let Some(c) = cursor.as_mut() else {
            return Ok(SourceBatch::default());
        };
        let mut events = Vec::with_capacity(max_events);
        let mut done = false;
        while events.len() < max_events {
            match c.try_next().await {
                Ok(Some(d)) => {
                    let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                    let row = convert::row(&table, &d, Fit::Whole);
                    events.push(ChangeEvent {
                        table: table.clone(),
                        op: Op::Snapshot,
                        seq: SeqKey {
                            commit: Lsn(pack(*start)),
                            ordinal: *copied,
                        },
                        meta: SourceMeta {
                            lsn: Lsn(pack(*start)),
                            xid: None,
                            commit_time_micros: None,
                            relation: None,
                        },
                        before: None,
                        after: Some(row),
                        id: Some(Arc::from(format!(
                            "copy/{}/{}/{}",
                            cluster_time_text(pack(*start)),
                            table.name,
                            ext(&id)
                        ))),
                        changed: None,
                    });
                    *copied += 1;
                    *last_id = Some(id);
                }
                Ok(None) => {
                    done = true;
                    break;
                }
                Err(e) => return Err(MongoError::read(format!("copying {ns}"), e)),
            }
        }
        if logged.elapsed() >= Duration::from_secs(10) {
            #[allow(clippy::cast_precision_loss)]
            let percent = if *total > 0 {
                (*copied as f64 * 100.0 / *total as f64).min(100.0)
            } else {
                0.0
            };
            tracing::info!(collection = %ns, copied = *copied, documents_about = *total, percent = format!("{percent:.0}"), "copy progress");
            *logged = Instant::now();
        }
        #[allow(clippy::cast_precision_loss)]
        metrics().inc(
            names::SNAPSHOT_ROWS,
            &[("pipeline", self.pipeline.as_str())],
            events.len() as f64,
        );
        let position = MongoPosition::Copy {
            ns: ns.clone(),
            last_id: last_id.clone(),
            done,
        };
        if done {
            tracing::info!(collection = %ns, documents = *copied, "copy read");
            // The next collection (or the stream) starts at the next call;
            // this one's completion is saved when this batch is acknowledged.
            let ns = ns.clone();
            *self.stage.get_mut() = Stage::Start;
            self.read_done.push(ns);
        }
        Ok(SourceBatch {
            events,
            position: Some(position),
        })
    }

    /// The next batch from the change stream.
    async fn changes_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<SourceBatch<MongoPosition>, MongoError> {
        let mut changes: Vec<Change> = Vec::new();
        let mut position = None;
        let mut ended = false;
        let mut lost = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        {
            let Stage::Changes(stream) = self.stage.get_mut() else {
                return Ok(SourceBatch::default());
            };
            loop {
                let next = match deadline {
                    None => stream.next_if_any().await,
                    Some(d) => {
                        let left = d.saturating_duration_since(tokio::time::Instant::now());
                        match tokio::time::timeout(left, stream.next_if_any()).await {
                            Ok(r) => r,
                            Err(_) => break,
                        }
                    }
                };
                match next {
                    Ok(Some(ev)) => {
                        let c = decode::from_change_event(&ev).map_err(MongoError::Decode)?;
                        let invalidate = c.kind == Kind::Invalidate;
                        position = Some(MongoPosition::Stream {
                            token: c.token.clone(),
                            ts: c.ts,
                            invalidate,
                        });
                        changes.push(c);
                        if invalidate {
                            ended = true;
                            break;
                        }
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
                    }
                    Ok(None) => {
                        if !stream.is_alive() {
                            ended = true;
                        } else if changes.is_empty() {
                            // Idle: the server's high-water mark moves on.
                            if let Some(t) = stream.resume_token().as_ref().and_then(token_doc) {
                                if let Some(ts) = decode::token_time(&t) {
                                    position = Some(MongoPosition::Stream {
                                        token: Some(t),
                                        ts,
                                        invalidate: false,
                                    });
                                }
                            }
                        }
                        break;
                    }
                    Err(e) if code(&e).is_some_and(|c| HISTORY_LOST_CODES.contains(&c)) => {
                        lost = Some(e.to_string());
                        break;
                    }
                    Err(e) => return Err(MongoError::read("reading the change stream", e)),
                }
                if changes.len() >= max_events {
                    break;
                }
            }
        }
        if let Some(why) = lost {
            self.history_lost(&why)?;
            return Ok(SourceBatch::default());
        }
        if ended {
            tracing::info!(
                "the change stream ended (invalidated); opening it again after the invalidate"
            );
            *self.stage.get_mut() = Stage::Start;
        }
        let events = self.events_of(changes, HashMap::new());
        Ok(SourceBatch { events, position })
    }

    /// The next batch from the oplog.
    async fn oplog_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<SourceBatch<MongoPosition>, MongoError> {
        let mut changes: Vec<Change> = Vec::new();
        let mut position = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let wanted: Vec<String> = self.order.clone();
        let dbs = self.databases();
        let mut lost = None;
        {
            let Stage::Oplog {
                cursor,
                decoder,
                last,
            } = self.stage.get_mut()
            else {
                return Ok(SourceBatch::default());
            };
            loop {
                let wait = match deadline {
                    None => self.max_await,
                    Some(d) => d.saturating_duration_since(tokio::time::Instant::now()),
                };
                let entry = match tokio::time::timeout(wait, cursor.next()).await {
                    Err(_) => break,
                    Ok(None) => {
                        return Err(MongoError::Decode(
                            "the oplog cursor closed; it is opened again".into(),
                        ))
                    }
                    Ok(Some(Err(e)))
                        if code(&e).is_some_and(|c| HISTORY_LOST_CODES.contains(&c)) =>
                    {
                        lost = Some(e.to_string());
                        break;
                    }
                    Ok(Some(Err(e))) => return Err(MongoError::read("tailing local.oplog.rs", e)),
                    Ok(Some(Ok(d))) => d,
                };
                let decoded = decoder.decode(&entry).map_err(MongoError::Decode)?;
                if let Some(ts) = decoded.first().map(|c| c.ts) {
                    *last = ts;
                }
                for c in decoded {
                    let ours = match &c.kind {
                        Kind::Noop => false,
                        Kind::DropDatabase => dbs.contains(&c.db),
                        Kind::Rename { to } => wanted.contains(&c.ns()) || wanted.contains(to),
                        _ => wanted.contains(&c.ns()),
                    };
                    if ours {
                        changes.push(c);
                    }
                }
                // Resume from before a transaction still open, so its
                // parts are read again after a restart.
                let resume_at = decoder.oldest_open().map_or(*last, before);
                position = Some(MongoPosition::Stream {
                    token: None,
                    ts: resume_at,
                    invalidate: false,
                });
                if deadline.is_none() && !changes.is_empty() {
                    deadline = Some(tokio::time::Instant::now() + max_wait);
                }
                if changes.len() >= max_events {
                    break;
                }
            }
        }
        if let Some(why) = lost {
            self.history_lost(&why)?;
            return Ok(SourceBatch::default());
        }
        let lookups = if self.full_document == FullDocument::None {
            HashMap::new()
        } else {
            self.look_up(&changes).await?
        };
        let events = self.events_of(changes, lookups);
        Ok(SourceBatch { events, position })
    }

    /// The current documents of the batch's updates (oplog mode), by
    /// collection and `_id` (as extended JSON text).
    async fn look_up(
        &self,
        changes: &[Change],
    ) -> Result<HashMap<(String, String), Document>, MongoError> {
        let mut wanted: HashMap<String, Vec<Bson>> = HashMap::new();
        for c in changes {
            if let (Kind::Update(_), Some(id)) = (&c.kind, &c.id) {
                wanted.entry(c.ns()).or_default().push(id.clone());
            }
        }
        let mut out = HashMap::new();
        for (ns, ids) in wanted {
            let Some(t) = self.colls.get(&ns) else {
                continue;
            };
            let mut cursor = self
                .client
                .database(&t.database)
                .collection::<Document>(&t.name)
                .find(doc! {"_id": {"$in": ids}})
                .await
                .map_err(|e| {
                    MongoError::read(format!("looking up updated documents of {ns}"), e)
                })?;
            while let Some(d) = cursor
                .try_next()
                .await
                .map_err(|e| MongoError::read(format!("looking up updated documents of {ns}"), e))?
            {
                if let Some(id) = d.get("_id") {
                    out.insert((ns.clone(), ext(id).to_string()), d);
                }
            }
        }
        Ok(out)
    }

    /// Changes as events of the mapped collections.
    fn events_of(
        &mut self,
        changes: Vec<Change>,
        lookups: HashMap<(String, String), Document>,
    ) -> Vec<ChangeEvent> {
        let mut out = Vec::with_capacity(changes.len());
        for c in changes {
            let ordinal = if c.token.is_some() {
                if c.ts == self.last_ts {
                    self.ordinal += 1;
                } else {
                    self.last_ts = c.ts;
                    self.ordinal = 0;
                }
                self.ordinal
            } else {
                u64::from(c.index)
            };
            let id: Arc<str> = match &c.token {
                Some(t) => Arc::from(t.get_str("_data").map_or_else(
                    |_| format!("{}/{ordinal}", cluster_time_text(pack(c.ts))),
                    str::to_string,
                )),
                None => Arc::from(format!("{}/{}", cluster_time_text(pack(c.ts)), c.index)),
            };
            let ns = c.ns();
            let targets: Vec<Arc<TableInfo>> = match &c.kind {
                Kind::DropDatabase => self
                    .colls
                    .values()
                    .filter(|t| t.database == c.db)
                    .cloned()
                    .collect(),
                Kind::Rename { to } => {
                    if self.colls.contains_key(to) {
                        tracing::warn!(from = %ns, to = %to, "a collection was renamed onto a mapped collection; its documents are not copied: run with a new pipeline state to copy them");
                    }
                    self.colls.get(&ns).cloned().into_iter().collect()
                }
                _ => self.colls.get(&ns).cloned().into_iter().collect(),
            };
            for table in targets {
                let key_only = |id: &Option<Bson>| -> Row {
                    let mut d = Document::new();
                    if let Some(id) = id {
                        d.insert("_id", id.clone());
                    }
                    convert::row(&table, &d, Fit::Partial)
                };
                let (op, before, after, changed) = match &c.kind {
                    Kind::Insert => (
                        Op::Insert,
                        None,
                        c.full.as_ref().map(|d| convert::row(&table, d, Fit::Whole)),
                        None,
                    ),
                    Kind::Replace => (
                        Op::Update,
                        None,
                        c.full.as_ref().map(|d| convert::row(&table, d, Fit::Whole)),
                        None,
                    ),
                    Kind::Update(desc) => {
                        let looked_up =
                            c.id.as_ref()
                                .and_then(|id| lookups.get(&(ns.clone(), ext(id).to_string())));
                        let after = match c.full.as_ref().or(looked_up) {
                            Some(d) => convert::row(&table, d, Fit::Whole),
                            None => {
                                // No document (none asked for, or deleted
                                // since): the top-level fields the update
                                // set, with the key; `changed_fields` says
                                // which are real.
                                let mut d = Document::new();
                                if let Some(id) = &c.id {
                                    d.insert("_id", id.clone());
                                }
                                for (k, v) in &desc.updated {
                                    if !k.contains('.') {
                                        d.insert(k.clone(), v.clone());
                                    }
                                }
                                convert::row(&table, &d, Fit::Partial)
                            }
                        };
                        (Op::Update, None, Some(after), Some(desc.paths()))
                    }
                    Kind::Delete => (Op::Delete, Some(key_only(&c.id)), None, None),
                    Kind::Drop | Kind::Rename { .. } | Kind::DropDatabase => {
                        (Op::Truncate, None, None, None)
                    }
                    Kind::Invalidate | Kind::Noop => continue,
                };
                out.push(ChangeEvent {
                    table,
                    op,
                    seq: SeqKey {
                        commit: Lsn(pack(c.ts)),
                        ordinal,
                    },
                    meta: SourceMeta {
                        lsn: Lsn(pack(c.ts)),
                        xid: None,
                        commit_time_micros: c.wall_ms.and_then(|ms| ms.checked_mul(1000)),
                        relation: None,
                    },
                    before,
                    after,
                    id: Some(id.clone()),
                    changed,
                });
            }
        }
        out
    }

    /// Every 10 s, how much oplog lies behind the delivered position: the
    /// time between the oldest entry and that position, which is how long
    /// unilog may be stopped before its position falls off the oplog.
    pub fn headroom_monitor(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.client.clone();
        let delivered = self.delivered.clone();
        let pipeline = self.pipeline.clone();
        async move {
            let oplog = client.database("local").collection::<Document>("oplog.rs");
            loop {
                // Nothing delivered yet: nothing to measure from.
                if delivered.load(Ordering::Relaxed) == 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                let oldest = oplog
                    .find_one(doc! {})
                    .sort(doc! {"$natural": 1})
                    .projection(doc! {"ts": 1})
                    .await;
                let mut next = Duration::from_secs(10);
                match oldest {
                    Ok(Some(d)) => {
                        let at = delivered.load(Ordering::Relaxed);
                        if let (Ok(ts), true) = (d.get_timestamp("ts"), at > 0) {
                            let secs = i64::try_from(at >> 32).unwrap_or(0) - i64::from(ts.time);
                            #[allow(clippy::cast_precision_loss)]
                            metrics().set(
                                names::MONGO_OPLOG_HEADROOM_SECONDS,
                                &[("pipeline", pipeline.as_str())],
                                secs.max(0) as f64,
                            );
                        }
                    }
                    Ok(None) => next = Duration::from_secs(1),
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the oplog's oldest entry");
                        next = Duration::from_secs(1);
                    }
                }
                tokio::time::sleep(next).await;
            }
        }
    }
}

impl Source for MongoSource {
    type Error = MongoError;
    type Position = MongoPosition;

    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<SourceBatch<MongoPosition>, MongoError> {
        for _ in 0..3 {
            let stage = match self.stage.get_mut() {
                Stage::Start => 0,
                Stage::Copy { .. } => 1,
                Stage::Changes(_) => 2,
                Stage::Oplog { .. } => 3,
            };
            let batch = match stage {
                0 => {
                    self.begin().await?;
                    continue;
                }
                1 => return self.copy_batch(max_events).await,
                2 => self.changes_batch(max_events, max_wait).await?,
                _ => self.oplog_batch(max_events, max_wait).await?,
            };
            if let Some(p) = &batch.position {
                self.read_upto = Some(p.clone());
            }
            return Ok(batch);
        }
        Ok(SourceBatch::default())
    }

    fn ack(&mut self, position: MongoPosition) -> Result<(), MongoError> {
        match position {
            MongoPosition::Copy { ns, last_id, done } => {
                if done {
                    if !self.state.copied.contains(&ns) {
                        self.state.copied.push(ns);
                    }
                    self.state.copy_progress = None;
                    if self.order.iter().all(|n| self.state.copied.contains(n)) {
                        self.state.copy_complete = true;
                        tracing::info!("initial copy delivered");
                    }
                } else if let Some(id) = last_id {
                    self.state.copy_progress = Some((ns, ext(&id)));
                }
                // Copy batches are few and large: save each.
                self.save()?;
            }
            MongoPosition::Stream {
                token,
                ts,
                invalidate,
            } => {
                let prev = self.delivered.load(Ordering::Relaxed);
                if pack(ts) < prev {
                    return Ok(());
                }
                self.delivered.store(pack(ts), Ordering::Relaxed);
                if let Some(t) = token {
                    self.state.resume_token = Some(ext(&Bson::Document(t)));
                    self.state.token_is_invalidate = invalidate;
                }
                self.state.delivered_ts = Some(ts_json(ts));
                self.dirty = true;
                if self.last_saved.elapsed() >= Duration::from_secs(1) {
                    self.save()?;
                }
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<(), MongoError> {
        if self.dirty {
            self.save()?;
        }
        *self.stage.get_mut() = Stage::Start;
        Ok(())
    }
}
