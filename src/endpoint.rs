//! How unilog reaches the HTTP services it calls (the schema registry and
//! the search server): basic auth and TLS, shared by both config sections.
//!
//! - `username` with `password` (best as `${VAR}`) or `password_file` (a
//!   mounted secret; one trailing newline is dropped).
//! - `https://` URLs are verified against the system's roots plus `ca_file`
//!   (PEM, one or more certificates) when it is set.
//! - `cert_file` and `key_file` (PEM) present a client certificate.
//!
//! Secrets never appear in errors or logs: URLs are shown redacted, and the
//! password is only ever placed in the `Authorization` header.

use std::path::{Path, PathBuf};

use crate::config::redact_url;

/// Gives a config section with the fields `url`, `username`, `password`,
/// `password_file`, `ca_file`, `cert_file` and `key_file` its
/// `access()` view and `resolve_files()`.
macro_rules! http_access {
    ($section:ty) => {
        impl $section {
            /// The access settings, for [`crate::endpoint`].
            pub fn access(&self) -> $crate::endpoint::HttpAccess<'_> {
                $crate::endpoint::HttpAccess {
                    url: &self.url,
                    username: self.username.as_deref(),
                    password: self.password.as_deref(),
                    password_file: self.password_file.as_deref(),
                    ca_file: self.ca_file.as_deref(),
                    cert_file: self.cert_file.as_deref(),
                    key_file: self.key_file.as_deref(),
                }
            }

            /// Makes the file paths absolute, against the config file's folder.
            pub fn resolve_files(&mut self, config_file: &std::path::Path) {
                let dir = config_file.parent().unwrap_or(std::path::Path::new("."));
                for p in [
                    &mut self.password_file,
                    &mut self.ca_file,
                    &mut self.cert_file,
                    &mut self.key_file,
                ] {
                    $crate::endpoint::resolve_in(dir, p);
                }
            }
        }
    };
}
pub(crate) use http_access;

/// The access settings of one HTTP service, borrowed from its config section.
#[derive(Debug, Clone, Copy)]
pub struct HttpAccess<'a> {
    pub url: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub password_file: Option<&'a Path>,
    pub ca_file: Option<&'a Path>,
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
}

/// A refused setting: the field (relative to the section) and what to do.
#[derive(Debug, PartialEq, Eq)]
pub struct AccessError {
    pub field: &'static str,
    pub message: String,
}

impl AccessError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        AccessError {
            field,
            message: message.into(),
        }
    }
}

/// Basic-auth credentials: user and password.
pub type Credentials = (String, Option<String>);

