//! The commands the stand-in answers (MONGO-FORMATS.md §2). Each write changes the store and
//! appends its oplog entry under the same lock, so readers never see one without the other.
//!
//! Generic arguments (`lsid`, `$clusterTime`, `readConcern`, `writeConcern`, `$readPreference`,
//! `apiVersion`, `comment`, ...) are accepted and ignored. Retryable writes (`lsid` +
//! `txnNumber`) log the session fields and answer a retry with the saved reply. Transactions
//! are refused.

use std::collections::VecDeque;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document, Uuid};

use crate::changestream::ChangeStream;
use crate::cursors::{self, DEFAULT_BATCH_SIZE};
use crate::oplog::{self, Op, TxnContext, TERM};
use crate::query;
use crate::server::{as_i64, change_stream_labels, CommandError, FailPoint, Server, State};
use crate::store::Collection;
use crate::wire::MAX_MESSAGE_SIZE;

/// The server version the stand-in reports (wire version 21 = 7.0).
pub const VERSION: &str = "7.0.0";
const MAX_WIRE_VERSION: i32 = 21;
const MAX_BSON_OBJECT_SIZE: i32 = 16 * 1024 * 1024;

/// Arguments every command may carry that are not options of the command itself.
const GENERIC_ARGS: &[&str] = &[
    "$db",
    "lsid",
    "txnNumber",
    "$clusterTime",
    "$readPreference",
    "readConcern",
    "writeConcern",
    "apiVersion",
    "apiStrict",
    "apiDeprecationErrors",
    "comment",
    "maxTimeMS",
    "autocommit",
    "startTransaction",
];

/// Runs one command (the name is the first key).
pub async fn run(
    server: &Server,
    name: &str,
    command: Document,
    connection_id: i64,
) -> Result<Document, CommandError> {
    let db = command.get_str("$db").unwrap_or("admin").to_string();
    // A driver marks every command of a transaction (getMore too).
    if command.get_bool("autocommit").ok() == Some(false) && name != "getMore" {
        let mut state = server.lock();
        return in_transaction(&mut state, server, name, &db, &command);
    }
    match name {
        "hello" | "isMaster" | "ismaster" => Ok(hello(server, name, connection_id)),
        "getMore" => cursors::get_more(server, &command).await,
        _ => {
            let mut state = server.lock();
            run_sync(&mut state, server, name, &db, &command)
        }
    }
}

fn run_sync(
    state: &mut State,
    server: &Server,
    name: &str,
    db: &str,
    command: &Document,
) -> Result<Document, CommandError> {
    match name {
        "ping" => Ok(doc! { "ok": 1.0 }),
        "buildInfo" | "buildinfo" => Ok(build_info()),
        "endSessions" | "killSessions" | "refreshSessions" => Ok(doc! { "ok": 1.0 }),
        "listDatabases" => list_databases(state, command),
        "listCollections" => list_collections(state, db, command),
        "create" => create(state, db, command),
        "drop" => drop_collection(state, db, command),
        "dropDatabase" => drop_database(state, db),
        "renameCollection" => rename_collection(state, db, command),
        "insert" | "update" | "delete" | "findAndModify" | "findandmodify" => {
            retryable_write(state, name, db, command)
        }
        "find" => find(state, db, command),
        "count" => count(state, db, command),
        "aggregate" => aggregate(state, db, command),
        "killCursors" => Ok(cursors::kill_cursors(state, command)),
        "replSetGetStatus" => Ok(repl_set_status(state, server)),
        "standinTruncateOplog" => truncate_oplog(state, command),
        "standinFailNext" => fail_next(state, command),
        "abortTransaction" | "commitTransaction" => Err(CommandError::illegal_operation(
            "commitTransaction and abortTransaction need lsid, txnNumber and autocommit: false",
        )),
        other => Err(CommandError::command_not_found(other)),
    }
}

// ------------------------------------------------------------------------------------------
// handshake and server information

fn hello(server: &Server, name: &str, connection_id: i64) -> Document {
    let state = server.lock();
    let ts = state.oplog.last_ts();
    drop(state);
    let now = DateTime::now();
    let host = server.config.host.as_str();
    let op_time = doc! { "ts": ts, "t": TERM };
    let mut reply = doc! { "helloOk": true };
    // mongod answers `ismaster` to isMaster and `isWritablePrimary` to hello.
    if name == "hello" {
        reply.insert("isWritablePrimary", true);
    } else {
        reply.insert("ismaster", true);
    }
    // No topologyVersion: the driver then polls every heartbeatFrequencyMS instead of
    // streaming awaitable hellos (MONGO-FORMATS.md §1).
    reply.extend(doc! {
        "hosts": [host],
        "setName": &server.config.set_name,
        "setVersion": 1,
        "electionId": ObjectId::parse_str("7fffffff0000000000000001").unwrap_or_else(|_| ObjectId::new()),
        "primary": host,
        "me": host,
        "secondary": false,
        "lastWrite": {
            "opTime": op_time.clone(),
            "lastWriteDate": now,
            "majorityOpTime": op_time,
            "majorityWriteDate": now,
        },
        "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
        "maxMessageSizeBytes": i32::try_from(MAX_MESSAGE_SIZE).unwrap_or(i32::MAX),
        "maxWriteBatchSize": 100_000,
        "localTime": now,
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": connection_id,
        "minWireVersion": 0,
        "maxWireVersion": MAX_WIRE_VERSION,
        "readOnly": false,
        "ok": 1.0,
    });
    reply
}

