//! The MongoDB source's benchmark: events/s and latency through unilog,
//! beside the rate at which the `mongodb` driver alone reads the same change
//! stream, in the same run. Run by `scripts/bench-mongo` (which starts the
//! stack and builds in release mode); the figures go to docs/BENCHMARKS.md.
//!
//! 1. unilog starts on an empty database (change streams, no copy), goes
//!    idle, and is stopped: its saved resume token marks the start.
//! 2. N changes are written (inserts in batches, then updates of a third).
//! 3. Baseline: the driver alone opens a change stream at the same point
//!    (`updateLookup`, as unilog) and reads the N events.
//! 4. unilog resumes from its token and publishes the N events; timed from
//!    its start to the last Kafka acknowledgement (its `/metrics` counter).
//! 5. Paced load while unilog streams: commit-to-acknowledgement latency,
//!    from unilog's own histogram (its `stopped cleanly` log line).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures::StreamExt;
use mongodb::options::FullDocumentType;
use mongodb::Client;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (run scripts/bench-mongo)"))
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Unilog {
    child: Child,
    metrics: String,
}

impl Unilog {
    fn start(config: &std::path::Path, port: u16) -> Unilog {
        let child = Command::new(env("UNILOG_BIN"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start unilog");
        Unilog {
            child,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
        }
    }

    /// `unilog_events_published_total`, summed over tables.
    async fn published(&self) -> u64 {
        let Ok(r) = reqwest::get(&self.metrics).await else {
            return 0;
        };
        let text = r.text().await.unwrap_or_default();
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("unilog_events_published_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let total = total as u64;
        total
    }

    async fn wait_streaming(&self) {
        let t = Instant::now();
        while !self.phase_streaming().await {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "unilog did not start streaming"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn phase_streaming(&self) -> bool {
        let Ok(r) = reqwest::get(&self.metrics).await else {
            return false;
        };
        r.text().await.unwrap_or_default().lines().any(|l| {
            l.starts_with("unilog_pipeline_phase") && l.contains("streaming") && l.ends_with(" 1")
        })
    }

    /// SIGTERM; returns unilog's `stopped cleanly` log line (JSON).
    fn stop(mut self) -> serde_json::Value {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let mut last = serde_json::Value::Null;
        if let Some(err) = self.child.stderr.take() {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("stopped cleanly") {
                    last = serde_json::from_str(&line).unwrap_or_default();
                }
            }
        }
        let _ = self.child.wait();
        last
    }
}

#[tokio::main]
async fn main() {
    let n = arg("--changes", 100_000);
    let paced_rate = arg("--paced-rate", 2_000);
    let paced_secs = arg("--paced-secs", 10);
    let url = env("MONGO_URL");
    let client = Client::with_uri_str(&url)
        .await
        .expect("connect to MONGO_URL");
    let suffix = format!("{:x}", std::process::id() ^ 0x5eed);
    let db_name = format!("bench_{suffix}");
    let db = client.database(&db_name);
    let users = db.collection::<Document>("users");

    let dir = tempfile::tempdir().expect("temporary folder");
    let port = free_port();
    let topic = format!("bench.mongo.{suffix}");
    std::fs::write(
        dir.path().join("users.yaml"),
        format!(
            "table: {db_name}.users\ntopic: {topic}\nevents: {{insert: UserRegistered, update: UserChanged, delete: UserDeleted}}\nfields:\n  _id: long\n  email: string\n  age: int\n  balance: decimal\n  address: {{type: document, fields: {{city: string, zip: string}}}}\n  tags: {{type: array, items: string}}\n"
        ),
    )
    .expect("write mapping");
    let config = dir.path().join("pipeline.yaml");
    std::fs::write(
        &config,
        format!(
            "name: bench_{suffix}\nsource:\n  mongo:\n    url: \"{url}\"\n    snapshot: never\nkafka:\n  brokers: {}\n  partitions: 3\nschema_registry:\n  url: {}\nmappings: [users.yaml]\nstate_dir: state\nhttp:\n  listen: 127.0.0.1:{port}\n",
            env("KAFKA_BROKERS"),
            env("SCHEMA_REGISTRY_URL")
        ),
    )
    .expect("write pipeline");

    // 1. unilog notes the start.
    let u = Unilog::start(&config, port);
    u.wait_streaming().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    u.stop();
    // The driver's own start point: a change stream opened now.
    let start = db.watch().await.expect("watch").resume_token();

    // 2. N changes: inserts, then updates of every third document.
    let inserts = n * 3 / 4;
    let updates = n - inserts;
    let t = Instant::now();
    let mut next = 0u64;
    while next < inserts {
        let batch: Vec<Document> = (next..(next + 1000).min(inserts))
            .map(|i| {
                #[allow(clippy::cast_possible_wrap, clippy::cast_possible_truncation)]
                let i = i as i64;
                doc! {"_id": i, "email": format!("u{i}@example.com"), "age": (i % 90) as i32,
                "balance": format!("{i}.25").parse::<bson::Decimal128>().unwrap(),
                "address": {"city": "Lyon", "zip": "69001"}, "tags": ["a", "b"]}
            })
            .collect();
        next += batch.len() as u64;
        users.insert_many(batch).await.expect("insert");
    }
    for i in 0..updates {
        #[allow(clippy::cast_possible_wrap)]
        let id = ((i * 3) % inserts) as i64;
        users
            .update_one(doc! {"_id": id}, doc! {"$set": {"age": 99}})
            .await
            .expect("update");
    }
    let write_secs = t.elapsed().as_secs_f64();

    // 3. Baseline: the driver alone.
    let t = Instant::now();
    let mut stream = db
        .watch()
        .resume_after(start)
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .expect("watch")
        .with_type::<Document>();
    let mut seen = 0u64;
    while seen < n {
        match stream.next().await {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => panic!("baseline change stream: {e}"),
            None => break,
        }
    }
    let raw_secs = t.elapsed().as_secs_f64();
    drop(stream);

    // 4. unilog resumes and publishes the backlog.
    let t = Instant::now();
    let u = Unilog::start(&config, port);
    let mut published = 0;
    while published < n {
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "unilog published {published} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        published = u.published().await;
    }
    let unilog_secs = t.elapsed().as_secs_f64();
    u.stop();

    // 5. Paced load for latency, on a fresh process (its histogram holds
    // only the paced changes).
    let u = Unilog::start(&config, port);
    u.wait_streaming().await;
    let interval = Duration::from_secs_f64(1.0 / paced_rate as f64);
    let t = Instant::now();
    let mut written = 0u64;
    while t.elapsed() < Duration::from_secs(paced_secs) {
        #[allow(clippy::cast_possible_wrap)]
        let id = (written % inserts) as i64;
        users
            .update_one(doc! {"_id": id}, doc! {"$inc": {"age": 1}})
            .await
            .expect("paced update");
        written += 1;
        let due = interval.mul_f64(written as f64);
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let paced_actual = written as f64 / t.elapsed().as_secs_f64();
    let target = written;
    let t = Instant::now();
    while u.published().await < target && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = u.stop();
    let _ = db.drop().await;

    #[allow(clippy::cast_precision_loss)]
    let rate = |secs: f64| n as f64 / secs;
    println!("MongoDB source benchmark ({n} changes: {inserts} inserts, {updates} updates; server: MONGO_URL)");
    println!("  written in {write_secs:.1} s");
    println!(
        "  driver alone (change stream, updateLookup): {:.0} events/s ({raw_secs:.2} s)",
        rate(raw_secs)
    );
    println!(
        "  unilog, resume to last Kafka ack:           {:.0} events/s ({unilog_secs:.2} s)",
        rate(unilog_secs)
    );
    println!("  ratio unilog / driver: {:.2}", raw_secs / unilog_secs);
    println!(
        "  paced {paced_actual:.0} updates/s for {paced_secs} s: commit-to-ack p50 {} ms, p99 {} ms ({} samples)",
        log["fields"]["latency_p50_ms"], log["fields"]["latency_p99_ms"], log["fields"]["latency_samples"]
    );
}
