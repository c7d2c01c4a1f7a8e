//! `unilog index` and `unilog reindex` against the local stack's search
//! emulator, or a real Elasticsearch/OpenSearch cluster through `SEARCH_URL`.
//!
//! Input topics are written directly (tests/feeds), in the shape the
//! pipeline publishes.

mod feeds;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::Value as Avro;
use feeds::{create_topic, envelope_schema, search_url, Feed, Search};
use serde_json::json;
use support::{consume, suffix, Stack};
use unilog::indexer::config::LoadedIndexerConfig;

const ROW: &[(&str, &str)] = &[("user_id", "long"), ("name", "string"), ("age", "string")];

struct Setup {
    _dir: tempfile::TempDir,
    cfg: Arc<LoadedIndexerConfig>,
    dlq: String,
}

fn setup(stack: &Stack, topic: &str, alias: &str, extra_index: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("ix_{}", suffix());
    let dlq = format!("dlq.{name}");
    let text = format!(
        "name: {name}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nsearch:\n  url: {}\nindexes:\n  - topic: {topic}\n    alias: {alias}\n{extra_index}dead_letter_topic: {dlq}\nbatch:\n  max_docs: 100\n  max_wait_ms: 100\nretry:\n  initial_ms: 50\n  max_ms: 500\n{extra}",
        stack.brokers,
        stack.registry,
        search_url()
    );
    let path = dir.path().join("index.yaml");
    std::fs::write(&path, text).unwrap();
    Setup {
        cfg: Arc::new(LoadedIndexerConfig::load(&path).unwrap()),
        _dir: dir,
        dlq,
    }
}

struct Live {
    stop: Arc<AtomicBool>,
    handle:
        tokio::task::JoinHandle<Result<unilog::indexer::IndexStats, unilog::indexer::IndexError>>,
}

impl Live {
    fn start(cfg: &Arc<LoadedIndexerConfig>) -> Live {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(unilog::indexer::run(cfg.clone(), stop.clone()));
        Live { stop, handle }
    }

    async fn stop(self) -> unilog::indexer::IndexStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap().expect("indexer failed")
    }
}

/// The sum of the committed offsets of `group` on `topic`.
fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(10))
        .map(|l| {
            l.elements()
                .iter()
                .filter_map(|e| e.offset().to_raw())
                .filter(|o| *o > 0)
                .sum()
        })
        .unwrap_or(0)
}

fn user(id: i64, name: &str) -> Vec<(&'static str, Avro)> {
    vec![
        ("user_id", Avro::Long(id)),
        ("name", Avro::String(name.into())),
        ("age", Avro::String("30".into())),
    ]
}

