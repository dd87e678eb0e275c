//! The staged delta's record table: record key → stored state, hashed once per op.
//!
//! A `HashMap<Box<[u8]>, Box<[u8]>>` cost staging two things that this table does not:
//! - every record staged was hashed twice (a lookup that missed, then an insert), and
//! - growing the table (each doubling) hashed every key again, reading each key from its own
//!   heap block: a cache miss per record held. With the delta of B2/B3 growing from empty to
//!   ~200k–1M records, those rehashes were ~22% of the materializer's time (perf, B2 one
//!   writer: `foldhash::hash_bytes_long` under `reserve_rehash`).
//!
//! Here a slot keeps its key's hash, so growth never touches the keys, and a lookup that
//! misses inserts with the hash it already has. Key and state share one block (`header ++ key
//! ++ state`), and the blocks live in a few large chunks ([`Arena`]) instead of one heap
//! allocation each: perf of B3 put the allocator's malloc and free of those blocks at ~10% of
//! the materializer's time, and dropping a flushed delta freed hundreds of thousands of
//! them one at a time. A record whose new state fits in its block is rewritten in place; one
//! that outgrows it moves to another block, and its old block is reused by a later one of
//! the same room ([`Updated::Replaced::grown`] says what the store's bound must count).

use std::hash::BuildHasher;

/// One record: its key's hash, where its block is in the arena and how long the block is.
/// Plain integers, 16 bytes: four slots per cache line, so a table holds a record in 32–64
/// bytes at its load of 1/4 to 1/2. (It was 32 bytes, with the key's and the state's lengths
/// and the block's room in the slot: on this VM the kernel's zeroing of the table's fresh
/// huge pages was 7.5% of B2's window and 11% of B3's, and a table half the size takes half
/// of it. The key's length and the room moved into the block's header, which a lookup reads
/// anyway to compare the key.) `loc` 0 marks an empty slot.
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Slot {
    hash: u64,
    /// The block's chunk and offset ([`Arena::loc`]), plus one.
    loc: u32,
    /// Bytes of the block in use: [`HEADER_BYTES`], the key and the state.
    len: u32,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.loc == 0
    }
}

/// A block starts with the key's length and the block's room (`u32` each, native order),
/// then the key, then the state.
const HEADER_BYTES: usize = 8;

/// A table's slots: on the heap while small; from [`MAPPED_MIN_BYTES`] on, an anonymous
/// memory map (zero-filled by the kernel as it is first touched: all-zero slots are empty)
/// with the transparent-huge-page hint. Staging touches the table at random, so with 4 KiB
/// pages every lookup in a table of tens of MB also missed the TLB: perf of B3 at 1M ops put
/// two thirds of `Store::stage`'s own samples on the slot prefetches, waiting for page
/// walks. With 2 MiB pages the whole table is a few dozen TLB entries. (The hint is on
/// this one map only: huge pages for all of mimalloc's memory cost far more in zeroing than
/// they saved, see the `no_thp` decision.)
enum Slots {
    Heap(Vec<Slot>),
    Mapped(memmap2::MmapMut),
}

/// How far ahead a walk over the table ([`DeltaMap::iter`], [`DeltaMap::keys`]) prefetches
/// records' blocks, in slots (about half of them held).
const WALK_AHEAD_SLOTS: usize = 32;

/// The smallest table mapped with the huge-page hint: one huge page (the kernel places an
/// anonymous map of whole huge pages on a huge-page boundary). The store's delta is split
/// over 8 shards, each its own table: mapped only from 4 MiB on (as when it was one
/// table), they stayed on the heap, with 4 KiB pages, until the delta held ~1M records.
/// (Staging from empty, B2m, two alternating pairs: 3.37 / 3.05M ops/s at 2 MiB against
/// 3.41 / 2.90M at 4 MiB, within noise; kept for the page walks it saves in principle.)
const MAPPED_MIN_BYTES: usize = 2 << 20;

