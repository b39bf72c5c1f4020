//! The index behind automatic prefix caching: every full block a sequence has written is
//! recorded under a hash of all tokens up to its end, so a later sequence that starts with the
//! same tokens (a shared system prompt, the next turn of a chat, a preempted sequence coming
//! back) takes those blocks instead of computing them again. A block stays indexed after its
//! last holder lets go, until the pool needs it back: least recently released first.

use std::{
    collections::{hash_map::RandomState, BTreeMap, HashMap},
    hash::BuildHasher,
};

/// The chain hash of the empty prefix.
pub(super) const ROOT: u64 = 0;

/// What an indexed block holds. Checked on every hit, so that a hash collision can never hand
/// a sequence the keys and values of other tokens.
struct Entry {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

pub(super) struct PrefixIndex {
    /// Keys drawn at random per process: a client cannot craft prompts whose hashes collide
    /// with another client's.
    hasher: RandomState,
    by_hash: HashMap<u64, u32>,
    /// Per block, what it is indexed as.
    entries: Vec<Option<Entry>>,
    /// Indexed blocks no sequence holds, by release time: the first is evicted first.
    idle: BTreeMap<u64, u32>,
    /// Per idle block, its key in `idle`.
    idle_at: Vec<u64>,
    clock: u64,
}

impl PrefixIndex {
    pub(super) fn new(num_blocks: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            by_hash: HashMap::new(),
            entries: (0..num_blocks).map(|_| None).collect(),
            idle: BTreeMap::new(),
            idle_at: vec![0; num_blocks],
            clock: 0,
        }
    }

    /// The hash of the prefix hashed `parent` followed by `tokens`.
    pub(super) fn chain(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    /// The block holding `tokens` right after the prefix hashed `parent`, with its hash.
    pub(super) fn lookup(&self, parent: u64, tokens: &[u32]) -> Option<(u64, u32)> {
        let hash = self.chain(parent, tokens);
        let &b = self.by_hash.get(&hash)?;
        let e = self.entries[b as usize].as_ref()?;
        (e.hash == hash && e.parent == parent && *e.tokens == *tokens).then_some((hash, b))
    }

    /// Indexes block `b` as holding `tokens` after the prefix hashed `parent`. Another block
    /// may already hold them (two equal prompts prefilled side by side): `b` then stays out of
    /// the index and is freed as usual.
    pub(super) fn register(&mut self, b: u32, hash: u64, parent: u64, tokens: &[u32]) {
        if self.entries[b as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, b);
        self.entries[b as usize] = Some(Entry {
            hash,
            parent,
            tokens: tokens.into(),
        });
    }

    pub(super) fn is_indexed(&self, b: u32) -> bool {
        self.entries[b as usize].is_some()
    }

    /// An indexed block lost its last holder: it stays indexed and may be evicted.
    pub(super) fn park(&mut self, b: u32) {
        self.clock += 1;
        self.idle.insert(self.clock, b);
        self.idle_at[b as usize] = self.clock;
    }

    /// A parked block has a holder again.
    pub(super) fn unpark(&mut self, b: u32) {
        self.idle.remove(&self.idle_at[b as usize]);
    }

    /// Idle indexed blocks: as good as free.
    pub(super) fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Takes the least recently released idle block out of the index, for reuse.
    pub(super) fn evict(&mut self) -> Option<u32> {
        let (_, b) = self.idle.pop_first()?;
        if let Some(e) = self.entries[b as usize].take() {
            self.by_hash.remove(&e.hash);
        }
        Some(b)
    }

    /// Blocks indexed, held or idle.
    pub(super) fn indexed(&self) -> usize {
        self.by_hash.len()
    }
}
