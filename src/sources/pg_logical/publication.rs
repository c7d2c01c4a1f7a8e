//! The publications the slot reads, made to cover what the mappings ask
//! for, and nothing that would break the app.
//!
//! Two publications, both read by the one slot:
//! - the main one (`unilog_<name>`) publishes inserts, updates, deletes and
//!   truncates of every mapped table that has a replica identity;
//! - the insert-only one (`<main>_inserts`) publishes inserts and truncates
//!   of `insert_only` mappings, so that a table without a replica identity
//!   can be published while the app's UPDATE and DELETE on it keep working.
//!   It exists only when a mapping needs it.
//!
//! Both use `publish_via_partition_root`, so the changes of every partition
//! (those created or attached later, and DEFAULT partitions, included)
//! arrive as changes of the partitioned table that the mapping names.
//! Membership is read from `pg_publication_rel`, exactly: an inheritance
//! parent added without `ONLY` brings its children at that moment, and a
//! child created later is added while running (see the source).
//!
//! With `manage_publication: false`, nothing is changed: every difference
//! is refused with the SQL that makes it right.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::Client;

use super::catalog::quote_ident;
use super::safety::TablePlan;
use super::{query_err, PgError};

/// What one publication must be.
struct Wanted<'a> {
    name: &'a str,
    /// `publish = '...'` for a new publication.
    actions: &'a str,
    insert_only: bool,
    tables: Vec<&'a TablePlan>,
}

/// The publication's row in `pg_publication`.
struct Existing {
    oid: u32,
    all_tables: bool,
    insert: bool,
    update: bool,
    delete: bool,
    truncate: bool,
    via_root: bool,
}

async fn existing(client: &Client, name: &str) -> Result<Option<Existing>, PgError> {
    let row = client
        .query_opt(
            "SELECT oid::int8, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot
             FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_err("reading publications"))?;
    Ok(row.map(|r| Existing {
        oid: u32::try_from(r.get::<_, i64>(0)).unwrap_or_default(),
        all_tables: r.get(1),
        insert: r.get(2),
        update: r.get(3),
        delete: r.get(4),
        truncate: r.get(5),
        via_root: r.get(6),
    }))
}

/// The OIDs of the relations listed in a publication.
pub async fn members(client: &Client, publication_oid: u32) -> Result<HashSet<u32>, PgError> {
    Ok(client
        .query(
            "SELECT prrelid::int8 FROM pg_publication_rel WHERE prpubid = $1::int8::oid",
            &[&i64::from(publication_oid)],
        )
        .await
        .map_err(query_err("reading the tables of a publication"))?
        .iter()
        .map(|r| u32::try_from(r.get::<_, i64>(0)).unwrap_or_default())
        .collect())
}

/// Moves the differences found to the SQL to run (`manage`) or to the
/// refusals. A difference without SQL is always refused.
fn apply(
    todo: &mut Vec<(String, String)>,
    manage: bool,
    sql_todo: &mut Vec<String>,
    refusals: &mut Vec<String>,
) {
    for (sql, why) in todo.drain(..) {
        if sql.is_empty() {
            refusals.push(why);
        } else if manage {
            sql_todo.push(sql);
        } else {
            refusals.push(format!(
                "{why}; run `{sql}` or set source.postgres.manage_publication: true"
            ));
        }
    }
}

