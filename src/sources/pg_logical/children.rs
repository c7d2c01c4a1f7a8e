//! Inheritance children of mapped parents, while streaming.
//!
//! A mapping of an inheritance parent covers its children's rows, as
//! `SELECT * FROM parent` does (the trigger-routed monthly tables of older
//! apps, where the parent itself holds nothing). PostgreSQL publishes a
//! child's changes under the child's own name and columns, so the source:
//! - routes a child's changes to its parent's mapping, with the child's
//!   columns projected onto the parent's (by name: a child may have more
//!   columns, in another order), and names the child in the event
//!   (`source.schema`/`source.table`). A child once routed stays routed for
//!   the rest of the run, so changes made before a `NO INHERIT` but read
//!   after it still reach the parent's topic;
//! - finds children created while it runs (every [`CHECK_EVERY`]), adds each
//!   one that is safe to publish (a replica identity, logged storage) to the
//!   publication, and copies the rows it already holds. A change committed
//!   before the `ALTER PUBLICATION` is not published, so it must be in the
//!   copy: the copy waits until every transaction of this database that was
//!   running then has ended (the stream goes on meanwhile), and until the
//!   stream has handed out the position after the `ALTER`, so that no change
//!   older than the copy (a row moved from another child, say) is published
//!   after it. A row changed after the `ALTER` may be in both the copy and
//!   the stream; its last event is still its latest state;
//! - notes the child in the checkpoint before the `ALTER`, and clears it
//!   only once Kafka confirmed its copy, so a crash copies it again rather
//!   than never.
//!
//! A failed `ALTER` (a lock the app holds, a child dropped meanwhile) is
//! reported and tried again at the next look; it never stops the pipeline.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::catalog::{quote_ident, sql_name};
use super::relations::{self, Persistence, RelKind};
use super::snapshot::{CopySource, SnapshotReader};
use super::{publication, query_err, safety, PgError, PgSource};
use crate::checkpoint::{CheckpointStore, PendingChild};
use crate::event::{pg_qualified, ChangeEvent, ColumnInfo, Lsn, SourceKind, TableInfo};

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
    /// Children routed so far: child OID -> index in `parents`. Never
    /// forgotten during a run.
    routes: HashMap<u32, usize>,
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

    /// The mapped parent (nearest first) of relation `oid`, if any: from
    /// the routes of this run, else from the catalog now.
    pub async fn parent_of(
        &mut self,
        client: &Client,
        oid: u32,
    ) -> Result<Option<Parent>, PgError> {
        if self.parents.is_empty() {
            return Ok(None);
        }
        if let Some(&i) = self.routes.get(&oid) {
            return Ok(Some(self.parents[i].clone()));
        }
        let rows = client
            .query(ANCESTORS_SQL, &[&i64::from(oid)])
            .await
            .map_err(query_err("reading the parents of a table"))?;
        let found = rows.iter().find_map(|r| {
            let a = u32::try_from(r.get::<_, i64>(0)).unwrap_or_default();
            self.parents.iter().position(|p| p.oid == a)
        });
        if let Some(i) = found {
            self.routes.insert(oid, i);
        }
        Ok(found.map(|i| self.parents[i].clone()))
    }

    /// Whether `oid` is a child covered (in the publication and copied).
    pub fn is_known(&self, oid: u32) -> bool {
        self.known.contains(&oid)
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
    }
}

/// A child waiting for its copy.
#[derive(Clone, Debug)]
pub struct PendingCopy {
    pub child: NewChild,
    /// The WAL position just after the child joined the publication: the
    /// copy starts once the stream has handed out a position past it.
    pub after: Lsn,
    /// Transactions of this database running then, (pid, xid), and
    /// prepared ones (gid): the copy starts once they have all ended.
    pub running: Vec<(i32, String)>,
    pub prepared: Vec<String>,
    pub queued_at: Instant,
}

const RUNNING_SQL: &str = "SELECT pid, backend_xid::text FROM pg_stat_activity
    WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()";
const PREPARED_SQL: &str = "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()";

/// The transactions of this database running now, and the prepared ones.
async fn running_now(client: &Client) -> Result<(Vec<(i32, String)>, Vec<String>), PgError> {
    let running = client
        .query(RUNNING_SQL, &[])
        .await
        .map_err(query_err("reading the running transactions"))?
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
        .collect();
    let prepared = client
        .query(PREPARED_SQL, &[])
        .await
        .map_err(query_err("reading the prepared transactions"))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    Ok((running, prepared))
}

async fn current_lsn(client: &Client) -> Result<Lsn, PgError> {
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(query_err("reading the current WAL position"))?
        .get::<_, String>(0)
        .parse()
        .unwrap_or_default())
}

