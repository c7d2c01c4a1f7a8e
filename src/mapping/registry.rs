//! A small client for the Confluent Schema Registry REST API: the few calls
//! unilog needs, with errors that say what the registry answered.
//!
//! Incompatibility is recognised by HTTP 409 (the body's `error_code` is
//! 409 or 40901 depending on the registry version). 5xx and connection
//! failures are transient; 4xx are not retried.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// What went wrong talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry at {url} is unreachable: {reason}; check schema_registry.url and that the registry is running")]
    Unreachable { url: String, reason: String },
    #[error("schema registry at {url}: the TLS connection failed: {reason}; check schema_registry.url and schema_registry.ca_file/cert_file/key_file")]
    Tls { url: String, reason: String },
    #[error("schema registry at {url}: {message}")]
    Setup { url: String, message: String },
    #[error("schema registry refused the credentials (HTTP {status}); check schema_registry.username and password/password_file")]
    Auth { status: u16 },
    #[error("subject `{subject}`: the schema is incompatible with the registered one: {}", messages.join("; "))]
    Incompatible {
        subject: String,
        messages: Vec<String>,
    },
    #[error("subject `{subject}`: the registry rejected the schema as invalid: {message}")]
    InvalidSchema { subject: String, message: String },
    #[error("schema registry answered HTTP {status} (error code {code}) to {what}: {message}")]
    Http {
        status: u16,
        code: i64,
        what: String,
        message: String,
    },
}

impl RegistryError {
    /// Worth retrying later (the registry may come back).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error_code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
}

/// A registered version of a subject.
#[derive(Debug, Deserialize, Clone)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: i64,
    pub id: u32,
    pub schema: String,
}

#[derive(Deserialize)]
struct CompatBody {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<serde_json::Value>,
}

/// The `message` of an error body, or the body's start.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).map_or_else(
        |_| String::from_utf8_lossy(body).chars().take(200).collect(),
        |b| b.message,
    )
}

/// Registry client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    /// `base` with any password replaced, for messages.
    shown: String,
    auth: Option<(String, Option<String>)>,
}

