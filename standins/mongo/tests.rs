//! Tests with the real `mongodb` driver: each starts its own stand-in on 127.0.0.1:0.

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document, Timestamp};
use futures::{StreamExt, TryStreamExt};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::{CursorType, FullDocumentType};
use mongodb::{Client, Collection};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::server::{Config, Server};

struct StandIn {
    host: String,
    #[allow(dead_code)]
    server: Arc<Server>,
}

async fn start(oplog_max_entries: Option<usize>) -> StandIn {
    start_with(oplog_max_entries, 16 * 1024 * 1024).await
}

async fn start_with(oplog_max_entries: Option<usize>, txn_entry_bytes: usize) -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let host = listener.local_addr().expect("address").to_string();
    let server = Server::new(Config {
        set_name: "rs0".into(),
        host: host.clone(),
        oplog_max_entries,
        txn_entry_bytes,
    });
    tokio::spawn(Arc::clone(&server).serve(listener));
    StandIn { host, server }
}

impl StandIn {
    async fn client_with(&self, options: &str) -> Client {
        let uri = format!(
            "mongodb://{}/?replicaSet=rs0&serverSelectionTimeoutMS=5000{options}",
            self.host
        );
        Client::with_uri_str(uri).await.expect("client")
    }

    async fn client(&self) -> Client {
        self.client_with("").await
    }
}

fn code(err: &Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

fn oplog(client: &Client) -> Collection<Document> {
    client.database("local").collection("oplog.rs")
}

/// All oplog entries, oldest first.
async fn oplog_entries(client: &Client) -> Vec<Document> {
    oplog(client)
        .find(doc! {})
        .await
        .expect("find oplog")
        .try_collect()
        .await
        .expect("read oplog")
}

async fn last_ts(client: &Client) -> Timestamp {
    let entries = oplog_entries(client).await;
    entries
        .last()
        .and_then(|e| e.get_timestamp("ts").ok())
        .expect("oplog has entries")
}

/// The next event, failing after 10 s instead of hanging.
async fn next_event<T: serde::de::DeserializeOwned + Unpin + Send + Sync>(
    stream: &mut mongodb::change_stream::ChangeStream<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("event within 10 s")
        .expect("stream open")
        .expect("event")
}

// ------------------------------------------------------------------------------------------
// handshake and CRUD

#[tokio::test]
async fn handshake_and_ping_as_replica_set_and_direct() {
    let s = start(None).await;
    for options in ["", "&directConnection=true"] {
        let client = s.client_with(options).await;
        let reply = client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
            .expect("ping");
        assert_eq!(reply.get_f64("ok").unwrap(), 1.0, "{options}");
        let info = client
            .database("admin")
            .run_command(doc! { "buildInfo": 1 })
            .await
            .expect("buildInfo");
        assert_eq!(info.get_str("version").unwrap(), "7.0.0");
        let hello = client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .expect("hello");
        assert_eq!(hello.get_str("setName").unwrap(), "rs0");
        assert_eq!(
            hello.get_array("hosts").unwrap(),
            &vec![Bson::String(s.host.clone())]
        );
        assert!(!hello.contains_key("topologyVersion"));
        let names = client.list_database_names().await.expect("listDatabases");
        assert!(names.contains(&"local".to_string()));
        client.shutdown().await;
    }
}

#[tokio::test]
async fn insert_find_update_delete() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("shop").collection("items");
    let docs: Vec<Document> = (1..=7).map(|i| doc! { "_id": i, "n": i * 10 }).collect();
    coll.insert_many(docs).await.expect("insert_many");
    let dup = coll.insert_one(doc! { "_id": 3 }).await.unwrap_err();
    assert!(format!("{dup}").contains("E11000"), "{dup}");

    let found: Vec<Document> = coll
        .find(doc! { "_id": { "$gt": 2 } })
        .sort(doc! { "_id": -1 })
        .batch_size(2)
        .limit(4)
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("cursor");
    let ids: Vec<i32> = found.iter().map(|d| d.get_i32("_id").unwrap()).collect();
    assert_eq!(ids, vec![7, 6, 5, 4]);
    assert_eq!(
        coll.count_documents(doc! { "n": { "$gte": 50 } })
            .await
            .unwrap(),
        3
    );

    let r = coll
        .update_many(doc! { "n": { "$gte": 60 } }, doc! { "$inc": { "n": 1 } })
        .await
        .unwrap();
    assert_eq!((r.matched_count, r.modified_count), (2, 2));
    let r = coll
        .update_one(doc! { "_id": 99 }, doc! { "$set": { "n": 0 } })
        .upsert(true)
        .await
        .unwrap();
    assert_eq!(r.upserted_id, Some(Bson::Int32(99)));
    let same = coll
        .update_one(doc! { "_id": 99 }, doc! { "$set": { "n": 0 } })
        .await
        .unwrap();
    assert_eq!((same.matched_count, same.modified_count), (1, 0));
    let d = coll.delete_many(doc! { "n": { "$lt": 30 } }).await.unwrap();
    assert_eq!(d.deleted_count, 3);
    let one = coll.find_one(doc! { "_id": 7 }).await.unwrap().unwrap();
    assert_eq!(one, doc! { "_id": 7, "n": 71 });
    let modified = coll
        .find_one_and_update(doc! { "_id": 7 }, doc! { "$unset": { "n": "" } })
        .return_document(mongodb::options::ReturnDocument::After)
        .await
        .unwrap();
    assert_eq!(modified, Some(doc! { "_id": 7 }));
}

