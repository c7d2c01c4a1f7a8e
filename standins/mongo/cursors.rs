//! Cursors: ordinary result sets, tailable cursors on `local.oplog.rs`, and change streams;
//! `getMore` with awaitData blocking; `killCursors`.
//!
//! Replies follow mongod: `{cursor: {firstBatch|nextBatch, [postBatchResumeToken], id: Int64,
//! ns}, ok: 1}`. A tailable cursor and a change stream stay open (non-zero id) on an empty
//! batch; `getMore` on them waits for the oplog to grow, up to `maxTimeMS` (1000 ms if absent,
//! as on mongod), then answers with an empty batch.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bson::{doc, Bson, Document, Timestamp};
use tokio::time::Instant;

use crate::changestream::ChangeStream;
use crate::oplog::Oplog;
use crate::query;
use crate::server::{as_i64, CommandError, Server, State};

/// Default first-batch size of find and aggregate.
pub const DEFAULT_BATCH_SIZE: usize = 101;
/// Bytes of documents per batch, at most (mongod caps replies at 16 MiB of documents).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// awaitData wait when getMore carries no maxTimeMS.
const DEFAULT_AWAIT_MS: u64 = 1000;

#[derive(Debug)]
pub enum CursorKind {
    /// A computed result set.
    Buffered(VecDeque<Document>),
    /// A tailable cursor on the oplog: entries after `after` that match `filter`.
    Oplog {
        filter: Document,
        after: Timestamp,
        await_data: bool,
    },
    ChangeStream(Box<ChangeStream>),
}

#[derive(Debug)]
pub struct Cursor {
    pub ns: String,
    pub kind: CursorKind,
    /// Documents still allowed by the find's `limit`.
    pub remaining: Option<usize>,
}

#[derive(Debug, Default)]
pub struct Cursors {
    map: HashMap<i64, Cursor>,
    next: i64,
}

impl Cursors {
    fn insert(&mut self, cursor: Cursor) -> i64 {
        // Ids look like mongod's (large, not 1, 2, 3) so a test never mistakes one for a count.
        self.next += 1;
        let id = 7_340_032_000_000 + self.next * 7919;
        self.map.insert(id, cursor);
        id
    }

    pub fn remove(&mut self, id: i64) -> bool {
        self.map.remove(&id).is_some()
    }
}

/// `{cursor: {...}, ok: 1}`.
pub fn cursor_reply(
    id: i64,
    ns: &str,
    first: bool,
    docs: Vec<Document>,
    post_batch_resume_token: Option<Document>,
) -> Document {
    let mut cursor = Document::new();
    cursor.insert(if first { "firstBatch" } else { "nextBatch" }, docs);
    if let Some(token) = post_batch_resume_token {
        cursor.insert("postBatchResumeToken", token);
    }
    cursor.insert("id", id);
    cursor.insert("ns", ns);
    doc! { "cursor": cursor, "ok": 1.0 }
}

/// Takes up to `n` documents (and at most 16 MiB of them, but always at least one).
fn take_batch(queue: &mut VecDeque<Document>, n: usize) -> Vec<Document> {
    let mut out = Vec::new();
    let mut bytes = 0;
    while out.len() < n {
        let Some(next) = queue.front() else { break };
        let size = next.to_vec().map_or(0, |v| v.len());
        if !out.is_empty() && bytes + size > MAX_BATCH_BYTES {
            break;
        }
        bytes += size;
        out.extend(queue.pop_front());
    }
    out
}

/// Registers a buffered result set and answers the first batch (`id: 0` when it all fits).
pub fn open_buffered(
    state: &mut State,
    ns: String,
    mut docs: VecDeque<Document>,
    batch_size: usize,
    single_batch: bool,
) -> Document {
    let first = take_batch(&mut docs, batch_size);
    if docs.is_empty() || single_batch {
        return cursor_reply(0, &ns, true, first, None);
    }
    let id = state.cursors.insert(Cursor {
        ns: ns.clone(),
        kind: CursorKind::Buffered(docs),
        remaining: None,
    });
    cursor_reply(id, &ns, true, first, None)
}

