//! Output text of the structured types that are not arrays: composite
//! rows (`(1,"a b",)`), `hstore` (`"a"=>"1", "b"=>NULL`), and PostGIS
//! geometries (hex EWKB). Split from [`super::values`], which calls these.

use std::borrow::Cow;

use crate::event::{ColumnInfo, Value};

type Reason = Cow<'static, str>;

/// A composite value: `(f1,f2,...)`. An empty field is NULL; a field may be
/// double-quoted, with `""` or `\"` for a quote and `\\` for a backslash.
/// Each field is parsed by its own type.
pub fn parse_composite(fields: &[ColumnInfo], text: &str) -> Result<Value, Reason> {
    if fields.is_empty() && text == "()" {
        return Ok(Value::Record(Vec::new()));
    }
    let raw = split_composite(text)?;
    if raw.len() != fields.len() {
        return Err(format!("has {} fields, the type has {}", raw.len(), fields.len()).into());
    }
    let mut out = Vec::with_capacity(fields.len());
    for (f, r) in fields.iter().zip(raw) {
        out.push(match r {
            None => Value::Null,
            Some(t) => super::values::parse_text(&f.ty, &t)
                .map_err(|e| format!("field `{}`: {e}", f.name))?,
        });
    }
    Ok(Value::Record(out))
}

/// The fields of a composite literal; `None` for NULL.
fn split_composite(text: &str) -> Result<Vec<Option<String>>, Reason> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or("expected '(' ... ')'")?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        let mut field = String::new();
        let mut quoted = false;
        loop {
            match chars.peek().copied() {
                None | Some(',') => break,
                Some('"') => {
                    chars.next();
                    quoted = true;
                    loop {
                        match chars.next() {
                            None => return Err("unterminated quoted field".into()),
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some(c) => field.push(c),
                                None => return Err("ends in a backslash".into()),
                            },
                            Some(c) => field.push(c),
                        }
                    }
                }
                Some('\\') => {
                    chars.next();
                    match chars.next() {
                        Some(c) => field.push(c),
                        None => return Err("ends in a backslash".into()),
                    }
                    quoted = true;
                }
                Some(c) => {
                    chars.next();
                    field.push(c);
                }
            }
        }
        out.push((quoted || !field.is_empty()).then_some(field));
        if chars.next().is_none() {
            return Ok(out);
        }
    }
}

/// An `hstore` as JSON text: an object of strings (or null), keys sorted.
pub fn hstore_json(text: &str) -> Result<String, Reason> {
    let mut map = serde_json::Map::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (key, after) = hstore_string(rest)?;
        let after = after
            .trim_start()
            .strip_prefix("=>")
            .ok_or("expected '=>' after a key")?
            .trim_start();
        let (value, after) = if let Some(tail) = after.strip_prefix("NULL") {
            (serde_json::Value::Null, tail)
        } else {
            let (v, tail) = hstore_string(after)?;
            (serde_json::Value::String(v), tail)
        };
        map.insert(key, value);
        rest = after.trim_start();
        if let Some(tail) = rest.strip_prefix(',') {
            rest = tail.trim_start();
        } else if !rest.is_empty() {
            return Err("expected ',' between pairs".into());
        }
    }
    Ok(serde_json::Value::Object(map).to_string())
}

/// One double-quoted hstore string, with backslash escapes undone.
fn hstore_string(s: &str) -> Result<(String, &str), Reason> {
    let body = s.strip_prefix('"').ok_or("expected '\"'")?;
    let mut out = String::new();
    let mut iter = body.char_indices();
    while let Some((i, c)) = iter.next() {
        match c {
            '"' => return Ok((out, &body[i + 1..])),
            '\\' => match iter.next() {
                Some((_, c)) => out.push(c),
                None => return Err("ends in a backslash".into()),
            },
            c => out.push(c),
        }
    }
    Err("unterminated string".into())
}

/// A PostGIS `geometry`/`geography`: its output is hex EWKB, published as
/// those bytes.
pub fn ewkb(text: &str) -> Result<Vec<u8>, Reason> {
    if !text.len().is_multiple_of(2) {
        return Err("hex EWKB of odd length".into());
    }
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|p| Some((hex(p[0])? << 4) | hex(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| "not hex EWKB".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ColumnType;

    fn col(name: &str, ty: ColumnType) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            type_name: String::new(),
            ty,
            nullable: true,
            key: false,
        }
    }

    #[test]
    fn composites_split_quote_and_null() {
        let fields = [
            col("n", ColumnType::Int32),
            col("s", ColumnType::Text),
            col("e", ColumnType::Text),
            col("z", ColumnType::Text),
        ];
        assert_eq!(
            parse_composite(&fields, r#"(1,"a ""b"" \\c",,"")"#).unwrap(),
            Value::Record(vec![
                Value::Int(1),
                Value::Text(r#"a "b" \c"#.into()),
                Value::Null,
                Value::Text(String::new()),
            ])
        );
        assert!(parse_composite(&fields, "(1,2)").is_err());
        assert!(parse_composite(&fields, "1,2,3,4").is_err());
        assert!(parse_composite(&fields, r#"(1,"open,,)"#).is_err());
        // A nested composite arrives quoted.
        let outer = [
            col("id", ColumnType::Int64),
            col(
                "inner",
                ColumnType::Record(vec![
                    col("a", ColumnType::Int32),
                    col("b", ColumnType::Text),
                ]),
            ),
        ];
        assert_eq!(
            parse_composite(&outer, r#"(7,"(1,""x y"")")"#).unwrap(),
            Value::Record(vec![
                Value::Int(7),
                Value::Record(vec![Value::Int(1), Value::Text("x y".into())]),
            ])
        );
    }

    #[test]
    fn hstore_becomes_a_json_object() {
        assert_eq!(
            hstore_json(r#""a"=>"1", "b \"q\""=>NULL, "c"=>"x,y""#).unwrap(),
            r#"{"a":"1","b \"q\"":null,"c":"x,y"}"#
        );
        assert_eq!(hstore_json("").unwrap(), "{}");
        assert!(hstore_json(r#""a"=>"1" "b"=>"2""#).is_err());
        assert!(hstore_json(r#""a"=>1"#).is_err());
    }

    #[test]
    fn ewkb_hex_decodes() {
        assert_eq!(ewkb("0101").unwrap(), vec![1, 1]);
        assert!(ewkb("010").is_err());
        assert!(ewkb("zz").is_err());
    }
}
