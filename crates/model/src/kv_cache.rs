//! Paged KV cache: fixed-size blocks in one pool per layer, a free list, and per-sequence block
//! tables. Sequences grow block by block; nothing is copied when they do. With the prefix cache
//! on, full blocks are shared between sequences that start with the same tokens (reference
//! counted; see [`prefix`]).

mod prefix;

use prefix::{PrefixIndex, ROOT};

use crate::{
    backend::{Backend, KvDtype},
    config::MixtralConfig,
    ModelError, Result,
};

/// Positions per block. 16 keeps the waste of a half-used last block small while making block
/// tables short.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The cache pools of every layer and the free-block list.
pub struct KvCache<B: Backend> {
    block_size: usize,
    num_blocks: usize,
    kv_dim: usize,
    dtype: KvDtype,
    /// Per layer: (keys, values), each `[num_blocks * block_size, kv_dim]`.
    layers: Vec<(B::KvBuf, B::KvBuf)>,
    free: Vec<u32>,
    /// Per block: the sequences holding it.
    refs: Vec<u32>,
    /// Present when prefix caching is on.
    prefix: Option<PrefixIndex>,
}

/// A block-table entry whose block was freed because it fell outside the sliding window.
pub const FREED: u32 = u32::MAX;

/// One sequence's view of the cache: its block table and how many positions are filled.
#[derive(Clone, Debug, Default)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
    /// With the prefix cache on: the chain hash of each leading full block written so far.
    hashes: Vec<u64>,
}

impl SeqKv {
    /// Positions already in the cache.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The block table.
    #[must_use]
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
    /// Records that positions up to `len` are now written.
    pub fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

impl<B: Backend> KvCache<B> {
    /// A cache of `num_blocks` blocks of `block_size` positions for every layer, holding
    /// `dtype` elements.
    pub fn new(
        backend: &B,
        cfg: &MixtralConfig,
        block_size: usize,
        num_blocks: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let kv_dim = cfg.kv_dim();
        let len = num_blocks * block_size * kv_dim;
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Ok((backend.alloc_kv(len, dtype)?, backend.alloc_kv(len, dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            block_size,
            num_blocks,
            kv_dim,
            dtype,
            layers,
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix: None,
        })
    }

    /// Turns on automatic prefix caching: [`KvCache::commit`] indexes full blocks and
    /// [`KvCache::attach_prefix`] hands them to sequences that start with the same tokens.
    /// Worth it wherever prompts share beginnings; it costs a hash per block written.
    #[must_use]
    pub fn with_prefix_cache(mut self) -> Self {
        self.prefix = Some(PrefixIndex::new(self.num_blocks));
        self
    }

    /// Whether prefix caching is on.
    #[must_use]
    pub fn prefix_cache_enabled(&self) -> bool {
        self.prefix.is_some()
    }

    /// Blocks in the prefix index, held by a sequence or idle.
    #[must_use]
    pub fn prefix_cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixIndex::indexed)
    }

    /// Gives an empty `seq` the longest run of indexed blocks that `tokens` starts with, and
    /// returns how many positions they hold (a whole number of blocks). At least the last token
    /// is always left to compute, so that the step that runs it yields the prompt's logits and
    /// never writes into a shared block.
    pub fn attach_prefix(&mut self, seq: &mut SeqKv, tokens: &[u32]) -> usize {
        let Some(p) = self.prefix.as_mut() else {
            return 0;
        };
        if !seq.blocks.is_empty() || tokens.is_empty() {
            return 0;
        }
        let bs = self.block_size;
        let mut parent = ROOT;
        for chunk in tokens[..tokens.len() - 1].chunks_exact(bs) {
            let Some((hash, b)) = p.lookup(parent, chunk) else {
                break;
            };
            if self.refs[b as usize] == 0 {
                p.unpark(b);
            }
            self.refs[b as usize] += 1;
            seq.blocks.push(b);
            seq.hashes.push(hash);
            parent = hash;
        }
        seq.len = seq.blocks.len() * bs;
        seq.len
    }

