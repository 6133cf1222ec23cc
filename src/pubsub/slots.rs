//! One local topic's (or pattern's) subscribers: 8-byte slots in pages,
//! each a connection's key and serial with two flags in the key's top
//! bits (pending, and "also subscribed otherwise": see [`MULTI`]).

use super::shard::ConnRef;

/// One local topic's subscribers: a slab of 8-byte slots (a connection's
/// key and serial as `u32`s; `slab::Slab<ConnRef>` takes 24), since there
/// is one slot per subscription and idle memory is what a subscriber
/// costs. Same behaviour as `Slab`: a slot is reused last-freed first, and
/// iteration goes in slot order.
///
/// The first [`SLOT_PAGE`] slots grow like a `Vec` (a topic with a few
/// subscribers holds a few slots); the rest come in pages of that many,
/// each allocated once at its full size and never copied: a vector that
/// doubles leaves the arrays it outgrew in the malloc arena, resident
/// (measured at 10 000 subscribers of one topic: ~5–9 B per subscriber).
#[derive(Debug, Default)]
pub(super) struct Subscribers {
    /// Slots `0..SLOT_PAGE`.
    first: Vec<Slot>,
    /// Slots from `SLOT_PAGE` on, `SLOT_PAGE` per page; all but the last
    /// full. Boxed: 8 bytes in every topic instead of a `Vec`'s 24, since
    /// most topics never have that many subscribers here.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<Vec<Slot>>>>,
    /// Head of the free list (`NONE`: no free slot).
    free: u32,
    len: u32,
}

/// Slots per page of [`Subscribers`] (4 KiB), a power of two.
pub(super) const SLOT_PAGE_BITS: u32 = 9;
pub(super) const SLOT_PAGE: usize = 1 << SLOT_PAGE_BITS;

/// An occupied slot holds a connection; a free one has `key == VACANT`
/// and the next free slot in `serial`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    key: u32,
    serial: u32,
}

/// The key of a free slot: no connection has it (a worker holds far fewer
/// than 2^31 connections).
pub(super) const VACANT: u32 = u32::MAX;
/// Set in a pending slot's key (see the shard's `LocalTopic::joiners`);
/// a free slot's key has it too, so one test leaves both out.
pub(super) const PENDING: u32 = 1 << 31;
/// Set in every slot of a connection that may get one publication through
/// two of its subscriptions (it holds a pattern and some other
/// subscription): delivery checks such slots against the connections
/// already served, so a publication reaches the connection once.
pub(super) const MULTI: u32 = 1 << 30;
/// The key bits of a slot.
const KEY: u32 = MULTI - 1;
/// The end of the free list.
pub(super) const NONE: u32 = u32::MAX;

impl Subscribers {
    pub(super) fn new() -> Self {
        Self {
            first: Vec::new(),
            more: None,
            free: NONE,
            len: 0,
        }
    }

    /// Slots ever created (free ones included).
    pub(super) fn end(&self) -> usize {
        match self.more.as_deref().and_then(|m| m.last()) {
            None => self.first.len(),
            Some(page) => self.more.as_deref().map_or(0, Vec::len) * SLOT_PAGE + page.len(),
        }
    }

