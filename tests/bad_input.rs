//! Bad input: a clear error, nothing lost. Each test feeds the real `unilog`
//! binary one kind of bad input (a broken file, a server that is not there,
//! a role or table that does not fit) and checks the exit code, that the
//! message names the thing (file:line:col, field, table/column, URL with
//! the password redacted), that no password reaches stderr, and that nothing
//! was written (no slot, no publication) when unilog refused to start.
//!
//! docs/BAD-INPUT.md is the table of these cases; keep the two together.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// How long one `unilog check` or `unilog run` may take before the test
/// calls it a hang. Generous: a release benchmark may share the machine.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished child said.
struct Outcome {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
}

/// Runs `unilog <cmd> --config <config>` with a timeout; a child that
/// outlives it is killed and the test fails.
async fn unilog(cmd: &str, config: &Path) -> Outcome {
    let start = Instant::now();
    let child = tokio::process::Command::new(unilog_bin())
        .args([cmd, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,unilog=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn unilog");
    let out = tokio::time::timeout(CHILD_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`unilog {cmd} --config {}` still running after {CHILD_TIMEOUT:?}: it hangs",
                config.display()
            )
        })
        .expect("wait for unilog");
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Starts `unilog run` against a server that is down: it must keep
/// retrying (not exit) and say why, naming `needles`. Returns stderr.
async fn run_waits(config: &Path, wait: Duration, needles: &[&str]) -> String {
    let log = config.with_file_name("run-waits.log");
    let mut child = tokio::process::Command::new(unilog_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,unilog=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn unilog");
    tokio::time::sleep(wait).await;
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        child.try_wait().expect("poll unilog").is_none(),
        "`unilog run` exited instead of waiting for the server:\n{stderr}"
    );
    let _ = child.kill().await;
    assert!(stderr.contains("retrying"), "no retry in:\n{stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "`unilog run`: stderr lacks {n:?}:\n{stderr}"
        );
    }
    stderr
}

/// Runs `cmd` and checks its exit code and that stderr contains every
/// one of `needles`. Returns stderr.
async fn expect(cmd: &str, config: &Path, code: i32, needles: &[&str]) -> String {
    let out = unilog(cmd, config).await;
    assert_eq!(
        out.code,
        Some(code),
        "`unilog {cmd}` exit code; stderr:\n{}",
        out.stderr
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "`unilog {cmd}`: stderr lacks {n:?}:\n{}",
            out.stderr
        );
    }
    assert!(
        !out.stderr.contains("panicked"),
        "`unilog {cmd}` panicked:\n{}",
        out.stderr
    );
    out.stderr
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write fixture file");
    p
}

/// Replaces `from` by `to` in the fixture's pipeline file.
fn edit_pipeline(fx: &Fixture, from: &str, to: &str) {
    let text = std::fs::read_to_string(&fx.config).expect("read pipeline file");
    assert!(text.contains(from), "pipeline file lacks {from:?}:\n{text}");
    std::fs::write(&fx.config, text.replacen(from, to, 1)).expect("write pipeline file");
}

/// A pipeline file (10 lines) naming one mapping file.
fn pipeline_text(pg_url: &str, brokers: &str, registry: &str, mapping: &str) -> String {
    format!(
        "name: bad_input\nsource:\n  postgres:\n    url: {pg_url}\nkafka:\n  brokers: {brokers}\nschema_registry:\n  url: {registry}\nmappings: [{mapping}]\nstate_dir: state\n"
    )
}

/// A pipeline file that loads, for tests that break one thing in it or in
/// a mapping. The servers are closed ports: these tests never get that far.
fn offline_pipeline(mapping: &str) -> String {
    pipeline_text(
        &format!("postgres://u:p@127.0.0.1:{}/db", closed_port()),
        &format!("127.0.0.1:{}", closed_port()),
        &format!("http://127.0.0.1:{}", closed_port()),
        mapping,
    )
}

const ITEMS_DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, val text);";

fn items_mapping(topic: &str) -> String {
    format!("table: public.items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n")
}

/// A test database with `ddl` applied and a fixture whose mappings are
/// `mappings` (file name, yaml).
async fn db_with(stack: &Stack, ddl: &str, mappings: &[(&str, String)]) -> (TestDb, Fixture) {
    let db = TestDb::create(stack).await;
    db.client.batch_execute(ddl).await.expect("apply ddl");
    let fx = Fixture::new(stack, &db, mappings, "");
    (db, fx)
}

