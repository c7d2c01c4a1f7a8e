//! A small client for the Elasticsearch/OpenSearch REST API: the calls the
//! indexer needs (`_bulk`, index creation, aliases, `_search`, `_count`),
//! with errors that say whether retrying can help.
//!
//! Whole-request answers 429 and 5xx, and connection failures, are
//! transient. Per-document results of `_bulk` are returned as they are: the
//! caller decides, document by document, what is done, stale, retried or
//! dead-lettered.

use std::time::Duration;

use serde_json::{json, Value as Json};

/// What went wrong talking to the search server.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search server at {url} is unreachable: {reason}; check search.url and that the server runs")]
    Unreachable { url: String, reason: String },
    #[error("search server at {url}: the TLS connection failed: {reason}; check search.url and search.ca_file/cert_file/key_file")]
    Tls { url: String, reason: String },
    #[error("search server at {url}: {message}")]
    Setup { url: String, message: String },
    #[error("search server refused the credentials (HTTP {status}) to {what}; check search.username and password/password_file")]
    Auth { status: u16, what: String },
    #[error("search server answered HTTP {status} to {what}: {body}")]
    Http {
        status: u16,
        what: String,
        body: String,
    },
    #[error("search server sent an unreadable answer to {what}: {reason}")]
    Unreadable { what: String, reason: String },
}

impl SearchError {
    /// Worth retrying with backoff: unreachable, 429 (too many requests), 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            SearchError::Unreachable { .. } => true,
            SearchError::Http { status, .. } => *status == 429 || *status >= 500,
            SearchError::Unreadable { .. }
            | SearchError::Tls { .. }
            | SearchError::Setup { .. }
            | SearchError::Auth { .. } => false,
        }
    }
}

/// One document's result in a `_bulk` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemResult {
    pub status: u16,
    /// The server's reason when the document was not written.
    pub error: Option<String>,
}

/// Search server client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SearchClient {
    http: reqwest::Client,
    base: String,
    shown: String,
    auth: Option<(String, Option<String>)>,
}

impl SearchClient {
    /// A client for `base` (`http://host:9200`).
    pub fn new(
        base: &str,
        username: Option<String>,
        password: Option<String>,
        timeout: Duration,
    ) -> Result<Self, SearchError> {
        let cfg = super::config::SearchConfig {
            url: base.to_string(),
            username,
            password,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout_secs: timeout.as_secs().max(1),
        };
        Self::from_config(&cfg)
    }

