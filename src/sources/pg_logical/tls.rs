//! TLS to PostgreSQL, for the ordinary connections (tokio-postgres) and the
//! replication connection (pgwire-replication), both with rustls.
//!
//! The settings come from the connection URL, with libpq's names and
//! meanings, so the URL an operator already uses with `psql` works as it is:
//!
//! | `sslmode` | TLS | certificate chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | - | - |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | always | no | no |
//! | `verify-ca` | always | yes, against `sslrootcert` | no |
//! | `verify-full` | always | yes, against `sslrootcert` | yes |
//!
//! tokio-postgres knows only `disable`, `prefer` and `require` and refuses
//! unknown URL parameters, so [`PgUrl::parse`] takes `sslmode` and
//! `sslrootcert` out of the URL and hands tokio-postgres a URL it accepts;
//! the checking itself happens in the rustls verifier built here.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the server's certificate chain is checked.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// A connection URL split into what tokio-postgres accepts and the TLS
/// settings unilog handles itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgUrl {
    /// The URL without `sslrootcert`, with `sslmode` one tokio-postgres knows.
    pub url: String,
    pub mode: SslMode,
    /// `sslrootcert`: PEM file of the CA certificates to trust.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`: a client certificate (PEM chain) and its
    /// private key, for servers that authenticate clients by certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl PgUrl {
    /// Splits `url`. The error says which parameter is wrong and how.
    pub fn parse(url: &str) -> Result<PgUrl, String> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut mode = SslMode::default();
        let mut root_cert = None;
        let mut cert = None;
        let mut key = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => {
                    let v = percent_decode(v);
                    mode = SslMode::parse(&v).ok_or_else(|| {
                        format!("sslmode `{v}` is not one of disable, prefer, require, verify-ca, verify-full")
                    })?;
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(percent_decode(v))),
                "sslcert" => cert = Some(PathBuf::from(percent_decode(v))),
                "sslkey" => key = Some(PathBuf::from(percent_decode(v))),
                _ => kept.push(pair),
            }
        }
        if mode.verifies() && root_cert.is_none() {
            return Err(
                "sslmode verify-ca and verify-full need sslrootcert=/path/to/ca.pem in the URL (the CA that signed the server's certificate)"
                    .into(),
            );
        }
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(
                    "sslcert and sslkey go together: give both (the client certificate and its key) or neither"
                        .into(),
                )
            }
        };
        if client_cert.is_some() && mode == SslMode::Disable {
            return Err("sslcert and sslkey need TLS; sslmode=disable turns it off".into());
        }
        let pg_mode = match mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            _ => "require",
        };
        kept.push(match pg_mode {
            "disable" => "sslmode=disable",
            "prefer" => "sslmode=prefer",
            _ => "sslmode=require",
        });
        Ok(PgUrl {
            url: format!("{base}?{}", kept.join("&")),
            mode,
            root_cert,
            client_cert,
        })
    }

    /// The rustls connector for tokio-postgres.
    pub fn connector(&self) -> Result<RustlsConnect, String> {
        if self.mode == SslMode::Disable {
            // Never used: tokio-postgres does not ask for TLS then.
            return Ok(RustlsConnect {
                config: Arc::new(client_config(SslMode::Require, None, None)?),
            });
        }
        Ok(RustlsConnect {
            config: Arc::new(client_config(
                self.mode,
                self.root_cert.as_ref(),
                self.client_cert.as_ref(),
            )?),
        })
    }

    /// The same settings for the replication connection to `host`.
    pub fn replication_tls(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as M;
        let mode = match self.mode {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            SslMode::Require => M::Require,
            SslMode::VerifyCa => M::VerifyCa,
            SslMode::VerifyFull => M::VerifyFull,
        };
        let mut tls = pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: self.root_cert.clone(),
            ..Default::default()
        };
        if let Some((cert, key)) = &self.client_cert {
            tls = tls.with_client_cert(cert, key);
        }
        // pgwire-replication refuses verify-full with an IP address unless
        // the name to check is given; an IP address in the certificate's
        // subjectAltName is checked as libpq does.
        if host.parse::<std::net::IpAddr>().is_ok() {
            tls.sni_hostname = Some(host.to_string());
        }
        tls
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration of `mode`.
fn client_config(
    mode: SslMode,
    root_cert: Option<&PathBuf>,
    client_cert: Option<&(PathBuf, PathBuf)>,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let identity = client_cert.map(load_identity).transpose()?;
    let config = if mode.verifies() {
        let path = root_cert.ok_or("sslrootcert is not set")?;
        let roots = Arc::new(load_roots(path)?);
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    };
    match identity {
        Some((chain, key)) => config
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("sslcert and sslkey do not make a client certificate: {e}")),
        None => Ok(config.with_no_client_auth()),
    }
}