impl HttpAccess<'_> {
    /// Checks the settings and reads the files they name, so a mistake is
    /// reported at load time with its field.
    pub fn validate(&self) -> Result<(), AccessError> {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err(AccessError::new(
                "url",
                "must start with http:// or https://",
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(AccessError::new(
                "password_file",
                "is set together with `password`; keep one",
            ));
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            let field = if self.password.is_some() {
                "password"
            } else {
                "password_file"
            };
            return Err(AccessError::new(field, "is set without `username`"));
        }
        let tls_set = self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some();
        if tls_set && !self.url.starts_with("https://") {
            return Err(AccessError::new(
                "url",
                format!(
                    "`{}` is plain http, but TLS files are set; use an https:// URL",
                    redact_url(self.url)
                ),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let missing = if self.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            return Err(AccessError::new(
                missing,
                "is missing: a client certificate needs both `cert_file` and `key_file`",
            ));
        }
        self.password()?;
        self.tls_files()?;
        Ok(())
    }

    /// The password, from `password` or read from `password_file`.
    pub fn password(&self) -> Result<Option<String>, AccessError> {
        if let Some(p) = self.password {
            return Ok(Some(p.to_string()));
        }
        let Some(file) = self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file).map_err(|e| {
            AccessError::new(
                "password_file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        Ok(Some(text.to_string()))
    }

    /// Basic-auth credentials, when a username is set.
    pub fn credentials(&self) -> Result<Option<Credentials>, AccessError> {
        let password = self.password()?;
        Ok(self.username.map(|u| (u.to_string(), password)))
    }

    /// The extra roots and the client identity the files name.
    fn tls_files(
        &self,
    ) -> Result<(Vec<reqwest::Certificate>, Option<reqwest::Identity>), AccessError> {
        let mut roots = Vec::new();
        if let Some(ca) = self.ca_file {
            let pem = read_pem(ca, "ca_file")?;
            roots = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|r| !r.is_empty())
                .ok_or_else(|| {
                    AccessError::new(
                        "ca_file",
                        format!(
                            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                            ca.display()
                        ),
                    )
                })?;
        }
        let identity = match (self.cert_file, self.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read_pem(cert, "cert_file")?;
                pem.push(b'\n');
                pem.extend(read_pem(key, "key_file")?);
                Some(reqwest::Identity::from_pem(&pem).map_err(|e| {
                    AccessError::new(
                        "cert_file",
                        format!(
                            "{} with {} is not a PEM certificate and private key: {e}",
                            cert.display(),
                            key.display()
                        ),
                    )
                })?)
            }
            _ => None,
        };
        Ok((roots, identity))
    }

    /// A client with these TLS settings on top of `builder`.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, AccessError> {
        let (roots, identity) = self.tls_files()?;
        let mut builder = builder.tls_certs_merge(roots);
        if let Some(id) = identity {
            builder = builder.identity(id);
        }
        builder.build().map_err(|e| {
            AccessError::new(
                "url",
                format!("cannot set up a client for {}: {e}", redact_url(self.url)),
            )
        })
    }
}

fn read_pem(path: &Path, field: &'static str) -> Result<Vec<u8>, AccessError> {
    std::fs::read(path)
        .map_err(|e| AccessError::new(field, format!("cannot read {}: {e}", path.display())))
}

/// `p` against `dir` when it is relative.
pub fn resolve_in(dir: &Path, p: &mut Option<PathBuf>) {
    if let Some(path) = p {
        if path.is_relative() {
            *path = dir.join(&*path);
        }
    }
}

/// Describes a failed request so the cause is visible: reqwest's own
/// message is only "error sending request"; the TLS or connection reason is
/// in its sources.
pub fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    if out.contains("UnknownIssuer") || out.contains("invalid peer certificate") {
        out.push_str(" (set `ca_file` to the PEM of the CA that signed the server's certificate)");
    } else if e.url().is_some_and(|u| u.scheme() == "https")
        && (out.contains("connection was not ready") || out.contains("connection closed"))
    {
        // With TLS 1.3 a server that wants a client certificate refuses it
        // after the handshake, and the client often sees only a closed
        // connection.
        out.push_str(
            " (if the server demands a client certificate, set `cert_file` and `key_file`)",
        );
    }
    out
}

/// A failed request, described with `what` was asked and the password of
/// `base` hidden (`shown`); true when it is a TLS failure.
pub fn failure(e: &reqwest::Error, what: &str, base: &str, shown: &str) -> (String, bool) {
    let reason = format!("{what}: {}", describe(e)).replace(base, shown);
    let tls = is_tls_failure(&reason);
    (reason, tls)
}

/// Whether a described request failure is about TLS (a certificate, a
/// handshake, or TLS spoken to a plain server): a setting to fix, not an
/// outage to wait out.
pub fn is_tls_failure(described: &str) -> bool {
    [
        "certificate",
        "received fatal alert",
        "InvalidContentType",
        "corrupt message",
        "HandshakeFailure",
    ]
    .iter()
    .any(|m| described.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(url: &str) -> HttpAccess<'_> {
        HttpAccess {
            url,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    #[test]
    fn refuses_half_settings() {
        let mut a = access("ftp://x");
        assert_eq!(a.validate().unwrap_err().field, "url");
        a.url = "http://x";
        a.password = Some("p");
        assert_eq!(a.validate().unwrap_err().field, "password");
        a.username = Some("u");
        assert!(a.validate().is_ok());
        a.ca_file = Some(Path::new("/nonexistent/ca.pem"));
        let e = a.validate().unwrap_err();
        assert_eq!(e.field, "url");
        assert!(e.message.contains("https://"), "{}", e.message);
        a.url = "https://x";
        let e = a.validate().unwrap_err();
        assert_eq!(e.field, "ca_file");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{}", e.message);
        a.ca_file = None;
        a.cert_file = Some(Path::new("c.pem"));
        assert_eq!(a.validate().unwrap_err().field, "key_file");
    }

    #[test]
    fn password_file_drops_one_newline_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let mut a = access("http://x");
        a.username = Some("u");
        a.password_file = Some(&f);
        assert_eq!(
            a.credentials().unwrap(),
            Some(("u".to_string(), Some("s3cret".to_string())))
        );
        a.password = Some("other");
        let e = a.validate().unwrap_err();
        assert_eq!(e.field, "password_file");
        assert!(!e.message.contains("s3cret"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let mut a = access("https://x");
        a.ca_file = Some(&f);
        let e = a.validate().unwrap_err();
        assert_eq!(e.field, "ca_file");
        assert!(e.message.contains("no PEM certificate"), "{}", e.message);
    }
}
