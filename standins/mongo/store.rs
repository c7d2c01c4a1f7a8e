//! The data: databases of collections of documents, in memory, in insertion order.
//!
//! One index, on `_id` (as mongod's), so that lookups and single-document writes by `_id` do
//! not scan the collection; every other filter scans it. Each collection has a UUID (the oplog's `ui`), new when a collection is created again after a drop and kept
//! across a rename, as on mongod.

use std::collections::{BTreeMap, HashMap};

use bson::{Bson, Document, Uuid};

use crate::query;

#[derive(Debug, Clone)]
pub struct Collection {
    pub uuid: Uuid,
    /// In insertion order. Change it through `push` and `remove`, which keep the index.
    pub docs: Vec<Document>,
    /// `_id` (as [`id_key`]) -> position in `docs`.
    index: HashMap<String, usize>,
}

/// The index key of an `_id`: numbers by value (`1`, `1L` and `1.0` are one `_id`, as
/// mongod compares them), anything else by its canonical extended JSON.
pub fn id_key(id: &Bson) -> String {
    match id {
        Bson::Int32(i) => format!("n:{}", f64::from(*i)),
        #[allow(clippy::cast_precision_loss)]
        Bson::Int64(i) => format!("n:{}", *i as f64),
        Bson::Double(f) => format!("n:{f}"),
        other => other.clone().into_canonical_extjson().to_string(),
    }
}

impl Collection {
    pub fn new() -> Self {
        Self {
            uuid: Uuid::new(),
            docs: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Index of the document with this `_id`.
    pub fn position(&self, id: &Bson) -> Option<usize> {
        let i = *self.index.get(&id_key(id))?;
        // The index is exact for every `_id` mongod would call equal; check anyway.
        self.docs
            .get(i)
            .filter(|d| d.get("_id").is_some_and(|x| query::values_equal(x, id)))
            .map(|_| i)
    }

    /// Appends a document (its `_id` must be new).
    pub fn push(&mut self, doc: Document) {
        if let Some(id) = doc.get("_id") {
            self.index.insert(id_key(id), self.docs.len());
        }
        self.docs.push(doc);
    }

    /// Removes the document at `i`.
    pub fn remove(&mut self, i: usize) -> Document {
        let doc = self.docs.remove(i);
        if let Some(id) = doc.get("_id") {
            self.index.remove(&id_key(id));
        }
        for pos in self.index.values_mut() {
            if *pos > i {
                *pos -= 1;
            }
        }
        doc
    }

    /// The documents a filter can only match by `_id` (`{_id: v}` or
    /// `{_id: {$in: [...]}}`, nothing else), without a scan; `None` for
    /// other filters.
    pub fn by_id_filter(&self, filter: &Document) -> Option<Vec<&Document>> {
        if filter.len() != 1 {
            return None;
        }
        let ids: Vec<&Bson> = match filter.get("_id")? {
            Bson::Document(op) if op.len() == 1 && op.contains_key("$in") => {
                op.get_array("$in").ok()?.iter().collect()
            }
            Bson::Document(op) if op.keys().any(|k| k.starts_with('$')) => return None,
            // Arrays and regexes match in ways an index lookup does not.
            Bson::Array(_) | Bson::RegularExpression(_) => return None,
            v => vec![v],
        };
        if ids.iter().any(|v| {
            matches!(
                v,
                Bson::Array(_) | Bson::RegularExpression(_) | Bson::Document(_)
            )
        }) {
            return None;
        }
        let mut positions: Vec<usize> = ids.iter().filter_map(|id| self.position(id)).collect();
        positions.sort_unstable();
        positions.dedup();
        Some(positions.into_iter().map(|i| &self.docs[i]).collect())
    }
}

#[derive(Debug, Default)]
pub struct Store {
    pub dbs: BTreeMap<String, BTreeMap<String, Collection>>,
}

impl Store {
    pub fn collection(&self, db: &str, coll: &str) -> Option<&Collection> {
        self.dbs.get(db)?.get(coll)
    }

    pub fn collection_mut(&mut self, db: &str, coll: &str) -> Option<&mut Collection> {
        self.dbs.get_mut(db)?.get_mut(coll)
    }

    /// The current version of the document with this key (`{_id}`), for `updateLookup`.
    pub fn find_by_key(&self, db: &str, coll: &str, key: &Document) -> Option<Document> {
        let c = self.collection(db, coll)?;
        let id = key.get("_id")?;
        c.position(id).map(|i| c.docs[i].clone())
    }

    /// Removes a database's empty map, as mongod forgets a database without collections.
    pub fn forget_if_empty(&mut self, db: &str) {
        if self.dbs.get(db).is_some_and(BTreeMap::is_empty) {
            self.dbs.remove(db);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn the_id_index_follows_pushes_and_removes() {
        let mut c = Collection::new();
        c.push(doc! {"_id": 1, "n": "a"});
        c.push(doc! {"_id": "x", "n": "b"});
        c.push(doc! {"_id": 3.0, "n": "c"});
        // Numbers are one `_id` whatever their type, as on mongod.
        assert_eq!(c.position(&Bson::Int64(1)), Some(0));
        assert_eq!(c.position(&Bson::Int32(3)), Some(2));
        assert_eq!(c.remove(0).get_str("n").unwrap(), "a");
        assert_eq!(c.position(&Bson::Int32(1)), None);
        assert_eq!(c.position(&Bson::String("x".into())), Some(0));
        assert_eq!(c.position(&Bson::Double(3.0)), Some(1));
        let found = c
            .by_id_filter(&doc! {"_id": {"$in": [3, "x", "nope"]}})
            .unwrap();
        assert_eq!(found.len(), 2);
        assert!(c.by_id_filter(&doc! {"_id": {"$gt": 1}}).is_none());
        assert!(c.by_id_filter(&doc! {"_id": 1, "n": "a"}).is_none());
    }
}
