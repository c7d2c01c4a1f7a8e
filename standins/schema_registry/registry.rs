//! The registry's state and the rules of each operation, with no HTTP in sight.
//!
//! Everything here is plain data so that the whole state can be cloned, changed, written to the
//! state file and only then made visible (see `AppState::write` in `api.rs`). Errors are
//! [`ApiError`]s carrying the registry's HTTP status and `error_code`, because in a stand-in every
//! error ends up on the wire anyway.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use crate::compat::{self, Level};

/// An error as the registry reports it: `{"error_code": code, "message": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: u32,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(404, 40401, format!("Subject '{subject}' not found."))
    }

    pub fn version_not_found(version: impl std::fmt::Display) -> Self {
        Self::new(404, 40402, format!("Version {version} not found."))
    }

    pub fn schema_not_found() -> Self {
        Self::new(404, 40403, "Schema not found")
    }

    pub fn invalid_schema(detail: impl std::fmt::Display) -> Self {
        Self::new(422, 42201, format!("Invalid schema: {detail}"))
    }

    pub fn invalid_level() -> Self {
        Self::new(
            422,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, \
             backward_transitive, forward_transitive, and full_transitive",
        )
    }

    pub fn store(detail: impl std::fmt::Display) -> Self {
        Self::new(
            500,
            50001,
            format!("Error in the backend data store: {detail}"),
        )
    }
}

/// `{version}` in a path: a number in 1..=2^31-1, or `latest` (also spelled `-1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSel {
    Latest,
    Number(u32),
}

impl VersionSel {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("latest") || text == "-1" {
            return Ok(VersionSel::Latest);
        }
        match text.parse::<i64>() {
            Ok(n) if (1..=i64::from(i32::MAX)).contains(&n) => {
                Ok(VersionSel::Number(u32::try_from(n).unwrap_or(u32::MAX)))
            }
            _ => Err(ApiError::new(
                422,
                42202,
                format!(
                    "The specified version '{text}' is not a valid version id. Allowed values \
                     are between [1, 2^31-1] and the string \"latest\""
                ),
            )),
        }
    }
}

/// A schema from a request body, parsed and keyed.
pub struct Candidate {
    pub schema: Schema,
    /// Registry identity and stored text: apache-avro's compact JSON of the parsed schema.
    pub key: String,
}

impl Candidate {
    /// Parses the `schema`, `schemaType` and `references` fields of a request (42201 on failure).
    pub fn parse(
        schema: Option<&str>,
        schema_type: Option<&str>,
        has_references: bool,
    ) -> Result<Self, ApiError> {
        if let Some(kind) = schema_type {
            if !kind.eq_ignore_ascii_case("AVRO") {
                return Err(ApiError::new(
                    422,
                    42201,
                    format!("Invalid schema type {kind}: this stand-in supports only AVRO"),
                ));
            }
        }
        if has_references {
            return Err(ApiError::new(
                422,
                42201,
                "Invalid schema: schema references are not supported by this stand-in",
            ));
        }
        let text = schema.ok_or_else(|| ApiError::invalid_schema("Empty schema"))?;
        let schema = Schema::parse_str(text).map_err(ApiError::invalid_schema)?;
        let key = serde_json::to_string(&schema).map_err(ApiError::invalid_schema)?;
        Ok(Self { schema, key })
    }
}

/// One version of one subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: u32,
    pub id: u32,
    #[serde(default)]
    pub deleted: bool,
}

/// The whole registry; this is what the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    #[serde(default)]
    pub global_level: Level,
    /// Subject-level compatibility overrides.
    #[serde(default)]
    pub subject_levels: BTreeMap<String, Level>,
    /// Schema text by id. Kept for ever so ids are never reused.
    #[serde(default)]
    pub schemas: BTreeMap<u32, String>,
    /// Versions by subject, ascending; soft-deleted ones included, permanently deleted ones gone.
    #[serde(default)]
    pub subjects: BTreeMap<String, Vec<Version>>,
}

