//! Change events and oplog entries, decoded into one shape.
//!
//! Both modes of the source end here: a change-stream event (MongoDB's
//! `$changeStream` output) and a raw oplog entry (`local.oplog.rs`) become
//! the same [`Change`], so everything after this file is mode-blind. Shapes
//! follow MongoDB's reference formats (see `standins/mongo/fixtures`):
//! updates in the `$v: 2` diff form of 5.0+ and the classic `$set`/`$unset`
//! form, replacements, deletes by `_id`, commands (drop, rename,
//! dropDatabase), `applyOps` transactions (committed ones unwound in order;
//! `partialTxn` chains and prepared transactions held until their commit),
//! and no-ops, which only move the position.
//!
//! Nothing here panics on what the server sent: a shape that cannot be read
//! is an `Err` naming the field.

use std::collections::HashMap;

use bson::{Bson, Document, Timestamp};

/// What happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Insert,
    /// A partial update: which paths were set or removed.
    Update(UpdateDesc),
    /// The whole document replaced.
    Replace,
    Delete,
    /// The collection was dropped.
    Drop,
    /// The collection was renamed to `to` (`db.coll`).
    Rename {
        to: String,
    },
    /// The whole database was dropped.
    DropDatabase,
    /// A change stream ended (drop, rename or dropDatabase of what it watched).
    Invalidate,
    /// Nothing for us: a no-op, an index build, a command on another collection.
    Noop,
}

/// The paths an update set and removed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpdateDesc {
    /// Dotted path -> new value.
    pub updated: Document,
    pub removed: Vec<String>,
    /// (array path, new length).
    pub truncated: Vec<(String, u32)>,
}

impl UpdateDesc {
    /// Every changed path, set ones first.
    pub fn paths(&self) -> Vec<String> {
        let mut p: Vec<String> = self.updated.keys().cloned().collect();
        p.extend(self.removed.iter().cloned());
        for (path, _) in &self.truncated {
            if !p.contains(path) {
                p.push(path.clone());
            }
        }
        p
    }
}

/// One decoded change.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub kind: Kind,
    pub db: String,
    /// Empty for database-wide events.
    pub coll: String,
    /// The document's `_id` (inserts, updates, replaces, deletes).
    pub id: Option<Bson>,
    /// The document after the change, when known (insert, replace, an
    /// update with its looked-up or post-image document).
    pub full: Option<Document>,
    /// Cluster time of the change (transactions share one).
    pub ts: Timestamp,
    /// Position inside an `applyOps` entry (0 otherwise).
    pub index: u32,
    /// Wall-clock time of the change, milliseconds since the epoch.
    pub wall_ms: Option<i64>,
    /// Change streams: the event's resume token.
    pub token: Option<Document>,
}

impl Change {
    /// `db.coll`.
    pub fn ns(&self) -> String {
        format!("{}.{}", self.db, self.coll)
    }
}

fn field<'a>(doc: &'a Document, key: &str, what: &str) -> Result<&'a Bson, String> {
    doc.get(key)
        .ok_or_else(|| format!("{what} has no `{key}` field"))
}

fn doc_field<'a>(doc: &'a Document, key: &str, what: &str) -> Result<&'a Document, String> {
    match field(doc, key, what)? {
        Bson::Document(d) => Ok(d),
        _ => Err(format!("{what}: `{key}` is not a document")),
    }
}

fn str_field<'a>(doc: &'a Document, key: &str, what: &str) -> Result<&'a str, String> {
    match field(doc, key, what)? {
        Bson::String(s) => Ok(s),
        _ => Err(format!("{what}: `{key}` is not a string")),
    }
}

fn ts_field(doc: &Document, key: &str, what: &str) -> Result<Timestamp, String> {
    match field(doc, key, what)? {
        Bson::Timestamp(t) => Ok(*t),
        _ => Err(format!("{what}: `{key}` is not a timestamp")),
    }
}

fn wall(doc: &Document, key: &str) -> Option<i64> {
    match doc.get(key) {
        Some(Bson::DateTime(d)) => Some(d.timestamp_millis()),
        _ => None,
    }
}

