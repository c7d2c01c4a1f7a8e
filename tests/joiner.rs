//! `unilog join` against the local stack: results after inserts, updates
//! and deletes on both sides, recovery from the changelog, the refusal of
//! inputs that are not co-partitioned, and exactly-once output across a
//! `kill -9`.
//!
//! Inputs are written directly (tests/feeds) in the shape the pipeline
//! publishes: users keyed by id, connections keyed by their own id with a
//! `user_id` field, so the joiner re-keys the connections.

mod feeds;
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use feeds::{create_topic, envelope_schema, Feed};
use serde_json::Value as Json;
use support::{consume, suffix, Decoder, Killed, Record, Stack};
use unilog::joiner::config::LoadedJoinerConfig;

const USER: &[(&str, &str)] = &[("user_id", "long"), ("name", "string")];
const CONN: &[(&str, &str)] = &[
    ("conn_id", "long"),
    ("user_id", "long"),
    ("friend_id", "long"),
];

struct Topics {
    users: String,
    conns: String,
    out: String,
}

async fn inputs(
    stack: &Stack,
    users_partitions: i32,
    conns_partitions: i32,
) -> (Topics, Feed, Feed) {
    let s = suffix();
    let t = Topics {
        users: format!("j.users.{s}"),
        conns: format!("j.conns.{s}"),
        out: format!("j.docs.{s}"),
    };
    create_topic(&stack.brokers, &t.users, users_partitions).await;
    create_topic(&stack.brokers, &t.conns, conns_partitions).await;
    let users = Feed::new(
        &stack.brokers,
        &stack.registry,
        &t.users,
        &envelope_schema("User", USER),
    )
    .await;
    let conns = Feed::new(
        &stack.brokers,
        &stack.registry,
        &t.conns,
        &envelope_schema("Conn", CONN),
    )
    .await;
    (t, users, conns)
}

