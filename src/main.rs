//! The `unilog` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::Instrument;

use unilog::checkpoint::{
    mongo_state_path, read_json, write_json, CheckpointStore, FileCheckpointStore, MongoCheckpoint,
};
use unilog::config::LoadedConfig;
use unilog::indexer::config::LoadedIndexerConfig;
use unilog::mapping::registry::RegistryClient;
use unilog::mapping::spec::LoadedMapping;
use unilog::pipeline;
use unilog::sources::pg_logical::connect_plain;
use unilog::telemetry::{self, LogFormat};

/// unilog turns a legacy database's own replication stream into domain
/// events on Kafka, without touching the application.
///
/// It reads PostgreSQL logical replication (pgoutput) or a MongoDB replica
/// set's change streams or oplog, maps row and document changes to domain
/// events by YAML mappings, checks their Avro schemas against a
/// Confluent-compatible schema registry, and publishes them on Kafka topics
/// in the Confluent wire format. Positions are saved only after Kafka
/// confirmed the events, so a crash loses nothing.
///
/// Secrets belong in the environment: config files may say ${VAR} or
/// ${VAR:-default}.
#[derive(Parser)]
#[command(name = "unilog", version, max_term_width = 100)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until SIGINT or SIGTERM: initial snapshot (first run
    /// only), then stream changes. Stops cleanly, acknowledging what Kafka
    /// confirmed.
    Run {
        /// The pipeline file (see config/demo.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a pipeline without writing anything: config and mapping
    /// files, database settings and role (PostgreSQL) or replica set
    /// (MongoDB), tables and columns named by the mappings, schema
    /// compatibility with the registry, Kafka connectivity. Exits 2 with
    /// the reasons when something is wrong.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Build a derived stream from two topics: every change on either side
    /// re-emits the joined record of its key, exactly once (Kafka
    /// transactions), with state restored from a changelog topic.
    Join {
        /// The joiner file (see config/examples/join/join.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Keep search indexes in step with topics: `_bulk` with the record key
    /// as document id and the offset as an external version, deletes for
    /// delete events and tombstones, refused documents to a dead-letter
    /// topic. Serves `/search/<alias>?q=...` when `http.listen` is set.
    Index {
        /// The indexer file (see config/examples/index/index.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rebuild an index by replaying its topic into a new versioned index,
    /// then swap the alias atomically (blue/green).
    Reindex {
        /// The indexer file.
        #[arg(long, short)]
        config: PathBuf,
        /// The alias to rebuild (default: the file's only one).
        #[arg(long)]
        alias: Option<String>,
        /// Keep the previous index after the swap.
        #[arg(long)]
        keep_old: bool,
        /// Seconds to go on replaying into the new index after the swap, for
        /// writes the live indexer had in flight to the old one.
        #[arg(long, default_value_t = 10)]
        settle_secs: u64,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Write a pipeline file and one mapping per table from a PostgreSQL
    /// catalog: topics, event names and keys from primary keys or unique
    /// indexes. Partitions and inheritance children are covered by the
    /// table above them. Prints, in one list, what each table still needs
    /// decided (no key, no usable replica identity, a relation that cannot
    /// be published, a refused type); those mappings are written but left
    /// commented out in the pipeline file, so `check` accepts the rest.
    Init(unilog::init::InitOptions),
    /// Show a pipeline's delivered position: for PostgreSQL its replication
    /// slot, lag and retained WAL; for MongoDB its copy progress and
    /// cluster time.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How long a stop may take to drain before the process exits anyway.
const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).await,
            Command::Index { config } => index(config).await,
            Command::Join { config } => join(config).await,
            Command::Reindex {
                config,
                alias,
                keep_old,
                settle_secs,
                no_progress,
            } => {
                reindex(
                    config,
                    alias,
                    keep_old,
                    std::time::Duration::from_secs(settle_secs),
                    !no_progress,
                )
                .await
            }
            Command::Init(opts) => match unilog::init::init(&opts).await {
                Ok(report) => {
                    print!("{}", unilog::init::summary(&report));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(match e {
                        unilog::init::InitError::Usage(_) => 2,
                        _ => 1,
                    })
                }
            },
            Command::Status { config, json } => match status(config, json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            },
        }
    })
}

