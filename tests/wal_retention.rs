//! The database's disk is safe: an idle pipeline does not pin the WAL that
//! other databases keep writing. A slot nobody reads is the control.

mod support;

use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(120);
const MB: i64 = 1024 * 1024;

async fn retained(admin: &tokio_postgres::Client, slot: &str) -> i64 {
    admin
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_pipeline_does_not_pin_wal_written_elsewhere() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    let busy = TestDb::create(&stack).await;
    let admin = connect(&stack.pg_admin_url).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL)")
        .await
        .unwrap();
    let topic = format!("it.idle.{}", suffix());
    let mapping = format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n");
    let fx = Fixture::new(&stack, &db, &[("items.yaml", mapping)], "");
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    // The control: a slot in the same database that nobody reads.
    let control = format!("control_{}", suffix());
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&control],
        )
        .await
        .unwrap();

    // Another database writes about 48 MB of WAL; ours stays idle.
    busy.client
        .batch_execute("CREATE TABLE junk (id bigserial PRIMARY KEY, pad text)")
        .await
        .unwrap();
    for _ in 0..12 {
        busy.client
            .batch_execute("INSERT INTO junk (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 4000) g")
            .await
            .unwrap();
    }
    // A checkpoint logs the running transactions, from which the server can
    // move a slot's restart point once the client confirms past it.
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let start = Instant::now();
    let (ours, theirs) = loop {
        busy.client
            .batch_execute("INSERT INTO junk (pad) VALUES ('tick')")
            .await
            .unwrap();
        let ours = retained(&admin, &fx.slot).await;
        let theirs = retained(&admin, &control).await;
        if ours < 16 * MB || start.elapsed() > Duration::from_secs(45) {
            break (ours, theirs);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    run.stop().await;
    assert!(
        theirs >= 32 * MB,
        "the control slot should pin the WAL written meanwhile: {theirs} bytes"
    );
    assert!(
        ours < 16 * MB,
        "the pipeline's slot pins {ours} bytes of WAL written elsewhere (control: {theirs})"
    );
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&control])
        .await
        .unwrap();
    db.cleanup().await;
    busy.cleanup().await;
}
