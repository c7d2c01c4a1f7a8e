//! Records that unilog publishes decode with Confluent's own Python client:
//! `scripts/consume` reads them with `confluent_kafka.Consumer` and decodes
//! them with `confluent_kafka.schema_registry.avro.AvroDeserializer` (which
//! fetches the writer schema from the registry by the id in the Confluent
//! frame), and the decoded values must be the rows' values.
//!
//! Needs the local stack and its venv (`scripts/stack up` installs
//! confluent-kafka into `.stack/venv`), or the same variables pointing at
//! real servers.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

const DDL: &str = "
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    owner text NOT NULL,
    balance numeric(10,2),
    opened_at timestamptz,
    active boolean,
    labels text[]
);
ALTER TABLE accounts REPLICA IDENTITY FULL;
INSERT INTO accounts VALUES
    (1, 'Ada', 12.50, '2024-01-02 03:04:05.123456+00', true, '{vip,\"b c\",NULL}');";

fn mapping(topic: &str) -> String {
    format!(
        "table: public.accounts\ntopic: {topic}\nrecord: Account\nevents:\n  snapshot: AccountImported\n  insert: AccountOpened\n  update: AccountChanged\n  delete: AccountClosed\n\
columns:\n  id: account_id\n  owner: {{ as: holder }}\n  balance:\n  opened_at:\n  active:\n  labels:\n"
    )
}

/// Runs `scripts/consume --json` and returns its JSON lines.
async fn confluent_consume(stack: &Stack, topic: &str, count: usize) -> Vec<Json> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(venv_python())
        .arg(root.join("scripts/consume"))
        .args(["--topic", topic, "--from-beginning", "--json"])
        .args(["--count", &count.to_string()])
        .args(["--timeout", &WAIT.as_secs().to_string()])
        .args(["--brokers", &stack.brokers, "--registry", &stack.registry])
        .current_dir(&root)
        .kill_on_drop(true)
        .output()
        .await
        .expect("start scripts/consume");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/consume failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confluent_python_deserializer_decodes_every_record() {
    let stack = Stack::from_env();
    venv_python(); // before creating anything: a missing venv is a setup error
    let db = TestDb::create(&stack).await;
    db.client.batch_execute(DDL).await.unwrap();
    let topic = format!("it.confluent.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("accounts.yaml", mapping(&topic))], "");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;

    db.client
        .batch_execute(
            "BEGIN;
             INSERT INTO accounts VALUES (2, 'Grace', -0.05, '1999-12-31 23:59:59+00', false, '{}');
             INSERT INTO accounts (id, owner) VALUES (3, 'Alan');
             COMMIT;
             UPDATE accounts SET balance = 99999999.99, active = true, labels = '{pro}',
                 opened_at = '2024-06-30 12:00:00.5+02' WHERE id = 2;
             DELETE FROM accounts WHERE id = 3;",
        )
        .await
        .unwrap();

    let records = confluent_consume(&stack, &topic, 5).await;
    let stats = run.stop().await;
    assert_eq!(stats.snapshot_rows, 1);
    assert_eq!(records.len(), 5, "{records:#?}");

    // Kafka metadata and headers agree with the decoded event.
    for r in &records {
        assert_eq!(r["topic"], topic.as_str());
        assert_eq!(r["message_key"], r["key"], "message key is the entity key");
        assert_eq!(r["headers"]["unilog.event_type"], r["event_type"]);
        assert_eq!(r["headers"]["unilog.dedup_id"], r["dedup_id"]);
        assert_eq!(r["source"]["connector"], "postgresql");
        assert_eq!(r["source"]["database"], db.name.as_str());
        assert_eq!(r["source"]["schema"], "public");
        assert_eq!(r["source"]["table"], "accounts");
        assert!(r["source"]["lsn"].as_i64().unwrap() > 0);
    }

    // One key's events share a partition, so their order is Kafka's order.
    let mut by_key: BTreeMap<String, Vec<&Json>> = BTreeMap::new();
    for r in &records {
        by_key
            .entry(r["key"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    let summary: Vec<(String, Vec<(String, String)>)> = by_key
        .iter()
        .map(|(k, evs)| {
            (
                k.clone(),
                evs.iter()
                    .map(|e| {
                        (
                            e["event_type"].as_str().unwrap().to_string(),
                            e["op"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let pair = |t: &str, o: &str| (t.to_string(), o.to_string());
    assert_eq!(
        summary,
        vec![
            ("1".to_string(), vec![pair("AccountImported", "snapshot")]),
            (
                "2".to_string(),
                vec![
                    pair("AccountOpened", "insert"),
                    pair("AccountChanged", "update")
                ]
            ),
            (
                "3".to_string(),
                vec![
                    pair("AccountOpened", "insert"),
                    pair("AccountClosed", "delete")
                ]
            ),
        ]
    );

    // The snapshot row: numeric as an exact decimal, timestamptz with its
    // microseconds in UTC, arrays with their NULLs.
    let snap = by_key["1"][0];
    assert_eq!(snap["before"], Json::Null);
    assert_eq!(
        snap["after"],
        json!({"account_id": 1, "holder": "Ada", "balance": "12.50",
               "opened_at": "2024-01-02T03:04:05.123456+00:00", "active": true,
               "labels": ["vip", "b c", null]})
    );
    assert_eq!(snap["source"]["snapshot"], true);

    let ins2 = by_key["2"][0];
    let ins3 = by_key["3"][0];
    assert_eq!(ins2["before"], Json::Null);
    assert_eq!(
        ins2["after"],
        json!({"account_id": 2, "holder": "Grace", "balance": "-0.05",
               "opened_at": "1999-12-31T23:59:59+00:00", "active": false, "labels": []})
    );
    assert_eq!(
        ins3["after"],
        json!({"account_id": 3, "holder": "Alan", "balance": null,
               "opened_at": null, "active": null, "labels": null})
    );
    assert_eq!(ins2["source"]["snapshot"], false);
    assert!(ins2["source"]["xid"].as_i64().is_some());
    assert_eq!(
        ins2["source"]["xid"], ins3["source"]["xid"],
        "one transaction"
    );
    assert_eq!(ins2["source"]["commit_time"], ins3["source"]["commit_time"]);
    assert!(
        ins2["source"]["commit_time"]
            .as_str()
            .is_some_and(|t| t.ends_with("+00:00")),
        "commit_time decodes as a UTC timestamp: {}",
        ins2["source"]["commit_time"]
    );

    // REPLICA IDENTITY FULL: the update and the delete carry the old row.
    let upd = by_key["2"][1];
    assert_eq!(upd["before"], ins2["after"]);
    assert_eq!(
        upd["after"],
        json!({"account_id": 2, "holder": "Grace", "balance": "99999999.99",
               "opened_at": "2024-06-30T10:00:00.500000+00:00", "active": true, "labels": ["pro"]})
    );
    let del = by_key["3"][1];
    assert_eq!(del["after"], Json::Null);
    assert_eq!(del["before"], ins3["after"]);

    // The schema is registered under TopicNameStrategy's subject.
    let versions: Json = reqwest::get(format!(
        "{}/subjects/{topic}-value/versions",
        stack.registry.trim_end_matches('/')
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(versions, json!([1]), "subject {topic}-value");

    let dedup: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r["dedup_id"].as_str().unwrap())
        .collect();
    assert_eq!(dedup.len(), 5, "dedup ids are unique per change");

    db.cleanup().await;
}
