//! [`VecMap`]: a map sorted by key in one exactly sized `Vec`, for the few-entry maps every
//! device record holds (labels, apps, previous versions, telemetry). A `BTreeMap` with one
//! entry allocates a whole node of eleven slots: 1.3 KB for one app's state, ~0.5 KB for a map
//! of strings, some 3 KB per device in all, 300 MB at 100,000 devices. The same API as the
//! `BTreeMap` methods the controller uses, and the same JSON (an object, keys in order), so
//! stored records read either way.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq)]
pub struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    pub fn new() -> Self {
        VecMap(Vec::new())
    }

    fn find<Q: Ord + ?Sized>(&self, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(x, _)| x.borrow().cmp(k))
    }

    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(k).is_ok()
    }

    /// Insert or replace; the old value when there was one. Grows by exactly one slot.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = self.find(k).ok()?;
        Some(self.0.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }
}

impl<K, V> VecMap<K, V> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<K: Ord + Clone, V: Clone> VecMap<K, V> {
    /// The same entries as a `BTreeMap` (for API views and the protocol's types).
    pub fn to_btree(&self) -> BTreeMap<K, V> {
        self.0.iter().cloned().collect()
    }
}

/// Later entries for one key win, as when collecting into a `BTreeMap`.
impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: among equal keys the input order stays, and the last one is kept.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::with_capacity(v.len());
        for (k, x) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = x,
                _ => out.push((k, x)),
            }
        }
        out.shrink_to_fit();
        VecMap(out)
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for VecMap<K, V> {
    fn from(m: BTreeMap<K, V>) -> Self {
        // Already sorted and unique.
        let mut v: Vec<(K, V)> = Vec::with_capacity(m.len());
        v.extend(m);
        VecMap(v)
    }
}

impl<K: Ord, V: PartialEq> PartialEq<BTreeMap<K, V>> for VecMap<K, V> {
    fn eq(&self, other: &BTreeMap<K, V>) -> bool {
        self.len() == other.len() && self.iter().zip(other).all(|(a, b)| a == b)
    }
}

impl<K: Ord + Borrow<Q>, Q: Ord + ?Sized, V> std::ops::Index<&Q> for VecMap<K, V> {
    type Output = V;

    fn index(&self, k: &Q) -> &V {
        self.get(k).expect("no entry found for key")
    }
}

impl<'a, K, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K, V> IntoIterator for VecMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for VecMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for VecMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for VecMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<K, V>::deserialize(d).map(VecMap::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_behaves_like_a_btreemap() {
        let mut m: VecMap<String, u32> = VecMap::new();
        let mut b: BTreeMap<String, u32> = BTreeMap::new();
        for (i, k) in ["m", "a", "z", "a", "q", "m"].into_iter().enumerate() {
            assert_eq!(m.insert(k.into(), i as u32), b.insert(k.into(), i as u32));
            assert_eq!(m, b);
        }
        assert_eq!(m.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        assert_eq!(m.get("a"), Some(&3));
        assert_eq!(m["q"], 4);
        assert!(m.contains_key("z") && !m.contains_key("b"));
        *m.get_mut("z").unwrap() += 10;
        assert_eq!(m.remove("z"), Some(12));
        assert_eq!(m.remove("z"), None);
        m.retain(|k, _| k != "m");
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![(&"a".to_string(), &3), (&"q".to_string(), &4)]
        );
        let c: VecMap<&str, u32> = [("b", 1), ("a", 2), ("b", 3)].into_iter().collect();
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![(&"a", &2), (&"b", &3)]);
        assert_eq!(c.0.capacity(), 2, "exactly sized");
    }

    #[test]
    fn the_json_is_a_btreemaps() {
        let b: BTreeMap<String, String> = [
            ("site".into(), "north".into()),
            ("group".into(), "beta".into()),
        ]
        .into();
        let m = VecMap::from(b.clone());
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        let back: VecMap<String, String> =
            serde_json::from_str(r#"{"site":"north","group":"beta"}"#).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_btree(), b);
        assert_eq!(format!("{m:?}"), format!("{b:?}"));
    }
}