fn split_ns(ns: &str) -> (String, String) {
    match ns.split_once('.') {
        Some((db, coll)) => (db.to_string(), coll.to_string()),
        None => (ns.to_string(), String::new()),
    }
}

/// A change-stream event (`$changeStream` output) as a [`Change`].
pub fn from_change_event(ev: &Document) -> Result<Change, String> {
    const WHAT: &str = "change event";
    let token = doc_field(ev, "_id", WHAT)?.clone();
    let op = str_field(ev, "operationType", WHAT)?;
    let ts = ts_field(ev, "clusterTime", WHAT)?;
    let (db, coll) = match ev.get("ns") {
        Some(Bson::Document(ns)) => (
            ns.get_str("db").unwrap_or_default().to_string(),
            ns.get_str("coll").unwrap_or_default().to_string(),
        ),
        _ => (String::new(), String::new()),
    };
    let id = match ev.get("documentKey") {
        Some(Bson::Document(k)) => k.get("_id").cloned(),
        _ => None,
    };
    let full = match ev.get("fullDocument") {
        Some(Bson::Document(d)) => Some(d.clone()),
        _ => None,
    };
    let kind = match op {
        "insert" => Kind::Insert,
        "replace" => Kind::Replace,
        "delete" => Kind::Delete,
        "update" => {
            let d = doc_field(ev, "updateDescription", WHAT)?;
            let mut desc = UpdateDesc::default();
            if let Ok(u) = d.get_document("updatedFields") {
                desc.updated = u.clone();
            }
            if let Ok(r) = d.get_array("removedFields") {
                desc.removed = r
                    .iter()
                    .filter_map(|b| b.as_str().map(str::to_string))
                    .collect();
            }
            if let Ok(t) = d.get_array("truncatedArrays") {
                for entry in t {
                    if let Bson::Document(e) = entry {
                        let f = e.get_str("field").unwrap_or_default().to_string();
                        let n = match e.get("newSize") {
                            Some(Bson::Int32(n)) => u32::try_from(*n).unwrap_or(0),
                            Some(Bson::Int64(n)) => u32::try_from(*n).unwrap_or(0),
                            _ => 0,
                        };
                        desc.truncated.push((f, n));
                    }
                }
            }
            Kind::Update(desc)
        }
        "drop" => Kind::Drop,
        "rename" => {
            let to = doc_field(ev, "to", WHAT)?;
            Kind::Rename {
                to: format!(
                    "{}.{}",
                    to.get_str("db").unwrap_or_default(),
                    to.get_str("coll").unwrap_or_default()
                ),
            }
        }
        "dropDatabase" => Kind::DropDatabase,
        "invalidate" => Kind::Invalidate,
        // create, createIndexes, modify, ...: nothing to publish.
        _ => Kind::Noop,
    };
    if matches!(
        kind,
        Kind::Insert | Kind::Update(_) | Kind::Replace | Kind::Delete
    ) && id.is_none()
    {
        return Err(format!("{op} event has no `documentKey._id`"));
    }
    Ok(Change {
        kind,
        db,
        coll,
        id,
        full,
        ts,
        index: 0,
        wall_ms: wall(ev, "wallTime"),
        token: Some(token),
    })
}

