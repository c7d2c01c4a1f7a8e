//! The PostgreSQL source: logical replication with `pgoutput`.
//!
//! ```text
//!   legacy app ──writes──▶ PostgreSQL ──WAL──▶ slot `unilog_<name>` (pgoutput, publication)
//!                                │                      │
//!             exported snapshot  │                      │ START_REPLICATION at the slot's
//!             (REPEATABLE READ,  │                      │ consistent point, then at the
//!              COPY per table)   ▼                      ▼ last delivered commit
//!                          SnapshotReader ──▶  PgSource::next_batch ──▶ Mapper ──▶ Kafka
//!                                                       ▲                           │
//!                                                       └──── ack(commit end LSN) ◀─┘
//! ```
//!
//! # Consistency of snapshot and stream
//! The slot is created with `CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`
//! on a replication connection, which returns the slot's consistent point
//! and the name of a snapshot of the database at exactly that point. The
//! snapshot is imported into a `REPEATABLE READ` transaction on a second
//! connection before the replication connection runs anything else, and
//! every mapped table is copied from it. Streaming then starts at the
//! consistent point: every transaction that committed before it is in the
//! snapshot, every one after it is in the stream, none in both.
//!
//! # Progress tracking
//! A position is acknowledged to the server (the slot's
//! `confirmed_flush_lsn`) only when Kafka has confirmed every event of
//! every transaction up to that commit. After a crash the server resends
//! from the last acknowledged commit, so nothing is lost; a transaction
//! whose events were delivered but not yet acknowledged is delivered again,
//! with the same dedup ids. The delivered position is also kept in a local
//! checkpoint, and the stream resumes from whichever of the two is later.

pub mod catalog;
pub mod children;
pub mod composite;
mod identity_watch;
pub mod pgoutput;
pub mod publication;
pub mod relations;
pub mod safety;
pub mod snapshot;
pub mod tls;
pub mod values;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_postgres::Client;

use crate::checkpoint::{CheckpointError, CheckpointStore, FileCheckpointStore, PgCheckpoint};
use crate::config::{redact_url, ReplicaIdentityFix, SlotLostPolicy, SnapshotMode};
use crate::event::{
    ChangeEvent, ColumnInfo, Lsn, Op, Position, Row, SeqKey, SourceKind, SourceMeta, TableInfo,
    Value,
};
use crate::sources::{Source, SourceBatch};
use catalog::{quote_ident, Catalog};
use pgoutput::{decode, pg_epoch_micros_to_unix, LogicalMessage, OldTuple, TupleData, TupleValue};
use snapshot::{CopySource, SnapshotReader};
use tls::PgUrl;

/// Session settings that make text values parse the same everywhere.
pub const SESSION_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex -c standard_conforming_strings=on";

/// What went wrong in the Postgres source.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {url}: {reason}; check source.postgres.url, that the server is running, and the user and password")]
    Connect {
        url: String,
        reason: String,
        /// The server could not be reached (worth retrying), as opposed to
        /// a refusal such as a wrong password or a missing database.
        unreachable: bool,
    },
    #[error("TLS to PostgreSQL at {url} failed: {reason}; check sslmode and sslrootcert in source.postgres.url (sslrootcert must hold the CA that signed the server's certificate, and with verify-full the URL's host must be named in that certificate)")]
    Tls { url: String, reason: String },
    #[error("PostgreSQL: {what}: {}", pg_text(source))]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: {0}")]
    Setup(String),
    #[error("PostgreSQL: {0}")]
    SlotBusy(String),
    #[error("{0}")]
    SlotLost(String),
    #[error("replication stream: {0}")]
    Replication(String),
    #[error("cannot decode a pgoutput message at {lsn}: {reason}")]
    Decode { lsn: Lsn, reason: String },
    #[error("table {table}, column `{column}`: {reason}")]
    Value {
        table: String,
        column: String,
        reason: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl PgError {
    /// Worth restarting for (connections drop; data errors do not heal).
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { unreachable, .. } => *unreachable,
            PgError::Replication(_) | PgError::SlotBusy(_) => true,
            // A dropped connection, a server shutting down, too many connections.
            PgError::Query { source, .. } => {
                source.is_closed()
                    || source.as_db_error().is_some_and(|d| {
                        let c = d.code().code();
                        c.starts_with("08") || c.starts_with("57") || c == "53300"
                    })
            }
            _ => false,
        }
    }
}

fn query_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Query { what, source }
}

/// Settings of one Postgres pipeline.
#[derive(Clone, Debug)]
pub struct PgSettings {
    pub url: String,
    pub slot: String,
    pub publication: String,
    pub snapshot: SnapshotMode,
    pub manage_publication: bool,
    pub on_slot_lost: SlotLostPolicy,
    /// The publication of `insert_only` mappings.
    pub insert_publication: String,
    /// What unilog may run on a table without a replica identity.
    pub set_replica_identity: ReplicaIdentityFix,
}

/// How a slot the pipeline streamed from went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotLoss {
    /// It no longer exists (`pg_drop_replication_slot`).
    Dropped,
    /// The server removed WAL it needed (`wal_status = 'lost'`).
    Invalidated,
}

/// The state of the current transaction in the stream.
struct Txn {
    xid: u32,
    commit: Lsn,
    commit_time_micros: i64,
    ordinal: u64,
}

