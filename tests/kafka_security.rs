//! TLS and SASL from unilog to Kafka, against the local stack's broker
//! (Tansu 0.6.0) started privately on free ports, with the real unilog
//! binary.
//!
//! What the broker allows shapes the tests:
//! - Tansu 0.6.0 cannot serve TLS from its command line: `--cert` and
//!   `--key` belong to one exclusive argument group, so giving both is
//!   refused and giving one leaves TLS off. A TLS endpoint made here
//!   (rustls, with a CA and certificate the test makes) stands in front of
//!   the plaintext broker and advertises itself, so every connection of
//!   unilog and of the test's consumer is TLS; the Kafka traffic behind it is
//!   Tansu's.
//! - With `--authentication`, Tansu runs SASL with SCRAM-SHA-256 and
//!   SCRAM-SHA-512, and refuses PLAIN (it closes the connection: no shared
//!   mechanism). Its memory and S3 storage keep no SCRAM credentials
//!   (`tansu user create` answers ok and stores nothing), so every login is
//!   refused with `unknown-user`: the tests check that refusal. A
//!   successful login is the ignored test at the end, against Tansu built
//!   with PostgreSQL storage, which stores users
//!   (`scripts/broker-restart-test`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::tls::{make_ca, make_server_cert};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// A TLS endpoint on `port` that forwards each connection to the plaintext
/// broker on `upstream`, with `server.crt`/`server.key` from `certs`.
struct TlsFront {
    /// Connections whose TLS handshake completed.
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_front(certs: &Path, port: u16, upstream: u16) -> TlsFront {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{crypto, ServerConfig};

    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("server.crt"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let config = ServerConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                // A client that does not trust the certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    TlsFront { handshakes, task }
}

/// A database with a table `items` (one row) and a pipeline on it whose
/// `kafka.properties` are `properties` (YAML lines under `properties:`).
async fn pipeline(stack: &Stack, brokers: &str, properties: &str) -> (TestDb, Fixture, String) {
    let db = TestDb::create(stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items VALUES (1, 1);")
        .await
        .unwrap();
    let topic = format!("sec.items.{}", suffix());
    let own = Stack {
        pg_url: stack.pg_url.clone(),
        pg_admin_url: stack.pg_admin_url.clone(),
        brokers: brokers.to_string(),
        registry: stack.registry.clone(),
    };
    let mapping = format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n");
    let fx = Fixture::new(&own, &db, &[("items.yaml", mapping)], "");
    let text = std::fs::read_to_string(&fx.config).unwrap();
    let text = text.replacen(
        "  partitions: 3\n",
        &format!("  partitions: 3\n  properties:\n{properties}"),
        1,
    );
    std::fs::write(&fx.config, text).unwrap();
    (db, fx, topic)
}

/// `unilog run` on the fixture, with `env` added; stdout and stderr go to files.
fn start_unilog(fx: &Fixture, env: &[(&str, &str)]) -> (Killed, PathBuf, PathBuf) {
    let out = fx.dir.path().join("unilog.out");
    let err = fx.dir.path().join("unilog.err");
    let child = Command::new(unilog_bin())
        .args(["run", "--config"])
        .arg(&fx.config)
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    (Killed(child), out, err)
}

/// Everything unilog printed.
fn printed(out: &Path, err: &Path) -> String {
    format!(
        "{}{}",
        std::fs::read_to_string(out).unwrap_or_default(),
        std::fs::read_to_string(err).unwrap_or_default()
    )
}

/// Waits for unilog to exit, at most `timeout`.
fn exit_within(unilog: &mut Killed, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(status) = unilog.0.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// `unilog check` on the fixture, with `env` added: exit code and output.
fn check(fx: &Fixture, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(unilog_bin())
        .args(["check", "--config"])
        .arg(&fx.config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_reach_the_topic_over_tls() {
    let stack = Stack::from_env();
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    make_server_cert(certs.path(), "ca");
    let (plain, port) = (free_port(), free_port());
    let _broker = private_broker(plain, port, &[]);
    let front = tls_front(certs.path(), port, plain).await;
    let brokers = format!("127.0.0.1:{port}");
    let ca_text = ca.display().to_string();
    let props = format!("    security.protocol: SSL\n    ssl.ca.location: {ca_text}\n");
    let (db, fx, topic) = pipeline(&stack, &brokers, &props).await;

    let (code, text) = check(&fx, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("kafka: brokers {brokers} reachable")),
        "{text}"
    );

    let (mut unilog, out, err) = start_unilog(&fx, &[]);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (2, 2)")
        .await
        .unwrap();
    let tls = [
        ("security.protocol", "SSL"),
        ("ssl.ca.location", ca_text.as_str()),
    ];
    let records = consume_with(&brokers, &tls, &topic, 2, Duration::from_secs(2), WAIT).await;
    let ids = sorted_ids(&stack.registry, &records).await;
    assert_eq!(ids, vec![1, 2]);
    // The only address anyone was given is the TLS endpoint's.
    assert!(front.handshakes.load(Ordering::Relaxed) >= 2);
    assert!(sigterm(&mut unilog.0).success(), "{}", printed(&out, &err));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_ca_stops_unilog_naming_the_certificate_setting() {
    let stack = Stack::from_env();
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path(), "ca");
    make_server_cert(certs.path(), "ca");
    let other = make_ca(certs.path(), "other");
    let (plain, port) = (free_port(), free_port());
    let _broker = private_broker(plain, port, &[]);
    let front = tls_front(certs.path(), port, plain).await;
    let brokers = format!("127.0.0.1:{port}");
    let props = format!(
        "    security.protocol: SSL\n    ssl.ca.location: {}\n",
        other.display()
    );
    let (db, fx, _topic) = pipeline(&stack, &brokers, &props).await;

    let (code, text) = check(&fx, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "kafka: brokers {brokers} refused the connection: TLS handshake failed"
        )) && text.contains("certificate verify failed")
            && text.contains("ssl.ca.location"),
        "{text}"
    );

    // `run` stops at once instead of retrying what cannot pass.
    let started = Instant::now();
    let (mut unilog, out, err) = start_unilog(&fx, &[]);
    let status = exit_within(&mut unilog, Duration::from_secs(60));
    let text = printed(&out, &err);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    assert!(started.elapsed() < Duration::from_secs(30), "{text}");
    assert!(
        text.contains("TLS handshake failed") && text.contains("ssl.ca.location"),
        "{text}"
    );
    assert!(!text.contains("retrying"), "{text}");

    // `unilog join` and `unilog index` check their brokers the same way.
    let kafka = format!("kafka:\n  brokers: {brokers}\n  properties:\n{props}");
    let files = [
        (
            "join",
            format!("name: j\n{kafka}schema_registry:\n  url: {}\nleft:\n  topic: users\nright:\n  topic: conns\n  key: user_id\noutput:\n  topic: user.docs\n  record: UserDocument\n  field: connections\nstate_dir: state\n", stack.registry),
        ),
        (
            "index",
            format!("name: i\n{kafka}schema_registry:\n  url: {}\nsearch:\n  url: http://127.0.0.1:9\nindexes:\n  - topic: users\n    alias: users\n", stack.registry),
        ),
    ];
    for (cmd, text) in files {
        let path = fx.dir.path().join(format!("{cmd}.yaml"));
        std::fs::write(&path, text).unwrap();
        let started = Instant::now();
        let out = unilog_output(&[cmd], &path);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{cmd}: {text}");
        assert!(started.elapsed() < Duration::from_secs(30), "{cmd}: {text}");
        assert!(
            text.contains("TLS handshake failed") && text.contains("ssl.ca.location"),
            "{cmd}: {text}"
        );
    }
    assert_eq!(front.handshakes.load(Ordering::Relaxed), 0);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_scram_login_stops_unilog_and_the_password_stays_secret() {
    let stack = Stack::from_env();
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    make_server_cert(certs.path(), "ca");
    let (plain, port) = (free_port(), free_port());
    // Advertised: the TLS endpoint; a SASL_PLAINTEXT client is refused
    // during the login, before it reads the metadata.
    let _broker = private_broker(plain, port, &["--authentication"]);
    let front = tls_front(certs.path(), port, plain).await;
    let password = format!("pw-{}-secret", suffix());
    let env = [("UNILOG_TEST_KAFKA_PASSWORD", password.as_str())];
    let cases = [
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", plain),
        ("SASL_PLAINTEXT", "SCRAM-SHA-512", plain),
        ("SASL_SSL", "SCRAM-SHA-512", port),
    ];
    for (protocol, mechanism, to) in cases {
        let brokers = format!("127.0.0.1:{to}");
        let mut props = format!(
            "    security.protocol: {protocol}\n    sasl.mechanism: {mechanism}\n    sasl.username: unilog\n    sasl.password: \"${{UNILOG_TEST_KAFKA_PASSWORD}}\"\n"
        );
        if protocol == "SASL_SSL" {
            props.push_str(&format!("    ssl.ca.location: {}\n", ca.display()));
        }
        let (db, fx, _topic) = pipeline(&stack, &brokers, &props).await;
        let what = format!("{protocol} {mechanism}");

        let (code, text) = check(&fx, &env);
        assert_eq!(code, Some(2), "{what}: {text}");
        assert!(
            text.contains(&format!(
                "kafka: brokers {brokers} refused the connection: SASL authentication failed"
            )) && text.contains("sasl.password"),
            "{what}: {text}"
        );
        assert!(
            !text.contains(&password),
            "{what}: the password was printed"
        );

        let (mut unilog, out, err) = start_unilog(&fx, &env);
        let status = exit_within(&mut unilog, Duration::from_secs(60));
        let text = printed(&out, &err);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{what}: {text}");
        assert!(
            text.contains("SASL authentication failed"),
            "{what}: {text}"
        );
        assert!(
            !text.contains(&password),
            "{what}: the password was printed"
        );
        db.cleanup().await;
    }
    // SASL_SSL logged in over TLS: the refusal came from the broker behind it.
    assert!(front.handshakes.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mechanism_the_broker_does_not_offer_is_named_while_retrying() {
    let stack = Stack::from_env();
    let port = free_port();
    let _broker = private_broker(port, port, &["--authentication"]);
    let password = format!("pw-{}-secret", suffix());
    let env = [("UNILOG_TEST_KAFKA_PASSWORD", password.as_str())];
    let brokers = format!("127.0.0.1:{port}");
    let props = "    security.protocol: SASL_PLAINTEXT\n    sasl.mechanism: PLAIN\n    sasl.username: unilog\n    sasl.password: \"${UNILOG_TEST_KAFKA_PASSWORD}\"\n";
    let (db, fx, _topic) = pipeline(&stack, &brokers, props).await;

    // The broker just closes the connection, which a broker going down
    // does too: unilog retries, and says what to check.
    let (mut unilog, out, err) = start_unilog(&fx, &env);
    let start = Instant::now();
    let text = loop {
        let text = printed(&out, &err);
        if text.contains("retrying") || start.elapsed() > Duration::from_secs(60) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.contains("SASL PLAIN mechanism handshake failed")
            && text.contains("during the SASL handshake")
            && text.contains("`sasl.mechanism`"),
        "{text}"
    );
    assert!(unilog.0.try_wait().unwrap().is_none(), "{text}");
    assert!(sigterm(&mut unilog.0).success());
    assert!(
        !printed(&out, &err).contains(&password),
        "the password was printed"
    );
    db.cleanup().await;
}

/// A successful SCRAM-SHA-512 login, which needs a broker that stores
/// users: Tansu with PostgreSQL storage (see `support::persistent_broker`).
/// Users are stored through the broker (AlterUserScramCredentials), and a
/// broker with `--authentication` refuses every request before a login, so
/// the user is created first and the broker is then started again with
/// authentication on the same storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a broker that stores SCRAM users: run scripts/broker-restart-test"]
async fn a_scram_login_to_a_broker_that_stores_users_streams_rows() {
    use support::persistent_broker::{or_skip, PersistentBroker};
    let Some((bin, schema)) = or_skip("a_scram_login_to_a_broker_that_stores_users_streams_rows")
    else {
        return;
    };
    let stack = Stack::from_env();
    let mut broker = PersistentBroker::create(&stack, bin, &schema).await;
    broker.start(false);
    let password = format!("pw-{}-secret", suffix());
    broker.create_user("unilog", &password, "scram512");
    broker.stop("TERM");
    broker.start(true);
    let brokers = broker.brokers();
    let env = [("UNILOG_TEST_KAFKA_PASSWORD", password.as_str())];
    let props = "    security.protocol: SASL_PLAINTEXT\n    sasl.mechanism: SCRAM-SHA-512\n    sasl.username: unilog\n    sasl.password: \"${UNILOG_TEST_KAFKA_PASSWORD}\"\n";
    let (db, fx, topic) = pipeline(&stack, &brokers, props).await;

    let (code, text) = check(&fx, &env);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("kafka: brokers {brokers} reachable")),
        "{text}"
    );
    // The same user with another password is refused.
    let (code, text) = check(&fx, &[("UNILOG_TEST_KAFKA_PASSWORD", "not-the-password")]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("SASL authentication failed"), "{text}");

    let (mut unilog, out, err) = start_unilog(&fx, &env);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (2, 2)")
        .await
        .unwrap();
    let sasl = [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "unilog"),
        ("sasl.password", password.as_str()),
    ];
    let records = consume_with(&brokers, &sasl, &topic, 2, Duration::from_secs(2), WAIT).await;
    let ids = sorted_ids(&stack.registry, &records).await;
    assert_eq!(ids, vec![1, 2]);
    assert!(sigterm(&mut unilog.0).success(), "{}", printed(&out, &err));
    assert!(
        !printed(&out, &err).contains(&password),
        "the password was printed"
    );
    db.cleanup().await;
    broker.cleanup().await;
}