impl Slots {
    /// `cap` empty slots.
    fn new(cap: usize) -> Slots {
        let bytes = cap * std::mem::size_of::<Slot>();
        if bytes >= MAPPED_MIN_BYTES {
            if let Ok(map) = memmap2::MmapOptions::new().len(bytes).map_anon() {
                // A hint: where the kernel has no huge pages to give, 4 KiB pages it is.
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage);
                return Slots::Mapped(map);
            }
        }
        Slots::Heap(vec![Slot::default(); cap])
    }

    /// Grows to `cap` slots (more than now), the slots held now staying first, in place,
    /// and the new ones empty. A mapped table grows with `mremap`: the pages it has are
    /// moved, not copied, and only the new part is faulted in (zero-filled) as it is used.
    /// A new table and a copy was three times the old one's size at the peak, and zeroed
    /// twice its size each doubling: perf of B3 at 1M ops put ~5% of the window on those
    /// page faults.
    fn grow(&mut self, cap: usize) {
        let bytes = cap * std::mem::size_of::<Slot>();
        let in_place = match self {
            Slots::Heap(v) if bytes < MAPPED_MIN_BYTES => {
                v.resize(cap, Slot::default());
                true
            }
            #[cfg(target_os = "linux")]
            Slots::Mapped(m) => Self::remap(m, bytes).is_ok(),
            _ => false,
        };
        if in_place {
            return;
        }
        let mut grown = Slots::new(cap);
        grown[..self.len()].copy_from_slice(self);
        *self = grown;
    }

    /// Resizes an anonymous map to `bytes` (moving it if it cannot grow where it is).
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn remap(m: &mut memmap2::MmapMut, bytes: usize) -> std::io::Result<()> {
        // SAFETY: `remap` is unsafe because a *file* mapping grown past the file's end would
        // fault when read; this map is anonymous and private (`Slots::new`), so every byte
        // of the grown map is memory the kernel zero-fills on first touch. No reference into
        // the old mapping outlives this call (`&mut` borrow), so a move is harmless.
        unsafe { m.remap(bytes, memmap2::RemapOptions::new().may_move(true))? };
        // The hint again, for the grown range (a hint: failure changes nothing).
        let _ = m.advise(memmap2::Advice::HugePage);
        Ok(())
    }
}

impl Default for Slots {
    fn default() -> Slots {
        Slots::Heap(Vec::new())
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];

    fn deref(&self) -> &[Slot] {
        match self {
            Slots::Heap(v) => v,
            Slots::Mapped(m) => bytemuck::cast_slice(m),
        }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Slot] {
        match self {
            Slots::Heap(v) => v,
            Slots::Mapped(m) => bytemuck::cast_slice_mut(m),
        }
    }
}

/// The blocks of one delta, in chunks that are never moved or freed until the delta is dropped
/// (each chunk is a `Vec` filled only up to its first capacity). A block's room is its length
/// rounded up to [`BLOCK_ALIGN`]; a block given up (its record's state outgrew it) goes to the
/// free list of its room and is reused by the next block of that room, so a delta whose
/// records keep changing size (workload W: three values of 8–64 random bytes replaced
/// together) does not fill its chunks with dead blocks.
#[derive(Default)]
struct Arena {
    chunks: Vec<Vec<u8>>,
    /// Sum of the chunks' capacities.
    bytes: usize,
    /// Free blocks' locations ([`Arena::loc`]) by room / [`BLOCK_ALIGN`] (rooms up to
    /// [`FREE_LIST_ROOM_MAX`]; a larger block given up stays unused until the delta is
    /// dropped).
    free: Vec<Vec<u32>>,
}

/// The first chunk's size; each next one is twice the last, up to [`CHUNK_MAX_BYTES`] (a
/// block larger than that gets a chunk of its own size, at its start). 256 KiB, not the 2 MiB
/// of one table: the store's delta is 8 tables, each with its last chunk partly empty, and
/// with 2 MiB chunks a delta of 200k W ops held 291 B per op against 241 in one table
/// (B2m); with 256 KiB, 249 (180 at 1M ops, as in one table), staging as fast.
const CHUNK_MIN_BYTES: usize = 64 * 1024;
const CHUNK_MAX_BYTES: usize = 256 * 1024;
/// Bits of a location for the offset in its chunk, in [`BLOCK_ALIGN`] units (a block starts
/// below [`CHUNK_MAX_BYTES`]); the chunk's index takes the rest.
const OFFSET_BITS: u32 = (CHUNK_MAX_BYTES / BLOCK_ALIGN).trailing_zeros();
/// Bytes per cache line (x86-64, most ARM cores).
const CACHE_LINE: usize = 64;
/// Blocks' rooms are multiples of this many bytes.
const BLOCK_ALIGN: usize = 16;
/// The largest room kept on a free list.
const FREE_LIST_ROOM_MAX: usize = 4096;

