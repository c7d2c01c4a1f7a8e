//! Inheritance children of mapped parents, while streaming.
//!
//! A mapping of an inheritance parent covers its children's rows, as
//! `SELECT * FROM parent` does (the trigger-routed monthly tables of older
//! apps, where the parent itself holds nothing). PostgreSQL publishes a
//! child's changes under the child's own name and columns, so the source:
//! - routes a child's changes to its parent's mapping, with the child's
//!   columns projected onto the parent's (by name: a child may have more
//!   columns, in another order), and names the child in the event
//!   (`source.schema`/`source.table`);
//! - finds children created while it runs (every [`CHECK_EVERY`]), adds each
//!   to the publication, and copies the rows it already holds: after the
//!   `ALTER PUBLICATION` commits, it waits until every transaction that was
//!   running then has ended (a change made before the commit is not
//!   published, so it must be in the copy), then reads the child in a new
//!   snapshot. A row changed in between is in both the copy and the
//!   stream; its last event is still its latest state. The child is noted
//!   in the checkpoint before the `ALTER`, and cleared only once Kafka
//!   confirmed its copy, so a crash copies it again rather than never.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::catalog::sql_name;
use super::{query_err, PgError};
use crate::event::{pg_qualified, ColumnInfo, SourceKind, TableInfo};

/// How often to look for new children.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// How a relation of the stream is published.
#[derive(Clone, Debug)]
pub struct Rel {
    /// What events say the row is: the mapped table (for a child: its
    /// parent, with the columns both have).
    pub table: Arc<TableInfo>,
    /// The relation's own columns, which its tuples hold.
    pub parse_as: Arc<TableInfo>,
    /// For a child: the index in `parse_as` of each column of `table`.
    pub projection: Option<Vec<usize>>,
    /// For a child: its (schema, name).
    pub origin: Option<Arc<(String, String)>>,
}

/// A mapped inheritance parent.
#[derive(Clone, Debug)]
pub struct Parent {
    pub oid: u32,
    pub qualified: String,
    /// The publication its changes go through.
    pub publication: String,
    pub insert_only: bool,
}

/// A child found while streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChild {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// The mapped parent it belongs to (`schema.table`).
    pub parent: String,
    /// The publication it must be in.
    pub publication: String,
    /// Its parent's mapping publishes inserts only.
    pub insert_only: bool,
    /// Whether it is in the publication already.
    pub published: bool,
}

impl NewChild {
    /// `schema.table`, as mappings write it.
    pub fn qualified(&self) -> String {
        pg_qualified(&self.schema, &self.name)
    }

    /// `"schema"."table"`.
    pub fn sql_name(&self) -> String {
        sql_name(&self.schema, &self.name)
    }
}

/// The parents whose children's rows are published, and the children seen.
#[derive(Debug, Default)]
pub struct Children {
    parents: Vec<Parent>,
    /// Children in the publication and copied (or in the initial snapshot).
    known: HashSet<u32>,
    /// Nearest mapped parent of a relation, by OID (`None`: none).
    parent_of: HashMap<u32, Option<usize>>,
    /// The last view of each parent, so an unchanged shape keeps its `Arc`.
    views: HashMap<String, Arc<TableInfo>>,
    last_check: Option<Instant>,
}

const ANCESTORS_SQL: &str = "
WITH RECURSIVE up(oid, depth) AS (
  SELECT inhparent, 1 FROM pg_inherits WHERE inhrelid = $1::int8::oid
  UNION ALL
  SELECT i.inhparent, up.depth + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.oid WHERE up.depth < 64
)
SELECT oid::int8 FROM up ORDER BY depth";

impl Children {
    /// Tracks `parents`; `known` are the children already covered.
    pub fn new(parents: Vec<Parent>, known: impl IntoIterator<Item = u32>) -> Self {
        Children {
            parents,
            known: known.into_iter().collect(),
            ..Children::default()
        }
    }

    /// Whether any mapped parent publishes its children's rows.
    pub fn any(&self) -> bool {
        !self.parents.is_empty()
    }

    /// The mapped parent (nearest first) of relation `oid`, if any.
    pub async fn parent_of(
        &mut self,
        client: &Client,
        oid: u32,
    ) -> Result<Option<Parent>, PgError> {
        if self.parents.is_empty() {
            return Ok(None);
        }
        if let Some(hit) = self.parent_of.get(&oid) {
            return Ok(hit.map(|i| self.parents[i].clone()));
        }
        let rows = client
            .query(ANCESTORS_SQL, &[&i64::from(oid)])
            .await
            .map_err(query_err("reading the parents of a table"))?;
        let found = rows.iter().find_map(|r| {
            let a = u32::try_from(r.get::<_, i64>(0)).unwrap_or_default();
            self.parents.iter().position(|p| p.oid == a)
        });
        self.parent_of.insert(oid, found);
        Ok(found.map(|i| self.parents[i].clone()))
    }