/// Inserts, updates, delete events and tombstones; then a replay of the
/// whole topic by a second indexer changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_changes_and_a_replay_never_rolls_back() {
    let stack = Stack::from_env();
    let s = suffix();
    let topic = format!("ix.users.{s}");
    let alias = format!("users_{s}");
    create_topic(&stack.brokers, &topic, 3).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &topic,
        &envelope_schema("User", ROW),
    )
    .await;
    for id in 1..=40 {
        feed.upsert(&id.to_string(), "insert", user(id, &format!("first {id}")))
            .await;
    }
    for id in 1..=10 {
        feed.upsert(&id.to_string(), "update", user(id, &format!("second {id}")))
            .await;
    }
    for id in 31..=35 {
        feed.delete(&id.to_string()).await;
    }
    for id in 36..=40 {
        feed.send(&id.to_string(), None).await; // tombstones
    }
    let st = setup(&stack, &topic, &alias, "", "");
    let search = Search::new();
    let live = Live::start(&st.cfg);
    search.wait_count(&alias, 30, Duration::from_secs(60)).await;
    // The alias points at a versioned index whose mapping came from the schema.
    let (_, a) = search.get(&format!("/_alias/{alias}")).await;
    let index = a.as_object().unwrap().keys().next().unwrap().clone();
    assert_eq!(index, format!("{alias}_v1"));
    let (_, m) = search.get(&format!("/{index}/_mapping")).await;
    assert_eq!(
        m[&index]["mappings"]["properties"]["user_id"]["type"], "long",
        "{m}"
    );
    assert_eq!(
        m[&index]["mappings"]["properties"]["name"]["type"], "text",
        "{m}"
    );
    // Changes after the start arrive too.
    feed.upsert("11", "update", user(11, "third 11")).await;
    let start = std::time::Instant::now();
    while search.doc(&alias, "11").await.unwrap()["name"] != "third 11" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "update of 11 not indexed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = live.stop().await;
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(search.doc(&alias, "3").await.unwrap()["name"], "second 3");
    assert_eq!(search.doc(&alias, "20").await.unwrap()["name"], "first 20");
    assert!(search.doc(&alias, "33").await.is_none());
    assert!(search.doc(&alias, "38").await.is_none());

    // A replay from offset 0 (a new group) writes only older or equal
    // versions: nothing rolls back, nothing comes back.
    let replay = setup(&stack, &topic, &alias, "", "");
    let live = Live::start(&replay.cfg);
    // Until the replay has committed every record of the topic (61).
    let start = std::time::Instant::now();
    while committed_total(&stack.brokers, &replay.cfg.group(), &topic, 3) < 61 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the replay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = live.stop().await;
    assert!(
        stats.stale + stats.indexed + stats.deleted == 61,
        "{stats:?}"
    );
    assert_eq!(search.count(&alias).await, 30);
    assert_eq!(search.doc(&alias, "3").await.unwrap()["name"], "second 3");
    assert_eq!(search.doc(&alias, "11").await.unwrap()["name"], "third 11");
    assert!(search.doc(&alias, "33").await.is_none());
    search.delete(&index).await;
}

/// A document the server refuses goes to the dead-letter topic with the
/// reason; the others are indexed and the indexer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_a_rejected_document() {
    let stack = Stack::from_env();
    let s = suffix();
    let topic = format!("ix.dlq.{s}");
    let alias = format!("dlq_{s}");
    create_topic(&stack.brokers, &topic, 1).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &topic,
        &envelope_schema("User", ROW),
    )
    .await;
    // `age` is a string in the schema; the override makes it an integer, so
    // a non-numeric age is refused by the server.
    let st = setup(
        &stack,
        &topic,
        &alias,
        "    mappings:\n      age: { type: integer }\n",
        "",
    );
    for id in 1..=5 {
        let mut row = user(id, &format!("u{id}"));
        if id == 3 {
            row[2] = ("age", Avro::String("thirty".into()));
        }
        feed.upsert(&id.to_string(), "insert", row).await;
    }
    let search = Search::new();
    let live = Live::start(&st.cfg);
    search.wait_count(&alias, 4, Duration::from_secs(60)).await;
    let dead = consume(
        &stack.brokers,
        &st.dlq,
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(d["key"], "3");
    assert_eq!(d["topic"], topic.as_str());
    assert_eq!(d["status"], 400);
    assert!(d["reason"].as_str().unwrap().contains("age"), "{d}");
    // It goes on.
    feed.upsert("6", "insert", user(6, "u6")).await;
    search.wait_count(&alias, 5, Duration::from_secs(30)).await;
    let stats = live.stop().await;
    assert_eq!(stats.dead_lettered, 1);
    assert!(search.doc(&alias, "3").await.is_none());
    search.delete(&format!("{alias}_v1")).await;
}

