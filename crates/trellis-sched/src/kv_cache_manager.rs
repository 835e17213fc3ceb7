//! Per-request block tables on top of the [`BlockPool`], and the prefix-cache lookup.

use std::collections::HashMap;

use crate::block_pool::{BlockHash, BlockId, BlockPool};
use crate::request::{Request, RequestId};

/// Cumulative prefix-cache counters (vLLM's `PrefixCacheStats`, as monotonic totals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefixCacheStats {
    /// Requests that looked up the cache.
    pub requests: u64,
    /// Tokens looked up (prompt tokens of those requests).
    pub queries: u64,
    /// Tokens found in the cache.
    pub hits: u64,
    /// Lookups of requests coming back after a preemption (counted apart, as vLLM does, so
    /// that recomputation does not inflate the hit rate).
    pub preempted_requests: u64,
    /// Tokens those looked up.
    pub preempted_queries: u64,
    /// Tokens those found.
    pub preempted_hits: u64,
}

/// Owns the block pool and every request's block table.
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    enable_caching: bool,
    req_to_blocks: HashMap<RequestId, Vec<BlockId>>,
    /// How many leading blocks of each request have been registered in the prefix cache.
    num_cached_blocks: HashMap<RequestId, usize>,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    /// A manager over `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> Self {
        KvCacheManager {
            pool: BlockPool::new(num_blocks, enable_caching),
            block_size,
            enable_caching,
            req_to_blocks: HashMap::new(),
            num_cached_blocks: HashMap::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Prefix-cache counters so far.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// The block table of a request (empty if it holds none).
    pub fn block_table(&self, request_id: &str) -> &[BlockId] {
        self.req_to_blocks
            .get(request_id)
            .map_or(&[], |v| v.as_slice())
    }

    /// Every block table, for invariant checks.
    pub fn block_tables(&self) -> impl Iterator<Item = (&RequestId, &Vec<BlockId>)> {
        self.req_to_blocks.iter()
    }

    /// The longest cached prefix of `request`'s full blocks, and how many tokens it covers.
    /// At least the last token is always left to compute, so that there are logits to sample.
    /// Takes no references: pass the blocks to [`Self::allocate_slots`].
    pub fn get_computed_blocks(&mut self, request: &Request) -> (Vec<BlockId>, usize) {
        if !self.enable_caching || request.skip_reading_prefix_cache {
            return (Vec::new(), 0);
        }
        let max_hit_blocks = (request.num_tokens() - 1) / self.block_size;
        let mut blocks = Vec::new();
        for hash in request.block_hashes.iter().take(max_hit_blocks) {
            match self.pool.get_cached_block(*hash) {
                Some(id) => blocks.push(id),
                None => break,
            }
        }
        let hit_tokens = blocks.len() * self.block_size;
        if request.num_preemptions > 0 {
            self.stats.preempted_requests += 1;
            self.stats.preempted_queries += request.num_tokens() as u64;
            self.stats.preempted_hits += hit_tokens as u64;
        } else {
            self.stats.requests += 1;
            self.stats.queries += request.num_tokens() as u64;
            self.stats.hits += hit_tokens as u64;
        }
        (blocks, hit_tokens)
    }

    /// Gives `request` the slots for `num_new_tokens` more tokens after its computed ones
    /// (`request.num_computed_tokens` plus the tokens of `new_computed_blocks`, prefix hits
    /// found by [`Self::get_computed_blocks`]). Returns false, changing nothing, when there are
    /// not enough free blocks. Full blocks are registered in the prefix cache.
    pub fn allocate_slots(
        &mut self,
        request: &Request,
        num_new_tokens: usize,
        new_computed_blocks: &[BlockId],
    ) -> bool {
        let have = self.block_table(&request.request_id).len() + new_computed_blocks.len();
        let num_computed =
            request.num_computed_tokens + new_computed_blocks.len() * self.block_size;
        let total = num_computed + num_new_tokens;
        let need = total.div_ceil(self.block_size).saturating_sub(have);
        // Hit blocks that sit in the free queue stop being available once we take them.
        let free_hits = new_computed_blocks
            .iter()
            .filter(|&&b| self.pool.is_free(b))
            .count();
        if need + free_hits > self.pool.num_free_blocks() {
            return false;
        }
        self.pool.touch(new_computed_blocks);
        let Some(new_blocks) = self.pool.get_new_blocks(need) else {
            // Cannot happen after the check above; undo the touch to stay consistent.
            self.pool
                .free_blocks(new_computed_blocks.iter().rev().copied());
            return false;
        };
        let table = self
            .req_to_blocks
            .entry(request.request_id.clone())
            .or_default();
        if table.is_empty() {
            self.num_cached_blocks
                .insert(request.request_id.clone(), new_computed_blocks.len());
        }
        table.extend_from_slice(new_computed_blocks);
        table.extend(new_blocks);
        true
    }

    /// Registers in the prefix cache every full block of `request` among its first
    /// `num_tokens` tokens. Called once the step that computes them is final (after all
    /// preemptions), so a cached block always holds K/V that a forward pass writes.
    pub fn cache_blocks(&mut self, request: &Request, num_tokens: usize) {
        if !self.enable_caching {
            return;
        }
        let Some(table) = self.req_to_blocks.get(&request.request_id) else {
            return;
        };
        let num_full = (num_tokens / self.block_size)
            .min(request.block_hashes.len())
            .min(table.len());
        let cached = self
            .num_cached_blocks
            .entry(request.request_id.clone())
            .or_insert(0);
        for i in *cached..num_full {
            self.pool.cache_block(table[i], request.block_hashes[i]);
        }
        *cached = (*cached).max(num_full);
    }

    /// Releases every block of a request (tail first, so its last blocks are evicted first).
    pub fn free(&mut self, request_id: &str) {
        if let Some(blocks) = self.req_to_blocks.remove(request_id) {
            self.pool.free_blocks(blocks.into_iter().rev());
        }
        self.num_cached_blocks.remove(request_id);
    }

    /// Forgets all cached prefixes held by free blocks.
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_prefix_cache();
    }

    /// Checks that reference counts equal the number of block tables listing each block, and
    /// that no block is both free and owned.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owners = vec![0u32; self.pool.num_blocks()];
        for (id, table) in &self.req_to_blocks {
            let mut seen = std::collections::HashSet::new();
            for &b in table {
                if !seen.insert(b) {
                    return Err(format!("request {id} lists block {b} twice"));
                }
                owners[b as usize] += 1;
            }
        }
        self.pool.check_invariants(&owners)
    }
}

/// Extends `request.block_hashes` to cover every full block of its known tokens.
pub(crate) fn update_block_hashes(request: &mut Request, block_size: usize) {
    while (request.block_hashes.len() + 1) * block_size <= request.num_tokens() {
        let i = request.block_hashes.len();
        let tokens = request.tokens(i * block_size, (i + 1) * block_size);
        let parent = request.block_hashes.last().copied();
        let hash: BlockHash =
            BlockHash::compute(parent, &tokens, request.lora_id, request.cache_salt);
        request.block_hashes.push(hash);
    }
}
