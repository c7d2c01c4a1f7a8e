//! What a mapped name is in the catalog, and whether publishing it is safe
//! for the application that writes it.
//!
//! Adding a table to a publication that publishes `UPDATE` and `DELETE`
//! changes what the application may do: from then on PostgreSQL refuses
//! the app's own `UPDATE` and `DELETE` on a table whose replica identity
//! cannot name the old row (`cannot update table "t" because it does not
//! have a replica identity and publishes updates`). Some relations cannot
//! be published at all (unlogged and temporary tables, views, foreign
//! tables), and a partitioned table or an inheritance parent is one mapped
//! name over many tables with storage. This module reads those facts, for
//! the named relation and every table below it ([`Relation`]), so that
//! `check` and `run` judge them the same way ([`super::safety`]) before
//! unilog touches a publication.

use tokio_postgres::Client;

use crate::event::pg_qualified;

/// `pg_class.relkind`, as far as publishing cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelKind {
    Table,
    Partitioned,
    View,
    MaterializedView,
    Foreign,
    Sequence,
    /// Indexes, composite types, TOAST tables, ...: the `relkind` letter.
    Other(String),
}

impl RelKind {
    fn from_code(code: &str) -> Self {
        match code {
            "r" => RelKind::Table,
            "p" => RelKind::Partitioned,
            "v" => RelKind::View,
            "m" => RelKind::MaterializedView,
            "f" => RelKind::Foreign,
            "S" => RelKind::Sequence,
            other => RelKind::Other(other.to_string()),
        }
    }

    /// How the catalog's kind reads in a message.
    pub fn describe(&self) -> &str {
        match self {
            RelKind::Table => "table",
            RelKind::Partitioned => "partitioned table",
            RelKind::View => "view",
            RelKind::MaterializedView => "materialized view",
            RelKind::Foreign => "foreign table",
            RelKind::Sequence => "sequence",
            RelKind::Other(_) => "relation that is not a table",
        }
    }
}

/// `pg_class.relpersistence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    Permanent,
    /// `UNLOGGED`: not written to the WAL, so logical replication never sees it.
    Unlogged,
    /// `TEMPORARY`: private to one session.
    Temporary,
}

/// A unique index and its key columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexInfo {
    pub name: String,
    pub columns: Vec<String>,
}

/// What PostgreSQL logs of the old row on `UPDATE` and `DELETE`, which
/// decides whether a publication that publishes them lets the app run them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// `REPLICA IDENTITY DEFAULT` with a primary key.
    PrimaryKey(IndexInfo),
    /// `REPLICA IDENTITY USING INDEX`.
    Index(IndexInfo),
    /// `REPLICA IDENTITY FULL`: the whole old row.
    Full,
    /// `REPLICA IDENTITY DEFAULT` without a primary key: nothing to log.
    Missing,
    /// `REPLICA IDENTITY NOTHING`.
    Nothing,
}

impl Identity {
    /// Whether a publication of `UPDATE`/`DELETE` leaves the app's writes working.
    pub fn allows_updates(&self) -> bool {
        matches!(
            self,
            Identity::PrimaryKey(_) | Identity::Index(_) | Identity::Full
        )
    }

    /// The columns the old row of a delete carries; `None`: all of them.
    pub fn old_row_columns(&self) -> Option<&[String]> {
        match self {
            Identity::PrimaryKey(i) | Identity::Index(i) => Some(&i.columns),
            Identity::Full => None,
            Identity::Missing | Identity::Nothing => Some(&[]),
        }
    }

    /// For a message: `primary key users_pkey`, `REPLICA IDENTITY FULL`, ...
    pub fn describe(&self) -> String {
        match self {
            Identity::PrimaryKey(i) => format!("primary key {}", i.name),
            Identity::Index(i) => format!("REPLICA IDENTITY USING INDEX {}", i.name),
            Identity::Full => "REPLICA IDENTITY FULL".into(),
            Identity::Missing => "no primary key and no replica identity".into(),
            Identity::Nothing => "REPLICA IDENTITY NOTHING".into(),
        }
    }
}

/// One relation of the catalog: the mapped one, or a table below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Physical {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub kind: RelKind,
    pub persistence: Persistence,
    pub identity: Identity,
    /// A unique index that `REPLICA IDENTITY USING INDEX` accepts
    /// (not partial, not deferrable, no expressions, NOT NULL columns).
    pub usable_index: Option<IndexInfo>,
    /// A partition (as opposed to an inheritance child or a top table).
    pub is_partition: bool,
}

impl Physical {
    /// `schema.table`, as written in SQL (quoted where needed).
    pub fn sql_name(&self) -> String {
        super::catalog::sql_name(&self.schema, &self.name)
    }

    /// `schema.table`, as written in mappings.
    pub fn qualified(&self) -> String {
        pg_qualified(&self.schema, &self.name)
    }
}

/// A mapped name and everything below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub main: Physical,
    /// The partitioned tables above this one, nearest first, when it is a partition.
    pub ancestors: Vec<String>,
    /// Partitions at every level (partitioned table) or inheritance
    /// descendants (a parent), in a stable order.
    pub members: Vec<Physical>,
    /// Stored generated columns: logical replication before PostgreSQL 18
    /// does not send them.
    pub generated: Vec<String>,
    /// The server's major version (`server_version_num / 10000`).
    pub server_major: u32,
}

impl Relation {
    /// Inheritance children (not partitions) below this relation.
    pub fn inheritance_children(&self) -> impl Iterator<Item = &Physical> {
        self.members.iter().filter(|m| !m.is_partition)
    }

    /// Whether this is an inheritance parent with children.
    pub fn has_inheritance_children(&self) -> bool {
        self.inheritance_children().next().is_some()
    }

