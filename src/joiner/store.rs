//! The joiner's state on local disk (redb), keyed so that one partition's
//! entries form one key range.
//!
//! The store is a cache of the changelog topic, never the truth: a
//! partition's range is wiped and restored from the changelog whenever the
//! partition is assigned to this process (at start, after a crash, after a
//! rebalance). So commits skip the fsync (`Durability::None`): a torn local
//! file costs a restore, never a wrong join.
//!
//! Keys (`p` = input partition, u32 big-endian; `k` = join key; `c` = child id):
//! - left:  `p k`             -> the left record (framed Avro)
//! - right: `p len(k) k c`    -> one right record (framed Avro); `p len(k) k` is the prefix of a key's children
//! - rekey: `p c`             -> the join key a right record was last filed under

use std::path::Path;

use redb::{ReadableTable, TableDefinition};

/// The three tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Left,
    Right,
    Rekey,
}

const LEFT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("left");
const RIGHT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("right");
const REKEY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rekey");

impl Table {
    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        match self {
            Table::Left => LEFT,
            Table::Right => RIGHT,
            Table::Rekey => REKEY,
        }
    }

    /// The tag of this table's entries on the changelog.
    pub fn tag(self) -> u8 {
        match self {
            Table::Left => b'L',
            Table::Right => b'R',
            Table::Rekey => b'K',
        }
    }

    /// The table of a changelog tag.
    pub fn of_tag(t: u8) -> Option<Table> {
        match t {
            b'L' => Some(Table::Left),
            b'R' => Some(Table::Right),
            b'K' => Some(Table::Rekey),
            _ => None,
        }
    }

    const ALL: [Table; 3] = [Table::Left, Table::Right, Table::Rekey];
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A store failure (the disk).
#[derive(Debug, thiserror::Error)]
#[error("join state store {path}: {reason}; the store is a cache of the changelog, so deleting the file is safe")]
pub struct StoreError {
    pub path: String,
    pub reason: String,
}

/// `p k`
pub fn left_key(p: i32, k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + k.len());
    v.extend_from_slice(&p.to_be_bytes());
    v.extend_from_slice(k);
    v
}

/// `p len(k) k`: the prefix of every child of `k`.
pub fn right_prefix(p: i32, k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + k.len());
    v.extend_from_slice(&p.to_be_bytes());
    v.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(k);
    v
}

/// `p len(k) k c`
pub fn right_key(p: i32, k: &[u8], child: &[u8]) -> Vec<u8> {
    let mut v = right_prefix(p, k);
    v.extend_from_slice(child);
    v
}

/// `p c`
pub fn rekey_key(p: i32, child: &[u8]) -> Vec<u8> {
    left_key(p, child)
}

/// The first key after every key that starts with `prefix` (`None`: no end).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The store file.
pub struct Store {
    db: redb::Database,
    path: String,
}

impl Store {
    /// Opens (creating) the store at `path`, emptied: what it held is
    /// restored from the changelog as partitions are assigned.
    pub fn open_empty(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let err = |reason: String| StoreError {
            path: shown.clone(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create the folder: {e}")))?;
        }
        if path.exists() {
            std::fs::remove_file(path).map_err(|e| err(format!("cannot empty it: {e}")))?;
        }
        let db = redb::Database::create(path).map_err(|e| err(e.to_string()))?;
        let store = Store { db, path: shown };
        let txn = store.begin()?;
        txn.commit()?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// A write transaction (reads see its own writes).
    pub fn begin(&self) -> Result<Txn<'_>, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(redb::Durability::None);
        for t in Table::ALL {
            txn.open_table(t.def()).map_err(|e| self.err(e))?;
        }
        Ok(Txn { txn, store: self })
    }
}

/// A write transaction on the store.
pub struct Txn<'a> {
    txn: redb::WriteTransaction,
    store: &'a Store,
}

impl Txn<'_> {
    /// The value of `key`.
    pub fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let table = self
            .txn
            .open_table(t.def())
            .map_err(|e| self.store.err(e))?;
        let v = table.get(key).map_err(|e| self.store.err(e))?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    /// Sets `key`.
    pub fn put(&self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut table = self
            .txn
            .open_table(t.def())
            .map_err(|e| self.store.err(e))?;
        table.insert(key, value).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Removes `key`.
    pub fn del(&self, t: Table, key: &[u8]) -> Result<(), StoreError> {
        let mut table = self
            .txn
            .open_table(t.def())
            .map_err(|e| self.store.err(e))?;
        table.remove(key).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan(&self, t: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let table = self
            .txn
            .open_table(t.def())
            .map_err(|e| self.store.err(e))?;
        let end = prefix_end(prefix);
        let iter = match &end {
            Some(e) => table.range::<&[u8]>(prefix..e.as_slice()),
            None => table.range::<&[u8]>(prefix..),
        }
        .map_err(|e| self.store.err(e))?;
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Removes everything of partition `p` from every table.
    pub fn wipe_partition(&self, p: i32) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in Table::ALL {
            let keys: Vec<Vec<u8>> = self
                .scan(t, &p.to_be_bytes())?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            for k in keys {
                self.del(t, &k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Makes the writes visible to later transactions.
    pub fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        self.txn.commit().map_err(|e| store.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_of_a_key_form_one_range() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_empty(&dir.path().join("s.redb")).unwrap();
        let t = s.begin().unwrap();
        t.put(Table::Right, &right_key(0, b"1", b"a"), b"x")
            .unwrap();
        t.put(Table::Right, &right_key(0, b"1", b"b"), b"y")
            .unwrap();
        // `11` must not be a child of `1`.
        t.put(Table::Right, &right_key(0, b"11", b"a"), b"z")
            .unwrap();
        t.put(Table::Right, &right_key(1, b"1", b"a"), b"w")
            .unwrap();
        let kids = t.scan(Table::Right, &right_prefix(0, b"1")).unwrap();
        assert_eq!(
            kids.iter().map(|(_, v)| v.as_slice()).collect::<Vec<_>>(),
            vec![b"x", b"y"]
        );
        t.put(Table::Left, &left_key(0, b"1"), b"L").unwrap();
        assert_eq!(
            t.get(Table::Left, &left_key(0, b"1")).unwrap().as_deref(),
            Some(&b"L"[..])
        );
        assert_eq!(t.wipe_partition(0).unwrap(), 4);
        assert!(t.get(Table::Left, &left_key(0, b"1")).unwrap().is_none());
        assert_eq!(
            t.scan(Table::Right, &right_prefix(1, b"1")).unwrap().len(),
            1
        );
        t.commit().unwrap();
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }
}
