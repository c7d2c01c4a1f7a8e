//! While streaming: every published table with storage must keep a
//! replica identity, or PostgreSQL refuses the app's UPDATE and DELETE on
//! it. A partition created later under a partitioned table without a
//! primary key starts without one; a dropped primary key or index loses
//! it. Every [`CHECK_EVERY`] this reads them all (two or three queries,
//! whatever the number of tables): one without is given one when
//! `set_replica_identity` allows, else reported in the log, by `/ready`
//! (a health warning) and by `unilog status`, until it has one again. A
//! statement that fails (a lock the app holds) is reported and tried again
//! at the next check, never a reason to stop the pipeline.

use std::collections::HashMap;
use std::time::Duration;

use super::{publication, query_err, relations, safety, PgError, PgSource};

/// How often the published tables' replica identities are read again.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

impl PgSource {
    /// One pass of the check; see the module header.
    pub(super) async fn check_identities(&mut self) -> Result<(), PgError> {
        // Every published table with storage, and the mapping it is for.
        let mut owner: HashMap<u32, String> = HashMap::new();
        let mut roots = Vec::new();
        let mut parents = Vec::new();
        for plan in self.plans.iter().filter(|p| !p.insert_only) {
            owner.insert(plan.oid, plan.qualified.clone());
            if plan.partitioned {
                roots.push(i64::from(plan.oid));
            } else if !plan.only {
                parents.push(i64::from(plan.oid));
            }
        }
        if owner.is_empty() {
            return Ok(());
        }
        let mut below = Vec::new();
        if !roots.is_empty() {
            below.extend(
                self.client
                    .query(
                        "SELECT t.relid::int8, r.root FROM unnest($1::int8[]) r(root), pg_partition_tree(r.root::oid) t WHERE t.isleaf",
                        &[&roots],
                    )
                    .await
                    .map_err(query_err("reading the partitions of the mapped tables"))?,
            );
        }
        if !parents.is_empty() {
            // Inheritance children: those in the publication only (a child
            // left out, for want of a replica identity, breaks nothing).
            below.extend(
                self.client
                    .query(
                        "WITH RECURSIVE d(oid, root, depth) AS (
                           SELECT inhrelid, inhparent, 1 FROM pg_inherits WHERE inhparent = ANY($1::int8[]::oid[])
                           UNION ALL
                           SELECT i.inhrelid, d.root, d.depth + 1 FROM pg_inherits i JOIN d ON i.inhparent = d.oid WHERE d.depth < 64)
                         SELECT DISTINCT d.oid::int8, d.root::int8 FROM d",
                        &[&parents],
                    )
                    .await
                    .map_err(query_err("reading the children of the mapped tables"))?
                    .into_iter()
                    .filter(|r| {
                        self.children
                            .is_known(u32::try_from(r.get::<_, i64>(0)).unwrap_or_default())
                    }),
            );
        }
        for r in below {
            let table = u32::try_from(r.get::<_, i64>(0)).unwrap_or_default();
            let root = u32::try_from(r.get::<_, i64>(1)).unwrap_or_default();
            if let Some(q) = owner.get(&root).cloned() {
                owner.insert(table, q);
            }
        }
        let oids: Vec<u32> = owner.keys().copied().collect();
        let facts = relations::physical_facts(&self.client, &oids)
            .await
            .map_err(query_err(
                "reading the replica identity of the published tables",
            ))?;
        for f in facts {
            let key = format!("identity:{}", f.qualified());
            if f.identity.allows_updates() || f.kind == relations::RelKind::Partitioned {
                crate::telemetry::health().set_warning(&key, None);
                continue;
            }
            let mapping = owner.get(&f.oid).map_or("?", String::as_str);
            if let Some((sql, _)) = safety::planned_fix(&f, self.settings.set_replica_identity) {
                tracing::warn!(table = %f.qualified(), sql = %sql, "a published table has no replica identity; giving it one (set_replica_identity)");
                match publication::run_ddl(&self.client, &sql).await {
                    Ok(()) => {
                        crate::telemetry::health().set_warning(&key, None);
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(table = %f.qualified(), error = %e, "could not give the table a replica identity; trying again at the next check");
                    }
                }
            }
            let why = format!(
                "{} (published for the mapping of {mapping}) has {}: PostgreSQL refuses the app's UPDATE and DELETE on it while it is published; run `ALTER TABLE {} REPLICA IDENTITY FULL;` (or give it a primary key), or set source.postgres.set_replica_identity",
                f.qualified(),
                f.identity.describe(),
                f.sql_name()
            );
            if crate::telemetry::health().set_warning(&key, Some(why.clone())) {
                tracing::error!(table = %f.qualified(), "{why}");
            }
        }
        Ok(())
    }
}
