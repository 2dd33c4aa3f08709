//! JSON objects whose keys must be unique. serde_json keeps the last of duplicate keys in a map,
//! which lets two parsers read one document differently; signed records reject duplicates instead.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, Visitor};

pub fn unique_map<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct V2<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object with unique keys")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, V>()? {
                if out.contains_key(&k) {
                    return Err(A::Error::custom(format!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V2(PhantomData))
}

/// An object of objects, unique keys at both levels (app → setting → value).
pub fn unique_nested<'de, D>(d: D) -> Result<BTreeMap<String, BTreeMap<String, String>>, D::Error>
where
    D: Deserializer<'de>,
{
    struct Inner(BTreeMap<String, String>);
    impl<'de> Deserialize<'de> for Inner {
        fn deserialize<D2: Deserializer<'de>>(d: D2) -> Result<Self, D2::Error> {
            unique_map(d).map(Inner)
        }
    }
    let outer: BTreeMap<String, Inner> = unique_map(d)?;
    Ok(outer.into_iter().map(|(k, v)| (k, v.0)).collect())
}