    /// Indexes `seq`'s blocks that have filled since the last call; `tokens` are the
    /// sequence's tokens, at least its cached positions. Does nothing with the prefix cache off.
    pub fn commit(&mut self, seq: &mut SeqKv, tokens: &[u32]) {
        let Some(p) = self.prefix.as_mut() else {
            return;
        };
        let bs = self.block_size;
        let full = seq.len.min(tokens.len()) / bs;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(ROOT);
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let hash = p.chain(parent, chunk);
            match seq.blocks.get(i) {
                Some(&b) if b != FREED => p.register(b, hash, parent, chunk),
                _ => {}
            }
            seq.hashes.push(hash);
        }
    }

    /// A block for a growing sequence: a free one, else the least recently used idle one.
    fn alloc(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => self.prefix.as_mut()?.evict()?,
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One holder of `b` lets go; the last one returns it to the pool (indexed blocks stay
    /// findable until evicted).
    fn unref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        match self.prefix.as_mut() {
            Some(p) if p.is_indexed(b) => p.park(b),
            _ => self.free.push(b),
        }
    }

    /// Blocks needed to hold `positions` positions.
    #[must_use]
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Bytes of one block over all layers (keys and values).
    #[must_use]
    pub fn block_bytes(cfg: &MixtralConfig, block_size: usize, dtype: KvDtype) -> usize {
        2 * cfg.num_hidden_layers * block_size * cfg.kv_dim() * dtype.size()
    }

    /// Grows `seq`'s block table to hold `positions` positions.
    pub fn reserve(&mut self, seq: &mut SeqKv, positions: usize) -> Result<()> {
        let need = self.blocks_for(positions).saturating_sub(seq.blocks.len());
        let free = self.free_blocks();
        if need > free {
            return Err(ModelError::KvCacheFull { needed: need, free });
        }
        for _ in 0..need {
            // Checked above: `need <= free_blocks()`.
            if let Some(b) = self.alloc() {
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Lets go of all of `seq`'s blocks. Its last block goes first, so that a shared prefix's
    /// tail is evicted before its head.
    pub fn release(&mut self, seq: &mut SeqKv) {
        let blocks = std::mem::take(&mut seq.blocks);
        for &b in blocks.iter().rev().filter(|&&b| b != FREED) {
            self.unref(b);
        }
        seq.hashes.clear();
        seq.len = 0;
    }

    /// With a sliding window of `window` keys, frees the blocks no future query can see: the next
    /// query sits at position `seq.len()` and attends to keys from `seq.len() + 1 - window` on.
    /// Table entries stay (as [`FREED`]) so later positions keep their logical block index.
    /// Returns the number of blocks freed.
    pub fn trim_window(&mut self, seq: &mut SeqKv, window: usize) -> usize {
        let first_visible = (seq.len + 1).saturating_sub(window);
        let dead = first_visible / self.block_size;
        let mut freed = 0;
        for i in 0..dead.min(seq.blocks.len()) {
            let b = std::mem::replace(&mut seq.blocks[i], FREED);
            if b != FREED {
                self.unref(b);
                freed += 1;
            }
        }
        freed
    }

    /// Blocks a sequence can take: free ones and idle ones of the prefix cache.
    #[must_use]
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, PrefixIndex::idle)
    }

    /// Total blocks.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Positions per block.
    #[must_use]
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Key/value width.
    #[must_use]
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// The element type the cache holds.
    #[must_use]
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Layer `l`'s pools.
    pub(crate) fn layer_mut(&mut self, l: usize) -> &mut (B::KvBuf, B::KvBuf) {
        &mut self.layers[l]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    fn cfg() -> MixtralConfig {
        let text = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":32,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
            "num_local_experts":4,"num_experts_per_tok":2,"max_position_embeddings":64}"#;
        MixtralConfig::from_json(text, std::path::Path::new("c")).unwrap()
    }

    #[test]
    fn reserve_and_release_blocks() {
        let mut kv = KvCache::new(&Cpu, &cfg(), 4, 3, KvDtype::F32).unwrap();
        let mut a = SeqKv::default();
        kv.reserve(&mut a, 5).unwrap();
        assert_eq!(a.blocks().len(), 2);
        kv.reserve(&mut a, 8).unwrap();
        assert_eq!(a.blocks().len(), 2);
        let mut b = SeqKv::default();
        let err = kv.reserve(&mut b, 9).unwrap_err();
        assert!(matches!(
            err,
            ModelError::KvCacheFull { needed: 3, free: 1 }
        ));
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 3);
        kv.reserve(&mut b, 9).unwrap();
        assert_eq!(kv.free_blocks(), 0);
    }

    #[test]
    fn trim_window_frees_only_blocks_no_query_can_see() {
        let mut kv = KvCache::new(&Cpu, &cfg(), 4, 8, KvDtype::F32).unwrap();
        let mut s = SeqKv::default();
        kv.reserve(&mut s, 13).unwrap();
        s.set_len(13);
        // Next query at 13 sees keys 8..=13 with a window of 6: blocks 0 and 1 (positions 0..8) go.
        assert_eq!(kv.trim_window(&mut s, 6), 2);
        assert_eq!(s.blocks()[..2], [FREED, FREED]);
        assert_eq!(kv.trim_window(&mut s, 6), 0, "idempotent");
        assert_eq!(kv.free_blocks(), 8 - 4 + 2);
        kv.release(&mut s);
        assert_eq!(kv.free_blocks(), 8);
    }

    /// A cache of `blocks` blocks of 4 positions with the prefix cache on.
    fn prefix_cache(blocks: usize) -> KvCache<Cpu> {
        KvCache::new(&Cpu, &cfg(), 4, blocks, KvDtype::F32)
            .unwrap()
            .with_prefix_cache()
    }

    /// Writes `tokens` into a fresh sequence as a step would (reserve, fill, commit).
    fn prefill(kv: &mut KvCache<Cpu>, seq: &mut SeqKv, tokens: &[u32]) {
        kv.reserve(seq, tokens.len()).unwrap();
        seq.set_len(tokens.len());
        kv.commit(seq, tokens);
    }

    #[test]
    fn a_prompt_reuses_the_full_blocks_of_an_earlier_one_and_computes_at_least_its_last_token() {
        let mut kv = prefix_cache(8);
        let first: Vec<u32> = (0..10).collect();
        let mut a = SeqKv::default();
        prefill(&mut kv, &mut a, &first);
        assert_eq!(kv.prefix_cached_blocks(), 2, "two full blocks of four");

        // Same first 9 tokens, then different: both full blocks are shared, held twice.
        let second: Vec<u32> = (0..9).chain([99, 98, 97]).collect();
        let mut b = SeqKv::default();
        assert_eq!(kv.attach_prefix(&mut b, &second), 8);
        assert_eq!(b.blocks(), &a.blocks()[..2]);
        assert_eq!(kv.free_blocks(), 8 - 3);

        // A prompt that is exactly the cached blocks keeps its last token to compute.
        let mut c = SeqKv::default();
        assert_eq!(kv.attach_prefix(&mut c, &first[..8]), 4);
        // A different first block shares nothing, even where a later block's tokens match.
        let mut d = SeqKv::default();
        let other: Vec<u32> = [50, 51, 52, 53].into_iter().chain(4..10).collect();
        assert_eq!(kv.attach_prefix(&mut d, &other), 0);
        assert!(d.is_empty());

        // Released by everyone, the blocks stay findable and count as free.
        for s in [&mut a, &mut b, &mut c] {
            kv.release(s);
        }
        assert_eq!(kv.free_blocks(), 8);
        let mut e = SeqKv::default();
        assert_eq!(kv.attach_prefix(&mut e, &first), 8);
        assert_eq!(kv.free_blocks(), 6);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_least_recent_first_and_tails_before_heads() {
        let mut kv = prefix_cache(4);
        let (p, q): (Vec<u32>, Vec<u32>) = ((0..9).collect(), (100..105).collect());
        let (mut a, mut b) = (SeqKv::default(), SeqKv::default());
        prefill(&mut kv, &mut a, &p); // blocks: [0..4], [4..8], partial
        kv.release(&mut a);
        prefill(&mut kv, &mut b, &q); // takes the free partial block and one more
        kv.release(&mut b);
        assert_eq!(kv.prefix_cached_blocks(), 3);
        assert_eq!(kv.free_blocks(), 4);

        // One block more than the free list holds: the oldest idle block goes, which is p's
        // tail, released before its head.
        let mut c = SeqKv::default();
        kv.reserve(&mut c, 8).unwrap();
        assert_eq!(kv.prefix_cached_blocks(), 2);
        let mut probe = SeqKv::default();
        assert_eq!(
            kv.attach_prefix(&mut probe, &p),
            4,
            "p's head is still there"
        );
        kv.release(&mut probe);
        assert_eq!(kv.attach_prefix(&mut probe, &q), 4);
        kv.release(&mut probe);

        // Held blocks are never evicted: with c holding two and the rest idle, asking for more
        // than all of them fails cleanly.
        let mut d = SeqKv::default();
        let err = kv.reserve(&mut d, 12).unwrap_err();
        assert!(matches!(
            err,
            ModelError::KvCacheFull { needed: 3, free: 2 }
        ));
        kv.reserve(&mut d, 8).unwrap();
        assert_eq!(kv.prefix_cached_blocks(), 0);
        assert_eq!(kv.free_blocks(), 0);
    }

    #[test]
    fn a_shared_block_is_freed_only_when_its_last_holder_lets_go() {
        let mut kv = prefix_cache(6);
        let p: Vec<u32> = (0..13).collect();
        let mut a = SeqKv::default();
        prefill(&mut kv, &mut a, &p);
        let mut b = SeqKv::default();
        assert_eq!(kv.attach_prefix(&mut b, &p), 12);
        kv.reserve(&mut b, 13).unwrap();
        b.set_len(13);
        assert_eq!(kv.free_blocks(), 6 - 5);
        // The sliding window lets `a` drop its first two blocks; `b` still holds them.
        assert_eq!(kv.trim_window(&mut a, 6), 2);
        assert_eq!(kv.free_blocks(), 1);
        kv.release(&mut b);
        // b's private last block is free; the three shared ones are idle: a let go of two and
        // still holds the third.
        assert_eq!(kv.free_blocks(), 1 + 1 + 2);
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 6);
    }

    #[test]
    fn without_the_prefix_cache_nothing_is_shared_or_kept() {
        let mut kv = KvCache::new(&Cpu, &cfg(), 4, 4, KvDtype::F32).unwrap();
        assert!(!kv.prefix_cache_enabled());
        let p: Vec<u32> = (0..9).collect();
        let mut a = SeqKv::default();
        prefill(&mut kv, &mut a, &p);
        let mut b = SeqKv::default();
        assert_eq!(kv.attach_prefix(&mut b, &p), 0);
        kv.release(&mut a);
        assert_eq!(kv.prefix_cached_blocks(), 0);
        assert_eq!(kv.attach_prefix(&mut b, &p), 0);
    }
}
