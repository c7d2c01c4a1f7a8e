//! A Kafka-protocol broker that keeps its data when it stops, for the
//! opt-in tests that stop and start the broker (`#[ignore]`d, run by hand
//! with `scripts/broker-restart-test`).
//!
//! The local stack's broker keeps everything in memory, so a restarted one
//! comes back empty. Tansu 0.6.0 built with its PostgreSQL storage engine
//! (`cargo install tansu --features postgres`) keeps topics, records,
//! committed offsets, producer state and SCRAM credentials in a database:
//! here a fresh database on the test's PostgreSQL. That build does not
//! create its tables, so the schema from Tansu's sources
//! (`etc/initdb.d/010-schema.sql` at tag `v0.6.0`) is loaded first.
//!
//! `UNILOG_PERSISTENT_BROKER_BIN` names the binary; the schema is
//! `UNILOG_PERSISTENT_BROKER_SCHEMA`, by default `../share/postgres-schema.sql`
//! next to the binary (where `scripts/broker-restart-test` puts it).

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{connect, free_port, suffix, with_database, Killed, Stack};

/// The binary and the schema file, or `None` when
/// `UNILOG_PERSISTENT_BROKER_BIN` is not set.
pub fn from_env() -> Option<(PathBuf, PathBuf)> {
    let bin =
        PathBuf::from(std::env::var_os("UNILOG_PERSISTENT_BROKER_BIN").filter(|b| !b.is_empty())?);
    assert!(
        bin.is_file(),
        "UNILOG_PERSISTENT_BROKER_BIN={} is not a file",
        bin.display()
    );
    let schema = std::env::var_os("UNILOG_PERSISTENT_BROKER_SCHEMA")
        .filter(|s| !s.is_empty())
        .map_or_else(
            || {
                bin.parent()
                    .and_then(|dir| dir.parent())
                    .unwrap_or_else(|| std::path::Path::new("."))
                    .join("share/postgres-schema.sql")
            },
            PathBuf::from,
        );
    assert!(
        schema.is_file(),
        "the broker's schema {} is missing: run scripts/broker-restart-test, or set \
         UNILOG_PERSISTENT_BROKER_SCHEMA to Tansu v0.6.0's etc/initdb.d/010-schema.sql",
        schema.display()
    );
    Some((bin, schema))
}

/// Says why a persistent-broker test does nothing, and returns `None`.
pub fn or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    let found = from_env();
    if found.is_none() {
        eprintln!(
            "{test}: skipped: UNILOG_PERSISTENT_BROKER_BIN is not set (scripts/broker-restart-test \
             builds Tansu with PostgreSQL storage and runs this test)"
        );
    }
    found
}

/// A Tansu broker on a free port whose storage is a database of its own.
pub struct PersistentBroker {
    bin: PathBuf,
    pub port: u16,
    /// The database that holds the broker's data.
    pub database: String,
    storage: String,
    admin_url: String,
    log: tempfile::NamedTempFile,
    child: Option<Killed>,
}

impl PersistentBroker {
    /// Creates the database and loads the schema; the broker is not started.
    pub async fn create(stack: &Stack, bin: PathBuf, schema: &std::path::Path) -> PersistentBroker {
        let database = format!("tansu_{}", suffix());
        let admin = connect(&stack.pg_admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        let storage = with_database(&stack.pg_admin_url, &database);
        let sql = std::fs::read_to_string(schema).unwrap();
        connect(&storage)
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("load the broker's schema {}: {e}", schema.display()));
        PersistentBroker {
            bin,
            port: free_port(),
            database,
            storage,
            admin_url: stack.pg_admin_url.clone(),
            log: tempfile::NamedTempFile::new().unwrap(),
            child: None,
        }
    }

    /// `127.0.0.1:port`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (with SASL SCRAM when `authentication`) and waits
    /// until it listens.
    pub fn start(&mut self, authentication: bool) {
        assert!(self.child.is_none(), "the broker is already running");
        let url = format!("tcp://{}", self.brokers());
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            &self.storage,
        ]);
        if authentication {
            cmd.arg("--authentication");
        }
        let log = self.log.reopen().unwrap();
        self.child = Some(Killed(
            cmd.env_remove("STORAGE_ENGINE")
                .env_remove("LISTENER_URL")
                .env_remove("ADVERTISED_LISTENER_URL")
                .env_remove("CLUSTER_ID")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start the persistent broker"),
        ));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("the broker exited ({status}):\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the broker did not listen on {}:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker with `signal` (`TERM` or `KILL`) and waits for it.
    pub fn stop(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("the broker is not running");
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &child.0.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the broker did not stop on SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stores a SCRAM credential through the broker (`tansu user create`,
    /// AlterUserScramCredentials). The broker must run without
    /// `--authentication`, which refuses every request before a login.
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        let out = Command::new(&self.bin)
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://{}", self.brokers()),
                "--mechanism",
                mechanism,
                name,
                password,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The records the broker holds in its database, all topics.
    pub async fn records_stored(&self) -> i64 {
        connect(&self.storage)
            .await
            .query_one("SELECT count(*) FROM record", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// What the broker printed (its log level comes from `RUST_LOG`).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Stops the broker and drops its database.
    pub async fn cleanup(mut self) {
        if self.child.is_some() {
            self.stop("TERM");
        }
        connect(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .await
            .unwrap();
    }
}