fn build_info() -> Document {
    doc! {
        "version": VERSION,
        "gitVersion": "0000000000000000000000000000000000000000",
        "versionArray": [7, 0, 0, 0],
        "modules": [],
        "storageEngines": ["inMemory"],
        "javascriptEngine": "none",
        "bits": 64,
        "debug": false,
        "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
        "standIn": "unilog mongo-standin: a test stand-in, not mongod",
        "ok": 1.0,
    }
}

fn repl_set_status(state: &State, server: &Server) -> Document {
    let ts = state.oplog.last_ts();
    let op_time = doc! { "ts": ts, "t": TERM };
    doc! {
        "set": &server.config.set_name,
        "date": DateTime::now(),
        "myState": 1,
        "term": TERM,
        "optimes": {
            "lastCommittedOpTime": op_time.clone(),
            "appliedOpTime": op_time.clone(),
            "durableOpTime": op_time,
        },
        "members": [{
            "_id": 0,
            "name": &server.config.host,
            "health": 1.0,
            "state": 1,
            "stateStr": "PRIMARY",
            "self": true,
        }],
        "ok": 1.0,
    }
}

// ------------------------------------------------------------------------------------------
// helpers

fn str_arg<'a>(command: &'a Document, key: &str) -> Result<&'a str, CommandError> {
    command
        .get_str(key)
        .map_err(|_| CommandError::type_mismatch(format!("'{key}' must be a string")))
}

fn doc_arg(command: &Document, key: &str) -> Result<Document, CommandError> {
    match command.get(key) {
        None | Some(Bson::Null) => Ok(Document::new()),
        Some(Bson::Document(d)) => Ok(d.clone()),
        Some(_) => Err(CommandError::type_mismatch(format!(
            "'{key}' must be an object"
        ))),
    }
}

fn usize_arg(command: &Document, key: &str) -> Option<i64> {
    command.get(key).and_then(as_i64)
}

/// Refuses namespaces the stand-in does not write to.
fn check_writable(db: &str, coll: &str) -> Result<(), CommandError> {
    if db.is_empty() || db.contains('.') || coll.is_empty() || coll.starts_with("system.") {
        return Err(CommandError::invalid_namespace(format!(
            "Invalid namespace specified '{db}.{coll}'"
        )));
    }
    if db == "local" || db == "config" {
        return Err(CommandError::illegal_operation(format!(
            "cannot write to '{db}.{coll}' on the MongoDB stand-in"
        )));
    }
    Ok(())
}

/// The collection, created (and its `create` logged) if missing. Returns its UUID.
fn ensure_collection(state: &mut State, db: &str, coll: &str) -> Uuid {
    if let Some(c) = state.store.collection(db, coll) {
        return c.uuid;
    }
    let c = Collection::new();
    let uuid = c.uuid;
    state
        .store
        .dbs
        .entry(db.to_string())
        .or_default()
        .insert(coll.to_string(), c);
    state.oplog.append(
        Op::new(
            "c",
            format!("{db}.$cmd"),
            Some(uuid),
            oplog::create_command(coll),
        ),
        None,
        0,
    );
    uuid
}

/// `_id` first, generated if missing (as mongod stores documents).
fn with_id_first(doc: Document) -> Document {
    let id = doc
        .get("_id")
        .cloned()
        .unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
    let mut out = doc! { "_id": id };
    out.extend(doc.into_iter().filter(|(k, _)| k != "_id"));
    out
}

fn duplicate_key(db: &str, coll: &str, id: &Bson, index: usize) -> Document {
    doc! {
        "index": i32::try_from(index).unwrap_or(i32::MAX),
        "code": 11000,
        "errmsg": format!("E11000 duplicate key error collection: {db}.{coll} index: _id_ dup key: {{ _id: {id} }}"),
        "keyPattern": { "_id": 1 },
        "keyValue": { "_id": id.clone() },
    }
}

fn write_error(index: usize, err: &CommandError) -> Document {
    doc! {
        "index": i32::try_from(index).unwrap_or(i32::MAX),
        "code": err.code,
        "errmsg": &err.message,
    }
}

fn txn_context(command: &Document) -> Option<TxnContext> {
    let txn_number = command.get("txnNumber").and_then(as_i64)?;
    let lsid = command.get_document("lsid").ok()?;
    let id = match lsid.get("id") {
        Some(Bson::Binary(b)) => b.to_uuid().ok()?,
        _ => return None,
    };
    Some(TxnContext {
        lsid_id: id,
        txn_number,
    })
}

// ------------------------------------------------------------------------------------------
// transactions
//
// A transaction's writes are held, unapplied, until `commitTransaction`, which applies them in
// order and logs them as mongod does: one `applyOps` entry with the session fields, or a chain
// of `partialTxn` entries above `txn_entry_bytes` (MONGO-FORMATS.md §3). `abortTransaction`
// drops them. What the stand-in does not do: a read inside a transaction sees the committed
// data, not the transaction's own writes (no snapshot isolation), and a write's reply is made
// before it is applied (inserts count their documents; updates and deletes answer n: 0).

/// A collection as it was before a commit, to put back if the commit fails.
type SavedCollection = ((String, String), Option<crate::store::Collection>);