impl RegistryClient {
    /// A client for `base` (`http://host:8081`), with optional basic auth.
    pub fn new(
        base: &str,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Self, RegistryError> {
        let cfg = crate::config::RegistryConfig {
            url: base.to_string(),
            username,
            password,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        };
        Self::from_config(&cfg)
    }

    /// A client for the `schema_registry` section: basic auth and TLS.
    pub fn from_config(cfg: &crate::config::RegistryConfig) -> Result<Self, RegistryError> {
        let access = cfg.access();
        let setup = |e: crate::endpoint::AccessError| RegistryError::Setup {
            url: crate::config::redact_url(&cfg.url),
            message: format!("schema_registry.{}: {}", e.field, e.message),
        };
        let http = access
            .client(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .connect_timeout(Duration::from_secs(5)),
            )
            .map_err(setup)?;
        let base = cfg.url.trim_end_matches('/').to_string();
        Ok(RegistryClient {
            http,
            shown: crate::config::redact_url(&base),
            base,
            auth: access.credentials().map_err(setup)?,
        })
    }

    fn subject_path(subject: &str) -> String {
        subject.replace('%', "%25").replace('/', "%2F")
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(u16, bytes::Bytes), RegistryError> {
        let req = match &self.auth {
            Some((u, p)) => req.basic_auth(u, p.as_ref()),
            None => req,
        };
        let resp = req
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| {
                let url = self.shown.clone();
                match crate::endpoint::failure(&e, what, &self.base, &self.shown) {
                    (reason, true) => RegistryError::Tls { url, reason },
                    (reason, false) => RegistryError::Unreachable { url, reason },
                }
            })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
            url: self.shown.clone(),
            reason: format!("{what}: reading the answer: {e}").replace(&self.base, &self.shown),
        })?;
        if status == 401 || status == 403 {
            return Err(RegistryError::Auth { status });
        }
        Ok((status, body))
    }

    async fn post_schema(
        &self,
        url: String,
        schema: &str,
        what: &str,
    ) -> Result<(u16, bytes::Bytes), RegistryError> {
        let req = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(json!({"schema": schema}).to_string());
        self.send(req, what).await
    }

    fn http_error(status: u16, body: &[u8], what: &str) -> RegistryError {
        let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
        RegistryError::Http {
            status,
            code: parsed.as_ref().map_or(i64::from(status), |b| b.error_code),
            what: what.to_string(),
            message: parsed.map_or_else(
                || String::from_utf8_lossy(body).chars().take(200).collect(),
                |b| b.message,
            ),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(
        body: &[u8],
        what: &str,
        status: u16,
    ) -> Result<T, RegistryError> {
        serde_json::from_slice(body).map_err(|e| RegistryError::Http {
            status,
            code: 50005,
            what: what.to_string(),
            message: format!("unreadable answer: {e}"),
        })
    }

    /// Checks `schema` against the latest version of `subject` with the
    /// subject's compatibility level. `Ok(vec![])` means compatible (also
    /// when the subject does not exist yet); otherwise the registry's reasons.
    pub async fn check_compatibility(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let what = format!("the compatibility check of subject `{subject}`");
        let url = format!(
            "{}/compatibility/subjects/{}/versions/latest?verbose=true",
            self.base,
            Self::subject_path(subject)
        );
        let (status, body) = self.post_schema(url, schema, &what).await?;
        match status {
            200 => {
                let c: CompatBody = Self::parse(&body, &what, status)?;
                if c.is_compatible {
                    Ok(Vec::new())
                } else {
                    let mut msgs: Vec<String> = c
                        .messages
                        .into_iter()
                        .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string))
                        .collect();
                    if msgs.is_empty() {
                        msgs.push("the registry gave no reason".into());
                    }
                    Ok(msgs)
                }
            }
            // Karapace answers 404 for a subject with no versions yet.
            404 => Ok(Vec::new()),
            422 => Err(RegistryError::InvalidSchema {
                subject: subject.to_string(),
                message: error_message(&body),
            }),
            _ => Err(Self::http_error(status, &body, &what)),
        }
    }

    /// The id of `schema` under `subject`, if it is registered there.
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Option<SubjectVersion>, RegistryError> {
        let what = format!("the lookup of a schema under subject `{subject}`");
        let url = format!("{}/subjects/{}", self.base, Self::subject_path(subject));
        let (status, body) = self.post_schema(url, schema, &what).await?;
        match status {
            200 => Ok(Some(Self::parse(&body, &what, status)?)),
            404 => Ok(None),
            _ => Err(Self::http_error(status, &body, &what)),
        }
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let what = format!("the registration of subject `{subject}`");
        let url = format!(
            "{}/subjects/{}/versions",
            self.base,
            Self::subject_path(subject)
        );
        let (status, body) = self.post_schema(url, schema, &what).await?;
        match status {
            200 => Ok(Self::parse::<IdBody>(&body, &what, status)?.id),
            409 => Err(RegistryError::Incompatible {
                subject: subject.to_string(),
                messages: vec![error_message(&body)],
            }),
            422 => Err(RegistryError::InvalidSchema {
                subject: subject.to_string(),
                message: error_message(&body),
            }),
            _ => Err(Self::http_error(status, &body, &what)),
        }
    }

    /// The schema text registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let what = format!("the fetch of schema id {id}");
        let url = format!("{}/schemas/ids/{id}", self.base);
        let (status, body) = self.send(self.http.get(url), &what).await?;
        match status {
            200 => Ok(Self::parse::<SchemaBody>(&body, &what, status)?.schema),
            _ => Err(Self::http_error(status, &body, &what)),
        }
    }

    /// The latest version of `subject`, if any.
    pub async fn latest(&self, subject: &str) -> Result<Option<SubjectVersion>, RegistryError> {
        let what = format!("the fetch of the latest version of subject `{subject}`");
        let url = format!(
            "{}/subjects/{}/versions/latest",
            self.base,
            Self::subject_path(subject)
        );
        let (status, body) = self.send(self.http.get(url), &what).await?;
        match status {
            200 => Ok(Some(Self::parse(&body, &what, status)?)),
            404 => Ok(None),
            _ => Err(Self::http_error(status, &body, &what)),
        }
    }
}