    /// A client for the `search` section: basic auth, TLS and the timeout.
    pub fn from_config(cfg: &super::config::SearchConfig) -> Result<Self, SearchError> {
        let shown = crate::config::redact_url(&cfg.url);
        let access = cfg.access();
        let setup = |e: crate::endpoint::AccessError| SearchError::Setup {
            url: shown.clone(),
            message: format!("search.{}: {}", e.field, e.message),
        };
        let http = access
            .client(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(cfg.timeout_secs))
                    .connect_timeout(Duration::from_secs(5)),
            )
            .map_err(setup)?;
        Ok(SearchClient {
            http,
            base: cfg.url.trim_end_matches('/').to_string(),
            auth: access.credentials().map_err(setup)?,
            shown,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        what: &str,
    ) -> Result<(u16, Json), SearchError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some((u, p)) = &self.auth {
            req = req.basic_auth(u, p.as_ref());
        }
        if let Some((ct, b)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, ct).body(b);
        }
        let unreachable = |e: reqwest::Error| {
            let url = self.shown.clone();
            match crate::endpoint::failure(&e, what, &self.base, &self.shown) {
                (reason, true) => SearchError::Tls { url, reason },
                (reason, false) => SearchError::Unreachable { url, reason },
            }
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        // (403 stays an ordinary answer: it is also how a read-only index
        // refuses writes, and its body says which.)
        if status == 401 {
            return Err(SearchError::Auth {
                status,
                what: what.to_string(),
            });
        }
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let parsed = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            Json::String(String::from_utf8_lossy(&bytes).chars().take(300).collect())
        });
        Ok((status, parsed))
    }

    fn fail(status: u16, body: &Json, what: &str) -> SearchError {
        SearchError::Http {
            status,
            what: what.to_string(),
            body: body.to_string().chars().take(500).collect(),
        }
    }

    async fn json_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Json>,
        what: &str,
    ) -> Result<(u16, Json), SearchError> {
        self.call(
            method,
            path,
            body.map(|b| ("application/json", b.to_string().into_bytes())),
            what,
        )
        .await
    }

    /// Creates `index` with `body` (`{settings, mappings}`). `Ok(false)` when
    /// it exists already.
    pub async fn create_index(&self, index: &str, body: &Json) -> Result<bool, SearchError> {
        let what = format!("the creation of index {index}");
        let (status, answer) = self
            .json_call(
                reqwest::Method::PUT,
                &format!("/{index}"),
                Some(body),
                &what,
            )
            .await?;
        match status {
            200..=299 => Ok(true),
            400 if answer.to_string().contains("resource_already_exists") => Ok(false),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// Whether `index` (or alias) exists.
    pub async fn exists(&self, index: &str) -> Result<bool, SearchError> {
        let what = format!("the existence check of {index}");
        let (status, answer) = self
            .call(reqwest::Method::HEAD, &format!("/{index}"), None, &what)
            .await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// Deletes `index`.
    pub async fn delete_index(&self, index: &str) -> Result<(), SearchError> {
        let what = format!("the deletion of index {index}");
        let (status, answer) = self
            .call(reqwest::Method::DELETE, &format!("/{index}"), None, &what)
            .await?;
        match status {
            200..=299 | 404 => Ok(()),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// The indexes `alias` points to (empty when it does not exist).
    pub async fn alias_targets(&self, alias: &str) -> Result<Vec<String>, SearchError> {
        let what = format!("the lookup of alias {alias}");
        let (status, answer) = self
            .call(
                reqwest::Method::GET,
                &format!("/_alias/{alias}"),
                None,
                &what,
            )
            .await?;
        match status {
            200 => Ok(answer
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()),
            404 => Ok(Vec::new()),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// Points `alias` at `add` and away from `remove`, in one atomic request.
    pub async fn swap_alias(
        &self,
        alias: &str,
        remove: &[String],
        add: &str,
    ) -> Result<(), SearchError> {
        let what = format!("the swap of alias {alias} to {add}");
        let mut actions: Vec<Json> = remove
            .iter()
            .map(|i| json!({"remove": {"index": i, "alias": alias}}))
            .collect();
        actions.push(json!({"add": {"index": add, "alias": alias}}));
        let (status, answer) = self
            .json_call(
                reqwest::Method::POST,
                "/_aliases",
                Some(&json!({ "actions": actions })),
                &what,
            )
            .await?;
        match status {
            200..=299 => Ok(()),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// Makes recent writes to `index` visible to searches.
    pub async fn refresh(&self, index: &str) -> Result<(), SearchError> {
        let what = format!("the refresh of {index}");
        let (status, answer) = self
            .call(
                reqwest::Method::POST,
                &format!("/{index}/_refresh"),
                None,
                &what,
            )
            .await?;
        match status {
            200..=299 => Ok(()),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// The number of documents in `index`.
    pub async fn count(&self, index: &str) -> Result<u64, SearchError> {
        let what = format!("the count of {index}");
        let (status, answer) = self
            .call(
                reqwest::Method::GET,
                &format!("/{index}/_count"),
                None,
                &what,
            )
            .await?;
        match status {
            200 => answer["count"]
                .as_u64()
                .ok_or_else(|| SearchError::Unreadable {
                    what,
                    reason: "no `count`".into(),
                }),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// Runs a `_search` on `index` and returns the server's answer.
    pub async fn search(&self, index: &str, body: &Json) -> Result<Json, SearchError> {
        let what = format!("a search of {index}");
        let (status, answer) = self
            .json_call(
                reqwest::Method::POST,
                &format!("/{index}/_search"),
                Some(body),
                &what,
            )
            .await?;
        match status {
            200 => Ok(answer),
            _ => Err(Self::fail(status, &answer, &what)),
        }
    }

    /// Sends one `_bulk` request (NDJSON `body` of `n` actions) and returns
    /// each action's result, in order.
    pub async fn bulk(&self, body: Vec<u8>, n: usize) -> Result<Vec<ItemResult>, SearchError> {
        let what = format!("a _bulk request of {n} documents");
        let (status, answer) = self
            .call(
                reqwest::Method::POST,
                "/_bulk",
                Some(("application/x-ndjson", body)),
                &what,
            )
            .await?;
        if status != 200 {
            return Err(Self::fail(status, &answer, &what));
        }
        parse_bulk(&answer, n).map_err(|reason| SearchError::Unreadable { what, reason })
    }
}

/// The per-document results of a `_bulk` answer.
pub fn parse_bulk(answer: &Json, n: usize) -> Result<Vec<ItemResult>, String> {
    let items = answer["items"]
        .as_array()
        .ok_or_else(|| "no `items` array".to_string())?;
    if items.len() != n {
        return Err(format!("{} results for {n} documents", items.len()));
    }
    items
        .iter()
        .map(|item| {
            let inner = item
                .as_object()
                .and_then(|o| o.values().next())
                .ok_or_else(|| format!("an item is not an object: {item}"))?;
            let status = inner["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| format!("an item has no status: {item}"))?;
            let error = inner.get("error").map(|e| match e {
                Json::String(s) => s.clone(),
                e => format!(
                    "{}: {}",
                    e["type"].as_str().unwrap_or("error"),
                    e["reason"].as_str().unwrap_or_default()
                ),
            });
            Ok(ItemResult { status, error })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bulk_items_and_refuses_short_answers() {
        let a = json!({"errors": true, "items": [
            {"index": {"_id": "1", "status": 201}},
            {"index": {"_id": "2", "status": 400, "error": {"type": "mapper_parsing_exception", "reason": "failed to parse field [age]"}}},
            {"delete": {"_id": "3", "status": 404, "result": "not_found"}}
        ]});
        let r = parse_bulk(&a, 3).unwrap();
        assert_eq!(
            r[0],
            ItemResult {
                status: 201,
                error: None
            }
        );
        assert_eq!(r[1].status, 400);
        assert_eq!(
            r[1].error.as_deref(),
            Some("mapper_parsing_exception: failed to parse field [age]")
        );
        assert_eq!(r[2].status, 404);
        assert!(parse_bulk(&a, 2).is_err());
        assert!(parse_bulk(&json!({"took": 1}), 0).is_err());
    }

    #[test]
    fn transient_errors() {
        let h = |status| SearchError::Http {
            status,
            what: String::new(),
            body: String::new(),
        };
        assert!(h(429).is_transient());
        assert!(h(503).is_transient());
        assert!(!h(400).is_transient());
    }
}