fn in_transaction(
    state: &mut State,
    server: &Server,
    name: &str,
    db: &str,
    command: &Document,
) -> Result<Document, CommandError> {
    let Some(txn) = txn_context(command) else {
        return Err(CommandError::failed_to_parse(
            "a transaction needs lsid and txnNumber",
        ));
    };
    let key = (txn.lsid_id, txn.txn_number);
    // The first command of a transaction, whatever it is, starts it.
    if command.get_bool("startTransaction").ok() == Some(true) {
        state.transactions.insert(key, Vec::new());
    }
    match name {
        "insert" | "update" | "delete" | "findAndModify" | "findandmodify" => {
            let Some(held) = state.transactions.get_mut(&key) else {
                return Err(CommandError::no_such_transaction(txn.txn_number));
            };
            let mut plain = command.clone();
            for k in [
                "lsid",
                "txnNumber",
                "autocommit",
                "startTransaction",
                "readConcern",
                "writeConcern",
            ] {
                plain.remove(k);
            }
            held.push((name.to_string(), db.to_string(), plain));
            Ok(match name {
                "insert" => doc! {
                    "n": i32::try_from(command.get_array("documents").map_or(0, Vec::len)).unwrap_or(i32::MAX),
                    "ok": 1.0,
                },
                "findAndModify" | "findandmodify" => {
                    doc! { "lastErrorObject": { "n": 0 }, "value": Bson::Null, "ok": 1.0 }
                }
                _ => doc! { "n": 0, "nModified": 0, "ok": 1.0 },
            })
        }
        "commitTransaction" => {
            if state.committed.contains(&key) {
                return Ok(doc! { "ok": 1.0 });
            }
            let Some(held) = state.transactions.remove(&key) else {
                return Err(CommandError::no_such_transaction(txn.txn_number));
            };
            // A collection a transaction creates is logged before it, as
            // its own `create` (mongod logs it inside the transaction).
            let mut touched = Vec::new();
            for (write, wdb, cmd) in &held {
                if let Ok(coll) = cmd.get_str(write.as_str()) {
                    check_writable(wdb, coll)?;
                    ensure_collection(state, wdb, coll);
                    touched.push((wdb.clone(), coll.to_string()));
                }
            }
            // All or nothing: the touched collections as they were, put
            // back if a write fails (an error, or writeErrors in its reply).
            let saved: Vec<SavedCollection> = touched
                .iter()
                .map(|(d, c)| {
                    (
                        (d.clone(), c.clone()),
                        state.store.collection(d, c).cloned(),
                    )
                })
                .collect();
            state.oplog.begin_capture();
            let mut failed = None;
            for (write, wdb, cmd) in &held {
                match retryable_write(state, write, wdb, cmd) {
                    Ok(reply) if reply.contains_key("writeErrors") => {
                        let code = reply
                            .get_array("writeErrors")
                            .ok()
                            .and_then(|w| w.first())
                            .and_then(Bson::as_document)
                            .and_then(|d| d.get_i32("code").ok())
                            .unwrap_or(8);
                        failed = Some(CommandError::new(
                            code,
                            "a write of the transaction failed at its commit; nothing of it was applied",
                        ));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let ops = state.oplog.end_capture();
            if let Some(e) = failed {
                for ((d, c), coll) in saved {
                    let dbs = state.store.dbs.entry(d).or_default();
                    match coll {
                        Some(coll) => {
                            dbs.insert(c, coll);
                        }
                        None => {
                            dbs.remove(&c);
                        }
                    }
                }
                return Err(e);
            }
            state
                .oplog
                .append_transaction(ops, &txn, server.config.txn_entry_bytes);
            state.committed.insert(key);
            Ok(doc! { "ok": 1.0 })
        }
        "abortTransaction" => {
            state.transactions.remove(&key);
            Ok(doc! { "ok": 1.0 })
        }
        // Reads and everything else: on the committed data.
        other => run_sync(state, server, other, db, command),
    }
}

// ------------------------------------------------------------------------------------------
// writes

/// Runs a write; with `lsid` + `txnNumber` a retry of an executed write gets the saved reply
/// and logs nothing.
fn retryable_write(
    state: &mut State,
    name: &str,
    db: &str,
    command: &Document,
) -> Result<Document, CommandError> {
    let txn = txn_context(command);
    if let Some(t) = &txn {
        if let Some(saved) = state.retried_writes.get(&(t.lsid_id, t.txn_number)) {
            return Ok(saved.clone());
        }
    }
    let reply = match name {
        "insert" => insert(state, db, command, txn.as_ref()),
        "update" => update(state, db, command, txn.as_ref()),
        "delete" => delete(state, db, command, txn.as_ref()),
        _ => find_and_modify(state, db, command, txn.as_ref()),
    }?;
    if let Some(t) = txn {
        state
            .retried_writes
            .insert((t.lsid_id, t.txn_number), reply.clone());
    }
    Ok(reply)
}

fn insert(
    state: &mut State,
    db: &str,
    command: &Document,
    txn: Option<&TxnContext>,
) -> Result<Document, CommandError> {
    let coll = str_arg(command, "insert")?;
    check_writable(db, coll)?;
    let docs = command
        .get_array("documents")
        .map_err(|_| CommandError::failed_to_parse("insert needs 'documents'"))?;
    let ordered = command.get_bool("ordered").unwrap_or(true);
    let uuid = ensure_collection(state, db, coll);
    let ns = format!("{db}.{coll}");
    let mut n = 0;
    let mut errors = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let Bson::Document(d) = d else {
            errors.push(write_error(
                i,
                &CommandError::type_mismatch("document must be an object"),
            ));
            if ordered {
                break;
            }
            continue;
        };
        let d = with_id_first(d.clone());
        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
        let c = state
            .store
            .collection_mut(db, coll)
            .ok_or_else(|| CommandError::namespace_not_found(ns.clone()))?;
        if c.position(&id).is_some() {
            errors.push(duplicate_key(db, coll, &id, i));
            if ordered {
                break;
            }
            continue;
        }
        c.push(d.clone());
        let op = Op::new("i", ns.clone(), Some(uuid), d.clone())
            .o2(oplog::document_key(&d))
            .images(None, Some(d));
        state
            .oplog
            .append(op, txn, i32::try_from(i).unwrap_or(i32::MAX));
        n += 1;
    }
    let mut reply = doc! { "n": n };
    if !errors.is_empty() {
        reply.insert("writeErrors", errors);
    }
    Ok(reply)
}

/// The statement being executed: its session (retryable writes) and `stmtId`.
#[derive(Clone, Copy)]
struct Stmt<'a> {
    txn: Option<&'a TxnContext>,
    id: i32,
}

/// What one update statement did.
struct UpdateOutcome {
    matched: i32,
    modified: i32,
    upserted: Option<Bson>,
    /// Pre- and post-image of the (last) document touched.
    images: Option<(Option<Document>, Document)>,
}

/// One update statement's arguments.
struct UpdateSpec<'a> {
    query: &'a Document,
    update: &'a Document,
    upsert: bool,
    multi: bool,
    sort: Option<&'a Document>,
}