#[tokio::test]
async fn writes_log_real_format_entries() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("c");
    coll.insert_one(doc! { "_id": 1, "x": "B", "arr": [1, 2, 3], "gone": true })
        .await
        .unwrap();
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "x": "C", "y": 1 }, "$unset": { "gone": "" } },
    )
    .await
    .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "arr": [1, 5] } })
        .await
        .unwrap();
    coll.replace_one(doc! { "_id": 1 }, doc! { "x": "D" })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();

    let entries = oplog_entries(&client).await;
    let data: Vec<&Document> = entries
        .iter()
        .filter(|e| e.get_str("ns").ok() == Some("test.c"))
        .collect();
    assert_eq!(data.len(), 5, "{data:#?}");
    let create = entries
        .iter()
        .find(|e| e.get_str("ns").ok() == Some("test.$cmd"))
        .expect("implicit create logged");
    assert_eq!(
        create.get_document("o").unwrap().get_str("create").unwrap(),
        "c"
    );

    let insert = data[0];
    assert_eq!(insert.get_str("op").unwrap(), "i");
    assert_eq!(insert.get_document("o2").unwrap(), &doc! { "_id": 1 });
    assert!(
        matches!(insert.get("ui"), Some(Bson::Binary(b)) if b.subtype == bson::spec::BinarySubtype::Uuid)
    );
    assert!(insert.get_i64("t").is_ok() && insert.get_i64("v").unwrap() == 2);
    assert!(insert.get_datetime("wall").is_ok() && insert.get_timestamp("ts").is_ok());
    // the driver's writes are retryable: the session fields are logged
    assert!(insert.get_document("lsid").is_ok() && insert.get_i64("txnNumber").is_ok());

    assert_eq!(
        data[1].get_document("o").unwrap(),
        &doc! { "$v": 2, "diff": { "d": { "gone": false }, "u": { "x": "C" }, "i": { "y": 1 } } }
    );
    assert_eq!(
        data[2].get_document("o").unwrap(),
        &doc! { "$v": 2, "diff": { "sarr": { "a": true, "l": 2, "u1": 5 } } }
    );
    assert_eq!(data[3].get_str("op").unwrap(), "u");
    assert_eq!(
        data[3].get_document("o").unwrap(),
        &doc! { "_id": 1, "x": "D" }
    );
    assert_eq!(data[4].get_str("op").unwrap(), "d");
    assert_eq!(data[4].get_document("o").unwrap(), &doc! { "_id": 1 });
    assert!(!data[4].contains_key("o2"));
    let ts: Vec<Timestamp> = entries
        .iter()
        .map(|e| e.get_timestamp("ts").unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "timestamps increase");
}

