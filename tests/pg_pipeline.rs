//! The Postgres pipeline end to end against the local stack: real
//! PostgreSQL 15, a Kafka-protocol broker, and a schema registry (the
//! stand-in unless SCHEMA_REGISTRY_URL points at a real one). Events are
//! read back from Kafka and decoded through the registry, as a downstream
//! consumer would.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

fn users_mapping(topic: &str) -> String {
    format!(
        "table: public.users\ntopic: {topic}\nevents:\n  insert: UserRegistered\n  update: UserUpdated\n  delete: UserDeleted\n  truncate: UsersTruncated\n\
columns:\n  id: user_id\n  email:\n  score:\n  balance:\n  active:\n  born_on:\n  seen_at:\n  created_local:\n  public_id:\n  profile:\n  tags:\n  scores:\n  avatar:\n  plan:\n  small:\n  ratio:\ndrop: [password_digest]\n"
    )
}

const USERS_DDL: &str = "
CREATE TYPE plan AS ENUM ('free', 'pro');
CREATE TABLE users (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    password_digest text NOT NULL,
    score integer,
    balance numeric(10,2),
    active boolean,
    born_on date,
    seen_at timestamptz,
    created_local timestamp,
    public_id uuid,
    profile jsonb,
    tags text[],
    scores int[],
    avatar bytea,
    plan plan,
    small smallint,
    ratio double precision
);";

/// Events of one key, in Kafka order.
fn by_key(events: &[(Option<String>, Json)]) -> BTreeMap<String, Vec<Json>> {
    let mut out: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for (k, e) in events {
        out.entry(k.clone().unwrap_or_default())
            .or_default()
            .push(e.clone());
    }
    out
}