/// Decodes a `$v: 2` update diff (or a classic `$set`/`$unset` update).
pub fn update_desc(o: &Document) -> Result<UpdateDesc, String> {
    let mut desc = UpdateDesc::default();
    if let Ok(diff) = o.get_document("diff") {
        walk_diff(diff, "", &mut desc)?;
        return Ok(desc);
    }
    if let Ok(set) = o.get_document("$set") {
        for (k, v) in set {
            desc.updated.insert(k.clone(), v.clone());
        }
    }
    if let Ok(unset) = o.get_document("$unset") {
        desc.removed.extend(unset.keys().cloned());
    }
    Ok(desc)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk_diff(diff: &Document, prefix: &str, out: &mut UpdateDesc) -> Result<(), String> {
    let is_array = matches!(diff.get("a"), Some(Bson::Boolean(true)));
    for (key, v) in diff {
        match key.as_str() {
            "a" => {}
            "l" if is_array => {
                let n = match v {
                    Bson::Int32(n) => u32::try_from(*n).unwrap_or(0),
                    Bson::Int64(n) => u32::try_from(*n).unwrap_or(0),
                    _ => return Err(format!("array diff at `{prefix}`: `l` is not a number")),
                };
                out.truncated.push((prefix.to_string(), n));
            }
            "d" => {
                let Bson::Document(d) = v else {
                    return Err(format!("diff at `{prefix}`: `d` is not a document"));
                };
                out.removed.extend(d.keys().map(|k| join(prefix, k)));
            }
            "u" | "i" | "b" => {
                let Bson::Document(d) = v else {
                    return Err(format!("diff at `{prefix}`: `{key}` is not a document"));
                };
                for (k, val) in d {
                    out.updated.insert(join(prefix, k), val.clone());
                }
            }
            k if is_array && k.starts_with('u') => {
                out.updated.insert(join(prefix, &k[1..]), v.clone());
            }
            k if k.starts_with('s') && k.len() > 1 => {
                let Bson::Document(sub) = v else {
                    return Err(format!("diff at `{prefix}`: `{k}` is not a document"));
                };
                walk_diff(sub, &join(prefix, &k[1..]), out)?;
            }
            other => {
                return Err(format!(
                    "diff at `{}`: unknown section `{other}`",
                    if prefix.is_empty() { "(top)" } else { prefix }
                ))
            }
        }
    }
    Ok(())
}

/// Reads raw oplog entries into changes, holding transaction parts until
/// their commit.
#[derive(Debug, Default)]
pub struct OplogDecoder {
    /// Ops of `partialTxn` chains and prepared transactions, by session and
    /// transaction number.
    open: HashMap<String, Vec<(Document, Timestamp, Option<i64>)>>,
}

/// The key of a transaction: its session id and number, as text.
fn txn_key(entry: &Document) -> Option<String> {
    let lsid = entry.get("lsid")?;
    let n = entry.get("txnNumber")?;
    Some(format!("{lsid}/{n}"))
}

impl OplogDecoder {
    /// Whether a transaction is held open (its position must not be
    /// acknowledged past its first entry).
    pub fn has_open_transactions(&self) -> bool {
        !self.open.is_empty()
    }

    /// The oldest time of an open transaction, if any.
    pub fn oldest_open(&self) -> Option<Timestamp> {
        self.open
            .values()
            .filter_map(|ops| ops.first().map(|(_, ts, _)| *ts))
            .min()
    }

    /// One oplog entry: zero or more changes, in order.
    pub fn decode(&mut self, entry: &Document) -> Result<Vec<Change>, String> {
        const WHAT: &str = "oplog entry";
        let op = str_field(entry, "op", WHAT)?;
        let ts = ts_field(entry, "ts", WHAT)?;
        let wall_ms = wall(entry, "wall");
        let ns = entry.get_str("ns").unwrap_or_default();
        if matches!(entry.get("fromMigrate"), Some(Bson::Boolean(true))) {
            return Ok(vec![noop(ts, wall_ms)]);
        }
        if op == "c" {
            let o = doc_field(entry, "o", WHAT)?;
            if let Ok(ops) = o.get_array("applyOps") {
                let ops: Vec<Document> = ops
                    .iter()
                    .filter_map(|b| b.as_document().cloned())
                    .collect();
                let partial = matches!(o.get("partialTxn"), Some(Bson::Boolean(true)));
                let prepare = matches!(o.get("prepare"), Some(Bson::Boolean(true)));
                return match txn_key(entry) {
                    Some(key) if partial || prepare => {
                        let held = self.open.entry(key).or_default();
                        held.extend(ops.into_iter().map(|d| (d, ts, wall_ms)));
                        Ok(vec![noop(ts, wall_ms)])
                    }
                    Some(key) => {
                        // The last entry of a chain (or a whole small transaction).
                        let mut all = self.open.remove(&key).unwrap_or_default();
                        all.extend(ops.into_iter().map(|d| (d, ts, wall_ms)));
                        unwind(all, ts, wall_ms)
                    }
                    // Batched writes log applyOps without a session: real data.
                    None => unwind(
                        ops.into_iter().map(|d| (d, ts, wall_ms)).collect(),
                        ts,
                        wall_ms,
                    ),
                };
            }
            if o.contains_key("commitTransaction") {
                return match txn_key(entry).and_then(|k| self.open.remove(&k)) {
                    Some(held) => unwind(held, ts, wall_ms),
                    None => Ok(vec![noop(ts, wall_ms)]),
                };
            }
            if o.contains_key("abortTransaction") {
                if let Some(k) = txn_key(entry) {
                    self.open.remove(&k);
                }
                return Ok(vec![noop(ts, wall_ms)]);
            }
            return Ok(vec![command(ns, o, ts, wall_ms)]);
        }
        Ok(vec![crud(entry, ns, ts, 0, wall_ms)?])
    }
}

fn noop(ts: Timestamp, wall_ms: Option<i64>) -> Change {
    Change {
        kind: Kind::Noop,
        db: String::new(),
        coll: String::new(),
        id: None,
        full: None,
        ts,
        index: 0,
        wall_ms,
        token: None,
    }
}

/// The ops of a committed transaction, at the commit's time, in order.
fn unwind(
    ops: Vec<(Document, Timestamp, Option<i64>)>,
    ts: Timestamp,
    wall_ms: Option<i64>,
) -> Result<Vec<Change>, String> {
    let mut out = Vec::with_capacity(ops.len());
    for (i, (op, _, _)) in ops.iter().enumerate() {
        let ns = op.get_str("ns").unwrap_or_default();
        let kind = op.get_str("op").unwrap_or_default();
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        if kind == "c" {
            let o = doc_field(op, "o", "applyOps entry")?;
            let mut c = command(ns, o, ts, wall_ms);
            c.index = index;
            out.push(c);
        } else {
            out.push(crud(op, ns, ts, index, wall_ms)?);
        }
    }
    Ok(out)
}

fn command(ns: &str, o: &Document, ts: Timestamp, wall_ms: Option<i64>) -> Change {
    let (db, _) = split_ns(ns);
    let mut c = noop(ts, wall_ms);
    c.db.clone_from(&db);
    if let Ok(coll) = o.get_str("drop") {
        c.kind = Kind::Drop;
        c.coll = coll.to_string();
    } else if let Ok(from) = o.get_str("renameCollection") {
        let (fdb, fcoll) = split_ns(from);
        c.db = fdb;
        c.coll = fcoll;
        c.kind = Kind::Rename {
            to: o.get_str("to").unwrap_or_default().to_string(),
        };
    } else if o.contains_key("dropDatabase") {
        c.kind = Kind::DropDatabase;
    }
    c
}

fn crud(
    entry: &Document,
    ns: &str,
    ts: Timestamp,
    index: u32,
    wall_ms: Option<i64>,
) -> Result<Change, String> {
    const WHAT: &str = "oplog entry";
    let op = str_field(entry, "op", WHAT)?;
    let (db, coll) = split_ns(ns);
    let mut c = noop(ts, wall_ms);
    c.index = index;
    if op == "n" {
        return Ok(c);
    }
    c.db = db;
    c.coll = coll;
    let o = doc_field(entry, "o", WHAT)?;
    match op {
        "i" => {
            c.kind = Kind::Insert;
            c.id = Some(field(o, "_id", "insert's `o`")?.clone());
            c.full = Some(o.clone());
        }
        "d" => {
            c.kind = Kind::Delete;
            c.id = Some(field(o, "_id", "delete's `o`")?.clone());
        }
        "u" => {
            let o2 = doc_field(entry, "o2", WHAT)?;
            c.id = Some(field(o2, "_id", "update's `o2`")?.clone());
            let is_modifier = o.contains_key("$v")
                || o.keys().any(|k| k.starts_with('$'))
                || o.contains_key("diff");
            if is_modifier {
                c.kind = Kind::Update(update_desc(o)?);
            } else {
                c.kind = Kind::Replace;
                c.full = Some(o.clone());
            }
        }
        other => return Err(format!("oplog entry has an unknown op `{other}`")),
    }
    Ok(c)
}

/// The cluster time a change stream's resume token starts with (byte 0 is
/// 0x82, then 8 bytes big-endian), as third-party CDC tools read it.
pub fn token_time(token: &Document) -> Option<Timestamp> {
    let data = token.get_str("_data").ok()?;
    if data.len() < 18 || !data[..2].eq_ignore_ascii_case("82") {
        return None;
    }
    let v = u64::from_str_radix(data.get(2..18)?, 16).ok()?;
    Some(Timestamp {
        time: u32::try_from(v >> 32).ok()?,
        increment: u32::try_from(v & 0xffff_ffff).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn fixture(path: &str) -> Document {
        let p = format!(
            "{}/standins/mongo/fixtures/{path}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        match Bson::try_from(json).unwrap() {
            Bson::Document(d) => d,
            other => panic!("{p}: not a document: {other:?}"),
        }
    }

    fn ts(t: u32, i: u32) -> Timestamp {
        Timestamp {
            time: t,
            increment: i,
        }
    }

    #[test]
    fn change_event_fixtures_decode() {
        let c = from_change_event(&fixture("events/insert")).unwrap();
        assert_eq!(c.kind, Kind::Insert);
        assert_eq!((c.db.as_str(), c.coll.as_str()), ("test", "c"));
        assert_eq!(c.id, Some(Bson::Int32(1)));
        assert!(c.full.is_some() && c.token.is_some());
        assert_eq!(c.ts, ts(1_690_827_246, 3));
        assert_eq!(c.wall_ms, Some(1_690_827_246_123));

        let c = from_change_event(&fixture("events/update_lookup")).unwrap();
        let Kind::Update(d) = &c.kind else {
            panic!("not an update")
        };
        assert_eq!(d.paths(), ["x", "y"]);
        assert_eq!(c.full.as_ref().unwrap().get_str("x").unwrap(), "C");

        assert_eq!(
            from_change_event(&fixture("events/replace")).unwrap().kind,
            Kind::Replace
        );
        assert_eq!(
            from_change_event(&fixture("events/delete")).unwrap().kind,
            Kind::Delete
        );
        assert_eq!(
            from_change_event(&fixture("events/drop")).unwrap().kind,
            Kind::Drop
        );
        assert_eq!(
            from_change_event(&fixture("events/rename")).unwrap().kind,
            Kind::Rename {
                to: "test.c3".into()
            }
        );
        assert_eq!(
            from_change_event(&fixture("events/drop_database"))
                .unwrap()
                .kind,
            Kind::DropDatabase
        );
        assert_eq!(
            from_change_event(&fixture("events/invalidate"))
                .unwrap()
                .kind,
            Kind::Invalidate
        );
    }

    #[test]
    fn oplog_fixtures_decode() {
        let mut d = OplogDecoder::default();
        let one = |d: &mut OplogDecoder, name: &str| {
            let mut v = d.decode(&fixture(&format!("oplog/{name}"))).unwrap();
            assert_eq!(v.len(), 1, "{name}");
            v.remove(0)
        };
        let c = one(&mut d, "insert");
        assert_eq!((c.kind.clone(), c.ns()), (Kind::Insert, "test.c".into()));
        assert_eq!(c.id, Some(Bson::Int32(1)));
        let c = one(&mut d, "insert_retryable");
        assert_eq!(c.kind, Kind::Insert);
        let c = one(&mut d, "update_v2_diff");
        let Kind::Update(u) = &c.kind else {
            panic!("not an update")
        };
        assert_eq!(u.updated, doc! {"x": "C", "y": 1});
        assert_eq!(one(&mut d, "replace").kind, Kind::Replace);
        assert_eq!(one(&mut d, "delete").kind, Kind::Delete);
        let c = one(&mut d, "drop");
        assert_eq!((c.kind.clone(), c.coll.as_str()), (Kind::Drop, "c3"));
        assert!(matches!(one(&mut d, "rename").kind, Kind::Rename { .. }));
        assert_eq!(one(&mut d, "drop_database").kind, Kind::DropDatabase);
        assert_eq!(one(&mut d, "create").kind, Kind::Noop);
    }

    #[test]
    fn diffs_give_dotted_paths() {
        // The documented example: updatedFields {n, arr.1, sub.k}, removed
        // [old], truncated arr to 2.
        let o = doc! {"$v": 2, "diff": {
            "d": {"old": false}, "u": {"n": 5},
            "sarr": {"a": true, "l": 2, "u1": "x"},
            "ssub": {"i": {"k": 1}},
        }};
        let d = update_desc(&o).unwrap();
        assert_eq!(d.updated, doc! {"n": 5, "arr.1": "x", "sub.k": 1});
        assert_eq!(d.removed, ["old"]);
        assert_eq!(d.truncated, [("arr".to_string(), 2)]);
        // Arrays inside arrays of documents.
        let o = doc! {"$v": 2, "diff": {"sitems": {"a": true, "s0": {"u": {"qty": 3}}}}};
        assert_eq!(update_desc(&o).unwrap().updated, doc! {"items.0.qty": 3});
        // The classic form.
        let o = doc! {"$v": 1, "$set": {"a.b": 1}, "$unset": {"c": true}};
        let d = update_desc(&o).unwrap();
        assert_eq!(d.updated, doc! {"a.b": 1});
        assert_eq!(d.removed, ["c"]);
        // Unknown sections are errors, not guesses.
        assert!(update_desc(&doc! {"$v": 2, "diff": {"zz": 1}}).is_err());
    }

    #[test]
    fn transactions_unwind_at_commit_and_aborts_vanish() {
        let mut d = OplogDecoder::default();
        let lsid = doc! {"id": "s1"};
        let op = |i: i32| doc! {"op": "i", "ns": "shop.users", "o": {"_id": i}};
        let part = doc! {"op": "c", "ns": "admin.$cmd", "ts": ts(10, 1), "lsid": lsid.clone(), "txnNumber": 1_i64,
        "o": {"applyOps": [op(1), op(2)], "partialTxn": true}};
        let last = doc! {"op": "c", "ns": "admin.$cmd", "ts": ts(10, 2), "lsid": lsid.clone(), "txnNumber": 1_i64,
        "o": {"applyOps": [op(3)]}};
        assert_eq!(d.decode(&part).unwrap()[0].kind, Kind::Noop);
        assert!(d.has_open_transactions());
        assert_eq!(d.oldest_open(), Some(ts(10, 1)));
        let out = d.decode(&last).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out
            .iter()
            .all(|c| c.ts == ts(10, 2) && c.kind == Kind::Insert));
        assert_eq!(out.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(!d.has_open_transactions());
        // Prepared, then aborted: nothing.
        let prep = doc! {"op": "c", "ns": "admin.$cmd", "ts": ts(11, 1), "lsid": lsid.clone(), "txnNumber": 2_i64,
        "o": {"applyOps": [op(4)], "prepare": true}};
        let abort = doc! {"op": "c", "ns": "admin.$cmd", "ts": ts(11, 2), "lsid": lsid, "txnNumber": 2_i64,
        "o": {"abortTransaction": 1}};
        d.decode(&prep).unwrap();
        assert_eq!(d.decode(&abort).unwrap()[0].kind, Kind::Noop);
        assert!(!d.has_open_transactions());
    }

    #[test]
    fn tokens_carry_their_cluster_time() {
        let t = doc! {"_data": "8264C7F9EE000000032B022C0100296E5A1004"};
        assert_eq!(token_time(&t), Some(ts(1_690_827_246, 3)));
        assert_eq!(token_time(&doc! {"_data": "zz"}), None);
        assert_eq!(token_time(&doc! {}), None);
    }

    /// A random value built from the keys these decoders look at, nested
    /// a few levels, of every BSON type.
    fn random_bson(rng: &mut impl rand::Rng, depth: u32) -> Bson {
        const KEYS: [&str; 24] = [
            "op",
            "ts",
            "o",
            "o2",
            "ns",
            "_id",
            "applyOps",
            "partialTxn",
            "prepare",
            "lsid",
            "txnNumber",
            "diff",
            "$v",
            "$set",
            "$unset",
            "u",
            "i",
            "d",
            "a",
            "l",
            "sx",
            "u0",
            "operationType",
            "clusterTime",
        ];
        let pick = if depth == 0 {
            8
        } else {
            rng.random_range(0..if depth > 3 { 8 } else { 11 })
        };
        match pick {
            0 => Bson::Null,
            1 => Bson::Int32(rng.random_range(-3..300)),
            2 => Bson::Int64(rng.random()),
            3 => Bson::Boolean(rng.random()),
            4 => Bson::String(
                [
                    "i",
                    "u",
                    "d",
                    "c",
                    "n",
                    "x",
                    "db.c",
                    "admin.$cmd",
                    "",
                    "insert",
                    "update",
                ][rng.random_range(0..11)]
                .to_string(),
            ),
            5 => Bson::Timestamp(Timestamp {
                time: rng.random(),
                increment: rng.random(),
            }),
            6 => Bson::Double(rng.random()),
            7 => Bson::Binary(bson::Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: vec![1, 2, 3],
            }),
            8 | 9 => {
                let mut d = Document::new();
                for _ in 0..rng.random_range(0..6) {
                    d.insert(
                        KEYS[rng.random_range(0..KEYS.len())],
                        random_bson(rng, depth + 1),
                    );
                }
                Bson::Document(d)
            }
            _ => Bson::Array(
                (0..rng.random_range(0..4))
                    .map(|_| random_bson(rng, depth + 1))
                    .collect(),
            ),
        }
    }

    #[test]
    fn random_documents_never_panic_the_decoders() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(20_261_122);
        let table = super::super::convert::declared_table(
            "db",
            "c",
            &serde_yaml::from_str(
                "_id: object_id\na: { type: document, fields: { b: int } }\nl: { type: array, items: string }\nj: json\n",
            )
            .unwrap(),
        )
        .unwrap();
        let mut decoder = OplogDecoder::default();
        let mut tried = 0;
        for _ in 0..20_000 {
            let Bson::Document(d) = random_bson(&mut rng, 0) else {
                continue;
            };
            tried += 1;
            let _ = decoder.decode(&d);
            let _ = from_change_event(&d);
            let _ = update_desc(&d);
            let _ = token_time(&d);
            let _ = super::super::convert::row(&table, &d, super::super::convert::Fit::Whole);
        }
        assert_eq!(tried, 20_000);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = OplogDecoder::default();
        for bad in [
            doc! {},
            doc! {"op": 1},
            doc! {"op": "i", "ts": ts(1, 1)},
            doc! {"op": "i", "ts": ts(1, 1), "o": {}},
            doc! {"op": "u", "ts": ts(1, 1), "o": {"$v": 2, "diff": {"u": 3}}, "o2": {"_id": 1}},
            doc! {"op": "q", "ts": ts(1, 1), "o": {"_id": 1}},
            doc! {"op": "c", "ts": ts(1, 1)},
        ] {
            assert!(d.decode(&bad).is_err(), "{bad}");
        }
        for bad in [
            doc! {},
            doc! {"_id": {}, "operationType": "insert", "clusterTime": ts(1, 1)},
            doc! {"_id": {}, "operationType": "update", "clusterTime": ts(1, 1), "documentKey": {"_id": 1}},
            doc! {"_id": 1, "operationType": "insert"},
        ] {
            assert!(from_change_event(&bad).is_err(), "{bad}");
        }
    }
}
