//! Interned strings for what every cached object repeats: namespaces, label
//! keys and values, selectable fields' names and values, and names (which
//! the store's key shares with the object).
//!
//! A cluster's objects repeat a few strings many times (`app`,
//! `pod-template-hash`, a node's name, `Running`, `default-scheduler`), and
//! an owned `String` per occurrence costs its 24-byte header and an
//! allocation for a value of a few bytes. An [`Atom`] is one pointer to a
//! shared string: the same text, wherever it occurs, is one allocation.
//!
//! The table of atoms is global and never blocks a reader: interning takes
//! one shard's lock of a [`DashSet`] (objects are interned as they arrive
//! from the API server, off the request path); comparing, hashing and
//! dropping an atom touch no lock. Unused atoms are swept when the table
//! has grown by as many insertions as it held after the last sweep (at
//! least [`SWEEP_MIN`]), so the work is amortized O(1) per insertion and
//! the table is at most about twice the atoms in use. That is why this is
//! not `internment`'s `ArcIntern`, which removes an entry (a shard lock) on
//! every last drop — a whole store replaced at once would take 100,000 locks.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, LazyLock};

use dashmap::DashSet;

use crate::selector::{FieldSource, LabelSource};

/// Insertions between sweeps, at the least.
const SWEEP_MIN: usize = 64 * 1024;

/// An interned string: cloning, comparing for equality and hashing are as
/// cheap as for a pointer (equal atoms are one allocation).
#[derive(Clone)]
pub struct Atom(Arc<str>);

struct Table {
    atoms: DashSet<Arc<str>>,
    /// Insertions since the last sweep, and the table's size after it.
    inserted: AtomicUsize,
    after_sweep: AtomicUsize,
}

static TABLE: LazyLock<Table> = LazyLock::new(|| Table {
    atoms: DashSet::new(),
    inserted: AtomicUsize::new(0),
    after_sweep: AtomicUsize::new(0),
});

/// What one atom costs beyond the pointers to it: the `Arc`'s counts, the
/// allocator's header and rounding, and its slot in the table.
const ATOM_OVERHEAD: usize = 2 * std::mem::size_of::<usize>() + 16 + 24;

impl Atom {
    /// The atom for `text`, interned if it is new.
    pub fn new(text: &str) -> Atom {
        if let Some(found) = TABLE.atoms.get(text) {
            return Atom(found.clone());
        }
        let atom: Arc<str> = Arc::from(text);
        // A racing insert of the same text wins: take its atom (and if that
        // one was swept meanwhile, insert ours after all).
        let atom = loop {
            if TABLE.atoms.insert(atom.clone()) {
                break atom;
            }
            if let Some(found) = TABLE.atoms.get(text) {
                return Atom(found.clone());
            }
        };
        let inserted = TABLE.inserted.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        if inserted >= TABLE.after_sweep.load(AtomicOrdering::Relaxed).max(SWEEP_MIN) {
            sweep();
        }
        Atom(atom)
    }