// ------------------------------------------------------------------------------------------
// tailing the oplog

#[tokio::test]
async fn tailable_await_cursor_sees_new_entries() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("tail");
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let from = last_ts(&client).await;
    let mut cursor = oplog(&client)
        .find(doc! { "ts": { "$gt": from } })
        .cursor_type(CursorType::TailableAwait)
        .max_await_time(Duration::from_millis(300))
        .await
        .expect("tailable find");
    let writer = coll.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        writer.insert_one(doc! { "_id": 2 }).await.unwrap();
        writer
            .update_one(doc! { "_id": 2 }, doc! { "$set": { "a": 1 } })
            .await
            .unwrap();
    });
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let entry = tokio::time::timeout(Duration::from_secs(10), cursor.next())
            .await
            .expect("entry within 10 s")
            .expect("cursor open")
            .expect("entry");
        seen.push(entry);
    }
    assert_eq!(seen[0].get_str("op").unwrap(), "i");
    assert_eq!(seen[0].get_document("o").unwrap(), &doc! { "_id": 2 });
    assert_eq!(seen[1].get_str("op").unwrap(), "u");
    assert!(seen[0].get_timestamp("ts").unwrap() > from);
}

#[tokio::test]
async fn tailing_beyond_history_is_capped_position_lost() {
    let s = start(Some(5)).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("cap");
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let old = last_ts(&client).await;
    let mut cursor = oplog(&client)
        .find(doc! { "ts": { "$gt": old } })
        .cursor_type(CursorType::TailableAwait)
        .max_await_time(Duration::from_millis(100))
        .await
        .expect("tailable find");
    for i in 1..=10 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    // a new tail from before the oldest entry
    let err = oplog(&client)
        .find(doc! { "ts": { "$gt": old } })
        .cursor_type(CursorType::TailableAwait)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(136), "{err}");
    // the open cursor fell off the oplog: its next getMore fails
    let err = loop {
        match cursor.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("cursor closed without error"),
        }
    };
    assert_eq!(code(&err), Some(136), "{err}");
}

// ------------------------------------------------------------------------------------------
// change streams

#[tokio::test]
async fn collection_watch_yields_crud_events() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("w");
    let mut stream = coll
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .expect("watch");
    assert!(
        stream.resume_token().is_some(),
        "initial postBatchResumeToken"
    );
    coll.insert_one(doc! { "_id": 1, "a": 1, "arr": [1, 2, 3] })
        .await
        .unwrap();
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "b.c": 2, "arr": [1] }, "$unset": { "a": "" } },
    )
    .await
    .unwrap();
    coll.replace_one(doc! { "_id": 1 }, doc! { "z": true })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();

    let insert: ChangeStreamEvent<Document> = next_event(&mut stream).await;
    assert_eq!(insert.operation_type, OperationType::Insert);
    assert_eq!(insert.document_key, Some(doc! { "_id": 1 }));
    assert_eq!(
        insert.full_document,
        Some(doc! { "_id": 1, "a": 1, "arr": [1, 2, 3] })
    );
    let ns = insert.ns.as_ref().unwrap();
    assert_eq!((ns.db.as_str(), ns.coll.as_deref()), ("test", Some("w")));
    assert!(insert.cluster_time.is_some() && insert.wall_time.is_some());

    let update = next_event(&mut stream).await;
    assert_eq!(update.operation_type, OperationType::Update);
    let description = update.update_description.unwrap();
    assert_eq!(description.updated_fields, doc! { "b": { "c": 2 } });
    assert_eq!(description.removed_fields, vec!["a".to_string()]);
    let truncated = description.truncated_arrays.unwrap();
    assert_eq!(truncated.len(), 1);
    assert_eq!(
        (truncated[0].field.as_str(), truncated[0].new_size),
        ("arr", 1)
    );
    // updateLookup reads the current document: by now it has been replaced and deleted
    assert_eq!(update.full_document, None);

    let replace = next_event(&mut stream).await;
    assert_eq!(replace.operation_type, OperationType::Replace);
    assert_eq!(replace.full_document, Some(doc! { "_id": 1, "z": true }));
    let delete = next_event(&mut stream).await;
    assert_eq!(delete.operation_type, OperationType::Delete);
    assert_eq!(delete.document_key, Some(doc! { "_id": 1 }));
    assert!(delete.full_document.is_none());

    // an idle stream's token still moves (postBatchResumeToken on every getMore)
    let before = stream.resume_token().unwrap();
    assert!(stream.next_if_any().await.unwrap().is_none());
    client
        .database("test")
        .collection::<Document>("other")
        .insert_one(doc! {})
        .await
        .unwrap();
    assert!(stream.next_if_any().await.unwrap().is_none());
    let after = stream.resume_token().unwrap();
    assert_ne!(format!("{before:?}"), format!("{after:?}"));
}