/// One update statement: operator update or replacement, upsert, multi.
/// The documents `filter` matches, in insertion order: through the `_id`
/// index when the filter is only on `_id`, else by a scan.
fn matching(c: &Collection, filter: &Document) -> Result<Vec<Document>, CommandError> {
    if let Some(docs) = c.by_id_filter(filter) {
        return Ok(docs.into_iter().cloned().collect());
    }
    let mut out = Vec::new();
    for d in &c.docs {
        if query::matches(d, filter)? {
            out.push(d.clone());
        }
    }
    Ok(out)
}

fn update_one_statement(
    state: &mut State,
    db: &str,
    coll: &str,
    spec: &UpdateSpec<'_>,
    stmt: Stmt<'_>,
) -> Result<UpdateOutcome, CommandError> {
    let UpdateSpec {
        query: query_doc,
        update: update_doc,
        upsert,
        multi,
        sort,
    } = *spec;
    let replacement = query::is_replacement(update_doc);
    if replacement && multi {
        return Err(CommandError::failed_to_parse(
            "multi update is not supported for replacement-style update",
        ));
    }
    let ns = format!("{db}.{coll}");
    let mut targets: Vec<Document> = match state.store.collection(db, coll) {
        Some(c) => matching(c, query_doc)?,
        None => Vec::new(),
    };
    if let Some(sort) = sort {
        query::sort_docs(&mut targets, sort);
    }
    if !multi {
        targets.truncate(1);
    }
    let mut outcome = UpdateOutcome {
        matched: 0,
        modified: 0,
        upserted: None,
        images: None,
    };
    if targets.is_empty() {
        if !upsert {
            return Ok(outcome);
        }
        check_writable(db, coll)?;
        let seed = query::upsert_seed(query_doc);
        let new_doc = if replacement {
            let id = seed
                .get("_id")
                .or_else(|| update_doc.get("_id"))
                .cloned()
                .unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
            query::replacement(&id, update_doc)?
        } else {
            with_id_first(query::apply_update(&seed, update_doc, true)?)
        };
        let uuid = ensure_collection(state, db, coll);
        let id = new_doc.get("_id").cloned().unwrap_or(Bson::Null);
        if let Some(c) = state.store.collection_mut(db, coll) {
            c.push(new_doc.clone());
        }
        let op = Op::new("i", ns, Some(uuid), new_doc.clone())
            .o2(oplog::document_key(&new_doc))
            .images(None, Some(new_doc.clone()));
        state.oplog.append(op, stmt.txn, stmt.id);
        outcome.upserted = Some(id);
        outcome.images = Some((None, new_doc));
        return Ok(outcome);
    }
    for pre in targets {
        outcome.matched += 1;
        let id = pre.get("_id").cloned().unwrap_or(Bson::Null);
        let post = if replacement {
            query::replacement(&id, update_doc)?
        } else {
            query::apply_update(&pre, update_doc, false)?
        };
        outcome.images = Some((Some(pre.clone()), post.clone()));
        let o = if replacement {
            if post == pre {
                continue;
            }
            post.clone()
        } else {
            match query::diff(&pre, &post) {
                // An update that changes nothing logs nothing (SERVER-21738).
                None => continue,
                Some(diff) => doc! { "$v": 2, "diff": diff },
            }
        };
        let Some(c) = state.store.collection_mut(db, coll) else {
            continue;
        };
        let uuid = c.uuid;
        if let Some(i) = c.position(&id) {
            c.docs[i] = post.clone();
        }
        outcome.modified += 1;
        let op = Op::new("u", ns.clone(), Some(uuid), o)
            .o2(doc! { "_id": id })
            .images(Some(pre), Some(post));
        state.oplog.append(op, stmt.txn, stmt.id);
    }
    Ok(outcome)
}