impl Arena {
    /// The room a block of `len` bytes gets.
    fn room_for(len: usize) -> usize {
        len.div_ceil(BLOCK_ALIGN).max(1) * BLOCK_ALIGN
    }

    /// A slot's `loc` for the block at `offset` in chunk `chunk` (never 0).
    fn loc(chunk: usize, offset: usize) -> u32 {
        debug_assert!(offset.is_multiple_of(BLOCK_ALIGN) && offset < CHUNK_MAX_BYTES);
        to_u32(((chunk << OFFSET_BITS) | (offset / BLOCK_ALIGN)) + 1)
    }

    /// (chunk, offset) of a `loc`.
    fn at(loc: u32) -> (usize, usize) {
        let n = loc as usize - 1;
        (
            n >> OFFSET_BITS,
            (n & ((1 << OFFSET_BITS) - 1)) * BLOCK_ALIGN,
        )
    }

    /// Places `data` (a block: its header's room is set here) in a free block of its room,
    /// or at the end of the last chunk; returns (its location, bytes newly taken at the end:
    /// 0 or the room).
    fn push(&mut self, data: &mut [u8]) -> (u32, usize) {
        let room = Self::room_for(data.len());
        set_room(data, room);
        if let Some(loc) = self.free.get_mut(room / BLOCK_ALIGN).and_then(Vec::pop) {
            let (chunk, start) = Self::at(loc);
            self.chunks[chunk][start..start + data.len()].copy_from_slice(data);
            return (loc, 0);
        }
        // A block starts below `CHUNK_MAX_BYTES` (its location has bits for no more), and a
        // chunk of one large block holds nothing else.
        let fits = self
            .chunks
            .last()
            .is_some_and(|c| c.capacity() - c.len() >= room && c.len() + room <= CHUNK_MAX_BYTES);
        if !fits {
            let size = CHUNK_MIN_BYTES << self.chunks.len().min(5);
            let cap = size.min(CHUNK_MAX_BYTES).max(room);
            self.chunks.push(Vec::with_capacity(cap));
            self.bytes += cap;
        }
        let chunk = self.chunks.len() - 1;
        let c = &mut self.chunks[chunk];
        let offset = c.len();
        c.extend_from_slice(data);
        c.resize(offset + room, 0);
        (Self::loc(chunk, offset), room)
    }

    /// Gives up the block at `loc` (its record has moved to another).
    fn release(&mut self, loc: u32) {
        let room = self.room(loc);
        if room <= FREE_LIST_ROOM_MAX {
            let class = room / BLOCK_ALIGN;
            if self.free.len() <= class {
                self.free.resize_with(class + 1, Vec::new);
            }
            self.free[class].push(loc);
        }
    }

    /// The room of the block at `loc`, from its header.
    fn room(&self, loc: u32) -> usize {
        let (chunk, start) = Self::at(loc);
        read_u32(&self.chunks[chunk][start + 4..]) as usize
    }

    fn block(&self, s: &Slot) -> &[u8] {
        let (chunk, start) = Self::at(s.loc);
        &self.chunks[chunk][start..start + s.len as usize]
    }

    /// Prefetches every cache line of the block of `s` (a W record's block is ~200 bytes:
    /// its state's names, stamps and values lie past the first line, and staging reads them
    /// all before it rewrites them).
    fn prefetch(&self, s: &Slot) {
        let (chunk, offset) = Self::at(s.loc);
        let start = self.chunks[chunk].as_ptr().wrapping_add(offset);
        prefetch_lines(start, s.len as usize);
    }

    /// Writes `data` (a block, its header's room already that of the block at `loc`) over
    /// the block at `loc`.
    fn rewrite(&mut self, loc: u32, data: &[u8]) {
        let (chunk, start) = Self::at(loc);
        self.chunks[chunk][start..start + data.len()].copy_from_slice(data);
    }
}