#[tokio::test]
async fn update_lookup_returns_the_current_document() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("lookup");
    let mut stream = coll
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": "k", "v": 1 }).await.unwrap();
    let _insert = next_event(&mut stream).await;
    coll.update_one(doc! { "_id": "k" }, doc! { "$inc": { "v": 1 } })
        .await
        .unwrap();
    let update = next_event(&mut stream).await;
    assert_eq!(update.full_document, Some(doc! { "_id": "k", "v": 2 }));
    assert_eq!(
        update.update_description.unwrap().updated_fields,
        doc! { "v": 2 }
    );
}

#[tokio::test]
async fn resume_after_continues_exactly_after_the_event() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("r");
    let mut stream = coll.watch().await.unwrap();
    for i in 1..=4 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let first = next_event(&mut stream).await;
    let second = next_event(&mut stream).await;
    assert_eq!(second.document_key, Some(doc! { "_id": 2 }));
    drop(stream);

    let mut resumed = coll.watch().resume_after(first.id.clone()).await.unwrap();
    let next = next_event(&mut resumed).await;
    assert_eq!(next.document_key, Some(doc! { "_id": 2 }));
    assert_eq!(format!("{:?}", next.id), format!("{:?}", second.id));
    let next = next_event(&mut resumed).await;
    assert_eq!(next.document_key, Some(doc! { "_id": 3 }));

    // from an operation time: that entry and later ones
    let at = first.cluster_time.unwrap();
    let mut from_time = coll.watch().start_at_operation_time(at).await.unwrap();
    assert_eq!(
        next_event(&mut from_time).await.document_key,
        Some(doc! { "_id": 1 })
    );
}

#[tokio::test]
async fn driver_resumes_after_a_resumable_get_more_error() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("f");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    assert_eq!(
        next_event(&mut stream).await.document_key,
        Some(doc! { "_id": 1 })
    );
    client
        .database("admin")
        .run_command(doc! { "standinFailNext": { "command": "getMore", "code": 10107 } })
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    assert_eq!(
        next_event(&mut stream).await.document_key,
        Some(doc! { "_id": 2 })
    );
}

