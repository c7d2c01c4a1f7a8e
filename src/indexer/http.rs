//! `GET /search/<alias>?q=...`: a search endpoint for services that have no
//! search client of their own, served by `unilog index` beside `/metrics`,
//! `/health` and `/ready`.
//!
//! `q` is a simple query string (words, `"phrases"`, `+must`, `-not`,
//! `field:value` is not parsed: use words); without `q` every document
//! matches. `size` (default from the config, at most 100) and `from` page
//! through the hits. Only the configured aliases are searchable. The answer:
//! `{"total": N, "hits": [{"id", "score", "source"}]}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::search::SearchClient;

/// What the endpoint needs.
pub struct SearchState {
    pub search: SearchClient,
    pub aliases: Vec<String>,
    pub default_size: u32,
}

/// The query string of `/search/<alias>`.
#[derive(Deserialize)]
pub struct SearchParams {
    q: Option<String>,
    size: Option<u32>,
    from: Option<u32>,
}

/// The request body for the server.
pub fn query_body(q: Option<&str>, size: u32, from: u32) -> serde_json::Value {
    let query = match q.map(str::trim).filter(|q| !q.is_empty()) {
        Some(q) => json!({"simple_query_string": {"query": q, "default_operator": "and"}}),
        None => json!({"match_all": {}}),
    };
    json!({"query": query, "size": size.min(100), "from": from})
}

async fn search(
    State(st): State<Arc<SearchState>>,
    Path(alias): Path<String>,
    Query(p): Query<SearchParams>,
) -> impl IntoResponse {
    if !st.aliases.contains(&alias) {
        return (
            StatusCode::NOT_FOUND,
            Json(
                json!({"error": format!("`{alias}` is not an index of this indexer; searchable: {}", st.aliases.join(", "))}),
            ),
        );
    }
    let body = query_body(
        p.q.as_deref(),
        p.size.unwrap_or(st.default_size),
        p.from.unwrap_or(0),
    );
    match st.search.search(&alias, &body).await {
        Ok(answer) => {
            let total = answer["hits"]["total"]["value"]
                .as_u64()
                .or_else(|| answer["hits"]["total"].as_u64())
                .unwrap_or(0);
            let hits: Vec<serde_json::Value> = answer["hits"]["hits"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .map(|h| json!({"id": h["_id"], "score": h["_score"], "source": h["_source"]}))
                        .collect()
                })
                .unwrap_or_default();
            (StatusCode::OK, Json(json!({"total": total, "hits": hits})))
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// The indexer's routes: `/search/<alias>` (when `state` is given) plus
/// the operator endpoints of [`crate::http::router`].
pub fn router(state: Option<SearchState>, stall_timeout: Duration) -> Router {
    let base = crate::http::router(stall_timeout);
    match state {
        Some(st) => base.merge(
            Router::new()
                .route("/search/{alias}", get(search))
                .with_state(Arc::new(st)),
        ),
        None => base,
    }
}

/// Binds `listen` and serves until the process ends.
pub async fn serve(
    listen: std::net::SocketAddr,
    state: Option<SearchState>,
    stall_timeout: Duration,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listen, "serving /search, /metrics, /health and /ready");
    axum::serve(listener, router(state, stall_timeout)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_bodies() {
        assert_eq!(
            query_body(Some(" ann "), 500, 0),
            json!({"query": {"simple_query_string": {"query": "ann", "default_operator": "and"}}, "size": 100, "from": 0})
        );
        assert_eq!(query_body(None, 5, 10)["query"], json!({"match_all": {}}));
    }
}
