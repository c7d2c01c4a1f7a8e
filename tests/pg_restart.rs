//! PostgreSQL restarts under a running pipeline: unilog retries with
//! backoff, resumes from its slot, and nothing is lost. The test runs its own
//! small PostgreSQL cluster, so the shared one stays up for other tests.

mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

async fn streaming(admin: &tokio_postgres::Client) -> bool {
    admin
        .query_opt(
            "SELECT 1 FROM pg_stat_replication WHERE state IN ('catchup', 'streaming')",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn insert_range(url: &str, from: i64, to: i64) {
    let client = connect(url).await;
    for id in from..to {
        client
            .execute("INSERT INTO items VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
    }
}

/// A private cluster with a database `shop` and a table `items`, and
/// unilog streaming it to a fresh topic.
struct Setup {
    stack: Stack,
    cluster: Cluster,
    url: String,
    topic: String,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
    unilog: Killed,
}

async fn setup() -> Setup {
    let stack = Stack::from_env();
    let cluster = Cluster::start("");
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let url = cluster.url("shop");
    connect(&url)
        .await
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL)")
        .await
        .unwrap();

    let topic = format!("it.pgr.{}", suffix());
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
            "name: pgr\nsource:\n  postgres:\n    url: {url}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nmappings: [items.yaml]\nstate_dir: state\n",
            stack.brokers, stack.registry
        ),
    )
    .unwrap();
    let log = dir.path().join("unilog.log");
    let unilog = Killed(
        Command::new(unilog_bin())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !streaming(&admin).await {
        assert!(
            start.elapsed() < WAIT,
            "not streaming: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    Setup {
        stack,
        cluster,
        url,
        topic,
        dir,
        log,
        unilog,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_is_waited_for_and_nothing_is_lost() {
    let Setup {
        stack,
        cluster,
        url,
        topic,
        dir: _dir,
        log,
        mut unilog,
    } = setup().await;
    insert_range(&url, 1, 201).await;
    // Restart the server under the pipeline (fast shutdown: connections are cut).
    cluster.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    insert_range(&url, 201, 401).await;

    let records = consume(&stack.brokers, &topic, 400, Duration::from_secs(3), WAIT).await;
    assert!(
        unilog.0.try_wait().unwrap().is_none(),
        "unilog exited: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("retrying"),
        "no retry after the restart:\n{text}"
    );
    let keys: HashSet<String> = records.iter().filter_map(|r| r.key.clone()).collect();
    let expected: HashSet<String> = (1..401).map(|i: i64| i.to_string()).collect();
    assert_eq!(keys, expected, "changes lost across the restart");
    let ids: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.headers.get("unilog.dedup_id").map(String::as_str))
        .collect();
    assert_eq!(
        ids.len(),
        400,
        "400 distinct changes (repeats share their dedup id)"
    );
    assert!(sigterm(&mut unilog.0).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_immediate_postgres_crash_during_a_load_loses_nothing() {
    let Setup {
        stack,
        cluster,
        url,
        topic,
        dir: _dir,
        log,
        mut unilog,
    } = setup().await;

    // A writer commits transactions of 10 inserts until the server dies
    // under it; it returns the ids whose COMMIT was acknowledged.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut acked = Vec::new();
            for txn in 0..100_000i64 {
                let ids: Vec<i64> = (txn * 10 + 1..=txn * 10 + 10).collect();
                let Ok(tx) = client.transaction().await else {
                    break;
                };
                let mut ok = true;
                for id in &ids {
                    if tx
                        .execute("INSERT INTO items VALUES ($1, $1)", &[id])
                        .await
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                }
                if !ok || tx.commit().await.is_err() {
                    break;
                }
                acked.extend(ids);
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A crash: no shutdown checkpoint, connections cut, crash recovery at the next start.
    cluster.pg_ctl(&["stop", "-m", "immediate"]);
    let acked = writer.await.unwrap();
    assert!(acked.len() >= 100, "the load ran: {} rows", acked.len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.pg_ctl(&["start", "-w", "-t", "60"]);
    let client = connect(&url).await;
    client
        .execute(
            "INSERT INTO items SELECT g, g FROM generate_series(1000001, 1000200) g",
            &[],
        )
        .await
        .unwrap();
    let table: HashSet<String> = client
        .query("SELECT id FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0).to_string())
        .collect();
    for id in &acked {
        assert!(
            table.contains(&id.to_string()),
            "the server lost committed row {id}"
        );
    }

    let records = consume(
        &stack.brokers,
        &topic,
        table.len(),
        Duration::from_secs(3),
        WAIT,
    )
    .await;
    assert!(
        unilog.0.try_wait().unwrap().is_none(),
        "unilog exited: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    let keys: HashSet<String> = records.iter().filter_map(|r| r.key.clone()).collect();
    let missing: Vec<&String> = table.difference(&keys).take(5).collect();
    assert!(
        missing.is_empty(),
        "rows of the table never published, e.g. {missing:?}"
    );
    assert_eq!(keys, table, "published keys differ from the table");
    let ids: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.headers.get("unilog.dedup_id").map(String::as_str))
        .collect();
    assert_eq!(ids.len(), table.len(), "one dedup id per inserted row");
    eprintln!(
        "{} rows ({} acknowledged before the crash), {} records, {} distinct",
        table.len(),
        acked.len(),
        records.len(),
        ids.len()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("retrying"),
        "no retry after the crash:\n{text}"
    );
    assert!(sigterm(&mut unilog.0).success());
}
