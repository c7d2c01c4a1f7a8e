//! The initial snapshot: every mapped table copied from the slot's exported
//! snapshot, so it shows the database exactly at the slot's consistent
//! point. Rows come out of `COPY ... TO STDOUT` (text format) and are parsed
//! by the same code as streamed values.
//!
//! A partitioned table is copied through its root (`SELECT ... FROM root`
//! reads every partition once); an inheritance parent through itself too,
//! which reads its children's rows as well, with `tableoid` to say which
//! table each row lives in. The same reader copies an inheritance child
//! created while streaming ([`SnapshotReader::begin_now`]).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio_postgres::{Client, CopyOutStream};

use std::collections::HashMap;

use super::catalog::quote_ident;
use super::{connect_plain, parse_column, query_err, values, PgError};
use crate::event::{ChangeEvent, Lsn, Op, SeqKey, SourceMeta, TableInfo, Value};

/// One relation to copy: what its rows are published as, and where they
/// are read from.
#[derive(Clone, Debug)]
pub struct CopySource {
    /// The mapped table (its name and columns are the events').
    pub table: Arc<TableInfo>,
    /// The SQL relation to read: `"s"."t"`, or `ONLY "s"."t"`.
    pub from: String,
    /// Read `tableoid` with each row, to name the inheritance child it
    /// lives in when that is not `oid`.
    pub origin_of: Option<u32>,
}

/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Copies the mapped tables from an exported snapshot, batch by batch.
pub struct SnapshotReader {
    client: Client,
    consistent_point: Lsn,
    tables: Vec<CopySource>,
    /// (schema, name) of the relations rows came from, by OID.
    origins: HashMap<u32, Option<Arc<(String, String)>>>,
    next_table: usize,
    current: Option<Current>,
    ordinal: u64,
    total_rows: u64,
    started: Instant,
}

struct Current {
    table: Arc<TableInfo>,
    origin_of: Option<u32>,
    /// A progress bar when stderr is a terminal; log lines otherwise.
    bar: Option<indicatif::ProgressBar>,
    stream: std::pin::Pin<Box<CopyOutStream>>,
    carry: Vec<u8>,
    rows: u64,
    estimate: u64,
    last_report: Instant,
}

