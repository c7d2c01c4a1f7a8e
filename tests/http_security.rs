//! TLS, basic auth and client certificates to the schema registry and the
//! search server. The local stand-in registry and search emulator speak
//! plain HTTP, so each test puts an HTTPS gateway in front of them
//! (tests/support/tls.rs) with a CA made in the test: unilog must verify
//! the gateway's certificate, present its own and send the password, or
//! the request never reaches the server.

mod feeds;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::Value as Avro;
use feeds::{create_topic, envelope_schema, search_url, Feed, Search};
use support::tls::{make_pki, Gateway, GatewayOptions};
use support::*;

const WAIT: Duration = Duration::from_secs(120);
const REGISTRY_PASSWORD: &str = "reg-Secret-7d1f";
const SEARCH_PASSWORD: &str = "search-Secret-91ac";

/// A gateway to `upstream` demanding `user`/`password` and a client
/// certificate signed by the test CA in `pki`.
fn gateway(pki: &Path, upstream: &str, user: &str, password: &str) -> Gateway {
    Gateway::start(GatewayOptions {
        upstream: upstream.to_string(),
        cert: pki.join("server.crt"),
        key: pki.join("server.key"),
        basic: Some((user.to_string(), password.to_string())),
        client_ca: Some(pki.join("ca.crt")),
    })
}

/// Replaces the fixture's plain registry section with `section`.
fn set_registry(fx: &Fixture, stack: &Stack, section: &str) {
    let text = std::fs::read_to_string(&fx.config).unwrap();
    let plain = format!("schema_registry:\n  url: {}\n", stack.registry);
    assert!(text.contains(&plain), "{text}");
    std::fs::write(&fx.config, text.replace(&plain, section)).unwrap();
}

/// The registry section for `url`, with the files in the pipeline's folder
/// (relative paths are resolved against it).
fn registry_section(url: &str, extra: &str) -> String {
    format!(
        "schema_registry:\n  url: {url}\n  username: unilog\n  password_file: registry.pw\n{extra}"
    )
}

const TLS_FILES: &str = "  ca_file: ca.crt\n  cert_file: client.crt\n  key_file: client.key\n";

fn copy_pki(pki: &Path, to: &Path) {
    for f in ["ca.crt", "client.crt", "client.key"] {
        std::fs::copy(pki.join(f), to.join(f)).unwrap();
    }
}

/// What the pipeline tests share: a test CA, a gateway to the registry,
/// a database with `items` (after `sql`), and a pipeline fixture on it
/// with the client certificate files in its folder.
struct Setup {
    _pki: tempfile::TempDir,
    gw: Gateway,
    db: TestDb,
    topic: String,
    fx: Fixture,
}

async fn setup(stack: &Stack, sql: &str) -> Setup {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let gw = gateway(pki.path(), &stack.registry, "unilog", REGISTRY_PASSWORD);
    let db = TestDb::create(stack).await;
    db.client
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); {sql}"
        ))
        .await
        .unwrap();
    let topic = format!("it.tls.{}", suffix());
    let mapping = format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n");
    let fx = Fixture::new(stack, &db, &[("items.yaml", mapping)], "");
    copy_pki(pki.path(), fx.dir.path());
    Setup {
        _pki: pki,
        gw,
        db,
        topic,
        fx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_registers_through_tls_basic_auth_and_a_client_certificate() {
    let stack = Stack::from_env();
    let Setup {
        _pki,
        gw,
        db,
        topic,
        fx,
    } = setup(&stack, "INSERT INTO items VALUES (1, 1);").await;
    std::fs::write(
        fx.dir.path().join("registry.pw"),
        format!("{REGISTRY_PASSWORD}\n"),
    )
    .unwrap();
    set_registry(&fx, &stack, &registry_section(&gw.url, TLS_FILES));

    let log = fx.dir.path().join("unilog.log");
    let mut unilog = Killed(
        Command::new(unilog_bin())
            .args(["run", "--config"])
            .arg(&fx.config)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (2, 2); UPDATE items SET val = 3 WHERE id = 1;")
        .await
        .unwrap();
    let records = consume(&stack.brokers, &topic, 3, Duration::from_secs(2), WAIT).await;
    // The schema ids in the records were handed out through the gateway;
    // the same registry answers them without it.
    let mut dec = Decoder::new(&stack.registry);
    let events = decode_all(&mut dec, &records).await;
    let mut seen: Vec<(String, i64, i64)> = events
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_string(),
                e["after"]["id"].as_i64().unwrap(),
                e["after"]["val"].as_i64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("insert".to_string(), 2, 2),
            ("snapshot".to_string(), 1, 1),
            ("update".to_string(), 1, 3),
        ]
    );
    assert!(sigterm(&mut unilog.0).success());
    assert!(gw.counts.forwarded.load(Ordering::Relaxed) > 0);
    assert_eq!(gw.counts.refused.load(Ordering::Relaxed), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(REGISTRY_PASSWORD),
        "the password is in the log"
    );
    db.cleanup().await;
}

