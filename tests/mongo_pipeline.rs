//! The MongoDB source end to end: documents in a replica set -> domain
//! events on Kafka, in both modes (change streams and the raw oplog).
//!
//! `MONGO_URL` points at the stack's stand-in (`standins/mongo`, not mongod)
//! or at a real replica set. Tests that damage the oplog run their own
//! private stand-in, and are skipped against a real server.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, Document};
use futures::TryStreamExt;
use serde_json::Value as Json;

use support::mongo::{user, write_config, MongoFixture, PrivateStandIn};
use support::{consume, decode_all, Decoder, Record, Stack};

const QUIET: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(60);

fn hex(d: &Document) -> String {
    d.get_object_id("_id").unwrap().to_hex()
}

/// Decoded records with their Kafka coordinates, in offset order per partition.
async fn read(stack: &Stack, topic: &str, min: usize) -> (Vec<Record>, Vec<Json>) {
    let mut records = consume(&stack.brokers, topic, min, QUIET, TIMEOUT).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    let mut dec = Decoder::new(&stack.registry);
    let decoded = decode_all(&mut dec, &records).await;
    (records, decoded)
}

/// The events of one key, in order (a key lives on one partition).
fn by_key(decoded: &[Json]) -> BTreeMap<String, Vec<&Json>> {
    let mut m: BTreeMap<String, Vec<&Json>> = BTreeMap::new();
    for d in decoded {
        m.entry(d["key"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(d);
    }
    m
}

async fn every_operation(mode: &str) {
    let stack = Stack::from_env();
    let port = support::free_port();
    tokio::spawn(unilog::http::serve(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(60),
    ));
    let fx = MongoFixture::new(&stack, mode, "", "").await;
    let users = fx.users();
    let (u1, u2) = (user(1), user(2));
    users.insert_many([u1.clone(), u2.clone()]).await.unwrap();
    let running = fx.start();
    let (_, copied) = read(&stack, &fx.topic, 2).await;
    assert_eq!(copied.len(), 2, "{copied:?}");
    assert!(copied
        .iter()
        .all(|d| d["op"] == "snapshot" && d["event_type"] == "UserImported"));

    // Insert, a partial update (a `$v: 2` diff in the oplog), a replacement, a delete.
    let u3 = user(3);
    users.insert_one(u3.clone()).await.unwrap();
    users
        .update_one(
            doc! {"_id": u3.get("_id").unwrap()},
            doc! {"$set": {"age": 40, "address.city": "Paris"}, "$unset": {"tags": ""}},
        )
        .await
        .unwrap();
    let mut replaced = user(33);
    replaced.insert("_id", u3.get("_id").unwrap().clone());
    replaced.insert("email", "replaced@example.com");
    users
        .replace_one(doc! {"_id": u3.get("_id").unwrap()}, replaced)
        .await
        .unwrap();
    users
        .delete_one(doc! {"_id": u1.get("_id").unwrap()})
        .await
        .unwrap();
    // A document that does not fit its declared types: dead letter, and on.
    let misfit = doc! {"_id": ObjectId::new(), "email": "bad@example.com", "age": "old"};
    users.insert_one(misfit.clone()).await.unwrap();
    let u4 = user(4);
    users.insert_one(u4.clone()).await.unwrap();
    // Drop, then the collection again; a rename away; a dropped database
    // (which invalidates a database change stream: it must be reopened).
    users.drop().await.unwrap();
    let u5 = user(5);
    users.insert_one(u5.clone()).await.unwrap();
    fx.client
        .database("admin")
        .run_command(doc! {
            "renameCollection": format!("{}.users", fx.db),
            "to": format!("{}.users_old", fx.db),
        })
        .await
        .unwrap();
    fx.client.database(&fx.db).drop().await.unwrap();
    let u6 = user(6);
    users.insert_one(u6.clone()).await.unwrap();

    let (_, all) = read(&stack, &fx.topic, 12).await;
    // How long the pipeline could stay stopped: the oplog behind its position.
    let started = std::time::Instant::now();
    let headroom = loop {
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Some(line) = metrics.lines().find(|l| {
            l.starts_with("unilog_mongo_oplog_headroom_seconds") && l.contains(fx.name.as_str())
        }) {
            break line.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no headroom gauge in:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let secs: f64 = headroom.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs >= 0.0, "{headroom}");
    let stats = running.stop().await;
    let kinds: Vec<(String, String)> = all
        .iter()
        .map(|d| {
            (
                d["op"].as_str().unwrap().to_string(),
                d["event_type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let count = |op: &str| kinds.iter().filter(|(o, _)| o == op).count();
    assert_eq!(count("snapshot"), 2, "{kinds:?}");
    assert_eq!(count("insert"), 4, "u3, u4, u5, u6: {kinds:?}");
    assert_eq!(count("update"), 2, "update and replace: {kinds:?}");
    assert_eq!(count("delete"), 1, "{kinds:?}");
    assert_eq!(
        count("truncate"),
        3,
        "drop, rename, dropDatabase: {kinds:?}"
    );
    assert!(kinds
        .iter()
        .filter(|(o, _)| o == "truncate")
        .all(|(_, e)| e == "UsersDropped"));

    let keyed = by_key(&all);
    let k3 = &keyed[&hex(&u3)];
    let ops: Vec<&str> = k3.iter().map(|d| d["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "update", "update"]);
    let insert = k3[0];
    assert_eq!(insert["after"]["email"], "u3@example.com");
    assert_eq!(insert["after"]["balance"], "3.50");
    assert_eq!(insert["after"]["joined"], 1_700_000_000_003_000_i64);
    assert_eq!(insert["after"]["address"]["zip"], "00003");
    assert_eq!(insert["after"]["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(insert["source"]["connector"], "mongodb");
    assert_eq!(insert["source"]["database"], fx.db.as_str());
    assert_eq!(insert["source"]["table"], "users");
    assert!(insert["changed_fields"].is_null());
    let update = k3[1];
    let mut changed: Vec<&str> = update["changed_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    changed.sort_unstable();
    assert_eq!(changed, ["address.city", "age", "tags"]);
    // The looked-up document: current when read (here, perhaps the replacement).
    assert!(update["after"]["_id"] == hex(&u3).as_str());
    let replace = k3[2];
    assert_eq!(replace["after"]["email"], "replaced@example.com");
    assert!(replace["changed_fields"].is_null());
    let del = &keyed[&hex(&u1)];
    assert_eq!(del.last().unwrap()["op"], "delete");
    assert_eq!(del.last().unwrap()["event_type"], "UserDeleted");
    assert_eq!(del.last().unwrap()["before"]["_id"], hex(&u1).as_str());
    assert!(del.last().unwrap()["after"].is_null());
    assert!(
        keyed.contains_key(&hex(&u6)),
        "reopened after the invalidate"
    );
    // Dedup ids are unique: no change was published twice in a clean run.
    let ids: HashSet<&str> = all
        .iter()
        .map(|d| d["dedup_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), all.len());
    assert!(ids
        .iter()
        .all(|i| i.starts_with(&format!("mongo/{}/", fx.db))));

    // `status` reads the saved position and the oplog headroom behind it.
    let out = support::unilog_output(&["status", "--json"], &fx.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["mode"], mode);
    assert_eq!(status["copy_complete"], true);
    assert!(status["delivered_cluster_time"].is_string(), "{status}");
    assert!(
        status["oplog_headroom_hours"].as_f64().unwrap() >= 0.0,
        "{status}"
    );

    // The misfit: in the dead-letter topic, with collection, _id and field.
    assert_eq!(stats.dead_lettered, 1);
    let dl = consume(&stack.brokers, &fx.dead_letter_topic(), 1, QUIET, TIMEOUT).await;
    assert_eq!(dl.len(), 1);
    let body: Json = serde_json::from_slice(&dl[0].payload).unwrap();
    let reason = body["error"].as_str().unwrap();
    assert_eq!(body["table"], format!("{}.users", fx.db).as_str());
    assert!(reason.contains(&hex(&misfit)), "{reason}");
    assert!(
        reason.contains("field `age` is a string, but it is declared int"),
        "{reason}"
    );
    assert!(
        !reason.contains("old"),
        "no values in dead letters: {reason}"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_every_operation_gives_its_event() {
    every_operation("change_streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_every_operation_gives_its_event() {
    every_operation("oplog").await;
}

/// Final state per key from the topic: the last event's `after` (absent
/// after a delete).
/// `age` of every document of the collection, by `_id`.
async fn ages_in(users: &mongodb::Collection<Document>) -> BTreeMap<String, i64> {
    users
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|d| (hex(d), i64::from(d.get_i32("age").unwrap())))
        .collect()
}

/// `age` of every document as the events leave it, by key.
fn ages_of(decoded: &[Json]) -> BTreeMap<String, i64> {
    final_state(decoded)
        .into_iter()
        .map(|(k, after)| (k, after["age"].as_i64().unwrap()))
        .collect()
}

/// Until the state file says the initial copy is delivered.
async fn wait_copy_complete(fx: &MongoFixture, state: &std::path::Path, since: std::time::Instant) {
    while !std::fs::read_to_string(state)
        .unwrap_or_default()
        .contains("\"copy_complete\": true")
    {
        assert!(
            since.elapsed() < TIMEOUT,
            "the copy did not finish:\n{}",
            unilog_log(fx)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn final_state(decoded: &[Json]) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    for (k, events) in by_key(decoded) {
        let last = events.last().unwrap();
        if last["op"] != "delete" && !last["after"].is_null() {
            out.insert(k, last["after"].clone());
        }
    }
    out
}

/// Batches of 100, so a copy takes many batches (and many positions).
async fn small_batches(stack: &Stack, mode: &str) -> MongoFixture {
    MongoFixture::new(
        stack,
        mode,
        "",
        "batch:\n  max_events: 100\n  max_wait_ms: 10\n",
    )
    .await
}

async fn copy_with_concurrent_writes(mode: &str) {
    let stack = Stack::from_env();
    let fx = small_batches(&stack, mode).await;
    let users = fx.users();
    let docs: Vec<Document> = (0..3000).map(user).collect();
    users.insert_many(docs.clone()).await.unwrap();
    let running = fx.start();
    // Writes while the copy runs: updates, deletes and inserts, in _id order
    // and out of it.
    let writer = {
        let users = users.clone();
        let ids: Vec<Bson> = docs.iter().map(|d| d.get("_id").unwrap().clone()).collect();
        tokio::spawn(async move {
            for i in 0..600usize {
                let id = ids[(i * 7919) % ids.len()].clone();
                match i % 3 {
                    0 => {
                        users
                            .update_one(doc! {"_id": id}, doc! {"$set": {"age": 9000 + i as i32}})
                            .await
                            .unwrap();
                    }
                    1 => {
                        users.delete_one(doc! {"_id": id}).await.unwrap();
                    }
                    _ => {
                        users.insert_one(user(100_000 + i as i32)).await.unwrap();
                    }
                }
            }
        })
    };
    writer.await.unwrap();
    let (_, decoded) = read(&stack, &fx.topic, 3000).await;
    let stats = running.stop().await;
    let want = ages_in(&users).await;
    let got = ages_of(&decoded);
    assert_eq!(
        got.len(),
        want.len(),
        "documents in the topic vs the collection"
    );
    assert_eq!(got, want);
    assert!(stats.snapshot_rows == 0 || stats.snapshot_rows <= 3000);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_copy_and_concurrent_writes_end_in_the_final_state() {
    copy_with_concurrent_writes("change_streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_copy_and_concurrent_writes_end_in_the_final_state() {
    copy_with_concurrent_writes("oplog").await;
}

/// Starts `unilog run`; its log goes to `unilog.log` beside the config.
fn spawn_unilog(fx: &MongoFixture) -> support::Killed {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(fx.dir.path().join("unilog.log"))
        .unwrap();
    support::Killed(
        std::process::Command::new(support::unilog_bin())
            .args(["run", "--config"])
            .arg(&fx.config)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start unilog"),
    )
}

fn unilog_log(fx: &MongoFixture) -> String {
    std::fs::read_to_string(fx.dir.path().join("unilog.log")).unwrap_or_default()
}

fn kill9(child: &mut support::Killed) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.0.id().to_string()])
        .status();
    let _ = child.0.wait();
}

/// SIGKILL during the copy and during streaming: nothing lost, and every
/// repeat carries the same dedup id and the same bytes.
async fn kill_and_restart(mode: &str) {
    let stack = Stack::from_env();
    let fx = small_batches(&stack, mode).await;
    let users = fx.users();
    let initial: Vec<Document> = (0..4000).map(user).collect();
    users.insert_many(initial.clone()).await.unwrap();
    let mut child = spawn_unilog(&fx);
    // Kill once the copy is under way.
    let start = std::time::Instant::now();
    loop {
        let state =
            std::fs::read_to_string(fx.dir.path().join(format!("state/{}.mongo.json", fx.name)))
                .unwrap_or_default();
        if state.contains("copy_progress") {
            break;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the copy made no progress; unilog's log:\n{}",
            unilog_log(&fx)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill9(&mut child);
    let saved =
        std::fs::read_to_string(fx.dir.path().join(format!("state/{}.mongo.json", fx.name)))
            .unwrap();
    assert!(saved.contains("copy_progress"), "{saved}");
    // Writes while unilog is killed again and again.
    let writer = {
        let users = users.clone();
        tokio::spawn(async move {
            let mut inserted = Vec::new();
            for i in 0..1500 {
                let u = user(50_000 + i);
                users.insert_one(u.clone()).await.unwrap();
                inserted.push(hex(&u));
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            inserted
        })
    };
    for _ in 0..4 {
        child = spawn_unilog(&fx);
        tokio::time::sleep(Duration::from_millis(700)).await;
        kill9(&mut child);
    }
    let inserted = writer.await.unwrap();
    child = spawn_unilog(&fx);
    let (records, decoded) = read(&stack, &fx.topic, 5500).await;
    let status = support::sigterm(&mut child.0);
    assert!(status.success(), "{status:?}");
    let keys: HashSet<&str> = decoded.iter().map(|d| d["key"].as_str().unwrap()).collect();
    for d in initial.iter().map(hex).chain(inserted.iter().cloned()) {
        assert!(
            keys.contains(d.as_str()),
            "document {d} never reached the topic"
        );
    }
    // Repeats are byte-identical.
    let mut by_id: HashMap<&str, &[u8]> = HashMap::new();
    let mut repeats = 0;
    for (r, d) in records.iter().zip(&decoded) {
        let id = d["dedup_id"].as_str().unwrap();
        if let Some(prev) = by_id.insert(id, &r.payload) {
            repeats += 1;
            assert_eq!(
                prev,
                r.payload.as_slice(),
                "dedup id {id} published with other bytes"
            );
        }
    }
    // The copy went on from where it was, not from the start.
    let copies = decoded.iter().filter(|d| d["op"] == "snapshot").count();
    assert!(copies < 2 * 4000, "{copies} copy events for 4000 documents");
    println!(
        "{mode}: {} records, {} distinct changes, {repeats} repeats",
        records.len(),
        by_id.len()
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_kill_and_restart_loses_nothing() {
    kill_and_restart("change_streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_kill_and_restart_loses_nothing() {
    kill_and_restart("oplog").await;
}

/// `kafka.exactly_once: true`: SIGKILL again and again while documents are
/// inserted and updated; a `read_committed` reader finds every change once
/// (on a broker that hides aborted transactions; the local one does not,
/// so there at most the batch in flight at each kill shows twice).
async fn exactly_once_across_sigkills(mode: &str) {
    use rand::Rng;
    let stack = Stack::from_env();
    let fx = MongoFixture::new(
        &stack,
        mode,
        "    full_document: when_available\n",
        "batch:\n  max_events: 100\n  max_wait_ms: 10\n",
    )
    .await;
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace(
            "  partitions: 3\n",
            "  partitions: 3\n  exactly_once: true\n",
        ),
    )
    .unwrap();
    let users = fx.users();
    users
        .insert_many((0..500).map(user).collect::<Vec<_>>())
        .await
        .unwrap();
    let mut child = spawn_unilog(&fx);
    let state = fx.dir.path().join(format!("state/{}.mongo.json", fx.name));
    let start = std::time::Instant::now();
    wait_copy_complete(&fx, &state, start).await;
    // 3,000 inserts and 1,000 updates.
    let writer = {
        let users = users.clone();
        tokio::spawn(async move {
            let mut ids: Vec<Bson> = Vec::new();
            let mut changes = 0;
            for round in 0..30 {
                let batch: Vec<Document> = (0..100).map(|i| user(1000 + round * 100 + i)).collect();
                ids.extend(batch.iter().map(|d| d.get("_id").unwrap().clone()));
                users.insert_many(batch).await.unwrap();
                changes += 100;
                for _ in 0..33 {
                    let id = ids[rand::rng().random_range(0..ids.len())].clone();
                    users
                        .update_one(doc! {"_id": id}, doc! {"$inc": {"age": 1}})
                        .await
                        .unwrap();
                    changes += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            changes
        })
    };
    let mut kills = 0;
    while !writer.is_finished() && kills < 8 {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..1500))).await;
        kill9(&mut child);
        kills += 1;
        child = spawn_unilog(&fx);
    }
    let written = writer.await.unwrap() + 500;
    let waited = std::time::Instant::now();
    let records = loop {
        let records = consume(
            &stack.brokers,
            &fx.topic,
            written,
            Duration::from_secs(3),
            TIMEOUT,
        )
        .await;
        let distinct: HashSet<&str> = records
            .iter()
            .filter_map(|r| r.headers.get("unilog.dedup_id").map(String::as_str))
            .collect();
        if distinct.len() >= written || waited.elapsed() > Duration::from_secs(60) {
            break records;
        }
    };
    let status = support::sigterm(&mut child.0);
    assert!(status.success(), "{status:?}\n{}", unilog_log(&fx));
    let log = unilog_log(&fx);
    let skipped: u64 = log
        .lines()
        .filter(|l| l.contains("skipped changes that an earlier run committed"))
        .filter_map(|l| {
            l.split("skipped=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let mut by_id: HashMap<&str, &[u8]> = HashMap::new();
    let mut repeats = 0;
    for r in &records {
        let id = r.headers["unilog.dedup_id"].as_str();
        if let Some(prev) = by_id.insert(id, &r.payload) {
            repeats += 1;
            // The oplog mode looks an update's document up when it reads
            // the change, so a change read again after a kill can show a
            // newer document: same id and kind, other field values.
            if prev != r.payload.as_slice() {
                assert!(
                    mode == "oplog"
                        && r.headers.get("unilog.event_type").map(String::as_str)
                            == Some("UserChanged"),
                    "dedup id {id} with other bytes"
                );
            }
        }
    }
    assert_eq!(by_id.len(), written, "changes lost\n{log}");
    let strict = support::broker_hides_aborted_records(&stack.brokers).await;
    println!(
        "{mode} exactly once: {written} changes, {kills} SIGKILLs, {} records, {repeats} repeats, {skipped} changes read again and skipped; the broker {} aborted transactions",
        records.len(),
        if strict { "hides" } else { "does NOT hide" }
    );
    assert!(skipped > 0, "no restart had to skip committed changes");
    if strict {
        assert_eq!(repeats, 0, "a read_committed reader read changes twice");
    } else {
        assert!(
            repeats <= kills * 100,
            "{repeats} repeats: more than one aborted batch per kill explains"
        );
    }
    // The final state is the collection's.
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let sorted: Vec<Record> = sorted.into_iter().cloned().collect();
    let decoded = decode_all(&mut Decoder::new(&stack.registry), &sorted).await;
    let want = ages_in(&users).await;
    let got = ages_of(&decoded);
    assert_eq!(got, want, "final state differs");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_exactly_once_across_sigkills() {
    exactly_once_across_sigkills("change_streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_exactly_once_across_sigkills() {
    exactly_once_across_sigkills("oplog").await;
}

/// The position falls off the oplog while unilog is stopped: `stop` says
/// so and exits; `recopy` copies again and goes on.
async fn lost_position(mode: &str) {
    // A private stand-in, whatever MONGO_URL says: its oplog is truncated
    // on demand (a real replica set's cannot be).
    let stack = Stack::from_env();
    let standin = PrivateStandIn::start().await;
    let fx = MongoFixture::with_url(&stack, &standin.url, mode, "", "").await;
    let users = fx.users();
    users.insert_many([user(1), user(2)]).await.unwrap();
    let running = fx.start();
    let _ = read(&stack, &fx.topic, 2).await;
    running.stop().await;
    users
        .insert_many([user(3), user(4), user(5)])
        .await
        .unwrap();
    for i in 0..5 {
        users.insert_one(user(100 + i)).await.unwrap();
    }
    assert!(
        fx.standin_hook(doc! {"standinTruncateOplog": 1, "keepLast": 1})
            .await
    );
    let err = fx
        .start()
        .handle
        .await
        .unwrap()
        .expect_err("the position is gone: the pipeline must stop");
    let msg = err.to_string();
    assert!(!err.is_transient(), "{msg}");
    assert!(msg.contains("is no longer in the oplog"), "{msg}");
    assert!(msg.contains("on_history_lost: recopy"), "{msg}");

    // `recopy`: a new copy, then streaming again.
    write_config(
        &fx.config,
        &stack,
        &fx.name,
        &fx.url,
        mode,
        "    on_history_lost: recopy\n",
        "",
    );
    let running = fx.start();
    let (_, decoded) = read(&stack, &fx.topic, 2 + 10).await;
    users.insert_one(user(999)).await.unwrap();
    let (_, after) = read(&stack, &fx.topic, decoded.len() + 1).await;
    running.stop().await;
    let copies = decoded.iter().filter(|d| d["op"] == "snapshot").count();
    assert_eq!(copies, 2 + 10, "first copy of 2, then a re-copy of all 10");
    assert!(
        after
            .iter()
            .any(|d| d["op"] == "insert" && d["after"]["email"] == "u999@example.com"),
        "streaming goes on after the re-copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_lost_position_takes_the_configured_path() {
    lost_position("change_streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_lost_position_takes_the_configured_path() {
    lost_position("oplog").await;
}

/// Bad MongoDB input: a clear error naming what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_bad_input_is_refused_clearly() {
    let stack = Stack::from_env();
    // A mapping without declared fields.
    let fx = MongoFixture::new(&stack, "change_streams", "", "").await;
    std::fs::write(
        fx.dir.path().join("users.yaml"),
        format!(
            "table: {}.users\ntopic: {}\nevents: {{insert: A, update: B, delete: C}}\n",
            fx.db, fx.topic
        ),
    )
    .unwrap();
    let out = support::unilog_output(&["check"], &fx.config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("users.yaml:1: field `table`: a MongoDB collection has no catalog: declare its fields under `fields:`"), "{err}");

    // Nothing listens: a bounded wait, then the URL (without password) and what to check.
    let port = support::free_port();
    let url =
        format!("mongodb://app:s3cret@127.0.0.1:{port}/?replicaSet=rs0&directConnection=true");
    let fx = MongoFixture::with_url(&stack, &url, "change_streams", "", "").await;
    let out = support::unilog_output(&["check"], &fx.config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "cannot connect to MongoDB at mongodb://app:***@127.0.0.1:{port}/"
        )),
        "{err}"
    );
    assert!(err.contains("check source.mongo.url"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");

    // A mode switch under an existing state.
    let fx = MongoFixture::new(&stack, "change_streams", "", "").await;
    fx.users().insert_one(user(1)).await.unwrap();
    let running = fx.start();
    let _ = read(&stack, &fx.topic, 1).await;
    running.stop().await;
    write_config(&fx.config, &stack, &fx.name, &fx.url, "oplog", "", "");
    let err = fx
        .start()
        .handle
        .await
        .unwrap()
        .expect_err("a mode switch is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("was written in `change_streams` mode, and source.mongo.mode is now `oplog`"),
        "{msg}"
    );
    assert!(!err.is_transient());
    fx.cleanup().await;
}

/// What an update's `after` holds, by `full_document`: the document when
/// read (`update_lookup`), the post-image of the change itself
/// (`when_available`), or only the fields the update set (`none`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_document_modes_give_what_they_say() {
    let stack = Stack::from_env();
    for (mode, first_age, email_kept) in [
        ("update_lookup", 20, true),
        ("when_available", 10, true),
        ("none", 10, false),
    ] {
        let fx = MongoFixture::new(
            &stack,
            "change_streams",
            &format!("    full_document: {mode}\n"),
            "",
        )
        .await;
        let users = fx.users();
        let u = user(1);
        users.insert_one(u.clone()).await.unwrap();
        let running = fx.start();
        let _ = read(&stack, &fx.topic, 1).await;
        running.stop().await;
        // Two updates while unilog is stopped: when it reads the first, the
        // document already has the second.
        for age in [10, 20] {
            users
                .update_one(
                    doc! {"_id": u.get("_id").unwrap()},
                    doc! {"$set": {"age": age}},
                )
                .await
                .unwrap();
        }
        let running = fx.start();
        let (_, all) = read(&stack, &fx.topic, 3).await;
        running.stop().await;
        let updates: Vec<&Json> = all.iter().filter(|d| d["op"] == "update").collect();
        assert_eq!(updates.len(), 2, "{mode}: {all:?}");
        assert_eq!(updates[0]["after"]["age"], first_age, "{mode}");
        assert_eq!(updates[1]["after"]["age"], 20, "{mode}");
        assert_eq!(
            updates[0]["after"]["email"] == "u1@example.com",
            email_kept,
            "{mode}: {}",
            updates[0]["after"]
        );
        assert_eq!(
            updates[0]["changed_fields"],
            serde_json::json!(["age"]),
            "{mode}"
        );
        fx.cleanup().await;
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The crash test for the MongoDB source, at scale (run by hand, see
/// docs/FAULTS.md): a load of inserts and updates while `unilog run` is
/// SIGKILLed again and again; then every change must be on the topic once
/// or more, repeats byte-identical, and the final state equal to the
/// collection's. `MONGO_CRASH_CHANGES` (default 100,000) and
/// `MONGO_CRASH_KILLS` (default 10) size it; `MONGO_CRASH_EXACTLY_ONCE=1`
/// runs it with `kafka.exactly_once: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by hand (docs/FAULTS.md)"]
async fn mongo_crash_test() {
    use rand::Rng;
    let changes = env_number("MONGO_CRASH_CHANGES", 100_000);
    let kills = env_number("MONGO_CRASH_KILLS", 10);
    let mode = std::env::var("MONGO_CRASH_MODE").unwrap_or_else(|_| "change_streams".into());
    // `when_available`: post-images, so a repeat carries the same document.
    // With `update_lookup`, a repeated update carries the document as it is
    // when read again, which may be newer.
    let full =
        std::env::var("MONGO_CRASH_FULL_DOCUMENT").unwrap_or_else(|_| "when_available".into());
    // `MONGO_CRASH_EXACTLY_ONCE=1`: `kafka.exactly_once: true`, and the
    // reader is `read_committed` (as always here).
    let exactly_once = env_number("MONGO_CRASH_EXACTLY_ONCE", 0) == 1;
    let stack = Stack::from_env();
    let fx = MongoFixture::new(&stack, &mode, &format!("    full_document: {full}\n"), "").await;
    if exactly_once {
        let text = std::fs::read_to_string(&fx.config).unwrap();
        std::fs::write(
            &fx.config,
            text.replace(
                "  partitions: 3\n",
                "  partitions: 3\n  exactly_once: true\n",
            ),
        )
        .unwrap();
    }
    let users = fx.users();
    users.insert_one(user(0)).await.unwrap();
    let started = std::time::Instant::now();
    let mut child = spawn_unilog(&fx);
    // Changes made before unilog noted its start are in its initial copy
    // only (as snapshot events): begin the load once the copy is done.
    let state = fx.dir.path().join(format!("state/{}.mongo.json", fx.name));
    wait_copy_complete(&fx, &state, started).await;
    let inserts = changes * 4 / 5;
    let updates = changes - inserts;
    let writer = {
        let users = users.clone();
        tokio::spawn(async move {
            let mut ids: Vec<Bson> = Vec::with_capacity(inserts);
            let mut done_updates = 0;
            let mut i = 0;
            while ids.len() < inserts {
                let batch: Vec<Document> = (0..200.min(inserts - ids.len()))
                    .map(|_| {
                        i += 1;
                        user(1 + i)
                    })
                    .collect();
                ids.extend(batch.iter().map(|d| d.get("_id").unwrap().clone()));
                users.insert_many(batch).await.unwrap();
                let due = updates * ids.len() / inserts;
                while done_updates < due {
                    let id = ids[rand::rng().random_range(0..ids.len())].clone();
                    users
                        .update_one(doc! {"_id": id}, doc! {"$inc": {"age": 1}})
                        .await
                        .unwrap();
                    done_updates += 1;
                }
            }
            ids.len() + done_updates
        })
    };
    let mut killed = 0;
    while killed < kills && !writer.is_finished() {
        let wait = rand::rng().random_range(500..2500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        kill9(&mut child);
        killed += 1;
        child = spawn_unilog(&fx);
    }
    let written = writer.await.unwrap() + 1;
    // Until every change is there (by the dedup id header), or 10 minutes:
    // repeats alone can pass a count of records.
    let waited = std::time::Instant::now();
    let mut records = loop {
        let records = consume(
            &stack.brokers,
            &fx.topic,
            written,
            Duration::from_secs(3),
            Duration::from_secs(600),
        )
        .await;
        let distinct: HashSet<&str> = records
            .iter()
            .filter_map(|r| r.headers.get("unilog.dedup_id").map(String::as_str))
            .collect();
        if distinct.len() >= written || waited.elapsed() > Duration::from_secs(120) {
            break records;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    records.sort_by_key(|r| (r.partition, r.offset));
    let decoded = decode_all(&mut Decoder::new(&stack.registry), &records).await;
    let status = support::sigterm(&mut child.0);
    assert!(status.success(), "{status:?}\n{}", unilog_log(&fx));
    let mut by_id: HashMap<&str, &[u8]> = HashMap::new();
    let mut repeats = 0;
    let mut newer = 0;
    for (r, d) in records.iter().zip(&decoded) {
        let id = d["dedup_id"].as_str().unwrap();
        if let Some(prev) = by_id.insert(id, &r.payload) {
            repeats += 1;
            if prev != r.payload.as_slice() {
                // Looked up when read: `update_lookup`, and in oplog mode
                // every value but `none` (the oplog has no post-images).
                let looked_up = full == "update_lookup" || (mode == "oplog" && full != "none");
                assert!(
                    looked_up && d["op"] == "update",
                    "dedup id {id} with other bytes"
                );
                newer += 1;
            }
        }
    }
    let want = ages_in(&users).await;
    let got = ages_of(&decoded);
    println!(
        "mongo crash test ({mode}, {full}): {written} changes, {killed} SIGKILLs, {} records, {} distinct changes, {repeats} repeats ({:.1}%, {newer} with a newer looked-up document), {:.0} s",
        records.len(),
        by_id.len(),
        100.0 * f64::from(u32::try_from(repeats).unwrap()) / f64::from(u32::try_from(by_id.len()).unwrap()),
        started.elapsed().as_secs_f64()
    );
    if by_id.len() != written {
        // Which kind of change is missing, for the report.
        let inserted: HashSet<&str> = decoded
            .iter()
            .filter(|d| d["op"] == "insert")
            .map(|d| d["key"].as_str().unwrap())
            .collect();
        let no_insert = want
            .keys()
            .filter(|k| !inserted.contains(k.as_str()))
            .count();
        let stale = want
            .iter()
            .filter(|(k, age)| got.get(*k) != Some(*age))
            .count();
        eprintln!(
            "missing: {} changes; documents without an insert event: {no_insert}; documents whose last event is not their final state: {stale}\n{}",
            written - by_id.len(),
            unilog_log(&fx)
                .lines()
                .filter(|l| !l.contains("progress"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(
        by_id.len(),
        written,
        "every change once or more, none missing"
    );
    assert_eq!(got, want, "the final state of every document");
    assert!(killed >= kills.min(3), "only {killed} kills");
    if exactly_once {
        let strict = support::broker_hides_aborted_records(&stack.brokers).await;
        println!(
            "exactly once: the broker {} aborted transactions",
            if strict { "hides" } else { "does NOT hide" }
        );
        if strict {
            assert_eq!(repeats, 0, "a read_committed reader read changes twice");
        } else {
            // At most the batch in flight at each kill (2,000 by default).
            assert!(repeats <= killed * 2000, "{repeats} repeats");
        }
    }
    fx.cleanup().await;
}

/// One pipeline, one process: a second `unilog run` of a running MongoDB
/// pipeline is refused at once, naming the first, and the first goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_run_of_a_running_mongo_pipeline_is_refused() {
    let stack = Stack::from_env();
    let fx = MongoFixture::new(&stack, "change_streams", "", "").await;
    let run = fx.start();
    // Wait until the first streams (its copy of an empty collection is quick).
    fx.users().insert_one(user(1)).await.unwrap();
    let first = consume(
        &stack.brokers,
        &fx.topic,
        1,
        Duration::from_secs(1),
        TIMEOUT,
    )
    .await;
    assert_eq!(first.len(), 1);
    let started = std::time::Instant::now();
    let out = support::unilog_output(&["run"], &fx.config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "this pipeline is already running (pid {}",
            std::process::id()
        )),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    fx.users().insert_one(user(2)).await.unwrap();
    let after = consume(
        &stack.brokers,
        &fx.topic,
        2,
        Duration::from_secs(1),
        TIMEOUT,
    )
    .await;
    assert_eq!(after.len(), 2, "the first pipeline goes on");
    run.stop().await;
    fx.cleanup().await;
}

/// A 50-document transaction committed through the driver, with unilog
/// (exactly once) killed right after the commit: all 50 are published, once
/// for `read_committed` readers where the broker hides aborted records; an
/// aborted transaction publishes nothing.
async fn a_transaction_is_published_once_across_a_kill(mode: &str) {
    let stack = Stack::from_env();
    let fx = MongoFixture::new(
        &stack,
        mode,
        "    full_document: when_available\n",
        "batch:\n  max_events: 20\n  max_wait_ms: 10\n",
    )
    .await;
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace(
            "  partitions: 3\n",
            "  partitions: 3\n  exactly_once: true\n",
        ),
    )
    .unwrap();
    let users = fx.users();
    users.insert_one(user(0)).await.unwrap();
    let mut child = spawn_unilog(&fx);
    let state = fx.dir.path().join(format!("state/{}.mongo.json", fx.name));
    wait_copy_complete(&fx, &state, std::time::Instant::now()).await;
    let mut session = fx.client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    users
        .insert_many((100..110).map(user).collect::<Vec<_>>())
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    session.start_transaction().await.unwrap();
    users
        .insert_many((1..=50).map(user).collect::<Vec<_>>())
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    kill9(&mut child);
    let mut child = spawn_unilog(&fx);
    users.insert_one(user(51)).await.unwrap();
    let start = std::time::Instant::now();
    let records = loop {
        let records = consume(
            &stack.brokers,
            &fx.topic,
            52,
            Duration::from_secs(3),
            TIMEOUT,
        )
        .await;
        let distinct: HashSet<&str> = records
            .iter()
            .filter_map(|r| r.headers.get("unilog.dedup_id").map(String::as_str))
            .collect();
        if distinct.len() >= 52 || start.elapsed() > Duration::from_secs(60) {
            break records;
        }
    };
    let status = support::sigterm(&mut child.0);
    assert!(status.success(), "{status:?}\n{}", unilog_log(&fx));
    let decoded = decode_all(&mut Decoder::new(&stack.registry), &records).await;
    let ages: std::collections::BTreeSet<i64> = decoded
        .iter()
        .filter_map(|e| e["after"]["age"].as_i64())
        .collect();
    assert_eq!(
        ages,
        (0..=51).collect(),
        "every committed document, none of the aborted ones"
    );
    let distinct: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.headers.get("unilog.dedup_id").map(String::as_str))
        .collect();
    assert_eq!(distinct.len(), 52, "{}", unilog_log(&fx));
    if support::broker_hides_aborted_records(&stack.brokers).await {
        assert_eq!(
            records.len(),
            52,
            "a read_committed reader read changes twice"
        );
    }
    println!(
        "{mode}: a 50-document transaction, killed after the commit: {} records, {} distinct",
        records.len(),
        distinct.len()
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn change_streams_a_transaction_is_published_once_across_a_kill() {
    a_transaction_is_published_once_across_a_kill("change_streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oplog_a_transaction_is_published_once_across_a_kill() {
    a_transaction_is_published_once_across_a_kill("oplog").await;
}

/// A 3 MB document (above Kafka's 1 MB limit) followed by ordinary ones:
/// a dead letter naming collection, key and size; the others arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_too_large_document_is_a_dead_letter_and_the_next_ones_arrive() {
    let stack = Stack::from_env();
    let fx = MongoFixture::new(&stack, "change_streams", "", "").await;
    let run = fx.start();
    let users = fx.users();
    users.insert_one(user(1)).await.unwrap();
    consume(
        &stack.brokers,
        &fx.topic,
        1,
        Duration::from_secs(1),
        TIMEOUT,
    )
    .await;
    let mut big = user(2);
    big.insert("email", "x".repeat(3_000_000));
    let big_id = big.get_object_id("_id").unwrap().to_hex();
    users.insert_one(big).await.unwrap();
    users.insert_one(user(3)).await.unwrap();
    let records = consume(
        &stack.brokers,
        &fx.topic,
        2,
        Duration::from_secs(2),
        TIMEOUT,
    )
    .await;
    let letters = consume(
        &stack.brokers,
        &fx.dead_letter_topic(),
        1,
        Duration::from_secs(2),
        TIMEOUT,
    )
    .await;
    let stats = run.stop().await;
    let mut ages: Vec<i64> = decode_all(&mut Decoder::new(&stack.registry), &records)
        .await
        .iter()
        .filter_map(|e| e["after"]["age"].as_i64())
        .collect();
    ages.sort_unstable();
    assert_eq!(ages, [1, 3], "the document after the large one arrives");
    assert_eq!(stats.dead_lettered, 1);
    let body: Json = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(body["table"], format!("{}.users", fx.db));
    assert_eq!(body["key"], big_id.as_str());
    assert!(
        body["size_bytes"].as_u64().is_some_and(|s| s > 3_000_000),
        "{body}"
    );
    fx.cleanup().await;
}
