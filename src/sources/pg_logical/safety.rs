//! Whether a mapped relation can be published without breaking the app,
//! judged the same way by `check` and by `run` (what `check` accepts, `run`
//! starts), before unilog changes any publication.
//!
//! The rules, for each mapping:
//! - only tables with storage in the WAL can be published: views,
//!   materialized views, foreign, unlogged and temporary tables are refused
//!   with the reason and what to do instead;
//! - a table whose changes would publish `UPDATE`/`DELETE` must have a
//!   replica identity on itself and on every partition or child below it,
//!   or PostgreSQL refuses the app's own `UPDATE` and `DELETE` from then on.
//!   Otherwise the mapping is refused with the ways out and their SQL, unless
//!   `set_replica_identity` lets unilog run that SQL itself;
//! - the entity key must be in the old row a delete carries, or deletes
//!   could not be keyed;
//! - a partition mapped alone is published under its own name, but not
//!   together with a mapping of a table above it (its changes would be
//!   published as the ancestor's).
//!
//! Every problem is collected, so one run lists them all, and every one
//! names the mapping file and line.

use std::collections::HashSet;

use crate::config::ReplicaIdentityFix;
use crate::mapping::spec::{ChildRows, LoadedMapping};

use super::relations::{Identity, Persistence, Physical, RelKind, Relation};

/// What publishing one mapped relation takes, once judged safe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePlan {
    pub oid: u32,
    /// `schema.table`, as mappings write it.
    pub qualified: String,
    /// `schema.table`, as SQL writes it.
    pub sql_name: String,
    /// Published through the insert-only publication.
    pub insert_only: bool,
    /// Inheritance children are left out (`children: exclude`): `ONLY`.
    pub only: bool,
    /// A partitioned table: needs `publish_via_partition_root`.
    pub partitioned: bool,
    /// Inheritance children whose rows the mapping covers.
    pub children: Vec<Child>,
    /// Stored generated columns the stream cannot carry (left out).
    pub generated: Vec<String>,
    /// `ALTER TABLE ... REPLICA IDENTITY ...` to run first (opt-in).
    pub identity_ddl: Vec<String>,
    /// Every table with storage whose app writes the publication affects,
    /// with the identity it has (or will have after `identity_ddl`).
    pub physical: Vec<(String, Identity)>,
    /// For the report: how the app's writes keep working.
    pub verdict: String,
}

/// An inheritance child below a mapped parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    pub oid: u32,
    /// `schema.table`, as mappings write it.
    pub qualified: String,
    /// `"schema"."table"`.
    pub sql_name: String,
}

/// The first usable replica identity fix for `p`, under `fix`: the SQL and
/// the identity it gives.
pub fn planned_fix(p: &Physical, fix: ReplicaIdentityFix) -> Option<(String, Identity)> {
    match (fix, &p.usable_index) {
        (ReplicaIdentityFix::Never, _) => None,
        (_, Some(idx)) => Some((
            format!(
                "ALTER TABLE {} REPLICA IDENTITY USING INDEX {}",
                p.sql_name(),
                super::catalog::quote_ident(&idx.name)
            ),
            Identity::Index(idx.clone()),
        )),
        (ReplicaIdentityFix::IndexOrFull, None) => Some((
            format!("ALTER TABLE {} REPLICA IDENTITY FULL", p.sql_name()),
            Identity::Full,
        )),
        (ReplicaIdentityFix::Index, None) => None,
    }
}

/// The ways out for a table without a replica identity, as a message.
fn identity_advice(p: &Physical, partitioned_root: bool, inserts_publication: &str) -> String {
    let mut ways = Vec::new();
    match &p.usable_index {
        Some(idx) => ways.push(format!(
            "`ALTER TABLE {} REPLICA IDENTITY USING INDEX {};` (the unique index on NOT NULL column(s) {}; costs nothing extra)",
            p.sql_name(),
            super::catalog::quote_ident(&idx.name),
            idx.columns.join(", ")
        )),
        None => ways.push(format!(
            "give it a unique index on NOT NULL columns (`CREATE UNIQUE INDEX CONCURRENTLY ... ON {} (...)`), then `ALTER TABLE {} REPLICA IDENTITY USING INDEX <that index>;` (no unique index on NOT NULL columns exists today)",
            p.sql_name(),
            p.sql_name()
        )),
    }
    ways.push(format!(
        "`ALTER TABLE {} REPLICA IDENTITY FULL;` (every UPDATE and DELETE then also writes the whole old row to the WAL: more WAL, about one row's size per change)",
        p.sql_name()
    ));
    ways.push(format!(
        "if the app only inserts into it (an audit log, say): `insert_only: true` in this mapping; its inserts are then published through the insert-only publication `{inserts_publication}`, which lets the app's UPDATE and DELETE run"
    ));
    ways.push("or set `source.postgres.set_replica_identity: index` (or `index_or_full`) and unilog runs the first of these that applies".into());
    let mut text = format!(
        "{} has {}: in a publication of UPDATE and DELETE, PostgreSQL would refuse the app's own UPDATE and DELETE on it (\"cannot update table ... because it does not have a replica identity and publishes updates\"), so unilog does not publish it. Ways out:\n      - {}",
        p.qualified(),
        p.identity.describe(),
        ways.join("\n      - ")
    );
    if partitioned_root {
        text.push_str("\n      (partitions created later start without a replica identity too; a primary key on the partitioned table itself is given to every new partition)");
    }
    text
}