async fn read_events(stack: &Stack, topic: &str, min: usize) -> Vec<(Option<String>, Json)> {
    let records = consume(&stack.brokers, topic, min, Duration::from_secs(2), WAIT).await;
    let mut dec = Decoder::new(&stack.registry);
    let mut out = Vec::new();
    for r in &records {
        let ev = dec.decode(&r.payload).await;
        assert_eq!(
            r.headers.get("unilog.event_type").map(String::as_str),
            ev["event_type"].as_str(),
            "event type header"
        );
        assert_eq!(
            r.headers.get("unilog.dedup_id").map(String::as_str),
            ev["dedup_id"].as_str(),
            "dedup header"
        );
        out.push((r.key.clone(), ev));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_operation_gives_the_expected_event() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client.batch_execute(USERS_DDL).await.unwrap();
    db.client
        .batch_execute(
            "INSERT INTO users VALUES (1, 'old@example.com', 'hash1', 7, 12.50, true, '1990-05-17', '2024-01-02 03:04:05.123456+00',
             '2024-01-02 03:04:05', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"theme\": \"dark\"}', '{a,\"b c\",NULL}', '{1,2,3}', '\\xdeadbeef', 'pro', -3, 0.5)",
        )
        .await
        .unwrap();
    let topic = format!("it.users.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("users.yaml", users_mapping(&topic))], "");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;

    db.client
        .batch_execute(
            "BEGIN;
             INSERT INTO users (id, email, password_digest, score) VALUES (2, 'new@example.com', 'hash2', NULL);
             UPDATE users SET score = 8, email = 'changed@example.com' WHERE id = 1;
             COMMIT;
             DELETE FROM users WHERE id = 2;
             TRUNCATE users;",
        )
        .await
        .unwrap();

    let events = read_events(&stack, &topic, 5).await;
    let stats = run.stop().await;
    assert_eq!(stats.snapshot_rows, 1);
    assert_eq!(events.len(), 5, "{events:#?}");

    let keys = by_key(&events);
    let one = &keys["1"];
    let two = &keys["2"];
    assert_eq!(one.len(), 2);
    assert_eq!(two.len(), 2);

    // The snapshot row: every type, exactly.
    let snap = &one[0];
    assert_eq!(snap["event_type"], "UserRegistered");
    assert_eq!(snap["op"], "snapshot");
    assert_eq!(snap["key"], "1");
    assert_eq!(snap["before"], Json::Null);
    assert_eq!(
        snap["after"],
        json!({
            "user_id": 1, "email": "old@example.com", "score": 7, "balance": "unscaled:1250", "active": true,
            "born_on": 7441, "seen_at": 1_704_164_645_123_456_i64, "created_local": 1_704_164_645_000_000_i64,
            "public_id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "profile": "{\"theme\": \"dark\"}",
            "tags": ["a", "b c", null], "scores": [1, 2, 3], "avatar": "deadbeef", "plan": "pro", "small": -3, "ratio": 0.5
        })
    );
    assert_eq!(snap["source"]["snapshot"], true);
    assert_eq!(snap["source"]["table"], "users");
    assert_eq!(snap["source"]["database"], db.name.as_str());
    assert!(
        snap.to_string().find("hash1").is_none(),
        "dropped column leaked"
    );

    // Insert and update in one transaction: same xid, same commit time.
    let ins = &two[0];
    assert_eq!(ins["event_type"], "UserRegistered");
    assert_eq!(ins["op"], "insert");
    assert_eq!(ins["after"]["email"], "new@example.com");
    assert_eq!(ins["after"]["score"], Json::Null);
    let upd = &one[1];
    assert_eq!(upd["event_type"], "UserUpdated");
    assert_eq!(upd["op"], "update");
    assert_eq!(
        upd["before"],
        Json::Null,
        "default replica identity sends no old row"
    );
    assert_eq!(upd["after"]["email"], "changed@example.com");
    assert_eq!(upd["after"]["score"], 8);
    assert_eq!(upd["after"]["balance"], "unscaled:1250");
    assert_eq!(ins["source"]["xid"], upd["source"]["xid"]);
    assert_eq!(ins["source"]["commit_time"], upd["source"]["commit_time"]);
    assert!(ins["source"]["commit_time"].as_i64().unwrap() > 1_700_000_000_000_000);
    assert_eq!(ins["source"]["snapshot"], false);

    // Delete: key from the old key tuple.
    let del = &two[1];
    assert_eq!(del["event_type"], "UserDeleted");
    assert_eq!(del["op"], "delete");
    assert_eq!(del["after"], Json::Null);
    assert_eq!(del["before"]["user_id"], 2);
    assert_eq!(
        del["before"]["email"],
        Json::Null,
        "only the key is sent under the default replica identity"
    );

    // Truncate: a table-wide event without a key.
    let trunc = &keys[""];
    assert_eq!(trunc.len(), 1);
    assert_eq!(trunc[0]["event_type"], "UsersTruncated");
    assert_eq!(trunc[0]["op"], "truncate");

    let ids: HashSet<&str> = events
        .iter()
        .map(|(_, e)| e["dedup_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "dedup ids are unique per change");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_identity_full_sends_the_old_row_and_keeps_toast() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
             ALTER TABLE docs REPLICA IDENTITY FULL;
             ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
        )
        .await
        .unwrap();
    let topic = format!("it.docs.{}", suffix());
    let mapping = format!("table: docs\ntopic: {topic}\nevents: {{insert: DocCreated, update: DocEdited, delete: DocDeleted}}\n");
    let fx = Fixture::new(&stack, &db, &[("docs.yaml", mapping)], "");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    let big: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    db.client
        .execute("INSERT INTO docs VALUES (1, 't1', $1)", &[&big])
        .await
        .unwrap();
    db.client
        .batch_execute("UPDATE docs SET title = 't2' WHERE id = 1")
        .await
        .unwrap();
    let events = read_events(&stack, &topic, 2).await;
    run.stop().await;
    assert_eq!(events.len(), 2);
    let upd = &events[1].1;
    assert_eq!(upd["op"], "update");
    assert_eq!(upd["before"]["title"], "t1");
    assert_eq!(upd["after"]["title"], "t2");
    assert_eq!(
        upd["after"]["body"].as_str().map(str::len),
        Some(20_000),
        "unchanged TOAST value filled from the old row"
    );
    db.cleanup().await;
}

/// Final state of every row, from the events: the last event per key wins.
fn fold_state(events: &[(Option<String>, Json)], id_field: &str) -> BTreeMap<i64, Json> {
    let mut state = BTreeMap::new();
    for (_, e) in events {
        match e["op"].as_str().unwrap() {
            "delete" => {
                state.remove(&e["before"][id_field].as_i64().unwrap());
            }
            _ => {
                state.insert(e["after"][id_field].as_i64().unwrap(), e["after"].clone());
            }
        }
    }
    state
}

async fn table_state(db: &TestDb) -> BTreeMap<i64, Json> {
    db.client
        .query("SELECT id, val FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                json!({"id": r.get::<_, i64>(0), "val": r.get::<_, i64>(1)}),
            )
        })
        .collect()
}

/// Random inserts, updates and deletes in transactions of 1 to 20
/// statements; returns the number of row changes committed.
async fn write_load(url: String, txns: usize, first_id: i64) -> usize {
    use rand::Rng;
    let mut client = connect(&url).await;
    let mut changes = 0u64;
    let mut next = first_id;
    for _ in 0..txns {
        let tx = client.transaction().await.unwrap();
        let n = rand::rng().random_range(1..=20);
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
    }
    usize::try_from(changes).unwrap()
}

/// A fresh database with an empty `items` table, and a topic name for it.
async fn items_db(stack: &Stack) -> (TestDb, String) {
    let db = TestDb::create(stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL)")
        .await
        .unwrap();
    (db, format!("it.items.{}", suffix()))
}

fn items_mapping(topic: &str) -> String {
    format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_with_concurrent_writes_ends_in_the_final_state() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items SELECT g, g FROM generate_series(1, 20000) g;")
        .await
        .unwrap();
    let topic = format!("it.items.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    // Writes race with the slot creation and the snapshot.
    let writer = tokio::spawn(write_load(db.url.clone(), 300, 20_001));
    let run = Running::start(&fx);
    writer.await.unwrap();
    db.wait_streaming(&fx.slot, WAIT).await;
    let expected = table_state(&db).await;
    let events = read_events(&stack, &topic, 20_000).await;
    let stats = run.stop().await;
    let snapshot_events = events.iter().filter(|(_, e)| e["op"] == "snapshot").count();
    assert_eq!(stats.snapshot_rows, snapshot_events as u64);
    assert!(
        snapshot_events >= 19_000,
        "the snapshot holds the table: {snapshot_events}"
    );

    let ids: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["dedup_id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a change was published twice");
    // Events of one key are in commit order (one partition per key), so folding gives the final state.
    let got = fold_state(&events, "id");
    assert_eq!(got.len(), expected.len(), "row count differs");
    assert_eq!(got, expected, "final state differs");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_and_restart_resumes_without_loss() {
    let stack = Stack::from_env();
    let (db, topic) = items_db(&stack).await;
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    let spawn = || {
        std::process::Command::new(unilog_bin())
            .args(["run", "--config"])
            .arg(&fx.config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    db.wait_streaming(&fx.slot, WAIT).await;
    let writer = tokio::spawn(write_load(db.url.clone(), 400, 1));
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    let changes = writer.await.unwrap();
    let mut child = spawn();
    db.wait_streaming(&fx.slot, WAIT).await;
    let expected = table_state(&db).await;
    let events = read_events(&stack, &topic, changes).await;
    // SIGTERM: clean stop.
    let status = sigterm(&mut child);
    assert!(status.success(), "clean stop exits 0, got {status}");

    // Every change is there; repeats carry the same dedup id and the same content.
    let mut seen: BTreeMap<String, Json> = BTreeMap::new();
    for (_, e) in &events {
        let id = e["dedup_id"].as_str().unwrap().to_string();
        if let Some(prev) = seen.insert(id, e.clone()) {
            assert_eq!(&prev, e, "a repeated dedup id with different content");
        }
    }
    assert_eq!(
        seen.len(),
        changes,
        "changes lost: {} distinct of {changes}",
        seen.len()
    );
    // Folding the unique changes in Kafka order gives the final state.
    let mut first = HashSet::new();
    let unique: Vec<(Option<String>, Json)> = events
        .iter()
        .filter(|(_, e)| first.insert(e["dedup_id"].as_str().unwrap().to_string()))
        .cloned()
        .collect();
    assert_eq!(fold_state(&unique, "id"), expected);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_refuses_a_missing_column_and_writes_nothing() {
    let stack = Stack::from_env();
    let (db, topic) = items_db(&stack).await;
    let bad = format!("{}columns:\n  id:\n  value:\n", items_mapping(&topic));
    let fx = Fixture::new(&stack, &db, &[("items.yaml", bad)], "");
    let out = unilog_output(&["check"], &fx.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("items.yaml:6: field `columns.value`")
            && stderr.contains("has no column `value`")
            && stderr.contains("id, val"),
        "{stderr}"
    );

    // A good mapping passes `check`, which creates no slot and no publication.
    std::fs::write(fx.dir.path().join("items.yaml"), items_mapping(&topic)).unwrap();
    let out = unilog_output(&["check"], &fx.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready to run"));
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let pubs: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((slots, pubs), (0, 0));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incompatible_schema_is_refused_with_the_registry_verdict() {
    let stack = Stack::from_env();
    let (db, topic) = items_db(&stack).await;
    // Somebody registered a different record under the subject: our schema cannot read its data.
    let existing = json!({"type": "record", "name": "ItemsEvent", "namespace": "unilog.public", "fields": [{"name": "legacy_id", "type": "string"}]});
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/subjects/{topic}-value/versions",
            stack.registry
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(json!({"schema": existing.to_string()}).to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    for cmd in ["check", "run"] {
        let out = unilog_output(&[cmd], &fx.config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{cmd} accepted an incompatible schema"
        );
        assert!(
            stderr.contains("incompatible")
                && stderr.contains(&format!("{topic}-value"))
                && stderr.contains("registry says"),
            "{cmd}: {stderr}"
        );
    }
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "nothing is started on a refused schema");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_errors_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(
        &p,
        "name: x\nsource:\n  postgres:\n    url: ${UNILOG_TEST_SURELY_UNSET}\n",
    )
    .unwrap();
    let out = std::process::Command::new(unilog_bin())
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("p.yaml:4:10: environment variable UNILOG_TEST_SURELY_UNSET is not set"),
        "{stderr}"
    );
}
