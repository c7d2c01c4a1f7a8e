//! `local.oplog.rs`: a capped, in-memory list of entries in mongod's own format.
//!
//! Every write appends one entry (shapes from MONGO-FORMATS.md §3):
//!
//! ```text
//! {op:"i", ns:"db.c", ui:UUID, o:{doc}, o2:{_id}, ts, t:Long(1), v:Long(2), wall:Date}
//! {op:"u", ns, ui, o:{$v:2, diff:{d:{..}, u:{..}, i:{..}, s<f>:{..}}}, o2:{_id}, ts, t, v, wall}
//! {op:"u", ns, ui, o:{full replacement}, o2:{_id}, ...}
//! {op:"d", ns, ui, o:{_id}, ...}
//! {op:"c", ns:"db.$cmd", ui, o:{create|drop|renameCollection|dropDatabase ...}, [o2], ...}
//! {op:"n", ns:"", o:{msg:"initiating set"}, ...}
//! ```
//!
//! Retryable writes add `lsid, txnNumber, stmtId, prevOpTime` as mongod does. Timestamps are
//! `(unix seconds, counter)`, strictly increasing. With `--oplog-max-entries` the oldest
//! entries are dropped; `truncated_through` remembers the newest dropped timestamp so readers
//! can tell that history they ask for is gone (CappedPositionLost, ChangeStreamHistoryLost).
//!
//! Each entry also keeps, outside the logged document, the pre- and post-image of the document
//! it changed: change streams use them for `fullDocument: whenAvailable|required` and
//! `fullDocumentBeforeChange` (mongod keeps those in `config.system.preimages` only when the
//! collection enables `changeStreamPreAndPostImages`; the stand-in always has them).

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use bson::{doc, spec::BinarySubtype, Binary, Bson, DateTime, Document, Timestamp, Uuid};
use tokio::sync::watch;

/// The replica set term; the stand-in never holds an election.
pub const TERM: i64 = 1;

/// SHA-256 of the empty user name: the `lsid.uid` mongod logs when auth is off.
const EMPTY_USER_DIGEST: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// One oplog entry plus the images change streams may need.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ts: Timestamp,
    pub doc: Document,
    /// The document before the change (updates, replaces, deletes).
    pub pre_image: Option<Document>,
    /// The document after the change (inserts, updates, replaces).
    pub post_image: Option<Document>,
    /// An `applyOps` entry of a transaction: the images of each inner op.
    pub op_images: Vec<(Option<Document>, Option<Document>)>,
}

/// What a write wants logged; the oplog adds ts, t, v, wall and the session fields.
#[derive(Debug, Clone)]
pub struct Op {
    pub op: &'static str,
    pub ns: String,
    pub ui: Option<Uuid>,
    pub o: Document,
    pub o2: Option<Document>,
    pub pre_image: Option<Document>,
    pub post_image: Option<Document>,
}

impl Op {
    pub fn new(op: &'static str, ns: impl Into<String>, ui: Option<Uuid>, o: Document) -> Self {
        Self {
            op,
            ns: ns.into(),
            ui,
            o,
            o2: None,
            pre_image: None,
            post_image: None,
        }
    }

    pub fn o2(mut self, o2: Document) -> Self {
        self.o2 = Some(o2);
        self
    }

    pub fn images(mut self, pre: Option<Document>, post: Option<Document>) -> Self {
        self.pre_image = pre;
        self.post_image = post;
        self
    }
}

/// A retryable write's session: logged as `lsid`, `txnNumber`, `stmtId`, `prevOpTime`.
#[derive(Debug, Clone)]
pub struct TxnContext {
    pub lsid_id: Uuid,
    pub txn_number: i64,
}

pub struct Oplog {
    entries: VecDeque<Entry>,
    max_entries: Option<usize>,
    truncated_through: Option<Timestamp>,
    last_ts: Timestamp,
    /// Last optime written per (session, txnNumber), for `prevOpTime`.
    chains: HashMap<Uuid, (i64, Timestamp)>,
    notify: watch::Sender<Timestamp>,
    /// While a transaction commits: the ops its writes log, held back to
    /// be written as `applyOps` entries.
    capture: Option<Vec<Op>>,
}

impl Oplog {
    /// A new oplog holding mongod's first entry, the `initiating set` noop.
    pub fn new(max_entries: Option<usize>) -> Self {
        let (notify, _) = watch::channel(Timestamp {
            time: 0,
            increment: 0,
        });
        let mut oplog = Self {
            entries: VecDeque::new(),
            max_entries: max_entries.map(|m| m.max(1)),
            truncated_through: None,
            last_ts: Timestamp {
                time: 0,
                increment: 0,
            },
            chains: HashMap::new(),
            notify,
            capture: None,
        };
        oplog.append(
            Op::new("n", "", None, doc! { "msg": "initiating set" }),
            None,
            0,
        );
        oplog
    }