fn write_config(
    dir: &Path,
    stack: &Stack,
    t: &Topics,
    name: &str,
    state: &str,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        "name: {name}\nkafka:\n  brokers: {}\nschema_registry:\n  url: {}\nstate_dir: {state}\nleft:\n  topic: {}\nright:\n  topic: {}\n  key: user_id\noutput:\n  topic: {}\n  record: UserDocument\n  field: connections\nbatch:\n  max_records: 50\n  max_wait_ms: 50\n{extra}",
        stack.brokers, stack.registry, t.users, t.conns, t.out
    );
    let p = dir.join(format!("{name}-{state}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn user(id: i64, name: &str) -> Vec<(&'static str, Avro)> {
    vec![
        ("user_id", Avro::Long(id)),
        ("name", Avro::String(name.into())),
    ]
}

fn conn(id: i64, user: i64, friend: i64) -> Vec<(&'static str, Avro)> {
    vec![
        ("conn_id", Avro::Long(id)),
        ("user_id", Avro::Long(user)),
        ("friend_id", Avro::Long(friend)),
    ]
}

struct Running {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Result<unilog::joiner::JoinStats, unilog::joiner::JoinError>>,
}

impl Running {
    fn start(path: &Path) -> Running {
        let cfg = Arc::new(LoadedJoinerConfig::load(path).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(unilog::joiner::run(cfg, stop.clone()));
        Running { stop, handle }
    }

    async fn stop(self) -> unilog::joiner::JoinStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap().expect("joiner failed")
    }
}

/// The latest output per key: the decoded document, or `None` for a tombstone.
async fn latest(dec: &mut Decoder, records: &[Record]) -> HashMap<String, Option<Json>> {
    let mut out = HashMap::new();
    for r in records {
        let v = if r.payload.is_empty() {
            None
        } else {
            Some(dec.decode(&r.payload).await)
        };
        out.insert(r.key.clone().unwrap_or_default(), v);
    }
    out
}

/// Friend ids of a document.
fn friends(doc: &Option<Json>) -> Option<Vec<i64>> {
    let d = doc.as_ref()?;
    let mut f: Vec<i64> = d["connections"]
        .as_array()?
        .iter()
        .filter_map(|c| c["friend_id"].as_i64())
        .collect();
    f.sort_unstable();
    assert_eq!(d["connections_count"].as_u64(), Some(f.len() as u64), "{d}");
    Some(f)
}

/// Reads the output until `check` holds for the latest documents.
async fn wait_for(
    stack: &Stack,
    topic: &str,
    what: &str,
    check: impl Fn(&HashMap<String, Option<Json>>) -> bool,
) -> HashMap<String, Option<Json>> {
    let mut dec = Decoder::new(&stack.registry);
    let start = Instant::now();
    loop {
        let recs = consume(
            &stack.brokers,
            topic,
            1,
            Duration::from_millis(500),
            Duration::from_secs(20),
        )
        .await;
        let l = latest(&mut dec, &recs).await;
        if check(&l) {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{what}: latest output is {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_inserts_updates_and_deletes_on_both_sides() {
    let stack = Stack::from_env();
    let (t, mut users, mut conns) = inputs(&stack, 3, 3).await;
    for (id, name) in [(1, "Ada"), (2, "Grace"), (3, "Edsger")] {
        users
            .upsert(&id.to_string(), "insert", user(id, name))
            .await;
    }
    conns.upsert("c1", "insert", conn(1, 1, 2)).await;
    conns.upsert("c2", "insert", conn(2, 1, 3)).await;
    conns.upsert("c3", "insert", conn(3, 2, 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &stack,
        &t,
        &format!("j_{}", suffix()),
        "state",
        "",
    );
    let j = Running::start(&path);
    wait_for(&stack, &t.out, "first join", |l| {
        l.get("1").map(friends) == Some(Some(vec![2, 3]))
            && l.get("2").map(friends) == Some(Some(vec![1]))
            && l.get("3").map(friends) == Some(Some(vec![]))
    })
    .await;
    // Left update: the document follows, with its connections.
    users.upsert("1", "update", user(1, "Ada L.")).await;
    // Right update that moves a child to another parent: both re-emitted.
    conns.upsert("c2", "update", conn(2, 2, 3)).await;
    // Right delete event, right tombstone.
    conns.delete("c1").await;
    conns.send("c3", None).await;
    // Left delete event, left tombstone.
    users.delete("3").await;
    let l = wait_for(&stack, &t.out, "after changes", |l| {
        l.get("1").map(friends) == Some(Some(vec![]))
            && l.get("2").map(friends) == Some(Some(vec![3]))
            && l.get("3") == Some(&None)
    })
    .await;
    let d1 = l["1"].as_ref().unwrap();
    assert_eq!(d1["name"], "Ada L.");
    assert_eq!(d1["key"], "1");
    assert_eq!(l["2"].as_ref().unwrap()["connections"][0]["conn_id"], 2);
    users.send("2", None).await;
    wait_for(&stack, &t.out, "left tombstone", |l| {
        l.get("2") == Some(&None)
    })
    .await;
    let stats = j.stop().await;
    assert!(stats.transactions > 0 && stats.out >= 10, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_join_and_restore_from_the_changelog() {
    let stack = Stack::from_env();
    let (t, mut users, mut conns) = inputs(&stack, 2, 2).await;
    users.upsert("1", "insert", user(1, "Ada")).await;
    users.upsert("2", "insert", user(2, "Grace")).await;
    conns.upsert("c1", "insert", conn(1, 1, 2)).await;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("j_{}", suffix());
    let path = write_config(dir.path(), &stack, &t, &name, "state_a", "kind: inner\n");
    let j = Running::start(&path);
    wait_for(&stack, &t.out, "inner join", |l| {
        l.get("1").map(friends) == Some(Some(vec![2])) && l.get("2") == Some(&None)
    })
    .await;
    j.stop().await;
    // A new process with an empty disk: the state comes back from the changelog.
    let path = write_config(dir.path(), &stack, &t, &name, "state_b", "kind: inner\n");
    let j = Running::start(&path);
    conns.upsert("c2", "insert", conn(2, 1, 3)).await;
    conns.upsert("c3", "insert", conn(3, 2, 1)).await;
    let l = wait_for(&stack, &t.out, "after restore", |l| {
        l.get("1").map(friends) == Some(Some(vec![2, 3]))
            && l.get("2").map(friends) == Some(Some(vec![1]))
    })
    .await;
    assert_eq!(l["2"].as_ref().unwrap()["name"], "Grace");
    let stats = j.stop().await;
    assert!(stats.restored >= 3, "{stats:?}");
    assert!(dir.path().join(format!("state_b/{name}-0.redb")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_inputs_that_are_not_co_partitioned() {
    let stack = Stack::from_env();
    let (t, _users, _conns) = inputs(&stack, 3, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &stack,
        &t,
        &format!("j_{}", suffix()),
        "state",
        "",
    );
    let cfg = Arc::new(LoadedJoinerConfig::load(&path).unwrap());
    let err = unilog::joiner::run(cfg, Arc::new(AtomicBool::new(false)))
        .await
        .expect_err("the join must refuse to start");
    // `unilog join` exits 2 on setup errors.
    assert!(err.is_setup() && !err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(text.contains("not co-partitioned"), "{text}");
    assert!(
        text.contains(&format!(
            "topic {} has 3 partitions and topic {} has 2",
            t.users, t.conns
        )),
        "{text}"
    );
}

/// Kills the joiner with SIGKILL mid-stream, restarts it, and finds every
/// output record exactly once (read_committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_a_kill() {
    let stack = Stack::from_env();
    let (t, mut users, mut conns) = inputs(&stack, 3, 3).await;
    let (n_users, per_user) = (300i64, 5i64);
    for id in 1..=n_users {
        users
            .upsert(&id.to_string(), "insert", user(id, &format!("user {id}")))
            .await;
    }
    let mut c = 0;
    for round in 1..=per_user {
        for id in 1..=n_users {
            c += 1;
            conns
                .upsert(
                    &format!("c{c}"),
                    "insert",
                    conn(c, id, (id + round) % n_users + 1),
                )
                .await;
        }
    }
    let expected = usize::try_from(n_users + c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &stack,
        &t,
        &format!("j_{}", suffix()),
        "state",
        "",
    );
    let spawn = || {
        Killed(
            std::process::Command::new(support::unilog_bin())
                .args(["join", "--config"])
                .arg(&path)
                .env("RUST_LOG", "unilog=info")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("join.log")).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut first = spawn();
    // Kill once part of the output is committed.
    let start = Instant::now();
    loop {
        let seen = consume(
            &stack.brokers,
            &t.out,
            0,
            Duration::from_millis(200),
            Duration::from_secs(5),
        )
        .await
        .len();
        if seen >= expected / 4 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "only {seen} outputs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let at_kill = consume(
        &stack.brokers,
        &t.out,
        0,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await
    .len();
    assert!(
        at_kill < expected,
        "the kill came too late to test anything ({at_kill} of {expected})"
    );
    let mut second = spawn();
    let start = Instant::now();
    let recs = loop {
        let recs = consume(
            &stack.brokers,
            &t.out,
            0,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await;
        if recs.len() >= expected {
            // Anything extra would show up now.
            tokio::time::sleep(Duration::from_secs(3)).await;
            break consume(
                &stack.brokers,
                &t.out,
                expected,
                Duration::from_secs(2),
                Duration::from_secs(30),
            )
            .await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{} of {expected} outputs",
            recs.len()
        );
    };
    second.0.kill().unwrap();
    second.0.wait().unwrap();
    let mut copies: HashMap<(Option<String>, Vec<u8>), usize> = HashMap::new();
    for r in recs.iter().filter(|r| !r.payload.is_empty()) {
        *copies
            .entry((r.key.clone(), r.payload.clone()))
            .or_default() += 1;
    }
    let tombstones = recs.iter().filter(|r| r.payload.is_empty()).count();
    let doubled = copies.values().filter(|n| **n > 1).count();
    let strict = broker_hides_aborted_records(&stack.brokers).await;
    eprintln!(
        "exactly-once: {at_kill} outputs committed before the kill, {} in all, {expected} expected, {doubled} doubled; the broker {} aborted transactions",
        recs.len(),
        if strict { "hides" } else { "does NOT hide" }
    );
    // Nothing missing: every expected output is there once.
    assert!(
        copies.len() + tombstones >= expected,
        "outputs missing: {} distinct of {expected}",
        copies.len() + tombstones
    );
    if strict {
        assert_eq!(recs.len(), expected, "outputs missing or doubled");
        assert_eq!(doubled, 0, "doubled outputs");
    } else {
        // A broker that shows aborted records to read_committed readers
        // (the local Kafka-protocol broker does) also shows what the killed
        // process had in flight: its output batch, and the re-keyed records
        // of that batch, which are joined again when the batch is replayed.
        // So at most two batches of extra records, each an exact copy.
        assert!(
            recs.len() - expected <= 100,
            "{} extra outputs: more than the aborted batch can explain",
            recs.len() - expected
        );
        assert!(
            copies.values().all(|n| *n <= 3),
            "an output appears more than three times"
        );
    }
    let mut dec = Decoder::new(&stack.registry);
    let l = latest(&mut dec, &recs).await;
    for id in 1..=n_users {
        let f = friends(&l[&id.to_string()]).unwrap_or_else(|| panic!("user {id} has no document"));
        assert_eq!(f.len(), usize::try_from(per_user).unwrap(), "user {id}");
    }
}

/// Whether `read_committed` readers skip the records of an aborted
/// transaction on this broker (Apache Kafka does; the local stack's broker
/// was seen not to).
async fn broker_hides_aborted_records(brokers: &str) -> bool {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let topic = format!("j.probe.{}", suffix());
    create_topic(brokers, &topic, 1).await;
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("transactional.id", format!("probe-{}", suffix()))
        .create()
        .unwrap();
    p.init_transactions(Duration::from_secs(30)).unwrap();
    p.begin_transaction().unwrap();
    p.send(
        BaseRecord::<str, str>::to(&topic)
            .key("k")
            .payload("aborted"),
    )
    .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
    p.abort_transaction(Duration::from_secs(30)).unwrap();
    p.begin_transaction().unwrap();
    p.send(
        BaseRecord::<str, str>::to(&topic)
            .key("k")
            .payload("committed"),
    )
    .unwrap();
    p.commit_transaction(Duration::from_secs(30)).unwrap();
    let recs = consume(
        brokers,
        &topic,
        1,
        Duration::from_secs(1),
        Duration::from_secs(20),
    )
    .await;
    !recs.iter().any(|r| r.payload == b"aborted")
}

/// `unilog join`'s restart loop: transient errors restart the joiner (its
/// state is restored from the changelog).
async fn run_retrying(
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> unilog::joiner::JoinStats {
    let cfg = Arc::new(LoadedJoinerConfig::load(&path).unwrap());
    let mut total = unilog::joiner::JoinStats::default();
    loop {
        match unilog::joiner::run(cfg.clone(), stop.clone()).await {
            Ok(s) => {
                total.out += s.out;
                total.transactions += s.transactions;
                return total;
            }
            Err(e) if e.is_transient() => {
                eprintln!("joiner failed: {e}; restarting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("joiner: {e}"),
        }
    }
}

/// Two instances in one consumer group split the partitions (a rebalance
/// while records flow) and the documents come out right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_partitions() {
    let stack = Stack::from_env();
    let (t, mut users, mut conns) = inputs(&stack, 4, 4).await;
    let n = 40i64;
    for id in 1..=n {
        users
            .upsert(&id.to_string(), "insert", user(id, &format!("user {id}")))
            .await;
        conns
            .upsert(&format!("a{id}"), "insert", conn(id, id, id % n + 1))
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = format!("j_{}", suffix());
    let p0 = write_config(dir.path(), &stack, &t, &name, "s0", "");
    let p1 = write_config(dir.path(), &stack, &t, &name, "s1", "");
    let text = std::fs::read_to_string(&p1).unwrap();
    std::fs::write(&p1, text.replace("kafka:\n", "kafka:\n  instance: \"1\"\n")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let a = tokio::spawn(run_retrying(p0, stop.clone()));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let b = tokio::spawn(run_retrying(p1, stop.clone()));
    // Changes while the group rebalances.
    for id in 1..=n {
        conns
            .upsert(
                &format!("b{id}"),
                "insert",
                conn(n + id, id, (id + 1) % n + 1),
            )
            .await;
    }
    wait_for(&stack, &t.out, "both connections of every user", |l| {
        (1..=n).all(|id| {
            let mut want = vec![id % n + 1, (id + 1) % n + 1];
            want.sort_unstable();
            l.get(&id.to_string()).map(friends) == Some(Some(want))
        })
    })
    .await;
    // More changes after the split.
    for id in 1..=n {
        conns.delete(&format!("a{id}")).await;
    }
    wait_for(&stack, &t.out, "one connection per user", |l| {
        (1..=n).all(|id| l.get(&id.to_string()).map(friends) == Some(Some(vec![(id + 1) % n + 1])))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (sa, sb) = (a.await.unwrap(), b.await.unwrap());
    eprintln!("instance 0: {sa:?}\ninstance 1: {sb:?}");
    assert!(sb.out > 0, "the second instance got no partition: {sb:?}");
}

/// One-to-one: a right topic keyed by the join key already (`key: $key`),
/// embedded as an optional record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_on_the_message_key() {
    let stack = Stack::from_env();
    let s = suffix();
    let t = Topics {
        users: format!("j.users.{s}"),
        conns: format!("j.profiles.{s}"),
        out: format!("j.docs.{s}"),
    };
    create_topic(&stack.brokers, &t.users, 2).await;
    create_topic(&stack.brokers, &t.conns, 2).await;
    let mut users = Feed::new(
        &stack.brokers,
        &stack.registry,
        &t.users,
        &envelope_schema("User", USER),
    )
    .await;
    let mut profiles = Feed::new(
        &stack.brokers,
        &stack.registry,
        &t.conns,
        &envelope_schema("Profile", &[("user_id", "long"), ("bio", "string")]),
    )
    .await;
    users.upsert("1", "insert", user(1, "Ada")).await;
    users.upsert("2", "insert", user(2, "Grace")).await;
    let bio = |id: i64, text: &str| {
        vec![
            ("user_id", Avro::Long(id)),
            ("bio", Avro::String(text.into())),
        ]
    };
    profiles.upsert("1", "insert", bio(1, "engines")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &stack,
        &t,
        &format!("j_{}", suffix()),
        "state",
        "cardinality: one\n",
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("key: user_id", "key: $key")
        .replace("field: connections", "field: profile");
    std::fs::write(&path, text).unwrap();
    let j = Running::start(&path);
    let bio_of = |l: &HashMap<String, Option<Json>>, k: &str| {
        l.get(k)
            .and_then(|d| d.as_ref())
            .map(|d| d["profile"]["bio"].clone())
    };
    wait_for(&stack, &t.out, "profiles joined", |l| {
        bio_of(l, "1") == Some(Json::from("engines")) && bio_of(l, "2") == Some(Json::Null)
    })
    .await;
    profiles
        .upsert("1", "update", bio(1, "analytical engines"))
        .await;
    profiles.upsert("2", "insert", bio(2, "compilers")).await;
    wait_for(&stack, &t.out, "profiles updated", |l| {
        bio_of(l, "1") == Some(Json::from("analytical engines"))
            && bio_of(l, "2") == Some(Json::from("compilers"))
    })
    .await;
    profiles.send("1", None).await;
    let l = wait_for(&stack, &t.out, "profile removed", |l| {
        bio_of(l, "1") == Some(Json::Null)
    })
    .await;
    assert_eq!(l["1"].as_ref().unwrap()["name"], "Ada");
    assert!(l["1"].as_ref().unwrap().get("profile_count").is_none());
    j.stop().await;
}

/// One process per state folder: a second `unilog join` of a running
/// joiner would empty its store; it is refused at once, naming the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_joiner_on_the_same_state_folder_is_refused() {
    let stack = Stack::from_env();
    let (t, mut users, _conns) = inputs(&stack, 3, 3).await;
    users.upsert("1", "insert", user(1, "Ada")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &stack,
        &t,
        &format!("j_{}", suffix()),
        "state",
        "",
    );
    let j = Running::start(&path);
    wait_for(&stack, &t.out, "first join", |l| l.contains_key("1")).await;
    let out = std::process::Command::new(support::unilog_bin())
        .args(["join", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "this pipeline is already running (pid {}",
            std::process::id()
        )),
        "{err}"
    );
    j.stop().await;
}