impl PgSource {
    /// Starts tracking the mapped inheritance parents. The children in a
    /// publication now are covered (by the snapshot, or by an earlier run);
    /// children the checkpoint says were not fully copied yet are copied
    /// again.
    pub(super) async fn init_children(&mut self, fresh_snapshot: bool) -> Result<(), PgError> {
        let parents: Vec<Parent> = self
            .plans
            .iter()
            .filter(|p| !p.only && !p.partitioned)
            .map(|p| Parent {
                oid: p.oid,
                qualified: p.qualified.clone(),
                publication: if p.insert_only {
                    self.settings.insert_publication.clone()
                } else {
                    self.settings.publication.clone()
                },
                insert_only: p.insert_only,
            })
            .collect();
        let mut known = Vec::new();
        for name in self.publications.clone() {
            if let Some(oid) = publication::publication_oid(&self.client, &name).await? {
                known.extend(publication::members(&self.client, oid).await?);
            }
        }
        self.children = Children::new(parents, known);
        if fresh_snapshot {
            return Ok(());
        }
        let after = current_lsn(&self.client).await?;
        let (running, prepared) = running_now(&self.client).await?;
        for c in self.state.pending_children.clone() {
            let q = pg_qualified(&c.schema, &c.name);
            match self.children.parent_of(&self.client, c.oid).await? {
                Some(parent) => {
                    tracing::info!(child = %q, parent = %parent.qualified, "copying an inheritance child again: its copy was not confirmed before the last stop");
                    self.child_queue.push(PendingCopy {
                        child: NewChild {
                            oid: c.oid,
                            schema: c.schema.clone(),
                            name: c.name.clone(),
                            parent: parent.qualified,
                            publication: parent.publication,
                            insert_only: parent.insert_only,
                            published: true,
                        },
                        after,
                        running: running.clone(),
                        prepared: prepared.clone(),
                        queued_at: Instant::now(),
                    });
                }
                None => {
                    tracing::warn!(child = %q, "an inheritance child whose copy was not confirmed before the last stop is no longer a child of a mapped table (or was dropped); its rows from before it joined the publication are not published");
                    self.state.pending_children.retain(|p| p.oid != c.oid);
                    self.store.commit(&self.state)?;
                }
            }
        }
        Ok(())
    }

    /// Looks for inheritance children created since the last look: each
    /// one that is safe to publish is added to its publication and queued
    /// for a copy; the others are reported (log and `/ready`) and looked at
    /// again next time.
    pub(super) async fn check_children(&mut self) -> Result<(), PgError> {
        for c in self.children.discover(&self.client).await? {
            let q = c.qualified();
            let key = format!("child:{q}");
            let Some(facts) = relations::physical_facts(&self.client, &[c.oid])
                .await
                .map_err(query_err(format!("reading {q}")))?
                .pop()
            else {
                continue;
            };
            let warn = |me: &mut Self, why: String| {
                if me.warned.insert(c.oid) {
                    tracing::error!(child = %q, parent = %c.parent, "{why}");
                }
                crate::telemetry::health().set_warning(&key, Some(why));
            };
            if facts.kind != RelKind::Table || facts.persistence != Persistence::Permanent {
                let why = format!("{q}, a new child of the mapped table {}, is a {} that logical replication cannot publish ({:?}); its rows are not published", c.parent, facts.kind.describe(), facts.persistence);
                warn(self, why);
                self.children.mark_known(c.oid);
                continue;
            }
            if !c.insert_only && !facts.identity.allows_updates() {
                let fixed = match safety::planned_fix(&facts, self.settings.set_replica_identity) {
                    Some((sql, _)) => {
                        tracing::info!(child = %q, sql = %sql, "giving a new child table a replica identity (set_replica_identity)");
                        publication::run_ddl(&self.client, &sql).await
                    }
                    None => Err(PgError::Setup(format!("{q}, a new child of the mapped table {}, has {}: publishing it would make the app's UPDATE and DELETE on it fail, so its rows are not published until it has one (`ALTER TABLE {} REPLICA IDENTITY FULL;`, or a primary key); unilog looks again every {} s", c.parent, facts.identity.describe(), facts.sql_name(), CHECK_EVERY.as_secs()))),
                };
                if let Err(e) = fixed {
                    warn(self, e.to_string());
                    continue;
                }
            }
            if !c.published && !self.settings.manage_publication {
                let why = format!("{q}, a new child of the mapped table {}, is not in publication `{}`, so its rows are not published; run `ALTER PUBLICATION {} ADD TABLE ONLY {}` (manage_publication is false)", c.parent, c.publication, quote_ident(&c.publication), c.sql_name());
                warn(self, why);
                continue;
            }
            self.state.pending_children.push(PendingChild {
                oid: c.oid,
                schema: c.schema.clone(),
                name: c.name.clone(),
            });
            self.store.commit(&self.state)?;
            if !c.published {
                let sql = format!(
                    "ALTER PUBLICATION {} ADD TABLE ONLY {}",
                    quote_ident(&c.publication),
                    c.sql_name()
                );
                if let Err(e) = publication::run_ddl(&self.client, &sql).await {
                    self.state.pending_children.retain(|p| p.oid != c.oid);
                    self.store.commit(&self.state)?;
                    warn(self, format!("{q}, a new child of the mapped table {}, could not be added to the publication, so its rows are not published yet; unilog tries again in {} s: {e}", c.parent, CHECK_EVERY.as_secs()));
                    continue;
                }
                tracing::info!(child = %q, parent = %c.parent, "a new inheritance child: added to the publication; its rows are copied once the transactions running now have ended");
            }
            let after = current_lsn(&self.client).await?;
            let (running, prepared) = running_now(&self.client).await?;
            crate::telemetry::health().set_warning(&key, None);
            self.children.mark_known(c.oid);
            self.routes_add(c.oid).await?;
            self.child_queue.push(PendingCopy {
                child: c,
                after,
                running,
                prepared,
                queued_at: Instant::now(),
            });
        }
        Ok(())
    }

