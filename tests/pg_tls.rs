//! TLS to PostgreSQL. Each test runs a private cluster with `ssl = on`, a
//! server certificate signed by a CA made in the test, and a `pg_hba.conf`
//! that accepts TCP connections over TLS only (`hostssl`), so a pipeline
//! that streams at all did so encrypted, ordinary and replication
//! connections alike.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::cluster::Cluster;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

fn openssl(dir: &Path, args: &[&str]) {
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
fn make_ca(dir: &Path, name: &str) -> PathBuf {
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

/// `server.crt` / `server.key` for localhost and 127.0.0.1, signed by `ca`.
fn make_server_cert(dir: &Path, ca: &str) {
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

/// A cluster that takes TCP connections over TLS only, with a database
/// `shop` and a table `items`. Returns the cluster, the folder of the
/// certificates, and the path of the CA that signed the server's.
async fn tls_cluster() -> (Cluster, tempfile::TempDir, PathBuf) {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    make_server_cert(certs.path(), "ca");
    let cluster =
        Cluster::init("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
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
    cluster.write(
        "pg_hba.conf",
        b"local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n",
        0o600,
    );
    cluster.pg_ctl(&["start", "-w", "-t", "60"]);
    let url = verify_full_url(&cluster, "postgres", &ca);
    let admin = unilog::sources::pg_logical::connect_plain(&url)
        .await
        .expect("connect with verify-full");
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    unilog::sources::pg_logical::connect_plain(&verify_full_url(&cluster, "shop", &ca))
        .await
        .unwrap()
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items VALUES (1, 1)")
        .await
        .unwrap();
    (cluster, certs, ca)
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
    let (cluster, _certs, ca) = tls_cluster().await;
    let url = verify_full_url(&cluster, "shop", &ca);
    let (_dir, cfg, topic) = pipeline(&stack, &url);
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
    let (cluster, certs, _ca) = tls_cluster().await;
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
    let (cluster, _certs, _ca) = tls_cluster().await;
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
