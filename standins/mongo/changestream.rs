//! Change streams: `aggregate` with a leading `$changeStream` stage, read from the oplog the way
//! mongod derives them (MONGO-FORMATS.md §4, §5).
//!
//! A stream keeps a scan position (`after`: every entry up to this timestamp has been turned into
//! events) and the events produced but not yet handed out. Each batch ends with a
//! `postBatchResumeToken`: the last event's token when the batch was cut short by its size,
//! otherwise a high-water-mark token just past the scan position, so an idle stream's token still
//! moves forward.
//!
//! **Resume tokens** are `{_data: "<hex>"}`. Like mongod's, byte 0 is `0x82` and bytes 1-8 are
//! the cluster time big-endian (`secs << 32 | inc`), so `_data` sorts in event order; what follows
//! is the stand-in's own layout, not mongod's KeyString: token type (0 high-water-mark, 128
//! event), txnOpIndex (u32), fromInvalidate (0/1), then the collection UUID when there is one.
//! Only this stand-in can resume from its tokens, as only mongod can resume from mongod's.

use std::collections::VecDeque;

use bson::{doc, Bson, Document, Timestamp, Uuid};

use crate::oplog::{Entry, Oplog};
use crate::query;
use crate::server::CommandError;
use crate::store::Store;

// ------------------------------------------------------------------------------------------
// resume tokens

const KIND_HIGH_WATER_MARK: u8 = 0;
const KIND_EVENT: u8 = 128;

/// The ordering part of a resume token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenKey {
    pub ts: Timestamp,
    pub kind: u8,
    pub txn_op_index: u32,
    pub from_invalidate: bool,
}

impl TokenKey {
    fn event(ts: Timestamp, from_invalidate: bool) -> Self {
        Self {
            ts,
            kind: KIND_EVENT,
            txn_op_index: 0,
            from_invalidate,
        }
    }

    fn high_water_mark(ts: Timestamp) -> Self {
        Self {
            ts,
            kind: KIND_HIGH_WATER_MARK,
            txn_op_index: 0,
            from_invalidate: false,
        }
    }

