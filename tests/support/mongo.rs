//! A MongoDB pipeline in a temporary folder, against `MONGO_URL`: the
//! stack's stand-in (`standins/mongo`) or a real replica set.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bson::{doc, Document};
use mongodb::{Client, Collection};

use super::{need, suffix, Stack};

/// The users mapping the Mongo tests share: every declared type.
pub fn users_mapping(db: &str, topic: &str) -> String {
    format!(
        "table: {db}.users\ntopic: {topic}\nrecord: User\nevents:\n  insert: UserRegistered\n  update: UserChanged\n  delete: UserDeleted\n  snapshot: UserImported\n  truncate: UsersDropped\nfields:\n  _id: object_id\n  email: {{ type: string, required: true }}\n  age: int\n  balance: decimal\n  joined: date\n  address: {{ type: document, fields: {{ city: string, zip: string }} }}\n  tags: {{ type: array, items: string }}\n"
    )
}

/// A Mongo pipeline file, its mapping and its own database.
pub struct MongoFixture {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub name: String,
    /// The test's own database (`t_<suffix>`).
    pub db: String,
    pub topic: String,
    pub url: String,
    pub client: Client,
}

impl MongoFixture {
    /// `mode`: `change_streams` or `oplog`; `extra`: more lines under `source.mongo`.
    pub async fn new(stack: &Stack, mode: &str, source_extra: &str, extra: &str) -> MongoFixture {
        Self::with_url(stack, &need("MONGO_URL"), mode, source_extra, extra).await
    }

    /// Against the server at `url`.
    pub async fn with_url(
        stack: &Stack,
        url: &str,
        mode: &str,
        source_extra: &str,
        extra: &str,
    ) -> MongoFixture {
        let url = url.to_string();
        let dir = tempfile::tempdir().unwrap();
        let s = suffix();
        let name = format!("m_{s}");
        let db = format!("t_{s}");
        let topic = format!("mongo.{db}.users");
        std::fs::write(dir.path().join("users.yaml"), users_mapping(&db, &topic)).unwrap();
        let config = dir.path().join("pipeline.yaml");
        write_config(&config, stack, &name, &url, mode, source_extra, extra);
        let client = Client::with_uri_str(&url)
            .await
            .expect("connect to MONGO_URL");
        MongoFixture {
            dir,
            config,
            name,
            db,
            topic,
            url,
            client,
        }
    }

    pub fn users(&self) -> Collection<Document> {
        self.client.database(&self.db).collection("users")
    }

    pub fn load(&self) -> unilog::config::LoadedConfig {
        unilog::config::LoadedConfig::load(&self.config).unwrap()
    }

    /// Runs the pipeline in this process.
    pub fn start(&self) -> super::Running {
        let cfg = self.load();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move { unilog::pipeline::run(&cfg, flag).await });
        super::Running { stop, handle }
    }

    pub fn dead_letter_topic(&self) -> String {
        format!("unilog.{}.dead_letter", self.name)
    }

    /// Drops the test's database.
    pub async fn cleanup(&self) {
        let _ = self.client.database(&self.db).drop().await;
    }

    /// Runs a stand-in test hook; `false` on a real server (no such command).
    pub async fn standin_hook(&self, cmd: Document) -> bool {
        self.client.database("admin").run_command(cmd).await.is_ok()
    }
}

/// Writes a Mongo pipeline file. `extra` may hold a `batch:` section.
pub fn write_config(
    path: &std::path::Path,
    stack: &Stack,
    name: &str,
    url: &str,
    mode: &str,
    source_extra: &str,
    extra: &str,
) {
    let batch = if extra.contains("batch:") {
        ""
    } else {
        "batch:\n  max_wait_ms: 10\n"
    };
    let text = format!(
        "name: {name}\nsource:\n  mongo:\n    url: \"{url}\"\n    mode: {mode}\n    max_await_ms: 200\n{source_extra}kafka:\n  brokers: {}\n  partitions: 3\nschema_registry:\n  url: {}\nmappings:\n  - users.yaml\nstate_dir: state\n{batch}{extra}",
        stack.brokers, stack.registry
    );
    std::fs::write(path, text).unwrap();
}

/// A private stand-in (for tests that damage the oplog), killed on drop.
pub struct PrivateStandIn {
    pub url: String,
    _child: super::Killed,
}

impl PrivateStandIn {
    pub async fn start() -> PrivateStandIn {
        let port = super::free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mongo-standin"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mongo-standin");
        let child = super::Killed(child);
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "stand-in did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        PrivateStandIn {
            url: format!("mongodb://127.0.0.1:{port}/?replicaSet=rs0"),
            _child: child,
        }
    }
}

/// A sample user.
pub fn user(n: i32) -> Document {
    doc! {
        "_id": bson::oid::ObjectId::new(),
        "email": format!("u{n}@example.com"),
        "age": n,
        "balance": format!("{n}.50").parse::<bson::Decimal128>().unwrap(),
        "joined": bson::DateTime::from_millis(1_700_000_000_000 + i64::from(n)),
        "address": {"city": "Lyon", "zip": format!("{n:05}")},
        "tags": ["a", "b"],
    }
}