impl SnapshotReader {
    /// Opens a `REPEATABLE READ` transaction on the exported snapshot.
    /// Must run before the replication connection issues another command.
    pub async fn begin(
        url: &str,
        snapshot_name: &str,
        consistent_point: Lsn,
        tables: Vec<CopySource>,
    ) -> Result<Self, PgError> {
        let client = connect_plain(url).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                snapshot_name.replace('\'', "''")
            ))
            .await
            .map_err(query_err("importing the slot's exported snapshot"))?;
        tracing::info!(tables = tables.len(), consistent_point = %consistent_point, "initial snapshot started");
        Ok(Self::with(client, consistent_point, tables))
    }

    /// Copies `tables` as they are now, in one `REPEATABLE READ`
    /// transaction; `at` orders the rows (the WAL position of the copy).
    pub async fn begin_now(url: &str, at: Lsn, tables: Vec<CopySource>) -> Result<Self, PgError> {
        let client = connect_plain(url).await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(query_err("starting a copy"))?;
        Ok(Self::with(client, at, tables))
    }

    fn with(client: Client, consistent_point: Lsn, tables: Vec<CopySource>) -> Self {
        SnapshotReader {
            client,
            consistent_point,
            tables,
            origins: HashMap::new(),
            next_table: 0,
            current: None,
            ordinal: 0,
            total_rows: 0,
            started: Instant::now(),
        }
    }

    /// Rows copied so far.
    pub fn rows(&self) -> u64 {
        self.total_rows
    }

    async fn open_next(&mut self) -> Result<bool, PgError> {
        let Some(CopySource {
            table,
            from,
            origin_of,
        }) = self.tables.get(self.next_table).cloned()
        else {
            return Ok(false);
        };
        self.next_table += 1;
        let relation = from.trim_start_matches("ONLY ").to_string();
        // A partitioned table or an inheritance parent: the sum over the
        // tables below it (reltuples is -1 for a table never analyzed).
        let estimate: f32 = self
            .client
            .query_one(
                &format!(
                    "WITH RECURSIVE d(oid) AS (SELECT $1::text::regclass::oid UNION SELECT i.inhrelid FROM pg_inherits i JOIN d ON i.inhparent = d.oid{only})
                     SELECT COALESCE(sum(greatest(c.reltuples, 0)), 0)::float4 FROM pg_class c JOIN d ON c.oid = d.oid",
                    only = if from.starts_with("ONLY ") { " WHERE false" } else { "" },
                ),
                &[&relation],
            )
            .await
            .map_err(query_err(format!(
                "estimating the size of {}",
                table.qualified()
            )))?
            .get(0);
        let mut cols = table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>();
        if origin_of.is_some() {
            cols.insert(0, "tableoid::int8".into());
        }
        let cols = cols.join(", ");
        let stream = self
            .client
            .copy_out(&format!("COPY (SELECT {cols} FROM {from}) TO STDOUT"))
            .await
            .map_err(query_err(format!("copying {}", table.qualified())))?;
        tracing::info!(table = %table.qualified(), estimated_rows = estimate.max(0.0) as u64, "copying table");
        let bar = std::io::stderr().is_terminal().then(|| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let bar = indicatif::ProgressBar::new(estimate.max(0.0) as u64);
            let style = indicatif::ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(table.qualified());
            bar
        });
        self.current = Some(Current {
            bar,
            table,
            origin_of,
            stream: Box::pin(stream),
            carry: Vec::new(),
            rows: 0,
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            estimate: estimate.max(0.0) as u64,
            last_report: Instant::now(),
        });
        Ok(true)
    }

    /// The next batch of at most `max` rows; `None` when every table is done
    /// (the snapshot transaction is then closed).
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<ChangeEvent>>, PgError> {
        let mut out = Vec::with_capacity(max.min(4096));
        while out.len() < max {
            if self.current.is_none() && !self.open_next().await? {
                break;
            }
            let Some(cur) = self.current.as_mut() else {
                break;
            };
            match cur.stream.next().await {
                Some(Ok(chunk)) => {
                    let lines = split_lines(&mut cur.carry, &chunk);
                    for line in lines {
                        let (row, origin) = parse_line(&cur.table, &line, cur.origin_of.is_some())?;
                        let relation = match (origin, cur.origin_of) {
                            (Some(oid), Some(main)) if oid != main => {
                                origin_name(&self.client, &mut self.origins, oid).await?
                            }
                            _ => None,
                        };
                        out.push(ChangeEvent {
                            id: None,
                            changed: None,
                            table: cur.table.clone(),
                            op: Op::Snapshot,
                            seq: SeqKey {
                                commit: self.consistent_point,
                                ordinal: self.ordinal,
                            },
                            meta: SourceMeta {
                                lsn: self.consistent_point,
                                xid: None,
                                commit_time_micros: None,
                                relation,
                            },
                            before: None,
                            after: Some(row),
                        });
                        self.ordinal += 1;
                        cur.rows += 1;
                        self.total_rows += 1;
                    }
                    if let Some(bar) = &cur.bar {
                        if cur.rows > bar.length().unwrap_or(0) {
                            bar.set_length(cur.rows);
                        }
                        bar.set_position(cur.rows);
                    } else if cur.last_report.elapsed() >= PROGRESS_EVERY {
                        cur.last_report = Instant::now();
                        report(cur, self.started);
                    }
                }
                Some(Err(e)) => {
                    return Err(query_err(format!("copying {}", cur.table.qualified()))(e))
                }
                None => {
                    if !cur.carry.is_empty() {
                        return Err(PgError::Value {
                            table: cur.table.qualified(),
                            column: "*".into(),
                            reason: "COPY ended in the middle of a row".into(),
                        });
                    }
                    if let Some(bar) = &cur.bar {
                        bar.finish();
                    }
                    tracing::info!(table = %cur.table.qualified(), rows = cur.rows, "table copied");
                    self.current = None;
                }
            }
        }
        if out.is_empty() && self.current.is_none() && self.next_table >= self.tables.len() {
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(query_err("closing the snapshot transaction"))?;
            tracing::info!(
                rows = self.total_rows,
                seconds = self.started.elapsed().as_secs_f64(),
                "initial snapshot read"
            );
            return Ok(None);
        }
        Ok(Some(out))
    }
}

