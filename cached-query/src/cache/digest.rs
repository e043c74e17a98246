//! The argument digest: the sha256 of a canonical JSON document built from the query's
//! identity and its arguments, so no argument value ever appears in a Redis key name.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Collects the parts of one call's cache key. Generated code feeds it arguments in order.
#[derive(Debug)]
pub struct KeyBuilder {
    name: &'static str,
    version: u32,
    types: Vec<&'static str>,
    args: Vec<Value>,
    custom: Option<Value>,
    error: Option<serde_json::Error>,
}

impl KeyBuilder {
    pub(crate) fn new(name: &'static str, version: u32) -> Self {
        KeyBuilder {
            name,
            version,
            types: Vec::new(),
            args: Vec::new(),
            custom: None,
            error: None,
        }
    }

    /// Adds one argument, converted to a `serde_json::Value` (maps and structs become
    /// objects whose keys are sorted when hashed).
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) {
        match serde_json::to_value(value) {
            Ok(v) => self.args.push(v),
            Err(e) => self.error = Some(e),
        }
    }

    /// Replaces the argument-derived key with this value (`key = …`).
    pub fn custom<T: Serialize + ?Sized>(&mut self, value: &T) {
        match serde_json::to_value(value) {
            Ok(v) => self.custom = Some(v),
            Err(e) => self.error = Some(e),
        }
    }

    /// Adds a type name (generic parameters, the return type, `Self`) to the key.
    pub fn type_name<T: ?Sized>(&mut self) {
        self.types.push(std::any::type_name::<T>());
    }

    /// The sha256 of the canonical key document, or why an argument could not be serialised.
    pub(crate) fn digest(self) -> Result<[u8; 32], serde_json::Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut doc = Vec::with_capacity(256);
        doc.extend_from_slice(b"{\"q\":");
        write_json(&mut doc, self.name);
        doc.extend_from_slice(b",\"v\":");
        write_json(&mut doc, &self.version);
        doc.extend_from_slice(b",\"t\":");
        write_json(&mut doc, &self.types);
        doc.extend_from_slice(b",\"a\":");
        match &self.custom {
            Some(custom) => write_canonical(&mut doc, custom),
            None => {
                doc.push(b'[');
                for (i, v) in self.args.iter().enumerate() {
                    if i > 0 {
                        doc.push(b',');
                    }
                    write_canonical(&mut doc, v);
                }
                doc.push(b']');
            }
        }
        doc.push(b'}');
        Ok(Sha256::digest(&doc).into())
    }
}

/// Writes `value` as JSON with object keys sorted, whatever serde_json's `preserve_order`
/// feature (which another crate in the build may enable) does to `Value` maps.
pub(crate) fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(out, k);
                out.push(b':');
                write_canonical(out, v);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, v);
            }
            out.push(b']');
        }
        scalar => write_json(out, scalar),
    }
}

/// Compact JSON of a value without maps (strings, numbers, sequences of them).
fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value)
        .expect("writing JSON of plain values into memory cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn maps_hash_the_same_whatever_their_insertion_order() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..50 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..50).rev() {
            b.insert(format!("k{i}"), i);
        }
        let digest = |m: &HashMap<String, i32>| {
            let mut k = KeyBuilder::new("q", 1);
            k.arg(m);
            k.digest().unwrap()
        };
        assert_eq!(digest(&a), digest(&b));
    }

    #[test]
    fn name_version_types_and_args_all_change_the_key() {
        let base = || {
            let mut k = KeyBuilder::new("q", 1);
            k.arg(&1_i64);
            k
        };
        let d0 = base().digest().unwrap();
        let mut k = KeyBuilder::new("r", 1);
        k.arg(&1_i64);
        assert_ne!(d0, k.digest().unwrap());
        let mut k = KeyBuilder::new("q", 2);
        k.arg(&1_i64);
        assert_ne!(d0, k.digest().unwrap());
        let mut k = base();
        k.type_name::<u8>();
        assert_ne!(d0, k.digest().unwrap());
        let mut k = KeyBuilder::new("q", 1);
        k.arg(&2_i64);
        assert_ne!(d0, k.digest().unwrap());
        assert_eq!(d0, base().digest().unwrap());
    }

    #[test]
    fn canonical_json_sorts_nested_keys() {
        #[derive(Serialize)]
        struct S {
            z: u8,
            a: BTreeMap<String, u8>,
        }
        let v = serde_json::to_value(S {
            z: 1,
            a: [("y".into(), 2), ("b".into(), 3)].into_iter().collect(),
        })
        .unwrap();
        let mut out = Vec::new();
        write_canonical(&mut out, &v);
        assert_eq!(out, br#"{"a":{"b":3,"y":2},"z":1}"#);
    }

    #[test]
    fn unserialisable_argument_is_an_error_not_a_panic() {
        let mut m = HashMap::new();
        m.insert(vec![1u8], 1u8); // non-string map keys cannot become JSON
        let mut k = KeyBuilder::new("q", 1);
        k.arg(&m);
        assert!(k.digest().is_err());
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// Keys must be identical in every process and every build with the same compiler:
    /// changing this value means every deployed cache entry is abandoned, so it must be a
    /// deliberate decision.
    #[test]
    fn key_format_is_stable() {
        let mut k = KeyBuilder::new("app::users::get_user", 3);
        k.arg(&42_i64);
        k.arg(&serde_json::json!({"b": [1, 2], "a": null}));
        k.arg("text");
        let digest = k.digest().unwrap();
        let doc =
            r#"{"q":"app::users::get_user","v":3,"t":[],"a":[42,{"a":null,"b":[1,2]},"text"]}"#;
        let hex = |bytes: &[u8]| {
            let mut hex = String::new();
            crate::keyspace::push_hex(&mut hex, bytes);
            hex
        };
        assert_eq!(hex(&digest), hex(&Sha256::digest(doc.as_bytes())));
        assert_eq!(hex(&digest), GOLDEN);
    }

    const GOLDEN: &str = "df55202954174c28e9ba00faa17087c497ae53c421088489f7705fbd47fd94e8";
}
