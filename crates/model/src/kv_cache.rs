//! Paged KV cache: fixed-size blocks in one pool per layer, a free list, and per-sequence block
//! tables. Sequences grow block by block; nothing is copied when they do.

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
}

/// A block-table entry whose block was freed because it fell outside the sliding window.
pub const FREED: u32 = u32::MAX;

/// One sequence's view of the cache: its block table and how many positions are filled.
#[derive(Clone, Debug, Default)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
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
        })
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
        if need > self.free.len() {
            return Err(ModelError::KvCacheFull {
                needed: need,
                free: self.free.len(),
            });
        }
        for _ in 0..need {
            // Checked above: `need <= free.len()`.
            if let Some(b) = self.free.pop() {
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Returns all of `seq`'s blocks to the free list.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.free
            .extend(seq.blocks.drain(..).filter(|&b| b != FREED));
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
        for b in seq.blocks.iter_mut().take(dead) {
            if *b != FREED {
                self.free.push(*b);
                *b = FREED;
                freed += 1;
            }
        }
        freed
    }

    /// Free blocks.
    #[must_use]
    pub fn free_blocks(&self) -> usize {
        self.free.len()
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
}