/// Reads a database's changes: initial snapshot, then the replication stream.
pub struct PgSource {
    settings: PgSettings,
    client: Client,
    catalog: Catalog,
    database: String,
    repl: Option<ReplicationClient>,
    start_lsn: Lsn,
    relations: HashMap<u32, children::Rel>,
    known: HashMap<String, Arc<TableInfo>>,
    txn: Option<Txn>,
    store: FileCheckpointStore,
    state: PgCheckpoint,
    last_saved: Instant,
    dirty: bool,
    /// The server's WAL end, from data and keepalives.
    server_end: Lsn,
    acked: Lsn,
    /// The TLS version of the ordinary connection; `None`: plain TCP.
    tls: Option<String>,
    /// How each mapped table is published (from [`Self::ensure_publication`]).
    plans: Vec<safety::TablePlan>,
    /// The publications the slot reads.
    publications: Vec<String>,
    /// Mapped inheritance parents and the children seen.
    children: children::Children,
    /// New children waiting to be copied, then the copy being read.
    child_queue: Vec<children::PendingCopy>,
    child_copy: Option<(SnapshotReader, Vec<u32>)>,
    /// When the queue was last checked for copies that may start.
    child_queue_checked: Option<Instant>,
    /// Copies read, with the last position handed out before they ended:
    /// an acknowledgement past it means Kafka confirmed the copy.
    copies_done: Vec<(Lsn, Vec<u32>)>,
    /// The highest position handed out in a batch.
    emitted: Lsn,
    /// Children already warned about (not published, and why).
    warned: std::collections::HashSet<u32>,
    /// When the replica identities of the published tables were last read.
    identities_checked: Option<Instant>,
}

