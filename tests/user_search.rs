//! The whole path, as `scripts/demo-search` shows it, in one test: a row
//! changes in the legacy PostgreSQL database (demo/schema.sql), the
//! pipeline publishes the event, the joiner re-emits the user document
//! (users JOIN user_connections), the indexer writes it, and a search on
//! the indexer's endpoint finds it. The mappings are the demo's
//! (config/mappings), on topics of this test's own.

mod feeds;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feeds::{search_url, Search};
use serde_json::Value as Json;
use support::{free_port, suffix, Fixture, Running, Stack, TestDb};

fn mapping(file: &str, topic: &str, new_topic: &str) -> String {
    let text = std::fs::read_to_string(format!(
        "{}/config/mappings/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert!(text.contains(&format!("topic: {topic}\n")));
    text.replace(
        &format!("topic: {topic}\n"),
        &format!("topic: {new_topic}\n"),
    )
}

async fn search(port: u16, alias: &str, q: &str) -> Json {
    reqwest::get(format!("http://127.0.0.1:{port}/search/{alias}?{q}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Json::Null)
}

async fn until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "{what} not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_row_change_reaches_a_search_hit() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            &std::fs::read_to_string(format!("{}/demo/schema.sql", env!("CARGO_MANIFEST_DIR")))
                .unwrap(),
        )
        .await
        .unwrap();
    let s = suffix();
    let (users_t, conns_t, docs_t, alias) = (
        format!("legacy.users.{s}"),
        format!("legacy.user_connections.{s}"),
        format!("user.documents.{s}"),
        format!("users_{s}"),
    );
    let fx = Fixture::new(
        &stack,
        &db,
        &[
            (
                "users.yaml",
                mapping("users.yaml", "legacy.users", &users_t),
            ),
            (
                "user_connections.yaml",
                mapping("user_connections.yaml", "legacy.user_connections", &conns_t),
            ),
        ],
        "",
    );
    let pipeline = Running::start(&fx);
    db.wait_streaming(&fx.slot, Duration::from_secs(60)).await;

    let dir = tempfile::tempdir().unwrap();
    let join = dir.path().join("join.yaml");
    std::fs::write(
        &join,
        format!(
            "name: docs_{s}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nstate_dir: state\nleft:\n  topic: {users_t}\nright:\n  topic: {conns_t}\n  key: user_id\noutput:\n  topic: {docs_t}\n  record: UserDocument\n  field: connections\nbatch:\n  max_wait_ms: 20\n",
            stack.brokers, stack.registry
        ),
    )
    .unwrap();
    let port = free_port();
    let index = dir.path().join("index.yaml");
    std::fs::write(
        &index,
        format!(
            "name: search_{s}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nsearch:\n  url: {}\nindexes:\n  - topic: {docs_t}\n    alias: {alias}\n    mappings:\n      email: {{ type: keyword }}\nbatch:\n  max_wait_ms: 50\nhttp:\n  listen: 127.0.0.1:{port}\n",
            stack.brokers,
            stack.registry,
            search_url()
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let jcfg = Arc::new(unilog::joiner::config::LoadedJoinerConfig::load(&join).unwrap());
    let joiner = tokio::spawn(unilog::joiner::run(jcfg, stop.clone()));
    // The joiner creates the output topic and registers its schema; the
    // indexer derives its mapping from that schema.
    until("the joined topic", Duration::from_secs(60), async || {
        support::consume(
            &stack.brokers,
            &docs_t,
            1,
            Duration::from_millis(100),
            Duration::from_secs(3),
        )
        .await
        .len()
            >= 20
    })
    .await;
    let icfg = Arc::new(unilog::indexer::config::LoadedIndexerConfig::load(&index).unwrap());
    let h = icfg.config.http.clone().unwrap();
    let c = &icfg.config;
    let server = tokio::spawn(unilog::indexer::http::serve(
        h.listen.parse().unwrap(),
        Some(unilog::indexer::http::SearchState {
            search: unilog::indexer::search::SearchClient::new(
                &c.search.url,
                None,
                None,
                Duration::from_secs(10),
            )
            .unwrap(),
            aliases: vec![alias.clone()],
            default_size: 10,
        }),
        Duration::from_secs(60),
    ));
    let indexer = tokio::spawn(unilog::indexer::run(icfg.clone(), stop.clone()));
    until(
        "the seeded users in the index",
        Duration::from_secs(60),
        async || search(port, &alias, "size=1").await["total"].as_u64() == Some(20),
    )
    .await;
    // The mapping came from the joined schema.
    let (_, m) = Search::new().get(&format!("/{alias}_v1/_mapping")).await;
    let props = &m[format!("{alias}_v1")]["mappings"]["properties"];
    assert_eq!(props["email"]["type"], "keyword", "{m}");
    assert_eq!(props["connections_count"]["type"], "integer", "{m}");

    // A row changes in the legacy database...
    db.client
        .batch_execute(
            "UPDATE users SET name = 'Zelda Fitzgerald', updated_at = now() WHERE id = 1",
        )
        .await
        .unwrap();
    // ... and a search finds the joined document by the new name.
    let mut hit = Json::Null;
    until(
        "the renamed user found",
        Duration::from_secs(30),
        async || {
            let r = search(port, &alias, "q=zelda").await;
            hit = r["hits"][0].clone();
            hit["id"] == "1"
        },
    )
    .await;
    assert_eq!(hit["source"]["display_name"], "Zelda Fitzgerald");
    assert_eq!(hit["source"]["email"], "user1@example.com");
    assert_eq!(hit["source"]["connections_count"], 1);
    assert_eq!(hit["source"]["connections"][0]["friend_id"], 2);
    // A child row: a new connection, then a deleted one, re-emit the user.
    db.client
        .batch_execute("INSERT INTO user_connections (user_id, friend_id) VALUES (1, 7)")
        .await
        .unwrap();
    until("connections_count 2", Duration::from_secs(30), async || {
        search(port, &alias, "q=zelda").await["hits"][0]["source"]["connections_count"] == 2
    })
    .await;
    db.client
        .batch_execute("DELETE FROM user_connections WHERE user_id = 1 AND friend_id = 2")
        .await
        .unwrap();
    until(
        "connections_count 1 (friend 7)",
        Duration::from_secs(30),
        async || {
            let s = search(port, &alias, "q=zelda").await["hits"][0]["source"].clone();
            s["connections_count"] == 1 && s["connections"][0]["friend_id"] == 7
        },
    )
    .await;
    // A deleted user leaves the index.
    db.client
        .batch_execute("DELETE FROM users WHERE id = 1")
        .await
        .unwrap();
    until(
        "the deleted user gone",
        Duration::from_secs(30),
        async || search(port, &alias, "q=zelda").await["total"] == 0,
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    joiner.await.unwrap().unwrap();
    indexer.await.unwrap().unwrap();
    server.abort();
    pipeline.stop().await;
    Search::new().delete(&format!("{alias}_v1")).await;
    db.cleanup().await;
}