    /// Every relation whose app writes a publication can affect: the
    /// mapped one and (unless `only`) the ones below it.
    pub fn physical(&self, only: bool) -> impl Iterator<Item = &Physical> {
        std::iter::once(&self.main).chain(self.members.iter().filter(move |_| !only))
    }
}

/// The key columns of index `i`, in order (INCLUDE columns left out).
const INDEX_COLUMNS: &str =
    "ARRAY(SELECT a.attname::text FROM generate_series(0, i.indnkeyatts - 1) s(k)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[s.k] ORDER BY s.k)";

/// The facts of the relations whose OIDs are `$1`: kind, persistence,
/// replica identity, and three indexes (primary key, replica identity
/// index, and the best unique index `REPLICA IDENTITY USING INDEX` takes).
fn facts_sql() -> String {
    let index = |filter: &str, order: &str| {
        format!(
            "SELECT ic.relname::text AS name, {INDEX_COLUMNS} AS cols
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
             WHERE i.indrelid = c.oid AND {filter} {order}"
        )
    };
    format!(
        "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence::text,
                c.relreplident::text, c.relispartition,
                pk.name, pk.cols, ri.name, ri.cols, cand.name, cand.cols
         FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN LATERAL ({}) pk ON true
         LEFT JOIN LATERAL ({}) ri ON true
         LEFT JOIN LATERAL ({}) cand ON true
         WHERE c.oid = ANY($1::int8[]::oid[])",
        index("i.indisprimary", ""),
        index("i.indisreplident", ""),
        index(
            "i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
             AND NOT EXISTS (SELECT 1 FROM generate_series(0, i.indnkeyatts - 1) s(k)
                             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[s.k]
                             WHERE NOT a.attnotnull)",
            "ORDER BY i.indisprimary DESC, i.indnkeyatts, ic.relname LIMIT 1"
        ),
    )
}

const DESCENDANTS_SQL: &str = "
WITH RECURSIVE d(oid, depth) AS (
  SELECT inhrelid, 1 FROM pg_inherits WHERE inhparent = $1::int8::oid
  UNION ALL
  SELECT i.inhrelid, d.depth + 1 FROM pg_inherits i JOIN d ON i.inhparent = d.oid WHERE d.depth < 64
)
SELECT DISTINCT oid::int8 FROM d";

fn index(name: Option<String>, cols: Option<Vec<String>>) -> Option<IndexInfo> {
    name.map(|name| IndexInfo {
        name,
        columns: cols.unwrap_or_default(),
    })
}

/// Reads the facts of the relations with these OIDs, in OID order.
pub async fn physical_facts(
    client: &Client,
    oids: &[u32],
) -> Result<Vec<Physical>, tokio_postgres::Error> {
    let ids: Vec<i64> = oids.iter().map(|&o| i64::from(o)).collect();
    let rows = client.query(&facts_sql(), &[&ids]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let pk = index(r.get(7), r.get(8));
        let ri = index(r.get(9), r.get(10));
        let identity = match r.get::<_, String>(5).as_str() {
            "f" => Identity::Full,
            "n" => Identity::Nothing,
            "i" => ri.map_or(Identity::Missing, Identity::Index),
            _ => pk.map_or(Identity::Missing, Identity::PrimaryKey),
        };
        out.push(Physical {
            oid: u32::try_from(r.get::<_, i64>(0)).unwrap_or_default(),
            schema: r.get(1),
            name: r.get(2),
            kind: RelKind::from_code(&r.get::<_, String>(3)),
            persistence: match r.get::<_, String>(4).as_str() {
                "u" => Persistence::Unlogged,
                "t" => Persistence::Temporary,
                _ => Persistence::Permanent,
            },
            identity,
            usable_index: index(r.get(11), r.get(12)),
            is_partition: r.get(6),
        });
    }
    out.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    Ok(out)
}

/// The OID of `schema.name`, if such a relation exists.
pub async fn oid_of(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<u32>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await?;
    Ok(row.map(|r| u32::try_from(r.get::<_, i64>(0)).unwrap_or_default()))
}

/// The OIDs of every partition and inheritance descendant of `oid`.
pub async fn descendants(client: &Client, oid: u32) -> Result<Vec<u32>, tokio_postgres::Error> {
    let rows = client.query(DESCENDANTS_SQL, &[&i64::from(oid)]).await?;
    Ok(rows
        .iter()
        .map(|r| u32::try_from(r.get::<_, i64>(0)).unwrap_or_default())
        .collect())
}

/// Reads `schema.name` and everything below it; `None` when it does not exist.
pub async fn load(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<Relation>, tokio_postgres::Error> {
    let Some(oid) = oid_of(client, schema, name).await? else {
        return Ok(None);
    };
    let Some(main) = physical_facts(client, &[oid]).await?.pop() else {
        return Ok(None);
    };
    let ancestors = if main.is_partition {
        client
            .query(
                "SELECT n.nspname::text, c.relname::text
                 FROM pg_partition_ancestors($1::int8::oid) WITH ORDINALITY a(relid, ord)
                 JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE a.relid <> $1::int8::oid ORDER BY a.ord",
                &[&i64::from(oid)],
            )
            .await?
            .iter()
            .map(|r| pg_qualified(&r.get::<_, String>(0), &r.get::<_, String>(1)))
            .collect()
    } else {
        Vec::new()
    };
    let below = descendants(client, oid).await?;
    let members = if below.is_empty() {
        Vec::new()
    } else {
        physical_facts(client, &below).await?
    };
    let generated = client
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''
             ORDER BY attnum",
            &[&i64::from(oid)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let server_major = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get::<_, i32>(0);
    Ok(Some(Relation {
        main,
        ancestors,
        members,
        generated,
        server_major: u32::try_from(server_major / 10000).unwrap_or_default(),
    }))
}
