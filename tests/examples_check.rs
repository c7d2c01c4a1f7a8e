//! The example pipelines (config/examples/, config/demo.yaml) pass the real
//! `unilog check` against a database made from demo/schema.sql, and every
//! mapping of the docs compiles against the same tables.
//!
//! The examples name their servers by `${PG_URL}`, `${KAFKA_BROKERS}` and
//! `${SCHEMA_REGISTRY_URL}`; the test sets those for the child process only,
//! pointing at a fresh database and at the stack the tests use.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use support::docs::{by_section, expand_example, materialize, repo, yaml_blocks, BlockKind};
use support::*;
use unilog::checkpoint::FileCheckpointStore;
use unilog::config::{LoadedConfig, SnapshotMode};
use unilog::event::TableInfo;
use unilog::mapping::spec::LoadedMapping;
use unilog::mapping::Mapper;
use unilog::sinks::kafka::KafkaSink;
use unilog::sources::pg_logical::{PgSettings, PgSource};

/// Examples that `unilog check` must accept against the local stack.
const CHECKED: &[&str] = &[
    "config/demo.yaml",
    "config/examples/minimal/pipeline.yaml",
    "config/examples/crm/pipeline.yaml",
    "config/examples/mongo/pipeline.yaml",
];

/// Examples whose Kafka security settings cannot work against the local
/// broker (plaintext, no SASL): only loaded, and their mappings compiled.
const LOADED_ONLY: &[&str] = &["config/examples/secure/pipeline.yaml"];

/// A database with the demo tables.
async fn demo_db(stack: &Stack) -> TestDb {
    let db = TestDb::create(stack).await;
    let schema = std::fs::read_to_string(repo().join("demo/schema.sql")).expect("demo/schema.sql");
    db.client
        .batch_execute(&schema)
        .await
        .expect("loading demo/schema.sql");
    db
}

/// The demo tables as unilog's catalog reads them.
async fn demo_tables(db: &TestDb) -> HashMap<String, Arc<TableInfo>> {
    let state = tempfile::tempdir().unwrap();
    let settings = PgSettings {
        url: db.url.clone(),
        slot: "unused".into(),
        publication: "unused".into(),
        snapshot: SnapshotMode::Never,
        manage_publication: false,
        on_slot_lost: unilog::config::SlotLostPolicy::Stop,
        insert_publication: "unused_inserts".into(),
        set_replica_identity: unilog::config::ReplicaIdentityFix::Never,
    };
    let mut source = PgSource::connect(settings, FileCheckpointStore::new(state.path(), "t"))
        .await
        .expect("connect");
    let names: Vec<(String, String)> = ["users", "user_connections", "posts"]
        .map(|t| ("public".to_string(), t.to_string()))
        .to_vec();
    let tables = source.load_tables(&names).await.expect("catalog");
    assert_eq!(tables.len(), 3, "demo tables missing: {:?}", tables.keys());
    tables
}