fn load(config: &std::path::Path) -> Result<LoadedConfig, ExitCode> {
    LoadedConfig::load(config).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

async fn run(config: PathBuf) -> ExitCode {
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; draining and acknowledging");
        flag.store(true, Ordering::Relaxed);
        // A stop must end: if Kafka does not confirm within the bound, exit
        // without acknowledging the rest (it is delivered again at the next start).
        tokio::select! {
            () = wait_for_signal() => {
                tracing::warn!("second stop request; exiting without draining");
            }
            () = tokio::time::sleep(SHUTDOWN_BOUND) => {
                tracing::error!(seconds = SHUTDOWN_BOUND.as_secs(), "could not drain within the shutdown bound; exiting without acknowledging the rest");
            }
        }
        std::process::exit(130);
    });
    if let Some(http) = cfg.config.http.clone() {
        let Ok(addr) = http.listen.parse() else {
            eprintln!("error: http.listen `{}` is not an address", http.listen);
            return ExitCode::from(2);
        };
        let stall = std::time::Duration::from_secs(http.stall_timeout_secs);
        tokio::spawn(async move {
            if let Err(e) = unilog::http::serve(addr, stall).await {
                tracing::error!(error = %e, address = %addr, "cannot serve /metrics, /health and /ready");
            }
        });
    }
    let span = tracing::info_span!("pipeline", pipeline = %cfg.config.name);
    // Transient failures (a server down for a while) restart the pipeline
    // with backoff: positions are durable, so it resumes where Kafka's last
    // confirmation left it. Anything else stops with the reason.
    // One process per pipeline: the lock is held across restarts, so no
    // other process takes the pipeline (and its state files) meanwhile.
    let lock = match pipeline::lock(&cfg) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!(error = %e, "pipeline stopped");
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut attempt = 0u32;
    loop {
        let started = std::time::Instant::now();
        let result = pipeline::run_locked(&cfg, stop.clone(), &lock)
            .instrument(span.clone())
            .await;
        match result {
            Ok(stats) => {
                tracing::info!(
                    events = stats.events_published,
                    snapshot_rows = stats.snapshot_rows,
                    "exiting"
                );
                return ExitCode::SUCCESS;
            }
            Err(e) if e.is_transient() && !stop.load(Ordering::Relaxed) => {
                if started.elapsed() > std::time::Duration::from_secs(60) {
                    attempt = 0;
                }
                attempt += 1;
                let delay = backoff(attempt);
                tracing::warn!(error = %e, attempt, retry_in_secs = delay.as_secs_f64(), "pipeline failed; retrying");
                unilog::telemetry::health().failed(&cfg.config.name, &e.to_string());
                record_error(&cfg, &e.to_string());
                let until = std::time::Instant::now() + delay;
                while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                if stop.load(Ordering::Relaxed) {
                    return ExitCode::SUCCESS;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "pipeline stopped");
                unilog::telemetry::health().failed(&cfg.config.name, &e.to_string());
                record_error(&cfg, &e.to_string());
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
}

/// A stop flag set by SIGINT/SIGTERM; a second signal exits at once.
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; finishing the current batch");
        flag.store(true, Ordering::Relaxed);
        tokio::select! {
            () = wait_for_signal() => tracing::warn!("second stop request; exiting"),
            () = tokio::time::sleep(SHUTDOWN_BOUND) => tracing::error!("could not stop within the shutdown bound; exiting"),
        }
        std::process::exit(130);
    });
    stop
}

fn load_indexer(config: &std::path::Path) -> Result<Arc<LoadedIndexerConfig>, ExitCode> {
    LoadedIndexerConfig::load(config)
        .map(Arc::new)
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(2)
        })
}

async fn join(config: PathBuf) -> ExitCode {
    let cfg = match unilog::joiner::config::LoadedJoinerConfig::load(&config) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = stop_on_signal();
    let span = tracing::info_span!("joiner", joiner = %cfg.config.name);
    retrying(
        "joiner",
        &cfg.config.name,
        &stop,
        || unilog::joiner::run(cfg.clone(), stop.clone()).instrument(span.clone()),
        |e| e.is_transient(),
        |e| if e.is_setup() { 2 } else { 1 },
    )
    .await
}