    /// A receiver that changes whenever an entry is appended.
    pub fn subscribe(&self) -> watch::Receiver<Timestamp> {
        self.notify.subscribe()
    }

    /// The cluster time: the newest entry's timestamp.
    pub fn last_ts(&self) -> Timestamp {
        self.last_ts
    }

    /// The oldest timestamp still held.
    pub fn first_ts(&self) -> Option<Timestamp> {
        self.entries.front().map(|e| e.ts)
    }

    /// The newest timestamp that was dropped by capping or truncation, if any.
    pub fn truncated_through(&self) -> Option<Timestamp> {
        self.truncated_through
    }

    fn next_ts(&mut self) -> Timestamp {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        self.last_ts = if now > self.last_ts.time {
            Timestamp {
                time: now,
                increment: 1,
            }
        } else {
            Timestamp {
                time: self.last_ts.time,
                increment: self.last_ts.increment + 1,
            }
        };
        self.last_ts
    }

    /// From now on, [`Oplog::append`] holds the ops back (a transaction commits).
    pub fn begin_capture(&mut self) {
        self.capture = Some(Vec::new());
    }

    /// Whether ops are held back (a transaction commits).
    pub fn capturing(&self) -> bool {
        self.capture.is_some()
    }

    /// The ops held back since [`Oplog::begin_capture`]; appends write again.
    pub fn end_capture(&mut self) -> Vec<Op> {
        self.capture.take().unwrap_or_default()
    }