/// Compiles mappings: MongoDB ones (with `fields:`) against their declared
/// fields, the others against the demo tables.
fn compile(origin: &str, mappings: &[LoadedMapping], tables: &HashMap<String, Arc<TableInfo>>) {
    let mut tables = tables.clone();
    let mongo: Vec<LoadedMapping> = mappings
        .iter()
        .filter(|m| m.spec.fields.is_some())
        .cloned()
        .collect();
    match unilog::sources::mongo_oplog::declared_collections(&mongo) {
        Ok(declared) => tables.extend(declared),
        Err(e) => panic!("{origin}: {e}"),
    }
    if let Err(e) = Mapper::new(mappings, &tables) {
        panic!("{origin}: does not compile against the demo tables: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_pipelines_pass_unilog_check() {
    let stack = Stack::from_env();
    let db = demo_db(&stack).await;
    // What config/examples/crm/pipeline.yaml says to run once (its
    // friendships are keyed by two columns, which deletes must carry).
    db.client
        .batch_execute("ALTER TABLE user_connections REPLICA IDENTITY USING INDEX user_connections_user_id_friend_id_key")
        .await
        .expect("replica identity of the crm example");
    for rel in CHECKED {
        let path = repo().join(rel);
        let out = Command::new(unilog_bin())
            .args(["check", "--config"])
            .arg(&path)
            .env("PG_URL", &db.url)
            .env("KAFKA_BROKERS", &stack.brokers)
            .env("SCHEMA_REGISTRY_URL", &stack.registry)
            .env("MONGO_URL", need("MONGO_URL"))
            .env_remove("KAFKA_REPLICATION_FACTOR")
            .env_remove("UNILOG_HTTP_LISTEN")
            .output()
            .expect("running unilog check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "unilog check --config {rel} exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status.code()
        );
        assert!(stdout.contains("ready to run"), "{rel}: {stdout}");
        println!("unilog check --config {rel}: ok\n{stdout}");
    }
    db.cleanup().await;
}

/// Loads a pipeline file with example values for its variables (the test
/// process's own environment is left alone).
fn load_with_example_env(rel: &str) -> (tempfile::TempDir, LoadedConfig, Vec<LoadedMapping>) {
    let path = repo().join(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let expanded = dir.path().join("pipeline.yaml");
    std::fs::write(&expanded, expand_example(rel, &text)).unwrap();
    let cfg = LoadedConfig::load(&expanded).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let folder = path.parent().unwrap_or(Path::new("."));
    let mappings = cfg
        .config
        .mappings
        .iter()
        .map(|m| LoadedMapping::load(&folder.join(m)).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect();
    (dir, cfg, mappings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_example_loads_and_its_mappings_compile() {
    let stack = Stack::from_env();
    let db = demo_db(&stack).await;
    let tables = demo_tables(&db).await;
    for rel in LOADED_ONLY {
        let (_dir, cfg, mappings) = load_with_example_env(rel);
        compile(rel, &mappings, &tables);
        let props = &cfg.config.kafka.properties;
        assert_eq!(
            props.get("security.protocol").map(String::as_str),
            Some("SASL_SSL")
        );
        assert!(cfg.config.schema_registry.username.is_some());
        // Whether librdkafka takes these settings depends on the build:
        // the default one (feature `kafka-tls`) links OpenSSL,
        // `--no-default-features` does not.
        let sink = KafkaSink::new(&cfg.config.kafka.brokers, props);
        if cfg!(feature = "kafka-tls") {
            assert!(sink.is_ok(), "{rel}: {:?}", sink.err());
        } else {
            let err = sink.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                err.to_lowercase().contains("ssl"),
                "{rel}: a build without kafka-tls should refuse SASL_SSL, got `{err}`"
            );
        }
    }
    db.cleanup().await;
}

/// Every mapping of the docs, and of each example pipeline, compiles against
/// the demo tables: column names, keys and types are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doc_mappings_compile_against_the_demo_tables() {
    let stack = Stack::from_env();
    let db = demo_db(&stack).await;
    let tables = demo_tables(&db).await;
    let mut compiled = 0;
    for doc in ["docs/CONFIG.md", "docs/MAPPING-COOKBOOK.md"] {
        let blocks = yaml_blocks(doc);
        for (_section, blocks) in by_section(&blocks) {
            let (_dir, paths) = materialize(&blocks);
            for (b, path) in blocks.iter().zip(&paths) {
                match b.kind {
                    BlockKind::Mapping => {
                        let m = LoadedMapping::load(path)
                            .unwrap_or_else(|e| panic!("{}: {e}", b.origin));
                        compile(&b.origin, &[m], &tables);
                        compiled += 1;
                    }
                    BlockKind::Pipeline => {
                        let cfg = LoadedConfig::load(path)
                            .unwrap_or_else(|e| panic!("{}: {e}", b.origin));
                        let ms: Vec<LoadedMapping> = cfg
                            .config
                            .mappings
                            .iter()
                            .map(|m| {
                                LoadedMapping::load(&cfg.resolve(m))
                                    .unwrap_or_else(|e| panic!("{}: {e}", b.origin))
                            })
                            .collect();
                        compile(&b.origin, &ms, &tables);
                        compiled += 1;
                    }
                    BlockKind::Fragment => {}
                }
            }
        }
    }
    for rel in CHECKED.iter().chain(LOADED_ONLY) {
        let (_dir, _cfg, mappings) = load_with_example_env(rel);
        compile(rel, &mappings, &tables);
        compiled += 1;
    }
    assert!(compiled >= 12, "only {compiled} mappings compiled");
    db.cleanup().await;
}