/// Judges one mapping against its relation. `mapped` holds every mapped
/// `schema.table` of the pipeline.
pub fn judge(
    m: &LoadedMapping,
    rel: &Relation,
    mapped: &HashSet<String>,
    fix: ReplicaIdentityFix,
    inserts_publication: &str,
) -> Result<TablePlan, Vec<String>> {
    let q = rel.main.qualified();
    let mut problems = Vec::new();
    let err = |text: String| m.err("table", text).to_string();
    match &rel.main.kind {
        RelKind::Table | RelKind::Partitioned => {}
        RelKind::View => problems.push(err(format!("{q} is a view: a view keeps no rows of its own in the WAL, so logical replication cannot publish it; map the tables it reads from instead, one mapping each"))),
        RelKind::MaterializedView => problems.push(err(format!("{q} is a materialized view: PostgreSQL does not publish materialized views (a REFRESH rewrites them outside logical replication); map the tables it is computed from instead"))),
        RelKind::Foreign => problems.push(err(format!("{q} is a foreign table: its rows live on another server and never pass through this database's WAL; map the table in the database that holds it"))),
        other => problems.push(err(format!("{q} is a {}, not a table; map a table", other.describe()))),
    }
    match rel.main.persistence {
        Persistence::Permanent => {}
        Persistence::Unlogged => problems.push(err(format!("{q} is an UNLOGGED table: its changes are not written to the WAL, so logical replication never sees them. Make it logged with `ALTER TABLE {} SET LOGGED;` (this rewrites the table under an ACCESS EXCLUSIVE lock, so the app waits while it runs: choose a quiet hour), or remove this mapping", rel.main.sql_name()))),
        Persistence::Temporary => problems.push(err(format!("{q} is a temporary table: it exists only in one session and is not replicated; map a permanent table"))),
    }
    if let Some(a) = rel.ancestors.iter().find(|a| mapped.contains(*a)) {
        problems.push(err(format!("{q} is a partition of {a}, which is mapped too: its changes are published as {a}'s (publish_via_partition_root), so this mapping would never see them; remove one of the two mappings")));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let only = m.spec.children == ChildRows::Exclude;
    if !only {
        for c in rel
            .inheritance_children()
            .filter(|c| mapped.contains(&c.qualified()))
        {
            problems.push(err(format!("{} is an inheritance child of {q}, whose mapping publishes its children's rows too; remove the mapping of {}, or set `children: exclude` in this one", c.qualified(), c.qualified())));
        }
    }
    for p in rel.physical(only).skip(1) {
        let what = if p.is_partition {
            "partition"
        } else {
            "child table"
        };
        let bad = match (&p.kind, p.persistence) {
            (RelKind::Foreign, _) => Some("is a foreign table, whose rows never pass through this database's WAL; detach it, or (for an inheritance parent) map the parent with `children: exclude`".to_string()),
            (_, Persistence::Unlogged) => Some(format!("is UNLOGGED, so its changes never reach the WAL; make it logged with `ALTER TABLE {} SET LOGGED;` (a table rewrite under an ACCESS EXCLUSIVE lock)", p.sql_name())),
            (_, Persistence::Temporary) => Some("is a temporary table".to_string()),
            _ => None,
        };
        if let Some(bad) = bad {
            problems.push(err(format!("{what} {} of {q} {bad}", p.qualified())));
        }
    }
    let insert_only = m.spec.insert_only;
    let mut identity_ddl = Vec::new();
    let mut physical = Vec::new();
    let mut missing = Vec::new();
    // A partitioned table has no rows of its own: only its partitions'
    // replica identities decide whether the app's writes work.
    for p in rel
        .physical(only)
        .filter(|p| p.kind != RelKind::Partitioned)
    {
        let mut identity = p.identity.clone();
        if !insert_only && !identity.allows_updates() {
            match planned_fix(p, fix) {
                Some((sql, fixed)) => {
                    identity_ddl.push(sql);
                    identity = fixed;
                }
                None => missing.push(p),
            }
        }
        physical.push((p.qualified(), identity));
    }
    if let Some(first) = missing.first() {
        let mut text = identity_advice(
            first,
            rel.main.kind == RelKind::Partitioned,
            inserts_publication,
        );
        if missing.len() > 1 {
            let others: Vec<String> = missing[1..].iter().map(|p| p.qualified()).collect();
            text.push_str(&format!(
                "\n      the same holds for {} more table(s) below {q}: {}",
                others.len(),
                others.join(", ")
            ));
        }
        problems.push(err(text));
    }
    // The key must be in the old row a delete carries.
    let key: Vec<String> = match &m.spec.key {
        Some(k) => k.clone(),
        None => match &rel.main.identity {
            Identity::PrimaryKey(i) | Identity::Index(i) => i.columns.clone(),
            _ => Vec::new(),
        },
    };
    if !insert_only && missing.is_empty() {
        for (name, identity) in &physical {
            if let Some(cols) = identity.old_row_columns() {
                let absent: Vec<&String> = key.iter().filter(|k| !cols.contains(k)).collect();
                if !absent.is_empty() && !cols.is_empty() {
                    problems.push(m.err("key", format!(
                        "the entity key of {q} has column(s) {} that the old row of a DELETE on {name} does not carry (its {} holds only {}), so deletes could not be keyed; use `key: [{}]`, or run `ALTER TABLE {} REPLICA IDENTITY FULL;` (or USING INDEX on a unique index over the key)",
                        absent.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
                        identity.describe(),
                        cols.join(", "),
                        cols.join(", "),
                        super::catalog::sql_name_of(name),
                    )).to_string());
                    break;
                }
            }
        }
    }
    let generated = if rel.server_major < 18 {
        rel.generated.clone()
    } else {
        Vec::new()
    };
    if let Some(cols) = &m.spec.columns {
        for g in generated.iter().filter(|g| cols.contains_key(*g)) {
            problems.push(m.err(&format!("columns.{g}"), format!(
                "column `{g}` of {q} is a generated column (GENERATED ALWAYS AS ... STORED): PostgreSQL {} does not send generated columns through logical replication (18 does), so its value would be missing from every streamed change; remove it from `columns:` (consumers can compute it from the columns it is made of)",
                rel.server_major
            )).to_string());
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let children: Vec<Child> = if only {
        Vec::new()
    } else {
        rel.inheritance_children()
            .map(|p| Child {
                oid: p.oid,
                qualified: p.qualified(),
                sql_name: p.sql_name(),
            })
            .collect()
    };
    let mut verdict = verdict_text(rel, insert_only, only, &physical, &identity_ddl);
    if rel.main.kind == RelKind::Partitioned
        && !insert_only
        && !matches!(rel.main.identity, Identity::PrimaryKey(_))
    {
        verdict.push_str(match fix {
            ReplicaIdentityFix::Never => "; WARNING: the partitioned table has no primary key, so a partition created later starts without a replica identity and the app's UPDATE and DELETE on it fail until someone gives it one (unilog reports it; `set_replica_identity` lets unilog set it within 10 s); a primary key on the partitioned table avoids this",
            _ => "; the partitioned table has no primary key: a partition created later gets its replica identity from unilog within 10 s, and the app's UPDATE and DELETE on it fail until then; a primary key on the partitioned table avoids this",
        });
    }
    if !generated.is_empty() {
        verdict.push_str(&format!(
            "; generated column(s) {} are not published (PostgreSQL {} does not send them through logical replication)",
            generated.join(", "),
            rel.server_major
        ));
    }
    Ok(TablePlan {
        oid: rel.main.oid,
        qualified: q,
        sql_name: rel.main.sql_name(),
        insert_only,
        only,
        partitioned: rel.main.kind == RelKind::Partitioned,
        children,
        generated,
        identity_ddl,
        physical,
        verdict,
    })
}

fn verdict_text(
    rel: &Relation,
    insert_only: bool,
    only: bool,
    physical: &[(String, Identity)],
    ddl: &[String],
) -> String {
    let q = rel.main.qualified();
    let shape = match (&rel.main.kind, rel.members.len()) {
        (RelKind::Partitioned, n) => format!("partitioned table with {n} partition(s), published under its own name (publish_via_partition_root)"),
        (_, 0) if rel.main.is_partition => "a partition, published under its own name".to_string(),
        (_, 0) => "table".to_string(),
        (_, _) if only => "table (its inheritance children are left out: children: exclude)".to_string(),
        (_, n) => format!("inheritance parent with {n} child table(s), whose rows it publishes"),
    };
    if insert_only {
        return format!("{q} ({shape}): inserts only, through the insert-only publication; the app's UPDATE and DELETE keep working");
    }
    let mut kinds: Vec<String> = physical
        .iter()
        .map(|(_, i)| match i {
            Identity::PrimaryKey(_) => "primary key".to_string(),
            Identity::Index(_) => "REPLICA IDENTITY USING INDEX".to_string(),
            Identity::Full => "REPLICA IDENTITY FULL".to_string(),
            other => other.describe(),
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    let mut text = format!(
        "{q} ({shape}): the app's UPDATE and DELETE keep working (replica identity: {})",
        kinds.join(", ")
    );
    if !ddl.is_empty() {
        text.push_str(&format!(
            "; after unilog runs (set_replica_identity): {}",
            ddl.join("; ")
        ));
    }
    text
}