    /// Remembers the route of a child (see [`Children::parent_of`]).
    async fn routes_add(&mut self, oid: u32) -> Result<(), PgError> {
        self.children.parent_of(&self.client, oid).await.map(|_| ())
    }

    /// Rows of new inheritance children, handed out between transactions:
    /// the copy under way, else one started for the queued children that
    /// may start. Also looks for new children, and reads the published
    /// tables' replica identities, when due. `None`: nothing to copy now.
    pub(super) async fn next_child_rows(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<ChangeEvent>>, PgError> {
        if self
            .identities_checked
            .is_none_or(|t| t.elapsed() >= super::identity_watch::CHECK_EVERY)
        {
            self.identities_checked = Some(Instant::now());
            self.check_identities().await?;
        }
        if self.children.due() {
            self.check_children().await?;
        }
        if self.child_copy.is_none()
            && !self.child_queue.is_empty()
            && self
                .child_queue_checked
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.child_queue_checked = Some(Instant::now());
            self.start_child_copy().await?;
        }
        let Some((reader, _)) = self.child_copy.as_mut() else {
            return Ok(None);
        };
        match reader.next_batch(max).await? {
            Some(events) if !events.is_empty() => Ok(Some(events)),
            _ => {
                if let Some((_, oids)) = self.child_copy.take() {
                    self.copies_done
                        .push((self.emitted.max(self.start_lsn), oids));
                }
                Ok(None)
            }
        }
    }

    /// Starts copying the queued children that may start: the stream has
    /// passed the position after their `ALTER PUBLICATION`, and the
    /// transactions running then have ended. Logs, every 30 s, what the
    /// others wait for.
    async fn start_child_copy(&mut self) -> Result<(), PgError> {
        let (running, prepared) = running_now(&self.client).await?;
        let (ready, waiting): (Vec<PendingCopy>, Vec<PendingCopy>) =
            std::mem::take(&mut self.child_queue)
                .into_iter()
                .partition(|p| {
                    self.emitted >= p.after
                        && !p.running.iter().any(|r| running.contains(r))
                        && !p.prepared.iter().any(|g| prepared.contains(g))
                });
        for p in &waiting {
            let waited = p.queued_at.elapsed().as_secs();
            if waited >= 30 && waited % 30 == 0 {
                let pids: Vec<String> = p
                    .running
                    .iter()
                    .filter(|r| running.contains(r))
                    .map(|(pid, _)| pid.to_string())
                    .collect();
                tracing::warn!(
                    child = %p.child.qualified(),
                    waited_secs = waited,
                    stream_at = %self.emitted,
                    copy_after = %p.after,
                    pids = %pids.join(","),
                    "the copy of a new inheritance child waits for the stream to pass its start, or for transactions that were running when it joined the publication to end (pids)"
                );
            }
        }
        self.child_queue = waiting;
        if ready.is_empty() {
            return Ok(());
        }
        let mut sources = Vec::new();
        let mut oids = Vec::new();
        for p in &ready {
            let Some(parent) = self.known.get(&p.child.parent).cloned() else {
                continue;
            };
            let Some(parent_oid) = self
                .plans
                .iter()
                .find(|plan| plan.qualified == p.child.parent)
                .map(|plan| plan.oid)
            else {
                continue;
            };
            sources.push(CopySource {
                table: parent,
                from: format!("ONLY {}", p.child.sql_name()),
                origin_of: Some(parent_oid),
            });
            oids.push(p.child.oid);
        }
        let at = current_lsn(&self.client).await?;
        let reader = SnapshotReader::begin_now(&self.settings.url, at, sources).await?;
        self.child_copy = Some((reader, oids));
        Ok(())
    }
}