#[tokio::test]
async fn database_watch_sees_drop_and_rename_and_collection_watch_is_invalidated() {
    let s = start(None).await;
    let client = s.client().await;
    let db = client.database("catalog");
    let mut db_stream = db.watch().await.unwrap();
    let a: Collection<Document> = db.collection("a");
    a.insert_one(doc! { "_id": 1 }).await.unwrap();
    let mut coll_stream = a.watch().await.unwrap();
    client
        .database("admin")
        .run_command(doc! { "renameCollection": "catalog.a", "to": "catalog.b" })
        .await
        .unwrap();
    db.collection::<Document>("b").drop().await.unwrap();

    let insert = next_event(&mut db_stream).await;
    assert_eq!(insert.operation_type, OperationType::Insert);
    let rename = next_event(&mut db_stream).await;
    assert_eq!(rename.operation_type, OperationType::Rename);
    assert_eq!(rename.ns.unwrap().coll.as_deref(), Some("a"));
    assert_eq!(rename.to.unwrap().coll.as_deref(), Some("b"));
    let drop_event = next_event(&mut db_stream).await;
    assert_eq!(drop_event.operation_type, OperationType::Drop);
    assert_eq!(drop_event.ns.unwrap().coll.as_deref(), Some("b"));

    // the collection stream on `a` sees the rename, then invalidate, then ends
    let renamed = next_event(&mut coll_stream).await;
    assert_eq!(renamed.operation_type, OperationType::Rename);
    let invalidate = next_event(&mut coll_stream).await;
    assert_eq!(invalidate.operation_type, OperationType::Invalidate);
    assert!(coll_stream.next().await.is_none());
    assert!(!coll_stream.is_alive());
    // resumeAfter an invalidate is refused; startAfter is the way to reopen
    let err = a
        .watch()
        .resume_after(invalidate.id.clone())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(260), "{err}");
    let mut reopened = a.watch().start_after(invalidate.id).await.unwrap();
    a.insert_one(doc! { "_id": 9 }).await.unwrap();
    assert_eq!(
        next_event(&mut reopened).await.document_key,
        Some(doc! { "_id": 9 })
    );

    // dropDatabase: a database stream gets drops, dropDatabase, invalidate
    db.drop().await.unwrap();
    let mut kinds = Vec::new();
    loop {
        let ev = next_event(&mut db_stream).await;
        let done = ev.operation_type == OperationType::Invalidate;
        kinds.push(ev.operation_type);
        if done {
            break;
        }
    }
    assert_eq!(
        kinds,
        vec![
            OperationType::Insert,
            OperationType::Drop,
            OperationType::DropDatabase,
            OperationType::Invalidate
        ]
    );
}

#[tokio::test]
async fn cluster_watch_sees_all_databases() {
    let s = start(None).await;
    let client = s.client().await;
    let mut stream = client.watch().await.unwrap();
    client
        .database("one")
        .collection::<Document>("x")
        .insert_one(doc! { "_id": 1 })
        .await
        .unwrap();
    client
        .database("two")
        .collection::<Document>("y")
        .insert_one(doc! { "_id": 2 })
        .await
        .unwrap();
    let first = next_event(&mut stream).await;
    let second = next_event(&mut stream).await;
    assert_eq!(first.ns.unwrap().db, "one");
    assert_eq!(second.ns.unwrap().db, "two");
}

#[tokio::test]
async fn resuming_from_truncated_history_is_change_stream_history_lost() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("h");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let token = next_event(&mut stream).await.id;
    // the stream has read up to the first insert; two more entries, then keep only the last
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    coll.insert_one(doc! { "_id": 3 }).await.unwrap();
    let reply = client
        .database("admin")
        .run_command(doc! { "standinTruncateOplog": 1, "keepLast": 1 })
        .await
        .unwrap();
    assert!(reply.get_i64("dropped").unwrap() > 0);

    let err = coll.watch().resume_after(token).await.unwrap_err();
    assert_eq!(code(&err), Some(286), "{err}");
    assert!(err.contains_label("NonResumableChangeStreamError"), "{err}");
    match err.kind.as_ref() {
        ErrorKind::Command(c) => assert_eq!(c.code_name, "ChangeStreamHistoryLost"),
        other => panic!("{other:?}"),
    }
    // the open stream has also fallen off the oplog
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break e,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    assert_eq!(code(&err), Some(286), "{err}");
}

// ------------------------------------------------------------------------------------------
// fixtures: same keys and types as MongoDB's own entries and events