    /// Logs a committed transaction as mongod does (MONGO-FORMATS.md §3):
    /// one `applyOps` entry (`ns: admin.$cmd`) with the session fields, or,
    /// when its ops are over `max_entry_bytes`, a chain of `partialTxn`
    /// entries linked by `prevOpTime` and ended by a plain `applyOps` (the
    /// commit). Inner ops are `{op, ns, ui, o, o2?}`. Returns the commit's ts.
    pub fn append_transaction(
        &mut self,
        ops: Vec<Op>,
        txn: &TxnContext,
        max_entry_bytes: usize,
    ) -> Option<Timestamp> {
        let mut chunks: Vec<Vec<Op>> = vec![Vec::new()];
        let mut size = 0;
        for op in ops {
            let inner = inner_op(&op);
            let bytes = inner.to_vec().map_or(0, |b| b.len());
            if size + bytes > max_entry_bytes && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += bytes;
            if let Some(last) = chunks.last_mut() {
                last.push(op);
            }
        }
        if chunks.iter().all(Vec::is_empty) {
            return None;
        }
        let n = chunks.len();
        let mut ts = None;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let images: Vec<(Option<Document>, Option<Document>)> = chunk
                .iter()
                .map(|op| (op.pre_image.clone(), op.post_image.clone()))
                .collect();
            let mut o = doc! { "applyOps": chunk.iter().map(|op| Bson::Document(inner_op(op))).collect::<Vec<_>>() };
            if i + 1 < n {
                o.insert("partialTxn", true);
            } else if n > 1 {
                o.insert("count", i64::try_from(n).unwrap_or(i64::MAX));
            }
            let written = self.append(Op::new("c", "admin.$cmd", None, o), Some(txn), 0);
            if let Some(last) = self.entries.back_mut() {
                last.op_images = images;
                last.doc.remove("stmtId");
            }
            ts = Some(written);
        }
        ts
    }

    /// Appends one entry and wakes waiting readers. `stmt_id` is used only with `txn`.
    pub fn append(&mut self, op: Op, txn: Option<&TxnContext>, stmt_id: i32) -> Timestamp {
        if let Some(held) = self.capture.as_mut() {
            held.push(op);
            return self.last_ts;
        }
        let ts = self.next_ts();
        let mut doc = Document::new();
        if let Some(txn) = txn {
            doc.insert(
                "lsid",
                doc! {
                    "id": txn.lsid_id,
                    "uid": Binary { subtype: BinarySubtype::Generic, bytes: EMPTY_USER_DIGEST.to_vec() },
                },
            );
            doc.insert("txnNumber", txn.txn_number);
        }
        doc.insert("op", op.op);
        doc.insert("ns", op.ns);
        if let Some(ui) = op.ui {
            doc.insert("ui", ui);
        }
        doc.insert("o", op.o);
        if let Some(o2) = op.o2 {
            doc.insert("o2", o2);
        }
        if txn.is_some() {
            doc.insert("stmtId", stmt_id);
        }
        doc.insert("ts", ts);
        doc.insert("t", TERM);
        doc.insert("v", 2_i64);
        doc.insert("wall", DateTime::now());
        if let Some(txn) = txn {
            let prev = match self.chains.get(&txn.lsid_id) {
                Some((n, prev)) if *n == txn.txn_number => *prev,
                _ => Timestamp {
                    time: 0,
                    increment: 0,
                },
            };
            let prev_t = if prev.time == 0 { -1_i64 } else { TERM };
            doc.insert("prevOpTime", doc! { "ts": prev, "t": prev_t });
            self.chains.insert(txn.lsid_id, (txn.txn_number, ts));
        }
        self.entries.push_back(Entry {
            ts,
            doc,
            pre_image: op.pre_image,
            post_image: op.post_image,
            op_images: Vec::new(),
        });
        if let Some(max) = self.max_entries {
            while self.entries.len() > max {
                self.drop_oldest();
            }
        }
        self.notify.send_replace(ts);
        ts
    }

    fn drop_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.truncated_through = Some(e.ts);
        }
    }

    /// Keeps only the newest `keep` entries (the `standinTruncateOplog` test hook).
    /// Returns how many entries were dropped.
    pub fn truncate_keep_last(&mut self, keep: usize) -> usize {
        let mut dropped = 0;
        while self.entries.len() > keep {
            self.drop_oldest();
            dropped += 1;
        }
        dropped
    }

    /// Entries with `ts > after`, oldest first.
    pub fn after(&self, after: Timestamp) -> impl Iterator<Item = &Entry> {
        let start = self.entries.partition_point(|e| e.ts <= after);
        self.entries.range(start..)
    }

    /// All entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// The entry at exactly `ts`.
    pub fn get(&self, ts: Timestamp) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.ts < ts);
        self.entries.get(i).filter(|e| e.ts == ts)
    }

    /// Would reading everything after `after` miss dropped entries?
    pub fn lost_after(&self, after: Timestamp) -> bool {
        self.truncated_through.is_some_and(|t| after < t)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// `{_id}` of a document: the `o2`/documentKey of its entries.
/// An op as it stands inside `applyOps`: `{op, ns, ui, o, o2?}`.
fn inner_op(op: &Op) -> Document {
    let mut d = doc! { "op": op.op, "ns": op.ns.clone() };
    if let Some(ui) = op.ui {
        d.insert("ui", ui);
    }
    d.insert("o", op.o.clone());
    if let Some(o2) = &op.o2 {
        d.insert("o2", o2.clone());
    }
    d
}

pub fn document_key(doc: &Document) -> Document {
    doc! { "_id": doc.get("_id").cloned().unwrap_or(Bson::Null) }
}

/// The `o` of a create entry, as mongod 7.0 logs it.
pub fn create_command(coll: &str) -> Document {
    doc! {
        "create": coll,
        "idIndex": { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_increase_and_capping_remembers_what_was_lost() {
        let mut log = Oplog::new(Some(3));
        let first = log.first_ts().unwrap();
        assert!(!log.lost_after(first));
        let mut last = first;
        for i in 0..5 {
            let ts = log.append(Op::new("n", "", None, doc! {"msg": i}), None, 0);
            assert!(ts > last);
            last = ts;
        }
        assert_eq!(log.len(), 3);
        assert!(log.lost_after(first));
        let oldest = log.first_ts().unwrap();
        assert!(!log.lost_after(log.truncated_through().unwrap()));
        assert_eq!(log.after(oldest).count(), 2);
        assert!(log.get(oldest).is_some());
    }

    #[test]
    fn retryable_writes_chain_prev_op_time() {
        let mut log = Oplog::new(None);
        let txn = TxnContext {
            lsid_id: Uuid::new(),
            txn_number: 4,
        };
        let a = log.append(Op::new("i", "t.c", None, doc! {"_id": 1}), Some(&txn), 0);
        log.append(Op::new("i", "t.c", None, doc! {"_id": 2}), Some(&txn), 1);
        let entries: Vec<_> = log
            .after(Timestamp {
                time: 0,
                increment: 0,
            })
            .collect();
        let first = &entries[1].doc;
        assert_eq!(first.get_i64("txnNumber").unwrap(), 4);
        assert_eq!(
            first
                .get_document("prevOpTime")
                .unwrap()
                .get_i64("t")
                .unwrap(),
            -1
        );
        let second = &entries[2].doc;
        assert_eq!(second.get_i32("stmtId").unwrap(), 1);
        assert_eq!(
            second
                .get_document("prevOpTime")
                .unwrap()
                .get_timestamp("ts")
                .unwrap(),
            a
        );
    }
}
