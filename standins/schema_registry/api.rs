//! HTTP layer: routes, request bodies, query flags, response shapes and optional basic auth.
//!
//! Bodies are parsed as JSON whatever their content type (clients send
//! `application/vnd.schemaregistry.v1+json`, `application/vnd.schemaregistry+json`,
//! `application/json` or `application/octet-stream`); unknown fields and query parameters are
//! ignored. Every answer is `application/vnd.schemaregistry.v1+json`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::compat::Level;
use crate::registry::{ApiError, Candidate, Registry, Version, VersionSel};

pub const CONTENT_TYPE_V1: &str = "application/vnd.schemaregistry.v1+json";

/// The registry behind a lock, and where to persist it.
pub struct AppState {
    registry: Mutex<Registry>,
    state_file: Option<PathBuf>,
}

impl AppState {
    pub fn new(registry: Registry, state_file: Option<PathBuf>) -> Self {
        Self {
            registry: Mutex::new(registry),
            state_file,
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        f(&self.registry.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies `f` to a copy, persists the copy if it changed, then publishes it; so a failed
    /// write to the state file leaves both the file and the served state as they were.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut current = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = current.clone();
        let out = f(&mut next)?;
        if next != *current {
            if let Some(path) = &self.state_file {
                next.save(path).map_err(|err| {
                    tracing::error!(path = %path.display(), error = %err, "cannot write state file");
                    ApiError::store(format!("cannot write {}: {err}", path.display()))
                })?;
            }
            *current = next;
        }
        Ok(out)
    }
}

type Shared = State<Arc<AppState>>;
type Flags = Query<HashMap<String, String>>;
type Reply = Result<Response, ApiError>;

/// The full route table. `basic_auth` is the expected `user:pass`, if any.
pub fn router(state: AppState, basic_auth: Option<&str>) -> Router {
    let router = Router::new()
        .route("/", get(|| async { ok(&json!({})) }))
        .route("/schemas/types", get(|| async { ok(&["AVRO"]) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/versions", get(schema_usages))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(subject_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_register),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_version),
        )
        .route("/config", get(global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route("/mode", get(|| async { ok(&json!({"mode": "READWRITE"})) }))
        .fallback(|| async { ApiError::new(404, 404, "HTTP 404 Not Found") })
        .with_state(Arc::new(state));
    match basic_auth {
        Some(credentials) => {
            let expected = format!("Basic {}", base64(credentials.as_bytes()));
            router.layer(middleware::from_fn_with_state(
                Arc::<str>::from(expected),
                require_basic_auth,
            ))
        }
        None => router,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        reply(
            status,
            &json!({"error_code": self.code, "message": self.message}),
        )
    }
}

fn reply(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(CONTENT_TYPE_V1),
            )],
            bytes,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

fn ok(body: &impl Serialize) -> Response {
    reply(StatusCode::OK, body)
}

fn flag(flags: &HashMap<String, String>, name: &str) -> bool {
    flags
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Parses a JSON body: broken JSON is 400, JSON of the wrong shape 422 (as rest-utils maps them).
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|err| {
        if err.is_data() {
            ApiError::new(422, 422, format!("Unprocessable request body: {err}"))
        } else {
            ApiError::new(400, 400, format!("Malformed JSON request body: {err}"))
        }
    })
}

/// Body of register, lookup and the compatibility checks.
#[derive(Deserialize)]
struct SchemaRequest {
    schema: Option<String>,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    references: Option<Vec<Value>>,
}

impl SchemaRequest {
    fn candidate(&self) -> Result<Candidate, ApiError> {
        Candidate::parse(
            self.schema.as_deref(),
            self.schema_type.as_deref(),
            self.references.as_ref().is_some_and(|r| !r.is_empty()),
        )
    }
}

/// Body of PUT /config and PUT /config/{s}.
#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
}

impl ConfigRequest {
    fn level(&self) -> Result<(Level, &str), ApiError> {
        let text = self.compatibility.as_deref().unwrap_or_default();
        Level::parse(text)
            .map(|level| (level, text))
            .ok_or_else(ApiError::invalid_level)
    }
}

fn version_body(registry: &Registry, subject: &str, version: &Version) -> Value {
    json!({
        "subject": subject,
        "version": version.version,
        "id": version.id,
        "schema": registry.schemas.get(&version.id).map_or("", String::as_str),
    })
}

fn parse_id(text: &str) -> Result<u32, ApiError> {
    text.trim()
        .parse()
        .map_err(|_| ApiError::schema_not_found())
}

async fn register(State(state): Shared, Path(subject): Path<String>, body: Bytes) -> Reply {
    let candidate = parse_body::<SchemaRequest>(&body)?.candidate()?;
    let (id, added) = state.write(|r| r.register(&subject, &candidate))?;
    if let Some(version) = added {
        tracing::info!(subject, id, version, "registered schema");
    }
    Ok(ok(&json!({"id": id})))
}

async fn lookup(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Flags,
    body: Bytes,
) -> Reply {
    let candidate = parse_body::<SchemaRequest>(&body)?.candidate()?;
    state.read(|r| {
        let found = r.lookup(&subject, &candidate.key, flag(&flags, "deleted"))?;
        Ok(ok(&version_body(r, &subject, &found)))
    })
}

async fn schema_by_id(State(state): Shared, Path(id): Path<String>) -> Reply {
    let id = parse_id(&id)?;
    state.read(|r| Ok(ok(&json!({"schema": r.schema_by_id(id)?}))))
}

async fn schema_usages(State(state): Shared, Path(id): Path<String>, Query(flags): Flags) -> Reply {
    let id = parse_id(&id)?;
    let usages = state.read(|r| r.usages(id, flag(&flags, "deleted")))?;
    let body: Vec<Value> = usages
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect();
    Ok(ok(&body))
}

async fn subjects(State(state): Shared, Query(flags): Flags) -> Response {
    ok(&state.read(|r| r.subject_names(flag(&flags, "deleted"))))
}

async fn subject_versions(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Flags,
) -> Reply {
    let numbers = state.read(|r| r.version_numbers(&subject, flag(&flags, "deleted")))?;
    Ok(ok(&numbers))
}

async fn get_version(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Flags,
) -> Reply {
    let sel = VersionSel::parse(&version)?;
    state.read(|r| {
        let found = r.version(&subject, sel, flag(&flags, "deleted"))?;
        Ok(ok(&version_body(r, &subject, &found)))
    })
}

async fn delete_subject(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Flags,
) -> Reply {
    let permanent = flag(&flags, "permanent");
    let numbers = state.write(|r| r.delete_subject(&subject, permanent))?;
    tracing::info!(subject, permanent, "deleted subject");
    Ok(ok(&numbers))
}

async fn delete_version(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Flags,
) -> Reply {
    let sel = VersionSel::parse(&version)?;
    let permanent = flag(&flags, "permanent");
    let number = state.write(|r| r.delete_version(&subject, sel, permanent))?;
    tracing::info!(subject, version = number, permanent, "deleted version");
    Ok(ok(&number))
}

/// POST /compatibility/subjects/{s}/versions/{v}: only version `v`, whatever the level.
async fn check_version(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Flags,
    body: Bytes,
) -> Reply {
    let sel = VersionSel::parse(&version)?;
    let verbose = flag(&flags, "verbose");
    let candidate = parse_body::<SchemaRequest>(&body)?.candidate();
    let messages = state.read(|r| {
        if let VersionSel::Number(n) = sel {
            if r.version(&subject, sel, false).is_err() {
                return Err(ApiError::version_not_found(n));
            }
        }
        match candidate {
            Ok(candidate) => r.check(&subject, &candidate.schema, Some(sel)),
            Err(err) if verbose && err.code == 42201 => Ok(vec![err.message]),
            Err(err) => Err(err),
        }
    })?;
    Ok(compatibility_reply(&messages, verbose))
}

/// POST /compatibility/subjects/{s}/versions: exactly register's check.
async fn check_register(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Flags,
    body: Bytes,
) -> Reply {
    let verbose = flag(&flags, "verbose");
    let messages = match parse_body::<SchemaRequest>(&body)?.candidate() {
        Ok(candidate) => state.read(|r| r.check(&subject, &candidate.schema, None))?,
        Err(err) if verbose && err.code == 42201 => vec![err.message],
        Err(err) => return Err(err),
    };
    Ok(compatibility_reply(&messages, verbose))
}

fn compatibility_reply(messages: &[String], verbose: bool) -> Response {
    if verbose {
        ok(&json!({"is_compatible": messages.is_empty(), "messages": messages}))
    } else {
        ok(&json!({"is_compatible": messages.is_empty()}))
    }
}

async fn global_config(State(state): Shared) -> Response {
    let level = state.read(|r| r.global_level);
    ok(&json!({"compatibilityLevel": level.name()}))
}

async fn put_global_config(State(state): Shared, body: Bytes) -> Reply {
    let request: ConfigRequest = parse_body(&body)?;
    let (level, text) = request.level()?;
    state.write(|r| {
        r.global_level = level;
        Ok(())
    })?;
    tracing::info!(level = level.name(), "set global compatibility");
    Ok(ok(&json!({"compatibility": text})))
}

async fn subject_config(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Flags,
) -> Reply {
    let level = state.read(|r| {
        if flag(&flags, "defaultToGlobal") {
            Some(r.level(&subject))
        } else {
            r.subject_levels.get(&subject).copied()
        }
    });
    let level = level.ok_or_else(|| {
        ApiError::new(
            404,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )
    })?;
    Ok(ok(&json!({"compatibilityLevel": level.name()})))
}

async fn put_subject_config(
    State(state): Shared,
    Path(subject): Path<String>,
    body: Bytes,
) -> Reply {
    let request: ConfigRequest = parse_body(&body)?;
    let (level, text) = request.level()?;
    state.write(|r| {
        r.subject_levels.insert(subject.clone(), level);
        Ok(())
    })?;
    tracing::info!(subject, level = level.name(), "set subject compatibility");
    Ok(ok(&json!({"compatibility": text})))
}

/// DELETE /config/{s}: returns the removed level; none set is 40401, as the registry answers.
async fn delete_subject_config(State(state): Shared, Path(subject): Path<String>) -> Reply {
    let old = state.write(|r| {
        r.subject_levels
            .remove(&subject)
            .ok_or_else(|| ApiError::subject_not_found(&subject))
    })?;
    tracing::info!(subject, "removed subject compatibility");
    Ok(ok(&json!({"compatibilityLevel": old.name()})))
}

async fn require_basic_auth(
    State(expected): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .is_some_and(|(scheme, token)| {
            expected
                .split_once(' ')
                .is_some_and(|(want_scheme, want_token)| {
                    scheme.eq_ignore_ascii_case(want_scheme) && token.trim() == want_token
                })
        });
    if authorized {
        return next.run(request).await;
    }
    let mut response = ApiError::new(401, 401, "Unauthorized").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"schema-registry-standin\""),
    );
    response
}

/// Standard base64 with padding (RFC 4648 §4), enough for one `Authorization` header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(super::base64(plain.as_bytes()), encoded);
        }
    }
}