/// The blocks of one chunk in order: each block's key and location. A chunk is filled with
/// whole blocks, each taking its room (its header's), back to back.
struct ArenaBlocks<'a> {
    chunk: usize,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for ArenaBlocks<'a> {
    type Item = (&'a [u8], u32);

    fn next(&mut self) -> Option<Self::Item> {
        let block = self.bytes.get(self.at..)?;
        let header = block.get(..HEADER_BYTES)?;
        let (key_len, room) = (read_u32(header) as usize, read_u32(&header[4..]) as usize);
        // A room is at least the header and a multiple of the alignment: anything else
        // would mean the chunk is not what `push` wrote, and the walk stops.
        if room < HEADER_BYTES || !room.is_multiple_of(BLOCK_ALIGN) {
            return None;
        }
        let key = block.get(HEADER_BYTES..HEADER_BYTES + key_len)?;
        let loc = Arena::loc(self.chunk, self.at);
        self.at += room;
        Some((key, loc))
    }
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// Writes a block's header: the key's length, and a room to be set when the block is placed.
fn start_block(buf: &mut Vec<u8>, key: &[u8]) {
    buf.clear();
    buf.extend_from_slice(&to_u32(key.len()).to_ne_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(key);
}

fn set_room(block: &mut [u8], room: usize) {
    block[4..HEADER_BYTES].copy_from_slice(&to_u32(room).to_ne_bytes());
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).expect("record keys, states and chunks are bounded far below 4 GiB")
}

/// Record key → stored state (see the module docs).
///
/// Open addressing with linear probing over the slots themselves, at most half full: a key's
/// first slot is a function of its hash alone, so staging can prefetch it many ops ahead
/// ([`DeltaMap::prefetch_slot`]), and a few ops ahead, with the slot in cache, find the
/// record's block and prefetch that too ([`DeltaMap::prefetch_block`]). (hashbrown's table
/// keeps its slot addresses to itself: the earlier version could only *read* ahead, which
/// stalled on each of the three dependent misses — control bytes, slot, block — as the
/// update itself would: perf put ~93% of staging's own samples on those three loads.)
#[derive(Default)]
pub(crate) struct DeltaMap {
    /// A power of two long (or empty), never more than half full.
    slots: Slots,
    len: usize,
    /// `64 - log2(slots.len())`: a hash's first slot is its top bits after a multiply.
    shift: u32,
    hasher: foldhash::fast::RandomState,
    blocks: Arena,
}

/// What [`DeltaMap::update`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Updated {
    /// The key was new; its state is this many bytes.
    Inserted { state_len: usize },
    /// The key was held with a state of `old` bytes, now `new` bytes, and `grown` bytes
    /// were newly taken from the end of the blocks' chunks: 0 when the state was rewritten
    /// in its block or moved to a block given up earlier, else the new block's room.
    Replaced {
        old: usize,
        new: usize,
        grown: usize,
    },
}

/// Asks the CPU to bring the cache line holding `p` closer (x86-64 `prefetcht0`; nothing
/// elsewhere). A prefetch is a hint: it never faults, whatever the address, and changes
/// nothing the program can observe but time.
#[allow(unsafe_code)]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` needs SSE, which every x86-64 CPU has; it does not dereference
    // `p` in the language's sense (no fault, no read the program sees), so any address is
    // sound.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`]es every cache line of the `len` bytes from `start`.
#[inline]
pub(crate) fn prefetch_lines(start: *const u8, len: usize) {
    let lead = start as usize % CACHE_LINE;
    for off in (0..lead + len).step_by(CACHE_LINE) {
        prefetch(start.wrapping_add(off).wrapping_sub(lead));
    }
}

