//! Reads table and type definitions from the Postgres catalog, and turns a
//! type OID into the [`ColumnType`] that decides how values are parsed and
//! published.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::event::{ColumnInfo, ColumnType, SourceKind, TableInfo};

/// Cached catalog reader over an ordinary connection.
pub struct Catalog {
    database: String,
    types: HashMap<(u32, i32), (ColumnType, String)>,
}

/// Built-in types by OID: (type, is text-like).
fn builtin(oid: u32, typmod: i32) -> Option<ColumnType> {
    Some(match oid {
        16 => ColumnType::Bool,
        21 => ColumnType::Int16,
        23 => ColumnType::Int32,
        20 | 26 | 28 => ColumnType::Int64,
        700 => ColumnType::Float32,
        701 => ColumnType::Float64,
        1700 => ColumnType::Numeric(numeric_typmod(typmod)),
        25 | 1043 | 1042 | 19 | 18 => ColumnType::Text,
        17 => ColumnType::Bytes,
        1114 => ColumnType::LocalTimestamp,
        1184 => ColumnType::Timestamp,
        1082 => ColumnType::Date,
        1083 => ColumnType::Time,
        2950 => ColumnType::Uuid,
        114 | 3802 => ColumnType::Json,
        // interval, inet, cidr, macaddr, macaddr8, xml, money, timetz, bit, varbit, tsvector, citext-like
        1186 | 869 | 650 | 829 | 774 | 142 | 790 | 1266 | 1560 | 1562 | 3614 => {
            ColumnType::TextLike
        }
        _ => return None,
    })
}

/// `ty` as an array of `dims` dimensions (`pg_attribute.attndims`, 0 when
/// not declared): `int[][]` is `Array(Array(Int32))`. Not an array: as is.
pub fn with_dims(ty: ColumnType, dims: i32) -> ColumnType {
    let ColumnType::Array(leaf) = ty else {
        return ty;
    };
    let mut out = ColumnType::Array(leaf);
    for _ in 1..dims {
        out = ColumnType::Array(Box::new(out));
    }
    out
}

/// Whether two column types are the same but for the number of array
/// dimensions (a Relation message does not say them).
pub fn same_but_dims(a: &ColumnType, b: &ColumnType) -> bool {
    fn leaf(t: &ColumnType) -> &ColumnType {
        match t {
            ColumnType::Array(i) => leaf(i),
            t => t,
        }
    }
    matches!(a, ColumnType::Array(_)) && matches!(b, ColumnType::Array(_)) && leaf(a) == leaf(b)
}

/// `numeric(p,s)` from its type modifier.
pub fn numeric_typmod(typmod: i32) -> Option<(u32, u32)> {
    if typmod < 4 {
        return None;
    }
    let t = u32::try_from(typmod - 4).ok()?;
    Some(((t >> 16) & 0xffff, t & 0xffff))
}