/// Nothing was written to the database: no replication slot for it and no
/// publication in it.
async fn assert_nothing_written(db: &TestDb) {
    let admin = connect(&db.admin_url).await;
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
            &[&db.name],
        )
        .await
        .expect("count slots")
        .get(0);
    assert_eq!(slots, 0, "a slot was created on a refused start");
    let in_db = connect(&with_database(&db.admin_url, &db.name)).await;
    let pubs: i64 = in_db
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .expect("count publications")
        .get(0);
    assert_eq!(pubs, 0, "a publication was created on a refused start");
}

/// After a refused `run` whose pipeline file loaded, the local checkpoint
/// holds the error (for `unilog status`) and no position or slot.
fn assert_checkpoint_holds_only_the_error(state_dir: &Path, error: &str) {
    let path = state_dir.join("bad_input.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("checkpoint is JSON");
    assert_eq!(v["slot"], "", "{text}");
    assert_eq!(v["delivered_lsn"], serde_json::Value::Null, "{text}");
    assert_eq!(v["snapshot_complete"], false, "{text}");
    assert!(
        v["last_error"].as_str().is_some_and(|e| e.contains(error)),
        "{text}"
    );
}

/// The number of replication slots of the test database.
async fn slots_of(db: &TestDb) -> i64 {
    connect(&db.admin_url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
            &[&db.name],
        )
        .await
        .expect("count slots")
        .get(0)
}

// --- 1 to 4: files that do not load -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_yaml_is_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    // A tab where YAML wants spaces.
    let tab = write(dir.path(), "tab.yaml", "name: x\nsource:\n\tpostgres: {}\n");
    for cmd in ["check", "run"] {
        expect(
            cmd,
            &tab,
            2,
            &["tab.yaml:3:1: found character that cannot start any token"],
        )
        .await;
    }
    // A key indented out of its mapping.
    let indent = write(
        dir.path(),
        "indent.yaml",
        "name: x\nsource:\n  postgres:\n    url: a\n   kafka: x\n",
    );
    expect(
        "check",
        &indent,
        2,
        &["indent.yaml:5:4: did not find expected key"],
    )
    .await;
    // A mapping file with a syntax error: the mapping file is named, not the pipeline file.
    write(
        dir.path(),
        "m.yaml",
        "table: items\ntopic: t\nevents: {insert: A, update: B\n",
    );
    let p = write(dir.path(), "p.yaml", &offline_pipeline("m.yaml"));
    let err = expect("check", &p, 2, &["m.yaml:4:1: "]).await;
    assert!(!err.contains("p.yaml:"), "{err}");
    assert!(!dir.path().join("state").exists(), "check writes nothing");
    expect("run", &p, 1, &["m.yaml:4:1: "]).await;
    assert_checkpoint_holds_only_the_error(&dir.path().join("state"), "m.yaml:4:1: ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclosed_quote_points_at_the_quote() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.yaml",
        "name: bi\nsource:\n  postgres:\n    url: \"unclosed\nkafka:\n  brokers: x\n",
    );
    expect("check", &p, 2, &["p.yaml:", "quoted scalar", "line 4"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_refused_with_the_expected_ones() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "m.yaml",
        "table: items\ntopic: t\nevents: {insert: A, update: B, delete: C}\ncolums: {id: }\n",
    );
    let good = offline_pipeline("m.yaml");
    let p = write(
        dir.path(),
        "p.yaml",
        &good.replacen("  brokers:", "  brokerz:", 1),
    );
    for cmd in ["check", "run"] {
        expect(
            cmd,
            &p,
            2,
            &["p.yaml:6:3: kafka: unknown field `brokerz`, expected one of `brokers`"],
        )
        .await;
    }
    // In a mapping file: `check` exits 2, `run` 1 (docs/OPERATIONS.md, exit codes).
    let p = write(dir.path(), "p.yaml", &good);
    let want = ["m.yaml:4:1: unknown field `colums`, expected one of `table`, `topic`, `record`, `key`, `events`, `columns`"];
    expect("check", &p, 2, &want).await;
    expect("run", &p, 1, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_refused_with_the_field_and_the_expected_type() {
    let dir = tempfile::tempdir().unwrap();
    let good = offline_pipeline("m.yaml");
    let p = write(
        dir.path(),
        "p.yaml",
        &format!("{good}batch:\n  max_events: lots\n"),
    );
    for cmd in ["check", "run"] {
        expect(
            cmd,
            &p,
            2,
            &["p.yaml:12:15: batch.max_events: invalid type: string \"lots\", expected usize"],
        )
        .await;
    }
    let p = write(
        dir.path(),
        "p.yaml",
        &good.replacen("/db\n", "/db\n    manage_publication: yes-please\n", 1),
    );
    expect(
        "check",
        &p,
        2,
        &["p.yaml:5:25: source.postgres.manage_publication: invalid type: string \"yes-please\", expected a boolean"],
    )
    .await;
    write(
        dir.path(),
        "m.yaml",
        "table: items\ntopic: t\nevents: {insert: A, update: B, delete: [C]}\n",
    );
    let p = write(dir.path(), "p.yaml", &good);
    expect(
        "check",
        &p,
        2,
        &["m.yaml:3:40: events.delete: invalid type: sequence, expected a string"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_variable_is_named_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let var = format!("UNILOG_BAD_INPUT_UNSET_{}", suffix().to_uppercase());
    // The variable sits on line 8, column 8.
    let text = pipeline_text(
        "postgres://u:p@127.0.0.1:1/db",
        "127.0.0.1:1",
        &format!("${{{var}}}"),
        "m.yaml",
    );
    let p = write(dir.path(), "p.yaml", &text);
    let want = format!(
        "p.yaml:8:8: environment variable {var} is not set; export it or write ${{{var}:-default}}"
    );
    for cmd in ["check", "run"] {
        expect(cmd, &p, 2, &[&want]).await;
    }
    assert!(!dir.path().join("state").exists());
}

// --- 5 to 8: servers that are not there, or refuse -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_names_the_url_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let password = format!("pw_{}", suffix());
    let port = closed_port();
    write(dir.path(), "m.yaml", &items_mapping("t"));
    let text = pipeline_text(
        &format!("postgres://unilog:{password}@127.0.0.1:{port}/db"),
        "127.0.0.1:1",
        "http://127.0.0.1:1",
        "m.yaml",
    );
    let p = write(dir.path(), "p.yaml", &text);
    let url = format!("postgres://unilog:***@127.0.0.1:{port}/db");
    let needles = [
        format!("cannot connect to PostgreSQL at {url}"),
        "check source.postgres.url, that the server is running".to_string(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let err = expect("check", &p, 2, &needles).await;
    assert!(!err.contains(&password), "password leaked: {err}");
    // `run` waits for the server, retrying with backoff.
    let err = run_waits(&p, Duration::from_secs(4), &needles).await;
    assert!(!err.contains(&password), "password leaked: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_kafka_fails_check_in_bounded_time_naming_the_brokers() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let brokers = format!("127.0.0.1:{}", closed_port());
    edit_pipeline(
        &fx,
        &format!("brokers: {}", stack.brokers),
        &format!("brokers: {brokers}"),
    );
    let out = unilog("check", &fx.config).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    // The last line is the verdict; librdkafka's own retries are logged before it.
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("error: kafka: brokers {brokers} unreachable")),
        "{last}"
    );
    // Bounded: check gives Kafka 10 s; the child timeout is the hang guard.
    assert!(out.elapsed < CHILD_TIMEOUT, "{:?}", out.elapsed);
    assert_nothing_written(&db).await;
    // `run` waits for the broker, retrying with backoff, and creates no slot meanwhile.
    run_waits(
        &fx.config,
        Duration::from_secs(14),
        &[&format!("kafka: brokers {brokers} unreachable")],
    )
    .await;
    assert_eq!(slots_of(&db).await, 0, "no slot without Kafka");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_registry_names_the_url_without_the_password() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let password = format!("pw_{}", suffix());
    let url = format!("http://127.0.0.1:{}", closed_port());
    edit_pipeline(
        &fx,
        &format!("url: {}", stack.registry),
        &format!("url: {url}\n  username: reg\n  password: {password}"),
    );
    let needles = [
        format!("items.yaml: schema registry at {url} is unreachable"),
        format!("subject `{topic}-value`"),
        "check schema_registry.url and that the registry is running".to_string(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let err = expect("check", &fx.config, 2, &needles).await;
    assert!(!err.contains(&password), "password leaked: {err}");
    let err = run_waits(&fx.config, Duration::from_secs(4), &needles).await;
    assert!(!err.contains(&password), "password leaked: {err}");
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_url_with_credentials_is_redacted() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let password = format!("pw_{}", suffix());
    let port = closed_port();
    edit_pipeline(
        &fx,
        &format!("url: {}", stack.registry),
        &format!("url: http://reg:{password}@127.0.0.1:{port}"),
    );
    let out = unilog("check", &fx.config).await;
    db.cleanup().await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        !out.stderr.contains(&password),
        "password leaked: {}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_postgres_password_is_refused_without_showing_it() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let password = format!("pw_{}", suffix());
    let (user_part, host_part) = db.url.split_once('@').expect("url has credentials");
    let (user, _) = user_part.rsplit_once(':').expect("url has a password");
    edit_pipeline(&fx, &db.url, &format!("{user}:{password}@{host_part}"));
    let shown = format!("{user}:***@{host_part}");
    for (cmd, code) in [("check", 2), ("run", 1)] {
        let err = expect(
            cmd,
            &fx.config,
            code,
            &[
                &format!("cannot connect to PostgreSQL at {shown}"),
                "the user and password",
            ],
        )
        .await;
        assert!(!err.contains(&password), "password leaked: {err}");
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_postgres_password_says_authentication_failed() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let (user_part, host_part) = db.url.split_once('@').expect("url has credentials");
    let (user, _) = user_part.rsplit_once(':').expect("url has a password");
    edit_pipeline(&fx, &db.url, &format!("{user}:pw_wrong@{host_part}"));
    let out = unilog("check", &fx.config).await;
    db.cleanup().await;
    assert!(
        out.stderr.contains("password authentication failed"),
        "{}",
        out.stderr
    );
}

// --- 9 to 14: a database that does not fit the pipeline ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_without_replication_is_told_the_sql_to_run() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    let role = format!("norepl_{}", suffix());
    let password = format!("pw_{}", suffix());
    let admin = connect(&stack.pg_admin_url).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}'; ALTER DATABASE {} OWNER TO {role};",
            db.name
        ))
        .await
        .unwrap();
    let (_, host_part) = db.url.split_once('@').expect("url has credentials");
    let role_url = format!("postgres://{role}:{password}@{host_part}");
    connect(&role_url)
        .await
        .batch_execute(ITEMS_DDL)
        .await
        .unwrap();
    let topic = format!("it.bad.{}", suffix());
    let fx = Fixture::new(&stack, &db, &[("items.yaml", items_mapping(&topic))], "");
    edit_pipeline(&fx, &db.url, &role_url);
    let want = format!(
        "PostgreSQL: role `{role}` may not replicate; run `ALTER ROLE {role} REPLICATION` as a superuser"
    );
    for (cmd, code) in [("check", 2), ("run", 1)] {
        let err = expect(cmd, &fx.config, code, &[&want]).await;
        assert!(!err.contains(&password), "password leaked: {err}");
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
    let _ = admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_publication_is_told_the_sql_to_run() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    edit_pipeline(
        &fx,
        "    snapshot: initial\n",
        "    snapshot: initial\n    manage_publication: false\n",
    );
    let publication = format!("unilog_{}", fx.name);
    for (cmd, code) in [("check", 2), ("run", 1)] {
        expect(
            cmd,
            &fx.config,
            code,
            &[&format!(
                "publication `{publication}` does not exist; create it with `CREATE PUBLICATION \"{publication}\" FOR TABLE \"public\".\"items\" WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = true)` or set source.postgres.manage_publication: true"
            )],
        )
        .await;
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_without_primary_key_needs_a_key() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let mapping =
        format!("table: things\ntopic: {topic}\nevents: {{insert: A, update: B, delete: C}}\n");
    let (db, fx) = db_with(
        &stack,
        "CREATE TABLE things (a int, b text);",
        &[("things.yaml", mapping)],
    )
    .await;
    for (cmd, code) in [("check", 2), ("run", 1)] {
        expect(
            cmd,
            &fx.config,
            code,
            &["things.yaml:1: field `table`: public.things has no primary key and no replica identity: in a publication of UPDATE and DELETE, PostgreSQL would refuse the app's own UPDATE and DELETE on it", "REPLICA IDENTITY FULL", "insert_only: true"],
        )
        .await;
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_column_is_named_with_the_columns_there_are() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let mapping = format!("{}columns:\n  id:\n  valu:\n", items_mapping(&topic));
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", mapping)]).await;
    for (cmd, code) in [("check", 2), ("run", 1)] {
        expect(
            cmd,
            &fx.config,
            code,
            &["items.yaml:6: field `columns.valu`: table public.items has no column `valu`; its columns are: id, val"],
        )
        .await;
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_table_is_named() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let mapping = format!(
        "table: public.itemz\ntopic: {topic}\nevents: {{insert: A, update: B, delete: C}}\n"
    );
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("itemz.yaml", mapping)]).await;
    for (cmd, code) in [("check", 2), ("run", 1)] {
        expect(
            cmd,
            &fx.config,
            code,
            &["itemz.yaml:1: field `table`: table public.itemz does not exist in the database (or the user cannot see it)"],
        )
        .await;
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

// --- 18, 19: registry credentials, shared topics -------------------------------------------

/// A second schema-registry stand-in with basic auth, killed on drop.
struct AuthRegistry {
    url: String,
    _child: tokio::process::Child,
}

impl AuthRegistry {
    async fn start(credentials: &str) -> AuthRegistry {
        let port = closed_port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_schema-registry-standin"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--basic-auth",
                credentials,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the registry stand-in");
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the registry stand-in did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        AuthRegistry {
            url: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_basic_auth_refusal_is_clear() {
    let stack = Stack::from_env();
    let secret = format!("pw_{}", suffix());
    let registry = AuthRegistry::start(&format!("reg:{secret}")).await;
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let registry_line = format!("url: {}", stack.registry);
    edit_pipeline(&fx, &registry_line, &format!("url: {}", registry.url));
    let want = "items.yaml: schema registry refused the credentials (HTTP 401); check schema_registry.username and password/password_file";
    // No credentials at all.
    for (cmd, code) in [("check", 2), ("run", 1)] {
        expect(cmd, &fx.config, code, &[want]).await;
    }
    // Wrong credentials: the same message, and the password is not shown.
    let wrong = format!("wrong_{}", suffix());
    edit_pipeline(
        &fx,
        &format!("url: {}", registry.url),
        &format!(
            "url: {}\n  username: reg\n  password: {wrong}",
            registry.url
        ),
    );
    let err = expect("check", &fx.config, 2, &[want]).await;
    assert!(!err.contains(&wrong), "password leaked: {err}");
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_mappings_on_one_topic_are_refused() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let other = format!(
        "table: public.others\ntopic: {topic}\nevents: {{insert: A, update: B, delete: C}}\n"
    );
    let (db, fx) = db_with(
        &stack,
        &format!("{ITEMS_DDL} CREATE TABLE others (id int PRIMARY KEY);"),
        &[
            ("items.yaml", items_mapping(&topic)),
            ("others.yaml", other),
        ],
    )
    .await;
    for (cmd, code) in [("check", 2), ("run", 1)] {
        expect(
            cmd,
            &fx.config,
            code,
            &[
                &format!("others.yaml:2: field `topic`: topic `{topic}` is already used by "),
                "items.yaml; each topic carries one record type",
            ],
        )
        .await;
    }
    assert_nothing_written(&db).await;
    db.cleanup().await;
}

/// One pipeline, one process: a second `unilog run` of a running pipeline
/// is refused within seconds, naming the first, whether it shares the
/// state folder (the lock) or only the slot (which goes on acknowledging).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_run_of_a_running_pipeline_is_refused_naming_the_first() {
    let stack = Stack::from_env();
    let topic = format!("it.bad.{}", suffix());
    let (db, fx) = db_with(&stack, ITEMS_DDL, &[("items.yaml", items_mapping(&topic))]).await;
    let run = Running::start(&fx);
    db.wait_streaming(&fx.slot, Duration::from_secs(120)).await;
    let out = expect(
        "run",
        &fx.config,
        1,
        &[
            "this pipeline is already running (pid ",
            "stop that process first, or give this one another `name` or `state_dir`",
        ],
    )
    .await;
    assert!(
        out.contains(&format!("pid {}", std::process::id())),
        "{out}"
    );
    // The same pipeline with another state folder: `run` names the slot's
    // holder and retries while it could be a client that died and that the
    // server has not let go of yet; after wal_sender_timeout (+10 s) it
    // refuses (not waited for here: 70 s).
    let other = fx.config.with_file_name("other.yaml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&fx.config)
            .unwrap()
            .replace("state_dir: state", "state_dir: other-state"),
    )
    .unwrap();
    let holder = format!("application_name unilog-{}", fx.slot);
    run_waits(
        &other,
        Duration::from_secs(8),
        &[
            "is held by server process",
            &holder,
            "refusing if it still holds it after 70 s",
        ],
    )
    .await;
    // The first goes on, unharmed.
    db.client
        .batch_execute("INSERT INTO items VALUES (1, 'after')")
        .await
        .unwrap();
    let records = consume(
        &stack.brokers,
        &topic,
        1,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 1);
    run.stop().await;
    db.cleanup().await;
}