fn update(
    state: &mut State,
    db: &str,
    command: &Document,
    txn: Option<&TxnContext>,
) -> Result<Document, CommandError> {
    let coll = str_arg(command, "update")?;
    check_writable(db, coll)?;
    let updates = command
        .get_array("updates")
        .map_err(|_| CommandError::failed_to_parse("update needs 'updates'"))?;
    let ordered = command.get_bool("ordered").unwrap_or(true);
    let (mut n, mut modified) = (0, 0);
    let mut upserted = Vec::new();
    let mut errors = Vec::new();
    for (i, spec) in updates.iter().enumerate() {
        let result = (|| {
            let Bson::Document(spec) = spec else {
                return Err(CommandError::type_mismatch(
                    "update statement must be an object",
                ));
            };
            let q = doc_arg(spec, "q")?;
            let u = match spec.get("u") {
                Some(Bson::Document(u)) => u.clone(),
                Some(Bson::Array(_)) => {
                    return Err(CommandError::illegal_operation(
                        "pipeline updates are not supported by the MongoDB stand-in",
                    ))
                }
                _ => return Err(CommandError::failed_to_parse("update statement needs 'u'")),
            };
            if spec.contains_key("arrayFilters") {
                return Err(CommandError::illegal_operation(
                    "arrayFilters are not supported by the MongoDB stand-in",
                ));
            }
            let upsert = spec.get("upsert").is_some_and(query::truthy);
            let multi = spec.get("multi").is_some_and(query::truthy);
            let stmt = i32::try_from(i).unwrap_or(i32::MAX);
            update_one_statement(
                state,
                db,
                coll,
                &UpdateSpec {
                    query: &q,
                    update: &u,
                    upsert,
                    multi,
                    sort: None,
                },
                Stmt { txn, id: stmt },
            )
        })();
        match result {
            Ok(outcome) => {
                if let Some(id) = outcome.upserted {
                    n += 1;
                    upserted
                        .push(doc! { "index": i32::try_from(i).unwrap_or(i32::MAX), "_id": id });
                } else {
                    n += outcome.matched;
                    modified += outcome.modified;
                }
            }
            Err(err) => {
                errors.push(write_error(i, &err));
                if ordered {
                    break;
                }
            }
        }
    }
    let mut reply = doc! { "n": n, "nModified": modified };
    if !upserted.is_empty() {
        reply.insert("upserted", upserted);
    }
    if !errors.is_empty() {
        reply.insert("writeErrors", errors);
    }
    Ok(reply)
}

/// Removes matching documents (all, or the first `limit: 1`), logging a `d` entry each.
fn delete_matching(
    state: &mut State,
    db: &str,
    coll: &str,
    query_doc: &Document,
    just_one: bool,
    sort: Option<&Document>,
    stmt: Stmt<'_>,
) -> Result<Vec<Document>, CommandError> {
    let Some(c) = state.store.collection(db, coll) else {
        return Ok(Vec::new());
    };
    let uuid = c.uuid;
    let mut victims = matching(c, query_doc)?;
    if let Some(sort) = sort {
        query::sort_docs(&mut victims, sort);
    }
    if just_one {
        victims.truncate(1);
    }
    let ns = format!("{db}.{coll}");
    for d in &victims {
        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
        if let Some(c) = state.store.collection_mut(db, coll) {
            if let Some(i) = c.position(&id) {
                c.remove(i);
            }
        }
        let op =
            Op::new("d", ns.clone(), Some(uuid), doc! { "_id": id }).images(Some(d.clone()), None);
        state.oplog.append(op, stmt.txn, stmt.id);
    }
    Ok(victims)
}

fn delete(
    state: &mut State,
    db: &str,
    command: &Document,
    txn: Option<&TxnContext>,
) -> Result<Document, CommandError> {
    let coll = str_arg(command, "delete")?;
    check_writable(db, coll)?;
    let deletes = command
        .get_array("deletes")
        .map_err(|_| CommandError::failed_to_parse("delete needs 'deletes'"))?;
    let mut n = 0;
    for (i, spec) in deletes.iter().enumerate() {
        let Bson::Document(spec) = spec else {
            return Err(CommandError::type_mismatch(
                "delete statement must be an object",
            ));
        };
        let q = doc_arg(spec, "q")?;
        let just_one = spec.get("limit").and_then(as_i64) == Some(1);
        let stmt = i32::try_from(i).unwrap_or(i32::MAX);
        n += delete_matching(state, db, coll, &q, just_one, None, Stmt { txn, id: stmt })?.len();
    }
    Ok(doc! { "n": i32::try_from(n).unwrap_or(i32::MAX) })
}

fn find_and_modify(
    state: &mut State,
    db: &str,
    command: &Document,
    txn: Option<&TxnContext>,
) -> Result<Document, CommandError> {
    let coll = command
        .get_str("findAndModify")
        .or_else(|_| command.get_str("findandmodify"))
        .map_err(|_| CommandError::type_mismatch("'findAndModify' must be a string"))?;
    check_writable(db, coll)?;
    let q = doc_arg(command, "query")?;
    let sort = doc_arg(command, "sort")?;
    let fields = doc_arg(command, "fields")?;
    let new = command.get("new").is_some_and(query::truthy);
    let sort = (!sort.is_empty()).then_some(&sort);
    if command.get("remove").is_some_and(query::truthy) {
        let removed = delete_matching(state, db, coll, &q, true, sort, Stmt { txn, id: 0 })?;
        let value = removed
            .into_iter()
            .next()
            .map_or(Bson::Null, |d| Bson::Document(query::project(d, &fields)));
        let n = i32::from(!matches!(value, Bson::Null));
        return Ok(doc! { "lastErrorObject": { "n": n }, "value": value, "ok": 1.0 });
    }
    let u = match command.get("update") {
        Some(Bson::Document(u)) => u.clone(),
        _ => {
            return Err(CommandError::failed_to_parse(
                "Either an update or remove=true must be specified",
            ))
        }
    };
    let upsert = command.get("upsert").is_some_and(query::truthy);
    let outcome = update_one_statement(
        state,
        db,
        coll,
        &UpdateSpec {
            query: &q,
            update: &u,
            upsert,
            multi: false,
            sort,
        },
        Stmt { txn, id: 0 },
    )?;
    let value = match (&outcome.images, new) {
        (Some((_, post)), true) => Bson::Document(query::project(post.clone(), &fields)),
        (Some((Some(pre), _)), false) => Bson::Document(query::project(pre.clone(), &fields)),
        _ => Bson::Null,
    };
    let mut last = doc! {
        "n": i32::from(outcome.images.is_some()),
        "updatedExisting": outcome.matched > 0,
    };
    if let Some(id) = outcome.upserted {
        last.insert("upserted", id);
    }
    Ok(doc! { "lastErrorObject": last, "value": value, "ok": 1.0 })
}