/// The type tree of a BSON value: documents map keys to shapes, leaves name the BSON type.
fn bson_shape(value: &Bson) -> Value {
    match value {
        Bson::Document(d) => {
            Value::Object(d.iter().map(|(k, v)| (k.clone(), bson_shape(v))).collect())
        }
        Bson::Array(a) => Value::Array(a.iter().map(bson_shape).collect()),
        Bson::Int32(_) => "int".into(),
        Bson::Int64(_) => "long".into(),
        Bson::Double(_) => "double".into(),
        Bson::String(_) => "string".into(),
        Bson::Boolean(_) => "bool".into(),
        Bson::Null => "null".into(),
        Bson::Timestamp(_) => "timestamp".into(),
        Bson::DateTime(_) => "date".into(),
        Bson::ObjectId(_) => "objectId".into(),
        Bson::Binary(b) => format!("binData:{:02x}", u8::from(b.subtype)).into(),
        other => format!("{:?}", other.element_type()).into(),
    }
}

/// The same type tree, read from canonical extended JSON.
fn json_shape(value: &Value) -> Value {
    match value {
        Value::Object(m) if m.len() == 1 => {
            let (k, v) = m.iter().next().expect("one key");
            match k.as_str() {
                "$numberInt" => "int".into(),
                "$numberLong" => "long".into(),
                "$numberDouble" => "double".into(),
                "$date" => "date".into(),
                "$timestamp" => "timestamp".into(),
                "$oid" => "objectId".into(),
                "$binary" => format!(
                    "binData:{}",
                    v["subType"].as_str().unwrap_or("??").to_lowercase()
                )
                .into(),
                _ => Value::Object(m.iter().map(|(k, v)| (k.clone(), json_shape(v))).collect()),
            }
        }
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), json_shape(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(json_shape).collect()),
        Value::String(_) => "string".into(),
        Value::Bool(_) => "bool".into(),
        Value::Null => "null".into(),
        Value::Number(n) if n.is_i64() => "int".into(),
        Value::Number(_) => "double".into(),
    }
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/standins/mongo/fixtures/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_same_shape(name: &str, produced: &Document) {
    let expected = json_shape(&fixture(name));
    let actual = bson_shape(&Bson::Document(produced.clone()));
    assert_eq!(
        actual, expected,
        "{name}: the stand-in's document has other keys/types than the fixture\nproduced: {produced}"
    );
}

fn find_entry<'a>(entries: &'a [Document], op: &str, o_key: &str) -> &'a Document {
    entries
        .iter()
        .find(|e| {
            e.get_str("op").ok() == Some(op)
                && e.get_document("o").is_ok_and(|o| o.contains_key(o_key))
        })
        .unwrap_or_else(|| panic!("no {op} entry with o.{o_key}"))
}

