//! Schema changes while streaming: a compatible change (a nullable column
//! added, a column dropped) registers a new schema version and goes on; an
//! incompatible one stops the pipeline with the table and the registry's
//! verdict; a mapping that names a dropped column stops with its file and line.

mod support;

use std::time::Duration;

use serde_json::Value as Json;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

async fn versions(registry: &str, subject: &str) -> Vec<i64> {
    reqwest::get(format!("{registry}/subjects/{subject}/versions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn mapping(topic: &str, extra: &str) -> String {
    format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compatible_changes_register_a_new_version_and_go_on() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint, old_note text)")
        .await
        .unwrap();
    let topic = format!("it.ddl.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", mapping(&topic, ""))], "");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    // One transaction each (a multi-statement string is one implicit transaction).
    for sql in [
        "INSERT INTO items VALUES (1, 10, 'a')",
        "ALTER TABLE items ADD COLUMN color text",
        "INSERT INTO items (id, val, old_note, color) VALUES (2, 20, 'b', 'red')",
        "ALTER TABLE items DROP COLUMN old_note",
        "INSERT INTO items (id, val, color) VALUES (3, 30, 'blue')",
    ] {
        db.client.batch_execute(sql).await.unwrap();
    }
    let records = consume(&stack.brokers, &topic, 3, Duration::from_secs(2), WAIT).await;
    run.stop().await;
    let mut dec = Decoder::new(&stack.registry);
    let mut decoded: Vec<(Json, u32)> = Vec::new();
    for r in &records {
        decoded.push((
            dec.decode(&r.payload).await,
            u32::from_be_bytes(r.payload[1..5].try_into().unwrap()),
        ));
    }
    // Keys spread over partitions: order by id.
    decoded.sort_by_key(|(e, _)| e["after"]["id"].as_i64());
    let (events, ids): (Vec<Json>, Vec<u32>) = decoded.into_iter().unzip();
    let after: Vec<&Json> = events.iter().map(|e| &e["after"]).collect();
    assert_eq!(
        after[0],
        &serde_json::json!({"id": 1, "val": 10, "old_note": "a"})
    );
    assert_eq!(
        after[1],
        &serde_json::json!({"id": 2, "val": 20, "old_note": "b", "color": "red"})
    );
    assert_eq!(
        after[2],
        &serde_json::json!({"id": 3, "val": 30, "color": "blue"})
    );
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2],
        "each change of shape has its own schema id: {ids:?}"
    );
    assert_eq!(
        versions(&stack.registry, &format!("{topic}-value")).await,
        vec![1, 2, 3]
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incompatible_change_stops_with_the_registry_verdict() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint)")
        .await
        .unwrap();
    let topic = format!("it.ddl.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", mapping(&topic, ""))], "");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (1, 10)")
        .await
        .unwrap();
    // The change before the DDL is delivered first.
    let before = consume(&stack.brokers, &topic, 1, Duration::from_millis(500), WAIT).await;
    assert_eq!(before.len(), 1);
    db.client
        .batch_execute("ALTER TABLE items ALTER COLUMN val TYPE text")
        .await
        .unwrap();
    db.client
        .batch_execute("INSERT INTO items VALUES (2, 'twenty')")
        .await
        .unwrap();
    let result = tokio::time::timeout(WAIT, run.handle)
        .await
        .expect("the pipeline did not stop")
        .unwrap();
    let err = result
        .expect_err("an incompatible schema was accepted")
        .to_string();
    assert!(
        err.contains("public.items")
            && err.contains("incompatible")
            && err.contains("registry says"),
        "{err}"
    );
    // The change with the new shape was not published.
    let records = consume(&stack.brokers, &topic, 1, Duration::from_secs(2), WAIT).await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        versions(&stack.registry, &format!("{topic}-value")).await,
        vec![1]
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_published_column_that_is_dropped_stops_with_file_and_line() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint, note text)")
        .await
        .unwrap();
    let topic = format!("it.ddl.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[("items.yaml", mapping(&topic, "columns:\n  id:\n  note:\n"))],
        "",
    );
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("ALTER TABLE items DROP COLUMN note")
        .await
        .unwrap();
    db.client
        .batch_execute("INSERT INTO items VALUES (1, 10)")
        .await
        .unwrap();
    let result = tokio::time::timeout(WAIT, run.handle)
        .await
        .expect("the pipeline did not stop")
        .unwrap();
    let err = result
        .expect_err("a mapping naming a dropped column went on")
        .to_string();
    assert!(
        err.contains("items.yaml:6") && err.contains("has no column `note`"),
        "{err}"
    );
    db.cleanup().await;
}

/// With `on_schema_change: dead_letter`, a refused new shape sends the
/// table's changes to the dead-letter topic (with the registry's verdict)
/// and the pipeline goes on, other tables included; a later compatible
/// shape publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incompatible_change_can_dead_letter_instead_of_stopping() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, val bigint);
             CREATE TABLE others (id bigint PRIMARY KEY, note text)",
        )
        .await
        .unwrap();
    let topic = format!("it.ddl.{}", suffix());
    let other_topic = format!("{topic}.others");
    let others = format!(
        "table: others\ntopic: {other_topic}\nevents: {{insert: OtherAdded, update: OtherChanged, delete: OtherRemoved}}\n"
    );
    let fx = Fixture::new(
        &stack,
        &db,
        &[("items.yaml", mapping(&topic, "")), ("others.yaml", others)],
        "on_schema_change: dead_letter\n",
    );
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (1, 10)")
        .await
        .unwrap();
    let before = consume(&stack.brokers, &topic, 1, Duration::from_millis(500), WAIT).await;
    assert_eq!(before.len(), 1);
    db.client
        .batch_execute("ALTER TABLE items ALTER COLUMN val TYPE text")
        .await
        .unwrap();
    db.client
        .batch_execute(
            "INSERT INTO items VALUES (2, 'twenty'); INSERT INTO items VALUES (3, 'thirty');
             INSERT INTO others VALUES (1, 'goes on')",
        )
        .await
        .unwrap();
    // The other table goes on.
    let other = consume(
        &stack.brokers,
        &other_topic,
        1,
        Duration::from_millis(500),
        WAIT,
    )
    .await;
    assert_eq!(other.len(), 1);
    // The refused table's changes are dead letters, with the verdict.
    let dead_letter_topic = format!("unilog.{}.dead_letter", fx.name);
    let dead = consume(
        &stack.brokers,
        &dead_letter_topic,
        2,
        Duration::from_secs(1),
        WAIT,
    )
    .await;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        let body: Json = serde_json::from_slice(&d.payload).unwrap();
        let error = body["error"].as_str().unwrap();
        assert_eq!(body["table"], "public.items");
        assert!(
            error.contains("new shape cannot be published") && error.contains("registry says"),
            "{error}"
        );
    }
    assert_eq!(
        consume(&stack.brokers, &topic, 1, Duration::from_secs(1), WAIT)
            .await
            .len(),
        1,
        "nothing of the refused shape on the table's topic"
    );
    let stats = run.stop().await;
    assert_eq!(stats.dead_lettered, 2);
    db.cleanup().await;
}