    /// The parent's view of a child's relation: the parent's current
    /// columns (in its order) with the types the child's Relation message
    /// gives, and where each is in the child's tuples.
    pub async fn view(
        &mut self,
        client: &Client,
        parent: &Parent,
        parent_known: Option<&Arc<TableInfo>>,
        child: &TableInfo,
    ) -> Result<(Arc<TableInfo>, Vec<usize>), PgError> {
        let names: Vec<String> = client
            .query(
                "SELECT attname::text FROM pg_attribute
                 WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped
                   AND (attgenerated = '' OR current_setting('server_version_num')::int >= 180000)
                 ORDER BY attnum",
                &[&i64::from(parent.oid)],
            )
            .await
            .map_err(query_err(format!(
                "reading the columns of {}",
                parent.qualified
            )))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut columns = Vec::with_capacity(names.len());
        let mut projection = Vec::with_capacity(names.len());
        for n in &names {
            let Some(i) = child.column_index(n) else {
                continue;
            };
            let known = parent_known.and_then(|k| k.columns.iter().find(|c| &c.name == n));
            let c = &child.columns[i];
            let ty = match known {
                Some(k) if super::catalog::same_but_dims(&k.ty, &c.ty) => k.ty.clone(),
                _ => c.ty.clone(),
            };
            columns.push(ColumnInfo {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                ty,
                nullable: known.is_none_or(|k| k.nullable),
                key: known.is_some_and(|k| k.key),
            });
            projection.push(i);
        }
        let (schema, name) = match parent_known {
            Some(k) => (k.schema.clone(), k.name.clone()),
            None => {
                let (s, n) = parent
                    .qualified
                    .split_once('.')
                    .unwrap_or(("public", &parent.qualified));
                (s.to_string(), n.to_string())
            }
        };
        let info = TableInfo {
            kind: SourceKind::Postgres,
            database: child.database.clone(),
            schema,
            name,
            columns,
        };
        let arc = match (self.views.get(&parent.qualified), parent_known) {
            (Some(v), _) if **v == info => v.clone(),
            (_, Some(k)) if **k == info => k.clone(),
            _ => Arc::new(info),
        };
        self.views.insert(parent.qualified.clone(), arc.clone());
        Ok((arc, projection))
    }

    /// Whether it is time to look for new children.
    pub fn due(&self) -> bool {
        self.any() && self.last_check.is_none_or(|t| t.elapsed() >= CHECK_EVERY)
    }

    /// Children of the mapped parents that are not known yet, and whether
    /// each is in its parent's publication already (one query).
    pub async fn discover(&mut self, client: &Client) -> Result<Vec<NewChild>, PgError> {
        self.last_check = Some(Instant::now());
        let oids: Vec<i64> = self.parents.iter().map(|p| i64::from(p.oid)).collect();
        let rows = client
            .query(
                "WITH RECURSIVE d(oid, root, depth) AS (
                   SELECT inhrelid, inhparent, 1 FROM pg_inherits WHERE inhparent = ANY($1::int8[]::oid[])
                   UNION ALL
                   SELECT i.inhrelid, d.root, d.depth + 1 FROM pg_inherits i JOIN d ON i.inhparent = d.oid WHERE d.depth < 64)
                 SELECT DISTINCT ON (c.oid) c.oid::int8, n.nspname::text, c.relname::text, d.root::int8
                 FROM d JOIN pg_class c ON c.oid = d.oid JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE NOT c.relispartition
                 ORDER BY c.oid, d.depth",
                &[&oids],
            )
            .await
            .map_err(query_err("looking for new inheritance children"))?;
        let mut out = Vec::new();
        for r in rows {
            let oid = u32::try_from(r.get::<_, i64>(0)).unwrap_or_default();
            if self.known.contains(&oid) {
                continue;
            }
            let root = u32::try_from(r.get::<_, i64>(3)).unwrap_or_default();
            let Some(p) = self.parents.iter().find(|p| p.oid == root) else {
                continue;
            };
            let published = !client
                .query(
                    "SELECT 1 FROM pg_publication_rel r JOIN pg_publication pb ON pb.oid = r.prpubid
                     WHERE r.prrelid = $1::int8::oid AND pb.pubname = $2",
                    &[&i64::from(oid), &p.publication],
                )
                .await
                .map_err(query_err("reading a publication"))?
                .is_empty();
            out.push(NewChild {
                oid,
                schema: r.get(1),
                name: r.get(2),
                parent: p.qualified.clone(),
                publication: p.publication.clone(),
                insert_only: p.insert_only,
                published,
            });
        }
        Ok(out)
    }

    /// `oid` is covered from now on.
    pub fn mark_known(&mut self, oid: u32) {
        self.known.insert(oid);
        self.parent_of.remove(&oid);
    }
}

/// Waits until every transaction running now has ended, so that whatever
/// they wrote is visible to a snapshot taken afterwards.
pub async fn wait_for_older_transactions(client: &Client) -> Result<(), PgError> {
    let xid: i64 = client
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .map_err(query_err("reading the current transaction id"))?
        .get(0);
    let started = Instant::now();
    let mut logged = Instant::now();
    loop {
        let xmin: i64 = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8",
                &[],
            )
            .await
            .map_err(query_err("reading the oldest running transaction"))?
            .get(0);
        if xmin > xid {
            return Ok(());
        }
        if logged.elapsed() >= Duration::from_secs(10) {
            tracing::warn!(
                waited_secs = started.elapsed().as_secs(),
                "waiting for transactions older than a new child table's publication to end before copying it"
            );
            logged = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
