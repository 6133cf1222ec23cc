//! The worker's table of connections: a slab whose storage grows by pages
//! that never move.
//!
//! `slab::Slab` keeps its entries in one `Vec`, which doubles as it fills:
//! each doubling allocates the new array, copies every entry into it and
//! frees the old one. Below glibc's mmap threshold (128 KiB, raised at run
//! time up to the largest mmapped block freed so far) the arrays come from
//! the worker's malloc arena, and the freed ones stay there as touched,
//! resident holes: with 112-byte entries, measured at 10 000 subscribers
//! over two workers, ~40 B per connection on top of the entries
//! themselves. Here a full page is never copied: the next one is
//! allocated beside it, with room for [`PAGE`] entries, and its memory is
//! touched only as entries are filled. Nothing is reserved up front (a
//! worker with a handful of connections holds one page, resident only
//! where used).
//!
//! Same behaviour as `slab::Slab`: keys are indices, the slot freed last
//! is reused first, iteration goes in key order.

use std::ops::{Index, IndexMut};

/// Entries per page: a power of two, so that a key splits into page and
/// offset with a shift and a mask (28 KiB pages with 112-byte entries).
const PAGE_BITS: u32 = 8;
const PAGE: usize = 1 << PAGE_BITS;

enum Entry<T> {
    /// Free; the next free key (`NONE`: the last).
    Vacant(u32),
    Occupied(T),
}

/// The end of the free list.
const NONE: u32 = u32::MAX;

/// A slab of `T` in pages of [`PAGE`] entries.
pub struct PagedSlab<T> {
    /// Every page but the last is full (`PAGE` entries, vacant or not).
    pages: Vec<Vec<Entry<T>>>,
    /// Head of the free list of vacant entries.
    free: u32,
    len: usize,
}

impl<T> Default for PagedSlab<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PagedSlab<T> {
    /// An empty slab (no allocation).
    pub const fn new() -> Self {
        Self {
            pages: Vec::new(),
            free: NONE,
            len: 0,
        }
    }

    /// Occupied entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries ever created (vacant ones included): the key after the last.
    fn end(&self) -> usize {
        self.pages
            .last()
            .map_or(0, |p| (self.pages.len() - 1) * PAGE + p.len())
    }

    /// The key the next [`Self::insert`] will return.
    pub fn vacant_key(&self) -> usize {
        if self.free == NONE {
            self.end()
        } else {
            self.free as usize
        }
    }

    /// Stores `value`; returns its key.
    pub fn insert(&mut self, value: T) -> usize {
        self.len += 1;
        if self.free != NONE {
            let key = self.free as usize;
            let entry = &mut self.pages[key >> PAGE_BITS][key & (PAGE - 1)];
            let Entry::Vacant(next) = *entry else {
                unreachable!("the free list holds vacant entries");
            };
            self.free = next;
            *entry = Entry::Occupied(value);
            return key;
        }
        let key = self.end();
        assert!(key < NONE as usize, "slab keys fit in u32");
        match self.pages.last_mut() {
            Some(page) if page.len() < PAGE => page.push(Entry::Occupied(value)),
            _ => {
                // Exactly one page's room, allocated once: never grown, so
                // never copied.
                let mut page = Vec::with_capacity(PAGE);
                page.push(Entry::Occupied(value));
                self.pages.push(page);
            }
        }
        key
    }

    /// Removes and returns the entry at `key`, which must be occupied.
    pub fn remove(&mut self, key: usize) -> T {
        let entry = &mut self.pages[key >> PAGE_BITS][key & (PAGE - 1)];
        match std::mem::replace(entry, Entry::Vacant(self.free)) {
            Entry::Occupied(value) => {
                self.free = key as u32;
                self.len -= 1;
                value
            }
            vacant => {
                *entry = vacant;
                panic!("removing a vacant slab entry");
            }
        }
    }

    pub fn get(&self, key: usize) -> Option<&T> {
        match self.pages.get(key >> PAGE_BITS)?.get(key & (PAGE - 1))? {
            Entry::Occupied(value) => Some(value),
            Entry::Vacant(_) => None,
        }
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        match self
            .pages
            .get_mut(key >> PAGE_BITS)?
            .get_mut(key & (PAGE - 1))?
        {
            Entry::Occupied(value) => Some(value),
            Entry::Vacant(_) => None,
        }
    }

    /// The occupied entries with their keys, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().enumerate().filter_map(move |(i, e)| match e {
                Entry::Occupied(value) => Some((p * PAGE + i, value)),
                Entry::Vacant(_) => None,
            })
        })
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.pages.iter_mut().enumerate().flat_map(|(p, page)| {
            page.iter_mut()
                .enumerate()
                .filter_map(move |(i, e)| match e {
                    Entry::Occupied(value) => Some((p * PAGE + i, value)),
                    Entry::Vacant(_) => None,
                })
        })
    }
}

impl<T> Index<usize> for PagedSlab<T> {
    type Output = T;

    fn index(&self, key: usize) -> &T {
        self.get(key).expect("no connection at this key")
    }
}

impl<T> IndexMut<usize> for PagedSlab<T> {
    fn index_mut(&mut self, key: usize) -> &mut T {
        self.get_mut(key).expect("no connection at this key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_slab_across_pages() {
        let mut ours = PagedSlab::new();
        let mut theirs = slab::Slab::new();
        // Deterministic mix of inserts and removes over several pages.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) && !theirs.is_empty() {
                let keys: Vec<usize> = theirs.iter().map(|(k, _)| k).collect();
                let key = keys[(x >> 8) as usize % keys.len()];
                assert_eq!(ours.remove(key), theirs.remove(key));
            } else {
                assert_eq!(ours.vacant_key(), theirs.vacant_key());
                assert_eq!(ours.insert(step), theirs.insert(step));
            }
            assert_eq!(ours.len(), theirs.len());
        }
        assert!(ours.pages.len() > 2, "several pages: {}", ours.pages.len());
        let a: Vec<(usize, u32)> = ours.iter().map(|(k, &v)| (k, v)).collect();
        let b: Vec<(usize, u32)> = theirs.iter().map(|(k, &v)| (k, v)).collect();
        assert_eq!(a, b);
        for (k, v) in ours.iter_mut() {
            *v = k as u32;
        }
        for (k, _) in b {
            assert_eq!(ours[k], k as u32);
            assert_eq!(ours.get(k), Some(&(k as u32)));
        }
        assert_eq!(ours.get(ours.end() + 5), None);
    }

    /// A vacant entry costs nothing over an occupied one: the entry's tag
    /// hides in a niche of the connection (its state byte).
    #[test]
    fn an_entry_is_the_size_of_a_connection() {
        use crate::server::worker::Conn;
        use std::mem::size_of;
        assert_eq!(
            size_of::<Entry<Conn<[u64; 2]>>>(),
            size_of::<Conn<[u64; 2]>>()
        );
        assert_eq!(size_of::<Entry<Conn<u32>>>(), size_of::<Conn<u32>>());
    }

    #[test]
    fn pages_are_never_moved() {
        let mut s = PagedSlab::new();
        for i in 0..PAGE {
            s.insert(i);
        }
        let first = s.pages[0].as_ptr();
        for i in 0..3 * PAGE {
            s.insert(i);
        }
        assert_eq!(s.pages[0].as_ptr(), first);
        assert!(s.pages.iter().all(|p| p.capacity() == PAGE));
    }
}