/// The server's own words for an error (`password authentication failed
/// for user "x"`), or the client's with its cause (`connection refused`).
pub fn pg_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(hint) = db.hint() {
            s.push_str(&format!(" (hint: {hint})"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Why a connection attempt failed, classified: TLS problems and refusals
/// are permanent, an unreachable server is worth retrying.
fn connect_error(url: &str, e: &tokio_postgres::Error) -> PgError {
    let url = redact_url(url);
    let reason = pg_text(e);
    if tls::is_tls_error(e) || (e.as_db_error().is_none() && reason.contains("TLS")) {
        return PgError::Tls { url, reason };
    }
    if let Some(db) = e.as_db_error() {
        // 28000: pg_hba.conf has no line that lets this connection in. The
        // SQLSTATE decides (server messages follow lc_messages); the English
        // text, when it is English, only narrows the hint.
        if db.code() == &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            let cert = "the server authenticates this user by a TLS client certificate: add sslcert=/path/to/client.crt&sslkey=/path/to/client.key to the URL";
            let tls = "the server accepts this user only over TLS: add sslmode=require, or better sslmode=verify-full&sslrootcert=/path/to/ca.pem, to the URL";
            let hint = if db.message().contains("client certificate") {
                cert.to_string()
            } else if db.message().contains("no encryption") {
                tls.to_string()
            } else {
                format!("the server's pg_hba.conf has no line that lets this user in from here over this kind of connection: if {tls}; if {cert}; otherwise ask for a pg_hba.conf line for this host, user and database")
            };
            return PgError::Connect {
                url,
                reason: format!("{reason}; {hint}"),
                unreachable: false,
            };
        }
    }
    PgError::Connect {
        url,
        reason,
        unreachable: e.as_db_error().is_none_or(|d| {
            let c = d.code().code();
            c.starts_with("08") || c.starts_with("57") || c == "53300"
        }),
    }
}

/// A replication-connection error; TLS failures are permanent.
fn repl_err(url: &str) -> impl Fn(PgWireError) -> PgError + '_ {
    move |e| match e {
        PgWireError::Tls(reason) => PgError::Tls {
            url: redact_url(url),
            reason,
        },
        other => PgError::Replication(other.to_string()),
    }
}

/// Opens an ordinary connection (session settings applied), with TLS as
/// the URL's `sslmode` and `sslrootcert` say.
pub async fn connect_plain(url: &str) -> Result<Client, PgError> {
    let parsed = PgUrl::parse(url).map_err(|reason| PgError::Connect {
        url: redact_url(url),
        reason,
        unreachable: false,
    })?;
    let tls = parsed.connector().map_err(|reason| PgError::Tls {
        url: redact_url(url),
        reason,
    })?;
    let (client, conn) = tokio_postgres::connect(&parsed.url, tls)
        .await
        .map_err(|e| connect_error(url, &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; SET standard_conforming_strings = on",
        )
        .await
        .map_err(query_err("setting session options"))?;
    Ok(client)
}

impl PgSource {
    /// Connects and checks that the server and role can replicate.
    pub async fn connect(
        settings: PgSettings,
        store: FileCheckpointStore,
    ) -> Result<Self, PgError> {
        let client = connect_plain(&settings.url).await?;
        let row = client
            .query_one(
                "SELECT current_database()::text, current_setting('wal_level'), current_user::text,
                        (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                        (SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl)",
                &[],
            )
            .await
            .map_err(query_err("reading server settings"))?;
        let database: String = row.get(0);
        let wal_level: String = row.get(1);
        let user: String = row.get(2);
        let can_replicate: Option<bool> = row.get(3);
        let tls: Option<String> = row.get(4);
        if wal_level != "logical" {
            return Err(PgError::Setup(format!(
                "wal_level is `{wal_level}`; set `wal_level = logical` in postgresql.conf and restart the server"
            )));
        }
        if can_replicate != Some(true) {
            return Err(PgError::Setup(format!(
                "role `{user}` may not replicate; run `ALTER ROLE {user} REPLICATION` as a superuser"
            )));
        }
        let state = store.load()?;
        let settings_publication = settings.publication.clone();
        Ok(PgSource {
            catalog: Catalog::new(&database),
            database,
            client,
            settings,
            repl: None,
            start_lsn: Lsn(0),
            relations: HashMap::new(),
            known: HashMap::new(),
            txn: None,
            store,
            state,
            last_saved: Instant::now(),
            dirty: false,
            server_end: Lsn(0),
            acked: Lsn(0),
            tls,
            plans: Vec::new(),
            publications: vec![settings_publication],
            children: children::Children::default(),
            child_queue: Vec::new(),
            child_copy: None,
            child_queue_checked: None,
            copies_done: Vec::new(),
            emitted: Lsn(0),
            warned: std::collections::HashSet::new(),
            identities_checked: None,
        })
    }

    /// WAL bytes between the server's end and the last acknowledged position.
    pub fn lag_bytes(&self) -> u64 {
        self.server_end
            .0
            .saturating_sub(self.acked.0.max(self.start_lsn.0))
    }

    /// This life of the slot: its name and the consistent point it was
    /// created at. Positions recorded in another life (the slot dropped and
    /// created again) do not apply to it.
    pub fn slot_incarnation(&self) -> String {
        format!(
            "{}@{}",
            self.state.slot,
            self.state.slot_created_at.as_deref().unwrap_or("unknown")
        )
    }

    /// How the connection is protected, for reports: `TLS (TLSv1.3)` or
    /// `plain TCP (no TLS)`.
    pub fn transport(&self) -> String {
        match &self.tls {
            Some(v) => format!("TLS ({v})"),
            None => "plain TCP (no TLS)".into(),
        }
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Reads the named tables, (schema, table), from the catalog; missing
    /// tables (and relations that are not tables) are left out of the
    /// answer, which is keyed by `schema.table`.
    pub async fn load_tables(
        &mut self,
        names: &[(String, String)],
    ) -> Result<HashMap<String, Arc<TableInfo>>, PgError> {
        let mut out = HashMap::new();
        for (schema, name) in names {
            let q = crate::event::pg_qualified(schema, name);
            if let Some(t) = self
                .catalog
                .table(&self.client, schema, name)
                .await
                .map_err(query_err(format!("reading the definition of {q}")))?
            {
                out.insert(q, Arc::new(t));
            }
        }
        self.known.clone_from(&out);
        Ok(out)
    }

    /// What the catalog says of each named relation and everything below
    /// it (partitions, inheritance children); missing ones are left out.
    pub async fn load_relations(
        &self,
        names: &[(String, String)],
    ) -> Result<HashMap<String, relations::Relation>, PgError> {
        let mut out = HashMap::new();
        for (schema, name) in names {
            let q = crate::event::pg_qualified(schema, name);
            if let Some(r) = relations::load(&self.client, schema, name)
                .await
                .map_err(query_err(format!("reading the catalog entry of {q}")))?
            {
                out.insert(q, r);
            }
        }
        Ok(out)
    }

    /// Makes the publications cover `plans` (see [`publication`]), and
    /// remembers the plans for the stream. Returns the SQL it ran (or, with
    /// `dry_run`, would run), for the log.
    pub async fn ensure_publication(
        &mut self,
        plans: Vec<safety::TablePlan>,
        dry_run: bool,
    ) -> Result<Vec<String>, PgError> {
        let changes = publication::ensure(
            &self.client,
            &self.settings.publication,
            &self.settings.insert_publication,
            &plans,
            self.settings.manage_publication,
            dry_run,
        )
        .await?;
        // Which publications the slot can read: those that existed when it
        // was created (PostgreSQL before 18 stops decoding at a publication
        // newer than the slot's position). A new slot reads both.
        let slot_exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.settings.slot],
            )
            .await
            .map_err(query_err("reading replication slots"))?
            .is_some();
        let main = self.settings.publication.clone();
        let inserts = self.settings.insert_publication.clone();
        let readable = if slot_exists {
            if self.state.slot == self.settings.slot {
                self.state
                    .publications
                    .clone()
                    .unwrap_or_else(|| vec![main.clone()])
            } else {
                vec![main.clone()]
            }
        } else {
            vec![main.clone(), inserts.clone()]
        };
        if let Some(p) = plans.iter().find(|p| p.insert_only) {
            if !readable.contains(&inserts) {
                return Err(PgError::Setup(format!(
                    "{} is mapped `insert_only`, but replication slot `{}` was created before the insert-only publication `{inserts}` existed, and PostgreSQL (before 18) stops decoding at a publication newer than the slot's position. Ways out: map the table in a pipeline of its own (its new slot reads its publications from the start), or give this pipeline a new slot: stop unilog, run `SELECT pg_drop_replication_slot('{}')`, remove {}, and start it again (every mapped table is copied again)",
                    p.qualified,
                    self.settings.slot,
                    self.settings.slot,
                    self.store.path().display()
                )));
            }
        }
        self.publications = readable;
        self.plans = plans;
        Ok(changes)
    }

    /// The publications that exist now, of the two the slot may read: what
    /// a slot created now can read.
    async fn existing_publications(&self) -> Result<Vec<String>, PgError> {
        let mut out = Vec::new();
        for name in [
            &self.settings.publication,
            &self.settings.insert_publication,
        ] {
            if publication::publication_oid(&self.client, name)
                .await?
                .is_some()
            {
                out.push(name.clone());
            }
        }
        Ok(out)
    }

    fn replication_config(&self) -> Result<ReplicationConfig, PgError> {
        let bad = |reason: String| PgError::Connect {
            url: redact_url(&self.settings.url),
            reason,
            unreachable: false,
        };
        let parsed = PgUrl::parse(&self.settings.url).map_err(bad)?;
        let pc = tokio_postgres::Config::from_str(&parsed.url).map_err(|e| bad(e.to_string()))?;
        let host = match pc.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = pc.get_ports().first().copied().unwrap_or(5432);
        let user = pc
            .get_user()
            .ok_or_else(|| bad("the URL names no user".into()))?
            .to_string();
        let password = pc
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let tls = parsed.replication_tls(&host);
        Ok(ReplicationConfig::new(
            host,
            user,
            password,
            self.database.clone(),
            self.settings.slot.clone(),
            pgwire_replication::config::Publication::from(self.publications.clone()),
        )
        .with_port(port)
        .with_options(SESSION_OPTIONS)
        .with_application_name(format!("unilog-{}", self.settings.slot))
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(8192)
        .with_tls(tls))
    }

    /// Opens the slot: creates it (with an exported snapshot) when it does
    /// not exist or the last snapshot did not finish, else resumes. Returns
    /// the snapshot to copy first, if one is needed.
    pub async fn open(
        &mut self,
        tables: &[Arc<TableInfo>],
    ) -> Result<Option<SnapshotReader>, PgError> {
        let slot = self.settings.slot.clone();
        let existing = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, plugin::text, database::text, wal_status, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(query_err("reading replication slots"))?;
        let same_slot = self.state.slot == slot;
        let mut snapshot_needed = self.settings.snapshot == SnapshotMode::Initial;
        let wal_lost = existing
            .as_ref()
            .is_some_and(|r| r.get::<_, Option<String>>(3).as_deref() == Some("lost"));
        // The slot went away under a pipeline that had streamed from it:
        // the changes since the last delivered position cannot be read any
        // more. (A slot whose initial snapshot did not finish is simply
        // started over, below.)
        let snapshot_unfinished = same_slot && !self.state.snapshot_complete;
        let loss = match &existing {
            None if same_slot && self.state.snapshot_complete => Some(SlotLoss::Dropped),
            Some(_) if wal_lost && !snapshot_unfinished => Some(SlotLoss::Invalidated),
            _ => None,
        };
        let mut existing = existing;
        if let Some(loss) = loss {
            let current: String = self
                .client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(query_err("reading the current WAL position"))?
                .get(0);
            let what = self.slot_loss_text(loss, &current);
            match self.settings.on_slot_lost {
                SlotLostPolicy::Stop => {
                    return Err(PgError::SlotLost(self.slot_loss_advice(loss, &what)));
                }
                SlotLostPolicy::Resnapshot => {
                    tracing::warn!(slot = %slot, "{what}; on_slot_lost is resnapshot: creating a new slot and copying the mapped tables again");
                    if loss == SlotLoss::Invalidated {
                        self.client
                            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                            .await
                            .map_err(query_err(format!("dropping invalidated slot {slot}")))?;
                    }
                    self.state.snapshot_complete = false;
                    snapshot_needed = true;
                    existing = None;
                }
            }
        }
        if let Some(row) = &existing {
            let plugin: Option<String> = row.get(1);
            let db: Option<String> = row.get(2);
            let active: bool = row.get(4);
            if plugin.as_deref() != Some("pgoutput")
                || db.as_deref() != Some(self.database.as_str())
            {
                return Err(PgError::Setup(format!(
                    "slot `{slot}` exists but is not a pgoutput slot of database {}; choose another source.postgres.slot",
                    self.database
                )));
            }
            if active {
                return Err(self.slot_in_use(&slot).await);
            }
            let resumable = !snapshot_needed || (same_slot && self.state.snapshot_complete);
            if resumable && wal_lost {
                return Err(PgError::Setup(format!(
                    "slot `{slot}` was invalidated by the server (WAL it needed was removed); drop it with `SELECT pg_drop_replication_slot('{slot}')` and restart unilog to take a new snapshot"
                )));
            }
            if resumable {
                let confirmed: Option<String> = row.get(0);
                let confirmed = confirmed
                    .and_then(|s| s.parse::<Lsn>().ok())
                    .unwrap_or_default();
                let local = if same_slot {
                    self.state.delivered().unwrap_or_default()
                } else {
                    Lsn(0)
                };
                self.start_lsn = confirmed.max(local);
                tracing::info!(slot = %slot, start = %self.start_lsn, "resuming from the slot");
                let cfg = self
                    .replication_config()?
                    .with_start_lsn(self.start_lsn.0.into());
                self.repl = Some(
                    ReplicationClient::connect_gated(cfg)
                        .await
                        .map_err(repl_err(&self.settings.url))?,
                );
                self.init_children(false).await?;
                return Ok(None);
            }
            tracing::warn!(slot = %slot, "the last initial snapshot did not finish; dropping the slot and starting over");
            self.client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(query_err(format!("dropping unfinished slot {slot}")))?;
        }

        // A new slot reads every publication that exists now.
        self.publications = self.existing_publications().await?;
        if self.publications.is_empty() {
            self.publications = vec![self.settings.publication.clone()];
        }
        let mut repl = ReplicationClient::connect_gated(self.replication_config()?)
            .await
            .map_err(repl_err(&self.settings.url))?;
        let mode = if snapshot_needed { "export" } else { "nothing" };
        let rows = repl
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{mode}')",
                quote_ident(&slot)
            ))
            .await
            .map_err(|e| match e {
                PgWireError::Tls(_) => repl_err(&self.settings.url)(e),
                e => PgError::Setup(format!("cannot create replication slot `{slot}`: {e}")),
            })?;
        let field = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i))
                .and_then(Option::as_ref)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let consistent: Lsn = field(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            PgError::Setup("CREATE_REPLICATION_SLOT returned no consistent point".into())
        })?;
        tracing::info!(slot = %slot, consistent_point = %consistent, "created replication slot");
        self.state = PgCheckpoint {
            slot: slot.clone(),
            slot_created_at: Some(consistent.to_string()),
            snapshot_complete: !snapshot_needed,
            delivered_lsn: Some(consistent.to_string()),
            last_error: None,
            pending_children: Vec::new(),
            publications: Some(self.publications.clone()),
        };
        self.store.commit(&self.state)?;
        self.start_lsn = consistent;
        let reader = if snapshot_needed {
            let name = field(2).ok_or_else(|| {
                PgError::Setup("CREATE_REPLICATION_SLOT exported no snapshot".into())
            })?;
            let sources = self.copy_sources(tables);
            Some(SnapshotReader::begin(&self.settings.url, &name, consistent, sources).await?)
        } else {
            None
        };
        self.repl = Some(repl);
        self.init_children(snapshot_needed).await?;
        Ok(reader)
    }

    /// What the initial snapshot reads for each mapped table: the root of
    /// a partitioned table, an inheritance parent with its children (each
    /// row with its `tableoid`) unless `children: exclude`.
    fn copy_sources(&self, tables: &[Arc<TableInfo>]) -> Vec<CopySource> {
        tables
            .iter()
            .map(|t| {
                let plan = self.plans.iter().find(|p| p.qualified == t.qualified());
                let sql = catalog::sql_name(&t.schema, &t.name);
                match plan {
                    Some(p) if p.only => CopySource {
                        table: t.clone(),
                        from: format!("ONLY {sql}"),
                        origin_of: None,
                    },
                    Some(p) if !p.children.is_empty() => CopySource {
                        table: t.clone(),
                        from: sql,
                        origin_of: Some(p.oid),
                    },
                    _ => CopySource {
                        table: t.clone(),
                        from: sql,
                        origin_of: None,
                    },
                }
            })
            .collect()
    }

    /// Why the slot is active, naming the holder. A holder that keeps the
    /// slot longer than the server's `wal_sender_timeout` (plus 10 s) is a
    /// live reader: the server ends a walsender whose client stopped
    /// answering by then, so a previous unilog that died has let go. Before
    /// that the error is worth retrying; after it, it is a definite
    /// refusal: another process runs this pipeline. (The same state folder
    /// is refused at once by the process lock.)
    async fn slot_in_use(&self, slot: &str) -> PgError {
        type Holders = std::sync::Mutex<HashMap<String, (Option<i32>, Option<String>, Instant)>>;
        static BUSY_SINCE: std::sync::LazyLock<Holders> =
            std::sync::LazyLock::new(Default::default);
        let row = self
            .client
            .query_opt(
                "SELECT s.active_pid, r.application_name::text, r.client_addr::text, r.backend_start::text,
                        (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout')
                 FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                 WHERE s.slot_name = $1",
                &[&slot],
            )
            .await;
        let Ok(Some(row)) = row else {
            return PgError::SlotBusy(format!("slot `{slot}` is in use by another process"));
        };
        let pid: Option<i32> = row.get(0);
        let app: Option<String> = row.get(1);
        let client: Option<String> = row.get(2);
        let since: Option<String> = row.get(3);
        let timeout_ms: Option<i64> = row.get(4);
        let who = format!(
            "server process {} ({}, client {}, connected since {})",
            pid.map_or_else(|| "?".into(), |p| p.to_string()),
            app.as_deref()
                .map_or("no application name".into(), |a| format!(
                    "application_name {a}"
                )),
            client.as_deref().unwrap_or("local"),
            since.as_deref().unwrap_or("?")
        );
        // wal_sender_timeout = 0: the server never ends a silent client,
        // so a holder can never be told dead: retry, never refuse.
        let bound = timeout_ms
            .filter(|t| *t > 0)
            .and_then(|t| u64::try_from(t).ok())
            .map(|t| Duration::from_millis(t) + Duration::from_secs(10));
        let held_for = {
            let mut map = BUSY_SINCE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = map
                .entry(slot.to_string())
                .or_insert((pid, since.clone(), Instant::now()));
            // Another holder (another pid, or the same pid reused later).
            if entry.0 != pid || entry.1 != since {
                *entry = (pid, since.clone(), Instant::now());
            }
            entry.2.elapsed()
        };
        if bound.is_some_and(|b| held_for > b) {
            PgError::Setup(format!(
                "slot `{slot}` is streamed by another process: {who}, for over {} s, longer than the server keeps the connection of a client that died (wal_sender_timeout): another unilog runs this pipeline (one pipeline runs in one process). Stop one of them, or give this one another `name` (or `source.postgres.slot`)",
                held_for.as_secs()
            ))
        } else {
            PgError::SlotBusy(format!(
                "slot `{slot}` is held by {who}: another unilog running this pipeline, or a previous one that died and that the server has not yet noticed (it does within wal_sender_timeout); retrying{}",
                bound.map_or_else(
                    || " (wal_sender_timeout is 0, so the server never lets go of a client that died: end that server process with pg_terminate_backend if no unilog holds it)".to_string(),
                    |b| format!(", and refusing if it still holds it after {} s", b.as_secs())
                )
            ))
        }
    }

    /// What happened to the slot, for the log and the error.
    fn slot_loss_text(&self, loss: SlotLoss, current: &str) -> String {
        let slot = &self.settings.slot;
        let how = match loss {
            SlotLoss::Dropped => "no longer exists (it was dropped)".to_string(),
            SlotLoss::Invalidated => "was invalidated by the server (wal_status = lost: the WAL it needed was removed, see max_slot_wal_keep_size)".to_string(),
        };
        let delivered = self
            .state
            .delivered_lsn
            .clone()
            .unwrap_or_else(|| "its creation".into());
        format!(
            "replication slot `{slot}`, which this pipeline streamed from, {how}; changes committed between the last delivered position {delivered} and now ({current}) cannot be read any more and were not published"
        )
    }

    /// The stop message: what happened and the commands that recover.
    fn slot_loss_advice(&self, loss: SlotLoss, what: &str) -> String {
        let slot = &self.settings.slot;
        let drop = match loss {
            SlotLoss::Dropped => String::new(),
            SlotLoss::Invalidated => format!(
                "`psql \"$PG_URL\" -c \"SELECT pg_drop_replication_slot('{slot}')\"`, then "
            ),
        };
        format!(
            "{what}. To recover, take a new snapshot of the mapped tables (consumers receive every current row again as op: snapshot events): either set `source.postgres.on_slot_lost: resnapshot` and start unilog again, or run {drop}`rm {}` and start unilog again (with `snapshot: initial`, the default, it then copies the tables)",
            self.store.path().display()
        )
    }

    /// Records that the initial snapshot was fully delivered.
    pub fn snapshot_delivered(&mut self) -> Result<(), PgError> {
        self.state.snapshot_complete = true;
        self.store.commit(&self.state)?;
        Ok(())
    }

    /// Starts streaming from the slot (after the snapshot, if any).
    pub async fn start_streaming(&mut self) -> Result<(), PgError> {
        let repl = self
            .repl
            .as_mut()
            .ok_or_else(|| PgError::Replication("the slot was not opened".into()))?;
        repl.start().await.map_err(repl_err(&self.settings.url))?;
        repl.wait_started()
            .await
            .map_err(repl_err(&self.settings.url))?;
        tracing::info!(slot = %self.settings.slot, from = %self.start_lsn, "streaming changes");
        Ok(())
    }

    /// Saves the checkpoint and closes the replication stream.
    pub async fn shutdown(&mut self) -> Result<(), PgError> {
        if self.dirty {
            self.store.commit(&self.state)?;
            self.dirty = false;
        }
        if let Some(mut repl) = self.repl.take() {
            // Give the worker a moment to send the last acknowledgement.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            if let Err(e) = repl.shutdown().await {
                tracing::debug!(error = %e, "replication stream closed with an error");
            }
        }
        Ok(())
    }

    async fn relation(&mut self, body: pgoutput::RelationBody) -> Result<(), PgError> {
        let qualified = crate::event::pg_qualified(&body.namespace, &body.name);
        let known = self.known.get(&qualified).cloned();
        let mut columns = Vec::with_capacity(body.columns.len());
        for c in &body.columns {
            let (ty, type_name) = self
                .catalog
                .resolve(&self.client, c.type_oid, c.type_modifier)
                .await
                .map_err(query_err(format!(
                    "resolving the type of {qualified}.{}",
                    c.name
                )))?;
            let nullable = known
                .as_ref()
                .and_then(|k| k.columns.iter().find(|kc| kc.name == c.name))
                .is_none_or(|kc| kc.nullable);
            // The array dimensions from the catalog: the Relation message
            // gives the type, which is the same for `int[]` and `int[][]`.
            let ty = match known
                .as_ref()
                .and_then(|k| k.columns.iter().find(|kc| kc.name == c.name))
            {
                Some(kc) if catalog::same_but_dims(&kc.ty, &ty) => kc.ty.clone(),
                _ => ty,
            };
            columns.push(ColumnInfo {
                name: c.name.clone(),
                type_name,
                ty,
                nullable,
                // The primary key from the catalog: under REPLICA IDENTITY
                // FULL the Relation message flags every column as key.
                key: known
                    .as_ref()
                    .and_then(|k| k.columns.iter().find(|kc| kc.name == c.name))
                    .is_some_and(|kc| kc.key),
            });
        }
        let info = TableInfo {
            kind: SourceKind::Postgres,
            database: self.database.clone(),
            schema: body.namespace,
            name: body.name,
            columns,
        };
        // A child of a mapped inheritance parent: published as the parent.
        if known.is_none() {
            if let Some(parent) = self.children.parent_of(&self.client, body.id).await? {
                let parent_known = self.known.get(&parent.qualified).cloned();
                let (view, projection) = self
                    .children
                    .view(&self.client, &parent, parent_known.as_ref(), &info)
                    .await?;
                let origin = Arc::new((info.schema.clone(), info.name.clone()));
                self.relations.insert(
                    body.id,
                    children::Rel {
                        table: view,
                        parse_as: Arc::new(info),
                        projection: Some(projection),
                        origin: Some(origin),
                    },
                );
                return Ok(());
            }
        }
        // Keep the same Arc while the table is unchanged, so mappers keep their plans.
        let arc = match known {
            Some(k) if *k == info => k,
            _ => Arc::new(info),
        };
        self.relations.insert(
            body.id,
            children::Rel {
                table: arc.clone(),
                parse_as: arc,
                projection: None,
                origin: None,
            },
        );
        Ok(())
    }

    fn rel_of(&self, id: u32, lsn: Lsn) -> Result<children::Rel, PgError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or_else(|| PgError::Decode {
                lsn,
                reason: format!("change for relation {id} arrived before its Relation message"),
            })
    }

    fn event(
        &mut self,
        rel: &children::Rel,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
        lsn: Lsn,
    ) -> Result<ChangeEvent, PgError> {
        let txn = self.txn.as_mut().ok_or_else(|| PgError::Decode {
            lsn,
            reason: "a change arrived outside a transaction".into(),
        })?;
        let seq = SeqKey {
            commit: txn.commit,
            ordinal: txn.ordinal,
        };
        txn.ordinal += 1;
        Ok(ChangeEvent {
            id: None,
            changed: None,
            table: rel.table.clone(),
            op,
            seq,
            meta: SourceMeta {
                lsn,
                xid: Some(txn.xid),
                commit_time_micros: Some(txn.commit_time_micros),
                relation: rel.origin.clone(),
            },
            before,
            after,
        })
    }

    async fn handle(
        &mut self,
        data: &[u8],
        lsn: Lsn,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<(), PgError> {
        let msg = decode(data).map_err(|e| PgError::Decode {
            lsn,
            reason: e.to_string(),
        })?;
        match msg {
            LogicalMessage::Relation(body) => self.relation(body).await?,
            LogicalMessage::Insert { relation_id, new } => {
                let rel = self.rel_of(relation_id, lsn)?;
                let after = rel_row(&rel, &new)?;
                out.push(self.event(&rel, Op::Insert, None, Some(after), lsn)?);
            }
            LogicalMessage::Update {
                relation_id,
                old,
                new,
            } => {
                let rel = self.rel_of(relation_id, lsn)?;
                let (before, full) = match &old {
                    Some(OldTuple::Key(t)) => (Some(rel_row(&rel, t)?), false),
                    Some(OldTuple::Full(t)) => (Some(rel_row(&rel, t)?), true),
                    None => (None, false),
                };
                let mut after = rel_row(&rel, &new)?;
                if full {
                    if let Some(b) = &before {
                        for (a, old) in after.iter_mut().zip(b) {
                            if matches!(a, Value::Unchanged) {
                                a.clone_from(old);
                            }
                        }
                    }
                }
                out.push(self.event(&rel, Op::Update, before, Some(after), lsn)?);
            }
            LogicalMessage::Delete { relation_id, old } => {
                let rel = self.rel_of(relation_id, lsn)?;
                let (OldTuple::Key(t) | OldTuple::Full(t)) = &old;
                let before = rel_row(&rel, t)?;
                out.push(self.event(&rel, Op::Delete, Some(before), None, lsn)?);
            }
            LogicalMessage::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    let rel = self.rel_of(id, lsn)?;
                    out.push(self.event(&rel, Op::Truncate, None, None, lsn)?);
                }
            }
            LogicalMessage::Begin { .. }
            | LogicalMessage::Commit { .. }
            | LogicalMessage::Origin { .. }
            | LogicalMessage::Type { .. }
            | LogicalMessage::Message { .. } => {}
        }
        Ok(())
    }
}

