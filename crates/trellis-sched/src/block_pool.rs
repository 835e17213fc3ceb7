//! The pool of KV-cache blocks: reference counts, the LRU free queue and the prefix-cache map.
//!
//! A block is in exactly one of three states:
//! - *owned*: `ref_cnt > 0`, listed in the block table of `ref_cnt` requests;
//! - *free and cached*: `ref_cnt == 0`, holds a full block of K/V whose hash is in the cache
//!   map; a later request with the same prefix may take it back;
//! - *free*: `ref_cnt == 0`, no hash.
//!
//! Every block with `ref_cnt == 0` sits in the free queue. New blocks are taken from the front
//! (least recently freed first); taking a cached block evicts its hash. Freed cached blocks go
//! to the back, freed uncached blocks to the front, so cached content survives as long as it can.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::request::TokenId;

/// Index of a block in the KV cache.
pub type BlockId = u32;

/// Hash of a full block: chains its parent's hash, its token ids, the LoRA id and extra keys.
/// 128 bits from two independent SipHash runs, so accidental collisions are out of reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// Hash of one full block.
    pub fn compute(
        parent: Option<BlockHash>,
        tokens: &[TokenId],
        lora_id: u32,
        extra: Option<u64>,
    ) -> BlockHash {
        let half = |domain: u8| {
            let mut h = DefaultHasher::new();
            domain.hash(&mut h);
            parent.hash(&mut h);
            tokens.hash(&mut h);
            lora_id.hash(&mut h);
            extra.hash(&mut h);
            h.finish()
        };
        BlockHash(((half(0) as u128) << 64) | half(1) as u128)
    }
}

#[derive(Debug, Clone, Default)]
struct Block {
    ref_cnt: u32,
    hash: Option<BlockHash>,
    /// Key in the free queue while `ref_cnt == 0`.
    free_key: Option<i64>,
}

/// Fixed set of KV-cache blocks with reference counts and a prefix-cache index.
#[derive(Debug, Clone)]
pub struct BlockPool {
    blocks: Vec<Block>,
    /// Free queue ordered by key: the first entry is evicted first.
    free: BTreeMap<i64, BlockId>,
    next_front: i64,
    next_back: i64,
    cached: HashMap<BlockHash, BlockId>,
    enable_caching: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        let mut pool = BlockPool {
            blocks: vec![Block::default(); num_blocks],
            free: BTreeMap::new(),
            next_front: -1,
            next_back: 0,
            cached: HashMap::new(),
            enable_caching,
        };
        for id in 0..num_blocks {
            pool.push_back(id as BlockId);
        }
        pool
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free, cached or not).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks owned by requests.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.blocks.len() as f64
    }

    /// Reference count of a block.
    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_cnt
    }

    /// The block holding the full block with this hash, if cached.
    pub fn get_cached_block(&self, hash: BlockHash) -> Option<BlockId> {
        if !self.enable_caching {
            return None;
        }
        self.cached.get(&hash).copied()
    }

    /// Whether a block is free (in the free queue).
    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks[id as usize].ref_cnt == 0
    }

    fn push_back(&mut self, id: BlockId) {
        let key = self.next_back;
        self.next_back += 1;
        self.free.insert(key, id);
        self.blocks[id as usize].free_key = Some(key);
    }

    fn push_front(&mut self, id: BlockId) {
        let key = self.next_front;
        self.next_front -= 1;
        self.free.insert(key, id);
        self.blocks[id as usize].free_key = Some(key);
    }

    /// Takes one more reference on each block (a prefix-cache hit); free ones leave the queue.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            let block = &mut self.blocks[id as usize];
            if block.ref_cnt == 0
                && let Some(key) = block.free_key.take()
            {
                self.free.remove(&key);
            }
            block.ref_cnt += 1;
        }
    }

    /// Takes `n` blocks from the front of the free queue, evicting their cached hashes.
    /// `None` (and nothing taken) when fewer than `n` are free.
    pub fn get_new_blocks(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = self.free.pop_first()?;
            let block = &mut self.blocks[id as usize];
            block.free_key = None;
            block.ref_cnt = 1;
            if let Some(hash) = block.hash.take()
                && self.cached.get(&hash) == Some(&id)
            {
                self.cached.remove(&hash);
            }
            out.push(id);
        }
        Some(out)
    }

    /// Drops one reference from each block, in the given order (callers pass a request's blocks
    /// tail first, so that its last blocks are evicted before its first ones).
    pub fn free_blocks(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.ref_cnt > 0, "freeing block {id} that is not owned");
            block.ref_cnt = block.ref_cnt.saturating_sub(1);
            if block.ref_cnt == 0 {
                if block.hash.is_some() {
                    self.push_back(id);
                } else {
                    self.push_front(id);
                }
            }
        }
    }

    /// Records that owned block `id` now holds the full block with `hash`.
    /// If another block already holds that hash, `id` stays uncached (its content is a duplicate).
    pub fn cache_block(&mut self, id: BlockId, hash: BlockHash) {
        if !self.enable_caching || self.blocks[id as usize].hash.is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(id);
            self.blocks[id as usize].hash = Some(hash);
        }
    }

    /// Forgets every cached hash of free blocks (vLLM's `reset_prefix_cache`).
    pub fn reset_prefix_cache(&mut self) {
        let free: Vec<BlockId> = self.free.values().copied().collect();
        for id in free {
            if let Some(hash) = self.blocks[id as usize].hash.take() {
                self.cached.remove(&hash);
            }
        }
    }

    /// Checks the pool's own invariants; `owners[b]` is how many block tables list block `b`.
    pub fn check_invariants(&self, owners: &[u32]) -> Result<(), String> {
        for (id, block) in self.blocks.iter().enumerate() {
            let owned_by = owners.get(id).copied().unwrap_or(0);
            if block.ref_cnt != owned_by {
                return Err(format!(
                    "block {id}: ref_cnt {} but {owned_by} owners",
                    block.ref_cnt
                ));
            }
            let in_queue = block
                .free_key
                .is_some_and(|k| self.free.get(&k) == Some(&(id as BlockId)));
            if (block.ref_cnt == 0) != in_queue {
                return Err(format!(
                    "block {id}: ref_cnt {} but in free queue = {in_queue}",
                    block.ref_cnt
                ));
            }
            if let Some(hash) = block.hash
                && self.cached.get(&hash) != Some(&(id as BlockId))
            {
                return Err(format!(
                    "block {id}: has a hash the cache map does not point back to"
                ));
            }
        }
        if self.free.len() != self.blocks.iter().filter(|b| b.ref_cnt == 0).count() {
            return Err("free queue length differs from the number of unowned blocks".into());
        }
        for (hash, &id) in &self.cached {
            if self.blocks[id as usize].hash != Some(*hash) {
                return Err(format!(
                    "cache map points to block {id} that does not hold that hash"
                ));
            }
        }
        Ok(())
    }
}
