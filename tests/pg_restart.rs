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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_is_waited_for_and_nothing_is_lost() {
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
    let mut unilog = Command::new(unilog_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !streaming(&admin).await {
        assert!(
            start.elapsed() < WAIT,
            "not streaming: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    insert_range(&url, 1, 201).await;
    // Restart the server under the pipeline (fast shutdown: connections are cut).
    cluster.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    insert_range(&url, 201, 401).await;

    let records = consume(&stack.brokers, &topic, 400, Duration::from_secs(3), WAIT).await;
    assert!(
        unilog.try_wait().unwrap().is_none(),
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
    assert!(sigterm(&mut unilog).success());
}