/// Blue/green: the reindex replays into `_v2` while the live indexer and a
/// producer go on; the alias swaps once, searches through it never see
/// fewer documents than before, and no live change is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_with_live_writes() {
    let stack = Stack::from_env();
    let s = suffix();
    let topic = format!("ix.re.{s}");
    let alias = format!("re_{s}");
    create_topic(&stack.brokers, &topic, 3).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &topic,
        &envelope_schema("User", ROW),
    )
    .await;
    let n = 300;
    for id in 1..=n {
        feed.upsert(&id.to_string(), "insert", user(id, "v0")).await;
    }
    let st = setup(&stack, &topic, &alias, "", "");
    let search = Arc::new(Search::new());
    let live = Live::start(&st.cfg);
    search
        .wait_count(&alias, u64::try_from(n).unwrap(), Duration::from_secs(60))
        .await;

    // Live writes: every user gets versions v1..v3 while the reindex runs.
    let writer = tokio::spawn(async move {
        for round in 1..=3 {
            for id in 1..=n {
                feed.upsert(&id.to_string(), "update", user(id, &format!("v{round}")))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // Searches through the alias during the reindex.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (search, alias, watching) = (search.clone(), alias.clone(), watching.clone());
        tokio::spawn(async move {
            let mut min = u64::MAX;
            while watching.load(Ordering::Relaxed) {
                let (_, c) = search.get(&format!("/{alias}/_count")).await;
                min = min.min(c["count"].as_u64().unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            min
        })
    };
    let opts = unilog::indexer::reindex::ReindexOptions {
        alias: alias.clone(),
        keep_old: false,
        settle: Duration::from_secs(3),
        progress: false,
    };
    let report = unilog::indexer::reindex::reindex(st.cfg.clone(), &opts)
        .await
        .unwrap();
    writer.await.unwrap();
    assert_eq!(report.index, format!("{alias}_v2"));
    assert_eq!(report.previous, vec![format!("{alias}_v1")]);
    assert!(report.dropped_previous);
    let (_, a) = search.get(&format!("/_alias/{alias}")).await;
    assert_eq!(
        a.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec![&format!("{alias}_v2")]
    );
    let (old, _) = search.get(&format!("/{alias}_v1")).await;
    assert_eq!(old, 404, "the old index is dropped");
    // Every user ends at its last version, through the alias.
    let start = std::time::Instant::now();
    loop {
        search.refresh(&alias).await;
        let mut stale = Vec::new();
        for id in 1..=n {
            let d = search.doc(&alias, &id.to_string()).await;
            if d.as_ref().map(|d| d["name"].clone()) != Some(json!("v3")) {
                stale.push(id);
            }
        }
        if stale.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not at v3: {stale:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    watching.store(false, Ordering::Relaxed);
    let min = watcher.await.unwrap();
    assert!(
        min >= u64::try_from(n).unwrap(),
        "a search through the alias saw {min} documents"
    );
    live.stop().await;
    search.delete(&format!("{alias}_v2")).await;
}

/// `GET /search/<alias>?q=...` served by the indexer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_endpoint_finds_documents() {
    let stack = Stack::from_env();
    let s = suffix();
    let topic = format!("ix.q.{s}");
    let alias = format!("q_{s}");
    create_topic(&stack.brokers, &topic, 1).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &topic,
        &envelope_schema("User", ROW),
    )
    .await;
    feed.upsert("1", "insert", user(1, "Ada Lovelace")).await;
    feed.upsert("2", "insert", user(2, "Grace Hopper")).await;
    let port = support::free_port();
    let st = setup(
        &stack,
        &topic,
        &alias,
        "",
        &format!("http:\n  listen: 127.0.0.1:{port}\n"),
    );
    let handle = {
        let cfg = st.cfg.clone();
        let c = &cfg.config;
        let state = unilog::indexer::http::SearchState {
            search: unilog::indexer::search::SearchClient::new(
                &c.search.url,
                None,
                None,
                Duration::from_secs(5),
            )
            .unwrap(),
            aliases: vec![alias.clone()],
            default_size: 10,
        };
        tokio::spawn(unilog::indexer::http::serve(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Some(state),
            Duration::from_secs(60),
        ))
    };
    let search = Search::new();
    let live = Live::start(&st.cfg);
    search.wait_count(&alias, 2, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let r: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/search/{alias}?q=grace"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["total"], 1, "{r}");
    assert_eq!(r["hits"][0]["id"], "2");
    assert_eq!(r["hits"][0]["source"]["name"], "Grace Hopper");
    let nf = http
        .get(format!("http://127.0.0.1:{port}/search/other?q=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(nf.status().as_u16(), 404);
    live.stop().await;
    handle.abort();
    search.delete(&format!("{alias}_v1")).await;
}

/// A proxy in front of the search server that answers every `_bulk` with
/// 429 or 503 while `failing` is set, and forwards everything else.
async fn flaky_proxy(failing: Arc<AtomicBool>) -> (String, tokio::task::JoinHandle<()>) {
    use axum::body::Bytes;
    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    #[derive(Clone)]
    struct St {
        failing: Arc<AtomicBool>,
        upstream: String,
        http: reqwest::Client,
        n: Arc<std::sync::atomic::AtomicU64>,
    }
    async fn handle(State(st): State<St>, req: Request) -> Response {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let method = req.method().clone();
        let ct = req.headers().get("content-type").cloned();
        let body: Bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        if path.starts_with("/_bulk") && st.failing.load(Ordering::Relaxed) {
            let n = st.n.fetch_add(1, Ordering::Relaxed);
            let status = if n % 2 == 0 {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return (status, "{\"error\":\"injected\"}").into_response();
        }
        let mut r = st
            .http
            .request(
                reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
                format!("{}{path}", st.upstream),
            )
            .body(body.to_vec());
        if let Some(ct) = ct {
            r = r.header("content-type", ct.to_str().unwrap_or_default());
        }
        let resp = r.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let bytes = resp.bytes().await.unwrap_or_default();
        (
            status,
            [("content-type", "application/json")],
            bytes.to_vec(),
        )
            .into_response()
    }
    let st = St {
        failing,
        upstream: search_url(),
        http: reqwest::Client::new(),
        n: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(handle).with_state(st);
    let h = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), h)
}

/// 429 and 503 are retried with backoff; offsets are committed only after
/// the bulk request succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_and_5xx_and_commits_only_after_success() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let stack = Stack::from_env();
    let s = suffix();
    let topic = format!("ix.retry.{s}");
    let alias = format!("retry_{s}");
    create_topic(&stack.brokers, &topic, 1).await;
    let mut feed = Feed::new(
        &stack.brokers,
        &stack.registry,
        &topic,
        &envelope_schema("User", ROW),
    )
    .await;
    for id in 1..=20 {
        feed.upsert(&id.to_string(), "insert", user(id, "x")).await;
    }
    let failing = Arc::new(AtomicBool::new(true));
    let (proxy, proxy_task) = flaky_proxy(failing.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let group = format!("g_{s}");
    let text = format!(
        "name: ix_{s}\nkafka:\n  brokers: {}\n  group: {group}\nschema_registry:\n  url: {}\nsearch:\n  url: {proxy}\nindexes:\n  - topic: {topic}\n    alias: {alias}\nretry:\n  initial_ms: 50\n  max_ms: 300\n",
        stack.brokers, stack.registry
    );
    let path = dir.path().join("index.yaml");
    std::fs::write(&path, text).unwrap();
    let cfg = Arc::new(LoadedIndexerConfig::load(&path).unwrap());
    let live = Live::start(&cfg);
    let committed = || {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &stack.brokers)
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        c.committed_offsets(tpl, Duration::from_secs(10))
            .unwrap()
            .elements()[0]
            .offset()
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let search = Search::new();
    assert_eq!(search.count(&alias).await, 0);
    assert!(
        !matches!(committed(), rdkafka::Offset::Offset(o) if o > 0),
        "offsets committed before any bulk succeeded"
    );
    failing.store(false, Ordering::Relaxed);
    search.wait_count(&alias, 20, Duration::from_secs(30)).await;
    let stats = live.stop().await;
    assert!(stats.retries >= 2, "{stats:?}");
    assert_eq!(stats.indexed, 20);
    assert_eq!(committed(), rdkafka::Offset::Offset(20));
    proxy_task.abort();
    search.delete(&format!("{alias}_v1")).await;
}