impl Registry {
    /// Reads a state file; a missing file is an empty registry.
    pub fn load(path: &Path) -> io::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(err),
        }
    }

    /// Writes the state file atomically: a temporary file beside it, fsync, rename.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    }

    fn versions_of(&self, subject: &str) -> &[Version] {
        self.subjects.get(subject).map_or(&[], Vec::as_slice)
    }

    fn visible(&self, subject: &str, deleted: bool) -> impl DoubleEndedIterator<Item = &Version> {
        self.versions_of(subject)
            .iter()
            .filter(move |v| deleted || !v.deleted)
    }

    /// The level in force for `subject`: its own, else the global one.
    pub fn level(&self, subject: &str) -> Level {
        self.subject_levels
            .get(subject)
            .copied()
            .unwrap_or(self.global_level)
    }

    fn stored(&self, id: u32) -> Result<Schema, ApiError> {
        let text = self
            .schemas
            .get(&id)
            .ok_or_else(|| ApiError::store(format!("schema id {id} is missing")))?;
        Schema::parse_str(text)
            .map_err(|err| ApiError::store(format!("stored schema id {id} does not parse: {err}")))
    }

    /// POST /subjects/{s}/versions: returns the id, and the version if one was added.
    pub fn register(
        &mut self,
        subject: &str,
        new: &Candidate,
    ) -> Result<(u32, Option<u32>), ApiError> {
        let existing_id = self
            .schemas
            .iter()
            .find(|(_, text)| **text == new.key)
            .map(|(id, _)| *id);
        if let Some(id) = existing_id {
            if self.visible(subject, false).any(|v| v.id == id) {
                return Ok((id, None));
            }
        }
        let messages = self.check(subject, &new.schema, None)?;
        if !messages.is_empty() {
            return Err(ApiError::new(
                409,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \
                     \"{subject}\", details: [{}]",
                    messages.join(", ")
                ),
            ));
        }
        let id = existing_id.unwrap_or_else(|| {
            let id = self.schemas.keys().next_back().map_or(1, |max| max + 1);
            self.schemas.insert(id, new.key.clone());
            id
        });
        let versions = self.subjects.entry(subject.to_owned()).or_default();
        let version = versions.last().map_or(1, |v| v.version + 1);
        versions.push(Version {
            version,
            id,
            deleted: false,
        });
        Ok((id, Some(version)))
    }

    /// Compatibility messages for `schema` in `subject` (empty: compatible).
    ///
    /// `against: None` is register's check (the latest live version, or all of them under a
    /// transitive level); `Some(v)` checks only version `v`, as the registry's
    /// `/compatibility/subjects/{s}/versions/{v}` does, even under transitive levels.
    pub fn check(
        &self,
        subject: &str,
        schema: &Schema,
        against: Option<VersionSel>,
    ) -> Result<Vec<String>, ApiError> {
        let level = self.level(subject);
        if level == Level::None {
            return Ok(Vec::new());
        }
        let live: Vec<&Version> = self.visible(subject, false).collect();
        let chosen: Vec<&Version> = match against {
            None if level.transitive() => live,
            None | Some(VersionSel::Latest) => live.last().copied().into_iter().collect(),
            Some(VersionSel::Number(n)) => vec![live
                .iter()
                .copied()
                .find(|v| v.version == n)
                .ok_or_else(|| ApiError::version_not_found(n))?],
        };
        let previous = chosen
            .into_iter()
            .map(|v| Ok((v.version, self.stored(v.id)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(compat::check(level, schema, &previous))
    }

    /// POST /subjects/{s}: the (version, id) of `key` under `subject`, latest first.
    pub fn lookup(&self, subject: &str, key: &str, deleted: bool) -> Result<Version, ApiError> {
        if self.visible(subject, deleted).next().is_none() {
            return Err(ApiError::subject_not_found(subject));
        }
        self.visible(subject, deleted)
            .rev()
            .find(|v| self.schemas.get(&v.id).is_some_and(|text| text == key))
            .cloned()
            .ok_or_else(ApiError::schema_not_found)
    }

    /// GET /schemas/ids/{id}: resolves while any version, soft-deleted or not, uses the id.
    pub fn schema_by_id(&self, id: u32) -> Result<&str, ApiError> {
        let in_use = self.subjects.values().flatten().any(|v| v.id == id);
        match self.schemas.get(&id) {
            Some(text) if in_use => Ok(text),
            _ => Err(ApiError::schema_not_found()),
        }
    }

    /// GET /schemas/ids/{id}/versions.
    pub fn usages(&self, id: u32, deleted: bool) -> Result<Vec<(String, u32)>, ApiError> {
        self.schema_by_id(id)?;
        Ok(self
            .subjects
            .iter()
            .flat_map(|(subject, versions)| {
                versions
                    .iter()
                    .filter(|v| v.id == id && (deleted || !v.deleted))
                    .map(|v| (subject.clone(), v.version))
            })
            .collect())
    }

    /// GET /subjects.
    pub fn subject_names(&self, deleted: bool) -> Vec<String> {
        self.subjects
            .keys()
            .filter(|s| self.visible(s, deleted).next().is_some())
            .cloned()
            .collect()
    }

    /// GET /subjects/{s}/versions.
    pub fn version_numbers(&self, subject: &str, deleted: bool) -> Result<Vec<u32>, ApiError> {
        let numbers: Vec<u32> = self.visible(subject, deleted).map(|v| v.version).collect();
        if numbers.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        Ok(numbers)
    }

    /// GET /subjects/{s}/versions/{v}.
    pub fn version(
        &self,
        subject: &str,
        sel: VersionSel,
        deleted: bool,
    ) -> Result<Version, ApiError> {
        if self.visible(subject, deleted).next().is_none() {
            return Err(ApiError::subject_not_found(subject));
        }
        let found = match sel {
            VersionSel::Latest => self.visible(subject, deleted).last(),
            VersionSel::Number(n) => self.visible(subject, deleted).find(|v| v.version == n),
        };
        found.cloned().ok_or_else(|| match sel {
            VersionSel::Latest => ApiError::version_not_found(-1),
            VersionSel::Number(n) => ApiError::version_not_found(n),
        })
    }

    /// DELETE /subjects/{s}: soft (hide every version, drop the subject's config) or permanent
    /// (forget versions already soft-deleted).
    pub fn delete_subject(&mut self, subject: &str, permanent: bool) -> Result<Vec<u32>, ApiError> {
        let versions = self.versions_of(subject);
        if versions.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        let all_deleted = versions.iter().all(|v| v.deleted);
        if !permanent && all_deleted {
            return Err(ApiError::new(
                404,
                40404,
                format!(
                    "Subject '{subject}' was soft deleted.Set permanent=true to delete permanently"
                ),
            ));
        }
        if permanent && !all_deleted {
            return Err(ApiError::new(
                404,
                40405,
                format!(
                    "Subject '{subject}' was not deleted first before being permanently deleted"
                ),
            ));
        }
        self.subject_levels.remove(subject);
        let numbers: Vec<u32>;
        if permanent {
            let gone = self.subjects.remove(subject).unwrap_or_default();
            numbers = gone.iter().map(|v| v.version).collect();
        } else {
            let versions = self.subjects.entry(subject.to_owned()).or_default();
            numbers = versions
                .iter()
                .filter(|v| !v.deleted)
                .map(|v| v.version)
                .collect();
            for version in versions.iter_mut() {
                version.deleted = true;
            }
        }
        Ok(numbers)
    }

    /// DELETE /subjects/{s}/versions/{v}: soft, or permanent for a version soft-deleted first.
    pub fn delete_version(
        &mut self,
        subject: &str,
        sel: VersionSel,
        permanent: bool,
    ) -> Result<u32, ApiError> {
        let versions = self.versions_of(subject);
        let found = match sel {
            VersionSel::Latest => versions.last(),
            VersionSel::Number(n) => versions.iter().find(|v| v.version == n),
        };
        let Some(found) = found.cloned() else {
            return Err(match sel {
                _ if versions.is_empty() => ApiError::subject_not_found(subject),
                VersionSel::Latest => ApiError::version_not_found(-1),
                VersionSel::Number(n) => ApiError::version_not_found(n),
            });
        };
        let number = found.version;
        if found.deleted && !permanent {
            return Err(ApiError::new(
                404,
                40406,
                format!(
                    "Subject '{subject}' Version {number} was soft deleted.Set permanent=true to \
                     delete permanently"
                ),
            ));
        }
        if !found.deleted && permanent {
            return Err(ApiError::new(
                404,
                40407,
                format!(
                    "Subject '{subject}' Version {number} was not deleted first before being \
                     permanently deleted"
                ),
            ));
        }
        let versions = self.subjects.entry(subject.to_owned()).or_default();
        if permanent {
            versions.retain(|v| v.version != number);
        } else {
            versions
                .iter_mut()
                .filter(|v| v.version == number)
                .for_each(|v| v.deleted = true);
        }
        if versions.is_empty() {
            self.subjects.remove(subject);
            self.subject_levels.remove(subject);
        }
        Ok(number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_like_the_registry() {
        assert_eq!(VersionSel::parse("latest"), Ok(VersionSel::Latest));
        assert_eq!(VersionSel::parse("-1"), Ok(VersionSel::Latest));
        assert_eq!(VersionSel::parse("7"), Ok(VersionSel::Number(7)));
        assert_eq!(
            VersionSel::parse("2147483647"),
            Ok(VersionSel::Number(2_147_483_647))
        );
        for bad in ["0", "-2", "2147483648", "one", ""] {
            assert_eq!(
                VersionSel::parse(bad).map_err(|e| e.code),
                Err(42202),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_ignores_whitespace_but_not_defaults() {
        let key = |text: &str| Candidate::parse(Some(text), None, false).map(|c| c.key);
        let a =
            key(r#"{"type":"record","name":"T","fields":[{"name":"a","type":"int","default":1}]}"#);
        let b = key(r#"{ "name" : "T", "type" : "record",
                 "fields" : [ { "type" : "int", "name" : "a", "default" : 1 } ] }"#);
        let c =
            key(r#"{"type":"record","name":"T","fields":[{"name":"a","type":"int","default":2}]}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn stored_text_round_trips() {
        let text = r#"{"type":"record","name":"Order","namespace":"shop","doc":"an order",
            "fields":[
              {"name":"id","type":"long"},
              {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
              {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
              {"name":"state","type":{"type":"enum","name":"State","symbols":["NEW","PAID"],"default":"NEW"}},
              {"name":"digest","type":{"type":"fixed","name":"Md5","size":16}},
              {"name":"note","type":["null","string"],"default":null},
              {"name":"lines","type":{"type":"array","items":{"type":"record","name":"Line",
                 "fields":[{"name":"sku","type":"string"},{"name":"qty","type":"int"}]}}},
              {"name":"tags","type":{"type":"map","values":"string"}},
              {"name":"first","type":["null","Line"],"default":null}
            ]}"#;
        let first = Candidate::parse(Some(text), None, false).expect("parses");
        let again = Candidate::parse(Some(&first.key), None, false).expect("stored text parses");
        assert_eq!(first.key, again.key);
        assert_eq!(first.schema, again.schema);
    }

    #[test]
    fn other_schema_types_and_references_are_refused() {
        let schema = Some(r#""string""#);
        let code = |r: Result<Candidate, ApiError>| r.map(|_| ()).map_err(|e| e.code);
        assert_eq!(
            code(Candidate::parse(schema, Some("PROTOBUF"), false)),
            Err(42201)
        );
        assert_eq!(code(Candidate::parse(schema, Some("avro"), false)), Ok(()));
        assert_eq!(code(Candidate::parse(schema, None, true)), Err(42201));
        assert_eq!(code(Candidate::parse(None, None, false)), Err(42201));
    }
}