impl DeltaMap {
    /// An empty table that hashes with `hasher`: tables made with the same one file a key
    /// under the same hash, so a hash taken once picks the table and serves its lookups
    /// (the store's shards, [`crate::store`]).
    pub fn with_hasher(hasher: foldhash::fast::RandomState) -> DeltaMap {
        DeltaMap {
            hasher,
            ..DeltaMap::default()
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room for `n` more records without growing (so slots prefetched stay where they are).
    pub fn reserve(&mut self, n: usize) {
        let need = self.len.saturating_add(n).saturating_mul(2).max(16);
        if need > self.slots.len() {
            self.grow_to(need.next_power_of_two());
        }
    }

    /// Grows the table to `cap` slots (a power of two, at least twice the slots now) and
    /// moves every record to its place in it, in place and by the hashes the slots keep (no
    /// key or block is read). A record's first slot in the larger table is at least twice
    /// its first slot now (the top bits of its hash, one or more bits longer), so going
    /// down from the last slot held, each record goes to a slot at or above where it was,
    /// among slots already done; the few that would land below (a first slot smaller than
    /// the distance from it, at the very start of the table) or wrap past the end are set
    /// aside and put back last, into the finished table.
    fn grow_to(&mut self, cap: usize) {
        let old_len = self.slots.len();
        self.slots.grow(cap);
        self.shift = 64 - cap.trailing_zeros();
        let mut aside = Vec::new();
        for i in (0..old_len).rev() {
            let slot = std::mem::take(&mut self.slots[i]);
            if slot.is_empty() {
                continue;
            }
            let home = self.home(slot.hash);
            match (home >= i)
                .then(|| (home..cap).find(|&j| self.slots[j].is_empty()))
                .flatten()
            {
                Some(j) => self.slots[j] = slot,
                None => aside.push(slot),
            }
        }
        let mask = cap - 1;
        for slot in aside {
            let mut i = self.home(slot.hash);
            while !self.slots[i].is_empty() {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// The first slot a key of this hash may be in (the table must not be empty).
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The slot holding `key` (`Ok`), or the empty slot where it would go (`Err`). The kept
    /// hash is compared first, so a block is read only for its own key (in practice).
    fn find(&self, hash: u64, key: &[u8]) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let s = &self.slots[i];
            if s.is_empty() {
                return Err(i);
            }
            if s.hash == hash && self.key(s) == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn key(&self, s: &Slot) -> &[u8] {
        let block = self.blocks.block(s);
        &block[HEADER_BYTES..HEADER_BYTES + read_u32(block) as usize]
    }

    fn state(&self, s: &Slot) -> &[u8] {
        let block = self.blocks.block(s);
        &block[HEADER_BYTES + read_u32(block) as usize..]
    }

    /// The stored state held for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let hash = self.hasher.hash_one(key);
        self.find(hash, key)
            .ok()
            .map(|i| self.state(&self.slots[i]))
    }

    /// The hash `key` is filed under (for the prefetches and [`DeltaMap::update_hashed`]).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Prefetches the first slot a key of this hash may be in: called many ops ahead of its
    /// update (the address depends on the hash alone).
    pub fn prefetch_slot(&self, hash: u64) {
        if self.slots.is_empty() {
            return;
        }
        // The slot after it too (the next cache line for a home in a line's second half).
        for s in self.slots[self.home(hash)..].iter().take(2) {
            prefetch((s as *const Slot).cast());
        }
    }

    /// Prefetches the block of the record whose kept hash is `hash`, if one is held: called a
    /// few ops ahead of its update, once [`DeltaMap::prefetch_slot`] has brought its slots
    /// in (reads slots only, never a block).
    pub fn prefetch_block(&self, hash: u64) {
        if self.len == 0 {
            return;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        while !self.slots[i].is_empty() {
            let s = &self.slots[i];
            if s.hash == hash {
                self.blocks.prefetch(s);
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Sets `key`'s state to what `f` writes, given the state held (if any), with one lookup.
    /// `f` appends the new state to the buffer it is given (which already holds the block's
    /// header and the key: the block is then copied out once). If `f` fails, nothing changes.
    #[cfg(test)]
    pub fn update<E>(
        &mut self,
        key: &[u8],
        buf: &mut Vec<u8>,
        f: impl FnOnce(Option<&[u8]>, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Updated, E> {
        let hash = self.hasher.hash_one(key);
        self.update_hashed(hash, key, buf, f)
    }

    /// [`DeltaMap::update`] of a key whose [`DeltaMap::hash`] is `hash`.
    pub fn update_hashed<E>(
        &mut self,
        hash: u64,
        key: &[u8],
        buf: &mut Vec<u8>,
        f: impl FnOnce(Option<&[u8]>, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Updated, E> {
        self.reserve(1);
        start_block(buf, key);
        let state_at = HEADER_BYTES + key.len();
        match self.find(hash, key) {
            Ok(i) => {
                let slot = self.slots[i];
                let old = slot.len as usize - state_at;
                f(Some(self.state(&slot)), buf)?;
                let new = buf.len() - state_at;
                let room = self.blocks.room(slot.loc);
                let grown = if buf.len() <= room {
                    set_room(buf, room);
                    self.blocks.rewrite(slot.loc, buf);
                    0
                } else {
                    let (loc, grown) = self.blocks.push(buf);
                    self.blocks.release(slot.loc);
                    self.slots[i].loc = loc;
                    grown
                };
                self.slots[i].len = to_u32(buf.len());
                Ok(Updated::Replaced { old, new, grown })
            }
            Err(i) => {
                f(None, buf)?;
                let (loc, _) = self.blocks.push(buf);
                self.slots[i] = Slot {
                    hash,
                    loc,
                    len: to_u32(buf.len()),
                };
                self.len += 1;
                Ok(Updated::Inserted {
                    state_len: buf.len() - state_at,
                })
            }
        }
    }

    /// The held slots in table order, each record's block prefetched [`WALK_AHEAD_SLOTS`]
    /// slots ahead: the blocks lie in the arena in the order they were staged, so a walk in
    /// table order (the flush's sort, `list`, `counts`) would otherwise wait on a cache miss
    /// per record once the delta outgrows the cache.
    fn held(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            if let Some(a) = self
                .slots
                .get(i + WALK_AHEAD_SLOTS)
                .filter(|a| !a.is_empty())
            {
                self.blocks.prefetch(a);
            }
            (!s.is_empty()).then_some(s)
        })
    }

    /// Bytes held: the slots, the blocks' chunks and the free lists (see
    /// [`crate::store::Store::staged_heap_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        let free: usize = self.blocks.free.iter().map(Vec::capacity).sum();
        self.slots.len() * std::mem::size_of::<Slot>()
            + self.blocks.bytes
            + free * std::mem::size_of::<u32>()
    }

    /// Every record's key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.held().map(|s| self.key(s))
    }

    /// Every block's key and location, in the order the blocks lie in the arena: read in
    /// memory order, so the hardware's prefetchers bring the keys in, where a walk in table
    /// order waits on a cache miss per record. Blocks given up (their record moved to a
    /// larger one) and not reused yet are walked too, with the key they held:
    /// [`DeltaMap::holds_at`] tells a record's own block from those.
    pub fn arena_keys(&self) -> impl Iterator<Item = (&[u8], u32)> {
        self.blocks
            .chunks
            .iter()
            .enumerate()
            .flat_map(|(chunk, c)| ArenaBlocks {
                chunk,
                bytes: c,
                at: 0,
            })
    }

    /// Whether `key` is held and its record is in the block at `loc` (from
    /// [`DeltaMap::arena_keys`]).
    pub fn holds_at(&self, key: &[u8], loc: u32) -> bool {
        if self.len == 0 {
            return false;
        }
        let hash = self.hasher.hash_one(key);
        self.find(hash, key).is_ok_and(|i| self.slots[i].loc == loc)
    }

    /// Every record's (key, state), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.held().map(|s| (self.key(s), self.state(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A hot record rewritten many times with states no larger than its first takes no more
    /// memory: each state goes into the record's own block.
    #[test]
    fn rewrites_that_fit_stay_in_place() {
        let mut map = DeltaMap::default();
        let buf = &mut Vec::new();
        let write = |map: &mut DeltaMap, buf: &mut Vec<u8>, n: usize| {
            map.update(b"hot", buf, |_, out| {
                out.resize(out.len() + n, 7);
                Ok::<(), ()>(())
            })
            .unwrap()
        };
        write(&mut map, buf, 100);
        let bytes = map.heap_bytes();
        for i in 0..10_000 {
            let (old, new) = (map_len(&map), 50 + i % 51);
            let updated = write(&mut map, buf, new);
            assert_eq!(updated, Updated::Replaced { old, new, grown: 0 });
        }
        assert_eq!(map.heap_bytes(), bytes);
        // A state that outgrows the block's room (header, key and state: 8 + 3 + 100 bytes,
        // rounded to 112) moves to a
        // new block, counted; the old one is given up ...
        let (old, updated) = (map_len(&map), write(&mut map, buf, 113));
        assert_eq!(
            updated,
            Updated::Replaced {
                old,
                new: 113,
                grown: 128
            }
        );
        assert_eq!(map.get(b"hot"), Some(&[7u8; 113][..]));
        // ... and taken by the next block of its room: nothing more is taken from the chunks.
        let used = map.blocks.chunks.iter().map(Vec::len).sum::<usize>();
        map.update(b"new", buf, |_, out| {
            out.resize(out.len() + 100, 9);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(map.blocks.chunks.iter().map(Vec::len).sum::<usize>(), used);
        assert_eq!(map.get(b"new"), Some(&[9u8; 100][..]));
        assert_eq!(map.get(b"hot"), Some(&[7u8; 113][..]));
    }

    /// Blocks larger than a chunk get chunks of their own, and every location (chunk and
    /// offset in one `u32`) reads back its own block: small blocks before and after large
    /// ones, across many chunks, and a large block moved and its room reused.
    #[test]
    fn locations_hold_across_chunks_and_large_blocks() {
        let mut map = DeltaMap::default();
        let buf = &mut Vec::new();
        let state = |i: usize| -> Vec<u8> {
            let len = match i % 50 {
                7 => CHUNK_MAX_BYTES + 1000 * i,
                _ => 200 + i % 300,
            };
            (0..len).map(|j| (i * 31 + j) as u8).collect()
        };
        let n = 400;
        for i in 0..n {
            map.update(format!("k{i}").as_bytes(), buf, |_, out| {
                out.extend_from_slice(&state(i));
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        // A large state replaced by a small one stays in its block (in place) ...
        map.update(b"k7", buf, |_, out| {
            out.extend_from_slice(b"small");
            Ok::<(), ()>(())
        })
        .unwrap();
        assert!(
            map.blocks.chunks.len() > n / 50 + 4,
            "{}",
            map.blocks.chunks.len()
        );
        for i in (0..n).filter(|&i| i != 7) {
            assert_eq!(
                map.get(format!("k{i}").as_bytes()),
                Some(&state(i)[..]),
                "k{i}"
            );
        }
        assert_eq!(map.get(b"k7"), Some(&b"small"[..]));
        for (chunk, offset) in [(0, 0), (1, 16), (3, CHUNK_MAX_BYTES - 16), (4095, 4096)] {
            assert_eq!(Arena::at(Arena::loc(chunk, offset)), (chunk, offset));
        }
    }

    /// A table past [`MAPPED_MIN_BYTES`] lives in a memory map: records survive the move into
    /// it and every later doubling, and read back as written.
    #[test]
    fn large_tables_are_mapped_and_hold_every_record() {
        let mut map = DeltaMap::default();
        let buf = &mut Vec::new();
        let n = 3 * MAPPED_MIN_BYTES / std::mem::size_of::<Slot>() / 4;
        for i in 0..n {
            map.update(format!("k{i}").as_bytes(), buf, |_, out| {
                out.extend_from_slice(&(i as u64).to_le_bytes());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert!(matches!(map.slots, Slots::Mapped(_)));
        assert_eq!(map.len(), n);
        for i in (0..n).step_by(97) {
            let want = (i as u64).to_le_bytes();
            assert_eq!(map.get(format!("k{i}").as_bytes()), Some(&want[..]));
        }
        assert_eq!(map.iter().count(), n);
    }

    /// A hash whose first slot is `top` (as a fraction of the table, in its top bits) in a
    /// table of any size: the multiplier's inverse times the wanted product.
    fn hash_at(top: u64) -> u64 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut inv = K;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(K.wrapping_mul(inv)));
        }
        assert_eq!(K.wrapping_mul(inv), 1);
        inv.wrapping_mul(top)
    }

    proptest! {
        /// Growth in place keeps every record findable, also where records crowd the first
        /// slots (their distance from their first slot exceeds its index) and where they wrap
        /// from the last slot to the first: the cases growing sets aside.
        #[test]
        fn grows_in_place_around_crowds_and_wraps(
            ops in proptest::collection::vec((0u16..400, any::<u8>(), 0usize..3), 1..1_500),
        ) {
            let (mut map, mut model) = (DeltaMap::default(), HashMap::<Vec<u8>, (u64, u8)>::new());
            let buf = &mut Vec::new();
            for (k, v, grow) in ops {
                let key = format!("key{k}").into_bytes();
                let hash = match k % 4 {
                    0 => hash_at(0),
                    1 => hash_at(u64::MAX),
                    2 => hash_at(u64::MAX - (u64::from(k) << 52)),
                    _ => map.hash(&key),
                };
                if grow > 0 && k % 32 == 0 {
                    // Growth by more than a doubling, as a batch's reserve can ask.
                    map.reserve(map.len() * 2 * grow + 1);
                }
                map.update_hashed(hash, &key, buf, |_, out| {
                    out.push(v);
                    Ok::<(), ()>(())
                })
                .unwrap();
                model.insert(key, (hash, v));
            }
            prop_assert_eq!(map.len(), model.len());
            for (key, (hash, v)) in &model {
                let i = map.find(*hash, key);
                prop_assert!(i.is_ok(), "lost {:?}", String::from_utf8_lossy(key));
                let slot = map.slots[i.unwrap_or_default()];
                prop_assert_eq!(map.state(&slot), &[*v][..]);
            }
            prop_assert_eq!(map.iter().count(), model.len());
        }
    }

    fn map_len(map: &DeltaMap) -> usize {
        map.get(b"hot").map_or(0, <[u8]>::len)
    }

    proptest! {
        /// Behaves as a plain map of keys to the last state written, whatever the order of
        /// updates and however much it grows; a failed update changes nothing.
        #[test]
        fn acts_as_a_map(
            ops in proptest::collection::vec(
                (0u16..300, proptest::collection::vec(any::<u8>(), 0..12), any::<bool>()),
                0..2_000,
            ),
        ) {
            let (mut map, mut model) = (DeltaMap::default(), HashMap::<Vec<u8>, Vec<u8>>::new());
            let mut buf = Vec::new();
            for (k, state, fail) in ops {
                let key = format!("key{k}").into_bytes();
                let held = model.get(&key).cloned();
                // Prefetching changes nothing (held key or not, empty table or not).
                let ahead = map.hash(format!("key{}", k ^ 1).as_bytes());
                map.prefetch_slot(ahead);
                map.prefetch_block(ahead);
                // Room reserved ahead (as staging does per batch) moves records, never
                // changes them.
                if k % 97 == 0 {
                    map.reserve(usize::from(k));
                }
                let r = map.update(&key, &mut buf, |old, out| {
                    prop_assert_eq!(old.map(<[u8]>::to_vec), held.clone());
                    if fail {
                        return Err(TestCaseError::fail("refused"));
                    }
                    out.extend_from_slice(&state);
                    Ok(())
                });
                match (r, fail) {
                    (Err(_), true) => {}
                    (Ok(Updated::Inserted { state_len }), false) => {
                        prop_assert!(held.is_none());
                        prop_assert_eq!(state_len, state.len());
                        model.insert(key, state);
                    }
                    (Ok(Updated::Replaced { old, new, grown }), false) => {
                        prop_assert_eq!(Some(old), held.map(|h| h.len()));
                        prop_assert_eq!(new, state.len());
                        // In place or reused, or a whole new block (key and state, rounded).
                        let room = Arena::room_for(HEADER_BYTES + key.len() + new);
                        prop_assert!(grown == 0 || grown == room, "grew {}", grown);
                        model.insert(key, state);
                    }
                    (Err(e), false) => return Err(e),
                    (Ok(_), true) => prop_assert!(false, "a failed update reported success"),
                }
            }
            prop_assert_eq!(map.len(), model.len());
            prop_assert_eq!(map.is_empty(), model.is_empty());
            // Half full at most, and every block counted: key and state.
            let blocks: usize = model.iter().map(|(k, v)| k.len() + v.len()).sum();
            prop_assert!(map.slots.len() >= 2 * model.len());
            let slot_bytes = map.slots.len() * std::mem::size_of::<Slot>();
            prop_assert!(map.heap_bytes() >= slot_bytes + blocks);
            for (k, v) in &model {
                prop_assert_eq!(map.get(k), Some(v.as_slice()));
            }
            prop_assert_eq!(map.get(b"absent"), None);
            let mut all: Vec<(Vec<u8>, Vec<u8>)> =
                map.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            all.sort();
            // The arena walked in memory order holds every record's own block once, told
            // apart from the blocks given up.
            let mut own: Vec<Vec<u8>> = map
                .arena_keys()
                .filter(|&(k, loc)| map.holds_at(k, loc))
                .map(|(k, _)| k.to_vec())
                .collect();
            own.sort();
            let mut keys: Vec<Vec<u8>> = model.keys().cloned().collect();
            keys.sort();
            prop_assert_eq!(own, keys);
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
            want.sort();
            prop_assert_eq!(all, want);
        }
    }
}