/// The tables with storage listed in a publication (partitions of the
/// partitioned ones included) that have no usable replica identity: if the
/// publication publishes updates or deletes, the app's UPDATE and DELETE
/// on them fail.
pub async fn members_without_identity(
    client: &Client,
    publication_oid: u32,
) -> Result<Vec<String>, PgError> {
    Ok(client
        .query(
            "WITH rels AS (SELECT prrelid AS oid FROM pg_publication_rel WHERE prpubid = $1::int8::oid),
                  leaves AS (SELECT t.relid AS oid FROM rels, pg_partition_tree(rels.oid) t WHERE t.isleaf)
             SELECT DISTINCT format('%s.%s', n.nspname, c.relname)
             FROM leaves l JOIN pg_class c ON c.oid = l.oid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND (c.relreplident = 'n'
                OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
                OR (c.relreplident = 'i' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)))
             ORDER BY 1",
            &[&i64::from(publication_oid)],
        )
        .await
        .map_err(query_err("reading the replica identities of a publication's tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The OID of a publication, if it exists.
pub async fn publication_oid(client: &Client, name: &str) -> Result<Option<u32>, PgError> {
    Ok(existing(client, name).await?.map(|e| e.oid))
}

fn table_ref(t: &TablePlan) -> String {
    if t.only {
        format!("ONLY {}", t.sql_name)
    } else {
        t.sql_name.clone()
    }
}

/// Runs one statement that changes a table or publication, waiting at
/// most 5 s for its lock so the app's queries never queue behind it for
/// long; retried three times.
pub(super) async fn run_ddl(client: &Client, sql: &str) -> Result<(), PgError> {
    let mut last = None;
    for attempt in 0..3u32 {
        match client
            .batch_execute(&format!(
                "SET lock_timeout = '5s'; {sql}; RESET lock_timeout"
            ))
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                tracing::warn!(
                    sql,
                    attempt,
                    "the table is locked by another session; trying again"
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                last = Some(e);
            }
            Err(e) => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                return Err(query_err(format!("running `{sql}`"))(e));
            }
        }
    }
    Err(PgError::Setup(format!(
        "`{sql}` waited 3 times 5 s for its lock, which the app holds (a long transaction on the table?); run it by hand in a quiet moment, then start unilog again{}",
        last.map(|e| format!(" ({})", super::pg_text(&e))).unwrap_or_default()
    )))
}

/// Makes the publications cover `plans` (creating, extending or
/// correcting them when `manage`), after any replica identity the plans
/// call for. Returns the SQL it ran (or, with `dry_run`, would run).
pub async fn ensure(
    client: &Client,
    main: &str,
    inserts: &str,
    plans: &[TablePlan],
    manage: bool,
    dry_run: bool,
) -> Result<Vec<String>, PgError> {
    let mut changes = Vec::new();
    let mut refusals = Vec::new();
    for sql in plans.iter().flat_map(|p| &p.identity_ddl) {
        if !dry_run {
            run_ddl(client, sql).await?;
        }
        changes.push(sql.clone());
    }
    let wanted = [
        Wanted {
            name: main,
            actions: "insert, update, delete, truncate",
            insert_only: false,
            tables: plans.iter().filter(|p| !p.insert_only).collect(),
        },
        Wanted {
            name: inserts,
            actions: "insert, truncate",
            insert_only: true,
            tables: plans.iter().filter(|p| p.insert_only).collect(),
        },
    ];
    let mut sql_todo = Vec::new();
    for w in &wanted {
        let pub_sql = quote_ident(w.name);
        let Some(e) = existing(client, w.name).await? else {
            // Both publications are made (empty if need be) even when no
            // mapping needs one yet: a slot can only read publications
            // that existed when it was created.
            if w.tables.is_empty() && !manage {
                continue;
            }
            let sql = if w.tables.is_empty() {
                format!(
                    "CREATE PUBLICATION {pub_sql} WITH (publish = '{}', publish_via_partition_root = true)",
                    w.actions
                )
            } else {
                format!(
                    "CREATE PUBLICATION {pub_sql} FOR TABLE {} WITH (publish = '{}', publish_via_partition_root = true)",
                    w.tables.iter().map(|t| table_ref(t)).collect::<Vec<_>>().join(", "),
                    w.actions
                )
            };
            if manage {
                sql_todo.push(sql);
            } else {
                refusals.push(format!("publication `{}` does not exist; create it with `{sql}` or set source.postgres.manage_publication: true", w.name));
            }
            continue;
        };
        // A difference: corrected when unilog manages the publication,
        // else refused with the SQL that corrects it.
        let mut todo: Vec<(String, String)> = Vec::new();
        let mut fix = |sql: String, why: String| todo.push((sql, why));
        if w.insert_only {
            if !w.tables.is_empty() && (e.update || e.delete) {
                fix(
                    format!("ALTER PUBLICATION {pub_sql} SET (publish = 'insert, truncate')"),
                    format!("publication `{}`, which unilog reads for `insert_only` mappings, publishes updates or deletes too, so PostgreSQL would refuse the app's UPDATE and DELETE on its tables without a replica identity", w.name),
                );
            }
        } else if !(w.tables.is_empty() || e.insert && e.update && e.delete && e.truncate) {
            let why = format!("publication `{}` does not publish every kind of change (insert {}, update {}, delete {}, truncate {}), so some committed changes would never reach Kafka", w.name, e.insert, e.update, e.delete, e.truncate);
            // Publishing updates and deletes of the tables already in it
            // must not break the app's writes to them.
            let widening = !(e.update && e.delete);
            let blocked = if !widening {
                None
            } else if e.all_tables {
                Some("it is FOR ALL TABLES, so every table of the database without a replica identity would refuse the app's UPDATE and DELETE".to_string())
            } else {
                let unsafe_members = members_without_identity(client, e.oid).await?;
                (!unsafe_members.is_empty()).then(|| {
                    format!(
                        "tables already in it have no replica identity, and would refuse the app's UPDATE and DELETE: {}",
                        unsafe_members.join(", ")
                    )
                })
            };
            match blocked {
                Some(b) => fix(String::new(), format!("{why}; unilog does not widen it, because {b}; give unilog a publication of its own (source.postgres.publication), or give those tables a replica identity first")),
                None => fix(
                    format!("ALTER PUBLICATION {pub_sql} SET (publish = '{}')", w.actions),
                    why,
                ),
            }
        }
        if !e.via_root && w.tables.iter().any(|t| t.partitioned) {
            fix(
                format!("ALTER PUBLICATION {pub_sql} SET (publish_via_partition_root = true)"),
                format!("publication `{}` publishes the changes of a partitioned table under the names of its partitions (publish_via_partition_root is off), so the mapping of the partitioned table would see none of them", w.name),
            );
        }
        if e.all_tables {
            if w.insert_only && !w.tables.is_empty() {
                refusals.push(format!("publication `{}` is FOR ALL TABLES, so it cannot be the insert-only publication; set source.postgres.insert_publication to another name", w.name));
            }
            apply(&mut todo, manage, &mut sql_todo, &mut refusals);
            continue;
        }
        let present = members(client, e.oid).await?;
        for t in &w.tables {
            if !present.contains(&t.oid) {
                fix(
                    format!("ALTER PUBLICATION {pub_sql} ADD TABLE {}", table_ref(t)),
                    format!("publication `{}` does not include {}", w.name, t.qualified),
                );
                continue;
            }
            // Children missing from the publication are added while
            // running, which also copies the rows they hold (see
            // `children`); with `manage_publication: false` that is
            // refused now, with the SQL.
            if !manage {
                for c in t.children.iter().filter(|c| !present.contains(&c.oid)) {
                    fix(
                        format!("ALTER PUBLICATION {pub_sql} ADD TABLE ONLY {}", c.sql_name),
                        format!(
                            "publication `{}` does not include {}, an inheritance child of {}",
                            w.name, c.qualified, t.qualified
                        ),
                    );
                }
            }
        }
        apply(&mut todo, manage, &mut sql_todo, &mut refusals);
    }
    // A table moved to `insert_only` must leave the main publication, or
    // the app's UPDATE and DELETE on it keep failing.
    if let Some(e) = existing(client, main).await? {
        if !e.all_tables {
            let present = members(client, e.oid).await?;
            for t in plans.iter().filter(|p| p.insert_only) {
                for oid in std::iter::once(t.oid).chain(t.children.iter().map(|c| c.oid)) {
                    if present.contains(&oid) {
                        let sql = format!(
                            "ALTER PUBLICATION {} DROP TABLE ONLY {}",
                            quote_ident(main),
                            if oid == t.oid {
                                t.sql_name.clone()
                            } else {
                                t.children
                                    .iter()
                                    .find(|c| c.oid == oid)
                                    .map(|c| c.sql_name.clone())
                                    .unwrap_or_default()
                            }
                        );
                        if manage {
                            sql_todo.push(sql);
                        } else {
                            refusals.push(format!("{} is mapped `insert_only` but is in publication `{main}`, which publishes its updates and deletes; run `{sql}`", t.qualified));
                        }
                    }
                }
            }
        } else if plans.iter().any(|p| p.insert_only) {
            refusals.push(format!("publication `{main}` is FOR ALL TABLES, so it publishes the updates and deletes of the `insert_only` mappings' tables too; give unilog a publication of its own (source.postgres.publication)"));
        }
    }
    if !refusals.is_empty() {
        return Err(PgError::Setup(refusals.join("\n  - ")));
    }
    for sql in sql_todo {
        if !dry_run {
            run_ddl(client, &sql).await?;
        }
        changes.push(sql);
    }
    Ok(changes)
}