// ------------------------------------------------------------------------------------------
// reads

fn batch_size(command: &Document, default: usize) -> usize {
    usize_arg(command, "batchSize")
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(default)
}

fn find(state: &mut State, db: &str, command: &Document) -> Result<Document, CommandError> {
    let coll = str_arg(command, "find")?;
    let filter = doc_arg(command, "filter")?;
    let sort = doc_arg(command, "sort")?;
    let projection = doc_arg(command, "projection")?;
    let skip = usize_arg(command, "skip")
        .and_then(|s| usize::try_from(s).ok())
        .unwrap_or(0);
    let limit = usize_arg(command, "limit").unwrap_or(0);
    let mut single_batch = command.get("singleBatch").is_some_and(query::truthy) || limit < 0;
    let limit = usize::try_from(limit.unsigned_abs())
        .ok()
        .filter(|l| *l > 0);
    let tailable = command.get("tailable").is_some_and(query::truthy);
    let await_data = command.get("awaitData").is_some_and(query::truthy);
    let mut batch = batch_size(command, DEFAULT_BATCH_SIZE);
    if let Some(l) = limit {
        batch = batch.min(l);
        single_batch |= l <= batch;
    }
    if db == "local" && coll == "oplog.rs" {
        let newest_first = sort
            .get("$natural")
            .and_then(query::as_f64)
            .is_some_and(|d| d < 0.0);
        return cursors::find_oplog(
            state,
            filter,
            batch,
            limit,
            tailable,
            await_data,
            newest_first,
        );
    }
    if tailable {
        return Err(CommandError::bad_value(format!(
            "error processing query: ns={db}.{coll}: tailable cursor requested on non capped collection"
        )));
    }
    let mut docs = match state.store.collection(db, coll) {
        Some(c) => matching(c, &filter)?,
        None => Vec::new(),
    };
    if !sort.is_empty() {
        query::sort_docs(&mut docs, &sort);
    }
    let docs: VecDeque<Document> = docs
        .into_iter()
        .skip(skip)
        .take(limit.unwrap_or(usize::MAX))
        .map(|d| query::project(d, &projection))
        .collect();
    Ok(cursors::open_buffered(
        state,
        format!("{db}.{coll}"),
        docs,
        batch,
        single_batch,
    ))
}

fn count(state: &State, db: &str, command: &Document) -> Result<Document, CommandError> {
    let coll = str_arg(command, "count")?;
    let filter = doc_arg(command, "query")?;
    let mut n = 0;
    if let Some(c) = state.store.collection(db, coll) {
        for d in &c.docs {
            if query::matches(d, &filter)? {
                n += 1;
            }
        }
    }
    Ok(doc! { "n": n, "ok": 1.0 })
}

fn aggregate(state: &mut State, db: &str, command: &Document) -> Result<Document, CommandError> {
    let target = command.get("aggregate").cloned().unwrap_or(Bson::Null);
    let pipeline = command
        .get_array("pipeline")
        .map_err(|_| CommandError::type_mismatch("'pipeline' must be an array"))?;
    let cursor_opts = doc_arg(command, "cursor")?;
    let batch = batch_size(&cursor_opts, DEFAULT_BATCH_SIZE);
    if let Some(Bson::Document(first)) = pipeline.first() {
        if let Some(stage) = first.get("$changeStream") {
            let Bson::Document(stage) = stage else {
                return Err(CommandError::type_mismatch(
                    "$changeStream must be an object",
                ));
            };
            let stream = ChangeStream::open(db, &target, stage, &pipeline[1..], &state.oplog)
                .and_then(|s| cursors::open_change_stream(state, s, batch))
                .map_err(|mut e| {
                    if e.labels.is_empty() {
                        e.labels = change_stream_labels(e.code);
                    }
                    e
                })?;
            return Ok(stream);
        }
    }
    let Bson::String(coll) = target else {
        return Err(CommandError::illegal_operation(
            "aggregate: 1 is supported by the MongoDB stand-in only with $changeStream",
        ));
    };
    let mut docs: Vec<Document> = if db == "local" && coll == "oplog.rs" {
        state.oplog.iter().map(|e| e.doc.clone()).collect()
    } else {
        state
            .store
            .collection(db, &coll)
            .map(|c| c.docs.clone())
            .unwrap_or_default()
    };
    for stage in pipeline {
        let Bson::Document(stage) = stage else {
            return Err(CommandError::type_mismatch(
                "pipeline stages must be objects",
            ));
        };
        let (name, arg) = stage
            .iter()
            .next()
            .ok_or_else(|| CommandError::failed_to_parse("empty pipeline stage"))?;
        docs = match (name.as_str(), arg) {
            ("$match", Bson::Document(f)) => {
                let mut kept = Vec::new();
                for d in docs {
                    if query::matches(&d, f)? {
                        kept.push(d);
                    }
                }
                kept
            }
            ("$sort", Bson::Document(s)) => {
                query::sort_docs(&mut docs, s);
                docs
            }
            ("$skip", n) => docs
                .into_iter()
                .skip(as_i64(n).and_then(|n| usize::try_from(n).ok()).unwrap_or(0))
                .collect(),
            ("$limit", n) => docs
                .into_iter()
                .take(
                    as_i64(n)
                        .and_then(|n| usize::try_from(n).ok())
                        .unwrap_or(usize::MAX),
                )
                .collect(),
            ("$project", Bson::Document(p)) => {
                docs.into_iter().map(|d| query::project(d, p)).collect()
            }
            ("$count", Bson::String(field)) => {
                if docs.is_empty() {
                    Vec::new()
                } else {
                    vec![doc! { field: i32::try_from(docs.len()).unwrap_or(i32::MAX) }]
                }
            }
            ("$group", Bson::Document(g)) => group_count(&docs, g)?,
            (other, _) => {
                return Err(CommandError::illegal_operation(format!(
                    "pipeline stage {other} is not supported by the MongoDB stand-in"
                )))
            }
        };
    }
    Ok(cursors::open_buffered(
        state,
        format!("{db}.{coll}"),
        docs.into(),
        batch,
        false,
    ))
}