/// The position a `{ts: {$gt|$gte: T}}` filter starts after, if it has one.
fn oplog_start(filter: &Document) -> Option<Timestamp> {
    let Some(Bson::Document(ts)) = filter.get("ts") else {
        return None;
    };
    if let Some(Bson::Timestamp(t)) = ts.get("$gt") {
        return Some(*t);
    }
    if let Some(Bson::Timestamp(t)) = ts.get("$gte") {
        return Some(if t.increment > 0 {
            Timestamp {
                time: t.time,
                increment: t.increment - 1,
            }
        } else {
            Timestamp {
                time: t.time.saturating_sub(1),
                increment: u32::MAX,
            }
        });
    }
    None
}

fn capped_position_lost(after: Timestamp) -> CommandError {
    CommandError::capped_position_lost(format!(
        "CollectionScan died due to position in capped collection being deleted. Last seen record id: RecordId({})",
        (u64::from(after.time) << 32) | u64::from(after.increment)
    ))
}

/// Scans the oplog after `after` for entries matching `filter`; returns them and the new
/// position (the last entry scanned).
fn scan_oplog(
    oplog: &Oplog,
    filter: &Document,
    after: Timestamp,
    n: usize,
) -> Result<(Vec<Document>, Timestamp), CommandError> {
    let mut out = Vec::new();
    let mut position = after;
    for entry in oplog.after(after) {
        if out.len() >= n {
            break;
        }
        position = entry.ts;
        if query::matches(&entry.doc, filter)? {
            out.push(entry.doc.clone());
        }
    }
    Ok((out, position))
}

/// `find` on `local.oplog.rs`, tailable or not.
pub fn find_oplog(
    state: &mut State,
    filter: Document,
    batch_size: usize,
    limit: Option<usize>,
    tailable: bool,
    await_data: bool,
    newest_first: bool,
) -> Result<Document, CommandError> {
    let ns = "local.oplog.rs".to_string();
    let after = oplog_start(&filter).unwrap_or(Timestamp {
        time: 0,
        increment: 0,
    });
    if state.oplog.lost_after(after) && oplog_start(&filter).is_some() {
        return Err(capped_position_lost(after));
    }
    if !tailable {
        // `sort: {$natural: -1}`: newest first, as mongod reads a capped collection backwards.
        let (mut docs, _) = scan_oplog(
            &state.oplog,
            &filter,
            after,
            if newest_first {
                usize::MAX
            } else {
                limit.unwrap_or(usize::MAX)
            },
        )?;
        if newest_first {
            docs.reverse();
            docs.truncate(limit.unwrap_or(usize::MAX));
        }
        return Ok(open_buffered(state, ns, docs.into(), batch_size, false));
    }
    let (first, position) = scan_oplog(&state.oplog, &filter, after, batch_size)?;
    let id = state.cursors.insert(Cursor {
        ns: ns.clone(),
        kind: CursorKind::Oplog {
            filter,
            after: position,
            await_data,
        },
        remaining: None,
    });
    Ok(cursor_reply(id, &ns, true, first, None))
}

/// `aggregate` with `$changeStream`: opens the stream and answers its first batch at once.
pub fn open_change_stream(
    state: &mut State,
    stream: ChangeStream,
    batch_size: usize,
) -> Result<Document, CommandError> {
    let mut stream = Box::new(stream);
    let ns = stream.cursor_ns();
    let batch = stream.next_batch(&state.oplog, &state.store, batch_size)?;
    let id = if batch.closed {
        0
    } else {
        state.cursors.insert(Cursor {
            ns: ns.clone(),
            kind: CursorKind::ChangeStream(stream),
            remaining: None,
        })
    };
    Ok(cursor_reply(
        id,
        &ns,
        true,
        batch.events,
        Some(batch.post_batch_resume_token),
    ))
}