#[tokio::test]
async fn fixtures_match_the_stand_in() {
    let s = start(None).await;
    // plain writes: no session fields in the oplog
    let client = s.client_with("&retryWrites=false").await;
    let db = client.database("test");
    let c: Collection<Document> = db.collection("c");
    let mut coll_stream = c
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .unwrap()
        .with_type::<Document>();
    let mut db_stream = db.watch().await.unwrap().with_type::<Document>();

    c.insert_one(doc! { "_id": 1, "x": "B" }).await.unwrap();
    let insert_event = next_event(&mut coll_stream).await;
    c.update_one(doc! { "_id": 1 }, doc! { "$set": { "x": "C", "y": 1 } })
        .await
        .unwrap();
    let update_event = next_event(&mut coll_stream).await;
    c.replace_one(doc! { "_id": 1 }, doc! { "x": "D" })
        .await
        .unwrap();
    c.delete_one(doc! { "_id": 1 }).await.unwrap();
    db.create_collection("c2").await.unwrap();
    client
        .database("admin")
        .run_command(doc! { "renameCollection": "test.c2", "to": "test.c3" })
        .await
        .unwrap();
    db.collection::<Document>("c3").drop().await.unwrap();
    db.drop().await.unwrap();

    let entries = oplog_entries(&client).await;
    let data: Vec<Document> = entries
        .iter()
        .filter(|e| e.get_str("ns").ok() == Some("test.c"))
        .cloned()
        .collect();
    assert_same_shape("oplog/insert", &data[0]);
    assert_same_shape("oplog/update_v2_diff", &data[1]);
    assert_same_shape("oplog/replace", &data[2]);
    assert_same_shape("oplog/delete", &data[3]);
    let create = entries
        .iter()
        .find(|e| {
            e.get_document("o")
                .is_ok_and(|o| o.get_str("create").ok() == Some("c2"))
        })
        .unwrap();
    assert_same_shape("oplog/create", create);
    assert_same_shape(
        "oplog/rename",
        find_entry(&entries, "c", "renameCollection"),
    );
    assert_same_shape("oplog/drop", find_entry(&entries, "c", "drop"));
    assert_same_shape(
        "oplog/drop_database",
        find_entry(&entries, "c", "dropDatabase"),
    );

    assert_same_shape("events/insert", &insert_event);
    assert_same_shape("events/update_lookup", &update_event);
    assert_same_shape("events/replace", &next_event(&mut coll_stream).await);
    assert_same_shape("events/delete", &next_event(&mut coll_stream).await);
    let mut by_type = std::collections::BTreeMap::new();
    loop {
        let ev = next_event(&mut db_stream).await;
        let kind = ev.get_str("operationType").unwrap().to_string();
        by_type.entry(kind.clone()).or_insert(ev);
        if kind == "invalidate" {
            break;
        }
    }
    for (kind, name) in [
        ("rename", "events/rename"),
        ("drop", "events/drop"),
        ("dropDatabase", "events/drop_database"),
        ("invalidate", "events/invalidate"),
    ] {
        let ev = by_type
            .get(kind)
            .unwrap_or_else(|| panic!("no {kind} event"));
        assert_same_shape(name, ev);
    }

    // retryable writes add lsid, txnNumber, stmtId, prevOpTime
    let retrying = s.client().await;
    retrying
        .database("test")
        .collection::<Document>("c")
        .insert_one(doc! { "_id": 1, "x": "B" })
        .await
        .unwrap();
    let entries = oplog_entries(&retrying).await;
    assert_same_shape("oplog/insert_retryable", entries.last().unwrap());
}

// ------------------------------------------------------------------------------------------
// transactions

#[tokio::test]
async fn a_committed_transaction_is_one_apply_ops_entry_and_events_with_its_session() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("t");
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut stream = coll.watch().await.expect("watch");
    let mut session = client.start_session().await.expect("session");
    session.start_transaction().await.expect("start");
    for i in 1..=3 {
        coll.insert_one(doc! { "_id": i, "n": i })
            .session(&mut session)
            .await
            .expect("insert in a transaction");
    }
    // Not applied before the commit.
    assert!(coll.find_one(doc! { "_id": 1 }).await.unwrap().is_none());
    session.commit_transaction().await.expect("commit");
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 4);
    let entries = oplog_entries(&client).await;
    let txn = entries.last().unwrap();
    assert_eq!(txn.get_str("op").unwrap(), "c");
    assert_eq!(txn.get_str("ns").unwrap(), "admin.$cmd");
    assert!(
        txn.get_document("lsid").is_ok() && txn.get_i64("txnNumber").is_ok(),
        "{txn}"
    );
    let ops = txn
        .get_document("o")
        .unwrap()
        .get_array("applyOps")
        .unwrap();
    assert_eq!(ops.len(), 3);
    let first = ops[0].as_document().unwrap();
    assert_eq!(first.get_str("op").unwrap(), "i");
    assert_eq!(first.get_str("ns").unwrap(), "test.t");
    assert!(
        first.get("ts").is_none(),
        "inner ops take the outer entry's ts"
    );
    let mut times = Vec::new();
    for i in 1..=3 {
        let ev: ChangeStreamEvent<Document> = next_event(&mut stream).await;
        assert_eq!(ev.operation_type, OperationType::Insert);
        assert_eq!(ev.full_document.unwrap().get_i32("n").unwrap(), i);
        assert!(ev.lsid.is_some() && ev.txn_number.is_some());
        times.push(ev.cluster_time);
    }
    assert!(
        times.windows(2).all(|w| w[0] == w[1]),
        "one transaction, one clusterTime"
    );
    // An aborted transaction writes nothing and shows nothing.
    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": 99 })
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.expect("abort");
    coll.insert_one(doc! { "_id": 100 }).await.unwrap();
    let ev: ChangeStreamEvent<Document> = next_event(&mut stream).await;
    assert_eq!(ev.document_key.unwrap().get_i32("_id").unwrap(), 100);
    assert!(coll.find_one(doc! { "_id": 99 }).await.unwrap().is_none());
}

