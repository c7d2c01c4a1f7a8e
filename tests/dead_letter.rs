//! Poison rows: a change that cannot be published goes to the dead-letter
//! topic with its reason, and the pipeline goes on; with `on_bad_row: stop`
//! it stops instead and acknowledges nothing past the last good change.

mod support;

use std::time::Duration;

use serde_json::Value as Json;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

const DDL: &str = "CREATE TABLE payments (id bigint PRIMARY KEY, amount numeric(8,2), due timestamptz, note text);";

fn mapping(topic: &str) -> String {
    format!("table: payments\ntopic: {topic}\nevents: {{insert: PaymentMade, update: PaymentChanged, delete: PaymentVoided}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_rows_go_to_the_dead_letter_topic_and_the_pipeline_goes_on() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client.batch_execute(DDL).await.unwrap();
    // A poison row already in the table reaches the snapshot.
    db.client
        .batch_execute("INSERT INTO payments VALUES (1, 'NaN', now(), 'snapshot poison')")
        .await
        .unwrap();
    let topic = format!("it.pay.{}", suffix());
    let dlq = format!("it.dlq.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[("payments.yaml", mapping(&topic))],
        &format!("dead_letter_topic: {dlq}\n"),
    );
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute(
            "INSERT INTO payments VALUES (2, 10.00, now(), 'fine');
             INSERT INTO payments VALUES (3, 'NaN', now(), 'cannot be a decimal(8,2)');
             INSERT INTO payments VALUES (4, 7.50, now(), 'fine after the poison');
             INSERT INTO payments VALUES (5, 1.00, 'infinity', 'an infinite timestamp is published');",
        )
        .await
        .unwrap();

    let records = consume(&stack.brokers, &topic, 3, Duration::from_secs(2), WAIT).await;
    let mut dec = Decoder::new(&stack.registry);
    let ids: Vec<i64> = decode_all(&mut dec, &records)
        .await
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![2, 4, 5],
        "the good rows are published, the poison ones are not"
    );

    let letters = consume(&stack.brokers, &dlq, 2, Duration::from_secs(2), WAIT).await;
    let stats = run.stop().await;
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(letters.len(), 2);
    let bodies: Vec<Json> = letters
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect();
    assert_eq!(bodies[0]["op"], "snapshot");
    assert_eq!(bodies[0]["table"], "public.payments");
    let e0 = bodies[0]["error"].as_str().unwrap();
    assert!(
        e0.contains("column `amount`") && e0.contains("decimal(8,2)"),
        "{e0}"
    );
    assert_eq!(bodies[1]["op"], "insert");
    let e1 = bodies[1]["error"].as_str().unwrap();
    assert!(
        e1.contains("column `amount`") && e1.contains("`type: string`"),
        "{e1}"
    );
    assert!(
        !bodies.iter().any(|b| b.to_string().contains("poison")),
        "row values stay out of dead letters"
    );
    assert_eq!(
        letters[1]
            .headers
            .get("unilog.event_type")
            .map(String::as_str),
        Some("unilog.DeadLetter")
    );
    assert!(letters[1]
        .headers
        .get("unilog.dedup_id")
        .is_some_and(|d| d.starts_with("pg/")));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_on_bad_row_stop_the_pipeline_stops_with_the_reason() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client.batch_execute(DDL).await.unwrap();
    let topic = format!("it.pay.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[("payments.yaml", mapping(&topic))],
        "on_bad_row: stop\n",
    );
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute("INSERT INTO payments VALUES (1, 'NaN', now(), 'x')")
        .await
        .unwrap();
    let result = tokio::time::timeout(WAIT, run.handle)
        .await
        .expect("the pipeline did not stop")
        .unwrap();
    let err = result.expect_err("the pipeline went on").to_string();
    assert!(
        err.contains("public.payments") && err.contains("column `amount`"),
        "{err}"
    );
    db.cleanup().await;
}

/// A 3 MB row (above the producer's and the broker's 1 MB limit) followed
/// by ordinary rows: the large one is a dead letter naming table, key and
/// size, the others arrive, and the pipeline never fails or restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_too_large_event_is_a_dead_letter_and_the_rows_after_it_arrive() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text, meta jsonb);")
        .await
        .unwrap();
    let topic = format!("it.docs.{}", suffix());
    let dlq = format!("it.dlq.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[(
            "docs.yaml",
            format!("table: docs\ntopic: {topic}\nevents: {{insert: DocAdded, update: DocChanged, delete: DocRemoved}}\n"),
        )],
        &format!("dead_letter_topic: {dlq}\n"),
    );
    let check = unilog_output(&["check"], &fx.config);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("kafka: events larger than 1000000 bytes (the producer's message.max.bytes) are sent to the dead-letter topic"),
        "{report}"
    );
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    db.client
        .batch_execute(
            "INSERT INTO docs VALUES (1, repeat('x', 3000000), jsonb_build_object('big', repeat('y', 100)));
             INSERT INTO docs VALUES (2, 'small', '{}'), (3, 'small too', '{}');
             UPDATE docs SET body = 'now small' WHERE id = 1;",
        )
        .await
        .unwrap();
    let records = consume(&stack.brokers, &topic, 3, Duration::from_secs(2), WAIT).await;
    let letters = consume(&stack.brokers, &dlq, 1, Duration::from_secs(2), WAIT).await;
    let stats = run.stop().await;
    let mut dec = Decoder::new(&stack.registry);
    let mut got: Vec<(String, i64)> = decode_all(&mut dec, &records)
        .await
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap_or_default().to_string(),
                e["after"]["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("insert".to_string(), 2),
            ("insert".to_string(), 3),
            ("update".to_string(), 1)
        ],
        "the rows after the large one arrive"
    );
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(letters.len(), 1);
    let body: Json = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(body["table"], "public.docs");
    assert_eq!(body["key"], "1");
    assert!(
        body["size_bytes"].as_u64().is_some_and(|s| s > 3_000_000),
        "{body}"
    );
    let why = body["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(
            "more than the 1000000 bytes Kafka accepts (the producer's message.max.bytes)"
        ),
        "{why}"
    );
    assert!(
        !body.to_string().contains("xxxx"),
        "row values stay out of dead letters"
    );
    db.cleanup().await;
}
