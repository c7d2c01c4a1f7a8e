//! `mongo-standin`: a **stand-in** for a one-member MongoDB replica set, for unilog's tests.
//!
//! This is not mongod and not part of unilog. MongoDB cannot be installed on the development
//! machines, so the Mongo source's tests need a server that the real `mongodb` driver accepts
//! and that writes an oplog and change events in MongoDB's own formats. It follows
//! `MONGO-FORMATS.md` (the project's source-checked notes) for:
//!
//! - the wire protocol: OP_MSG requests and replies (`wire.rs`);
//! - the handshake: `hello`/`isMaster` as the primary of replica set `--set-name`, with every
//!   field the driver requires and no `topologyVersion` (`commands.rs`);
//! - CRUD on in-memory collections with a small query language (`store.rs`, `query.rs`);
//! - `local.oplog.rs`: one real-format entry per write (`$v: 2` update diffs, replacements,
//!   deletes, create/drop/renameCollection/dropDatabase commands), capped by
//!   `--oplog-max-entries`, readable by tailable awaitData cursors (`oplog.rs`, `cursors.rs`);
//! - change streams on a collection, a database or the cluster, with resume tokens,
//!   `postBatchResumeToken` in every batch, invalidation, `fullDocument` and
//!   `fullDocumentBeforeChange`, and the history-lost errors (`changestream.rs`);
//! - test hooks: `standinTruncateOplog` and `standinFailNext` (`commands.rs`).
//!
//! Left out: authentication, TLS, compression, transactions, sharding, indexes other than the
//! implicit `_id` uniqueness, most query and update operators, pipeline updates, most
//! aggregation stages, persistence. The README (`standins/README.md`) lists what differs.

mod changestream;
mod commands;
mod cursors;
mod oplog;
mod query;
mod server;
mod store;
#[cfg(test)]
mod tests;
mod wire;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::server::{Config, Server};

/// A stand-in for a one-member MongoDB replica set (wire protocol, oplog, change streams), for
/// local tests. Not mongod.
#[derive(Debug, Parser)]
#[command(name = "mongo-standin", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:27018")]
    listen: String,

    /// Replica set name reported by hello (clients connect with `?replicaSet=NAME`).
    #[arg(long, default_value = "rs0")]
    set_name: String,

    /// The `host:port` reported as this member (hello `hosts`, `me`, `primary`); it must be the
    /// address clients put in their URL. Default: the address listened on.
    #[arg(long)]
    advertise: Option<String>,

    /// Keep at most this many oplog entries; older ones are dropped (a capped oplog).
    #[arg(long)]
    oplog_max_entries: Option<usize>,
    /// Largest `applyOps` entry of a transaction, in bytes of its ops; a
    /// larger transaction is logged as a `partialTxn` chain (mongod: 16 MB).
    #[arg(long, default_value_t = 16 * 1024 * 1024 - 64 * 1024)]
    txn_entry_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let address = listener.local_addr()?;
    let host = cli.advertise.unwrap_or_else(|| address.to_string());
    let server = Server::new(Config {
        set_name: cli.set_name.clone(),
        host: host.clone(),
        oplog_max_entries: cli.oplog_max_entries,
        txn_entry_bytes: cli.txn_entry_bytes,
    });
    tracing::info!(
        set_name = %cli.set_name,
        advertise = %host,
        oplog_max_entries = ?cli.oplog_max_entries,
        "MongoDB STAND-IN (not mongod) listening on {address}"
    );
    server.serve(listener).await?;
    Ok(())
}
