//! A mapping's `debezium:` option, end to end: a consumer written for
//! Debezium's PostgreSQL connector (`scripts/debezium-consumer`, Confluent's
//! Python `AvroDeserializer` for key and value, nothing unilog-specific)
//! reads the snapshot row, an insert, an update and a delete with its
//! tombstone, with Debezium's op codes, source fields and value forms.
//!
//! Needs the local stack and its venv (`scripts/stack up`), or the same
//! variables pointing at real servers.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

const DDL: &str = "
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE people (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    password_digest text,
    balance numeric(10,2),
    rating numeric,
    seen_at timestamptz,
    born date,
    ref uuid,
    tags text[],
    active boolean NOT NULL DEFAULT true,
    mood mood
);
INSERT INTO people VALUES
    (1, 'Ada', 'hash-one', 12.50, 1.005, '2024-01-02 03:04:05.123456+00', '1815-12-10',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{a,\"b c\"}', true, 'happy');";

fn mapping(topic: &str, server: &str) -> String {
    format!(
        "table: public.people\ntopic: {topic}\nevents:\n  insert: PersonAdded\n  update: PersonChanged\n  delete: PersonRemoved\n\
columns:\n  id: person_id\n  name:\ndrop: [password_digest]\ndebezium:\n  server_name: {server}\n"
    )
}

/// Runs `scripts/debezium-consumer` and returns its JSON lines.
async fn debezium_consume(stack: &Stack, topic: &str, count: usize) -> Vec<Json> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(venv_python())
        .arg(root.join("scripts/debezium-consumer"))
        .args(["--topic", topic, "--count", &count.to_string()])
        .args(["--timeout", &WAIT.as_secs().to_string()])
        .args(["--brokers", &stack.brokers, "--registry", &stack.registry])
        .current_dir(&root)
        .kill_on_drop(true)
        .output()
        .await
        .expect("start scripts/debezium-consumer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/debezium-consumer failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

async fn subject_versions(stack: &Stack, subject: &str) -> Json {
    reqwest::get(format!(
        "{}/subjects/{subject}/versions",
        stack.registry.trim_end_matches('/')
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

/// What a Debezium consumer looks at: op (or "tombstone") per record.
fn op(r: &Json) -> &str {
    if r["tombstone"] == true {
        "tombstone"
    } else {
        r["op"].as_str().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debezium_consumer_reads_the_envelope_unchanged() {
    let stack = Stack::from_env();
    venv_python();
    let db = TestDb::create(&stack).await;
    db.client.batch_execute(DDL).await.unwrap();
    let sfx = suffix();
    let topic = format!("it.dz.{sfx}");
    let server = format!("legacy_{sfx}");
    let dz_topic = format!("{server}.public.people");
    let fx = Fixture::new(
        &stack,
        &db,
        &[("people.yaml", mapping(&topic, &server))],
        "",
    );
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;

    db.client
        .batch_execute(
            "INSERT INTO people VALUES (2, 'Grace', 'hash-two', -0.05, 99, '1999-12-31 23:59:59+00',
                 NULL, NULL, '{}', false, 'sad');
             UPDATE people SET name = 'Grace H', balance = 1.00 WHERE id = 2;
             DELETE FROM people WHERE id = 2;",
        )
        .await
        .unwrap();

    let records = debezium_consume(&stack, &dz_topic, 5).await;
    let domain = consume(&stack.brokers, &topic, 4, Duration::from_secs(1), WAIT).await;
    let stats = run.stop().await;
    assert_eq!(stats.snapshot_rows, 1);
    assert_eq!(records.len(), 5, "{records:#?}");
    assert_eq!(domain.len(), 4, "the domain events are still published");

    // Per key, in order (one key's records share a partition).
    let mut by_key: BTreeMap<i64, Vec<&Json>> = BTreeMap::new();
    for r in &records {
        assert_eq!(r["topic"], dz_topic.as_str());
        by_key
            .entry(r["key"]["id"].as_i64().expect("an Avro key record {id}"))
            .or_default()
            .push(r);
        let dedup = r["headers"]["unilog.dedup_id"].as_str().unwrap();
        assert!(dedup.starts_with(&format!("pg/{}/", db.name)), "{dedup}");
    }
    let ops: BTreeMap<i64, Vec<&str>> = by_key
        .iter()
        .map(|(k, rs)| (*k, rs.iter().map(|r| op(r)).collect()))
        .collect();
    assert_eq!(
        ops,
        BTreeMap::from([(1, vec!["r"]), (2, vec!["c", "u", "d", "tombstone"])])
    );

    // The snapshot read: every column but the dropped one, as Debezium's
    // converter publishes it.
    let read = by_key[&1][0];
    assert_eq!(read["before"], Json::Null);
    assert_eq!(
        read["after"],
        json!({"id": 1, "name": "Ada", "balance": "12.50",
               "rating": {"scale": 3, "value": "03ed"},
               "seen_at": "2024-01-02T03:04:05.123456Z", "born": -56270,
               "ref": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "tags": ["a", "b c"],
               "active": true, "mood": "happy"})
    );
    assert_eq!(read["source"]["snapshot"], "true");
    assert_eq!(read["source"]["txId"], Json::Null);

    let [create, update, delete, tombstone] = by_key[&2][..] else {
        panic!("{:#?}", by_key[&2])
    };
    for r in [read, create, update, delete] {
        assert_eq!(r["source"]["connector"], "postgresql");
        assert_eq!(r["source"]["name"], server.as_str());
        assert_eq!(r["source"]["db"], db.name.as_str());
        assert_eq!(r["source"]["schema"], "public");
        assert_eq!(r["source"]["table"], "people");
        assert!(r["source"]["lsn"].as_i64().unwrap() > 0);
        assert!(r["ts_ms"].as_i64().unwrap() >= r["source"]["ts_ms"].as_i64().unwrap());
    }
    for r in [create, update, delete] {
        assert_eq!(r["source"]["snapshot"], "false");
        assert!(r["source"]["txId"].as_i64().is_some());
    }
    let lsn = |r: &Json| r["source"]["lsn"].as_i64().unwrap();
    // A snapshot row carries the slot's consistent point, where the first
    // streamed change may start.
    assert!(
        lsn(read) <= lsn(create) && lsn(create) < lsn(update) && lsn(update) < lsn(delete),
        "{:?}",
        [read, create, update, delete].map(|r| (lsn(r), r["source"]["sequence"].clone()))
    );

    assert_eq!(create["before"], Json::Null);
    assert_eq!(
        create["after"],
        json!({"id": 2, "name": "Grace", "balance": "-0.05",
               "rating": {"scale": 0, "value": "63"},
               "seen_at": "1999-12-31T23:59:59Z", "born": null, "ref": null, "tags": [],
               "active": false, "mood": "sad"})
    );
    // Default replica identity: no old row on update, the key only on delete
    // (NOT NULL columns get their type's zero, as with Debezium).
    assert_eq!(update["before"], Json::Null);
    assert_eq!(update["after"]["name"], "Grace H");
    assert_eq!(update["after"]["balance"], "1.00");
    assert_eq!(delete["after"], Json::Null);
    assert_eq!(
        delete["before"],
        json!({"id": 2, "name": "", "balance": null, "rating": null, "seen_at": null,
               "born": null, "ref": null, "tags": null, "active": false, "mood": null})
    );
    assert_eq!(tombstone["key"], delete["key"]);
    assert_eq!(
        tombstone["headers"]["unilog.dedup_id"],
        format!(
            "{}/tombstone",
            delete["headers"]["unilog.dedup_id"].as_str().unwrap()
        )
    );

    // The password never leaves, on either topic.
    for r in &records {
        assert!(!r.to_string().contains("hash-"), "{r}");
    }
    for r in &domain {
        assert!(!String::from_utf8_lossy(&r.payload).contains("hash-"));
    }

    // Key and value schemas under TopicNameStrategy's subjects.
    assert_eq!(
        subject_versions(&stack, &format!("{dz_topic}-value")).await,
        json!([1])
    );
    assert_eq!(
        subject_versions(&stack, &format!("{dz_topic}-key")).await,
        json!([1])
    );

    db.cleanup().await;
}
