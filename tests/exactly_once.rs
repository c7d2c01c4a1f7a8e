//! Exactly-once delivery (`kafka.exactly_once: true`): unilog is killed
//! with SIGKILL again and again while a writer changes the table, and a
//! `read_committed` consumer still finds every change exactly once. Without
//! the setting, delivery stays at least once.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use support::*;

const WAIT: Duration = Duration::from_secs(180);

fn items_mapping(topic: &str) -> String {
    format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n")
}

/// Random inserts, updates and deletes in transactions of 1 to 40
/// statements, paced so the load lasts a while; returns the row changes
/// committed.
async fn write_load(url: String, txns: usize) -> usize {
    let mut client = connect(&url).await;
    let mut changes = 0u64;
    let mut next = 1i64;
    for i in 0..txns {
        let tx = client.transaction().await.unwrap();
        let n = rand::rng().random_range(1..=40);
        for _ in 0..n {
            let r: u32 = rand::rng().random_range(0..10);
            let target = rand::rng().random_range(1..next.max(2));
            let sql = match r {
                0..=5 => {
                    next += 1;
                    format!("INSERT INTO items VALUES ({}, {})", next - 1, next - 1)
                }
                6..=8 => format!("UPDATE items SET val = val + 1 WHERE id = {target}"),
                _ => format!("DELETE FROM items WHERE id = {target}"),
            };
            changes += tx.execute(&sql, &[]).await.unwrap();
        }
        tx.commit().await.unwrap();
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    usize::try_from(changes).unwrap()
}

async fn table_state(db: &TestDb) -> BTreeMap<String, i64> {
    db.client
        .query("SELECT id, val FROM items", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get::<_, i64>(0).to_string(), r.get::<_, i64>(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_is_read_once_across_repeated_sigkills() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL)")
        .await
        .unwrap();
    let topic = format!("it.eo.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        // Small batches, so that many end inside a database transaction
        // (up to 40 changes): the progress record then names the last
        // change, not only the last complete transaction.
        text.replace(
            "  partitions: 3\n",
            "  partitions: 3\n  exactly_once: true\n",
        )
        .replace(
            "  max_wait_ms: 10\n",
            "  max_wait_ms: 10\n  max_events: 100\n",
        ),
    )
    .unwrap();
    let logs = fx.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut runs = 0;
    let mut spawn = || {
        runs += 1;
        Killed(
            Command::new(unilog_bin())
                .args(["run", "--config"])
                .arg(&fx.config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join(format!("unilog-{runs:02}.log"))).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut child = spawn();
    db.wait_streaming(&fx.slot, WAIT).await;
    let writer = tokio::spawn(write_load(db.url.clone(), 1500));
    let mut kills = 0;
    while !writer.is_finished() || kills < 6 {
        let delay = if kills % 3 == 1 {
            rand::rng().random_range(100..1000)
        } else {
            rand::rng().random_range(1000..4000)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if kills >= 12 {
            break;
        }
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..300))).await;
        child = spawn();
    }
    let changes = writer.await.unwrap();
    db.wait_streaming(&fx.slot, WAIT).await;
    let expected = table_state(&db).await;

    let start = Instant::now();
    let records = consume(
        &stack.brokers,
        &topic,
        changes,
        Duration::from_secs(5),
        WAIT,
    )
    .await;
    eprintln!(
        "{changes} changes, {kills} SIGKILLs, {} records read in {:?}",
        records.len(),
        start.elapsed()
    );
    let status = sigterm(&mut child.0);
    assert!(status.success(), "clean stop exits 0, got {status}");
    // The slot resent changes the progress topic had committed, and they
    // were skipped: the test went through the path it is about.
    let mut skipped = 0u64;
    for entry in std::fs::read_dir(&logs).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text
            .lines()
            .filter(|l| l.contains("skipped changes that an earlier run committed"))
        {
            skipped += line
                .split("skipped=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    eprintln!("{skipped} changes resent by the slot were skipped");
    assert!(skipped > 0, "no restart had to skip committed changes");

    // Every repeat is an exact copy (same key, same bytes).
    let mut count: HashMap<&str, (usize, &Record)> = HashMap::new();
    for r in &records {
        let e = count
            .entry(r.headers["unilog.dedup_id"].as_str())
            .or_insert((0, r));
        e.0 += 1;
        assert!(
            e.1.key == r.key && e.1.payload == r.payload,
            "dedup id {} repeated with other content",
            r.headers["unilog.dedup_id"]
        );
    }
    assert_eq!(
        count.len(),
        changes,
        "changes lost: {} of {changes}",
        count.len()
    );
    let repeated = records.len() - count.len();
    let strict = broker_hides_aborted_records(&stack.brokers).await;
    eprintln!(
        "{repeated} records read twice; the broker {} aborted transactions from read_committed readers",
        if strict { "hides" } else { "does NOT hide" }
    );
    if strict {
        assert_eq!(repeated, 0, "a read_committed consumer read changes twice");
    } else {
        // Records of the transaction in flight at a kill reach the broker
        // before the kill and stay visible although the transaction was
        // aborted; the next process publishes them again. At most one
        // batch (100 events here) per kill.
        assert!(
            repeated <= kills * 100,
            "{repeated} repeats: more than one aborted batch per kill explains"
        );
    }

    // Folding the records in partition order gives the table.
    let mut dec = Decoder::new(&stack.registry);
    let mut state: BTreeMap<String, i64> = BTreeMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        let e = dec.decode(&r.payload).await;
        let key = r.key.clone().unwrap();
        if e["op"] == "delete" {
            state.remove(&key);
        } else {
            state.insert(key, e["after"]["val"].as_i64().unwrap());
        }
    }
    assert_eq!(state, expected, "final state differs");
    db.cleanup().await;
}

#[test]
fn at_least_once_stays_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(
        &p,
        "name: d\nsource:\n  postgres:\n    url: postgres://u@h/db\nkafka:\n  brokers: b:9092\nschema_registry:\n  url: http://r\nmappings: [m.yaml]\n",
    )
    .unwrap();
    let cfg = unilog::config::LoadedConfig::load(&p).unwrap();
    assert!(!cfg.config.kafka.exactly_once);
    assert_eq!(cfg.progress_topic(), "unilog.d.progress");
}