/// Runs a companion command until it ends: transient failures are retried
/// with backoff (reset after a minute of running), anything else stops
/// with the reason and `exit_code`.
async fn retrying<T, E, Fut>(
    what: &str,
    name: &str,
    stop: &AtomicBool,
    mut run: impl FnMut() -> Fut,
    transient: impl Fn(&E) -> bool,
    exit_code: impl Fn(&E) -> u8,
) -> ExitCode
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut attempt = 0u32;
    loop {
        let started = std::time::Instant::now();
        match run().await {
            Ok(_) => return ExitCode::SUCCESS,
            Err(e) if transient(&e) && !stop.load(Ordering::Relaxed) => {
                if started.elapsed() > std::time::Duration::from_secs(60) {
                    attempt = 0;
                }
                attempt += 1;
                let delay = backoff(attempt);
                tracing::warn!(error = %e, attempt, retry_in_secs = delay.as_secs_f64(), "{what} failed; retrying");
                unilog::telemetry::health().failed(name, &e.to_string());
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} stopped");
                eprintln!("error: {e}");
                return ExitCode::from(exit_code(&e));
            }
        }
    }
}

async fn index(config: PathBuf) -> ExitCode {
    let cfg = match load_indexer(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stop = stop_on_signal();
    if let Some(h) = cfg.config.http.clone() {
        let Ok(addr) = h.listen.parse() else {
            eprintln!("error: http.listen `{}` is not an address", h.listen);
            return ExitCode::from(2);
        };
        let c = &cfg.config;
        let state = if h.search {
            match unilog::indexer::search::SearchClient::from_config(&c.search) {
                Ok(search) => Some(unilog::indexer::http::SearchState {
                    search,
                    aliases: c.indexes.iter().map(|i| i.alias.clone()).collect(),
                    default_size: h.default_size,
                }),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        } else {
            None
        };
        tokio::spawn(async move {
            if let Err(e) =
                unilog::indexer::http::serve(addr, state, std::time::Duration::from_secs(60)).await
            {
                tracing::error!(error = %e, address = %addr, "cannot serve the http endpoint");
            }
        });
    }
    let span = tracing::info_span!("indexer", indexer = %cfg.config.name);
    retrying(
        "indexer",
        &cfg.config.name,
        &stop,
        || unilog::indexer::run(cfg.clone(), stop.clone()).instrument(span.clone()),
        unilog::indexer::IndexError::is_transient,
        |e| {
            if matches!(
                e,
                unilog::indexer::IndexError::Config(_) | unilog::indexer::IndexError::Usage(_)
            ) {
                2
            } else {
                1
            }
        },
    )
    .await
}

async fn reindex(
    config: PathBuf,
    alias: Option<String>,
    keep_old: bool,
    settle: std::time::Duration,
    progress: bool,
) -> ExitCode {
    let cfg = match load_indexer(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let alias = match (alias, cfg.config.indexes.as_slice()) {
        (Some(a), _) => a,
        (None, [only]) => only.alias.clone(),
        (None, many) => {
            eprintln!(
                "error: {} has {} indexes; name one with --alias ({})",
                config.display(),
                many.len(),
                many.iter()
                    .map(|i| i.alias.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return ExitCode::from(2);
        }
    };
    let opts = unilog::indexer::reindex::ReindexOptions {
        alias,
        keep_old,
        settle,
        progress: progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    match unilog::indexer::reindex::reindex(cfg, &opts).await {
        Ok(r) => {
            println!(
                "reindexed {} records into {} (indexed {}, deleted {}, stale {}, dead-lettered {}); alias {} now points to it",
                r.records, r.index, r.stats.indexed, r.stats.deleted, r.stats.stale, r.stats.dead_lettered, opts.alias
            );
            if !r.previous.is_empty() {
                println!(
                    "previous index {}: {}",
                    r.previous.join(", "),
                    if r.dropped_previous {
                        "dropped"
                    } else {
                        "kept"
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(
                if matches!(
                    e,
                    unilog::indexer::IndexError::Config(_) | unilog::indexer::IndexError::Usage(_)
                ) {
                    2
                } else {
                    1
                },
            )
        }
    }
}

/// Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... up to 30 s.
fn backoff(attempt: u32) -> std::time::Duration {
    use rand::Rng;
    let base = 0.5 * f64::from(1u32 << attempt.min(6).saturating_sub(1));
    let capped = base.min(30.0);
    std::time::Duration::from_secs_f64(capped * rand::rng().random_range(0.75..1.25))
}

/// Keeps the last error in the pipeline's checkpoint, for `unilog status`.
fn record_error(cfg: &LoadedConfig, error: &str) {
    let stamped = format!(
        "{}: {error}",
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    );
    if cfg.postgres().is_none() {
        let path = mongo_state_path(&cfg.state_dir(), &cfg.config.name);
        if let Ok(Some(mut state)) = read_json::<MongoCheckpoint>(&path) {
            state.last_error = Some(stamped);
            if let Err(e) = write_json(&path, &state) {
                tracing::warn!(error = %e, "cannot record the error in the state file");
            }
        }
        return;
    }
    let mut store = FileCheckpointStore::new(&cfg.state_dir(), &cfg.config.name);
    if let Ok(mut state) = store.load() {
        state.last_error = Some(stamped);
        if let Err(e) = store.commit(&state) {
            tracing::warn!(error = %e, "cannot record the error in the checkpoint");
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn check(config: PathBuf) -> ExitCode {
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match pipeline::check(&cfg).await {
        Ok(report) => {
            for line in report {
                println!("ok  {line}");
            }
            println!("{}: ready to run", config.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn status(config: PathBuf, json: bool) -> anyhow::Result<()> {
    let cfg = LoadedConfig::load(&config)?;
    let Some(pg) = cfg.postgres() else {
        return mongo_status(&cfg, json).await;
    };
    let store = FileCheckpointStore::new(&cfg.state_dir(), &cfg.config.name);
    let state = store.load()?;
    let client = connect_plain(&pg.url).await?;
    let slot = cfg.slot();
    let row = client
        .query_opt(
            "SELECT active, wal_status, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("reading pg_replication_slots")?;
    let (active, wal_status, confirmed, retained, lag) = match &row {
        Some(r) => (
            Some(r.get::<_, bool>(0)),
            r.get::<_, Option<String>>(1),
            r.get::<_, Option<String>>(2),
            r.get::<_, Option<i64>>(3),
            r.get::<_, Option<i64>>(4),
        ),
        None => (None, None, None, None, None),
    };
    // Published tables whose app UPDATE and DELETE PostgreSQL now refuses
    // (a replica identity lost, a new partition without one).
    let no_identity: Vec<String> = match client
        .query_opt(
            "SELECT oid::int8 FROM pg_publication WHERE pubname = $1 AND (pubupdate OR pubdelete)",
            &[&cfg.publication()],
        )
        .await
        .context("reading pg_publication")?
    {
        Some(row) => {
            let oid = u32::try_from(row.get::<_, i64>(0)).unwrap_or_default();
            unilog::sources::pg_logical::publication::members_without_identity(&client, oid).await?
        }
        None => Vec::new(),
    };
    let topics = topics(&cfg).await?;
    let snapshot_complete = state.snapshot_complete && state.slot == slot;
    if json {
        let v = serde_json::json!({
            "pipeline": cfg.config.name,
            "slot": slot,
            "slot_exists": row.is_some(),
            "slot_active": active,
            "wal_status": wal_status,
            "confirmed_flush_lsn": confirmed,
            "retained_wal_bytes": retained,
            "lag_bytes": lag,
            "snapshot_complete": snapshot_complete,
            "delivered_lsn": state.delivered_lsn,
            "last_error": state.last_error,
            "tables_without_replica_identity": no_identity,
            "topics": topics,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let show = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let lines = [
        ("pipeline", cfg.config.name.clone()),
        (
            "slot",
            format!(
                "{slot} ({})",
                if row.is_some() { "exists" } else { "missing" }
            ),
        ),
        ("slot active", show(active.map(|a| a.to_string()))),
        ("wal status", show(wal_status)),
        ("confirmed flush", show(confirmed)),
        ("delivered (local)", show(state.delivered_lsn.clone())),
        ("retained WAL", show(retained.map(|b| format!("{b} bytes")))),
        ("lag", show(lag.map(|b| format!("{b} bytes")))),
        ("snapshot complete", snapshot_complete.to_string()),
        ("last error", show(state.last_error.clone())),
        (
            "app writes",
            if no_identity.is_empty() {
                "ok: every published table has a replica identity".to_string()
            } else {
                format!(
                    "FAILING: PostgreSQL refuses the app's UPDATE and DELETE on {} (published without a replica identity); run ALTER TABLE ... REPLICA IDENTITY FULL on each, or give it a primary key",
                    no_identity.join(", ")
                )
            },
        ),
    ];
    print_status(&lines, &topics);
    Ok(())
}

/// Topics and the registry's latest schema version of each.
async fn topics(cfg: &LoadedConfig) -> anyhow::Result<Vec<serde_json::Value>> {
    let reg = &cfg.config.schema_registry;
    let registry = RegistryClient::from_config(reg)?;
    let mut topics = Vec::new();
    for p in &cfg.config.mappings {
        let m = LoadedMapping::load(&cfg.resolve(p))?;
        let subject = format!("{}-value", m.spec.topic);
        let latest = match registry.latest(&subject).await {
            Ok(Some(v)) => serde_json::json!({"version": v.version, "id": v.id}),
            Ok(None) => serde_json::json!(null),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
        topics.push(serde_json::json!({
            "table": m.qualified_table(),
            "topic": m.spec.topic,
            "subject": subject,
            "schema": latest,
        }));
    }
    Ok(topics)
}

/// A MongoDB pipeline's saved position and copy progress.
async fn mongo_status(cfg: &LoadedConfig, json: bool) -> anyhow::Result<()> {
    let path = mongo_state_path(&cfg.state_dir(), &cfg.config.name);
    let state: MongoCheckpoint = read_json(&path)?.unwrap_or_default();
    let topics = topics(cfg).await?;
    let ts = |v: &Option<serde_json::Value>| v.as_ref().map(|t| format!("{}.{}", t["t"], t["i"]));
    // How long the pipeline may stay stopped before its position leaves the oplog.
    let delivered_secs = state
        .delivered_ts
        .as_ref()
        .and_then(|t| t["t"].as_u64())
        .and_then(|t| u32::try_from(t).ok());
    #[allow(clippy::cast_precision_loss)]
    let headroom: Result<Option<f64>, String> =
        match (cfg.config.source.mongo.as_ref(), delivered_secs) {
            (Some(m), Some(secs)) => {
                unilog::sources::mongo_oplog::oplog_headroom_secs(&m.url, secs)
                    .await
                    .map(|s| Some(s as f64 / 3600.0))
                    .map_err(|e| e.to_string())
            }
            _ => Ok(None),
        };
    if json {
        let v = serde_json::json!({
            "pipeline": cfg.config.name,
            "state_file": path,
            "mode": state.mode,
            "copy_complete": state.copy_complete,
            "copied": state.copied,
            "copy_started_at": ts(&state.copy_started_at),
            "delivered_cluster_time": ts(&state.delivered_ts),
            "has_resume_token": state.resume_token.is_some(),
            "oplog_headroom_hours": headroom.as_ref().ok().copied().flatten(),
            "oplog_headroom_error": headroom.as_ref().err(),
            "last_error": state.last_error,
            "topics": topics,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let show = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let lines = [
        ("pipeline", cfg.config.name.clone()),
        ("state", path.display().to_string()),
        (
            "mode",
            show(Some(state.mode.clone()).filter(|m| !m.is_empty())),
        ),
        (
            "copy",
            if state.copy_complete {
                "complete".to_string()
            } else {
                format!("{} collections done", state.copied.len())
            },
        ),
        ("delivered", show(ts(&state.delivered_ts))),
        (
            "oplog headroom",
            match &headroom {
                Ok(Some(h)) => format!("{h:.1} hours of oplog behind the delivered position"),
                Ok(None) => "-".into(),
                Err(e) => format!("unknown: {e}"),
            },
        ),
        ("last error", show(state.last_error.clone())),
    ];
    print_status(&lines, &topics);
    Ok(())
}

fn print_status(lines: &[(&str, String)], topics: &[serde_json::Value]) {
    for (k, v) in lines {
        println!("{k:<19} {v}");
    }
    println!();
    println!(
        "{:<28} {:<32} SCHEMA (subject version / id)",
        "TABLE", "TOPIC"
    );
    for t in topics {
        let schema = match &t["schema"] {
            serde_json::Value::Null => "not registered".to_string(),
            v if v.get("error").is_some() => format!(
                "registry error: {}",
                v["error"].as_str().unwrap_or_default()
            ),
            v => format!("v{} / id {}", v["version"], v["id"]),
        };
        println!(
            "{:<28} {:<32} {schema}",
            t["table"].as_str().unwrap_or_default(),
            t["topic"].as_str().unwrap_or_default()
        );
    }
}
