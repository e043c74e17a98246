//! The argument digest: the sha256 of a canonical JSON document built from the query's
//! identity and its arguments, so no argument value ever appears in a Redis key name.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A parameter that `#[cached_query]` leaves out of the key because its type is named like a
/// pool or a cache must be one: checked at compile time (see `SkippedHandle`).
pub fn skipped_handle<T: ?Sized + SkippedHandle>(_: &T) {}

/// A sqlx pool or a [`Cache`](crate::Cache): what a parameter named `Pool`, `PgPool`, …,
/// or `Cache` must be to be left out of the key.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is left out of the cache key because of its type's name, but it is not a sqlx pool nor a `cached_query::Cache`",
    label = "named like a database handle",
    note = "to key calls by it, import the type under another name (`use crate::model::Cache as Layer;`) or give the key with `key = …`; to leave it out of the key, list it in `skip(…)`"
)]
pub trait SkippedHandle {}

impl<DB: sqlx::Database> SkippedHandle for sqlx::Pool<DB> {}
impl SkippedHandle for crate::Cache {}
impl<T: ?Sized + SkippedHandle> SkippedHandle for &T {}
impl<T: ?Sized + SkippedHandle> SkippedHandle for &mut T {}

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
        match to_key_value(value) {
            Ok(v) => self.args.push(v),
            Err(e) => self.error = Some(e),
        }
    }

    /// Replaces the argument-derived key with this value (`key = …`).
    pub fn custom<T: Serialize + ?Sized>(&mut self, value: &T) {
        match to_key_value(value) {
            Ok(v) => self.custom = Some(v),
            Err(e) => self.error = Some(e),
        }
    }

    /// Adds a type name (generic parameters, the return type, `Self`) to the key.
    pub fn type_name<T: ?Sized>(&mut self) {
        self.types.push(std::any::type_name::<T>());
    }

    /// The text of the site's result tags: an entry is only checked against the result tags
    /// it carries, so a change to them must abandon the entries stored before it.
    pub fn result_tags(&mut self, spec: &'static str) {
        self.types.push(spec);
    }

    /// The sha256 of the canonical key document, or why an argument could not be serialised.
    pub(crate) fn digest(self) -> Result<[u8; 32], serde_json::Error> {
        let mut doc = self.document()?;
        doc.push(b'}');
        Ok(Sha256::digest(&doc).into())
    }

    /// One digest per element of a batch: the key document with the element added under its
    /// own field (`"b"`), so a batch's entries never share a key with a single read's.
    pub(crate) fn element_digests<K: Serialize>(
        self,
        elements: &[K],
    ) -> Result<Vec<[u8; 32]>, serde_json::Error> {
        let mut doc = self.document()?;
        doc.extend_from_slice(b",\"b\":");
        // The common prefix is hashed once; each element continues from its state.
        let prefix = Sha256::new_with_prefix(&doc);
        elements
            .iter()
            .map(|element| {
                doc.clear();
                write_canonical(&mut doc, &to_key_value(element)?);
                doc.push(b'}');
                Ok(prefix.clone().chain_update(&doc).finalize().into())
            })
            .collect()
    }

    /// The key document without its closing brace.
    fn document(self) -> Result<Vec<u8>, serde_json::Error> {
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
        Ok(doc)
    }
}

/// `value` as JSON, refusing NaN and infinities: JSON has no form for them (serde_json writes
/// `null`), so they would share one key with each other and with `None`. The call then runs
/// uncached, counted as an error. Only a value whose JSON holds a `null` can hide one, so
/// only those are looked at again (most arguments are numbers and strings: one pass).
fn to_key_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, serde_json::Error> {
    let json = serde_json::to_value(value)?;
    if has_null(&json) && value.serialize(finite::Probe).is_err_and(|e| e.0) {
        return Err(serde::ser::Error::custom(
            "a float argument is NaN or infinite: it has no JSON form, so it cannot be part of \
             a cache key",
        ));
    }
    Ok(json)
}

fn has_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.iter().any(has_null),
        Value::Object(fields) => fields.values().any(has_null),
        _ => false,
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

/// A serializer that only looks for non-finite floats (its error is `NonFinite(true)`;
/// anything else a type's `Serialize` reports is `NonFinite(false)`, left to serde_json).
mod finite {
    use serde::Serialize;
    use serde::ser::{self, Serializer};

    #[derive(Debug)]
    pub(super) struct NonFinite(pub(super) bool);

