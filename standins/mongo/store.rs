//! The data: databases of collections of documents, in memory, in insertion order.
//!
//! No indexes: lookups by `_id` scan the collection, which is plenty for tests. Each collection
//! has a UUID (the oplog's `ui`), new when a collection is created again after a drop and kept
//! across a rename, as on mongod.

use std::collections::BTreeMap;

use bson::{Bson, Document, Uuid};

use crate::query;

#[derive(Debug, Clone)]
pub struct Collection {
    pub uuid: Uuid,
    pub docs: Vec<Document>,
}

impl Collection {
    pub fn new() -> Self {
        Self {
            uuid: Uuid::new(),
            docs: Vec::new(),
        }
    }

    /// Index of the document with this `_id`.
    pub fn position(&self, id: &Bson) -> Option<usize> {
        self.docs
            .iter()
            .position(|d| d.get("_id").is_some_and(|x| query::values_equal(x, id)))
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