    /// `{_data: hex}`.
    pub fn encode(&self, uuid: Option<Uuid>) -> Document {
        let mut bytes = vec![0x82];
        let ts = (u64::from(self.ts.time) << 32) | u64::from(self.ts.increment);
        bytes.extend_from_slice(&ts.to_be_bytes());
        bytes.push(self.kind);
        bytes.extend_from_slice(&self.txn_op_index.to_be_bytes());
        bytes.push(u8::from(self.from_invalidate));
        if let Some(uuid) = uuid {
            bytes.extend_from_slice(&uuid.bytes());
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        doc! { "_data": hex }
    }

    /// Parses a token produced by [`TokenKey::encode`].
    pub fn decode(token: &Bson) -> Result<Self, CommandError> {
        let invalid = || CommandError::invalid_resume_token(format!("{token}"));
        let data = match token {
            Bson::Document(d) => d.get_str("_data").map_err(|_| invalid())?,
            _ => return Err(invalid()),
        };
        if data.len() % 2 != 0 || !data.is_ascii() {
            return Err(invalid());
        }
        let bytes = (0..data.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&data[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| invalid())?;
        if bytes.len() < 15 || bytes[0] != 0x82 {
            return Err(invalid());
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&bytes[1..9]);
        let ts = u64::from_be_bytes(ts);
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&bytes[10..14]);
        Ok(Self {
            ts: Timestamp {
                time: u32::try_from(ts >> 32).map_err(|_| invalid())?,
                increment: u32::try_from(ts & 0xffff_ffff).map_err(|_| invalid())?,
            },
            kind: bytes[9],
            txn_op_index: u32::from_be_bytes(idx),
            from_invalidate: bytes[14] != 0,
        })
    }
}

/// The timestamp just before `ts` (so "after pred(ts)" means "at or after ts").
fn pred(ts: Timestamp) -> Timestamp {
    if ts.increment > 0 {
        Timestamp {
            time: ts.time,
            increment: ts.increment - 1,
        }
    } else {
        Timestamp {
            time: ts.time.saturating_sub(1),
            increment: u32::MAX,
        }
    }
}

fn succ(ts: Timestamp) -> Timestamp {
    if ts.increment < u32::MAX {
        Timestamp {
            time: ts.time,
            increment: ts.increment + 1,
        }
    } else {
        Timestamp {
            time: ts.time + 1,
            increment: 0,
        }
    }
}

// ------------------------------------------------------------------------------------------
// options

/// What the stream watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Collection { db: String, coll: String },
    Database { db: String },
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FullDocument {
    Default,
    UpdateLookup,
    WhenAvailable,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BeforeChange {
    Off,
    WhenAvailable,
    Required,
}

/// A parsed `$changeStream` pipeline.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    scope: Scope,
    full_document: FullDocument,
    before_change: BeforeChange,
    show_expanded: bool,
    matcher: Vec<Document>,
}

/// Where a new stream starts.
enum Start {
    Now,
    AfterToken { key: TokenKey, must_exist: bool },
    AtOperationTime(Timestamp),
}

/// An open change stream cursor's state.
#[derive(Debug)]
pub struct ChangeStream {
    spec: StreamSpec,
    /// Every entry with `ts <= after` has been scanned.
    after: Timestamp,
    /// Events at or before this token are not returned (resume points inside one timestamp).
    skip_through: Option<TokenKey>,
    pending: VecDeque<(TokenKey, Document)>,
    invalidated: bool,
}

/// A batch of events and its `postBatchResumeToken`; `closed` after an invalidate.
pub struct Batch {
    pub events: Vec<Document>,
    pub post_batch_resume_token: Document,
    pub closed: bool,
}

impl ChangeStream {
    /// Opens a stream from the `$changeStream` stage (`stage`) and the rest of the pipeline.
    pub fn open(
        db: &str,
        target: &Bson,
        stage: &Document,
        rest: &[Bson],
        oplog: &Oplog,
    ) -> Result<Self, CommandError> {
        let all_for_cluster = stage.get("allChangesForCluster").is_some_and(query::truthy);
        let scope = match target {
            Bson::String(coll) => {
                if is_internal_db(db) {
                    return Err(CommandError::invalid_namespace(format!(
                        "$changeStream may not be opened on the internal {db} database"
                    )));
                }
                Scope::Collection {
                    db: db.to_string(),
                    coll: coll.clone(),
                }
            }
            _ if all_for_cluster => {
                if db != "admin" {
                    return Err(CommandError::invalid_options(
                        "A $changeStream with 'allChangesForCluster:true' may only be opened on the 'admin' database",
                    ));
                }
                Scope::Cluster
            }
            _ => {
                if is_internal_db(db) {
                    return Err(CommandError::invalid_namespace(format!(
                        "$changeStream may not be opened on the internal {db} database"
                    )));
                }
                Scope::Database { db: db.to_string() }
            }
        };
        let full_document = match stage.get_str("fullDocument").unwrap_or("default") {
            "default" => FullDocument::Default,
            "updateLookup" => FullDocument::UpdateLookup,
            "whenAvailable" => FullDocument::WhenAvailable,
            "required" => FullDocument::Required,
            other => {
                return Err(CommandError::bad_value(format!(
                    "unknown fullDocument option: {other}"
                )))
            }
        };
        let before_change = match stage.get_str("fullDocumentBeforeChange").unwrap_or("off") {
            "off" => BeforeChange::Off,
            "whenAvailable" => BeforeChange::WhenAvailable,
            "required" => BeforeChange::Required,
            other => {
                return Err(CommandError::bad_value(format!(
                    "unknown fullDocumentBeforeChange option: {other}"
                )))
            }
        };
        let mut matcher = Vec::new();
        for s in rest {
            let Bson::Document(s) = s else {
                return Err(CommandError::bad_value("pipeline stages must be objects"));
            };
            match s.get("$match") {
                Some(Bson::Document(m)) if s.len() == 1 => matcher.push(m.clone()),
                _ => {
                    return Err(CommandError::illegal_operation(format!(
                    "stage {} after $changeStream is not supported by the stand-in (only $match)",
                    s.keys().next().map_or("?", String::as_str)
                )))
                }
            }
        }
        let spec = StreamSpec {
            scope,
            full_document,
            before_change,
            show_expanded: stage.get("showExpandedEvents").is_some_and(query::truthy),
            matcher,
        };

        let starts = ["resumeAfter", "startAfter", "startAtOperationTime"]
            .iter()
            .filter(|k| stage.contains_key(**k))
            .count();
        if starts > 1 {
            return Err(CommandError::bad_value(
                "Only one type of resume option is allowed, but multiple were found",
            ));
        }
        let start = if let Some(token) = stage.get("resumeAfter") {
            let key = TokenKey::decode(token)?;
            if key.from_invalidate {
                return Err(CommandError::invalid_resume_token(
                    "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification",
                ));
            }
            Start::AfterToken {
                key,
                must_exist: key.kind == KIND_EVENT,
            }
        } else if let Some(token) = stage.get("startAfter") {
            let key = TokenKey::decode(token)?;
            Start::AfterToken {
                key,
                must_exist: key.kind == KIND_EVENT,
            }
        } else if let Some(ts) = stage.get("startAtOperationTime") {
            match ts {
                Bson::Timestamp(ts) => Start::AtOperationTime(*ts),
                _ => {
                    return Err(CommandError::type_mismatch(
                        "startAtOperationTime must be a timestamp",
                    ))
                }
            }
        } else {
            Start::Now
        };
        let (after, skip_through) = match start {
            Start::Now => (oplog.last_ts(), None),
            Start::AtOperationTime(ts) => {
                check_history(oplog, ts)?;
                (pred(ts), None)
            }
            Start::AfterToken { key, must_exist } => {
                check_history(oplog, key.ts)?;
                if must_exist && oplog.get(key.ts).is_none() {
                    return Err(CommandError::change_stream_fatal(
                        "cannot resume stream; the resume token was not found",
                    ));
                }
                (pred(key.ts), Some(key))
            }
        };
        Ok(Self {
            spec,
            after,
            skip_through,
            pending: VecDeque::new(),
            invalidated: false,
        })
    }