/// A tuple as a row of the table its events name (projected from a child
/// onto its parent's columns).
fn rel_row(rel: &children::Rel, tuple: &TupleData) -> Result<Row, PgError> {
    let row = tuple_row(&rel.parse_as, tuple)?;
    Ok(match &rel.projection {
        None => row,
        Some(p) => p
            .iter()
            .map(|&i| row.get(i).cloned().unwrap_or(Value::Null))
            .collect(),
    })
}

/// Parses a tuple's values by the table's column types.
fn tuple_row(table: &TableInfo, tuple: &TupleData) -> Result<Row, PgError> {
    if tuple.0.len() != table.columns.len() {
        return Err(PgError::Value {
            table: table.qualified(),
            column: "*".into(),
            reason: format!(
                "tuple has {} values but the relation has {} columns",
                tuple.0.len(),
                table.columns.len()
            ),
        });
    }
    let mut row = Vec::with_capacity(tuple.0.len());
    for (col, v) in table.columns.iter().zip(&tuple.0) {
        row.push(match v {
            TupleValue::Null => Value::Null,
            TupleValue::Unchanged => Value::Unchanged,
            TupleValue::Text(bytes) => parse_column(col, bytes),
            TupleValue::Binary(_) => {
                return Err(PgError::Value {
                    table: table.qualified(),
                    column: col.name.clone(),
                    reason: "binary value received although text format was requested".into(),
                })
            }
        });
    }
    Ok(row)
}