/// One attempt at a getMore batch: the reply, and whether it is worth waiting for more.
fn try_get_more(
    state: &mut State,
    id: i64,
    batch_size: usize,
) -> Result<(Document, bool), CommandError> {
    let State {
        store,
        oplog,
        cursors,
        ..
    } = state;
    let Some(cursor) = cursors.map.get_mut(&id) else {
        return Err(CommandError::cursor_not_found(id));
    };
    let ns = cursor.ns.clone();
    let n = cursor.remaining.map_or(batch_size, |r| r.min(batch_size));
    let (docs, pbrt, close, awaitable) = match &mut cursor.kind {
        CursorKind::Buffered(queue) => {
            let docs = take_batch(queue, n);
            (docs, None, queue.is_empty(), false)
        }
        CursorKind::Oplog {
            filter,
            after,
            await_data,
        } => {
            if oplog.lost_after(*after) {
                let err = capped_position_lost(*after);
                cursors.map.remove(&id);
                return Err(err);
            }
            let (docs, position) = scan_oplog(oplog, filter, *after, n)?;
            *after = position;
            (docs, None, false, *await_data)
        }
        CursorKind::ChangeStream(stream) => match stream.next_batch(oplog, store, n) {
            Ok(batch) => (
                batch.events,
                Some(batch.post_batch_resume_token),
                batch.closed,
                !batch.closed,
            ),
            Err(err) => {
                cursors.map.remove(&id);
                return Err(err);
            }
        },
    };
    if let Some(r) = cursor.remaining.as_mut() {
        *r = r.saturating_sub(docs.len());
    }
    let exhausted = close || cursor.remaining == Some(0);
    let wait = docs.is_empty() && awaitable && !exhausted;
    if exhausted {
        cursors.map.remove(&id);
    }
    let reply_id = if exhausted { 0 } else { id };
    Ok((cursor_reply(reply_id, &ns, false, docs, pbrt), wait))
}

/// `getMore`: blocks on awaitData cursors until there is data or `maxTimeMS` passes.
pub async fn get_more(server: &Server, command: &Document) -> Result<Document, CommandError> {
    let id = command
        .get("getMore")
        .and_then(as_i64)
        .ok_or_else(|| CommandError::type_mismatch("getMore must be an Int64 cursor id"))?;
    let batch_size = command
        .get("batchSize")
        .and_then(as_i64)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|b| *b > 0)
        .unwrap_or(usize::MAX);
    let wait_ms = command
        .get("maxTimeMS")
        .and_then(as_i64)
        .and_then(|m| u64::try_from(m).ok())
        .unwrap_or(DEFAULT_AWAIT_MS);
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    let mut changes = server.lock().oplog.subscribe();
    loop {
        let (reply, wait) = {
            let mut state = server.lock();
            changes.borrow_and_update();
            try_get_more(&mut state, id, batch_size)?
        };
        if !wait || Instant::now() >= deadline {
            return Ok(reply);
        }
        // Woken by an append or the deadline; either way, look again (the deadline pass
        // answers with an empty batch and a fresh postBatchResumeToken).
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// `killCursors`.
pub fn kill_cursors(state: &mut State, command: &Document) -> Document {
    let mut killed = Vec::new();
    let mut not_found = Vec::new();
    if let Ok(ids) = command.get_array("cursors") {
        for id in ids.iter().filter_map(as_i64) {
            if state.cursors.remove(id) {
                killed.push(Bson::Int64(id));
            } else {
                not_found.push(Bson::Int64(id));
            }
        }
    }
    doc! {
        "cursorsKilled": killed,
        "cursorsNotFound": not_found,
        "cursorsAlive": [],
        "cursorsUnknown": [],
        "ok": 1.0,
    }
}