/// `unilog check` against the gateway, with one thing wrong at a time:
/// each is refused at once (no waiting, as for an outage) with a message
/// that names the setting, and never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_credential_mistakes_are_named_and_not_retried() {
    let stack = Stack::from_env();
    let Setup {
        _pki, gw, db, fx, ..
    } = setup(&stack, "").await;
    let pw = fx.dir.path().join("registry.pw");
    let plain = std::fs::read_to_string(&fx.config).unwrap();
    let base = fx.config.clone();
    let check = |section: String, password: &str| {
        std::fs::write(&pw, password).unwrap();
        std::fs::write(
            &base,
            plain.replace(
                &format!("schema_registry:\n  url: {}\n", stack.registry),
                &section,
            ),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let out = unilog_output(&["check"], &base);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "check waited: {text}"
        );
        (out.status.code(), text)
    };

    // All right: check passes.
    let (code, text) = check(registry_section(&gw.url, TLS_FILES), REGISTRY_PASSWORD);
    assert_eq!(code, Some(0), "{text}");

    // No ca_file: the gateway's certificate is not trusted.
    let (code, text) = check(
        registry_section(&gw.url, "  cert_file: client.crt\n  key_file: client.key\n"),
        REGISTRY_PASSWORD,
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("TLS connection failed"), "{text}");
    assert!(text.contains("ca_file"), "{text}");

    // No client certificate: the gateway ends the connection. With TLS 1.3
    // the client may see the alert or only a closed connection; either way
    // the message points at the client certificate settings.
    let (code, text) = check(
        registry_section(&gw.url, "  ca_file: ca.crt\n"),
        REGISTRY_PASSWORD,
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("cert_file"), "{text}");
    assert!(gw.counts.handshakes_failed.load(Ordering::Relaxed) > 0);

    // A wrong password: refused credentials, and the password not shown.
    let wrong = "wrong-Secret-55e0";
    let (code, text) = check(registry_section(&gw.url, TLS_FILES), wrong);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(!text.contains(wrong), "the password is shown: {text}");
    assert!(gw.counts.refused.load(Ordering::Relaxed) > 0);

    // TLS files with a plain http:// URL: refused at load, with the line.
    let (code, text) = check(
        registry_section(&stack.registry, TLS_FILES),
        REGISTRY_PASSWORD,
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("schema_registry.url"), "{text}");
    assert!(text.contains("use an https:// URL"), "{text}");

    // A missing password file: refused at load, naming the file.
    std::fs::remove_file(&pw).ok();
    std::fs::write(
        &base,
        plain.replace(
            &format!("schema_registry:\n  url: {}\n", stack.registry),
            &registry_section(&gw.url, TLS_FILES),
        ),
    )
    .unwrap();
    let out = unilog_output(&["check"], &base);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("schema_registry.password_file"), "{text}");
    assert!(text.contains("registry.pw"), "{text}");
    db.cleanup().await;
}

const ROW: &[(&str, &str)] = &[("user_id", "long"), ("name", "string")];

fn user(id: i64, name: &str) -> Vec<(&'static str, Avro)> {
    vec![
        ("user_id", Avro::Long(id)),
        ("name", Avro::String(name.into())),
    ]
}

/// The indexer writes through a gateway that demands TLS, a client
/// certificate and basic auth on both the registry and the search server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_indexer_reaches_registry_and_search_over_tls_with_basic_auth() {
    let stack = Stack::from_env();
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let reg_gw = gateway(pki.path(), &stack.registry, "unilog", REGISTRY_PASSWORD);
    let search_gw = gateway(pki.path(), &search_url(), "indexer", SEARCH_PASSWORD);
    let s = suffix();
    let topic = format!("ix.tls.{s}");
    let alias = format!("tls_{s}");
    create_topic(&stack.brokers, &topic, 1).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &topic,
        &envelope_schema("User", ROW),
    )
    .await;
    for id in 1..=20 {
        feed.upsert(&id.to_string(), "insert", user(id, &format!("user {id}")))
            .await;
    }

    let dir = tempfile::tempdir().unwrap();
    copy_pki(pki.path(), dir.path());
    std::fs::write(dir.path().join("registry.pw"), REGISTRY_PASSWORD).unwrap();
    let write = |search_password: &str| {
        let text = format!(
            "name: ix_{s}\nkafka:\n  brokers: {}\n{}search:\n  url: {}\n  username: indexer\n  password: ${{SEARCH_TEST_PASSWORD_{s}}}\n{TLS_FILES}indexes:\n  - topic: {topic}\n    alias: {alias}\nbatch:\n  max_docs: 100\n  max_wait_ms: 100\nretry:\n  initial_ms: 50\n  max_ms: 500\n",
            stack.brokers,
            registry_section(&reg_gw.url, TLS_FILES),
            search_gw.url,
        );
        let path = dir.path().join("index.yaml");
        std::fs::write(&path, text).unwrap();
        std::env::set_var(format!("SEARCH_TEST_PASSWORD_{s}"), search_password);
        Arc::new(unilog::indexer::config::LoadedIndexerConfig::load(&path).unwrap())
    };

    // A wrong search password stops the indexer with the reason; it is
    // not retried as an outage would be.
    let cfg = write("not-the-password");
    let stop = Arc::new(AtomicBool::new(false));
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        unilog::indexer::run(cfg, stop.clone()),
    )
    .await
    .expect("the indexer waited on refused credentials")
    .expect_err("the indexer ran with a wrong password");
    let msg = err.to_string();
    assert!(msg.contains("refused the credentials"), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");

    let cfg = write(SEARCH_PASSWORD);
    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn(unilog::indexer::run(cfg, stop.clone()));
    let search = Search::new();
    search.wait_count(&alias, 20, Duration::from_secs(60)).await;
    assert_eq!(search.doc(&alias, "7").await.unwrap()["name"], "user 7");
    stop.store(true, Ordering::Relaxed);
    let stats = live.await.unwrap().expect("indexer failed");
    assert_eq!(stats.indexed, 20, "{stats:?}");
    assert!(search_gw.counts.forwarded.load(Ordering::Relaxed) > 0);
    assert!(reg_gw.counts.forwarded.load(Ordering::Relaxed) > 0);
    let (_, a) = search.get(&format!("/_alias/{alias}")).await;
    if let Some(index) = a.as_object().and_then(|o| o.keys().next()) {
        search.delete(index).await;
    }
}