    /// The cursor namespace mongod reports for this stream.
    pub fn cursor_ns(&self) -> String {
        match &self.spec.scope {
            Scope::Collection { db, coll } => format!("{db}.{coll}"),
            Scope::Database { db } => format!("{db}.$cmd.aggregate"),
            Scope::Cluster => "admin.$cmd.aggregate".to_string(),
        }
    }

    /// Scans new entries and returns up to `batch_size` events.
    pub fn next_batch(
        &mut self,
        oplog: &Oplog,
        store: &Store,
        batch_size: usize,
    ) -> Result<Batch, CommandError> {
        if !self.invalidated && self.pending.len() < batch_size {
            if oplog.lost_after(self.after) {
                return Err(CommandError::history_lost(
                    "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
                ));
            }
            let mut scanned = self.after;
            for entry in oplog.after(self.after) {
                scanned = entry.ts;
                let (events, invalidates) = self.events_for(entry, store, oplog)?;
                let mut delivered_invalidate = false;
                for (key, event) in events {
                    // Resume points inside this timestamp (startAfter an invalidate skips the
                    // invalidating entry's events, and with them the invalidation).
                    if self.skip_through.is_some_and(|s| key <= s) {
                        continue;
                    }
                    delivered_invalidate |= key.from_invalidate;
                    self.pending.push_back((key, event));
                }
                if invalidates && delivered_invalidate {
                    self.invalidated = true;
                    break;
                }
                if self.pending.len() >= batch_size {
                    break;
                }
            }
            self.after = scanned;
        }
        let take = self.pending.len().min(batch_size);
        let taken: Vec<(TokenKey, Document)> = self.pending.drain(..take).collect();
        let closed = self.invalidated && self.pending.is_empty();
        let post_batch_resume_token = match taken.last() {
            Some((_, event)) if closed || !self.pending.is_empty() => {
                event.get_document("_id").cloned().unwrap_or_default()
            }
            _ => TokenKey::high_water_mark(succ(self.after)).encode(None),
        };
        Ok(Batch {
            events: taken.into_iter().map(|(_, e)| e).collect(),
            post_batch_resume_token,
            closed,
        })
    }