    pub(super) fn slot_mut(&mut self, at: u32) -> &mut Slot {
        let at = at as usize;
        match at >> SLOT_PAGE_BITS {
            0 => &mut self.first[at],
            page => {
                let more = self
                    .more
                    .as_deref_mut()
                    .expect("a slot past the first page");
                &mut more[page - 1][at & (SLOT_PAGE - 1)]
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `conn`; returns its slot.
    pub(super) fn insert(&mut self, (key, serial): ConnRef) -> u32 {
        let key = u32::try_from(key)
            .ok()
            .filter(|&k| k < KEY)
            .expect("connection keys fit in 30 bits");
        let slot = Slot { key, serial };
        self.len += 1;
        if self.free == NONE {
            let at = self.end();
            assert!(at < NONE as usize, "subscriber slots fit in u32");
            if at < SLOT_PAGE {
                self.first.push(slot);
            } else {
                let more = self.more.get_or_insert_default();
                match more.last_mut() {
                    Some(page) if page.len() < SLOT_PAGE => page.push(slot),
                    _ => {
                        let mut page = Vec::with_capacity(SLOT_PAGE);
                        page.push(slot);
                        more.push(page);
                    }
                }
            }
            return at as u32;
        }
        let at = self.free;
        let vacant = self.slot_mut(at);
        debug_assert_eq!(vacant.key, VACANT);
        let next = vacant.serial;
        *vacant = slot;
        self.free = next;
        at
    }

    /// Frees `slot`, which must hold a connection.
    pub(super) fn remove(&mut self, slot: u32) {
        let free = self.free;
        let s = self.slot_mut(slot);
        assert_ne!(s.key, VACANT, "removing a free subscriber slot");
        *s = Slot {
            key: VACANT,
            serial: free,
        };
        self.free = slot;
        self.len -= 1;
    }

    /// The subscribers, in slot order, pending ones left out, each with
    /// whether its slot is marked [`MULTI`].
    pub(super) fn iter(&self) -> impl Iterator<Item = (ConnRef, bool)> + '_ {
        self.first
            .iter()
            .chain(self.more.iter().flat_map(|m| m.iter()).flatten())
            .filter(|s| s.key & PENDING == 0)
            .map(|s| (((s.key & KEY) as usize, s.serial), s.key & MULTI != 0))
    }

    /// The connection in `slot`, if it holds one.
    pub(super) fn get(&self, slot: u32) -> Option<ConnRef> {
        let at = slot as usize;
        let s = match at >> SLOT_PAGE_BITS {
            0 => self.first.get(at)?,
            page => self
                .more
                .as_deref()?
                .get(page - 1)?
                .get(at & (SLOT_PAGE - 1))?,
        };
        (s.key != VACANT).then_some(((s.key & KEY) as usize, s.serial))
    }

    /// Marks `slot` (holding a connection) [`MULTI`] or not.
    pub(super) fn set_multi(&mut self, slot: u32, multi: bool) {
        let s = self.slot_mut(slot);
        debug_assert_ne!(s.key, VACANT);
        if multi {
            s.key |= MULTI;
        } else {
            s.key &= !MULTI;
        }
    }

    /// Ends `slot`'s pending state: it is delivered to like the others.
    pub(super) fn unpend(&mut self, slot: u32) {
        self.slot_mut(slot).key &= !PENDING;
    }

    /// Adds `conn` as pending: left out of [`Self::iter`] until its key's
    /// [`PENDING`] bit is cleared.
    pub(super) fn insert_pending(&mut self, conn: ConnRef) -> u32 {
        let slot = self.insert(conn);
        self.slot_mut(slot).key |= PENDING;
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_slots_are_eight_bytes_reused_last_freed_first_and_iterated_in_order() {
        // One slot per subscription: idle memory per subscriber (docs/BENCHMARKS.md).
        assert_eq!(std::mem::size_of::<Slot>(), 8);
        let mut subs = Subscribers::new();
        let slots: Vec<u32> = (0..5).map(|i| subs.insert((i, 100 + i as u32))).collect();
        assert_eq!(slots, [0, 1, 2, 3, 4]);
        subs.remove(1);
        subs.remove(3);
        assert_eq!(subs.len(), 3);
        assert_eq!(
            subs.iter().map(|(c, _)| c).collect::<Vec<_>>(),
            [(0, 100), (2, 102), (4, 104)]
        );
        // Like `slab::Slab`: the slot freed last is taken first.
        assert_eq!(subs.insert((7, 7)), 3);
        assert_eq!(subs.insert((8, 8)), 1);
        assert_eq!(subs.insert((9, 9)), 5);
        assert_eq!(
            subs.iter().map(|(c, _)| c).collect::<Vec<_>>(),
            [(0, 100), (8, 8), (2, 102), (7, 7), (4, 104), (9, 9)]
        );
        for s in 0..6 {
            subs.remove(s);
        }
        assert!(subs.is_empty());
        assert_eq!(subs.iter().count(), 0);
    }

    #[test]
    fn subscriber_slots_past_the_first_page_come_in_pages_that_never_move() {
        let mut subs = Subscribers::new();
        let n = 3 * SLOT_PAGE + 10;
        for i in 0..n {
            assert_eq!(subs.insert((i, i as u32)), i as u32);
        }
        let page = subs.more.as_ref().unwrap()[0].as_ptr();
        for i in n..n + SLOT_PAGE {
            subs.insert((i, i as u32));
        }
        let more = subs.more.as_ref().unwrap();
        assert_eq!(more[0].as_ptr(), page, "a full page is never copied");
        assert!(more.iter().all(|p| p.capacity() == SLOT_PAGE));
        // Free slots on every page are reused last-freed first.
        for s in [5, SLOT_PAGE as u32 + 1, 2 * SLOT_PAGE as u32 + 7] {
            subs.remove(s);
        }
        assert_eq!(subs.insert((1, 1)), 2 * SLOT_PAGE as u32 + 7);
        assert_eq!(subs.insert((2, 2)), SLOT_PAGE as u32 + 1);
        assert_eq!(subs.insert((3, 3)), 5);
        let all: Vec<ConnRef> = subs.iter().map(|(c, _)| c).collect();
        assert_eq!(all.len(), n + SLOT_PAGE);
        assert_eq!(all[5], (3, 3));
        assert_eq!(all[SLOT_PAGE + 1], (2, 2));
        assert_eq!(all[2 * SLOT_PAGE + 7], (1, 1));
        assert_eq!(all[3 * SLOT_PAGE], (3 * SLOT_PAGE, 3 * SLOT_PAGE as u32));
    }

    #[test]
    fn flags_leave_keys_alone() {
        let mut subs = Subscribers::new();
        let a = subs.insert((5, 50));
        let b = subs.insert_pending((6, 60));
        subs.set_multi(a, true);
        assert_eq!(subs.iter().collect::<Vec<_>>(), [((5, 50), true)]);
        assert_eq!(subs.get(a), Some((5, 50)));
        assert_eq!(subs.get(b), Some((6, 60)));
        subs.unpend(b);
        subs.set_multi(a, false);
        assert_eq!(
            subs.iter().collect::<Vec<_>>(),
            [((5, 50), false), ((6, 60), false)]
        );
        subs.remove(a);
        assert_eq!(subs.get(a), None);
        assert_eq!(subs.get(99), None);
    }
}