#[tokio::test]
async fn a_large_transaction_is_a_partial_txn_chain_and_resumes_inside_it() {
    // 300 bytes an entry: each insert of ~100 bytes, so about 3 ops an entry.
    let s = start_with(None, 300).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("big");
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut stream = coll.watch().await.expect("watch");
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    for i in 1..=10 {
        coll.insert_one(doc! { "_id": i, "pad": "x".repeat(40) })
            .session(&mut session)
            .await
            .unwrap();
    }
    session.commit_transaction().await.unwrap();
    let entries = oplog_entries(&client).await;
    let txn: Vec<&Document> = entries
        .iter()
        .filter(|e| {
            e.get_document("o")
                .is_ok_and(|o| o.contains_key("applyOps"))
        })
        .collect();
    assert!(txn.len() >= 3, "a chain: {txn:?}");
    assert!(txn[..txn.len() - 1].iter().all(|e| e
        .get_document("o")
        .unwrap()
        .get_bool("partialTxn")
        .ok()
        == Some(true)));
    assert!(!txn
        .last()
        .unwrap()
        .get_document("o")
        .unwrap()
        .contains_key("partialTxn"));
    let mut ids = Vec::new();
    let mut fifth = None;
    for i in 1..=10 {
        let ev: ChangeStreamEvent<Document> = next_event(&mut stream).await;
        ids.push(ev.document_key.unwrap().get_i32("_id").unwrap());
        if i == 5 {
            fifth = Some(ev.id.clone());
        }
    }
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    // Resuming after the fifth event of the transaction gives the other five.
    let mut resumed = coll.watch().resume_after(fifth.unwrap()).await.unwrap();
    let mut rest = Vec::new();
    for _ in 6..=10 {
        let ev: ChangeStreamEvent<Document> = next_event(&mut resumed).await;
        rest.push(ev.document_key.unwrap().get_i32("_id").unwrap());
    }
    assert_eq!(rest, (6..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_transaction_may_start_with_a_read_and_a_failed_commit_applies_nothing() {
    let s = start(None).await;
    let client = s.client().await;
    let coll: Collection<Document> = client.database("test").collection("r");
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    assert!(coll
        .find_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap()
        .is_some());
    coll.insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();
    session
        .commit_transaction()
        .await
        .expect("commit after a read");
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    // A duplicate key at the commit: nothing of the transaction is applied.
    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": 3 })
        .session(&mut session)
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    assert!(session.commit_transaction().await.is_err());
    assert!(coll.find_one(doc! { "_id": 3 }).await.unwrap().is_none());
    let entries = oplog_entries(&client).await;
    assert!(!entries.iter().any(|e| e
        .get_document("o")
        .is_ok_and(|o| o.contains_key("applyOps") && o.get_array("applyOps").unwrap().len() == 2)));
    // Writes go on reaching the oplog.
    coll.insert_one(doc! { "_id": 4 }).await.unwrap();
    assert!(oplog_entries(&client)
        .await
        .last()
        .unwrap()
        .get_document("o")
        .unwrap()
        .get_i32("_id")
        .is_ok_and(|id| id == 4));
}