    /// The events one oplog entry yields for this stream, and whether it invalidates it.
    fn events_for(
        &self,
        entry: &Entry,
        store: &Store,
        oplog: &Oplog,
    ) -> Result<(Vec<(TokenKey, Document)>, bool), CommandError> {
        let e = &entry.doc;
        let op = e.get_str("op").unwrap_or("");
        let ns = e.get_str("ns").unwrap_or("");
        let ui = match e.get("ui") {
            Some(Bson::Binary(b)) => b.to_uuid().ok(),
            _ => None,
        };
        let wall = e.get("wall").cloned().unwrap_or(Bson::Null);
        let o = e.get_document("o").cloned().unwrap_or_default();
        if op == "c" && o.contains_key("applyOps") {
            return self.transaction_events(entry, store, oplog);
        }
        let Some((db, coll)) = ns.split_once('.') else {
            return Ok((Vec::new(), false));
        };
        let key = TokenKey::event(entry.ts, false);
        let mut base = doc! {
            "_id": key.encode(ui),
            "operationType": "",
            "clusterTime": entry.ts,
        };
        if self.spec.show_expanded {
            if let Some(ui) = ui {
                base.insert("collectionUUID", ui);
            }
        }
        base.insert("wallTime", wall.clone());

        let mut out = Vec::new();
        let mut invalidates = false;
        match op {
            "i" | "u" | "d" => {
                if !self.watches(db, coll) {
                    return Ok((out, false));
                }
                let mut ev = base;
                let document_key = e
                    .get_document("o2")
                    .cloned()
                    .unwrap_or_else(|_| crate::oplog::document_key(&o));
                let ns_doc = doc! { "db": db, "coll": coll };
                match op {
                    "i" => {
                        ev.insert("operationType", "insert");
                        ev.insert("fullDocument", o);
                        ev.insert("ns", ns_doc);
                        ev.insert("documentKey", document_key);
                    }
                    "u" if o.contains_key("$v") => {
                        let diff = match (o.get("$v"), o.get_document("diff")) {
                            (Some(v), Ok(diff)) if query::values_equal(v, &Bson::Int32(2)) => diff,
                            _ => {
                                return Err(CommandError::change_stream_fatal(
                                    "unsupported update entry: only $v:2 diffs are understood",
                                ))
                            }
                        };
                        ev.insert("operationType", "update");
                        ev.insert("ns", ns_doc);
                        ev.insert("documentKey", document_key.clone());
                        ev.insert("updateDescription", query::update_description(diff));
                        self.add_before_change(&mut ev, entry)?;
                        match self.spec.full_document {
                            FullDocument::Default => {}
                            FullDocument::UpdateLookup => {
                                let current = store
                                    .find_by_key(db, coll, &document_key)
                                    .map_or(Bson::Null, Bson::Document);
                                ev.insert("fullDocument", current);
                            }
                            FullDocument::WhenAvailable | FullDocument::Required => {
                                ev.insert("fullDocument", self.post_image(entry)?);
                            }
                        }
                    }
                    "u" => {
                        ev.insert("operationType", "replace");
                        ev.insert("fullDocument", o);
                        ev.insert("ns", ns_doc);
                        ev.insert("documentKey", document_key);
                        self.add_before_change(&mut ev, entry)?;
                    }
                    _ => {
                        ev.insert("operationType", "delete");
                        ev.insert("ns", ns_doc);
                        ev.insert("documentKey", o);
                        self.add_before_change(&mut ev, entry)?;
                    }
                }
                out.push((key, ev));
            }
            "c" => {
                let command = o.keys().next().map_or("", String::as_str);
                match command {
                    "create" if self.spec.show_expanded => {
                        let target = o.get_str("create").unwrap_or("");
                        if self.watches(db, target) {
                            let mut ev = base;
                            ev.insert("operationType", "create");
                            ev.insert("ns", doc! { "db": db, "coll": target });
                            let mut description = o.clone();
                            description.remove("create");
                            ev.insert("operationDescription", description);
                            ev.insert("nsType", "collection");
                            out.push((key, ev));
                        }
                    }
                    "drop" => {
                        let target = o.get_str("drop").unwrap_or("");
                        if self.watches(db, target) {
                            let mut ev = base;
                            ev.insert("operationType", "drop");
                            ev.insert("ns", doc! { "db": db, "coll": target });
                            out.push((key, ev));
                            invalidates = matches!(self.spec.scope, Scope::Collection { .. });
                        }
                    }
                    "renameCollection" => {
                        let from = o.get_str("renameCollection").unwrap_or("");
                        let to = o.get_str("to").unwrap_or("");
                        let (from_db, from_coll) = from.split_once('.').unwrap_or((from, ""));
                        let (to_db, to_coll) = to.split_once('.').unwrap_or((to, ""));
                        if self.watches(from_db, from_coll) || self.watches(to_db, to_coll) {
                            let mut ev = base;
                            ev.insert("operationType", "rename");
                            ev.insert("ns", doc! { "db": from_db, "coll": from_coll });
                            ev.insert("to", doc! { "db": to_db, "coll": to_coll });
                            if self.spec.show_expanded {
                                let mut description =
                                    doc! { "to": { "db": to_db, "coll": to_coll } };
                                if let Some(t) = o.get("dropTarget") {
                                    description.insert("dropTarget", t.clone());
                                }
                                ev.insert("operationDescription", description);
                            }
                            out.push((key, ev));
                            invalidates = matches!(self.spec.scope, Scope::Collection { .. });
                        }
                    }
                    "dropDatabase" => {
                        let watched = match &self.spec.scope {
                            Scope::Collection { db: d, .. } | Scope::Database { db: d } => d == db,
                            Scope::Cluster => !is_internal_db(db),
                        };
                        if watched {
                            let mut ev = base;
                            ev.insert("operationType", "dropDatabase");
                            ev.insert("ns", doc! { "db": db });
                            out.push((key, ev));
                            invalidates = !matches!(self.spec.scope, Scope::Cluster);
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        let mut out: Vec<(TokenKey, Document)> = out
            .into_iter()
            .map(|(k, ev)| self.apply_match(ev).map(|ev| ev.map(|ev| (k, ev))))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        if invalidates {
            let inv_key = TokenKey::event(entry.ts, true);
            out.push((
                inv_key,
                doc! {
                    "_id": inv_key.encode(ui),
                    "operationType": "invalidate",
                    "clusterTime": entry.ts,
                    "wallTime": wall,
                },
            ));
        }
        Ok((out, invalidates))
    }

    /// The events of a committed transaction, at its last `applyOps`
    /// entry (MONGO-FORMATS.md §3, §4): the ops of the whole `partialTxn`
    /// chain (found back through `prevOpTime`), in order, each event with
    /// the commit's `clusterTime`, the session's `lsid` and `txnNumber`, and
    /// a token whose txnOpIndex is the op's place in the transaction. A
    /// `partialTxn` or `prepare` entry yields nothing by itself; `applyOps`
    /// without a session (batched writes) yields its ops the same way.
    fn transaction_events(
        &self,
        entry: &Entry,
        store: &Store,
        oplog: &Oplog,
    ) -> Result<(Vec<(TokenKey, Document)>, bool), CommandError> {
        let e = &entry.doc;
        let o = e.get_document("o").cloned().unwrap_or_default();
        if o.get_bool("partialTxn").ok() == Some(true) || o.get_bool("prepare").ok() == Some(true) {
            return Ok((Vec::new(), false));
        }
        let prev_ts = |d: &Document| {
            d.get_document("prevOpTime")
                .ok()
                .and_then(|p| p.get_timestamp("ts").ok())
                .filter(|t| t.time != 0)
        };
        let mut chain = vec![entry.clone()];
        let mut prev = prev_ts(e);
        while let Some(ts) = prev {
            let Some(p) = oplog.get(ts) else {
                return Err(CommandError::change_stream_fatal(
                    "a transaction's earlier partialTxn entry is no longer in the oplog",
                ));
            };
            prev = prev_ts(&p.doc);
            chain.push(p.clone());
        }
        chain.reverse();
        let wall = e.get("wall").cloned().unwrap_or(Bson::Null);
        let mut out = Vec::new();
        let mut index = 0u32;
        for part in &chain {
            let ops = part
                .doc
                .get_document("o")
                .and_then(|o| o.get_array("applyOps"))
                .cloned()
                .unwrap_or_default();
            for (i, op) in ops.iter().enumerate() {
                let Bson::Document(inner) = op else {
                    continue;
                };
                let (pre, post) = part.op_images.get(i).cloned().unwrap_or_default();
                let mut doc = inner.clone();
                doc.insert("ts", entry.ts);
                doc.insert("wall", wall.clone());
                let single = Entry {
                    ts: entry.ts,
                    doc,
                    pre_image: pre,
                    post_image: post,
                    op_images: Vec::new(),
                };
                let ui = match inner.get("ui") {
                    Some(Bson::Binary(b)) => b.to_uuid().ok(),
                    _ => None,
                };
                let key = TokenKey {
                    ts: entry.ts,
                    kind: KIND_EVENT,
                    txn_op_index: index,
                    from_invalidate: false,
                };
                index += 1;
                let (events, _) = self.events_for(&single, store, oplog)?;
                for (_, mut ev) in events {
                    ev.insert("_id", key.encode(ui));
                    if let Some(lsid) = e.get("lsid") {
                        ev.insert("lsid", lsid.clone());
                    }
                    if let Some(n) = e.get("txnNumber") {
                        ev.insert("txnNumber", n.clone());
                    }
                    out.push((key, ev));
                }
            }
        }
        Ok((out, false))
    }

    fn apply_match(&self, event: Document) -> Result<Option<Document>, CommandError> {
        for m in &self.spec.matcher {
            if !query::matches(&event, m)? {
                return Ok(None);
            }
        }
        Ok(Some(event))
    }

    fn watches(&self, db: &str, coll: &str) -> bool {
        if coll.starts_with("system.") || coll.starts_with("$cmd") {
            return false;
        }
        match &self.spec.scope {
            Scope::Collection { db: d, coll: c } => d == db && c == coll,
            Scope::Database { db: d } => d == db,
            Scope::Cluster => !is_internal_db(db),
        }
    }

    fn post_image(&self, entry: &Entry) -> Result<Bson, CommandError> {
        match (&entry.post_image, self.spec.full_document) {
            (Some(d), _) => Ok(Bson::Document(d.clone())),
            (None, FullDocument::Required) => Err(CommandError::no_matching_document(
                "Change stream was configured to require a post-image for all update events, but the post-image was not found",
            )),
            (None, _) => Ok(Bson::Null),
        }
    }

    fn add_before_change(&self, ev: &mut Document, entry: &Entry) -> Result<(), CommandError> {
        let value = match (self.spec.before_change, &entry.pre_image) {
            (BeforeChange::Off, _) => return Ok(()),
            (_, Some(d)) => Bson::Document(d.clone()),
            (BeforeChange::Required, None) => {
                return Err(CommandError::no_matching_document(
                    "Change stream was configured to require a pre-image for all update, delete and replace events, but the pre-image was not found",
                ))
            }
            (BeforeChange::WhenAvailable, None) => Bson::Null,
        };
        ev.insert("fullDocumentBeforeChange", value);
        Ok(())
    }
}

fn is_internal_db(db: &str) -> bool {
    matches!(db, "admin" | "config" | "local")
}

/// Is everything from `ts` on still in the oplog?
fn check_history(oplog: &Oplog, ts: Timestamp) -> Result<(), CommandError> {
    if oplog.lost_after(pred(ts)) {
        return Err(CommandError::history_lost(
            "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_sort_in_event_order() {
        let ts = Timestamp {
            time: 1_690_827_246,
            increment: 3,
        };
        let uuid = Uuid::new();
        let event = TokenKey::event(ts, false);
        let encoded = event.encode(Some(uuid));
        let hex = encoded.get_str("_data").unwrap();
        assert!(hex.starts_with("8264C7F9EE00000003"), "{hex}");
        assert_eq!(
            TokenKey::decode(&Bson::Document(encoded.clone())).unwrap(),
            event
        );

        let hwm = TokenKey::high_water_mark(ts).encode(None);
        let invalidate = TokenKey::event(ts, true).encode(Some(uuid));
        let later = TokenKey::high_water_mark(succ(ts)).encode(None);
        let data = |d: &Document| d.get_str("_data").unwrap().to_string();
        assert!(data(&hwm) < data(&encoded));
        assert!(data(&encoded) < data(&invalidate));
        assert!(data(&invalidate) < data(&later));
    }

    #[test]
    fn bad_tokens_are_errors_not_panics() {
        for token in [
            Bson::Int32(1),
            Bson::Document(doc! {"_data": "zz"}),
            Bson::Document(doc! {"_data": "82"}),
            Bson::Document(doc! {"_data": "é"}),
            Bson::Document(doc! {}),
        ] {
            assert_eq!(TokenKey::decode(&token).unwrap_err().code, 260);
        }
    }
}