fn load_roots(path: &PathBuf) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read sslrootcert file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslrootcert file {} is not PEM: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert file {} holds no CA certificate",
            path.display()
        ));
    }
    Ok(roots)
}

type Identity = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn load_identity((cert, key): &(PathBuf, PathBuf)) -> Result<Identity, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read sslcert file {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslcert file {} is not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "sslcert file {} holds no certificate",
            cert.display()
        ));
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read the private key in sslkey file {} (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            key.display()
        )
    })?;
    Ok((chain, key))
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require`: encryption without checking who answers (as
/// libpq does). The handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres' TLS hook, backed by rustls.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

/// One connection's TLS handshake.
pub struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnectOne, Self::Error> {
        Ok(RustlsConnectOne {
            config: self.config.clone(),
            name: ServerName::try_from(domain)?.to_owned(),
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let s = connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(s)))
        })
    }
}

/// A TLS session to the server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM then authenticates without channel binding (SCRAM-SHA-256,
        // not -PLUS), which the server accepts unless told otherwise.
        ChannelBinding::none()
    }
}

/// Whether `e` (or one of its causes) is a TLS failure: a certificate that
/// does not check out, a handshake the server refused. Retrying does not
/// help with these.
pub fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_tls_settings_out_of_the_url() {
        let u = PgUrl::parse(
            "postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=a",
        )
        .unwrap();
        assert_eq!(u.mode, SslMode::VerifyFull);
        assert_eq!(u.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            u.url,
            "postgres://u:p@db:5432/x?application_name=a&sslmode=require"
        );
        let plain = PgUrl::parse("postgres://u@h/db").unwrap();
        assert_eq!(plain.mode, SslMode::Prefer);
        assert_eq!(plain.url, "postgres://u@h/db?sslmode=prefer");
        assert_eq!(
            PgUrl::parse("postgres://u@h/db?sslmode=disable")
                .unwrap()
                .url,
            "postgres://u@h/db?sslmode=disable"
        );
    }

    #[test]
    fn refuses_unknown_modes_and_verification_without_a_ca() {
        let e = PgUrl::parse("postgres://u@h/db?sslmode=strict").unwrap_err();
        assert!(e.contains("sslmode `strict`"), "{e}");
        let e = PgUrl::parse("postgres://u@h/db?sslmode=verify-ca").unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
        let e = PgUrl::parse("postgres://u@h/db?sslcert=/c.pem").unwrap_err();
        assert!(e.contains("sslcert and sslkey go together"), "{e}");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let u = PgUrl::parse("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .unwrap();
        let e = u.connector().err().unwrap();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_replication_connection_gets_the_same_settings() {
        let u = PgUrl::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem").unwrap();
        let t = u.replication_tls("127.0.0.1");
        assert_eq!(t.mode, pgwire_replication::SslMode::VerifyFull);
        assert_eq!(t.ca_pem_path, Some(PathBuf::from("/ca.pem")));
        assert_eq!(t.sni_hostname.as_deref(), Some("127.0.0.1"));
        assert_eq!(u.replication_tls("db.local").sni_hostname, None);
    }
}