/// `$group` with a constant `_id` and `{$sum: <constant>}` accumulators (what
/// `countDocuments` sends).
fn group_count(docs: &[Document], spec: &Document) -> Result<Vec<Document>, CommandError> {
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = doc! { "_id": spec.get("_id").cloned().unwrap_or(Bson::Null) };
    for (field, acc) in spec.iter().filter(|(k, _)| *k != "_id") {
        let per_doc = match acc {
            Bson::Document(a) => a.get("$sum").and_then(as_i64),
            _ => None,
        }
        .ok_or_else(|| {
            CommandError::illegal_operation(
                "$group supports only {$sum: <constant>} on the MongoDB stand-in",
            )
        })?;
        let total = per_doc * i64::try_from(docs.len()).unwrap_or(i64::MAX);
        out.insert(
            field.clone(),
            i32::try_from(total).map_or(Bson::Int64(total), Bson::Int32),
        );
    }
    Ok(vec![out])
}

// ------------------------------------------------------------------------------------------
// catalog

fn list_databases(state: &State, command: &Document) -> Result<Document, CommandError> {
    let filter = doc_arg(command, "filter")?;
    let name_only = command.get("nameOnly").is_some_and(query::truthy);
    let mut names: Vec<String> = vec!["admin".into(), "config".into(), "local".into()];
    names.extend(state.store.dbs.keys().cloned());
    names.sort();
    names.dedup();
    let mut databases = Vec::new();
    for name in names {
        let size: usize = if name == "local" {
            state.oplog.len()
        } else {
            state
                .store
                .dbs
                .get(&name)
                .map_or(0, |colls| colls.values().map(|c| c.docs.len()).sum())
        };
        let size = i64::try_from(size * 1024).unwrap_or(i64::MAX);
        let entry = if name_only {
            doc! { "name": &name }
        } else {
            doc! { "name": &name, "sizeOnDisk": size, "empty": size == 0 }
        };
        if query::matches(&entry, &filter)? {
            databases.push(entry);
        }
    }
    Ok(doc! { "databases": databases, "totalSize": 0_i64, "totalSizeMb": 0_i64, "ok": 1.0 })
}

fn list_collections(
    state: &mut State,
    db: &str,
    command: &Document,
) -> Result<Document, CommandError> {
    let filter = doc_arg(command, "filter")?;
    let name_only = command.get("nameOnly").is_some_and(query::truthy);
    let id_index = doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" };
    let mut entries = Vec::new();
    if db == "local" {
        entries.push(doc! {
            "name": "oplog.rs",
            "type": "collection",
            "options": { "capped": true, "size": 1_073_741_824_i64 },
            "info": { "readOnly": false },
        });
    }
    if let Some(colls) = state.store.dbs.get(db) {
        for (name, c) in colls {
            entries.push(doc! {
                "name": name,
                "type": "collection",
                "options": {},
                "info": { "readOnly": false, "uuid": c.uuid },
                "idIndex": id_index.clone(),
            });
        }
    }
    let mut docs = VecDeque::new();
    for e in entries {
        if query::matches(&e, &filter)? {
            docs.push_back(if name_only {
                doc! { "name": e.get("name").cloned().unwrap_or(Bson::Null), "type": "collection" }
            } else {
                e
            });
        }
    }
    let batch = batch_size(&doc_arg(command, "cursor")?, usize::MAX);
    Ok(cursors::open_buffered(
        state,
        format!("{db}.$cmd.listCollections"),
        docs,
        batch,
        false,
    ))
}

fn create(state: &mut State, db: &str, command: &Document) -> Result<Document, CommandError> {
    let coll = str_arg(command, "create")?;
    check_writable(db, coll)?;
    if state.store.collection(db, coll).is_some() {
        return Err(CommandError::namespace_exists(format!(
            "Collection {db}.{coll} already exists."
        )));
    }
    let c = Collection::new();
    let uuid = c.uuid;
    state
        .store
        .dbs
        .entry(db.to_string())
        .or_default()
        .insert(coll.to_string(), c);
    let mut o = doc! { "create": coll };
    for (k, v) in command {
        if k != "create" && !GENERIC_ARGS.contains(&k.as_str()) {
            o.insert(k.clone(), v.clone());
        }
    }
    o.insert(
        "idIndex",
        doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
    );
    state
        .oplog
        .append(Op::new("c", format!("{db}.$cmd"), Some(uuid), o), None, 0);
    Ok(doc! { "ok": 1.0 })
}

/// Drops one collection and logs `{drop: c}` with `o2: {numRecords}`.
fn drop_one(state: &mut State, db: &str, coll: &str) -> Option<Collection> {
    let removed = state.store.dbs.get_mut(db)?.remove(coll)?;
    let records = i64::try_from(removed.docs.len()).unwrap_or(i64::MAX);
    state.oplog.append(
        Op::new(
            "c",
            format!("{db}.$cmd"),
            Some(removed.uuid),
            doc! { "drop": coll },
        )
        .o2(doc! { "numRecords": records }),
        None,
        0,
    );
    Some(removed)
}

