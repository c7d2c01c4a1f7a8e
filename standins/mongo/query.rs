//! Documents in, documents out: BSON ordering, filters, sorts, update operators and the `$v: 2`
//! update diff that the oplog records.
//!
//! Only a small part of MongoDB's query language is here: equality (on dotted paths, matching
//! array elements too), `$eq $ne $gt $gte $lt $lte $in $nin $exists`, and `$and $or $nor`.
//! Update operators: `$set $unset $inc $mul $min $max $setOnInsert $push` (with `$each`),
//! `$rename`, and replacement documents.

use std::cmp::Ordering;

use bson::{doc, Bson, Document};

use crate::server::CommandError;

// ------------------------------------------------------------------------------------------
// ordering

/// MongoDB's canonical type order (numbers compare across types, as do strings and symbols).
fn type_rank(value: &Bson) -> u8 {
    match value {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) => 4,
        Bson::Array(_) => 5,
        Bson::Binary(_) => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Timestamp(_) => 10,
        Bson::RegularExpression(_) => 11,
        Bson::DbPointer(_) => 12,
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) => 13,
        Bson::MaxKey => 14,
    }
}

pub fn as_f64(value: &Bson) -> Option<f64> {
    match value {
        Bson::Int32(v) => Some(f64::from(*v)),
        #[allow(clippy::cast_precision_loss)]
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

/// Total order over BSON values, close to the server's (Decimal128 compares as equal to every
/// other number: not supported).
pub fn compare(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => x.cmp(y),
        (Bson::Int64(x), Bson::Int64(y)) => x.cmp(y),
        (Bson::Int32(x), Bson::Int64(y)) => i64::from(*x).cmp(y),
        (Bson::Int64(x), Bson::Int32(y)) => x.cmp(&i64::from(*y)),
        _ if ra == 2 => match (as_f64(a), as_f64(b)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => Ordering::Equal,
        },
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => x.cmp(y),
        (Bson::Document(x), Bson::Document(y)) => compare_docs(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                let o = compare(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then(u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then(x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => x.cmp(y),
        _ => Ordering::Equal,
    }
}

fn compare_docs(x: &Document, y: &Document) -> Ordering {
    for ((kx, vx), (ky, vy)) in x.iter().zip(y.iter()) {
        let o = type_rank(vx)
            .cmp(&type_rank(vy))
            .then_with(|| kx.cmp(ky))
            .then_with(|| compare(vx, vy));
        if o != Ordering::Equal {
            return o;
        }
    }
    x.len().cmp(&y.len())
}

/// Equal as the server sees it (1 == 1.0 == Int64(1)).
pub fn values_equal(a: &Bson, b: &Bson) -> bool {
    compare(a, b) == Ordering::Equal
}

// ------------------------------------------------------------------------------------------
// paths

/// The value at a dotted path; numeric components index arrays.
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut current = doc.get(parts.next()?)?;
    for part in parts {
        current = match current {
            Bson::Document(d) => d.get(part)?,
            Bson::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Sets a dotted path, creating intermediate documents; arrays grow with nulls as on mongod.
fn set_path(doc: &mut Document, path: &str, value: Bson) -> Result<(), CommandError> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    match rest {
        None => {
            doc.insert(head, value);
            Ok(())
        }
        Some(rest) => {
            let child = doc
                .entry(head.to_string())
                .or_insert_with(|| Bson::Document(Document::new()));
            set_in_value(child, rest, value, path)
        }
    }
}

fn set_in_value(
    target: &mut Bson,
    path: &str,
    value: Bson,
    full: &str,
) -> Result<(), CommandError> {
    match target {
        Bson::Document(d) => set_path(d, path, value),
        Bson::Array(a) => {
            let (head, rest) = match path.split_once('.') {
                Some((h, r)) => (h, Some(r)),
                None => (path, None),
            };
            let index: usize = head.parse().map_err(|_| {
                CommandError::path_not_viable(format!(
                    "Cannot create field '{head}' in element of array in path '{full}'"
                ))
            })?;
            while a.len() <= index {
                a.push(Bson::Null);
            }
            match rest {
                None => {
                    a[index] = value;
                    Ok(())
                }
                Some(rest) => {
                    if matches!(a[index], Bson::Null) {
                        a[index] = Bson::Document(Document::new());
                    }
                    set_in_value(&mut a[index], rest, value, full)
                }
            }
        }
        _ => Err(CommandError::path_not_viable(format!(
            "Cannot create field in path '{full}': a non-document is in the way"
        ))),
    }
}

fn unset_path(doc: &mut Document, path: &str) {
    match path.split_once('.') {
        None => {
            doc.remove(path);
        }
        Some((head, rest)) => match doc.get_mut(head) {
            Some(Bson::Document(d)) => unset_path(d, rest),
            Some(Bson::Array(a)) => {
                if let Some((i, r)) = rest.split_once('.').or(Some((rest, ""))) {
                    if let Ok(i) = i.parse::<usize>() {
                        if let Some(item) = a.get_mut(i) {
                            if r.is_empty() {
                                *item = Bson::Null;
                            } else if let Bson::Document(d) = item {
                                unset_path(d, r);
                            }
                        }
                    }
                }
            }
            _ => {}
        },
    }
}

// ------------------------------------------------------------------------------------------
// filters

/// Does `doc` match `filter`?
pub fn matches(doc: &Document, filter: &Document) -> Result<bool, CommandError> {
    for (key, condition) in filter {
        let ok = match key.as_str() {
            "$and" => clauses(condition)?.iter().try_fold(true, |acc, f| {
                Ok::<_, CommandError>(acc && matches(doc, f)?)
            })?,
            "$or" => clauses(condition)?.iter().try_fold(false, |acc, f| {
                Ok::<_, CommandError>(acc || matches(doc, f)?)
            })?,
            "$nor" => !clauses(condition)?.iter().try_fold(false, |acc, f| {
                Ok::<_, CommandError>(acc || matches(doc, f)?)
            })?,
            k if k.starts_with('$') => {
                return Err(CommandError::bad_value(format!(
                    "unknown top level operator: {k} (not supported by the stand-in)"
                )))
            }
            path => field_matches(get_path(doc, path), condition)?,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn clauses(value: &Bson) -> Result<Vec<&Document>, CommandError> {
    match value {
        Bson::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Bson::Document(d) => Ok(d),
                _ => Err(CommandError::bad_value(
                    "$and/$or/$nor entries must be objects",
                )),
            })
            .collect(),
        _ => Err(CommandError::bad_value(
            "$and/$or/$nor must be a nonempty array",
        )),
    }
}

fn is_operator_doc(condition: &Bson) -> Option<&Document> {
    match condition {
        Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => Some(d),
        _ => None,
    }
}

fn field_matches(value: Option<&Bson>, condition: &Bson) -> Result<bool, CommandError> {
    let Some(ops) = is_operator_doc(condition) else {
        return Ok(equals_or_contains(value, condition));
    };
    for (op, arg) in ops {
        let ok = match op.as_str() {
            "$eq" => equals_or_contains(value, arg),
            "$ne" => !equals_or_contains(value, arg),
            "$gt" => ordered(value, arg, |o| o == Ordering::Greater),
            "$gte" => ordered(value, arg, |o| o != Ordering::Less),
            "$lt" => ordered(value, arg, |o| o == Ordering::Less),
            "$lte" => ordered(value, arg, |o| o != Ordering::Greater),
            "$in" => in_list(value, arg)?,
            "$nin" => !in_list(value, arg)?,
            "$exists" => value.is_some() == truthy(arg),
            other => {
                return Err(CommandError::bad_value(format!(
                    "unknown operator: {other} (not supported by the stand-in)"
                )))
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn equals_or_contains(value: Option<&Bson>, wanted: &Bson) -> bool {
    match value {
        None => matches!(wanted, Bson::Null),
        Some(v) if values_equal(v, wanted) => true,
        Some(Bson::Array(items)) => items.iter().any(|i| values_equal(i, wanted)),
        Some(_) => false,
    }
}

/// Comparison operators only compare within one canonical type, like the server.
fn ordered(value: Option<&Bson>, arg: &Bson, test: impl Fn(Ordering) -> bool) -> bool {
    let check = |v: &Bson| type_rank(v) == type_rank(arg) && test(compare(v, arg));
    match value {
        None => false,
        Some(Bson::Array(items)) if type_rank(arg) != 5 => items.iter().any(check),
        Some(v) => check(v),
    }
}

fn in_list(value: Option<&Bson>, arg: &Bson) -> Result<bool, CommandError> {
    match arg {
        Bson::Array(items) => Ok(items.iter().any(|w| equals_or_contains(value, w))),
        _ => Err(CommandError::bad_value("$in/$nin needs an array")),
    }
}

/// Truthiness as the server reads flags such as `$exists: 1`.
pub fn truthy(value: &Bson) -> bool {
    match value {
        Bson::Boolean(b) => *b,
        Bson::Null | Bson::Undefined => false,
        other => as_f64(other).is_none_or(|f| f != 0.0),
    }
}

// ------------------------------------------------------------------------------------------
// sort and projection

/// Sorts by a `{field: 1|-1, ...}` specification.
pub fn sort_docs(docs: &mut [Document], spec: &Document) {
    // `$natural` is the stored order (insertion order here), as mongod's.
    if let Some(direction) = spec.get("$natural") {
        if as_f64(direction).is_some_and(|d| d < 0.0) {
            docs.reverse();
        }
        return;
    }
    docs.sort_by(|a, b| {
        for (field, direction) in spec {
            let null = Bson::Null;
            let o = compare(
                get_path(a, field).unwrap_or(&null),
                get_path(b, field).unwrap_or(&null),
            );
            let o = if as_f64(direction).is_some_and(|d| d < 0.0) {
                o.reverse()
            } else {
                o
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
}

/// Top-level inclusion or exclusion projection (`_id` included unless excluded).
pub fn project(doc: Document, projection: &Document) -> Document {
    if projection.is_empty() {
        return doc;
    }
    let inclusion = projection.iter().any(|(k, v)| k != "_id" && truthy(v));
    let keep_id = projection.get("_id").is_none_or(truthy);
    doc.into_iter()
        .filter(|(k, _)| {
            if k == "_id" {
                keep_id
            } else if inclusion {
                projection.get(k).is_some_and(truthy)
            } else {
                projection.get(k).is_none_or(truthy)
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// updates

/// Is `update` a replacement document (no `$` operators)?
pub fn is_replacement(update: &Document) -> bool {
    update.keys().next().is_none_or(|k| !k.starts_with('$'))
}

/// Applies operator updates to a copy of `doc`. `inserting` enables `$setOnInsert`.
pub fn apply_update(
    doc: &Document,
    update: &Document,
    inserting: bool,
) -> Result<Document, CommandError> {
    let mut out = doc.clone();
    for (op, fields) in update {
        let Bson::Document(fields) = fields else {
            return Err(CommandError::failed_to_parse(format!(
                "Modifiers operate on fields but we found type {:?} instead",
                fields.element_type()
            )));
        };
        for (path, arg) in fields {
            if path == "_id" || path.starts_with("_id.") {
                if op == "$set" && doc.get("_id").is_some_and(|id| values_equal(id, arg)) {
                    continue;
                }
                if !(inserting && matches!(op.as_str(), "$set" | "$setOnInsert")) {
                    return Err(CommandError::immutable_field());
                }
            }
            match op.as_str() {
                "$set" => set_path(&mut out, path, arg.clone())?,
                "$setOnInsert" => {
                    if inserting {
                        set_path(&mut out, path, arg.clone())?;
                    }
                }
                "$unset" => unset_path(&mut out, path),
                "$inc" | "$mul" => {
                    let current = get_path(&out, path).cloned();
                    let new = arith(op, current.as_ref(), arg, path)?;
                    set_path(&mut out, path, new)?;
                }
                "$min" | "$max" => {
                    let replace = match get_path(&out, path) {
                        None => true,
                        Some(cur) => {
                            let o = compare(arg, cur);
                            (op == "$min" && o == Ordering::Less)
                                || (op == "$max" && o == Ordering::Greater)
                        }
                    };
                    if replace {
                        set_path(&mut out, path, arg.clone())?;
                    }
                }
                "$push" => {
                    let items = match arg {
                        Bson::Document(d) if d.contains_key("$each") => match d.get("$each") {
                            Some(Bson::Array(a)) => a.clone(),
                            _ => return Err(CommandError::bad_value("$each needs an array")),
                        },
                        other => vec![other.clone()],
                    };
                    let mut array = match get_path(&out, path) {
                        None => Vec::new(),
                        Some(Bson::Array(a)) => a.clone(),
                        Some(_) => {
                            return Err(CommandError::bad_value(format!(
                                "The field '{path}' must be an array"
                            )))
                        }
                    };
                    array.extend(items);
                    set_path(&mut out, path, Bson::Array(array))?;
                }
                "$rename" => {
                    let Bson::String(to) = arg else {
                        return Err(CommandError::bad_value("$rename target must be a string"));
                    };
                    if let Some(v) = get_path(&out, path).cloned() {
                        unset_path(&mut out, path);
                        set_path(&mut out, to, v)?;
                    }
                }
                other => {
                    return Err(CommandError::failed_to_parse(format!(
                        "Unknown modifier: {other} (not supported by the stand-in)"
                    )))
                }
            }
        }
    }
    Ok(out)
}

fn arith(op: &str, current: Option<&Bson>, arg: &Bson, path: &str) -> Result<Bson, CommandError> {
    let bad = || {
        CommandError::type_mismatch(format!(
            "Cannot apply {op} to a value of non-numeric type at '{path}'"
        ))
    };
    if as_f64(arg).is_none() {
        return Err(bad());
    }
    let zero = Bson::Int32(0);
    let current = match current {
        None if op == "$inc" => &zero,
        None => return Ok(zero_like(arg)),
        Some(c) => c,
    };
    let mul = op == "$mul";
    Ok(match (current, arg) {
        (Bson::Int32(a), Bson::Int32(b)) => {
            let r = if mul {
                a.checked_mul(*b)
            } else {
                a.checked_add(*b)
            };
            r.map_or_else(
                || {
                    let (a, b) = (i64::from(*a), i64::from(*b));
                    Bson::Int64(if mul { a * b } else { a + b })
                },
                Bson::Int32,
            )
        }
        (Bson::Int32(_) | Bson::Int64(_), Bson::Int32(_) | Bson::Int64(_)) => {
            let a = int64(current);
            let b = int64(arg);
            Bson::Int64(if mul {
                a.wrapping_mul(b)
            } else {
                a.wrapping_add(b)
            })
        }
        _ => {
            let (a, b) = (
                as_f64(current).ok_or_else(bad)?,
                as_f64(arg).ok_or_else(bad)?,
            );
            Bson::Double(if mul { a * b } else { a + b })
        }
    })
}

fn int64(v: &Bson) -> i64 {
    match v {
        Bson::Int32(x) => i64::from(*x),
        Bson::Int64(x) => *x,
        _ => 0,
    }
}

fn zero_like(v: &Bson) -> Bson {
    match v {
        Bson::Int64(_) => Bson::Int64(0),
        Bson::Double(_) => Bson::Double(0.0),
        _ => Bson::Int32(0),
    }
}

/// The new document for a replacement: `_id` first, kept from the old document.
pub fn replacement(old_id: &Bson, update: &Document) -> Result<Document, CommandError> {
    if let Some(id) = update.get("_id") {
        if !values_equal(id, old_id) {
            return Err(CommandError::immutable_field());
        }
    }
    let mut out = doc! { "_id": old_id.clone() };
    for (k, v) in update {
        if k != "_id" {
            out.insert(k.clone(), v.clone());
        }
    }
    Ok(out)
}

/// The document an upsert starts from: the query's top-level equality fields.
pub fn upsert_seed(query: &Document) -> Document {
    let mut seed = Document::new();
    for (k, v) in query {
        if k.starts_with('$') || is_operator_doc(v).is_some() {
            if let Some(eq) = is_operator_doc(v).and_then(|d| d.get("$eq")) {
                let _ = set_path(&mut seed, k, eq.clone());
            }
            continue;
        }
        let _ = set_path(&mut seed, k, v.clone());
    }
    seed
}

// ------------------------------------------------------------------------------------------
// the $v:2 diff

/// The `$v: 2` delta between two versions of a document, as mongod 5.0+ logs it:
/// `{d: {f: false}, u: {f: v}, i: {f: v}, s<f>: {sub-diff}}`; sub-diffs of arrays carry
/// `a: true`, an `l` (new length) when the array shrank, and `u<index>` for changed or added
/// elements. `None` when nothing changed (mongod then logs nothing).
pub fn diff(pre: &Document, post: &Document) -> Option<Document> {
    let d = diff_docs(pre, post);
    (!d.is_empty()).then_some(d)
}

fn diff_docs(pre: &Document, post: &Document) -> Document {
    let mut deletes = Document::new();
    let mut updates = Document::new();
    let mut inserts = Document::new();
    let mut subs = Document::new();
    for (k, _) in pre {
        if !post.contains_key(k) {
            deletes.insert(k.clone(), false);
        }
    }
    for (k, new) in post {
        match pre.get(k) {
            None => {
                inserts.insert(k.clone(), new.clone());
            }
            Some(old) if identical(old, new) => {}
            Some(Bson::Document(o)) if matches!(new, Bson::Document(_)) => {
                if let Bson::Document(n) = new {
                    subs.insert(format!("s{k}"), diff_docs(o, n));
                }
            }
            Some(Bson::Array(o)) if matches!(new, Bson::Array(_)) => {
                if let Bson::Array(n) = new {
                    subs.insert(format!("s{k}"), diff_arrays(o, n));
                }
            }
            Some(_) => {
                updates.insert(k.clone(), new.clone());
            }
        }
    }
    let mut out = Document::new();
    if !deletes.is_empty() {
        out.insert("d", deletes);
    }
    if !updates.is_empty() {
        out.insert("u", updates);
    }
    if !inserts.is_empty() {
        out.insert("i", inserts);
    }
    out.extend(subs);
    out
}

fn diff_arrays(pre: &[Bson], post: &[Bson]) -> Document {
    let mut out = doc! { "a": true };
    if post.len() < pre.len() {
        out.insert("l", i32::try_from(post.len()).unwrap_or(i32::MAX));
    }
    for (i, new) in post.iter().enumerate() {
        if pre.get(i).is_none_or(|old| !identical(old, new)) {
            out.insert(format!("u{i}"), new.clone());
        }
    }
    out
}

/// Same value and same type (the diff logs a change from 1 to 1.0).
fn identical(a: &Bson, b: &Bson) -> bool {
    a == b
}

/// `updateDescription` of a change event, from a `$v: 2` diff.
pub fn update_description(diff: &Document) -> Document {
    let mut updated = Document::new();
    let mut removed = Vec::new();
    let mut truncated = Vec::new();
    describe(diff, "", &mut updated, &mut removed, &mut truncated);
    doc! {
        "updatedFields": updated,
        "removedFields": removed,
        "truncatedArrays": truncated,
    }
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

fn describe(
    diff: &Document,
    prefix: &str,
    updated: &mut Document,
    removed: &mut Vec<Bson>,
    truncated: &mut Vec<Bson>,
) {
    let is_array = diff.get("a").is_some_and(truthy);
    for (key, value) in diff {
        match (key.as_str(), value) {
            ("a", _) if is_array => {}
            ("l", v) if is_array => truncated.push(Bson::Document(doc! {
                "field": prefix,
                "newSize": i32::try_from(int64(v)).unwrap_or(i32::MAX),
            })),
            ("d", Bson::Document(fields)) if !is_array => {
                for (f, _) in fields {
                    removed.push(Bson::String(join(prefix, f)));
                }
            }
            ("u" | "i", Bson::Document(fields)) if !is_array => {
                for (f, v) in fields {
                    updated.insert(join(prefix, f), v.clone());
                }
            }
            (k, v) if is_array && k.starts_with('u') => {
                updated.insert(join(prefix, &k[1..]), v.clone());
            }
            (k, Bson::Document(sub)) if k.starts_with('s') => {
                describe(sub, &join(prefix, &k[1..]), updated, removed, truncated);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let d = doc! {"_id": 3, "a": {"b": "x"}, "tags": ["p", "q"], "n": 2.5};
        assert!(matches(&d, &doc! {"_id": 3_i64}).unwrap());
        assert!(matches(&d, &doc! {"a.b": "x", "tags": "q"}).unwrap());
        assert!(matches(&d, &doc! {"_id": {"$gt": 2, "$lte": 3}}).unwrap());
        assert!(!matches(&d, &doc! {"_id": {"$gt": "2"}}).unwrap());
        assert!(matches(&d, &doc! {"$or": [{"n": 1}, {"n": {"$in": [2.5]}}]}).unwrap());
        assert!(matches(&d, &doc! {"missing": {"$exists": false}}).unwrap());
        assert!(matches(&d, &doc! {"x": {"$regex": "a"}}).is_err());
    }

    #[test]
    fn diff_matches_the_documented_example() {
        let pre = doc! {"_id": 1, "old": 1, "n": 1, "arr": [1, 2, 3], "sub": {"j": 0}};
        let post = doc! {"_id": 1, "n": 5, "arr": [1, "x"], "sub": {"j": 0, "k": 1}};
        let d = diff(&pre, &post).unwrap();
        assert_eq!(
            d,
            doc! {"d": {"old": false}, "u": {"n": 5}, "sarr": {"a": true, "l": 2, "u1": "x"}, "ssub": {"i": {"k": 1}}}
        );
        assert_eq!(
            update_description(&d),
            doc! {
                "updatedFields": {"n": 5, "arr.1": "x", "sub.k": 1},
                "removedFields": ["old"],
                "truncatedArrays": [{"field": "arr", "newSize": 2}],
            }
        );
        assert_eq!(diff(&pre, &pre), None);
    }

    #[test]
    fn operators() {
        let d = doc! {"_id": 1, "n": 1, "s": {"a": 1}};
        let u =
            doc! {"$set": {"s.b": 2, "x": "y"}, "$inc": {"n": 2, "m": 1}, "$unset": {"s.a": ""}};
        assert_eq!(
            apply_update(&d, &u, false).unwrap(),
            doc! {"_id": 1, "n": 3, "s": {"b": 2}, "x": "y", "m": 1}
        );
        assert!(apply_update(&d, &doc! {"$set": {"_id": 2}}, false).is_err());
        assert!(apply_update(&d, &doc! {"$bogus": {"a": 1}}, false).is_err());
        assert_eq!(
            apply_update(&d, &doc! {"$push": {"l": {"$each": [1, 2]}}}, false).unwrap(),
            doc! {"_id": 1, "n": 1, "s": {"a": 1}, "l": [1, 2]}
        );
    }
}