    impl std::fmt::Display for NonFinite {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("non-finite float")
        }
    }

    impl std::error::Error for NonFinite {}

    impl ser::Error for NonFinite {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            NonFinite(false)
        }
    }

    pub(super) struct Probe;

    type R = Result<(), NonFinite>;

    fn float(finite: bool) -> R {
        if finite { Ok(()) } else { Err(NonFinite(true)) }
    }

    macro_rules! accept {
        ($($name:ident: $ty:ty),* $(,)?) => {
            $(fn $name(self, _: $ty) -> R { Ok(()) })*
        };
    }

    impl Serializer for Probe {
        type Ok = ();
        type Error = NonFinite;
        type SerializeSeq = Probe;
        type SerializeTuple = Probe;
        type SerializeTupleStruct = Probe;
        type SerializeTupleVariant = Probe;
        type SerializeMap = Probe;
        type SerializeStruct = Probe;
        type SerializeStructVariant = Probe;

        accept!(
            serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
            serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
            serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_char: char,
            serialize_str: &str, serialize_bytes: &[u8], serialize_unit_struct: &'static str,
        );

        fn serialize_f32(self, v: f32) -> R {
            float(v.is_finite())
        }
        fn serialize_f64(self, v: f64) -> R {
            float(v.is_finite())
        }
        fn serialize_none(self) -> R {
            Ok(())
        }
        fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> R {
            v.serialize(Probe)
        }
        fn serialize_unit(self) -> R {
            Ok(())
        }
        fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
            Ok(())
        }
        fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, v: &T) -> R {
            v.serialize(Probe)
        }
        fn serialize_newtype_variant<T: ?Sized + Serialize>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            v: &T,
        ) -> R {
            v.serialize(Probe)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
        fn serialize_tuple(self, _: usize) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Probe, NonFinite> {
            Ok(Probe)
        }
    }

    macro_rules! compound {
        ($($trait:ident :: $method:ident),* $(,)?) => {
            $(impl ser::$trait for Probe {
                type Ok = ();
                type Error = NonFinite;
                fn $method<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
                    v.serialize(Probe)
                }
                fn end(self) -> R {
                    Ok(())
                }
            })*
        };
    }

    compound!(
        SerializeSeq::serialize_element,
        SerializeTuple::serialize_element,
        SerializeTupleStruct::serialize_field,
        SerializeTupleVariant::serialize_field,
    );

    impl ser::SerializeMap for Probe {
        type Ok = ();
        type Error = NonFinite;
        fn serialize_key<T: ?Sized + Serialize>(&mut self, k: &T) -> R {
            k.serialize(Probe)
        }
        fn serialize_value<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
            v.serialize(Probe)
        }
        fn end(self) -> R {
            Ok(())
        }
    }

    macro_rules! named_fields {
        ($($trait:ident),*) => {
            $(impl ser::$trait for Probe {
                type Ok = ();
                type Error = NonFinite;
                fn serialize_field<T: ?Sized + Serialize>(
                    &mut self,
                    _: &'static str,
                    v: &T,
                ) -> R {
                    v.serialize(Probe)
                }
                fn end(self) -> R {
                    Ok(())
                }
            })*
        };
    }

    named_fields!(SerializeStruct, SerializeStructVariant);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn non_finite_floats_are_refused_not_keyed_as_null() {
        #[derive(Serialize)]
        struct Nested {
            at: Vec<Option<f32>>,
        }
        let key = |f: &dyn Fn(&mut KeyBuilder)| {
            let mut k = KeyBuilder::new("q", 1);
            f(&mut k);
            k.digest()
        };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(key(&|k| k.arg(&bad)).is_err(), "{bad}");
            assert!(key(&|k| k.arg(&Some(bad))).is_err(), "{bad}");
            assert!(key(&|k| k.custom(&(1, bad))).is_err(), "{bad}");
        }
        let nested = Nested {
            at: vec![Some(1.0), Some(f32::NAN)],
        };
        assert!(key(&|k| k.arg(&nested)).is_err());
        // Finite floats and None are keys, all different.
        let none = key(&|k| k.arg(&None::<f64>)).unwrap();
        let zero = key(&|k| k.arg(&Some(0.0_f64))).unwrap();
        let max = key(&|k| k.arg(&f64::MAX)).unwrap();
        assert!(none != zero && zero != max && none != max);
    }

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

    /// A batch element's key: the same document with the element under `"b"`.
    #[test]
    fn batch_element_keys_are_stable() {
        let mut k = KeyBuilder::new("app::users::by_ids", 0);
        k.arg("eu");
        let digests = k
            .element_digests(&[serde_json::json!({"y": 2, "x": 1}), serde_json::json!(7)])
            .unwrap();
        let docs = [
            r#"{"q":"app::users::by_ids","v":0,"t":[],"a":["eu"],"b":{"x":1,"y":2}}"#,
            r#"{"q":"app::users::by_ids","v":0,"t":[],"a":["eu"],"b":7}"#,
        ];
        for (digest, doc) in digests.iter().zip(docs) {
            assert_eq!(digest[..], Sha256::digest(doc.as_bytes())[..]);
        }
    }
}