/// Parses one text value of `col`. A value that does not parse becomes
/// [`Value::Invalid`] with the reason (never the value itself), so the row
/// can go to the dead-letter topic instead of stopping the pipeline.
pub fn parse_column(col: &ColumnInfo, bytes: &[u8]) -> Value {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Value::Invalid("the value is not valid UTF-8".into());
    };
    values::parse_text(&col.ty, text).unwrap_or_else(|e| Value::Invalid(e.redacted()))
}

impl Source for PgSource {
    type Error = PgError;
    type Position = Position;

    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<SourceBatch<Position>, PgError> {
        if self.txn.is_none() {
            if let Some(events) = self.next_child_rows(max_events).await? {
                return Ok(SourceBatch {
                    events,
                    position: None,
                });
            }
        }
        let mut batch = SourceBatch::default();
        let idle_wait = Duration::from_millis(200).max(max_wait);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(tokio::time::Instant::now()),
                None => idle_wait,
            };
            let repl = self
                .repl
                .as_mut()
                .ok_or_else(|| PgError::Replication("the slot was not opened".into()))?;
            let next = match tokio::time::timeout(wait, repl.recv()).await {
                Err(_) => return Ok(batch),
                Ok(Err(e)) => return Err(repl_err(&self.settings.url)(e)),
                Ok(Ok(None)) => {
                    return Err(PgError::Replication(
                        "the server ended the replication stream".into(),
                    ))
                }
                Ok(Ok(Some(ev))) => ev,
            };
            match next {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    self.txn = Some(Txn {
                        xid,
                        commit: Lsn(final_lsn.as_u64()),
                        commit_time_micros: pg_epoch_micros_to_unix(commit_time_micros),
                        ordinal: 0,
                    });
                }
                ReplicationEvent::XLogData {
                    wal_start,
                    wal_end,
                    data,
                    ..
                } => {
                    self.server_end = self.server_end.max(Lsn(wal_end.as_u64()));
                    let before = batch.events.len();
                    self.handle(&data, Lsn(wal_start.as_u64()), &mut batch.events)
                        .await?;
                    if batch.events.len() > before && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + max_wait);
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    self.txn = None;
                    batch.position = Some(Position(Lsn(end_lsn.as_u64())));
                    self.emitted = self.emitted.max(Lsn(end_lsn.as_u64()));
                    if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + max_wait);
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    let end = Lsn(wal_end.as_u64());
                    self.server_end = self.server_end.max(end);
                    // Outside a transaction, everything the server sent up to
                    // `end` has been received: once it is delivered, the slot
                    // may move there even if none of it was ours. Without
                    // this, an idle pipeline pins the WAL that other tables
                    // and databases keep writing.
                    if self.txn.is_none() && end > self.start_lsn {
                        let pos = Position(end);
                        if batch.position.is_none_or(|p| p < pos) {
                            batch.position = Some(pos);
                            self.emitted = self.emitted.max(end);
                        }
                        if deadline.is_none() {
                            deadline = Some(tokio::time::Instant::now() + max_wait);
                        }
                    }
                }
                ReplicationEvent::Message { .. } => {}
                ReplicationEvent::StoppedAt { .. } => return Ok(batch),
            }
            if batch.events.len() >= max_events {
                return Ok(batch);
            }
        }
    }

    fn ack(&mut self, position: Position) -> Result<(), PgError> {
        if self.copies_done.iter().any(|(mark, _)| position.0 > *mark) {
            let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.copies_done)
                .into_iter()
                .partition(|(mark, _)| position.0 > *mark);
            self.copies_done = rest;
            for (_, oids) in done {
                tracing::info!(
                    tables = oids.len(),
                    "copy of new inheritance children delivered"
                );
                self.state
                    .pending_children
                    .retain(|c| !oids.contains(&c.oid));
            }
            self.store.commit(&self.state)?;
        }
        if let Some(repl) = &self.repl {
            repl.update_applied_lsn(position.0 .0.into());
        }
        self.acked = self.acked.max(position.0);
        if self.state.delivered().is_none_or(|d| d < position.0) {
            self.state.delivered_lsn = Some(position.0.to_string());
            self.dirty = true;
        }
        if self.dirty && self.last_saved.elapsed() >= Duration::from_secs(1) {
            self.store.commit(&self.state)?;
            self.dirty = false;
            self.last_saved = Instant::now();
        }
        Ok(())
    }

    fn lag_bytes(&self) -> Option<u64> {
        Some(PgSource::lag_bytes(self))
    }

    async fn shutdown(&mut self) -> Result<(), PgError> {
        PgSource::shutdown(self).await
    }
}