    /// The atom for `text` if one exists: no object holds a string that
    /// was never interned, so a lookup by name needs no allocation.
    pub fn existing(text: &str) -> Option<Atom> {
        TABLE.atoms.get(text).map(|found| Atom(found.clone()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This holder's share of the atom's memory: the whole string when it
    /// is held once (besides the table), a fraction of it when shared. A
    /// store adds an object's share when the object arrives and subtracts
    /// the same when it leaves, so its total stays consistent.
    pub fn share(&self) -> usize {
        let holders = Arc::strong_count(&self.0).saturating_sub(1).max(1);
        (self.0.len() + ATOM_OVERHEAD) / holders
    }
}

/// Drops the atoms no one holds but the table. Safe against a concurrent
/// [`Atom::new`]: a shard is locked while its atoms are counted, and an
/// atom only the table holds can be reached through that shard alone.
fn sweep() {
    TABLE.inserted.store(0, AtomicOrdering::Relaxed);
    TABLE.atoms.retain(|atom| Arc::strong_count(atom) > 1);
    TABLE
        .after_sweep
        .store(TABLE.atoms.len(), AtomicOrdering::Relaxed);
}

/// Atoms in the table (held or awaiting a sweep).
pub fn interned() -> usize {
    TABLE.atoms.len()
}

impl Deref for Atom {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Atom {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Atom {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Atom {
    fn eq(&self, other: &Atom) -> bool {
        // Equal texts share one allocation, unless one side was swept and
        // interned again meanwhile: compare the text then.
        Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
    }
}

impl Eq for Atom {}

impl PartialEq<str> for Atom {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Atom {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Atom {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl Hash for Atom {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for Atom {
    fn partial_cmp(&self, other: &Atom) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Atom {
    fn cmp(&self, other: &Atom) -> Ordering {
        if Arc::ptr_eq(&self.0, &other.0) {
            Ordering::Equal
        } else {
            self.0.cmp(&other.0)
        }
    }
}

impl fmt::Debug for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl From<&str> for Atom {
    fn from(text: &str) -> Atom {
        Atom::new(text)
    }
}

/// A small map of atoms, sorted by key: an object's labels or its
/// selectable fields. A sorted slice instead of a tree: two pointers per
/// entry, one allocation per map, and a binary search for a lookup.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pairs(Box<[(Atom, Atom)]>);

impl Pairs {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What the map holds beyond its own header: the entries and each
    /// atom's [`Atom::share`].
    pub fn heap_size(&self) -> usize {
        if self.0.is_empty() {
            return 0;
        }
        /// An allocation's header and rounding, on average.
        const ALLOCATION: usize = 16;
        ALLOCATION
            + self
                .0
                .iter()
                .map(|(k, v)| std::mem::size_of::<(Atom, Atom)>() + k.share() + v.share())
                .sum::<usize>()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Pairs {
    /// The last value of a repeated key wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Pairs {
        let mut entries: Vec<(Atom, Atom)> = pairs
            .into_iter()
            .map(|(k, v)| (Atom::new(k.as_ref()), Atom::new(v.as_ref())))
            .collect();
        entries.reverse();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|later, first| later.0 == first.0);
        Pairs(entries.into_boxed_slice())
    }
}

impl fmt::Debug for Pairs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl LabelSource for Pairs {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl FieldSource for Pairs {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_are_one_allocation() {
        let a = Atom::new("atom-test-shared");
        let b = Atom::new(&String::from("atom-test-shared"));
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, b);
        assert_eq!(Atom::existing("atom-test-shared"), Some(a));
        assert_eq!(Atom::existing("atom-test-never-interned"), None);
    }

    #[test]
    fn unused_atoms_are_swept_and_used_ones_kept() {
        let kept = Atom::new("atom-test-kept");
        drop(Atom::new("atom-test-dropped"));
        sweep();
        assert!(Atom::existing("atom-test-dropped").is_none());
        assert!(Arc::ptr_eq(&Atom::existing("atom-test-kept").unwrap().0, &kept.0));
        // Interned again after a sweep: a new allocation, still equal.
        assert_eq!(Atom::new("atom-test-dropped"), Atom::new("atom-test-dropped"));
    }

    #[test]
    fn the_table_stays_bounded_by_what_is_held() {
        let held: Vec<Atom> = (0..1_000)
            .map(|i| Atom::new(&format!("atom-test-held-{i}")))
            .collect();
        for i in 0..(3 * SWEEP_MIN) {
            drop(Atom::new(&format!("atom-test-churn-{i}")));
        }
        // At most one sweep's worth of garbage (and other tests' atoms).
        assert!(
            interned() < held.len() + 2 * SWEEP_MIN,
            "{} atoms interned",
            interned()
        );
        assert!(held.iter().all(|a| Atom::existing(a).is_some()));
    }

    #[test]
    fn pairs_are_a_sorted_map_whose_last_value_wins() {
        let pairs: Pairs = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        assert_eq!(pairs.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "3")]);
        assert_eq!(pairs.get("b"), Some("3"));
        assert_eq!(pairs.get("c"), None);
        assert_eq!(pairs.len(), 2);
        assert_eq!(format!("{pairs:?}"), r#"{"a": "2", "b": "3"}"#);
    }

    #[test]
    fn a_shared_atom_counts_a_share_of_its_text() {
        let alone = Atom::new("atom-test-share-alone-0123456789");
        let whole = alone.share();
        let copies: Vec<Atom> = (0..3).map(|_| alone.clone()).collect();
        assert_eq!(alone.share(), whole / 4);
        drop(copies);
        assert_eq!(alone.share(), whole);
    }
}
