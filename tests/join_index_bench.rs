//! Throughput of `unilog join` and `unilog index` on the local stack, run
//! by `scripts/bench-join-index` (ignored in the normal test run: speed is
//! measured, never asserted).
//!
//! - joiner: users and connections already on their topics; input records
//!   per second from the first committed output to the last.
//! - indexer: documents per second into the search server, beside a plain
//!   `_bulk` load of the same documents (same JSON, same bulk size) into a
//!   fresh index of the same server, in the same run.

mod feeds;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use feeds::{create_topic, envelope_schema, search_url, Feed, Search};
use support::{suffix, Stack};

fn env_n(var: &str, default: i64) -> i64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value of a counter line `name{labels} value` in the metrics text.
fn counter(prefix: &str) -> f64 {
    unilog::telemetry::metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `counter(prefix)` reaches `n`; returns (first seen > 0, reached).
async fn time_counter(prefix: &str, n: f64, timeout: Duration) -> (Instant, Instant) {
    let start = Instant::now();
    let mut first = None;
    loop {
        let v = counter(prefix);
        if v > 0.0 && first.is_none() {
            first = Some(Instant::now());
        }
        if v >= n {
            return (first.unwrap_or_else(Instant::now), Instant::now());
        }
        assert!(
            start.elapsed() < timeout,
            "{prefix} at {v} of {n} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench-join-index"]
async fn join_and_index_throughput() {
    let stack = Stack::from_env();
    let s = suffix();
    let (n_users, per_user) = (
        env_n("BENCH_USERS", 10_000),
        env_n("BENCH_CONNECTIONS_PER_USER", 2),
    );
    let n_docs = env_n("BENCH_DOCS", 50_000);

    // ---- joiner
    let users_t = format!("b.users.{s}");
    let conns_t = format!("b.conns.{s}");
    let out_t = format!("b.docs.{s}");
    create_topic(&stack.brokers, &users_t, 3).await;
    create_topic(&stack.brokers, &conns_t, 3).await;
    let mut users = Feed::new(
        &stack.brokers,
        &stack.registry,
        &users_t,
        &envelope_schema("User", &[("user_id", "long"), ("name", "string")]),
    )
    .await;
    let mut conns = Feed::new(
        &stack.brokers,
        &stack.registry,
        &conns_t,
        &envelope_schema(
            "Conn",
            &[
                ("conn_id", "long"),
                ("user_id", "long"),
                ("friend_id", "long"),
            ],
        ),
    )
    .await;
    for id in 1..=n_users {
        let v = users.event(
            &id.to_string(),
            "insert",
            Some(vec![
                ("user_id", Avro::Long(id)),
                ("name", Avro::String(format!("user {id}"))),
            ]),
        );
        users.send_nowait(&id.to_string(), Some(v));
    }
    users.flush();
    let mut c = 0;
    for round in 1..=per_user {
        for id in 1..=n_users {
            c += 1;
            let v = conns.event(
                &format!("c{c}"),
                "insert",
                Some(vec![
                    ("conn_id", Avro::Long(c)),
                    ("user_id", Avro::Long(id)),
                    ("friend_id", Avro::Long((id + round) % n_users + 1)),
                ]),
            );
            conns.send_nowait(&format!("c{c}"), Some(v));
        }
    }
    conns.flush();
    let dir = tempfile::tempdir().unwrap();
    let jpath = dir.path().join("join.yaml");
    std::fs::write(
        &jpath,
        format!(
            "name: bench_{s}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nleft:\n  topic: {users_t}\nright:\n  topic: {conns_t}\n  key: user_id\noutput:\n  topic: {out_t}\n  record: UserDocument\n  field: connections\nbatch:\n  max_records: 2000\n  max_wait_ms: 50\n",
            stack.brokers, stack.registry
        ),
    )
    .unwrap();
    let cfg = Arc::new(unilog::joiner::config::LoadedJoinerConfig::load(&jpath).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let joiner = tokio::spawn(unilog::joiner::run(cfg, stop.clone()));
    let inputs = n_users + c;
    #[allow(clippy::cast_precision_loss)]
    let (first, last) = time_counter(
        "unilog_join_records_out_total",
        inputs as f64,
        Duration::from_secs(900),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let stats = joiner.await.unwrap().unwrap();
    let join_secs = last.duration_since(first).as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let join_rate = inputs as f64 / join_secs;

    // ---- indexer
    let docs_t = format!("b.ix.{s}");
    let alias = format!("bench_{s}");
    create_topic(&stack.brokers, &docs_t, 3).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &docs_t,
        &envelope_schema(
            "User",
            &[("user_id", "long"), ("name", "string"), ("email", "string")],
        ),
    )
    .await;
    let mut plain = Vec::with_capacity(usize::try_from(n_docs).unwrap());
    for id in 1..=n_docs {
        let (name, email) = (format!("User {id}"), format!("user{id}@example.com"));
        plain.push(serde_json::json!({"user_id": id, "name": name, "email": email}));
        let v = feed.event(
            &id.to_string(),
            "insert",
            Some(vec![
                ("user_id", Avro::Long(id)),
                ("name", Avro::String(name)),
                ("email", Avro::String(email)),
            ]),
        );
        feed.send_nowait(&id.to_string(), Some(v));
    }
    feed.flush();
    let ipath = dir.path().join("index.yaml");
    std::fs::write(
        &ipath,
        format!(
            "name: bench_{s}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nsearch:\n  url: {}\nindexes:\n  - topic: {docs_t}\n    alias: {alias}\nbatch:\n  max_docs: 1000\n  max_wait_ms: 50\n",
            stack.brokers,
            stack.registry,
            search_url()
        ),
    )
    .unwrap();
    let icfg = Arc::new(unilog::indexer::config::LoadedIndexerConfig::load(&ipath).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let indexer = tokio::spawn(unilog::indexer::run(icfg, stop.clone()));
    #[allow(clippy::cast_precision_loss)]
    let (first, last) = time_counter(
        "unilog_index_documents_total{result=\"indexed\"}",
        n_docs as f64,
        Duration::from_secs(900),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    indexer.await.unwrap().unwrap();
    let index_secs = last.duration_since(first).as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let index_rate = n_docs as f64 / index_secs;

    // ---- plain _bulk of the same documents, same bulk size, same server
    let search = Search::new();
    let plain_index = format!("bench_plain_{s}");
    let http = reqwest::Client::new();
    http.put(format!("{}/{plain_index}", search.base))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    let started = Instant::now();
    for (chunk_no, chunk) in plain.chunks(1000).enumerate() {
        let mut body = String::new();
        for (i, d) in chunk.iter().enumerate() {
            body.push_str(&serde_json::json!({"index": {"_index": plain_index, "_id": (chunk_no * 1000 + i + 1).to_string()}}).to_string());
            body.push('\n');
            body.push_str(&d.to_string());
            body.push('\n');
        }
        let r = http
            .post(format!("{}/_bulk", search.base))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let plain_secs = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let plain_rate = n_docs as f64 / plain_secs;
    assert_eq!(
        search.count(&plain_index).await,
        u64::try_from(n_docs).unwrap()
    );
    assert_eq!(search.count(&alias).await, u64::try_from(n_docs).unwrap());
    search.delete(&plain_index).await;
    search.delete(&format!("{alias}_v1")).await;

    println!("BENCH joiner: {inputs} input records ({n_users} users, {c} connections) in {join_secs:.2} s = {join_rate:.0} records/s; {} output records, {} transactions", stats.out, stats.transactions);
    println!("BENCH indexer: {n_docs} documents in {index_secs:.2} s = {index_rate:.0} docs/s");
    println!("BENCH plain _bulk: {n_docs} documents in {plain_secs:.2} s = {plain_rate:.0} docs/s (indexer/plain = {:.2})", index_rate / plain_rate);
}
