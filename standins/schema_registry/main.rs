//! `schema-registry-standin`: a **stand-in** for the Confluent Schema Registry REST API.
//!
//! This is not Confluent's registry and not part of unilog. It exists because no real registry
//! can be installed on the development machine, so the local test stack needs something that
//! answers the same HTTP calls the same way. It follows `REGISTRY-API.md` (the project's
//! source-checked notes on Confluent's REST API) for the subset unilog and its consumers use:
//!
//! - register (idempotent; one id per schema across subjects), lookup, schema by id and its
//!   usages, subject and version listings, soft and permanent deletes;
//! - compatibility checks at all seven levels, global and per subject, with verbose messages;
//! - the registry's error bodies `{"error_code", "message"}` and codes;
//! - optional basic auth, and an optional JSON state file so a restart keeps ids.
//!
//! Left out on purpose: schema references, contexts (`:.ctx:` subjects), modes other than
//! READWRITE (GET /mode only), schema types other than AVRO, `normalize`, metadata and rule
//! sets, and the larger response bodies of Confluent 8.x.
//!
//! Where it differs from the real thing, by construction:
//! - "Same schema" is apache-avro's compact JSON of the parsed schema (whitespace and key order
//!   ignored; doc, defaults and aliases significant), not Confluent's MD5 of Avro Java's
//!   `Schema.toString()`. That same JSON is the schema text the stand-in serves back.
//! - Compatibility is apache-avro's `SchemaCompatibility`, not Avro Java's: no aliases on named
//!   types, decimal precision/scale compared, different messages (see `compat.rs`).
//!
//! Layout: `main.rs` (CLI, start-up), `api.rs` (HTTP), `registry.rs` (state and rules),
//! `compat.rs` (levels and the Avro check), `tests.rs` (the HTTP tests).

mod api;
mod compat;
mod registry;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::api::AppState;
use crate::registry::Registry;

/// A stand-in for the Confluent Schema Registry REST API (Avro only), for local tests.
#[derive(Debug, Parser)]
#[command(name = "schema-registry-standin", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18081")]
    listen: String,

    /// JSON file holding all state; loaded at start, rewritten after every change.
    #[arg(long)]
    state: Option<PathBuf>,

    /// Require HTTP basic auth with these credentials, as `user:pass`.
    #[arg(long, env = "STANDIN_BASIC_AUTH", hide_env_values = true)]
    basic_auth: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    if let Some(credentials) = &cli.basic_auth {
        if !credentials.contains(':') {
            bail!("--basic-auth must be `user:pass`");
        }
    }
    let registry = match &cli.state {
        Some(path) => Registry::load(path)
            .with_context(|| format!("cannot load state file {}", path.display()))?,
        None => Registry::default(),
    };
    let app = api::router(
        AppState::new(registry, cli.state.clone()),
        cli.basic_auth.as_deref(),
    );
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        state = ?cli.state,
        basic_auth = cli.basic_auth.is_some(),
        "schema registry STAND-IN (not Confluent) listening on {address}"
    );
    axum::serve(listener, app).await?;
    Ok(())
}