/// `"a""b"` quoting for identifiers.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` as SQL writes it: `"schema"."table"`.
pub fn sql_name(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// [`sql_name`] of a `schema.table` as mappings write it (split at the
/// first dot).
pub fn sql_name_of(qualified: &str) -> String {
    let (s, n) = qualified.split_once('.').unwrap_or(("public", qualified));
    sql_name(s, n)
}

impl Catalog {
    /// A catalog reader for `database`.
    pub fn new(database: &str) -> Self {
        Catalog {
            database: database.to_string(),
            types: HashMap::new(),
        }
    }

    /// The table `schema.name`, or `None` if it does not exist (or is not
    /// a table). Stored generated columns are left out before PostgreSQL
    /// 18, whose logical replication does not send them. A column is part
    /// of the key when it is in the primary key or, without one, in the
    /// `REPLICA IDENTITY USING INDEX` index.
    pub async fn table(
        &mut self,
        client: &Client,
        schema: &str,
        name: &str,
    ) -> Result<Option<TableInfo>, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        COALESCE((SELECT true FROM pg_index i WHERE i.indrelid = c.oid AND a.attnum = ANY(i.indkey)
                                    AND (i.indisprimary OR (i.indisreplident AND c.relreplident = 'i'
                                         AND NOT EXISTS (SELECT 1 FROM pg_index p WHERE p.indrelid = c.oid AND p.indisprimary)))), false),
                        a.attndims
                 FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
                   AND a.attnum > 0 AND NOT a.attisdropped
                   AND (a.attgenerated = '' OR current_setting('server_version_num')::int >= 180000)
                 ORDER BY a.attnum",
                &[&schema, &name],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut columns = Vec::with_capacity(rows.len());
        for row in rows {
            let oid = u32::try_from(row.get::<_, i64>(1)).unwrap_or_default();
            let typmod: i32 = row.get(2);
            let (ty, _) = self.resolve(client, oid, typmod).await?;
            let ty = with_dims(ty, row.get::<_, i32>(6));
            columns.push(ColumnInfo {
                name: row.get(0),
                type_name: row.get(3),
                ty,
                nullable: !row.get::<_, bool>(4),
                key: row.get(5),
            });
        }
        Ok(Some(TableInfo {
            kind: SourceKind::Postgres,
            database: self.database.clone(),
            schema: schema.to_string(),
            name: name.to_string(),
            columns,
        }))
    }

    /// The [`ColumnType`] and display name of a type OID.
    pub async fn resolve(
        &mut self,
        client: &Client,
        oid: u32,
        typmod: i32,
    ) -> Result<(ColumnType, String), tokio_postgres::Error> {
        if let Some(hit) = self.types.get(&(oid, typmod)) {
            return Ok(hit.clone());
        }
        let resolved = self.resolve_uncached(client, oid, typmod).await?;
        self.types.insert((oid, typmod), resolved.clone());
        Ok(resolved)
    }

    async fn resolve_uncached(
        &mut self,
        client: &Client,
        oid: u32,
        typmod: i32,
    ) -> Result<(ColumnType, String), tokio_postgres::Error> {
        let row = client
            .query_opt(
                "SELECT format_type(oid, $2), typtype::text, typelem::int8, typcategory::text, typbasetype::int8,
                        typname::text, typrelid::int8, typtypmod
                 FROM pg_type WHERE oid = $1::int8::oid",
                &[&i64::from(oid), &typmod],
            )
            .await?;
        let Some(row) = row else {
            return Ok((
                ColumnType::Unsupported(format!("oid {oid}")),
                format!("oid {oid}"),
            ));
        };
        let name: String = row.get(0);
        if let Some(t) = builtin(oid, typmod) {
            return Ok((t, name));
        }
        let typtype: String = row.get(1);
        let elem = u32::try_from(row.get::<_, i64>(2)).unwrap_or_default();
        let category: String = row.get(3);
        let base = u32::try_from(row.get::<_, i64>(4)).unwrap_or_default();
        let typname: String = row.get(5);
        let relid = u32::try_from(row.get::<_, i64>(6)).unwrap_or_default();
        let base_typmod: i32 = row.get(7);
        let ty = match (typtype.as_str(), category.as_str()) {
            ("e", _) => {
                let labels = client
                    .query(
                        "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1::int8::oid ORDER BY enumsortorder",
                        &[&i64::from(oid)],
                    )
                    .await?
                    .into_iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                ColumnType::Enum(labels)
            }
            // A domain is published as its base type (with the domain's
            // own modifier, as `numeric(10,2)` in `CREATE DOMAIN`).
            ("d", _) if base != 0 => {
                let m = if typmod >= 0 { typmod } else { base_typmod };
                Box::pin(self.resolve(client, base, m)).await?.0
            }
            (_, "A") if elem != 0 => {
                let (inner, _) = Box::pin(self.resolve(client, elem, typmod)).await?;
                ColumnType::Array(Box::new(inner))
            }
            ("c", _) if relid != 0 => {
                let attrs = client
                    .query(
                        "SELECT attname::text, atttypid::int8, atttypmod, format_type(atttypid, atttypmod)
                         FROM pg_attribute WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped
                         ORDER BY attnum",
                        &[&i64::from(relid)],
                    )
                    .await?;
                let mut fields = Vec::with_capacity(attrs.len());
                for a in attrs {
                    let f_oid = u32::try_from(a.get::<_, i64>(1)).unwrap_or_default();
                    let (fty, _) = Box::pin(self.resolve(client, f_oid, a.get(2))).await?;
                    fields.push(ColumnInfo {
                        name: a.get(0),
                        type_name: a.get(3),
                        ty: fty,
                        nullable: true,
                        key: false,
                    });
                }
                ColumnType::Record(fields)
            }
            _ => match typname.as_str() {
                "citext" => ColumnType::Text,
                "hstore" => ColumnType::Hstore,
                "geometry" | "geography" => ColumnType::Geometry,
                // Every other base type, ranges and multiranges (and
                // extension types such as ltree) are published as the
                // text a client reads.
                _ if matches!(typtype.as_str(), "b" | "r" | "m") => ColumnType::TextLike,
                _ => ColumnType::Unsupported(name.clone()),
            },
        };
        Ok((ty, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_modifiers_decode() {
        // numeric(10,2): ((10 << 16) | 2) + 4
        assert_eq!(numeric_typmod((10 << 16 | 2) + 4), Some((10, 2)));
        assert_eq!(numeric_typmod(-1), None);
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
