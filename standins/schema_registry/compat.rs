//! Compatibility levels and the pairwise Avro check behind them.
//!
//! The registry's rules (`CompatibilityChecker.java`): BACKWARD means the new schema reads data
//! written with an older one, FORWARD the reverse, FULL both; the `*_TRANSITIVE` levels compare
//! against every live version instead of only the latest. Which versions to compare against is
//! the caller's choice ([`crate::registry`]); this module only judges pairs.
//!
//! Each pair goes through `apache_avro`'s `SchemaCompatibility::can_read`. Only
//! `Ok(Compatibility::Full)` counts as compatible: 0.22 answers `Ok(Partial)` where Avro Java
//! rejects (a writer enum symbol missing from a reader enum without a default, a writer union
//! branch the reader cannot read). Known differences from Avro Java that remain: no aliases on
//! named types, decimal precision/scale are compared, and the messages are apache-avro's.

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// A compatibility level, spelled as the registry spells it on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Level {
    None,
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    const ALL: [Level; 7] = [
        Level::None,
        Level::Backward,
        Level::BackwardTransitive,
        Level::Forward,
        Level::ForwardTransitive,
        Level::Full,
        Level::FullTransitive,
    ];

    /// Parses a level in any letter case, as the registry accepts it.
    pub fn parse(text: &str) -> Option<Level> {
        Self::ALL
            .into_iter()
            .find(|level| level.name().eq_ignore_ascii_case(text.trim()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether register compares against every live version rather than only the latest.
    pub fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }
}

/// Checks `new` against each `(version, schema)` in `previous` under `level`.
///
/// Returns one message per failed direction and version; an empty list means compatible.
pub fn check(level: Level, new: &Schema, previous: &[(u32, Schema)]) -> Vec<String> {
    let mut messages = Vec::new();
    for (version, old) in previous {
        if level.backward() {
            if let Some(why) = can_read(old, new) {
                messages.push(format!(
                    "{}: the new schema cannot read data written with version {version}: {why}",
                    level.name()
                ));
            }
        }
        if level.forward() {
            if let Some(why) = can_read(new, old) {
                messages.push(format!(
                    "{}: version {version} cannot read data written with the new schema: {why}",
                    level.name()
                ));
            }
        }
    }
    messages
}

/// `None` when `reader` reads everything `writer` can write, else the reason.
fn can_read(writer: &Schema, reader: &Schema) -> Option<String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        Ok(Compatibility::Partial) => Some(
            "only partially compatible: a writer enum symbol or union branch has no match in \
             the reader (and the reader enum has no default)"
                .to_owned(),
        ),
        Err(err) => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            Some(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Schema {
        Schema::parse_str(text).expect("test schema parses")
    }

    const V1: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"}]}"#;
    const WITH_DEFAULT: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"},{"name":"b","type":"string","default":""}]}"#;
    const NO_DEFAULT: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"},{"name":"b","type":"string"}]}"#;

    #[test]
    fn levels_parse_in_any_case() {
        assert_eq!(Level::parse("full_transitive"), Some(Level::FullTransitive));
        assert_eq!(Level::parse("NONE"), Some(Level::None));
        assert_eq!(Level::parse("sideways"), None);
    }

    #[test]
    fn added_field_needs_a_default_for_backward() {
        let old = vec![(1, schema(V1))];
        assert!(check(Level::Backward, &schema(WITH_DEFAULT), &old).is_empty());
        let messages = check(Level::Backward, &schema(NO_DEFAULT), &old);
        assert_eq!(messages.len(), 1);
        assert!(messages[0].contains("must have a default"), "{messages:?}");
        // Adding a field is always forward-compatible: the old reader skips it.
        assert!(check(Level::Forward, &schema(NO_DEFAULT), &old).is_empty());
        assert!(check(Level::None, &schema(NO_DEFAULT), &old).is_empty());
    }

    #[test]
    fn removed_field_without_default_fails_forward() {
        let old = vec![(1, schema(NO_DEFAULT))];
        assert!(check(Level::Backward, &schema(V1), &old).is_empty());
        assert_eq!(check(Level::Forward, &schema(V1), &old).len(), 1);
        assert_eq!(check(Level::Full, &schema(V1), &old).len(), 1);
    }

    #[test]
    fn partial_enum_match_is_incompatible() {
        let abc = r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#;
        let ab = r#"{"type":"enum","name":"E","symbols":["A","B"]}"#;
        let ab_default = r#"{"type":"enum","name":"E","symbols":["A","B"],"default":"A"}"#;
        // Removing a symbol: the new reader cannot read C (apache-avro says Partial).
        assert_eq!(
            check(Level::Backward, &schema(ab), &[(1, schema(abc))]).len(),
            1
        );
        assert!(check(Level::Backward, &schema(ab_default), &[(1, schema(abc))]).is_empty());
        // Adding a symbol breaks FORWARD.
        assert_eq!(
            check(Level::Forward, &schema(abc), &[(1, schema(ab))]).len(),
            1
        );
    }

    #[test]
    fn nullable_widening_is_backward_only() {
        let plain = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"string"}]}"#;
        let nullable = r#"{"type":"record","name":"T","fields":[{"name":"a","type":["null","string"],"default":null}]}"#;
        assert!(check(Level::Backward, &schema(nullable), &[(1, schema(plain))]).is_empty());
        assert_eq!(
            check(Level::Forward, &schema(nullable), &[(1, schema(plain))]).len(),
            1
        );
    }
}
