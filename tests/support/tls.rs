//! TLS for the tests: certificates made with the `openssl` command, and an
//! HTTPS gateway that puts TLS, basic auth and client certificates in front
//! of a plain HTTP server (the registry stand-in, the search emulator),
//! the way a reverse proxy does in many deployments. A real registry or
//! cluster with TLS switched on is reached by unilog the same way.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `<name>.crt` / `<name>.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    dir.join(format!("{name}.crt"))
}

/// `client.crt` / `client.key` for the user `postgres`, signed by `ca`.
pub fn make_client_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=postgres",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
        ],
    );
    // Extensions make it an X.509 v3 certificate (rustls refuses v1).
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
        ],
    );
}

/// `server.crt` / `server.key` for localhost and 127.0.0.1, signed by `ca`.
pub fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// What the gateway demands and where it forwards.
pub struct GatewayOptions {
    /// The plain server behind it (`http://127.0.0.1:18081`).
    pub upstream: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Basic-auth user and password every request must carry.
    pub basic: Option<(String, String)>,
    /// Demand a client certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// Counters of what the gateway saw.
#[derive(Default)]
pub struct GatewayCounts {
    /// Requests forwarded upstream.
    pub forwarded: AtomicUsize,
    /// Requests answered 401.
    pub refused: AtomicUsize,
    /// Connections whose TLS handshake failed.
    pub handshakes_failed: AtomicUsize,
}

/// An HTTPS gateway on 127.0.0.1, stopped on drop.
pub struct Gateway {
    /// `https://localhost:<port>` (the server certificate names localhost).
    pub url: String,
    pub counts: Arc<GatewayCounts>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct GatewayState {
    upstream: String,
    authorization: Option<String>,
    client: reqwest::Client,
    counts: Arc<GatewayCounts>,
}

fn server_config(opts: &GatewayOptions) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&opts.cert)
        .expect("read the server certificate")
        .collect::<Result<_, _>>()
        .expect("parse the server certificate");
    let key = PrivateKeyDer::from_pem_file(&opts.key).expect("read the server key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let builder = match &opts.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("read the client CA") {
                roots.add(c.expect("parse the client CA")).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .expect("server certificate and key")
}

fn basic_header(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn forward(
    req: Request<Incoming>,
    st: Arc<GatewayState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(expected) = &st.authorization {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            st.counts.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(Response::builder()
                .status(401)
                .header("www-authenticate", "Basic realm=\"test\"")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"error_code":401,"message":"Unauthorized"}"#,
                )))
                .unwrap());
        }
    }
    let url = format!(
        "{}{}",
        st.upstream,
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let method = req.method().clone();
    let mut headers = reqwest::header::HeaderMap::new();
    for name in [hyper::header::CONTENT_TYPE, hyper::header::ACCEPT] {
        if let Some(v) = req.headers().get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answer = st
        .client
        .request(method, url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    st.counts.forwarded.fetch_add(1, Ordering::Relaxed);
    Ok(match answer {
        Ok(resp) => {
            let mut out = Response::builder().status(resp.status());
            if let Some(ct) = resp.headers().get(reqwest::header::CONTENT_TYPE) {
                out = out.header(hyper::header::CONTENT_TYPE, ct.clone());
            }
            let bytes = resp.bytes().await.unwrap_or_default();
            out.body(Full::new(bytes)).unwrap()
        }
        Err(e) => Response::builder()
            .status(502)
            .body(Full::new(Bytes::from(format!("gateway: {e}"))))
            .unwrap(),
    })
}

impl Gateway {
    /// Starts the gateway on its own thread and runtime, so it serves
    /// whatever the test itself is doing.
    pub fn start(opts: GatewayOptions) -> Gateway {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&opts)));
        let counts = Arc::new(GatewayCounts::default());
        let state = Arc::new(GatewayState {
            upstream: opts.upstream.trim_end_matches('/').to_string(),
            authorization: opts.basic.as_ref().map(|(u, p)| basic_header(u, p)),
            client: reqwest::Client::new(),
            counts: counts.clone(),
        });
        let (port, stop) = super::serve_connections(move |tcp| {
            let (acceptor, state) = (acceptor.clone(), state.clone());
            async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        state
                            .counts
                            .handshakes_failed
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req| forward(req, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            }
        });
        Gateway {
            url: format!("https://localhost:{port}"),
            counts,
            stop: Some(stop),
        }
    }
}

/// A CA, a server certificate for localhost and a client certificate, in `dir`.
pub fn make_pki(dir: &Path) -> PathBuf {
    let ca = make_ca(dir, "ca");
    make_server_cert(dir, "ca");
    make_client_cert(dir, "ca");
    ca
}
