//! TLS to PostgreSQL. Each test runs a private cluster with `ssl = on`, a
//! server certificate signed by a CA made in the test, and a `pg_hba.conf`
//! that accepts TCP connections over TLS only (`hostssl`), so a pipeline
//! that streams at all did so encrypted, ordinary and replication
//! connections alike.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::cluster::Cluster;
use support::tls::{make_ca, make_client_cert, make_server_cert};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// TCP over TLS only, no password.
const HBA_TLS_ONLY: &str = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n";
/// TCP over TLS only, authenticated by a client certificate.
const HBA_CLIENT_CERT: &str = "local all all trust\nhostssl all all 127.0.0.1/32 cert\nhostssl replication all 127.0.0.1/32 cert\n";

/// A cluster that takes TCP connections as `hba` says, with a database
/// `shop` and a table `items`. Returns the cluster, the folder of the
/// certificates (the CA `ca.crt`, and a client certificate `client.crt` /
/// `client.key` for the user `postgres`), and the path of the CA.
async fn tls_cluster(hba: &str) -> (Cluster, tempfile::TempDir, PathBuf) {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    make_server_cert(certs.path(), "ca");
    make_client_cert(certs.path(), "ca");
    let cluster = Cluster::init("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n");
    cluster.write("ca.crt", &std::fs::read(&ca).unwrap(), 0o644);
    cluster.write(
        "server.crt",
        &std::fs::read(certs.path().join("server.crt")).unwrap(),
        0o644,
    );
    cluster.write(
        "server.key",
        &std::fs::read(certs.path().join("server.key")).unwrap(),
        0o600,
    );
    cluster.write("pg_hba.conf", hba.as_bytes(), 0o600);
    cluster.pg_ctl(&["start", "-w", "-t", "60"]);
    let url = with_client_cert(&verify_full_url(&cluster, "postgres", &ca), certs.path());
    let admin = unilog::sources::pg_logical::connect_plain(&url)
        .await
        .expect("connect with verify-full");
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    unilog::sources::pg_logical::connect_plain(&with_client_cert(
        &verify_full_url(&cluster, "shop", &ca),
        certs.path(),
    ))
    .await
        .unwrap()
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items VALUES (1, 1)")
        .await
        .unwrap();
    (cluster, certs, ca)
}

/// `url` with the client certificate of [`make_client_cert`] in `dir`.
fn with_client_cert(url: &str, dir: &Path) -> String {
    format!(
        "{url}&sslcert={}&sslkey={}",
        dir.join("client.crt").display(),
        dir.join("client.key").display()
    )
}

fn verify_full_url(cluster: &Cluster, db: &str, ca: &Path) -> String {
    format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        ca.display()
    )
}

/// A pipeline file on `url` in a fresh folder; returns the folder, the
/// loaded config and the topic.
fn pipeline(stack: &Stack, url: &str) -> (tempfile::TempDir, unilog::config::LoadedConfig, String) {
    let topic = format!("it.tls.{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("items.yaml"),
        format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n"),
    )
    .unwrap();
    let config = dir.path().join("p.yaml");
    std::fs::write(
        &config,
        format!(
            "name: tls_{}\nsource:\n  postgres:\n    url: \"{url}\"\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nmappings: [items.yaml]\nstate_dir: state\nbatch:\n  max_wait_ms: 10\n",
            suffix(),
            stack.brokers,
            stack.registry
        ),
    )
    .unwrap();
    let cfg = unilog::config::LoadedConfig::load(&config).unwrap();
    (dir, cfg, topic)
}

