//! A slot that disappears while unilog is stopped (`pg_drop_replication_slot`
//! by an administrator, or invalidation after `max_slot_wal_keep_size`):
//! `on_slot_lost: stop` refuses to start and says what was lost and how to
//! recover; `resnapshot` creates a new slot, copies the tables again and
//! streams on.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::cluster::Cluster;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

fn items_mapping(topic: &str) -> String {
    format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n")
}

/// Sets `source.postgres.on_slot_lost` in the fixture's pipeline file.
fn set_policy(fx: &Fixture, policy: &str) {
    let text = std::fs::read_to_string(&fx.config).unwrap();
    let text = text.replace(
        "    snapshot: initial\n",
        &format!("    snapshot: initial\n    on_slot_lost: {policy}\n"),
    );
    std::fs::write(&fx.config, text).unwrap();
}

/// Runs the pipeline until `n` more records are on the topic, then stops it.
async fn run_until(stack: &Stack, fx: &Fixture, db: &TestDb, topic: &str, n: usize) -> Vec<Record> {
    let run = Running::start(fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    let records = consume(&stack.brokers, topic, n, Duration::from_secs(2), WAIT).await;
    run.stop().await;
    records
}

async fn start_fails(fx: &Fixture) -> unilog::pipeline::PipelineError {
    let cfg = fx.load();
    let stop = Arc::new(AtomicBool::new(false));
    tokio::time::timeout(WAIT, unilog::pipeline::run(&cfg, stop))
        .await
        .expect("the pipeline neither failed nor ran")
        .expect_err("the pipeline started on a lost slot")
}

fn snapshot_keys(records: &[Record]) -> BTreeSet<String> {
    records
        .iter()
        .filter(|r| {
            r.headers
                .get("unilog.dedup_id")
                .is_some_and(|d| d.rsplit('/').next().is_some_and(|o| o.starts_with('s')))
        })
        .filter_map(|r| r.key.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_slot_stops_by_default_and_resnapshots_on_request() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items SELECT g, g FROM generate_series(1, 3) g;")
        .await
        .unwrap();
    let topic = format!("it.lost.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    // First run: 3 snapshot rows and one streamed change.
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (4, 4)")
        .await
        .unwrap();
    consume(&stack.brokers, &topic, 4, Duration::from_secs(2), WAIT).await;
    run.stop().await;

    // While unilog is stopped: an administrator drops the slot, and the
    // application goes on writing.
    let admin = connect(&stack.pg_admin_url).await;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&fx.slot])
        .await
        .unwrap();
    db.client
        .batch_execute("INSERT INTO items VALUES (5, 5); DELETE FROM items WHERE id = 1; UPDATE items SET val = 20 WHERE id = 2;")
        .await
        .unwrap();

    // The default: stop, saying what happened and how to recover.
    let err = start_fails(&fx).await;
    let text = err.to_string();
    eprintln!("refused: {text}");
    let checkpoint = fx
        .dir
        .path()
        .join("state")
        .join(format!("{}.json", fx.name));
    for needle in [
        format!("replication slot `{}`", fx.slot),
        "no longer exists (it was dropped)".to_string(),
        "cannot be read any more and were not published".to_string(),
        "on_slot_lost: resnapshot".to_string(),
        format!("rm {}", checkpoint.display()),
    ] {
        assert!(text.contains(&needle), "`{needle}` missing from: {text}");
    }
    assert!(!err.is_transient(), "{text}");
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "stop must not create a new slot");

    // On request: a new slot and a new snapshot of the current rows, then streaming.
    set_policy(&fx, "resnapshot");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (6, 6)")
        .await
        .unwrap();
    // 4 earlier records, 4 snapshot rows (2, 3, 4, 5), 1 insert.
    let records = consume(&stack.brokers, &topic, 9, Duration::from_secs(2), WAIT).await;
    let stats = run.stop().await;
    assert_eq!(stats.snapshot_rows, 4, "a new snapshot of the current rows");
    let keys: BTreeSet<String> = records.iter().filter_map(|r| r.key.clone()).collect();
    assert!(
        keys.contains("6"),
        "streaming goes on after the new snapshot"
    );
    let snap = snapshot_keys(&records);
    for k in ["2", "3", "4", "5"] {
        assert!(snap.contains(k), "row {k} in the new snapshot: {snap:?}");
    }
    // A restart now resumes from the new slot: no third snapshot.
    let again = run_until(&stack, &fx, &db, &topic, 9).await;
    assert_eq!(
        again.len(),
        records.len(),
        "nothing new after a plain restart"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidated_slot_stops_with_the_drop_command() {
    let stack = Stack::from_env();
    // A server that keeps at most 1 MB of WAL for a slot.
    let cluster =
        Cluster::start("max_slot_wal_keep_size = 1MB\nmax_wal_size = 32MB\nmin_wal_size = 32MB\n");
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let url = cluster.url("shop");
    let client = connect(&url).await;
    client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items VALUES (1, 1);")
        .await
        .unwrap();
    let topic = format!("it.lost.{}", suffix());
    let db = TestDb {
        name: "shop".into(),
        url: url.clone(),
        admin_url: cluster.url("postgres"),
        client,
    };
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    run_until(&stack, &fx, &db, &topic, 1).await;

    // While unilog is stopped, the server writes more WAL than it keeps
    // for the slot; at the next checkpoint the slot is invalidated.
    for _ in 0..4 {
        db.client
            .batch_execute("INSERT INTO items SELECT g, g FROM generate_series(1000, 1100) g ON CONFLICT DO NOTHING; SELECT pg_switch_wal();")
            .await
            .unwrap();
    }
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let status: Option<String> = admin
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the slot was not invalidated"
    );

    let err = start_fails(&fx).await;
    let text = err.to_string();
    eprintln!("refused: {text}");
    assert!(
        text.contains("was invalidated by the server (wal_status = lost")
            && text.contains(&format!("SELECT pg_drop_replication_slot('{}')", fx.slot)),
        "{text}"
    );
    assert!(!err.is_transient(), "{text}");

    // resnapshot drops the invalid slot and starts over.
    set_policy(&fx, "resnapshot");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    let stats = run.stop().await;
    assert_eq!(stats.snapshot_rows, 102, "row 1 and rows 1000..=1100");
    let status: Option<String> = admin
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(status.as_deref(), Some("lost"), "a new slot");
}
