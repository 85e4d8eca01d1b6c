//! Per-thread front caches for shared tables that every request reads and few requests change:
//! the verified-token cache and the route table.
//!
//! Each data-plane worker is one thread (see `server`), and with two workers on two cores a
//! shared map costs every request a few cross-core cache-line transfers: a shard lock taken and
//! released, and an `Arc` count raised and lowered, on lines the other core also writes. A
//! front cache answers from memory only this thread touches.
//!
//! Correctness rests on an [`Epoch`]: the owner of the shared table bumps it after every change
//! that could make a cached answer wrong (a revocation, a key change, a route update). An entry
//! remembers the epoch that was current *before* its value was read from the shared table, and
//! is used only while the epoch is still that value. A change that lands after that read bumps
//! the epoch, so the entry is never served again; a change that landed before it was seen.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

/// Entries per thread and table; when full, the thread's table starts over.
const CAPACITY: usize = 4096;

/// A change counter for one shared table.
#[derive(Debug)]
pub struct Epoch {
    /// Tells tables apart in the thread-local maps (tests run many gateways per process).
    owner: u64,
    counter: AtomicU64,
}

impl Default for Epoch {
    fn default() -> Self {
        static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
        Epoch {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            counter: AtomicU64::new(0),
        }
    }
}

impl Epoch {
    /// The current value. Read it before reading the shared table.
    pub fn current(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }

    /// Call after every change to the shared table, once the change is visible there.
    pub fn bump(&self) {
        self.counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// One thread's cached answers for tables of one kind, keyed by string.
#[derive(Debug)]
pub struct Front<V> {
    map: HashMap<Box<str>, Entry<V>, foldhash::fast::RandomState>,
}

#[derive(Debug)]
struct Entry<V> {
    owner: u64,
    epoch: u64,
    value: V,
}

impl<V> Default for Front<V> {
    fn default() -> Self {
        Front {
            map: HashMap::default(),
        }
    }
}

impl<V: Clone> Front<V> {
    /// The value cached for `key` of the table `epoch` belongs to, if still current at `seen`
    /// (the epoch read for this lookup).
    pub fn get(
        cell: &'static LocalKey<RefCell<Self>>,
        epoch: &Epoch,
        seen: u64,
        key: &str,
    ) -> Option<V> {
        cell.try_with(|front| {
            let front = front.try_borrow().ok()?;
            let entry = front.map.get(key)?;
            (entry.owner == epoch.owner && entry.epoch == seen).then(|| entry.value.clone())
        })
        .ok()
        .flatten()
    }

    /// Caches `value` for `key`, read from the shared table after the epoch was `seen`.
    pub fn put(
        cell: &'static LocalKey<RefCell<Self>>,
        epoch: &Epoch,
        seen: u64,
        key: &str,
        value: V,
    ) {
        let _ = cell.try_with(|front| {
            let Ok(mut front) = front.try_borrow_mut() else {
                return;
            };
            if front.map.len() >= CAPACITY && !front.map.contains_key(key) {
                front.map.clear();
            }
            let entry = Entry {
                owner: epoch.owner,
                epoch: seen,
                value,
            };
            match front.map.get_mut(key) {
                Some(slot) => *slot = entry,
                None => {
                    front.map.insert(key.into(), entry);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static TEST_FRONT: RefCell<Front<u32>> = RefCell::new(Front::default());
    }

    #[test]
    fn an_entry_lives_until_its_table_changes() {
        let epoch = Epoch::default();
        let seen = epoch.current();
        assert_eq!(Front::get(&TEST_FRONT, &epoch, seen, "a"), None);
        Front::put(&TEST_FRONT, &epoch, seen, "a", 1);
        assert_eq!(
            Front::get(&TEST_FRONT, &epoch, epoch.current(), "a"),
            Some(1)
        );
        epoch.bump();
        assert_eq!(Front::get(&TEST_FRONT, &epoch, epoch.current(), "a"), None);
    }

    #[test]
    fn tables_and_threads_do_not_share_entries() {
        let (one, two) = (Epoch::default(), Epoch::default());
        Front::put(&TEST_FRONT, &one, one.current(), "k", 1);
        assert_eq!(Front::get(&TEST_FRONT, &two, two.current(), "k"), None);
        let other = std::thread::spawn(move || Front::get(&TEST_FRONT, &one, 0, "k"));
        assert_eq!(other.join().unwrap(), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let epoch = Epoch::default();
        for i in 0..CAPACITY * 2 + 1 {
            Front::put(&TEST_FRONT, &epoch, 0, &i.to_string(), 0);
        }
        TEST_FRONT.with(|f| assert!(f.borrow().map.len() <= CAPACITY));
    }
}