fn drop_collection(
    state: &mut State,
    db: &str,
    command: &Document,
) -> Result<Document, CommandError> {
    let coll = str_arg(command, "drop")?;
    if db == "local" || db == "config" {
        return Err(CommandError::illegal_operation(format!(
            "cannot drop '{db}.{coll}' on the MongoDB stand-in"
        )));
    }
    // Since 7.0 dropping a missing collection succeeds.
    if drop_one(state, db, coll).is_some() {
        state.store.forget_if_empty(db);
    }
    Ok(doc! { "nIndexesWas": 1, "ns": format!("{db}.{coll}"), "ok": 1.0 })
}

fn drop_database(state: &mut State, db: &str) -> Result<Document, CommandError> {
    if matches!(db, "admin" | "config" | "local") {
        return Err(CommandError::illegal_operation(format!(
            "cannot drop the '{db}' database on the MongoDB stand-in"
        )));
    }
    let Some(colls) = state.store.dbs.get(db) else {
        return Ok(doc! { "ok": 1.0 });
    };
    let names: Vec<String> = colls.keys().cloned().collect();
    for name in names {
        drop_one(state, db, &name);
    }
    state.store.dbs.remove(db);
    state.oplog.append(
        Op::new("c", format!("{db}.$cmd"), None, doc! { "dropDatabase": 1 }),
        None,
        0,
    );
    Ok(doc! { "dropped": db, "ok": 1.0 })
}

fn rename_collection(
    state: &mut State,
    db: &str,
    command: &Document,
) -> Result<Document, CommandError> {
    if db != "admin" {
        return Err(CommandError::new(
            13,
            "renameCollection may only be run against the admin database.",
        ));
    }
    let from = str_arg(command, "renameCollection")?;
    let to = str_arg(command, "to")?;
    let drop_target = command.get("dropTarget").is_some_and(query::truthy);
    let split = |ns: &str| {
        ns.split_once('.')
            .map(|(d, c)| (d.to_string(), c.to_string()))
            .ok_or_else(|| {
                CommandError::invalid_namespace(format!("Invalid namespace specified '{ns}'"))
            })
    };
    let (from_db, from_coll) = split(from)?;
    let (to_db, to_coll) = split(to)?;
    check_writable(&from_db, &from_coll)?;
    check_writable(&to_db, &to_coll)?;
    if from_db != to_db {
        return Err(CommandError::illegal_operation(
            "renameCollection across databases is not supported by the MongoDB stand-in",
        ));
    }
    if state.store.collection(&from_db, &from_coll).is_none() {
        return Err(CommandError::namespace_not_found(
            "Source collection does not exist",
        ));
    }
    let mut o = doc! { "renameCollection": from, "to": to, "stayTemp": false };
    if let Some(target) = state.store.collection(&to_db, &to_coll) {
        if !drop_target {
            return Err(CommandError::namespace_exists("target namespace exists"));
        }
        o.insert("dropTarget", target.uuid);
    }
    let colls = state.store.dbs.entry(from_db.clone()).or_default();
    colls.remove(&to_coll);
    let Some(c) = colls.remove(&from_coll) else {
        return Err(CommandError::namespace_not_found(
            "Source collection does not exist",
        ));
    };
    let uuid = c.uuid;
    colls.insert(to_coll, c);
    state.oplog.append(
        Op::new("c", format!("{from_db}.$cmd"), Some(uuid), o),
        None,
        0,
    );
    Ok(doc! { "ok": 1.0 })
}

// ------------------------------------------------------------------------------------------
// test hooks

/// `{standinTruncateOplog: 1, keepLast: N}`: drops all but the newest N oplog entries.
fn truncate_oplog(state: &mut State, command: &Document) -> Result<Document, CommandError> {
    let keep = command
        .get("keepLast")
        .and_then(as_i64)
        .and_then(|k| usize::try_from(k).ok())
        .ok_or_else(|| {
            CommandError::bad_value("standinTruncateOplog needs keepLast: <non-negative int>")
        })?;
    let dropped = state.oplog.truncate_keep_last(keep);
    let mut reply = doc! { "dropped": i64::try_from(dropped).unwrap_or(i64::MAX) };
    if let Some(first) = state.oplog.first_ts() {
        reply.insert("oldest", first);
    }
    if let Some(t) = state.oplog.truncated_through() {
        reply.insert("truncatedThrough", t);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

/// `{standinFailNext: {command, code, [errmsg], [errorLabels]}}`: the next such command fails.
fn fail_next(state: &mut State, command: &Document) -> Result<Document, CommandError> {
    let spec = command
        .get_document("standinFailNext")
        .map_err(|_| CommandError::bad_value("standinFailNext needs {command, code}"))?;
    let target = str_arg(spec, "command")?.to_string();
    let code = spec
        .get("code")
        .and_then(as_i64)
        .and_then(|c| i32::try_from(c).ok())
        .ok_or_else(|| CommandError::bad_value("standinFailNext needs code: <int>"))?;
    let message = spec
        .get_str("errmsg")
        .unwrap_or("failure injected by standinFailNext")
        .to_string();
    let mut error = CommandError::new(code, message);
    error.labels = match spec.get_array("errorLabels") {
        Ok(labels) => labels
            .iter()
            .filter_map(|l| l.as_str().map(str::to_string))
            .collect(),
        Err(_) if matches!(target.as_str(), "getMore" | "aggregate") => change_stream_labels(code),
        Err(_) => Vec::new(),
    };
    state.fail_points.push(FailPoint {
        command: target,
        error,
    });
    Ok(doc! { "ok": 1.0 })
}