/// Runs a pipeline that must fail at start-up; returns the error.
async fn run_fails(cfg: &unilog::config::LoadedConfig) -> unilog::pipeline::PipelineError {
    let stop = Arc::new(AtomicBool::new(false));
    tokio::time::timeout(WAIT, unilog::pipeline::run(cfg, stop))
        .await
        .expect("the pipeline neither failed nor ran")
        .expect_err("the pipeline started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_full_against_the_servers_ca_streams_over_tls() {
    let stack = Stack::from_env();
    let (cluster, _certs, ca) = tls_cluster(HBA_TLS_ONLY).await;
    let url = verify_full_url(&cluster, "shop", &ca);
    let (_dir, cfg, topic) = pipeline(&stack, &url);
    let report = unilog::pipeline::check(&cfg).await.expect("check");
    assert!(
        report.iter().any(|l| l.contains("over TLS (TLSv1.3)")),
        "check does not show TLS: {report:?}"
    );
    let slot = cfg.slot();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move { unilog::pipeline::run(&cfg, flag).await });

    let admin =
        unilog::sources::pg_logical::connect_plain(&verify_full_url(&cluster, "postgres", &ca))
            .await
            .unwrap();
    // The walsender of the slot, encrypted.
    let app = format!("unilog-{slot}");
    let start = std::time::Instant::now();
    loop {
        let row = admin
            .query_opt(
                "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid
                 WHERE r.application_name = $1 AND r.state = 'streaming'",
                &[&app],
            )
            .await
            .unwrap();
        if let Some(r) = row {
            assert!(
                r.get::<_, bool>(0),
                "the replication connection is not encrypted"
            );
            break;
        }
        assert!(
            !handle.is_finished(),
            "the pipeline stopped: {:?}",
            handle.await
        );
        assert!(start.elapsed() < WAIT, "not streaming after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = unilog::sources::pg_logical::connect_plain(&url)
        .await
        .unwrap();
    for id in 2..=20i64 {
        client
            .execute("INSERT INTO items VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
    }
    let records = consume(&stack.brokers, &topic, 20, Duration::from_secs(2), WAIT).await;
    let mut keys: Vec<i64> = records
        .iter()
        .filter_map(|r| r.key.as_deref().and_then(|k| k.parse().ok()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(
        keys,
        (1..=20).collect::<Vec<_>>(),
        "the snapshot row and 19 changes"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handle.await.unwrap().expect("pipeline failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_ca_is_refused_naming_tls() {
    let stack = Stack::from_env();
    let (cluster, certs, _ca) = tls_cluster(HBA_TLS_ONLY).await;
    let other = make_ca(certs.path(), "other");
    let url = verify_full_url(&cluster, "shop", &other);
    let (_dir, cfg, _topic) = pipeline(&stack, &url);
    let err = run_fails(&cfg).await;
    let text = err.to_string();
    eprintln!("refused: {text}");
    assert!(
        text.contains("TLS to PostgreSQL")
            && text.contains("sslrootcert")
            && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(
        !err.is_transient(),
        "a wrong CA is not worth retrying: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sslmode_disable_against_a_tls_only_server_is_refused_clearly() {
    let stack = Stack::from_env();
    let (cluster, _certs, _ca) = tls_cluster(HBA_TLS_ONLY).await;
    let url = format!("{}?sslmode=disable", cluster.url("shop"));
    let (_dir, cfg, _topic) = pipeline(&stack, &url);
    let err = run_fails(&cfg).await;
    let text = err.to_string();
    eprintln!("refused: {text}");
    assert!(
        text.contains("no encryption")
            && text.contains("only over TLS")
            && text.contains("sslmode=require"),
        "{text}"
    );
    assert!(!err.is_transient(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_authenticates_both_connections() {
    let stack = Stack::from_env();
    let (cluster, certs, ca) = tls_cluster(HBA_CLIENT_CERT).await;

    // Without a client certificate the server refuses, and says why.
    let (_dir, cfg, _topic) = pipeline(&stack, &verify_full_url(&cluster, "shop", &ca));
    let err = run_fails(&cfg).await;
    let text = err.to_string();
    eprintln!("refused: {text}");
    assert!(
        text.contains("requires a valid client certificate") && text.contains("add sslcert="),
        "{text}"
    );
    assert!(!err.is_transient(), "{text}");

    // With it, the snapshot and the stream both go through.
    let url = with_client_cert(&verify_full_url(&cluster, "shop", &ca), certs.path());
    let (_dir, cfg, topic) = pipeline(&stack, &url);
    let slot = cfg.slot();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move { unilog::pipeline::run(&cfg, flag).await });
    let admin = unilog::sources::pg_logical::connect_plain(&with_client_cert(
        &verify_full_url(&cluster, "postgres", &ca),
        certs.path(),
    ))
    .await
    .unwrap();
    let app = format!("unilog-{slot}");
    let start = std::time::Instant::now();
    while admin
        .query_opt(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
            &[&app],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            !handle.is_finished(),
            "the pipeline stopped: {:?}",
            handle.await
        );
        assert!(start.elapsed() < WAIT, "not streaming after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unilog::sources::pg_logical::connect_plain(&url)
        .await
        .unwrap()
        .execute("INSERT INTO items VALUES (2, 2)", &[])
        .await
        .unwrap();
    let records = consume(&stack.brokers, &topic, 2, Duration::from_secs(2), WAIT).await;
    let mut keys: Vec<String> = records.iter().filter_map(|r| r.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, ["1", "2"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handle.await.unwrap().expect("pipeline failed");
}