fn report(cur: &Current, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(0.001);
    #[allow(clippy::cast_precision_loss)]
    let rate = cur.rows as f64 / secs;
    let pct = if cur.estimate > 0 {
        #[allow(clippy::cast_precision_loss)]
        let p = (cur.rows as f64 / cur.estimate as f64 * 100.0).min(100.0);
        format!("{p:.0}%")
    } else {
        "?".into()
    };
    tracing::info!(table = %cur.table.qualified(), rows = cur.rows, estimated_rows = cur.estimate, progress = %pct, rows_per_sec = rate as u64, "snapshot progress");
}

fn split_lines(carry: &mut Vec<u8>, chunk: &Bytes) -> Vec<Vec<u8>> {
    carry.extend_from_slice(chunk);
    let mut lines = Vec::new();
    let mut start = 0;
    while let Some(pos) = carry[start..].iter().position(|&b| b == b'\n') {
        lines.push(carry[start..start + pos].to_vec());
        start += pos + 1;
    }
    carry.drain(..start);
    lines
}

/// (schema, name) of the relation with `oid`, cached.
async fn origin_name(
    client: &Client,
    cache: &mut HashMap<u32, Option<Arc<(String, String)>>>,
    oid: u32,
) -> Result<Option<Arc<(String, String)>>, PgError> {
    if let Some(hit) = cache.get(&oid) {
        return Ok(hit.clone());
    }
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::int8::oid",
            &[&i64::from(oid)],
        )
        .await
        .map_err(query_err("naming an inheritance child"))?;
    let name = row.map(|r| Arc::new((r.get::<_, String>(0), r.get::<_, String>(1))));
    cache.insert(oid, name.clone());
    Ok(name)
}

/// One COPY line as a row; with `with_origin`, the line starts with the
/// row's `tableoid`, returned apart.
fn parse_line(
    table: &TableInfo,
    line: &[u8],
    with_origin: bool,
) -> Result<(Vec<Value>, Option<u32>), PgError> {
    let mut fields = values::split_copy_line(line).map_err(|e| PgError::Value {
        table: table.qualified(),
        column: "*".into(),
        reason: e.to_string(),
    })?;
    let origin = if with_origin && !fields.is_empty() {
        fields.remove(0).and_then(|t| t.parse::<u32>().ok())
    } else {
        None
    };
    if fields.len() != table.columns.len() {
        return Err(PgError::Value {
            table: table.qualified(),
            column: "*".into(),
            reason: format!(
                "COPY row has {} fields, expected {}",
                fields.len(),
                table.columns.len()
            ),
        });
    }
    let row = table
        .columns
        .iter()
        .zip(fields)
        .map(|(col, f)| match f {
            None => Value::Null,
            Some(text) => parse_column(col, text.as_bytes()),
        })
        .collect();
    Ok((row, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks() {
        let mut carry = Vec::new();
        assert!(split_lines(&mut carry, &Bytes::from_static(b"1\tab")).is_empty());
        let lines = split_lines(&mut carry, &Bytes::from_static(b"c\n2\tx\n3"));
        assert_eq!(lines, vec![b"1\tabc".to_vec(), b"2\tx".to_vec()]);
        assert_eq!(carry, b"3");
    }
}
